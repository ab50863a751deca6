//! How soon a silent cut is noticed: `cargo bench --bench silent_cut` (as root). Three peers,
//! each in a network namespace of its own (the netns backend), with the peer's default timings;
//! the link between two of them is cut by packet filters in both namespaces, so neither peer is
//! told and no packet gets through, as after a pulled cable. The figure is the time from the cut
//! to the second of the two `peer_down` events, against the target of `--timeout` plus one
//! second. Medians over several cuts; nothing is asserted. `MESHLAB_CUT_TIMEOUT=10s` measures
//! with another `--timeout` (default 3s, the peer's).

use std::time::{Duration, Instant};

#[path = "../tests/support/mod.rs"]
mod support;

use meshlab_lab::Lab;
use meshlab_lab::backend::process::ProcessBackend;

const CUTS: usize = 7;

#[tokio::main]
async fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("the silent-cut benchmark needs root (network namespaces); nothing measured");
        return;
    }
    let timeout = std::env::var("MESHLAB_CUT_TIMEOUT").unwrap_or_else(|_| "3s".into());
    let limit =
        humantime::parse_duration(&timeout).expect("MESHLAB_CUT_TIMEOUT is a duration") + Duration::from_secs(1);
    let flags = ["--heartbeat", "1s", "--timeout", &timeout].map(String::from).to_vec();
    let mut lab = Lab::new(ProcessBackend::in_namespaces(support::bench_peer()).expect("netns backend"));
    lab.common_flags = flags;
    lab.start(&["a"], &[], &[]).await.unwrap();
    lab.start(&["b", "c"], &["a"], &[]).await.unwrap();
    let mut noticed = Vec::new();
    for round in 0..CUTS {
        lab.heal(None).await.unwrap();
        lab.await_mesh(None, Duration::from_secs(30)).await.unwrap();
        // Traffic before the cut, then quiet: the worst case waits out the keepalive time too.
        lab.say("a", &format!("before cut {round}")).await.unwrap();
        lab.await_delivery(Duration::from_secs(10)).await.unwrap();
        let downs_before = downs(&lab);
        let cut_at = Instant::now();
        lab.cut("a", "b", false).await.unwrap();
        lab.await_mesh(None, Duration::from_secs(30)).await.unwrap();
        let seen = downs(&lab) - downs_before;
        assert!(seen >= 2, "both sides noticed the cut");
        noticed.push(cut_at.elapsed());
    }
    lab.shutdown().await;
    let each: Vec<String> = noticed.iter().map(|d| format!("{:.0}", d.as_secs_f64() * 1000.0)).collect();
    println!("each cut, in ms: {}", each.join(", "));
    noticed.sort();
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    println!(
        "silent cut noticed by both sides (netns, --timeout {timeout}): median {}, max {} over {CUTS} cuts (target ≤ {})",
        ms(noticed[CUTS / 2]),
        ms(noticed[CUTS - 1]),
        ms(limit)
    );
}

fn downs(lab: &Lab<ProcessBackend>) -> usize {
    lab.world().timeline.iter().filter(|m| m.kind == "down").count()
}
