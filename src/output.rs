//! What the peer writes on stdout: JSON events for programs, or a chat view for people.
//!
//! [`Event`] is the `--json` contract (docs/events.md lists every event and field). The chat
//! view renders the same events as text and never lets control or escape characters from the
//! network reach the terminal.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
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
    /// The answer to `/stats`: neighbours now, and counts since the start.
    Stats {
        neighbours: usize,
        /// Connections this peer dialled, accepted, and admitted after their handshake.
        dials: u64,
        accepted: u64,
        admitted: u64,
        /// Frames and bytes (length prefix and payload, before sealing) after the handshakes.
        frames_in: u64,
        bytes_in: u64,
        frames_out: u64,
        bytes_out: u64,
    },
    Help {
        text: &'a str,
    },
    /// The lab hook's cut and condition tables after a `/lab` command.
    Hook {
        cuts: BTreeMap<String, &'static str>,
        conditions: BTreeMap<String, String>,
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
    /stats  connections and traffic so far\n  \
    /help   this help\n  \
    /quit   leave the mesh (also Ctrl-C)\n  \
    //text  send a line that starts with /";

/// How long writing events directly waits for the ones queued before them.
const PRINT_WAIT: Duration = Duration::from_millis(100);

/// What an event queued for the stdout thread costs beyond its bytes (the queue's slot and the
/// event's own allocation), counted against the queue's bound.
const QUEUED_EVENT_COST: usize = 64;

/// Writes events to stdout (or wherever its [`Sink`] goes) through a queue bounded in bytes: a
/// reader that stops reading (a paused terminal, `peer | less`, a full pipe) never stalls the
/// peer. If the queue fills, events are dropped and counted, with a warning on stderr. (A peer
/// with a state directory prints lines at once instead: see [`Output::emit_now`].)
pub struct Output {
    json: bool,
    style: Style,
    sink: Sink,
    dropped: u64,
}

/// How the chat view dresses its lines: on a terminal (crate::terminal) with the local time
/// and a colour per name, unless `NO_COLOR` is set; elsewhere plain, as scripts read it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Style {
    pub clock: bool,
    pub colour: bool,
}

impl Style {
    /// The terminal's style.
    pub fn terminal() -> Style {
        Style { clock: true, colour: std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty()) }
    }
}

impl Output {
    pub fn new(json: bool, sink: Sink) -> Output {
        let style = if matches!(sink, Sink::Printer(_)) { Style::terminal() } else { Style::default() };
        Output { json, style, sink, dropped: 0 }
    }

    /// A notice for the person at the terminal: above the line being typed on a terminal, on
    /// stderr otherwise (never among the events).
    pub fn notice(&mut self, text: &str) {
        match &mut self.sink {
            Sink::Printer(p) => {
                let _ = print_above(p, text.as_bytes());
            }
            _ => eprintln!("{text}"),
        }
    }

    pub fn emit(&mut self, event: &Event) {
        let Some(line) = self.render(event) else { return };
        if !self.sink.push(line) {
            self.dropped += 1;
            if self.dropped.is_power_of_two() {
                tracing::warn!("stdout is not being read: {} events dropped so far", self.dropped);
            }
        }
    }

    /// Writes events now, after everything emitted before them. For a peer with a state
    /// directory, which records them as shown right after. This write blocks: a stdout nobody
    /// reads stalls such a peer (its neighbours then time it out), the price of never showing a
    /// line twice across crashes.
    pub fn emit_now(&mut self, events: &[Event]) {
        let lines: Vec<u8> = events.iter().filter_map(|e| self.render(e)).flatten().collect();
        if let Err(e) = self.sink.write_now(&lines) {
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
        match chat_view(event, self.style) {
            View::Stdout(text) => Some(format!("{text}\n").into_bytes()),
            // On a terminal, notices go above the line being typed too.
            View::Stderr(text) if matches!(self.sink, Sink::Printer(_)) => Some(format!("{text}\n").into_bytes()),
            View::Stderr(text) => {
                eprintln!("{text}");
                None
            }
            View::Nothing => None,
        }
    }

    /// Lets the queued events out, waiting at most `wait` for stdout to take them.
    pub fn close(&mut self, wait: Duration) {
        self.sink.close(wait);
    }
}

/// Where a peer's output goes.
pub enum Sink {
    /// Stdout as a pipe or a socket, written on the peer's own thread (see crate::stdio).
    Direct(Direct),
    /// Stdout as a terminal or a file, written by a thread of its own.
    Thread(Threaded),
    /// Events as bytes to a channel: a peer run inside another program (a test).
    Channel(tokio::sync::mpsc::UnboundedSender<Vec<u8>>),
    /// A terminal whose line being typed is rustyline's: lines print above it.
    Printer(crate::terminal::Printer),
}

impl Sink {
    /// Stdout, written the cheapest way it can be; at most `max_bytes` wait for a slow reader.
    /// Must be called inside a tokio runtime.
    pub fn stdout(max_bytes: usize) -> Sink {
        match crate::stdio::Stdout::nonblocking() {
            Some(out) => Sink::Direct(Direct::new(out, max_bytes)),
            None => Sink::Thread(Threaded::new(max_bytes)),
        }
    }

