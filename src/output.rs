//! What the peer writes on stdout: JSON events for programs, or a chat view for people.
//!
//! [`Event`] is the `--json` contract (docs/events.md lists every event and field). The chat
//! view renders the same events as text and never lets control or escape characters from the
//! network reach the terminal.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use serde::Serialize;

use crate::frame::PeerInfo;
use crate::id::PeerId;

/// Version of the `--json` event contract.
pub const EVENTS_VERSION: u32 = 1;

/// Why a neighbour is no longer connected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DownReason {
    /// It said goodbye.
    Goodbye,
    /// Its connection ended (EOF, reset or a protocol error).
    Closed,
    /// Its heartbeats stopped.
    Timeout,
    /// The lab's fault-injection hook cut it.
    Cut,
}

#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event<'a> {
    Listening {
        id: &'a PeerId,
        name: &'a str,
        addr: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        advertise: Option<&'a str>,
        protocol: u32,
        events: u32,
        security: crate::frame::Security,
    },
    PeerUp {
        peer: &'a PeerInfo,
        /// The last sequence number the peer had said when the handshake ran.
        seq: u64,
        protocol: u32,
    },
    PeerDown {
        peer: &'a PeerInfo,
        reason: DownReason,
    },
    Message {
        msg_id: String,
        seq: u64,
        from: &'a PeerInfo,
        via: &'a PeerId,
        text: &'a str,
        sent_at_ms: u64,
        caught_up: bool,
    },
    Sent {
        msg_id: String,
        seq: u64,
        text: &'a str,
        /// No neighbour was connected: the line waits for the mesh to re-form.
        queued: bool,
    },
    Gap {
        from: &'a PeerInfo,
        missed: u64,
        /// The last sequence number skipped.
        upto: u64,
    },
    Peers {
        peers: &'a [PeerInfo],
    },
    Help {
        text: &'a str,
    },
    /// The lab hook's cut table after a `/lab` command.
    Hook {
        cuts: BTreeMap<String, &'static str>,
    },
    /// A line typed on stdin was rejected.
    Error {
        message: String,
    },
    /// A neighbour's word for this peer's user (for example: sending too fast).
    Notice {
        from: &'a PeerInfo,
        text: &'a str,
    },
}

pub fn msg_id(origin: &PeerId, seq: u64) -> String {
    format!("{origin}-{seq}")
}

pub const HELP: &str = "Type a line to send it to every peer. Commands:\n  \
    /peers  list connected peers\n  \
    /help   this help\n  \
    /quit   leave the mesh (also Ctrl-C)\n  \
    //text  send a line that starts with /";

/// How long writing events directly waits for the ones queued before them.
const PRINT_WAIT: Duration = Duration::from_millis(100);

/// Events waiting for stdout before new ones are dropped.
pub const OUTPUT_QUEUE: usize = 65_536;

/// Writes events to stdout from a thread of its own, through a queue bounded in events and in
/// bytes: a reader that stops reading (a paused terminal, `peer | less`, a full pipe) never
/// stalls the peer. If the queue fills, events are dropped and counted, with a warning on stderr.
/// (A peer with a state directory prints lines on its own thread instead: see [`Output::emit_now`].)
pub struct Output {
    json: bool,
    queue: Option<SyncSender<Item>>,
    /// Bytes waiting for stdout before new events are dropped (a line of control characters
    /// escapes to six times its size in JSON, so events alone are no bound on memory).
    max_bytes: usize,
    /// Bytes queued and not yet written, shared with the stdout thread.
    queued_bytes: Arc<AtomicUsize>,
    done: Receiver<()>,
    dropped: u64,
}

/// What the stdout thread is given.
enum Item {
    Line(Vec<u8>),
    /// Answer once everything before has been written.
    Barrier(SyncSender<()>),
}

impl Output {
    pub fn new(json: bool, max_bytes: usize) -> Output {
        let (queue, lines) = sync_channel::<Item>(OUTPUT_QUEUE);
        let (finished, done) = sync_channel(1);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let written = queued_bytes.clone();
        std::thread::Builder::new()
            .name("stdout".into())
            .spawn(move || {
                write_lines(lines, &written);
                let _ = finished.send(());
            })
            .expect("cannot start the stdout thread");
        Output { json, queue: Some(queue), max_bytes, queued_bytes, done, dropped: 0 }
    }

