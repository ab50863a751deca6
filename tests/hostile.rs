//! Bad input from the network: each case closes the offending connection with a log line, and
//! the peer and its mesh carry on (a neighbour keeps chatting with it afterwards).

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use meshlab::frame::{self, Gone, Message, Preamble, Security};
use meshlab::id::{Hex, PeerId};
use meshlab::identity::Identity;
use meshlab_lab::Lab;
use meshlab_lab::backend::process::ProcessBackend;
use support::client::{Client, hello_of, signed_lines};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Framed;

const WITHIN: Duration = Duration::from_secs(10);

fn new_lab() -> Lab<ProcessBackend> {
    Lab::new(ProcessBackend::new(env!("CARGO_BIN_EXE_peer")))
}

/// A mesh of `a` and `b`, `a` started with `flags`; returns the lab and a's address.
async fn pair(flags: &[&str]) -> (Lab<ProcessBackend>, String) {
    pair_in(new_lab(), flags).await
}

async fn pair_in(mut lab: Lab<ProcessBackend>, flags: &[&str]) -> (Lab<ProcessBackend>, String) {
    let flags: Vec<String> = flags.iter().map(|s| s.to_string()).collect();
    lab.start(&["a"], &[], &flags).await.unwrap();
    lab.start(&["b"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    let addr = lab.world().peer("a").unwrap().listen.clone().unwrap();
    (lab, addr)
}

/// The peer under attack is still alive and still chats with its neighbour, both ways.
async fn still_fine(lab: &mut Lab<ProcessBackend>) {
    lab.say("a", "still here").await.unwrap();
    lab.say("b", "me too").await.unwrap();
    lab.await_delivery(WITHIN).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    lab.shutdown().await;
}

/// Reads until the peer closes the connection; fails if it stays open.
async fn closed_by_peer(mut s: TcpStream) {
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(WITHIN, read_all).await.expect("the peer left the connection open");
}

/// Connects and completes the handshake as a well-behaved newcomer would, as `mallory`.
async fn handshaken(addr: &str) -> (Client, Identity) {
    let me = Identity::generate();
    let client = Client::connect(addr, None, &me, hello_of(&me, "mallory"), None).await.unwrap();
    (client, me)
}

/// Sends a preamble of our own making and collects the `refuse` the peer answers with.
async fn refusal_of(addr: &str, preamble: &[u8], then: &[&[u8]]) -> String {
    let mut f = Framed::new(TcpStream::connect(addr).await.unwrap(), frame::codec());
    f.send(Bytes::copy_from_slice(preamble)).await.unwrap();
    for frame in then {
        f.send(Bytes::copy_from_slice(frame)).await.unwrap();
    }
    let mut refusal = None;
    while let Some(Ok(payload)) = f.next().await {
        if let Ok(Message::Refuse { reason }) = Message::decode(&payload) {
            refusal = Some(reason);
        }
    }
    refusal.expect("a refuse frame before the close")
}

async fn raw_bytes(addr: &str, bytes: &[u8], then_close: bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if then_close {
        s.shutdown().await.unwrap();
    }
    closed_by_peer(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes() {
    let _serial = support::shared();
    let (mut lab, addr) = pair(&[]).await;
    raw_bytes(&addr, b"\x00\x00\x00\x05abcde", false).await;
    lab.await_log("a", "not a meshlab preamble", WITHIN).await.unwrap();
    raw_bytes(&addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", false).await;
    lab.await_log("a", "frame size too big", WITHIN).await.unwrap();
    still_fine(&mut lab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_frame() {
    let _serial = support::shared();
    let (mut lab, addr) = pair(&[]).await;
    let mut bytes = vec![0, 0, 0, 100];
    bytes.extend_from_slice(&[b'{'; 10]);
    raw_bytes(&addr, &bytes, true).await;
    lab.await_log("a", "closing connection from", WITHIN).await.unwrap();
    still_fine(&mut lab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_length() {
    let _serial = support::shared();
    let (mut lab, addr) = pair(&[]).await;
    raw_bytes(&addr, &[0xff, 0xff, 0xff, 0xff, 1, 2, 3], false).await;
    lab.await_log("a", "frame size too big", WITHIN).await.unwrap();
    still_fine(&mut lab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_json_after_the_handshake() {
    let _serial = support::shared();
    let (mut lab, addr) = pair(&[]).await;
    let (mut f, _) = handshaken(&addr).await;
    f.send_raw(Bytes::from_static(b"{\"type\":\"lines\", oops")).await.unwrap();
    f.closed_by_peer().await;
    lab.await_log("a", "not a valid message", WITHIN).await.unwrap();
    still_fine(&mut lab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_message_type() {
    let _serial = support::shared();
    let (mut lab, addr) = pair(&[]).await;
    let (mut f, _) = handshaken(&addr).await;
    f.send_raw(Bytes::from_static(b"{\"type\":\"launch_missiles\"}")).await.unwrap();
    f.closed_by_peer().await;
    lab.await_log("a", "unknown variant `launch_missiles`", WITHIN).await.unwrap();
    still_fine(&mut lab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_protocol_version_is_refused_with_a_reason() {
    let _serial = support::shared();
    let (mut lab, addr) = pair(&[]).await;
    let mut future = Preamble::new(Security::Open, Hex::random());
    future.versions = Some((7, 9));
    let reason = refusal_of(&addr, &future.encode(), &[]).await;
    assert_eq!(reason, "no common protocol version: this peer speaks 2..=2, the other side 7..=9");
    lab.await_log("a", "no common protocol version", WITHIN).await.unwrap();
    still_fine(&mut lab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_peer_is_refused_with_both_versions_named() {
    let _serial = support::shared();
    let (mut lab, addr) = pair(&[]).await;
    // Exactly what a version-1 peer sends: its preamble, then its hello.
    let v1_preamble = br#"{"protocol":"meshlab","security":"open"}"#;
    let v1_hello = br#"{"type":"hello","min_version":1,"max_version":1,"id":"5f0c1e9a5b7d2c4e8f6a1b3d5c7e9f0a","incarnation":1,"nonce":2,"name":"old","port":4000,"seq":0,"peers":[]}"#;
    let reason = refusal_of(&addr, v1_preamble, &[v1_hello]).await;
    assert_eq!(reason, "no common protocol version: this peer speaks 2..=2, the other side 1..=1");
    lab.await_log("a", "this peer speaks 2..=2, the other side 1..=1", WITHIN).await.unwrap();
    // And a version-2 peer dialling a version-1 one says the same, on its side.
    let old = tokio::net::TcpListener::bind((lab.backend().spare_ip(), 0)).await.unwrap();
    let old_addr = old.local_addr().unwrap().to_string();
    let serve = tokio::spawn(async move {
        let (s, _) = old.accept().await.unwrap();
        let mut f = Framed::new(s, frame::codec());
        f.send(Bytes::from_static(v1_preamble)).await.unwrap();
        f.send(Bytes::from_static(v1_hello)).await.unwrap();
        let mut got = Vec::new();
        while let Some(Ok(payload)) = f.next().await {
            got.push(payload);
        }
        got
    });
    lab.start(&["c"], &[], &["--redial-max".into(), "60s".into(), old_addr]).await.unwrap();
    lab.await_log("c", "refused: no common protocol version: this peer speaks 2..=2, the other side 1..=1", WITHIN)
        .await
        .unwrap();
    let got = tokio::time::timeout(WITHIN, serve).await.unwrap().unwrap();
    let said: Vec<String> = got.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect();
    assert!(said.iter().any(|p| p.contains("this peer speaks 2..=2, the other side 1..=1")), "{said:?}");
    lab.kill("c").await.unwrap();
    still_fine(&mut lab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_says_hello_is_timed_out() {
    let _serial = support::shared();
    let (mut lab, addr) = pair(&["--handshake-timeout", "300ms"]).await;
    let silent = TcpStream::connect(&addr).await.unwrap();
    closed_by_peer(silent).await;
    lab.await_log("a", "no handshake within 300ms", WITHIN).await.unwrap();
    still_fine(&mut lab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_connections_hits_the_cap_not_the_mesh() {
    let _serial = support::shared();
    let (mut lab, addr) = pair(&["--max-conns", "16", "--handshake-timeout", "1s"]).await;
    let mut flood = Vec::new();
    for _ in 0..200 {
        if let Ok(s) = TcpStream::connect(&addr).await {
            flood.push(s);
        }
    }
    lab.await_log("a", "connections open (--max-conns)", WITHIN).await.unwrap();
    // The existing neighbour is unaffected while the flood lasts...
    lab.say("b", "during the flood").await.unwrap();
    lab.await_delivery(WITHIN).await.unwrap();
    // ...and once it ends, newcomers get in again.
    drop(flood);
    lab.start(&["c"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    still_fine(&mut lab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connections_from_one_host_leave_room_for_newcomers_from_others() {
    let _serial = support::shared();
    let (mut lab, addr) = pair(&["--handshake-timeout", "60s"]).await;
    let attacker: std::net::IpAddr = lab.backend().spare_ip().into();
    // More silent sockets than a has connection slots, all from one address, held open.
    let mut flood = Vec::new();
    for _ in 0..300 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind((attacker, 0).into()).unwrap();
        if let Ok(s) = socket.connect(addr.parse().unwrap()).await {
            flood.push(s);
        }
    }
    lab.await_log("a", "connections from its host are still in their handshake", WITHIN).await.unwrap();
    // While they stay open, a newcomer from another address joins through a.
    lab.start(&["c"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    drop(flood);
    still_fine(&mut lab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_given_its_own_address_ignores_it() {
    let _serial = support::shared();
    let lab = new_lab();
    let ip = lab.backend().next_ip();
    let port = std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port();
    let own = format!("{ip}:{port}");
    let (mut lab, _) = pair_in(lab, &["--port", &port.to_string(), &own]).await;
    lab.await_log("a", &format!("ignoring {own}: it is this peer's own address"), WITHIN).await.unwrap();
    assert_eq!(lab.peers_of("a").await.unwrap(), vec!["b".to_string()], "a does not list itself");
    still_fine(&mut lab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_of_digests_and_absurd_sequence_numbers_do_no_harm() {
    let _serial = support::shared();
    let (mut lab, addr) = pair(&[]).await;
    for i in 0..300 {
        lab.say("b", &format!("history line {i}")).await.unwrap();
    }
    lab.await_delivery(WITHIN).await.unwrap();
    let b: PeerId = lab.world().peer("b").unwrap().id.clone().unwrap().parse().unwrap();
    let (mut f, mallory) = handshaken(&addr).await;
    let me = mallory.id();
    // Never reading, ask a thousand times for all of b's history: a must neither buffer it all
    // for us nor spin on it.
    for _ in 0..1000 {
        let have = [(b, 0)].into();
        f.send(&Message::Digest { have, follow: vec![] }).await.unwrap();
    }
    // Sequence numbers at the edge of u64, about ourselves and about a stranger.
    let stranger = Identity::generate().id();
    let (ours, _) = signed_lines(&mallory, "mallory", u64::MAX - 1, meshlab::chain::genesis(&me), &["edge"]);
    for m in [
        Message::Digest { have: [(b, u64::MAX), (stranger, u64::MAX)].into(), follow: vec![] },
        Message::Gone(Gone { origin: me, upto: u64::MAX, head: Hex([0; 32]), sig: Hex([0; 64]) }),
        Message::Digest { have: [(me, u64::MAX)].into(), follow: vec![] },
        Message::Lines(ours),
        Message::Ping { seq: u64::MAX },
    ] {
        f.send(&m).await.unwrap();
    }
    still_fine(&mut lab).await;
}

/// A peer outside any lab, with no stdin, `RUST_LOG=log` and its stderr piped.
fn lone_peer(args: &[&str], log: &str, stdout: Stdio) -> support::Reaped {
    let child = Command::new(env!("CARGO_BIN_EXE_peer"))
        .args(args)
        .env_remove("PORT")
        .env("RUST_LOG", log)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    support::Reaped(child)
}

#[test]
fn a_bootstrap_name_that_does_not_resolve_warns_once_and_keeps_retrying() {
    let _serial = support::shared();
    let args = ["--bind", "127.0.0.1", "--port", "0", "--redial-max", "200ms", "nosuchhost.invalid:4000"];
    let mut child = lone_peer(&args, "warn,meshlab::mesh=debug", Stdio::null());
    let mut warnings = 0;
    let mut retries = 0;
    let stderr = support::TimedLines::new(child.stderr.take().unwrap());
    loop {
        let line = stderr.next();
        if line.contains("cannot resolve nosuchhost.invalid:4000") {
            warnings += 1;
        }
        if line.contains("dial to nosuchhost.invalid:4000 failed") {
            retries += 1;
        }
        if retries >= 3 {
            break;
        }
    }
    let still_running = child.try_wait().unwrap().is_none();
    assert_eq!(warnings, 1, "one clear warning, not one per retry");
    assert_eq!(retries, 3, "it keeps retrying");
    assert!(still_running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stdout_pipe_nobody_reads_neither_stalls_the_peer_nor_grows_its_memory() {
    let _serial = support::shared();
    let mut peer = lone_peer(&["--json", "--bind", "127.0.0.1", "--port", "0"], "warn", Stdio::piped());
    let stdout = peer.stdout.take().unwrap();
    stdout_nobody_reads(peer, stdout).await;
}

/// A terminal that stops reading (Ctrl-S, a stuck `docker attach`): the peer writes it from a
/// thread of its own, through a queue bounded in bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_terminal_nobody_reads_neither_stalls_the_peer_nor_grows_its_memory() {
    let _serial = support::shared();
    let (terminal, screen) = support::pty();
    let peer = lone_peer(&["--json", "--bind", "127.0.0.1", "--port", "0"], "warn", Stdio::from(screen));
    stdout_nobody_reads(peer, terminal).await;
}

/// A peer whose stdout is a terminal holds no more memory than one whose stdout is a pipe: its
/// queue towards the terminal grows only as events wait (a queue made for the most events it may
/// hold cost 2 MiB at start).
#[test]
fn a_peer_on_a_terminal_starts_as_small_as_on_a_pipe() {
    let _serial = support::shared();
    let rss_once_listening = |stdout: &mut dyn std::io::Read, peer: &support::Reaped| {
        let mut listening = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut listening).unwrap();
        assert!(listening.contains("listening"), "{listening}");
        support::rss_kib(peer.id())
    };
    let args = ["--json", "--bind", "127.0.0.1", "--port", "0"];
    let mut on_pipe = lone_peer(&args, "warn", Stdio::piped());
    let mut pipe = on_pipe.stdout.take().unwrap();
    let pipe_kib = rss_once_listening(&mut pipe, &on_pipe);
    let (mut terminal, screen) = support::pty();
    let on_terminal = lone_peer(&args, "warn", Stdio::from(screen));
    let terminal_kib = rss_once_listening(&mut terminal, &on_terminal);
    assert!(terminal_kib < pipe_kib + 1024, "{terminal_kib} KiB on a terminal, {pipe_kib} KiB on a pipe");
}

/// Reads `peer`'s first event from `stdout`, then never again, while a member floods it with
/// lines: the peer drops events with a warning, keeps serving, and stays small.
async fn stdout_nobody_reads(mut peer: support::Reaped, stdout: impl std::io::Read) {
    let stderr = support::TimedLines::new(peer.stderr.take().unwrap());
    // The listening event, then stdout is never read again: it fills after a few events.
    let mut stdout = std::io::BufReader::new(stdout);
    let mut listening = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut listening).unwrap();
    let event: serde_json::Value = serde_json::from_str(listening.trim_end()).unwrap();
    let addr = event["addr"].as_str().unwrap().to_owned();
    let (mut f, mallory) = handshaken(&addr).await;
    // 3,000 lines of control characters, 48 KB each as JSON events: 144 MB if all were queued.
    let text = "\x01".repeat(8000);
    let mut head = meshlab::chain::genesis(&mallory.id());
    for seq in 0..3000 {
        let (batch, next) = signed_lines(&mallory, "mallory", seq, head, &[&text]);
        head = next;
        f.send(&Message::Lines(batch)).await.unwrap();
    }
    while !stderr.next().contains("stdout is not being read: 2048 events dropped") {}
    let rss_mib = support::rss_kib(peer.id()) / 1024;
    // Still serving: a newcomer completes its handshake.
    let (g, _) = handshaken(&addr).await;
    drop(peer);
    drop(stdout);
    assert_eq!(g.theirs.seq, 0, "a newcomer gets a hello");
    assert!(rss_mib < 64, "{rss_mib} MiB resident: the stdout queue is not bounded in bytes");
}