    /// Queues (or writes) a line; false when it had to be dropped.
    fn push(&mut self, line: Vec<u8>) -> bool {
        match self {
            Sink::Direct(d) => d.push(line),
            Sink::Thread(t) => t.push(line),
            Sink::Channel(c) => c.send(line).is_ok(),
            Sink::Printer(p) => print_above(p, &line).is_ok(),
        }
    }

    /// Writes `lines` now, after everything queued.
    fn write_now(&mut self, lines: &[u8]) -> io::Result<()> {
        match self {
            Sink::Direct(d) => d.write_now(lines),
            Sink::Thread(t) => t.write_now(lines),
            Sink::Channel(c) => c.send(lines.to_vec()).map_err(|_| io::Error::other("the channel is closed")),
            Sink::Printer(p) => print_above(p, lines),
        }
    }

    fn close(&mut self, wait: Duration) {
        match self {
            Sink::Direct(d) => d.close(wait),
            Sink::Thread(t) => t.close(wait),
            Sink::Channel(_) | Sink::Printer(_) => {}
        }
    }
}

/// Prints `lines` above the line being typed, newline-ended (rustyline adds none while no line
/// is being read).
fn print_above(printer: &mut crate::terminal::Printer, lines: &[u8]) -> io::Result<()> {
    let mut text = String::from_utf8_lossy(lines).into_owned();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    printer.print(text).map_err(io::Error::other)
}

/// Stdout written on the peer's thread: a line goes out at once when stdout has room; what it
/// cannot take yet waits in a queue that a task drains as stdout takes more.
pub struct Direct {
    shared: Arc<DirectShared>,
    task: tokio::task::JoinHandle<()>,
}

struct DirectShared {
    out: crate::stdio::Stdout,
    waiting: std::sync::Mutex<std::collections::VecDeque<u8>>,
    more: tokio::sync::Notify,
    max_bytes: usize,
    broken: std::sync::atomic::AtomicBool,
}

impl Direct {
    fn new(out: crate::stdio::Stdout, max_bytes: usize) -> Direct {
        let shared = Arc::new(DirectShared {
            out,
            waiting: Default::default(),
            more: tokio::sync::Notify::new(),
            max_bytes,
            broken: Default::default(),
        });
        let task = tokio::spawn(drain(shared.clone()));
        Direct { shared, task }
    }

    fn push(&mut self, line: Vec<u8>) -> bool {
        let mut waiting = self.shared.waiting.lock().expect("never poisoned");
        if waiting.is_empty() {
            let written = match self.shared.out.try_write(&line) {
                Ok(n) => n,
                Err(e) => {
                    self.shared.broke(e);
                    return true;
                }
            };
            if written == line.len() {
                return true;
            }
            waiting.extend(&line[written..]);
        } else if waiting.len() + line.len() > self.shared.max_bytes {
            return false;
        } else {
            waiting.extend(&line);
        }
        self.shared.more.notify_one();
        true
    }

    fn write_now(&mut self, lines: &[u8]) -> io::Result<()> {
        let mut waiting = self.shared.waiting.lock().expect("never poisoned");
        let before: Vec<u8> = waiting.drain(..).collect();
        self.shared.out.write_all_blocking(&before)?;
        self.shared.out.write_all_blocking(lines)
    }

