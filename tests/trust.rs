//! Hostile members: each attack that worked against protocol 1, tried against the real binary.
//! A member can no longer pass for another, put words in another's mouth, silence it, evict
//! it, lock others out, blow up a peer's memory or outrun the flood limit by reconnecting.

mod support;

use std::net::IpAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use meshlab::chain;
use meshlab::frame::{Gone, Message, PeerInfo};
use meshlab::id::{Hex, PeerId};
use meshlab::identity::{Domain, Identity};
use meshlab_lab::Lab;
use meshlab_lab::backend::process::ProcessBackend;
use support::client::{Client, hello_of, refusal, signed_lines};
use tokio::sync::watch;

const WITHIN: Duration = Duration::from_secs(10);
const REFUSED: &str = "refused by the other side: the hello is not signed by the key of the id it claims";

fn new_lab() -> Lab<ProcessBackend> {
    Lab::new(ProcessBackend::new(env!("CARGO_BIN_EXE_peer")))
}

fn id_of(lab: &Lab<ProcessBackend>, name: &str) -> PeerId {
    lab.world().peer(name).unwrap().id.clone().unwrap().parse().unwrap()
}

fn addr_of(lab: &Lab<ProcessBackend>, name: &str) -> String {
    lab.world().peer(name).unwrap().listen.clone().unwrap()
}

/// A mesh of the named peers, all through the first.
async fn mesh(names: &[&str], flags: &[&str]) -> Lab<ProcessBackend> {
    let mut lab = new_lab();
    let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    lab.start(&names[..1], &[], &flags).await.unwrap();
    lab.start(&names[1..], &names[..1], &flags).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    lab
}

/// Every time a member was reported down, by anyone (mallory's own comings and goings aside).
fn downs(lab: &Lab<ProcessBackend>) -> Vec<String> {
    let members: Vec<&String> = lab.world().names().collect();
    lab.world()
        .timeline
        .iter()
        .filter(|m| m.kind == "down" && members.iter().any(|n| m.detail.starts_with(&format!("{n} ("))))
        .map(|m| format!("{}: {}", m.peer, m.detail))
        .collect()
}

