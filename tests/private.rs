//! The private mesh: a mesh key keeps out peers without it, encrypts every byte on the wire,
//! and ties each id to a static key.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use meshlab::identity::Identity;
use meshlab::noise::MeshKey;
use meshlab_lab::Lab;
use meshlab_lab::backend::process::ProcessBackend;
use support::client::{Client, hello_of, refusal};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const WITHIN: Duration = Duration::from_secs(10);

fn lab() -> Lab<ProcessBackend> {
    Lab::new(ProcessBackend::new(env!("CARGO_BIN_EXE_peer")))
}

fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_without_the_key_are_refused_and_learn_nothing() {
    let _serial = support::shared();
    let mut lab = lab();
    lab.private_mesh();
    lab.start(&["a"], &[], &[]).await.unwrap();
    lab.start(&["b"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    lab.private_mesh(); // another key
    lab.start(&["wrong"], &["a"], &[]).await.unwrap();
    lab.open_mesh();
    lab.start(&["keyless"], &["a"], &[]).await.unwrap();

    // Both sides of each refusal say why, in one line.
    lab.await_log("a", "wrong mesh key: the other side does not hold this mesh's key", WITHIN).await.unwrap();
    lab.await_log("wrong", "refused by the other side: wrong mesh key", WITHIN).await.unwrap();
    lab.await_log("a", "this peer's mesh requires a key but the other side has none", WITHIN).await.unwrap();
    lab.await_log("keyless", "this peer runs an open mesh (no key) but the other side uses a mesh key", WITHIN)
        .await
        .unwrap();
    lab.say("a", "members only").await.unwrap();
    let (_, d) = lab.await_delivery(WITHIN).await.unwrap();
    assert_eq!((d.owed, d.shown), (1, 1), "b shows the line; the intruders never met anyone");
    lab.await_mesh(Some(&names(&["a", "b"])), WITHIN).await.unwrap();
    let ups: Vec<_> =
        lab.world().timeline.iter().filter(|m| m.kind == "up").map(|m| (m.peer.clone(), m.detail.clone())).collect();
    assert_eq!(ups.len(), 2, "only a and b ever met: {ups:?}");
    for intruder in ["wrong", "keyless"] {
        assert!(lab.peers_of(intruder).await.unwrap().is_empty(), "{intruder} learned no member");
        let warnings = lab.world().peer(intruder).unwrap().stderr.iter().filter(|l| l.contains("WARN")).count();
        assert_eq!(warnings, 1, "{intruder} logs its refusal once, not once per redial");
    }
    lab.shutdown().await;
}

/// A TCP relay that forwards to `target` and records everything that passes, both ways.
async fn recording_relay(ip: std::net::Ipv4Addr, target: String) -> (String, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let wire = Arc::new(Mutex::new(Vec::new()));
    let record = wire.clone();
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let Ok(outbound) = TcpStream::connect(&target).await else { continue };
            let (mut ir, mut iw) = inbound.into_split();
            let (mut or, mut ow) = outbound.into_split();
            let (r1, r2) = (record.clone(), record.clone());
            tokio::spawn(async move { copy_recording(&mut ir, &mut ow, r1).await });
            tokio::spawn(async move { copy_recording(&mut or, &mut iw, r2).await });
        }
    });
    (addr, wire)
}

async fn copy_recording(
    from: &mut (impl tokio::io::AsyncRead + Unpin),
    to: &mut (impl tokio::io::AsyncWrite + Unpin),
    record: Arc<Mutex<Vec<u8>>>,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 8192];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 || to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        record.lock().unwrap().extend_from_slice(&buf[..n]);
    }
}