    fn close(&mut self, wait: Duration) {
        self.task.abort();
        let deadline = std::time::Instant::now() + wait;
        let mut waiting = self.shared.waiting.lock().expect("never poisoned");
        while !waiting.is_empty() && std::time::Instant::now() < deadline {
            let (front, _) = waiting.as_slices();
            match self.shared.out.try_write(front) {
                Ok(0) => std::thread::sleep(Duration::from_millis(1)),
                Ok(n) => drop(waiting.drain(..n)),
                Err(_) => return,
            }
        }
    }
}

impl DirectShared {
    fn broke(&self, e: io::Error) {
        if !self.broken.swap(true, Ordering::Relaxed) {
            tracing::warn!("cannot write to stdout ({e}); events are being dropped");
        }
    }
}

/// Writes what waits whenever there is some, as fast as stdout takes it.
async fn drain(shared: Arc<DirectShared>) {
    loop {
        shared.more.notified().await;
        loop {
            let chunk: Vec<u8> = {
                let waiting = shared.waiting.lock().expect("never poisoned");
                let (front, _) = waiting.as_slices();
                front[..front.len().min(64 * 1024)].to_vec()
            };
            if chunk.is_empty() {
                shared.waiting.lock().expect("never poisoned").shrink_to(BATCH_KEPT);
                break;
            }
            match shared.out.write(&chunk).await {
                Ok(n) => drop(shared.waiting.lock().expect("never poisoned").drain(..n)),
                Err(e) => {
                    shared.broke(e);
                    shared.waiting.lock().expect("never poisoned").clear();
                }
            }
        }
    }
}

/// Stdout written by a thread of its own, through a queue bounded in bytes (each event's
/// overhead included). The queue grows as it fills: one preallocated for as many events as it
/// may hold would cost the peer megabytes from the start.
pub struct Threaded {
    queue: Option<Sender<Item>>,
    max_bytes: usize,
    /// Bytes queued and not yet written, shared with the stdout thread.
    queued_bytes: Arc<AtomicUsize>,
    done: Receiver<()>,
}

/// What the stdout thread is given.
enum Item {
    Line(Vec<u8>),
    /// Answer once everything before has been written.
    Barrier(SyncSender<()>),
}

impl Threaded {
    fn new(max_bytes: usize) -> Threaded {
        let (queue, lines) = channel::<Item>();
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
        Threaded { queue: Some(queue), max_bytes, queued_bytes, done }
    }

    fn push(&mut self, line: Vec<u8>) -> bool {
        let Some(queue) = &self.queue else { return true };
        let cost = line.len() + QUEUED_EVENT_COST;
        if self.queued_bytes.load(Ordering::Acquire) + cost > self.max_bytes {
            return false;
        }
        self.queued_bytes.fetch_add(cost, Ordering::AcqRel);
        // Fails only once the stdout thread is gone, and then nothing is written anyway.
        let _ = queue.send(Item::Line(line));
        true
    }

    fn write_now(&mut self, lines: &[u8]) -> io::Result<()> {
        self.written(PRINT_WAIT);
        let mut out = io::stdout().lock();
        out.write_all(lines).and_then(|_| out.flush())
    }

    /// Waits, at most `wait`, until every event emitted so far has been written to stdout.
    fn written(&self, wait: Duration) {
        let Some(queue) = &self.queue else { return };
        let (ack, acked) = sync_channel(1);
        if queue.send(Item::Barrier(ack)).is_ok() {
            let _ = acked.recv_timeout(wait);
        }
    }

