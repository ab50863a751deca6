//! Real `peer` processes on loopback, driven through the lab's API: discovery, delivery,
//! kills, restarts and graceful leaves.

mod support;

use std::collections::HashSet;
use std::time::{Duration, Instant};
use support::{names, six_peer_demo};

use meshlab_lab::Lab;
use meshlab_lab::backend::process::ProcessBackend;

const MESH: Duration = Duration::from_secs(10);

fn lab() -> Lab<ProcessBackend> {
    Lab::new(ProcessBackend::new(env!("CARGO_BIN_EXE_peer")))
}

/// ESTABLISHED TCP connections held by a process, from /proc.
fn established_connections(pid: u32) -> usize {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| {
            dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter_map(|l| l.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(String::from))
                .collect()
        })
        .unwrap_or_default();
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| t.lines().skip(1).map(String::from).collect::<Vec<_>>())
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            cols.get(3) == Some(&"01") && cols.get(9).is_some_and(|i| inodes.contains(*i))
        })
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_six_peer_demo_ends_as_a_full_mesh_with_one_connection_per_pair() {
    let _serial = support::shared();
    let mut lab = lab();
    six_peer_demo(&mut lab).await;
    for name in ["p1", "p2", "p3", "p4", "p5", "p6"] {
        let listed = lab.peers_of(name).await.unwrap();
        let others: Vec<String> =
            ["p1", "p2", "p3", "p4", "p5", "p6"].iter().filter(|n| **n != name).map(|s| s.to_string()).collect();
        assert_eq!(listed, others, "{name} lists the five others");
    }
    // Each of the 15 pairs holds one TCP connection, so each peer holds exactly five.
    let deadline = Instant::now() + Duration::from_secs(10);
    for name in ["p1", "p2", "p3", "p4", "p5", "p6"] {
        let pid = lab.backend().pid(name).unwrap();
        loop {
            let n = established_connections(pid);
            if n == 5 {
                break;
            }
            assert!(Instant::now() < deadline, "{name} holds {n} connections, expected 5");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_line_is_shown_exactly_once_by_every_other_peer() {
    let _serial = support::shared();
    let mut lab = lab();
    six_peer_demo(&mut lab).await;
    for name in ["p1", "p2", "p3", "p4", "p5", "p6"] {
        for i in 0..5 {
            lab.say(name, &format!("line {i} from {name}")).await.unwrap();
        }
    }
    let (_, delivery) = lab.await_delivery(MESH).await.unwrap();
    assert_eq!(delivery.said, 30);
    assert_eq!(delivery.owed, 30 * 5);
    assert_eq!(delivery.shown, 30 * 5);
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_ten_thousand_lines_is_shown_whole_by_every_other_peer() {
    // Stdin and stdout are pipes here, read and written on the peer's own thread: a wake-up lost
    // between a full stdout and a write once stalled every peer's output for good.
    let _serial = support::shared();
    let mut lab = lab();
    lab.start(&["a"], &[], &[]).await.unwrap();
    lab.start(&["b", "c"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, MESH).await.unwrap();
    for i in 0..10_000 {
        lab.say("a", &format!("burst line {i}")).await.unwrap();
    }
    let (_, d) = lab.await_delivery(Duration::from_secs(60)).await.unwrap();
    assert_eq!((d.said, d.shown, d.duplicated), (10_000, 20_000, 0));
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_two_kills_the_rest_stay_meshed_and_keep_chatting() {
    let _serial = support::shared();
    let mut lab = lab();
    six_peer_demo(&mut lab).await;
    lab.kill("p1").await.unwrap();
    lab.kill("p4").await.unwrap();
    // p2, p3 reached the mesh through p1 and p5 through p4: all must still be connected.
    lab.await_mesh(None, MESH).await.unwrap();
    assert_eq!(lab.peers_of("p5").await.unwrap(), names(&["p2", "p3", "p6"]));
    lab.say("p2", "still here").await.unwrap();
    lab.say("p5", "me too").await.unwrap();
    lab.await_delivery(MESH).await.unwrap();
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_peer_rejoins_the_mesh() {
    let _serial = support::shared();
    let mut lab = lab();
    six_peer_demo(&mut lab).await;
    lab.kill("p3").await.unwrap();
    lab.await_mesh(None, MESH).await.unwrap();
    lab.restart("p3").await.unwrap();
    lab.await_mesh(None, MESH).await.unwrap();
    lab.say("p3", "back again").await.unwrap();
    lab.say("p5", "welcome back").await.unwrap();
    lab.await_delivery(MESH).await.unwrap();
    lab.shutdown().await;
}

/// After a peer is gone, watches its old port: returns whether anyone dialled it in `window`.
async fn redialled(lab: &Lab<ProcessBackend>, name: &str, port: u16, window: Duration) -> bool {
    let ip = lab.backend().ip_of(name).unwrap();
    let listener = tokio::net::TcpListener::bind((ip, port)).await.expect("the port is free again");
    tokio::time::timeout(window, listener.accept()).await.is_ok()
}

fn port_of(lab: &Lab<ProcessBackend>, name: &str) -> u16 {
    let listen = lab.world().peer(name).unwrap().listen.clone().unwrap();
    listen.rsplit_once(':').unwrap().1.parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_quits_is_told_apart_from_one_that_dies() {
    let _serial = support::shared();
    let mut lab = lab();
    lab.start(&["a"], &[], &[]).await.unwrap();
    lab.start(&["b", "c"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, MESH).await.unwrap();

    // A killed peer is redialled: something connects to its old port.
    let c_port = port_of(&lab, "c");
    lab.kill("c").await.unwrap();
    assert!(redialled(&lab, "c", c_port, Duration::from_secs(5)).await, "a killed peer must be redialled");

    // A peer that says goodbye is not: its old port stays quiet for well over the redial cap.
    let b_port = port_of(&lab, "b");
    lab.command("b", "/quit").await.unwrap();
    lab.await_exit("b", MESH).await.unwrap();
    lab.await_mesh(None, MESH).await.unwrap();
    assert!(!redialled(&lab, "b", b_port, Duration::from_secs(2)).await, "a peer that said goodbye was redialled");
    let downs: Vec<_> = lab.world().timeline.iter().filter(|m| m.kind == "down" && m.peer == "a").collect();
    assert!(downs.iter().any(|m| m.detail == "b (goodbye)"), "{downs:?}");
    assert!(downs.iter().any(|m| m.detail == "c (closed)"), "{downs:?}");
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_peers_started_together_form_a_full_mesh() {
    let _serial = support::shared();
    let mut lab = lab();
    lab.start(&["seed"], &[], &[]).await.unwrap();
    let others: Vec<String> = (1..32).map(|i| format!("n{i:02}")).collect();
    let refs: Vec<&str> = others.iter().map(String::as_str).collect();
    lab.start(&refs, &["seed"], &[]).await.unwrap();
    lab.await_mesh(None, Duration::from_secs(20)).await.unwrap();
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_peers_dialling_each_other_at_once_keep_one_connection_and_no_flapping() {
    let _serial = support::shared();
    let mut lab = lab();
    // Several pairs, each started at once and each peer bootstrapping to the other: both sides
    // dial and both accept, and the duplicate must be resolved the same way at both ends.
    let count = |lab: &Lab<ProcessBackend>, kind: &str| lab.world().timeline.iter().filter(|m| m.kind == kind).count();
    for round in 0..5 {
        let (downs, ups) = (count(&lab, "down"), count(&lab, "up"));
        let ips = lab.backend().next_ips(2);
        let free = |ip| std::net::TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap().port();
        let (pa, pb) = (free(ips[0]), free(ips[1]));
        let flags = |me: u16, other: u16, ip| vec!["--port".to_string(), me.to_string(), format!("{ip}:{other}")];
        let (a, b) = (format!("a{round}"), format!("b{round}"));
        lab.start_each(&[(a.as_str(), flags(pa, pb, ips[1])), (b.as_str(), flags(pb, pa, ips[0]))], &[]).await.unwrap();
        lab.await_mesh(Some(&[a.clone(), b.clone()]), MESH).await.unwrap();
        lab.say(&a, "one connection").await.unwrap();
        lab.await_delivery(MESH).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        for name in [&a, &b] {
            let pid = lab.backend().pid(name).unwrap();
            while established_connections(pid) != 1 {
                assert!(Instant::now() < deadline, "{name} keeps more than one connection");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        assert_eq!(count(&lab, "down"), downs, "round {round}: no down/up pair for the swap");
        assert_eq!(count(&lab, "up"), ups + 2, "round {round}: one peer_up on each side");
        lab.kill(&a).await.unwrap();
        lab.kill(&b).await.unwrap();
    }
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_peer_is_dropped_after_the_timeout_and_rejoins() {
    let _serial = support::shared();
    let mut lab = lab();
    lab.start(&["a"], &[], &[]).await.unwrap();
    lab.start(&["b", "c"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, MESH).await.unwrap();
    let pid = lab.backend().pid("c").unwrap() as i32;
    // SAFETY: signals to our own child process.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    // c's sockets stay open but nothing comes from it: heartbeats time out (2 s in the lab).
    let wait_for_timeouts = Instant::now() + MESH;
    while !["a", "b"].iter().all(|p| lab.world().peer(p).unwrap().neighbours.len() == 1) {
        assert!(Instant::now() < wait_for_timeouts, "c was not dropped");
        lab.sleep(Duration::from_millis(20)).await.unwrap();
    }
    let downs: Vec<String> =
        lab.world().timeline.iter().filter(|m| m.kind == "down").map(|m| m.detail.clone()).collect();
    assert_eq!(downs, vec!["c (timeout)".to_string(), "c (timeout)".to_string()]);
    unsafe { libc::kill(pid, libc::SIGCONT) };
    lab.await_mesh(None, MESH).await.unwrap();
    lab.say("c", "back from the pause").await.unwrap();
    lab.await_delivery(MESH).await.unwrap();
    lab.shutdown().await;
}