    pub fn emit(&mut self, event: &Event) {
        let Some(line) = self.render(event) else { return };
        let Some(queue) = &self.queue else { return };
        let size = line.len();
        let queued = if self.queued_bytes.load(Ordering::Acquire) + size > self.max_bytes {
            false
        } else {
            self.queued_bytes.fetch_add(size, Ordering::AcqRel);
            match queue.try_send(Item::Line(line)) {
                Err(TrySendError::Full(_)) => {
                    self.queued_bytes.fetch_sub(size, Ordering::AcqRel);
                    false
                }
                _ => true,
            }
        };
        if !queued {
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                tracing::warn!("stdout is not being read: {} events dropped so far", self.dropped);
            }
        }
    }

    /// Writes events to stdout now, on this thread, after everything emitted before them. For
    /// a peer with a state directory, which records them as shown right after. This write
    /// blocks: a stdout nobody reads stalls such a peer (its neighbours then time it out), the
    /// price of never showing a line twice across crashes.
    pub fn emit_now(&mut self, events: &[Event]) {
        let lines: Vec<u8> = events.iter().filter_map(|e| self.render(e)).flatten().collect();
        self.written(PRINT_WAIT);
        let mut out = io::stdout().lock();
        if let Err(e) = out.write_all(&lines).and_then(|_| out.flush()) {
            tracing::warn!("cannot write to stdout ({e})");
        }
    }

    /// An event as stdout bytes (the chat view prints stderr notices itself).
    fn render(&self, event: &Event) -> Option<Vec<u8>> {
        if self.json {
            let mut line = serde_json::to_vec(event).expect("events serialise");
            line.push(b'\n');
            return Some(line);
        }
        match chat_view(event) {
            View::Stdout(text) => Some(format!("{text}\n").into_bytes()),
            View::Stderr(text) => {
                eprintln!("{text}");
                None
            }
            View::Nothing => None,
        }
    }

    /// Waits, at most `wait`, until every event emitted so far has been written to stdout.
    fn written(&self, wait: Duration) {
        let Some(queue) = &self.queue else { return };
        let (ack, acked) = sync_channel(1);
        if queue.try_send(Item::Barrier(ack)).is_ok() {
            let _ = acked.recv_timeout(wait);
        }
    }

    /// Lets the queued events out, waiting at most `wait` for stdout to take them.
    pub fn close(&mut self, wait: Duration) {
        self.queue = None;
        let _ = self.done.recv_timeout(wait);
    }
}

/// The stdout thread: writes lines as they come, flushing whenever the queue runs dry or a
/// barrier asks.
fn write_lines(items: Receiver<Item>, queued_bytes: &AtomicUsize) {
    let mut broken = false;
    let mut barriers = Vec::new();
    let mut batch = Vec::new();
    while let Ok(item) = items.recv() {
        let mut next = Some(item);
        while let Some(item) = next {
            match item {
                Item::Line(line) => batch.extend_from_slice(&line),
                Item::Barrier(ack) => barriers.push(ack),
            }
            next = items.try_recv().ok();
        }
        // Locked per batch, not for good: a peer with a state directory also writes directly.
        let mut out = io::stdout().lock();
        let result = out.write_all(&batch).and_then(|_| out.flush());
        drop(out);
        queued_bytes.fetch_sub(batch.len(), Ordering::AcqRel);
        batch.clear();
        for ack in barriers.drain(..) {
            let _ = ack.send(());
        }
        if let Err(e) = result
            && !broken
        {
            tracing::warn!("cannot write to stdout ({e}); events are being dropped");
            broken = true;
        }
    }
}

enum View {
    Stdout(String),
    Stderr(String),
    Nothing,
}

fn who(p: &PeerInfo) -> String {
    format!("{}@{}", clean(&p.name), clean(&p.addr))
}

fn chat_view(event: &Event) -> View {
    match event {
        Event::Listening { id, name, addr, .. } => View::Stderr(format!(
            "* {} ({}) listening on {addr}: type a line to chat, /help for commands",
            clean(name),
            id.short()
        )),
        Event::PeerUp { peer, .. } => View::Stdout(format!("* {} joined", who(peer))),
        Event::PeerDown { peer, reason } => {
            let why = match reason {
                DownReason::Goodbye => "left",
                DownReason::Closed => "disconnected",
                DownReason::Timeout => "timed out",
                DownReason::Cut => "was cut off",
            };
            View::Stdout(format!("* {} {why}", who(peer)))
        }
        Event::Message { from, text, caught_up, sent_at_ms, .. } if *caught_up => {
            View::Stdout(format!("[{}] {}  (caught up: said {} UTC)", who(from), clean(text), clock(*sent_at_ms)))
        }
        Event::Message { from, text, .. } => View::Stdout(format!("[{}] {}", who(from), clean(text))),
        Event::Sent { queued: true, .. } => {
            View::Stdout("* no peer connected: your line will be delivered when the mesh re-forms".into())
        }
        Event::Sent { .. } | Event::Hook { .. } => View::Nothing,
        Event::Gap { from, missed, .. } => {
            View::Stdout(format!("* {missed} earlier lines from {} are lost (older than the history kept)", who(from)))
        }
        Event::Peers { peers: [] } => View::Stdout("* no peer connected".into()),
        Event::Peers { peers } => {
            let list: Vec<String> = peers.iter().map(who).collect();
            View::Stdout(format!("* {} peers: {}", peers.len(), list.join(", ")))
        }
        Event::Help { text } => View::Stdout(text.to_string()),
        Event::Error { message } => View::Stderr(format!("! {message}")),
        Event::Notice { from, text } => View::Stdout(format!("* {} says: {}", who(from), clean(text))),
    }
}

