//! The handshake's parsing surface, as a responder sees it: the bytes are cut into frames; the
//! first is parsed as a preamble, the next two are fed to a Noise responder as the initiator's
//! first and third messages (the third's payload parsed as a hello), and any frame is parsed as
//! a hello. Never a panic.
#![no_main]

use std::sync::OnceLock;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use meshlab::frame::{self, Message, Preamble};
use meshlab::noise::{Handshake, Keys, MeshKey, StaticKey};
use tokio_util::codec::Decoder;

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| Keys { mesh: MeshKey::parse(&"ab".repeat(32)).unwrap(), local: StaticKey::generate() })
}

fuzz_target!(|data: &[u8]| {
    let mut codec = frame::codec();
    let mut buf = BytesMut::from(data);
    let mut frames = Vec::new();
    while let Ok(Some(f)) = codec.decode(&mut buf) {
        frames.push(f);
        if frames.len() == 4 {
            break;
        }
    }
    if let Some(first) = frames.first() {
        let _ = serde_json::from_slice::<Preamble>(first);
    }
    if let Ok(mut responder) = Handshake::new(keys(), false) {
        if let Some(m1) = frames.get(1) {
            if responder.read(m1).is_ok() && responder.write(b"{}").is_ok() {
                if let Some(m3) = frames.get(2) {
                    if let Ok(hello) = responder.read(m3) {
                        let _ = Message::decode(&hello);
                        let _ = responder.finish();
                    }
                }
            }
        }
    }
    for f in &frames {
        if let Ok(Message::Hello(h)) = Message::decode(f) {
            let _ = frame::negotiate((frame::PROTOCOL_MIN, frame::PROTOCOL_MAX), (h.min_version, h.max_version));
        }
    }
});
