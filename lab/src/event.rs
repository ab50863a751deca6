//! The peer's `--json` event stream, as the lab reads it.
//!
//! This mirrors docs/events.md (contract version 1). Unknown events are kept as `Other`, so a
//! newer peer does not break an older lab; a line that is not JSON at all is a contract breach
//! and is reported as such.

use serde::{Deserialize, Serialize};

/// A peer as named in events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRef {
    pub id: String,
    pub name: String,
    pub addr: String,
}

/// Serialized again (in a run's history, crate::history) as the fields the lab read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum PeerEvent {
    Listening {
        id: String,
        name: String,
        addr: String,
    },
    PeerUp {
        peer: PeerRef,
        seq: u64,
    },
    PeerDown {
        peer: PeerRef,
        reason: String,
    },
    Message {
        msg_id: String,
        seq: u64,
        from: PeerRef,
        via: String,
        text: String,
        caught_up: bool,
    },
    Sent {
        msg_id: String,
        seq: u64,
        text: String,
    },
    Gap {
        from: PeerRef,
        missed: u64,
        upto: u64,
    },
    Peers {
        peers: Vec<PeerRef>,
    },
    Stats(Stats),
    Hook {
        cuts: std::collections::BTreeMap<String, String>,
        /// Conditions of what the peer sends, by name (absent from peers before them).
        #[serde(default)]
        conditions: std::collections::BTreeMap<String, String>,
    },
    Error {
        message: String,
    },
    Notice {
        from: PeerRef,
        text: String,
    },
    #[serde(other)]
    Other,
}

/// A peer's answer to `/stats`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub neighbours: usize,
    pub dials: u64,
    pub accepted: u64,
    pub admitted: u64,
    pub frames_in: u64,
    pub bytes_in: u64,
    pub frames_out: u64,
    pub bytes_out: u64,
}

impl PeerEvent {
    pub fn parse(line: &str) -> Result<PeerEvent, String> {
        serde_json::from_str(line).map_err(|e| format!("not a valid event ({e}): {line}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_known_and_unknown_events() {
        let up = r#"{"event":"peer_up","peer":{"id":"a","name":"n","addr":"1.2.3.4:5"},"seq":3,"protocol":1}"#;
        assert!(matches!(PeerEvent::parse(up).unwrap(), PeerEvent::PeerUp { seq: 3, .. }));
        assert_eq!(PeerEvent::parse(r#"{"event":"future_thing","x":1}"#).unwrap(), PeerEvent::Other);
        assert!(PeerEvent::parse("garbage").is_err());
    }
}
