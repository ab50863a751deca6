//! The version-2 handshake, driven through its state machine with a synthetic clock: the bytes
//! are cut into frames and fed to one side of a handshake, in one of four settings chosen by
//! the first byte. Settings 1 and 2 put a genuine preamble (and, keyed, a genuine first Noise
//! message, with every later frame sealed under the session) in front of the fuzzed frames, so
//! that hello and signature parsing are reached, not only the preamble. Never a panic.
#![no_main]

use std::time::Duration;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use meshlab::chain;
use meshlab::frame::{self, Hello, Preamble, Security};
use meshlab::handshake::{Handshake, Local, Progress, Side};
use meshlab::id::Hex;
use meshlab::identity::Identity;
use meshlab::known::Known;
use meshlab::noise::{MeshKey, Noise};
use tokio::time::Instant;
use tokio_util::codec::Decoder;

fn hello(me: &Identity) -> Hello {
    Hello {
        id: me.id(),
        incarnation: 1,
        name: "fuzz".into(),
        port: 4000,
        advertise: None,
        seq: 0,
        head: chain::genesis(&me.id()),
        known: Known::empty(),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&setting, rest)) = data.split_first() else { return };
    let mut codec = frame::codec();
    let mut buf = BytesMut::from(rest);
    let mut frames = Vec::new();
    while let Ok(Some(f)) = codec.decode(&mut buf) {
        frames.push(f.freeze());
        if frames.len() == 8 {
            break;
        }
    }
    let key = MeshKey::parse(&"ab".repeat(32)).unwrap();
    let keyed = setting % 4 == 2;
    let local = Local { identity: Identity::generate(), mesh_key: keyed.then(|| key.clone()) };
    let side = if setting % 4 == 3 { Side::Dialer } else { Side::Acceptor };
    let start = Instant::now();
    let Ok((mut hs, _)) = Handshake::start(side, &local, &hello(&local.identity), start, Duration::from_secs(5)) else {
        return;
    };
    let mut feed = Vec::new();
    let mut seal = None;
    if matches!(setting % 4, 1 | 2) {
        let security = if keyed { Security::NoisePsk } else { Security::Open };
        feed.push(Preamble::new(security, Hex::random()).encode());
    }
    if keyed {
        let mut initiator = Noise::new(&key, true).unwrap();
        feed.push(initiator.write(&[]).unwrap());
        seal = Some(initiator);
    }
    // The acceptor's answer to a keyed first message is read by our initiator, whose session
    // then seals the fuzzed frames.
    let mut transport: Option<meshlab::noise::Transport> = None;
    for (i, frame) in feed.into_iter().chain(frames.iter().cloned()).enumerate() {
        let frame = match &mut transport {
            Some(t) => match t.seal.seal(&frame) {
                Ok(sealed) => sealed,
                Err(_) => return,
            },
            None => frame,
        };
        // A synthetic clock: each frame a little later, some past the deadline.
        let now = start + Duration::from_millis(u64::from(setting) * i as u64 * 20);
        match hs.receive(&frame, now) {
            Ok(Progress::Continue(out)) => {
                if let (Some(mut initiator), Some(second)) = (seal.take(), out.first()) {
                    if initiator.read(second).is_ok() {
                        transport = initiator.finish().ok();
                    }
                }
            }
            Ok(Progress::Done(_)) | Err(_) => return,
        }
    }
});
