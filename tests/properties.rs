//! Property tests for what arrives from the network: the frame decoder and message parsing.
//! Arbitrary bytes and arbitrary splits of valid streams never panic, never make the decoder
//! hold more than one frame's worth of memory, and valid streams always decode to the same
//! messages however they are cut.

use std::collections::BTreeMap;

use bytes::BytesMut;
use meshlab::frame::{self, Gone, LineBody, Lines, MAX_FRAME, Message, PeerInfo};
use meshlab::id::{Hex, PeerId};
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

/// Room the decoder may legitimately hold: one whole frame and its length prefix.
const ONE_FRAME: usize = MAX_FRAME + 4;

fn id() -> impl Strategy<Value = PeerId> {
    "[0-9a-f]{64}".prop_map(|s| s.parse().unwrap())
}

fn sig() -> impl Strategy<Value = Hex<64>> {
    proptest::array::uniform32(any::<u8>()).prop_map(|half| {
        let mut s = [0u8; 64];
        s[..32].copy_from_slice(&half);
        s[32..].copy_from_slice(&half);
        Hex(s)
    })
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 _.-]{1,64}"
}

fn peer_info() -> impl Strategy<Value = PeerInfo> {
    (id(), name(), 1u16..).prop_map(|(id, name, port)| PeerInfo { id, name, addr: format!("10.0.0.1:{port}") })
}

/// Any valid message.
fn message() -> impl Strategy<Value = Message> {
    prop_oneof![
        any::<u64>().prop_map(|seq| Message::Ping { seq }),
        any::<u64>().prop_map(|seq| Message::Pong { seq }),
        sig().prop_map(|sig| Message::Goodbye { sig }),
        Just(Message::Dup),
        (
            id(),
            name(),
            1u64..u64::MAX / 2,
            proptest::collection::vec((".{0,200}", any::<u64>()), 1..5),
            sig(),
            any::<bool>()
        )
            .prop_map(|(origin, name, first, texts, sig, catch_up)| {
                let lines =
                    texts.into_iter().zip(first..).map(|((text, at), seq)| LineBody { seq, text, at }).collect();
                Message::Lines(Lines { origin, name, lines, sig, catch_up })
            }),
        proptest::collection::btree_map(id(), any::<u64>(), 0..20)
            .prop_map(|have| Message::Digest { have, follow: vec![] }),
        proptest::collection::vec(peer_info(), 0..10).prop_map(|peers| Message::Peers { peers }),
        (id(), 1u64.., sig()).prop_map(|(origin, upto, sig)| Message::Gone(Gone {
            origin,
            upto,
            head: Hex([7; 32]),
            sig
        })),
        (".{0,100}", sig()).prop_map(|(text, sig)| Message::Notice { text, sig }),
    ]
}

/// Feeds `chunks` to a fresh decoder; returns the frames it yielded and the first error.
fn decode_chunks(chunks: &[Vec<u8>]) -> (Vec<BytesMut>, bool, usize) {
    let mut codec = frame::codec();
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    let mut most = 0;
    for chunk in chunks {
        buf.extend_from_slice(chunk);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(_) => return (frames, true, most.max(buf.capacity())),
            }
            most = most.max(buf.capacity());
        }
        most = most.max(buf.capacity());
    }
    (frames, false, most)
}

/// Cuts `bytes` at the given (sorted, deduplicated) points.
fn split(bytes: &[u8], mut cuts: Vec<usize>) -> Vec<Vec<u8>> {
    cuts.retain(|c| *c < bytes.len());
    cuts.sort();
    cuts.dedup();
    let mut out = Vec::new();
    let mut start = 0;
    for c in cuts {
        out.push(bytes[start..c].to_vec());
        start = c;
    }
    out.push(bytes[start..].to_vec());
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_bytes_never_panic_nor_grow_past_one_frame(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20)) {
        let input: usize = chunks.iter().map(Vec::len).sum();
        let (frames, _, most) = decode_chunks(&chunks);
        prop_assert!(most <= ONE_FRAME + input, "the decoder held {most} bytes");
        for f in frames {
            let _ = Message::decode(&f);
        }
    }

    #[test]
    fn hostile_lengths_are_refused_before_allocating(len in (MAX_FRAME as u32 + 1).., tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = len.to_be_bytes().to_vec();
        bytes.extend(tail);
        let (frames, failed, most) = decode_chunks(&[bytes]);
        prop_assert!(frames.is_empty() && failed);
        prop_assert!(most < 1024, "{most} bytes reserved for a refused frame");
    }

    #[test]
    fn arbitrary_payloads_never_panic(payload in proptest::collection::vec(any::<u8>(), 0..2000)) {
        let _ = Message::decode(&payload);
    }

    #[test]
    fn arbitrary_json_never_panics(json in json_value()) {
        let _ = Message::decode(json.to_string().as_bytes());
    }

    #[test]
    fn valid_streams_decode_the_same_however_they_are_cut(
        messages in proptest::collection::vec(message(), 1..20),
        cuts in proptest::collection::vec(any::<usize>(), 0..30),
    ) {
        let mut codec = frame::codec();
        let mut wire = BytesMut::new();
        for m in &messages {
            codec.encode(m.encode(), &mut wire).unwrap();
        }
        let cuts: Vec<usize> = cuts.into_iter().map(|c| c % (wire.len() + 1)).collect();
        let (frames, failed, _) = decode_chunks(&split(&wire, cuts));
        prop_assert!(!failed);
        let decoded: Vec<Message> = frames.iter().map(|f| Message::decode(f).unwrap()).collect();
        prop_assert_eq!(decoded, messages);
    }

    #[test]
    fn a_flipped_byte_in_a_valid_message_never_panics(message in message(), at in any::<usize>(), bit in 0u8..8) {
        let mut bytes = message.encode().to_vec();
        let i = at % bytes.len();
        bytes[i] ^= 1 << bit;
        let _ = Message::decode(&bytes);
    }
}

/// Arbitrary JSON, biased towards the shapes of messages.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<u64>().prop_map(serde_json::Value::from),
        prop_oneof![Just("hello".to_string()), Just("chat".to_string()), Just("digest".to_string()), ".{0,20}"]
            .prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        let keys = prop_oneof![
            Just("type".to_string()),
            Just("origin".to_string()),
            Just("seq".to_string()),
            Just("have".to_string()),
            Just("peers".to_string()),
            "[a-z]{1,8}"
        ];
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(serde_json::Value::Array),
            proptest::collection::btree_map(keys, inner, 0..8)
                .prop_map(|m: BTreeMap<String, serde_json::Value>| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}