/// Text from the network made safe for a terminal: every character that could act on the
/// terminal or on how the text around it is shown ([`is_unsafe`]) becomes U+FFFD.
pub fn clean(s: &str) -> String {
    s.chars().map(|c| if is_unsafe(c) { '\u{fffd}' } else { c }).collect()
}

/// Whether a character may act on a terminal or on the text around it rather than show as
/// itself: control characters (Unicode Cc: escape sequences, carriage returns, bells), format
/// characters (Cf: bidirectional marks and overrides, zero-width characters, invisible
/// operators, tags) and line and paragraph separators (Zl, Zp). The Cf list is Unicode 15's.
pub fn is_unsafe(c: char) -> bool {
    const FORMAT: &[(char, char)] = &[
        ('\u{00ad}', '\u{00ad}'),
        ('\u{0600}', '\u{0605}'),
        ('\u{061c}', '\u{061c}'),
        ('\u{06dd}', '\u{06dd}'),
        ('\u{070f}', '\u{070f}'),
        ('\u{0890}', '\u{0891}'),
        ('\u{08e2}', '\u{08e2}'),
        ('\u{180e}', '\u{180e}'),
        ('\u{200b}', '\u{200f}'),
        ('\u{2028}', '\u{202e}'),
        ('\u{2060}', '\u{2064}'),
        ('\u{2066}', '\u{206f}'),
        ('\u{feff}', '\u{feff}'),
        ('\u{fff9}', '\u{fffb}'),
        ('\u{110bd}', '\u{110bd}'),
        ('\u{110cd}', '\u{110cd}'),
        ('\u{13430}', '\u{1343f}'),
        ('\u{1bca0}', '\u{1bca3}'),
        ('\u{1d173}', '\u{1d17a}'),
        ('\u{e0001}', '\u{e0001}'),
        ('\u{e0020}', '\u{e007f}'),
    ];
    c.is_control() || FORMAT.iter().any(|(lo, hi)| (*lo..=*hi).contains(&c))
}

/// HH:MM:SS (UTC) of a Unix time in milliseconds.
fn clock(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60, s % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_removes_escapes_controls_bidi_separators_and_zero_widths() {
        assert_eq!(clean("hi\x1b[2Jthere\r\x07"), "hi\u{fffd}[2Jthere\u{fffd}\u{fffd}");
        for sneaky in [
            "\u{202e}",
            "\u{2066}",
            "\u{200e}",
            "\u{061c}",
            "\u{2028}",
            "\u{2029}",
            "\u{200b}",
            "\u{2060}",
            "\u{feff}",
            "\u{e0041}",
            "\u{85}",
        ] {
            assert_eq!(clean(&format!("a{sneaky}b")), "a\u{fffd}b", "{:?}", sneaky.escape_unicode().to_string());
        }
        assert_eq!(clean("olá 👋 老王"), "olá 👋 老王");
    }

    #[test]
    fn clock_formats_utc_time() {
        assert_eq!(clock(((13 * 3600 + 4 * 60 + 5) * 1000) + 999), "13:04:05");
    }

    #[test]
    fn chat_view_shows_name_at_addr() {
        let peer =
            PeerInfo { id: PeerId(crate::id::Hex::random()), name: "bob\x1b".into(), addr: "10.0.0.2:4000".into() };
        let id = peer.id;
        let ev = Event::Message {
            msg_id: msg_id(&id, 1),
            seq: 1,
            from: &peer,
            via: &id,
            text: "hello",
            sent_at_ms: 0,
            caught_up: false,
        };
        match chat_view(&ev) {
            View::Stdout(s) => assert_eq!(s, "[bob\u{fffd}@10.0.0.2:4000] hello"),
            _ => panic!("messages go to stdout"),
        }
    }

    #[test]
    fn json_events_are_tagged() {
        let ev = Event::Error { message: "x".into() };
        assert_eq!(serde_json::to_string(&ev).unwrap(), r#"{"event":"error","message":"x"}"#);
    }
}
