//! What the peer writes on stdout: JSON events for programs, or a chat view for people.
//!
//! [`Event`] is the `--json` contract (docs/events.md lists every event and field). The chat
//! view renders the same events as text and never lets control or escape characters from the
//! network reach the terminal.

use std::collections::BTreeMap;
use std::io::{self, BufWriter, Stdout, Write};

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
}

pub fn msg_id(origin: &PeerId, seq: u64) -> String {
    format!("{origin}-{seq}")
}

pub const HELP: &str = "Type a line to send it to every peer. Commands:\n  \
    /peers  list connected peers\n  \
    /help   this help\n  \
    /quit   leave the mesh (also Ctrl-C)\n  \
    //text  send a line that starts with /";

pub struct Output {
    json: bool,
    out: BufWriter<Stdout>,
    broken: bool,
}

impl Output {
    pub fn new(json: bool) -> Output {
        Output { json, out: BufWriter::new(io::stdout()), broken: false }
    }

    pub fn emit(&mut self, event: &Event) {
        let result = if self.json {
            serde_json::to_writer(&mut self.out, event).map_err(io::Error::from).and_then(|_| self.out.write_all(b"\n"))
        } else {
            match chat_view(event) {
                View::Stdout(text) => writeln!(self.out, "{text}"),
                View::Stderr(text) => {
                    eprintln!("{text}");
                    Ok(())
                }
                View::Nothing => Ok(()),
            }
        };
        self.note(result);
    }

    pub fn flush(&mut self) {
        let result = self.out.flush();
        self.note(result);
    }

    /// A closed stdout must not stop the peer: report it once and carry on.
    fn note(&mut self, result: io::Result<()>) {
        if let Err(e) = result {
            if !self.broken {
                tracing::warn!("cannot write to stdout ({e}); events are being dropped");
                self.broken = true;
            }
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
    }
}

/// Text from the network made safe for a terminal: control characters (escape sequences,
/// carriage returns, bells) and bidirectional overrides become U+FFFD.
pub fn clean(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_control() || ('\u{202a}'..='\u{202e}').contains(&c) || ('\u{2066}'..='\u{2069}').contains(&c) {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
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
    fn clean_removes_escapes_and_controls() {
        assert_eq!(clean("hi\x1b[2Jthere\r\x07"), "hi\u{fffd}[2Jthere\u{fffd}\u{fffd}");
        assert_eq!(clean("a\u{202e}b"), "a\u{fffd}b");
        assert_eq!(clean("olá 👋"), "olá 👋");
    }

    #[test]
    fn clock_formats_utc_time() {
        assert_eq!(clock(((13 * 3600 + 4 * 60 + 5) * 1000) + 999), "13:04:05");
    }

    #[test]
    fn chat_view_shows_name_at_addr() {
        let peer = PeerInfo { id: PeerId::random(), name: "bob\x1b".into(), addr: "10.0.0.2:4000".into() };
        let id = peer.id.clone();
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
