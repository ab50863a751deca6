//! The wire format: length-delimited frames, each carrying one JSON message.
//!
//! A frame is a 4-byte big-endian length followed by that many bytes. The length is checked
//! against [`MAX_FRAME`] before any buffer is grown, so a hostile length costs nothing. Every
//! message is validated after parsing (sizes of names, texts and lists, sequence numbers), so
//! the rest of the peer only sees well-formed values; signatures are checked where their meaning
//! is known (the handshake, the store). docs/protocol.md describes the same thing for humans.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio_util::codec::LengthDelimitedCodec;

use crate::addr;
use crate::chain::ChainHash;
use crate::id::{Hex, PeerId};
use crate::identity::Signature;
use crate::known::Known;

/// Largest frame payload accepted or sent. Also the Noise maximum message size.
pub const MAX_FRAME: usize = 65535;
/// Largest chat text, in bytes (leaves room for JSON escaping inside one frame).
pub const MAX_TEXT: usize = 8 * 1024;
/// Largest peer name, in bytes.
pub const MAX_NAME: usize = 64;
/// Most peers listed in one `peers` message (longer lists are sent in several).
pub const MAX_GOSSIP: usize = 64;
/// Most senders in one `digest` message; larger digests are split over several frames.
pub const MAX_DIGEST: usize = 512;
/// Most senders one `digest` asks its receiver to follow (so that a full digest with a full
/// `follow` list still fits a frame).
pub const MAX_FOLLOW: usize = 128;
/// Most lines in one `lines` message.
pub const MAX_BATCH: usize = 256;
/// Room kept in a frame for what surrounds the lines of a `lines` message (and the Noise tag).
const LINES_ENVELOPE: usize = 512;
/// Room a line takes in a `lines` message besides its text.
const LINE_ENVELOPE: usize = 64;

/// Protocol versions this build speaks, lowest and highest.
pub const PROTOCOL_MIN: u32 = 2;
pub const PROTOCOL_MAX: u32 = 2;

/// The frame codec used on every connection.
pub fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().length_field_length(4).max_frame_length(MAX_FRAME).new_codec()
}

pub const PROTOCOL_NAME: &str = "meshlab";

/// A fresh random value per connection and side: what each side's hello signature is bound to.
pub type Nonce = Hex<32>;

/// First frame each side sends, in clear: which protocol versions and which transport security
/// follow, and this side's nonce. From version 2 on, this is the part every version can read.
/// (Version 1's preamble had neither `versions` nor `nonce`: a peer sending it speaks 1 only.)
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preamble {
    pub protocol: String,
    pub security: Security,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versions: Option<(u32, u32)>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nonce: Option<Nonce>,
}

impl Preamble {
    pub fn new(security: Security, nonce: Nonce) -> Preamble {
        Preamble {
            protocol: PROTOCOL_NAME.into(),
            security,
            versions: Some((PROTOCOL_MIN, PROTOCOL_MAX)),
            nonce: Some(nonce),
        }
    }

    pub fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("preambles serialise"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Security {
    /// No encryption: an open mesh.
    Open,
    /// Noise with the mesh's pre-shared key.
    NoisePsk,
}

/// A peer as other peers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerInfo {
    pub id: PeerId,
    pub name: String,
    pub addr: String,
}

/// The handshake message, signed by its sender (the `auth` message that follows it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The sender's public key.
    pub id: PeerId,
    /// Random per process start: tells a restarted peer that kept its id from its old self.
    pub incarnation: u64,
    pub name: String,
    /// The port the peer listens on; others dial the address they observe with this port.
    pub port: u16,
    /// The address to dial instead, when the observed one is not reachable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advertise: Option<String>,
    /// The highest sequence number this peer has said so far...
    pub seq: u64,
    /// ...and its chain hash there: a receiver meeting this peer checks its lines from here.
    pub head: ChainHash,
    /// The members this peer knows, as a filter: the other side tells it of those it lacks.
    pub known: Known,
}

/// One line in a `lines` message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LineBody {
    pub seq: u64,
    pub text: String,
    /// When its sender said it (the sender's clock, Unix milliseconds).
    pub at: u64,
}

