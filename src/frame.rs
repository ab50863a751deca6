//! The wire format: length-delimited frames, each carrying one JSON message.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes. The length is checked
//! against [`MAX_FRAME`] before any buffer is grown, so a hostile length costs nothing. Every
//! message is validated after parsing (sizes of names, texts and lists), so the rest of the peer
//! only sees well-formed values. docs/protocol.md describes the same thing for humans.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::codec::LengthDelimitedCodec;

use crate::addr;
use crate::id::PeerId;

/// Largest frame payload accepted or sent. Also the Noise maximum message size.
pub const MAX_FRAME: usize = 65535;
/// Largest chat text, in bytes (leaves room for JSON escaping inside one frame).
pub const MAX_TEXT: usize = 8 * 1024;
/// Largest peer name, in bytes.
pub const MAX_NAME: usize = 64;
/// Most peers listed in one `hello` or `peers` message (64 of the largest entries still fit a
/// frame; longer member lists are sent in several `peers` messages).
pub const MAX_GOSSIP: usize = 64;
/// Most senders in one `digest` message; larger digests are split over several frames.
pub const MAX_DIGEST: usize = 512;

/// Protocol versions this build speaks, lowest and highest.
pub const PROTOCOL_MIN: u32 = 1;
pub const PROTOCOL_MAX: u32 = 1;

/// The frame codec used on every connection.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().length_field_length(4).max_frame_length(MAX_FRAME).new_codec()
}

/// First frame each side sends, in clear: says which transport security follows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preamble {
    pub protocol: String,
    pub security: Security,
}

pub const PROTOCOL_NAME: &str = "meshlab";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Security {
    /// No encryption: an open mesh.
    Open,
    /// Noise XXpsk0 with the mesh's pre-shared key.
    NoisePsk,
}

/// A peer as other peers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub id: PeerId,
    pub name: String,
    pub addr: String,
}

/// The handshake message. Its fields are the same in every protocol version (new versions may
/// add fields, never remove these), so two peers can always read each other's hello and agree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub min_version: u32,
    pub max_version: u32,
    pub id: PeerId,
    /// Random per process start: tells a restarted peer that kept its id from its old self.
    pub incarnation: u64,
    /// Random per connection: breaks ties between two connections of the same pair.
    pub nonce: u64,
    pub name: String,
    /// The port the peer listens on; others dial the address they observe with this port.
    pub port: u16,
    /// The address to dial instead, when the observed one is not reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// The highest sequence number this peer has said so far.
    pub seq: u64,
    /// The peers this side is connected to.
    pub peers: Vec<PeerInfo>,
}

/// A chat line, sent directly by its origin or relayed by catch-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chat {
    pub origin: PeerId,
    pub name: String,
    pub seq: u64,
    pub text: String,
    pub sent_at_ms: u64,
    /// True when sent in answer to a digest rather than as the line was said.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub catch_up: bool,
}

/// Every message after the preamble.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Hello(Hello),
    /// The handshake is refused; the connection closes after it.
    Refuse {
        reason: String,
    },
    /// Heartbeat: proves the sender is alive.
    Ping,
    /// Newly met members, for collaborative discovery.
    Peers {
        peers: Vec<PeerInfo>,
    },
    Chat(Chat),
    /// Per sender, the highest contiguous sequence number held.
    Digest {
        have: BTreeMap<PeerId, u64>,
    },
    /// Lines `from..=upto` of `origin` are gone: the sender held them and let them go (older
    /// than its history) or was told they were gone.
    Gap {
        origin: PeerId,
        from: u64,
        upto: u64,
    },
    /// This connection duplicates another one between the same pair and is being closed.
    Dup,
    /// The sender leaves the mesh: do not redial it.
    Goodbye,
    /// A word for the receiver's user (for example: you are sending too fast).
    Notice {
        text: String,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("not a valid message: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid {field}: {why}")]
    Invalid { field: &'static str, why: String },
}

fn invalid(field: &'static str, why: impl Into<String>) -> DecodeError {
    DecodeError::Invalid { field, why: why.into() }
}

impl Message {
    /// Parses and validates one frame's payload.
    pub fn decode(payload: &[u8]) -> Result<Message, DecodeError> {
        let msg: Message = serde_json::from_slice(payload)?;
        msg.validate()?;
        Ok(msg)
    }

    /// Encodes the message as a frame payload.
    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("messages always serialise"))
    }

    fn validate(&self) -> Result<(), DecodeError> {
        match self {
            Message::Hello(h) => {
                check_name(&h.name)?;
                if h.min_version > h.max_version {
                    return Err(invalid("versions", "min_version above max_version"));
                }
                if h.port == 0 {
                    return Err(invalid("port", "0"));
                }
                if let Some(a) = &h.advertise {
                    addr::parse(a).map_err(|e| invalid("advertise", e.to_string()))?;
                }
                check_peers(&h.peers)
            }
            Message::Peers { peers } => check_peers(peers),
            Message::Chat(c) => {
                check_name(&c.name)?;
                if c.seq == 0 {
                    return Err(invalid("seq", "sequence numbers start at 1"));
                }
                if c.text.len() > MAX_TEXT {
                    return Err(invalid("text", format!("longer than {MAX_TEXT} bytes")));
                }
                Ok(())
            }
            Message::Digest { have } if have.len() > MAX_DIGEST => {
                Err(invalid("have", format!("more than {MAX_DIGEST} senders")))
            }
            Message::Refuse { reason } | Message::Notice { text: reason } if reason.len() > 1024 => {
                Err(invalid("text", "too long"))
            }
            Message::Gap { from, upto, .. } if *from == 0 || from > upto => {
                Err(invalid("gap", "needs 1 <= from <= upto"))
            }
            _ => Ok(()),
        }
    }
}