    fn close(&mut self, wait: Duration) {
        self.queue = None;
        let _ = self.done.recv_timeout(wait);
    }
}

/// The most the stdout thread's batch keeps allocated between batches.
const BATCH_KEPT: usize = 64 * 1024;

/// The stdout thread: writes lines as they come, flushing whenever the queue runs dry or a
/// barrier asks.
fn write_lines(items: Receiver<Item>, queued_bytes: &AtomicUsize) {
    let mut broken = false;
    let mut barriers = Vec::new();
    let mut batch = Vec::new();
    while let Ok(item) = items.recv() {
        let mut next = Some(item);
        let mut cost = 0;
        while let Some(item) = next {
            match item {
                Item::Line(line) => {
                    batch.extend_from_slice(&line);
                    cost += line.len() + QUEUED_EVENT_COST;
                }
                Item::Barrier(ack) => barriers.push(ack),
            }
            next = items.try_recv().ok();
        }
        // Locked per batch, not for good: a peer with a state directory also writes directly.
        let mut out = io::stdout().lock();
        let result = out.write_all(&batch).and_then(|_| out.flush());
        drop(out);
        queued_bytes.fetch_sub(cost, Ordering::AcqRel);
        batch.clear();
        batch.shrink_to(BATCH_KEPT);
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

/// A sender as a line names it: `[name@addr]`, in the colour of its name when colours are on.
fn sender(p: &PeerInfo, style: Style) -> String {
    const COLOURS: [u8; 6] = [31, 32, 33, 34, 35, 36];
    let tag = format!("[{}]", who(p));
    if !style.colour {
        return tag;
    }
    let hash = p.name.bytes().fold(5381u32, |h, b| h.wrapping_mul(33) ^ u32::from(b));
    format!("\x1b[{}m{tag}\x1b[0m", COLOURS[hash as usize % COLOURS.len()])
}

/// The local time of now, `HH:MM:SS `, when the style shows it.
fn stamp(style: Style) -> String {
    if !style.clock {
        return String::new();
    }
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    format!("{} ", local_clock(now))
}

fn chat_view(event: &Event, style: Style) -> View {
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
        Event::Message { from, text, caught_up, sent_at_ms, .. } if *caught_up => View::Stdout(format!(
            "{}{} {}  (caught up: said {})",
            stamp(style),
            sender(from, style),
            clean(text),
            if style.clock { local_clock(*sent_at_ms) } else { format!("{} UTC", clock(*sent_at_ms)) }
        )),
        Event::Message { from, text, .. } => {
            View::Stdout(format!("{}{} {}", stamp(style), sender(from, style), clean(text)))
        }
        Event::Sent { queued: true, .. } => View::Stdout(
            "* no peer connected: your line is kept, and reaches the members who knew you when they reconnect \
             (peers that join afresh, or restart without their state, are not sent it)"
                .into(),
        ),
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
        Event::Stats { neighbours, dials, accepted, admitted, bytes_in, bytes_out, .. } => View::Stdout(format!(
            "* {neighbours} neighbours; {dials} dials, {accepted} accepted, {admitted} admitted; {bytes_in} bytes in, {bytes_out} out"
        )),
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

/// HH:MM:SS in the local time zone of a Unix time in milliseconds.
fn local_clock(ms: u64) -> String {
    // The seconds' type is libc's time_t, inferred from localtime_r (musl deprecates naming it).
    let Ok(t) = (ms / 1000).try_into() else { return clock(ms) };
    // SAFETY: localtime_r writes into the zeroed struct we pass and reads the time we pass.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&t, &mut tm) }.is_null() {
        return clock(ms);
    }
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
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
        match chat_view(&ev, Style::default()) {
            View::Stdout(s) => assert_eq!(s, "[bob\u{fffd}@10.0.0.2:4000] hello"),
            _ => panic!("messages go to stdout"),
        }
    }

    /// Every kind of line the chat view shows, plain (pipes, files) and dressed for a terminal
    /// (colours on; the clock, which changes, left off).
    #[test]
    fn each_chat_view_line_kind() {
        let id = PeerId::from_bytes([7; 32]);
        let bob = PeerInfo { id, name: "bob".into(), addr: "10.0.0.2:4000".into() };
        let alice = PeerInfo { id: PeerId::from_bytes([9; 32]), name: "alice".into(), addr: "10.0.0.3:4000".into() };
        let peers = [bob.clone(), alice.clone()];
        let message = |caught_up| Event::Message {
            msg_id: msg_id(&id, 3),
            seq: 3,
            from: &bob,
            via: &id,
            text: "hello\x1b[2J",
            sent_at_ms: 45_296_000,
            caught_up,
        };
        let events = [
            Event::Listening {
                id: &id,
                name: "bob",
                addr: "10.0.0.2:4000".into(),
                advertise: None,
                protocol: 2,
                events: EVENTS_VERSION,
                security: crate::frame::Security::Open,
            },
            Event::PeerUp { peer: &alice, seq: 0, protocol: 2 },
            Event::PeerDown { peer: &alice, reason: DownReason::Goodbye },
            Event::PeerDown { peer: &alice, reason: DownReason::Closed },
            Event::PeerDown { peer: &alice, reason: DownReason::Timeout },
            Event::PeerDown { peer: &alice, reason: DownReason::Cut },
            message(false),
            message(true),
            Event::Sent { msg_id: msg_id(&id, 4), seq: 4, text: "mine", queued: false },
            Event::Sent { msg_id: msg_id(&id, 5), seq: 5, text: "mine", queued: true },
            Event::Gap { from: &bob, missed: 12, upto: 20 },
            Event::Peers { peers: &[] },
            Event::Peers { peers: &peers },
            Event::Stats {
                neighbours: 2,
                dials: 3,
                accepted: 1,
                admitted: 2,
                frames_in: 10,
                bytes_in: 900,
                frames_out: 11,
                bytes_out: 1000,
            },
            Event::Help { text: HELP },
            Event::Hook { cuts: BTreeMap::new(), conditions: BTreeMap::new() },
            Event::Error { message: "line longer than 8192 bytes: not sent".into() },
            Event::Notice { from: &alice, text: "you send lines faster than 100 a second" },
        ];
        let mut shown = String::new();
        for style in [Style::default(), Style { clock: false, colour: true }] {
            shown.push_str(&format!("--- {style:?}\n"));
            for e in &events {
                shown.push_str(&match chat_view(e, style) {
                    View::Stdout(s) => format!("stdout: {s}\n"),
                    View::Stderr(s) => format!("stderr: {s}\n"),
                    View::Nothing => "(nothing)\n".into(),
                });
            }
        }
        insta::assert_snapshot!(shown.replace('\x1b', "<ESC>"));
    }

    #[test]
    fn json_events_are_tagged() {
        let ev = Event::Error { message: "x".into() };
        assert_eq!(serde_json::to_string(&ev).unwrap(), r#"{"event":"error","message":"x"}"#);
    }
}