/// Consecutive lines of one sender, with the sender's signature on the chain head at the last.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Lines {
    pub origin: PeerId,
    pub name: String,
    pub lines: Vec<LineBody>,
    pub sig: Signature,
    /// True when sent in answer to a digest rather than as the lines were said.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub catch_up: bool,
}

impl Lines {
    pub fn first(&self) -> u64 {
        self.lines.first().map_or(0, |l| l.seq)
    }

    pub fn last(&self) -> u64 {
        self.lines.last().map_or(0, |l| l.seq)
    }
}

/// A sender's signed word that its lines up to `upto` are gone, and its chain hash there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gone {
    pub origin: PeerId,
    pub upto: u64,
    pub head: ChainHash,
    pub sig: Signature,
}

/// Every message after the preamble.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Message {
    Hello(Hello),
    /// The sender's signature on its hello and the connection (see crate::handshake).
    Auth {
        sig: Signature,
    },
    /// The handshake is refused; the connection closes after it.
    Refuse {
        reason: String,
    },
    /// A liveness probe; `seq` is the sender's own latest sequence number.
    Ping {
        seq: u64,
    },
    /// The answer to a probe, with the same meaning of `seq`.
    Pong {
        seq: u64,
    },
    /// The sender found `id` silent (a probe went unanswered): probe it yourself.
    Suspect {
        id: PeerId,
    },
    /// Members the receiver did not know of, for collaborative discovery.
    Peers {
        peers: Vec<PeerInfo>,
    },
    Lines(Lines),
    /// Per sender, the highest contiguous sequence number held; and the senders the digest's
    /// sender no longer hears directly, whose new lines it asks the receiver to pass on for a
    /// while (see docs/protocol.md, *Following*).
    Digest {
        have: BTreeMap<PeerId, u64>,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        follow: Vec<PeerId>,
    },
    Gone(Gone),
    /// This connection duplicates another one between the same pair and is being closed.
    Dup,
    /// The sender leaves the mesh: do not redial it. Signed over its incarnation.
    Goodbye {
        sig: Signature,
    },
    /// A word for the receiver's user (for example: you are sending too fast), signed.
    Notice {
        text: String,
        sig: Signature,
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

    /// The message's type, as on the wire.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Auth { .. } => "auth",
            Message::Refuse { .. } => "refuse",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::Suspect { .. } => "suspect",
            Message::Peers { .. } => "peers",
            Message::Lines(_) => "lines",
            Message::Digest { .. } => "digest",
            Message::Gone(_) => "gone",
            Message::Dup => "dup",
            Message::Goodbye { .. } => "goodbye",
            Message::Notice { .. } => "notice",
        }
    }

    fn validate(&self) -> Result<(), DecodeError> {
        match self {
            Message::Hello(h) => {
                check_name(&h.name)?;
                if h.port == 0 {
                    return Err(invalid("port", "0"));
                }
                if let Some(a) = &h.advertise {
                    addr::parse(a).map_err(|e| invalid("advertise", e.to_string()))?;
                }
                h.known.check().map_err(|why| invalid("known", why))
            }
            Message::Peers { peers } => check_peers(peers),
            Message::Lines(l) => check_lines(l),
            Message::Digest { have, .. } if have.len() > MAX_DIGEST => {
                Err(invalid("have", format!("more than {MAX_DIGEST} senders")))
            }
            Message::Digest { follow, .. } if follow.len() > MAX_FOLLOW => {
                Err(invalid("follow", format!("more than {MAX_FOLLOW} senders")))
            }
            Message::Refuse { reason: text } | Message::Notice { text, .. } if text.len() > 1024 => {
                Err(invalid("text", "too long"))
            }
            Message::Gone(g) if g.upto == 0 => Err(invalid("upto", "sequence numbers start at 1")),
            _ => Ok(()),
        }
    }
}