fn check_name(name: &str) -> Result<(), DecodeError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(invalid("name", format!("must be 1 to {MAX_NAME} bytes")));
    }
    if name.chars().any(char::is_control) {
        return Err(invalid("name", "control characters"));
    }
    Ok(())
}

fn check_peers(peers: &[PeerInfo]) -> Result<(), DecodeError> {
    if peers.len() > MAX_GOSSIP {
        return Err(invalid("peers", format!("more than {MAX_GOSSIP} entries")));
    }
    for p in peers {
        check_name(&p.name)?;
        addr::parse(&p.addr).map_err(|e| invalid("peers.addr", e.to_string()))?;
    }
    Ok(())
}

/// Serialises a preamble frame payload.
pub fn encode_preamble(security: Security) -> Bytes {
    let p = Preamble { protocol: PROTOCOL_NAME.into(), security };
    Bytes::from(serde_json::to_vec(&p).expect("preamble serialises"))
}

/// The highest version both ranges contain, if any.
pub fn negotiate(ours: (u32, u32), theirs: (u32, u32)) -> Option<u32> {
    let high = ours.1.min(theirs.1);
    let low = ours.0.max(theirs.0);
    (high >= low).then_some(high)
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use tokio_util::codec::{Decoder, Encoder};

    use super::*;

    fn id(c: char) -> PeerId {
        c.to_string().repeat(32).parse().unwrap()
    }

    fn chat(seq: u64, text: &str) -> Message {
        Message::Chat(Chat {
            origin: id('a'),
            name: "alice".into(),
            seq,
            text: text.into(),
            sent_at_ms: 1,
            catch_up: false,
        })
    }

    #[test]
    fn messages_round_trip() {
        let mut have = BTreeMap::new();
        have.insert(id('b'), 7);
        let msgs = [
            chat(1, "hi"),
            Message::Ping,
            Message::Digest { have },
            Message::Gap { origin: id('c'), from: 2, upto: 3 },
            Message::Goodbye,
            Message::Dup,
            Message::Peers { peers: vec![PeerInfo { id: id('d'), name: "d".into(), addr: "[::1]:5".into() }] },
        ];
        for m in msgs {
            assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn wire_form_is_tagged_json() {
        assert_eq!(&Message::Ping.encode()[..], br#"{"type":"ping"}"#);
    }

    #[test]
    fn codec_splits_and_joins_frames() {
        let mut codec = codec();
        let mut wire = BytesMut::new();
        codec.encode(chat(1, "one").encode(), &mut wire).unwrap();
        codec.encode(chat(2, "two").encode(), &mut wire).unwrap();
        // Feed the two frames one byte at a time: each decodes exactly once, whole.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            buf.extend_from_slice(&[*b]);
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                got.push(Message::decode(&frame).unwrap());
            }
        }
        assert_eq!(got, vec![chat(1, "one"), chat(2, "two")]);
    }

    #[test]
    fn oversized_length_is_refused_before_allocating() {
        let mut codec = codec();
        let mut buf = BytesMut::from(&[0x7f, 0xff, 0xff, 0xff, b'x'][..]);
        assert!(codec.decode(&mut buf).is_err());
        assert!(buf.capacity() < 1024, "the codec grew its buffer for a refused frame");
    }

    #[test]
    fn rejects_invalid_messages() {
        let bad: &[&[u8]] = &[
            b"garbage",
            br#"{"type":"launch_missiles"}"#,
            br#"{"type":"chat","origin":"zz","name":"a","seq":1,"text":"","sent_at_ms":1}"#,
            br#"{"type":"peers","peers":[{"id":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","name":"a","addr":"nope"}]}"#,
        ];
        for b in bad {
            assert!(Message::decode(b).is_err(), "{} accepted", String::from_utf8_lossy(b));
        }
        assert!(Message::decode(&chat(0, "x").encode()).is_err());
        assert!(Message::decode(&chat(1, &"x".repeat(MAX_TEXT + 1)).encode()).is_err());
    }

    #[test]
    fn the_largest_lists_still_fit_a_frame() {
        let widest =
            PeerInfo { id: id('f'), name: "\"".repeat(MAX_NAME), addr: format!("{}.b:65535", "a".repeat(251)) };
        let hello = Message::Hello(Hello {
            min_version: u32::MAX,
            max_version: u32::MAX,
            id: id('e'),
            incarnation: u64::MAX,
            nonce: u64::MAX,
            name: "\\".repeat(MAX_NAME / 2),
            port: 65535,
            advertise: Some(widest.addr.clone()),
            seq: u64::MAX,
            peers: vec![widest; MAX_GOSSIP],
        });
        let digest = Message::Digest {
            have: (0..MAX_DIGEST).map(|i| (format!("{i:032x}").parse().unwrap(), u64::MAX)).collect(),
        };
        for m in [hello, digest] {
            assert!(m.encode().len() + crate::noise::TAG <= MAX_FRAME, "{} bytes", m.encode().len());
        }
    }

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate((1, 3), (2, 5)), Some(3));
        assert_eq!(negotiate((1, 1), (1, 1)), Some(1));
        assert_eq!(negotiate((1, 2), (3, 4)), None);
    }
}
