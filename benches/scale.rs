//! The scale benchmark: `cargo bench --bench scale` (or scripts/bench-scale), one row for each
//! of N = 32, 64, 128 and 256 peers (MESHLAB_SCALE_NS="32 64" picks others), each peer on its
//! own loopback address with the peer's default flags (MESHLAB_BENCH_TIMING="--timeout 10s"
//! changes timings), all started together through one seed.
//!
//! Columns: full mesh after the last peer listens; dials per pair (all peers' `/stats`); one line
//! at a time to all others, p50 and p99 over every showing; bytes on the wire per delivered line
//! in steady chat (all peers' bytes out over lines x receivers x a line's encoded size); a
//! 10,000-line burst from one peer, all shown once by all others, in lines a second; the whole
//! mesh's CPU at rest (the peer processes' CPU time as the scheduler counts it over 10 s, after
//! 5 s of quiet, and the host's busy time over the same 10 s, less its busy time over 5 s before
//! the peers started, which counts the kernel's own work for the mesh, such as keepalive probes);
//! links re-formed at rest (connections admitted over the same 10 s, by all peers' `/stats`,
//! halved: a link lost at rest is redialled at once and admitted at both ends); resident memory per peer (median and max). Nothing is asserted: it prints the figures.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use meshlab_lab::event::Stats;

#[path = "../tests/support/mod.rs"]
mod support;

const WITHIN: Duration = Duration::from_secs(300);

fn pct(v: &[Duration], p: f64) -> Duration {
    v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

/// CPU time of a process so far, in seconds, as the scheduler counts it (`/proc/PID/schedstat`,
/// in nanoseconds): the user and system times of `/proc/PID/stat` are sampled at the timer tick
/// and miss most of a peer's short wake-ups.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/schedstat")).unwrap_or_default();
    stat.split_whitespace().next().and_then(|ns| ns.parse::<f64>().ok()).unwrap_or(0.0) / 1e9
}

/// The host's busy CPU time so far, kernel included (softirqs: the kernel's keepalive probes of
/// every socket run there, not in the peers), in seconds.
fn host_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let cpu = stat.lines().next().unwrap_or_default();
    // user nice system idle iowait irq softirq steal
    let f: Vec<f64> = cpu.split_whitespace().skip(1).filter_map(|t| t.parse().ok()).collect();
    let busy = [0, 1, 2, 5, 6, 7].iter().filter_map(|i| f.get(*i)).sum::<f64>();
    // SAFETY: sysconf has no preconditions.
    busy / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The host's busy share of one core over `window`.
async fn host_busy_over(window: Duration) -> f64 {
    let before = host_busy_seconds();
    let t0 = Instant::now();
    tokio::time::sleep(window).await;
    (host_busy_seconds() - before) / t0.elapsed().as_secs_f64()
}

/// The encoded size of a one-line `lines` message carrying `text` (as a peer sends it).
fn encoded_line(text: &str) -> usize {
    let me = meshlab::identity::Identity::generate();
    let (batch, _) = support::client::signed_lines(&me, "n128", 0, meshlab::chain::genesis(&me.id()), &[text]);
    meshlab::frame::Message::Lines(batch).encode().len() + 4
}

async fn row(n: usize) {
    let baseline = host_busy_over(Duration::from_secs(5)).await;
    let mut lab = support::bench_lab();
    let (_, after_listen) = support::started_through_one_seed(&mut lab, n, WITHIN).await;
    let names = lab.world().running();
    let pairs = (n * (n - 1) / 2) as f64;
    let stats = lab.stats().await.unwrap();
    let dials = stats.values().map(|s| s.dials).sum::<u64>() as f64 / pairs;

    // At rest: five seconds of quiet, then ten measured.
    let pids: Vec<u32> = names.iter().filter_map(|p| lab.backend().pid(p)).collect();
    lab.sleep(Duration::from_secs(5)).await.unwrap();
    let admitted = |stats: BTreeMap<String, Stats>| stats.values().map(|s| s.admitted).sum::<u64>();
    let admitted_before = admitted(lab.stats().await.unwrap());
    let before: f64 = pids.iter().map(|p| cpu_seconds(*p)).sum();
    let host_before = host_busy_seconds();
    let t0 = Instant::now();
    lab.sleep(Duration::from_secs(10)).await.unwrap();
    let idle = (pids.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - before) / t0.elapsed().as_secs_f64();
    let host = (host_busy_seconds() - host_before) / t0.elapsed().as_secs_f64() - baseline;
    // Each link re-formed is admitted at both ends.
    let reformed = (admitted(lab.stats().await.unwrap()) - admitted_before) as f64 / 2.0 / t0.elapsed().as_secs_f64();
    let mut rss: Vec<u64> = pids.iter().map(|p| support::rss_kib(*p)).collect();
    rss.sort();

    // One line at a time, from peers across the mesh.
    for i in 0..20 {
        let from = &names[(i * 37) % names.len()];
        lab.say(from, &format!("one line {i}")).await.unwrap();
        lab.await_delivery(WITHIN).await.unwrap();
    }
    let (direct, _) = lab.world().latencies();

    // Steady chat: 200 lines, 20 a second, from peers across the mesh.
    let out_before: u64 = lab.stats().await.unwrap().values().map(|s| s.bytes_out).sum();
    let text = "steady chat line 000";
    for i in 0..200 {
        let from = names[(i * 53) % names.len()].clone();
        lab.say(&from, &format!("steady chat line {i:03}")).await.unwrap();
        lab.sleep(Duration::from_millis(50)).await.unwrap();
    }
    lab.await_delivery(WITHIN).await.unwrap();
    let out_after: u64 = lab.stats().await.unwrap().values().map(|s| s.bytes_out).sum();
    let per_line = (out_after - out_before) as f64 / (200.0 * (n - 1) as f64 * encoded_line(text) as f64);

    // A burst from one peer.
    let t0 = Instant::now();
    for i in 0..10_000 {
        lab.say("seed", &format!("burst line {i}")).await.unwrap();
    }
    let (_, d) = lab.await_delivery(WITHIN).await.unwrap();
    let burst = lab.last_event_at().saturating_duration_since(t0);
    assert_eq!(d.duplicated, 0);
    lab.shutdown().await;

    println!(
        "| {n} | {} | {dials:.2} | {} / {} | {per_line:.2} | {:.0} lines/s | {:.1}% ({:.1}%) | {reformed:.1} | {:.1} / {:.1} MiB |",
        ms(after_listen),
        ms(pct(&direct, 0.5)),
        ms(pct(&direct, 0.99)),
        10_000.0 / burst.as_secs_f64(),
        idle * 100.0,
        host * 100.0,
        rss[rss.len() / 2] as f64 / 1024.0,
        rss[rss.len() - 1] as f64 / 1024.0
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let ns: Vec<usize> = std::env::var("MESHLAB_SCALE_NS")
        .map(|v| v.split_whitespace().filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_else(|_| vec![32, 64, 128, 256]);
    println!("peer binary {}", support::bench_peer());
    if let Ok(timing) = std::env::var("MESHLAB_BENCH_TIMING") {
        println!("peer timing flags {timing}");
    }
    println!(
        "| peers | full mesh after the last listens | dials per pair | one line to all others, p50 / p99 | bytes on the wire per delivered line (steady chat) | 10,000-line burst to all others | whole mesh at rest, CPU of one core: the peers (the host, kernel included, less its own) | links re-formed at rest, a second | RSS per peer, median / max |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for n in ns {
        row(n).await;
    }
}