fn check_lines(l: &Lines) -> Result<(), DecodeError> {
    check_name(&l.name)?;
    if l.lines.is_empty() || l.lines.len() > MAX_BATCH {
        return Err(invalid("lines", format!("1 to {MAX_BATCH} lines")));
    }
    if l.first() == 0 {
        return Err(invalid("seq", "sequence numbers start at 1"));
    }
    let Some(last) = l.first().checked_add(l.lines.len() as u64 - 1) else {
        return Err(invalid("seq", "past the largest sequence number"));
    };
    for (line, seq) in l.lines.iter().zip(l.first()..=last) {
        if line.seq != seq {
            return Err(invalid("seq", "the lines of a batch are consecutive"));
        }
        if line.text.len() > MAX_TEXT {
            return Err(invalid("text", format!("longer than {MAX_TEXT} bytes")));
        }
    }
    Ok(())
}

/// Whether a name is fit to show: 1 to 64 bytes, no control, format or line-separator
/// characters (which could reorder or hide what a terminal shows), and none of `[`, `]`, `@`
/// (which could make a name pass for the chat view's `[name@address]` prefix).
pub fn check_name(name: &str) -> Result<(), DecodeError> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(invalid("name", format!("must be 1 to {MAX_NAME} bytes")));
    }
    if let Some(c) = name.chars().find(|c| crate::output::is_unsafe(*c) || matches!(c, '[' | ']' | '@')) {
        return Err(invalid("name", format!("may not contain U+{:04X}", c as u32)));
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

/// The highest version both ranges contain, if any.
pub fn negotiate(ours: (u32, u32), theirs: (u32, u32)) -> Option<u32> {
    let high = ours.1.min(theirs.1);
    let low = ours.0.max(theirs.0);
    (high >= low).then_some(high)
}

/// How many bytes `text` takes inside a JSON string, as serde_json writes it.
pub fn json_len(text: &str) -> usize {
    text.bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 2,
            0..0x20 => 6,
            _ => 1,
        })
        .sum()
}

/// How many bytes a line adds to a `lines` message, at most.
pub fn line_cost(text: &str) -> usize {
    json_len(text) + LINE_ENVELOPE
}