/// Two peers talking through a recording relay; returns what crossed the wire.
async fn recorded_conversation(keyed: bool) -> Vec<u8> {
    let mut lab = lab();
    if keyed {
        lab.private_mesh();
    }
    lab.start(&["bob"], &[], &[]).await.unwrap();
    let bob = lab.world().peer("bob").unwrap().listen.clone().unwrap();
    let (relay, wire) = recording_relay(lab.backend().spare_ip(), bob).await;
    lab.start(&["alice"], &[], &[relay]).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    lab.say("alice", "the launch code is swordfish").await.unwrap();
    lab.say("bob", "noted, swordfish it is").await.unwrap();
    lab.await_delivery(WITHIN).await.unwrap();
    lab.shutdown().await;
    wire.lock().unwrap().clone()
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_chat_text_crosses_the_wire_in_a_private_mesh() {
    let _serial = support::shared();
    // The relay does record: in an open mesh the text is there in clear.
    let open = recorded_conversation(false).await;
    assert!(contains(&open, "swordfish") && contains(&open, "\"hello\""));
    let private = recorded_conversation(true).await;
    assert!(private.len() > 500, "the relay carried the conversation ({} bytes)", private.len());
    for secret in ["swordfish", "launch code", "alice", "\"type\"", "hello", "\"peers\""] {
        assert!(!contains(&private, secret), "{secret:?} crossed the wire in clear");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_holder_cannot_claim_another_members_id() {
    let _serial = support::shared();
    let mut lab = lab();
    let key = lab.private_mesh();
    lab.start(&["a"], &[], &[]).await.unwrap();
    lab.start(&["b"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    let addr = lab.world().peer("a").unwrap().listen.clone().unwrap();
    let b: meshlab::id::PeerId = lab.world().peer("b").unwrap().id.clone().unwrap().parse().unwrap();
    // A member's mesh key, its own signing key, but a hello claiming b's id.
    let insider = Identity::generate();
    let mut claim = hello_of(&insider, "b");
    claim.id = b;
    let refused =
        refusal(Client::connect(&addr, None, &insider, claim, Some(MeshKey::parse(&key).unwrap())).await).await;
    assert_eq!(
        refused.as_deref(),
        Some("refused by the other side: the hello is not signed by the key of the id it claims")
    );
    lab.await_log("a", "the hello is not signed by the key of the id it claims", WITHIN).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    let downs = lab.world().timeline.iter().filter(|m| m.kind == "down").count();
    assert_eq!(downs, 0, "b's link was never touched");
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_peer_keeps_its_key_and_id_in_its_state_dir() {
    let _serial = support::shared();
    let mut lab = lab();
    lab.private_mesh();
    lab.keep_state("a");
    lab.start(&["a"], &[], &[]).await.unwrap();
    lab.start(&["b"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    let id = lab.world().peer("a").unwrap().id.clone();
    lab.restart("a").await.unwrap();
    assert_eq!(lab.world().peer("a").unwrap().id, id);
    lab.await_mesh(None, WITHIN).await.unwrap();
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_neighbour_flooding_lines_is_told_then_cut_off_and_nothing_is_lost() {
    let _serial = support::shared();
    let mut lab = lab();
    let flags: Vec<String> = ["--line-rate", "20", "--line-burst", "50"].iter().map(|s| s.to_string()).collect();
    lab.start(&["a"], &[], &flags).await.unwrap();
    lab.start(&["b"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    // b says 200 lines at once: a takes the first 50, tells b, closes the connection when b
    // keeps going, holds b off for a 10 s cool-down, then brings in the rest at 20 a second
    // through catch-up. Nothing is lost, nothing shown twice.
    for i in 0..200 {
        lab.say("b", &format!("flood {i}")).await.unwrap();
    }
    let (_, d) = lab.await_delivery(Duration::from_secs(60)).await.unwrap();
    assert_eq!((d.owed, d.shown), (200, 200));
    lab.await_log("a", "closing connection to b@", WITHIN).await.unwrap();
    let at = |kind: &str| -> Vec<u64> {
        lab.world().timeline.iter().filter(|m| m.peer == "a" && m.kind == kind).map(|m| m.at_ms).collect()
    };
    let (ups, downs) = (at("up"), at("down"));
    assert_eq!((ups.len(), downs.len()), (2, 1), "b was cut off once, then admitted again");
    assert!(
        ups[1] - downs[0] >= 9_000,
        "b was admitted again {} ms after the cut, within its cool-down",
        ups[1] - downs[0]
    );
    let told: Vec<_> = lab.world().timeline.iter().filter(|m| m.peer == "b" && m.kind == "notice").collect();
    assert!(!told.is_empty() && told[0].detail.starts_with("a: you send lines faster than 20 a second"), "{told:?}");
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_over_the_rate_limit_are_all_caught_up_at_the_allowed_pace() {
    let _serial = support::shared();
    // Each round: 300 lines at once to a neighbour that takes 200 at once and 50 a second after.
    // The other 100 come by catch-up, however the two sides' digests cross (a stall there hit
    // about every other round before it was fixed, hence several rounds).
    for round in 0..4 {
        let mut lab = lab();
        let flags: Vec<String> = ["--line-rate", "50", "--line-burst", "200"].iter().map(|s| s.to_string()).collect();
        lab.start(&["talker"], &[], &[]).await.unwrap();
        lab.start(&["listener"], &["talker"], &flags).await.unwrap();
        lab.await_mesh(None, WITHIN).await.unwrap();
        for i in 0..300 {
            lab.say("talker", &format!("round {round} line {i}")).await.unwrap();
        }
        let (_, d) = lab.await_delivery(Duration::from_secs(20)).await.unwrap();
        assert_eq!((d.owed, d.shown), (300, 300));
        lab.shutdown().await;
    }
}
