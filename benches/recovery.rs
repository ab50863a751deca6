//! Figures for "nothing lost": catch-up after a partition heals, a restart with --state-dir,
//! a private mesh against an open one, and memory over a long run. Release build, loopback:
//! `cargo bench --bench recovery`. Times are read from the peers' events as the lab receives
//! them; medians over several runs. Nothing here asserts a time: it prints the figures.

use std::time::{Duration, Instant};

#[path = "../tests/support/mod.rs"]
mod support;

use meshlab_lab::Lab;
use meshlab_lab::backend::process::ProcessBackend;
use support::{names, rss_kib, six_peer_demo};

const WITHIN: Duration = Duration::from_secs(30);

fn new_lab() -> Lab<ProcessBackend> {
    Lab::new(ProcessBackend::new(support::bench_peer()))
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn rss_of(lab: &Lab<ProcessBackend>, name: &str) -> u64 {
    rss_kib(lab.backend().pid(name).unwrap())
}

/// The msg ids of the lines said since `from` (an index into the lab's ledger).
fn said_since(lab: &Lab<ProcessBackend>, from: usize) -> Vec<(String, String)> {
    lab.world().said()[from..].iter().map(|s| (s.origin_name.clone(), s.msg_id.clone())).collect()
}

/// 3|3 partition, each side says 10 lines, heal. Returns (heal to mesh re-formed, heal to the
/// last line shown across).
async fn catch_up_after_heal() -> (Duration, Duration) {
    let mut lab = new_lab();
    lab.start(&["p1"], &[], &[]).await.unwrap();
    lab.start(&["p2", "p3", "p4", "p5", "p6"], &["p1"], &[]).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    let left = names(&["p1", "p2", "p3"]);
    let right = names(&["p4", "p5", "p6"]);
    lab.partition(&[left.clone(), right.clone()]).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    let from = lab.world().said().len();
    for i in 0..10 {
        lab.say("p2", &format!("left {i}")).await.unwrap();
        lab.say("p5", &format!("right {i}")).await.unwrap();
    }
    lab.await_delivery(WITHIN).await.unwrap();
    let healed = Instant::now();
    lab.heal(None).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    let reformed = lab.last_event_at();
    lab.await_delivery(WITHIN).await.unwrap();
    let mut last = healed;
    for (sender, msg_id) in said_since(&lab, from) {
        let other_side = if left.contains(&sender) { &right } else { &left };
        for receiver in other_side {
            last = last.max(lab.world().shown_at(receiver, &msg_id).expect("shown across"));
        }
    }
    lab.shutdown().await;
    (reformed - healed, last - healed)
}

/// c (with --state-dir) is down for 10 s while the others say 20 lines; from its rejoining (its
/// first neighbour up) to the last missed line shown.
async fn state_dir_restart() -> Duration {
    let mut lab = new_lab();
    lab.start(&["a"], &[], &[]).await.unwrap();
    lab.keep_state("c");
    lab.start(&["b", "c"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    lab.kill("c").await.unwrap();
    let from = lab.world().said().len();
    let down = Instant::now();
    for i in 0..10 {
        lab.say("a", &format!("a while c is down {i}")).await.unwrap();
        lab.say("b", &format!("b while c is down {i}")).await.unwrap();
        lab.sleep(Duration::from_millis(900)).await.unwrap();
    }
    if let Some(rest) = (down + Duration::from_secs(10)).checked_duration_since(Instant::now()) {
        lab.sleep(rest).await.unwrap();
    }
    lab.restart("c").await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    lab.await_delivery(WITHIN).await.unwrap();
    let rejoined = lab.world().first_up("c").unwrap();
    let last =
        said_since(&lab, from).iter().map(|(_, id)| lab.world().shown_at("c", id).expect("caught up")).max().unwrap();
    lab.shutdown().await;
    last.saturating_duration_since(rejoined)
}

/// Six peers started together (a seed, then five at once through it): from the first spawn to
/// the full mesh.
async fn started_together(keyed: bool) -> Duration {
    let mut lab = new_lab();
    if keyed {
        lab.private_mesh();
    }
    let t0 = Instant::now();
    lab.start(&["p1"], &[], &[]).await.unwrap();
    lab.start(&["p2", "p3", "p4", "p5", "p6"], &["p1"], &[]).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    let took = lab.last_event_at() - t0;
    lab.shutdown().await;
    took
}

/// The six-peer demo's convergence after p6 listens, and the peers' memory, keyed or not.
async fn demo(keyed: bool) -> (Duration, u64) {
    let mut lab = new_lab();
    if keyed {
        lab.private_mesh();
    }
    let took = six_peer_demo(&mut lab).await;
    for p in ["p1", "p2", "p3", "p4", "p5", "p6"] {
        lab.say(p, "hello").await.unwrap();
    }
    lab.await_delivery(WITHIN).await.unwrap();
    let rss = ["p1", "p2", "p3", "p4", "p5", "p6"].iter().map(|p| rss_of(&lab, p)).max().unwrap();
    lab.shutdown().await;
    (took, rss)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut heals = Vec::new();
    for _ in 0..5 {
        heals.push(catch_up_after_heal().await);
    }
    let reformed = median(heals.iter().map(|h| h.0).collect());
    let across = median(heals.iter().map(|h| h.1).collect());
    let worst = heals.iter().map(|h| h.1.saturating_sub(h.0)).max().unwrap();
    println!(
        "3|3 partition healed: mesh re-formed {} after the heal, every line across {} after it (median of 5; the last line at most {} after the mesh re-formed)",
        ms(reformed),
        ms(across),
        ms(worst)
    );

    let restarts: Vec<Duration> = repeat(3, state_dir_restart).await;
    println!(
        "--state-dir peer back after 10 s down: every missed line shown {} after its first neighbour came up (median of 3; max {})",
        ms(median(restarts.clone())),
        ms(*restarts.iter().max().unwrap())
    );

    let (mut open_t, mut keyed_t) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        open_t.push(started_together(false).await);
        keyed_t.push(started_together(true).await);
    }
    let (o, k) = (median(open_t), median(keyed_t));
    println!(
        "six peers started together, first spawn to full mesh: open {}, private {} (x{:.2}; 10 runs each)",
        ms(o),
        ms(k),
        k.as_secs_f64() / o.as_secs_f64()
    );

    let (mut open, mut keyed, mut open_rss, mut keyed_rss) = (Vec::new(), Vec::new(), 0, 0);
    for _ in 0..10 {
        let (t, rss) = demo(false).await;
        open.push(t);
        open_rss = open_rss.max(rss);
        let (t, rss) = demo(true).await;
        keyed.push(t);
        keyed_rss = keyed_rss.max(rss);
    }
    let (o, k) = (median(open), median(keyed));
    println!(
        "six-peer demo, full mesh after the last peer (the bridge) listens: open {}, private {} (x{:.2}); most resident memory: open {open_rss} KiB, private {keyed_rss} KiB (10 runs each)",
        ms(o),
        ms(k),
        k.as_secs_f64() / o.as_secs_f64()
    );

    // Memory over a long run: one peer's resident memory as 100,000 lines go by, said as fast as
    // the talker takes them (so the listener's rate limit is lifted: this measures memory, not
    // the catch-up pace of lines over the limit).
    let mut lab = new_lab();
    let unlimited: Vec<String> = ["--line-rate", "1000000"].iter().map(|s| s.to_string()).collect();
    lab.start(&["talker"], &[], &[]).await.unwrap();
    lab.start(&["listener"], &["talker"], &unlimited).await.unwrap();
    lab.await_mesh(None, WITHIN).await.unwrap();
    let mut samples = Vec::new();
    for round in 1..=10 {
        for i in 0..10_000 {
            lab.say("talker", &format!("round {round} line {i}: some chat text of a usual length")).await.unwrap();
        }
        lab.await_delivery(Duration::from_secs(120)).await.unwrap();
        samples.push(format!("{}k: {} KiB", round * 10, rss_of(&lab, "listener")));
    }
    lab.shutdown().await;
    println!("listener's resident memory as lines go by (history bounded at 10,000 lines): {}", samples.join(", "));
}

/// Runs `f` `n` times, one after another.
async fn repeat<F, Fut>(n: usize, f: F) -> Vec<Duration>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Duration>,
{
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(f().await);
    }
    out
}
