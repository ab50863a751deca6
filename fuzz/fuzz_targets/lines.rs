//! Line verification: a store that met one sender is fed `lines` and `gone` messages, some
//! made from the fuzzer's bytes as they are, some genuine batches of that sender cut and
//! altered where the bytes say. Never a panic; the watermark never goes back; what is shown is
//! contiguous and was said by the sender.
#![no_main]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::OnceLock;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use meshlab::chain;
use meshlab::frame::{Message, PeerInfo};
use meshlab::identity::{Identity, PublicKey};
use meshlab::store::{Met, Retention, Store};
use tokio::time::Instant;

/// The sender, and the genuine batches it said: 40 lines in batches of 1 to 4.
fn sender() -> &'static (Identity, Vec<meshlab::frame::Lines>) {
    static SENDER: OnceLock<(Identity, Vec<meshlab::frame::Lines>)> = OnceLock::new();
    SENDER.get_or_init(|| {
        let me = Identity::generate();
        let ret = Retention { lines: 1000, bytes: 1 << 20, age: Duration::from_secs(600) };
        let mut store = Store::new(me.id(), 0, chain::genesis(&me.id()), ret, Instant::now());
        let mut batches = Vec::new();
        for i in 0..16 {
            let texts = (0..1 + i % 4).map(|j| format!("line {i}.{j}")).collect();
            for b in store.compose(&me, "sender", texts, 7) {
                batches.push(store.said(b, Instant::now()));
            }
        }
        (me, batches)
    })
}

fuzz_target!(|data: &[u8]| {
    let (sender, genuine) = sender();
    let me = Identity::generate();
    let ret = Retention { lines: 100, bytes: 64 << 10, age: Duration::from_secs(600) };
    let now = Instant::now();
    let mut store = Store::new(me.id(), 0, chain::genesis(&me.id()), ret, now);
    let info = PeerInfo { id: sender.id(), name: "sender".into(), addr: "10.0.0.1:1".into() };
    let key = PublicKey::of(&sender.id()).unwrap();
    let met = Met { info: &info, seq: 0, head: chain::genesis(&sender.id()), key, host: IpAddr::V4(Ipv4Addr::LOCALHOST) };
    store.meet(met, |_| true, now);
    let relay = Identity::generate().id();
    let mut shown_upto = 0;
    for chunk in data.chunks(64) {
        let Some((&op, rest)) = chunk.split_first() else { continue };
        let message = match op % 3 {
            0 => Message::decode(rest).ok(),
            1 => {
                // A genuine batch, maybe altered at a spot the bytes choose.
                let mut b = genuine[usize::from(op) % genuine.len()].clone();
                if let (Some(&at), Some(&bit)) = (rest.first(), rest.get(1)) {
                    let line = usize::from(at) % b.lines.len();
                    match bit % 4 {
                        0 => {}
                        1 => b.lines[line].text.push(bit as char),
                        2 => b.lines[line].at ^= u64::from(bit),
                        _ => b.catch_up = !b.catch_up,
                    }
                }
                Some(Message::Lines(b))
            }
            _ => Some(Message::Gone(meshlab::frame::Gone {
                origin: sender.id(),
                upto: u64::from(op),
                head: chain::genesis(&sender.id()),
                sig: meshlab::id::Hex([op; 64]),
            })),
        };
        let room = rest.get(2).map_or(usize::MAX, |r| usize::from(*r % 8));
        let received = match message {
            Some(Message::Lines(b)) => store.receive(b, relay, room, now),
            Some(Message::Gone(g)) => {
                let upto = g.upto;
                match store.skip(g, now) {
                    Ok(Some((_, r))) => {
                        shown_upto = upto;
                        r
                    }
                    _ => continue,
                }
            }
            _ => continue,
        };
        for d in &received.delivered {
            assert_eq!(d.line.origin, sender.id());
            assert_eq!(d.line.seq, shown_upto + 1, "shown out of order or with a hole");
            assert!(d.line.text.starts_with("line "), "a line the sender never said was shown");
            shown_upto = d.line.seq;
        }
        let (mark, _) = store.mark(&sender.id()).unwrap();
        assert!(mark >= shown_upto);
    }
});