/// The most line bytes ([`line_cost`]) one `lines` message may carry.
pub const LINES_BUDGET: usize = MAX_FRAME - LINES_ENVELOPE - MAX_NAME * 6;

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use tokio_util::codec::{Decoder, Encoder};

    use super::*;
    use crate::id::Hex;

    fn id(c: char) -> PeerId {
        c.to_string().repeat(64).parse().unwrap()
    }

    fn lines(first: u64, texts: &[&str]) -> Message {
        Message::Lines(Lines {
            origin: id('a'),
            name: "alice".into(),
            lines: texts
                .iter()
                .enumerate()
                .map(|(i, t)| LineBody { seq: first + i as u64, text: t.to_string(), at: 1 })
                .collect(),
            sig: Hex([7; 64]),
            catch_up: false,
        })
    }

    #[test]
    fn messages_round_trip() {
        let mut have = BTreeMap::new();
        have.insert(id('b'), 7);
        let msgs = [
            lines(1, &["hi", "there"]),
            Message::Ping { seq: 3 },
            Message::Pong { seq: 0 },
            Message::Digest { have, follow: vec![id('e')] },
            Message::Gone(Gone { origin: id('c'), upto: 3, head: Hex([1; 32]), sig: Hex([2; 64]) }),
            Message::Goodbye { sig: Hex([3; 64]) },
            Message::Dup,
            Message::Peers { peers: vec![PeerInfo { id: id('d'), name: "d".into(), addr: "[::1]:5".into() }] },
        ];
        for m in msgs {
            assert_eq!(Message::decode(&m.encode()).unwrap(), m);
        }
    }

    #[test]
    fn wire_form_is_tagged_json() {
        assert_eq!(&Message::Ping { seq: 2 }.encode()[..], br#"{"type":"ping","seq":2}"#);
        assert_eq!(&Message::Dup.encode()[..], br#"{"type":"dup"}"#);
    }

    #[test]
    fn codec_splits_and_joins_frames() {
        let mut codec = codec();
        let mut wire = BytesMut::new();
        codec.encode(lines(1, &["one"]).encode(), &mut wire).unwrap();
        codec.encode(lines(2, &["two"]).encode(), &mut wire).unwrap();
        // Feed the two frames one byte at a time: each decodes exactly once, whole.
        let mut buf = BytesMut::new();
        let mut got = Vec::new();
        for b in wire.iter() {
            buf.extend_from_slice(&[*b]);
            while let Some(frame) = codec.decode(&mut buf).unwrap() {
                got.push(Message::decode(&frame).unwrap());
            }
        }
        assert_eq!(got, vec![lines(1, &["one"]), lines(2, &["two"])]);
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
            br#"{"type":"ping"}"#,
            br#"{"type":"peers","peers":[{"id":"zz","name":"a","addr":"1.2.3.4:5"}]}"#,
        ];
        for b in bad {
            assert!(Message::decode(b).is_err(), "{} accepted", String::from_utf8_lossy(b));
        }
        assert!(Message::decode(&lines(0, &["x"]).encode()).is_err(), "seq 0");
        assert!(Message::decode(&lines(u64::MAX, &["last"]).encode()).is_ok());
        let Message::Lines(mut past) = lines(u64::MAX - 1, &["x", "y"]) else { unreachable!() };
        past.lines[0].seq = u64::MAX;
        assert!(Message::decode(&Message::Lines(past).encode()).is_err(), "no seq past u64::MAX");
        assert!(Message::decode(&lines(1, &[&"x".repeat(MAX_TEXT + 1)]).encode()).is_err());
        let Message::Lines(mut gap) = lines(1, &["a", "b"]) else { unreachable!() };
        gap.lines[1].seq = 3;
        assert!(Message::decode(&Message::Lines(gap).encode()).is_err(), "not consecutive");
        let many: Vec<&str> = vec!["x"; MAX_BATCH + 1];
        assert!(Message::decode(&lines(1, &many).encode()).is_err());
        assert!(Message::decode(&lines(1, &[]).encode()).is_err());
    }

    #[test]
    fn names_that_could_pass_for_a_prefix_or_reorder_text_are_invalid() {
        for bad in ["", "m@x] T", "a[b", "bob\u{202e}", "zero\u{200b}width", "line\u{2028}sep", "bell\x07"] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["alice", "Ana Lúcia", "p-1_x.y", "老王", "🦀"] {
            assert!(check_name(good).is_ok(), "{good:?} refused");
        }
    }

    #[test]
    fn the_largest_messages_still_fit_a_frame() {
        let widest =
            PeerInfo { id: id('f'), name: "\"".repeat(MAX_NAME), addr: format!("{}.b:65535", "a".repeat(251)) };
        let peers = Message::Peers { peers: vec![widest; MAX_GOSSIP] };
        let ids: Vec<PeerId> = (0..MAX_DIGEST).map(|i| format!("{i:064x}").parse().unwrap()).collect();
        let follow = ids[..MAX_FOLLOW].to_vec();
        let digest = Message::Digest { have: ids.iter().map(|id| (*id, u64::MAX)).collect(), follow };
        let worst = "\x01".repeat(MAX_TEXT);
        assert!(line_cost(&worst) <= LINES_BUDGET, "one line of the worst text fits");
        let Message::Lines(mut one) = lines(u64::MAX - 1, &[&worst]) else { unreachable!() };
        one.name = "\"".repeat(MAX_NAME);
        one.catch_up = true;
        for m in [peers, digest, Message::Lines(one)] {
            assert!(m.encode().len() + crate::noise::TAG <= MAX_FRAME, "{} bytes", m.encode().len());
        }
    }

    #[test]
    fn json_len_matches_serde_json() {
        for text in ["plain", "quote\" back\\slash", "\n\r\t\x08\x0c", "\x00\x01\x1f\x7f", "olá 👋"] {
            assert_eq!(json_len(text) + 2, serde_json::to_string(text).unwrap().len(), "{text:?}");
        }
    }

    #[test]
    fn negotiation_picks_the_highest_common_version() {
        assert_eq!(negotiate((1, 3), (2, 5)), Some(3));
        assert_eq!(negotiate((2, 2), (2, 2)), Some(2));
        assert_eq!(negotiate((2, 2), (1, 1)), None);
    }
}