/// Mallory, connected to `addr` as herself.
async fn mallory_at(addr: &str) -> (Client, Identity) {
    let me = Identity::generate();
    (Client::connect(addr, None, &me, hello_of(&me, "mallory"), None).await.unwrap(), me)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hello_claiming_a_members_id_is_refused_and_its_lines_stay_its_own() {
    let _serial = support::shared();
    let mut lab = mesh(&["a", "b"], &[]).await;
    let b = id_of(&lab, "b");
    // Mallory reads b's incarnation from b's own hello, then claims b's id and incarnation.
    let (probe, mallory) = mallory_at(&addr_of(&lab, "b")).await;
    let mut claim = hello_of(&mallory, "b");
    (claim.id, claim.incarnation) = (b, probe.theirs.incarnation);
    let refused = refusal(Client::connect(&addr_of(&lab, "a"), None, &mallory, claim, None).await).await;
    assert_eq!(refused.as_deref(), Some(REFUSED));
    lab.await_log("a", "the hello is not signed by the key of the id it claims", WITHIN).await.unwrap();
    lab.say("b", "the real line").await.unwrap();
    lab.await_delivery(WITHIN).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    assert_eq!(downs(&lab), Vec::<String>::new(), "b's link was never given away");
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_hellos_and_goodbyes_cannot_split_the_mesh() {
    let _serial = support::shared();
    let mut lab = mesh(&["a", "b", "c", "d"], &[]).await;
    // The attack that split protocol 1 meshes: at both ends of each cross link of a 2|2 split,
    // a hello claiming the other end, then its goodbye.
    let mallory = Identity::generate();
    for (x, y) in [("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "a"), ("c", "b"), ("d", "a"), ("d", "b")] {
        let (probe, _) = mallory_at(&addr_of(&lab, y)).await;
        let mut claim = hello_of(&mallory, y);
        (claim.id, claim.incarnation) = (id_of(&lab, y), probe.theirs.incarnation);
        let mut attempt = Client::connect(&addr_of(&lab, x), None, &mallory, claim, None).await;
        if let Ok(c) = &mut attempt {
            let sig = mallory.sign(Domain::Goodbye, &[&probe.theirs.incarnation.to_be_bytes()]);
            let _ = c.send(&Message::Goodbye { sig }).await;
        }
        assert_eq!(refusal(attempt).await.as_deref(), Some(REFUSED), "{x} admitted a hello claiming {y}");
    }
    for x in ["a", "b", "c", "d"] {
        lab.await_log(x, "the hello is not signed by the key of the id it claims", WITHIN).await.unwrap();
    }
    lab.await_mesh(None, WITHIN).await.unwrap();
    assert_eq!(downs(&lab), Vec::<String>::new(), "no member was ever reported down");
    lab.say("a", "still one mesh").await.unwrap();
    lab.await_delivery(WITHIN).await.unwrap();
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_goodbye_its_sender_did_not_sign_is_ignored() {
    let _serial = support::shared();
    let mut lab = mesh(&["a"], &[]).await;
    let (mut c, _) = mallory_at(&addr_of(&lab, "a")).await;
    let forged = Identity::generate().sign(Domain::Goodbye, &[&0u64.to_be_bytes()]);
    c.send(&Message::Goodbye { sig: forged }).await.unwrap();
    lab.await_log("a", "ignoring a goodbye from mallory that its key did not sign", WITHIN).await.unwrap();
    drop(c);
    // Had the goodbye counted, mallory's departure would read "goodbye": it was just closed.
    let down = lab.await_mark("a", "down", "mallory", WITHIN).await.unwrap();
    assert_eq!(down, "mallory (closed)");
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_a_relayer_made_up_are_refused_and_the_relayer_is_held_off() {
    let _serial = support::shared();
    let mut lab = mesh(&["a", "b", "c"], &[]).await;
    let b = id_of(&lab, "b");
    let (mut at_a, mallory) = mallory_at(&addr_of(&lab, "a")).await;
    let (mut at_c, _) = mallory_at(&addr_of(&lab, "c")).await;
    // b's next line, as mallory would have it: b's origin and sequence number, mallory's signature.
    let (mut forged, _) = signed_lines(&mallory, "b", 0, chain::genesis(&b), &["pay mallory"]);
    forged.origin = b;
    forged.catch_up = true;
    at_a.send(&Message::Lines(forged.clone())).await.unwrap();
    at_c.send(&Message::Lines(forged)).await.unwrap();
    for x in ["a", "c"] {
        lab.await_log(x, "their sender did not sign", WITHIN).await.unwrap();
    }
    at_a.closed_by_peer().await;
    at_c.closed_by_peer().await;
    // Held off: back at once, it is shown the door right after the handshake.
    let back = Client::connect(&addr_of(&lab, "a"), None, &mallory, hello_of(&mallory, "mallory"), None).await;
    if let Ok(back) = back {
        back.closed_by_peer().await;
    }
    // b's real first line is shown as b said it (the lab checks each showing's text).
    lab.say("b", "the real first line").await.unwrap();
    lab.await_delivery(WITHIN).await.unwrap();
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_forged_gone_statement_cannot_silence_a_sender() {
    let _serial = support::shared();
    let mut lab = mesh(&["a", "b"], &[]).await;
    let b = id_of(&lab, "b");
    let (mut c, mallory) = mallory_at(&addr_of(&lab, "a")).await;
    let head = Hex([1; 32]);
    let sig = mallory.sign(Domain::Gone, &[&u64::MAX.to_be_bytes(), &head.0]);
    c.send(&Message::Gone(Gone { origin: b, upto: u64::MAX, head, sig })).await.unwrap();
    lab.await_log("a", "their sender did not sign", WITHIN).await.unwrap();
    c.closed_by_peer().await;
    lab.say("b", "not silenced").await.unwrap();
    lab.await_delivery(WITHIN).await.unwrap();
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_sybil_ids_do_not_evict_a_members_record() {
    let _serial = support::shared();
    let mut lab = mesh(&["a", "b"], &[]).await;
    lab.say("b", "before").await.unwrap();
    lab.await_delivery(WITHIN).await.unwrap();
    let a = addr_of(&lab, "a");
    // 4,200 short handshakes, each with a fresh id, sixteen at a time.
    let mut done = 0;
    while done < 4200 {
        let batch: Vec<_> = (0..16)
            .map(|_| {
                let a = a.clone();
                tokio::spawn(async move {
                    let me = Identity::generate();
                    Client::connect(&a, None, &me, hello_of(&me, "sybil"), None).await.is_ok()
                })
            })
            .collect();
        for t in batch {
            assert!(t.await.unwrap(), "a handshake of a sybil failed");
        }
        done += 16;
    }
    // b's record survived: its next lines are shown (with gaps or evictions, they would not).
    for i in 0..3 {
        lab.say("b", &format!("after {i}")).await.unwrap();
    }
    lab.await_delivery(WITHIN).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    lab.shutdown().await;
}

/// Listeners on `ip` that complete the handshake with any caller, each as an id of its own, and
/// hold the connection; counts the connections they were given.
async fn attacker_listeners(ip: IpAddr, n: usize) -> (Vec<PeerInfo>, watch::Receiver<usize>) {
    let (count, accepted) = watch::channel(0);
    let count = Arc::new(count);
    let mut infos = Vec::new();
    for _ in 0..n {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let me = Identity::generate();
        infos.push(PeerInfo { id: me.id(), name: "listener".into(), addr: listener.local_addr().unwrap().to_string() });
        let count = count.clone();
        tokio::spawn(async move {
            while let Ok(mut c) = Client::accept(&listener, &me, hello_of(&me, "listener")).await {
                count.send_modify(|n| *n += 1);
                tokio::spawn(async move { while c.recv().await.is_some() {} });
            }
        });
    }
    (infos, accepted)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gossip_naming_hundreds_of_listeners_of_one_host_does_not_lock_members_out() {
    let _serial = support::shared();
    let mut lab = new_lab();
    let tight = vec!["--max-conns".to_string(), "64".to_string()];
    lab.keep_state("b");
    lab.start(&["a"], &[], &tight).await.unwrap();
    lab.start(&["b", "c"], &["a"], &tight).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    let (listeners, mut accepted) = attacker_listeners(lab.backend().spare_ip().into(), 300).await;
    let (mut c, _) = mallory_at(&addr_of(&lab, "a")).await;
    for chunk in listeners.chunks(64) {
        c.send(&Message::Peers { peers: chunk.to_vec() }).await.unwrap();
    }
    // a dials a host's share of them (they all live on one host)...
    let dialled = tokio::time::timeout(WITHIN, accepted.wait_for(|n| *n >= 32)).await.is_ok();
    assert!(dialled, "a dialled only {} of them", *accepted.borrow());
    // ...and no more, so a newcomer and a restarted member still get in.
    let members = support::names(&["a", "b", "c", "d"]);
    lab.start(&["d"], &["a"], &tight).await.unwrap();
    lab.await_mesh(Some(&members), WITHIN).await.unwrap();
    lab.restart("b").await.unwrap();
    lab.await_mesh(Some(&members), WITHIN).await.unwrap();
    let taken = *accepted.borrow();
    assert!(taken <= 32, "{taken} connections to one host's listeners");
    lab.say("d", "in").await.unwrap();
    lab.await_delivery(WITHIN).await.unwrap();
    lab.shutdown().await;
}

/// Connects a stranger from `host`; returns it, kept alive, if `a` admits it.
async fn stranger(a: &str, host: std::net::Ipv4Addr) -> Option<tokio::task::JoinHandle<()>> {
    let me = Identity::generate();
    let mut c = Client::connect(a, Some(host.into()), &me, hello_of(&me, "stranger"), None).await.ok()?;
    match c.recv().await {
        Some(Message::Refuse { .. }) | None => None,
        Some(_) => Some(c.keep_alive()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admitted_connections_are_capped_per_host_and_slots_are_kept_for_known_members() {
    let _serial = support::shared();
    let mut lab = new_lab();
    lab.keep_state("b");
    // 80 slots: 20 kept for members met before, 16 for a's own dials; 6 a host.
    let tight: Vec<String> = ["--max-conns", "80", "--max-conns-per-host", "6"].iter().map(|s| s.to_string()).collect();
    lab.start(&["a"], &[], &tight).await.unwrap();
    lab.start(&["b"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    let a = addr_of(&lab, "a");
    let hosts = lab.backend().spare_ips(12);
    // Strangers from one host: six get in, the seventh is turned away after its handshake.
    let mut admitted = Vec::new();
    for _ in 0..7 {
        admitted.extend(stranger(&a, hosts[0]).await);
    }
    assert_eq!(admitted.len(), 6, "six connections from one host");
    lab.await_log("a", "connections from its host (--max-conns-per-host)", WITHIN).await.unwrap();
    // Strangers from other hosts take the 60 slots strangers may have (b was one when it came).
    for host in &hosts[1..11] {
        for _ in 0..6 {
            admitted.extend(stranger(&a, *host).await);
        }
    }
    assert_eq!(admitted.len(), 59, "strangers hold 60 slots with b");
    lab.await_log("a", "the other slots are kept for known members", WITHIN).await.unwrap();
    // b goes down; a stranger takes its slot; b comes back all the same: a has met it before.
    lab.kill("b").await.unwrap();
    lab.await_mark("a", "down", "b (", WITHIN).await.unwrap();
    admitted.extend(stranger(&a, hosts[11]).await);
    assert_eq!(admitted.len(), 60, "a stranger took b's slot");
    lab.restart("b").await.unwrap();
    lab.await_mesh(Some(&support::names(&["a", "b"])), WITHIN).await.unwrap();
    lab.say("b", "back").await.unwrap();
    lab.await_delivery(WITHIN).await.unwrap();
    for c in admitted {
        c.abort();
    }
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn neighbours_that_never_read_cannot_blow_up_a_peers_memory() {
    let _serial = support::exclusive();
    let mut lab = mesh(&["a", "b", "c"], &[]).await;
    // Six megabytes of b's history at a.
    let text = "h".repeat(3000);
    for i in 0..2000 {
        lab.say("b", &format!("{i} {text}")).await.unwrap();
    }
    lab.await_delivery(Duration::from_secs(60)).await.unwrap();
    let b = id_of(&lab, "b");
    let a = addr_of(&lab, "a");
    let pid = lab.backend().pid("a").unwrap();
    // 180 members from six hosts that never read, each asking once a second for all of it.
    let mut askers = Vec::new();
    for ip in lab.backend().spare_ips(6) {
        for _ in 0..30 {
            let me = Identity::generate();
            let mut c = Client::connect(&a, Some(ip.into()), &me, hello_of(&me, "reader"), None).await.unwrap();
            askers.push(tokio::spawn(async move {
                for _ in 0..5 {
                    if c.send(&Message::Digest { have: [(b, 0)].into(), follow: vec![] }).await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                c
            }));
        }
    }
    // Sample a's memory while they ask (a measurement, not a wait).
    let mut peak = 0;
    while !askers.iter().all(|t| t.is_finished()) {
        peak = peak.max(support::rss_kib(pid));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(peak < 64 * 1024, "a reached {} MiB, past its 64 MiB ceiling", peak / 1024);
    // The real neighbours were never dropped, and a still carries the chat.
    lab.say("c", "still here").await.unwrap();
    lab.await_delivery(WITHIN).await.unwrap();
    assert_eq!(downs(&lab), Vec::<String>::new());
    drop(askers);
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_does_not_refill_the_flood_limit() {
    let _serial = support::shared();
    let ip = support::loopback();
    let mut a = support::Reaped(
        Command::new(env!("CARGO_BIN_EXE_peer"))
            .args(["--json", "--bind", &ip, "--port", "0", "--line-rate", "20", "--line-burst", "50"])
            .env_remove("MESH_KEY")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let events = support::TimedLines::new(a.stdout.take().unwrap());
    let listening: serde_json::Value = serde_json::from_str(&events.next()).unwrap();
    let addr = listening["addr"].as_str().unwrap().to_owned();
    // Ten connections in a row, each a new incarnation of one member, each with 50 new lines:
    // protocol 1 gave every connection a full bucket, so all 500 were shown at once.
    let mallory = Identity::generate();
    let (mut seq, mut head) = (0, chain::genesis(&mallory.id()));
    let started = Instant::now();
    for _ in 0..10 {
        let mut hello = hello_of(&mallory, "mallory");
        (hello.seq, hello.head) = (seq, head);
        let mut c = Client::connect(&addr, None, &mallory, hello, None).await.unwrap();
        let texts: Vec<String> = (seq + 1..=seq + 50).map(|i| format!("line {i}")).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let (batch, next) = signed_lines(&mallory, "mallory", seq, head, &refs);
        c.send(&Message::Lines(batch)).await.unwrap();
        (seq, head) = (seq + 50, next);
        drop(c);
    }
    // Count what a showed, over the attack and one second more.
    let window = started.elapsed() + Duration::from_secs(1);
    let mut shown = 0;
    while started.elapsed() < window {
        let Some(line) = events.next_within(window.saturating_sub(started.elapsed())) else { break };
        if line.contains(r#""event":"message""#) {
            shown += 1;
        }
    }
    let allowed = 50.0 + 20.0 * window.as_secs_f64();
    assert!((shown as f64) <= allowed, "{shown} lines shown in {window:?}, where the limit allows {allowed}");
    assert!(shown >= 50, "the first burst is shown: {shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_that_could_pass_for_a_chat_prefix_or_reorder_text_are_refused() {
    let _serial = support::shared();
    let mut lab = mesh(&["a"], &[]).await;
    for (name, bad) in [
        ("m@… T:r@127.0.0.1:4002] pay bob", "U+0040"),
        ("bob\u{202e}", "U+202E"),
        ("zero\u{200b}width", "U+200B"),
        ("two\u{2028}lines", "U+2028"),
    ] {
        let me = Identity::generate();
        let refused = refusal(Client::connect(&addr_of(&lab, "a"), None, &me, hello_of(&me, name), None).await).await;
        assert!(refused.is_some_and(|r| r.contains("bad hello: invalid name")), "{name:?} was admitted");
        lab.await_log("a", &format!("bad hello: invalid name: may not contain {bad}"), WITHIN).await.unwrap();
    }
    lab.shutdown().await;
}
