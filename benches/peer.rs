//! Figures for the peer's targets, measured on loopback through the lab (release build):
//! `cargo bench --bench peer`. Times are medians over several runs, read from the peers'
//! `--json` events as the lab receives them (the driver's own share is included, as in
//! ../shared/ANCHORS.md). Nothing here asserts a time: it prints the figures.

use std::time::{Duration, Instant};

#[path = "../tests/support/mod.rs"]
mod support;

use support::{rss_kib, six_peer_demo as demo};

const WITHIN: Duration = Duration::from_secs(30);

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn pct(v: &[Duration], p: f64) -> Duration {
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let names = ["p1", "p2", "p3", "p4", "p5", "p6"];
    println!(
        "peer binary {}: {} bytes",
        support::bench_peer(),
        std::fs::metadata(support::bench_peer()).unwrap().len()
    );
    if std::env::var("MESHLAB_BENCH_PEER").is_err() {
        crypto_rates();
    }

    // Start to listening, and the six-peer demo's convergence after the last peer listens.
    let (mut starts, mut meshes, mut kills, mut rss) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..10 {
        let mut lab = support::bench_lab();
        let t0 = Instant::now();
        lab.start(&["solo"], &[], &[]).await.unwrap();
        starts.push(lab.world().peer("solo").unwrap().listening_at.unwrap() - t0);
        lab.kill("solo").await.unwrap();
        meshes.push(demo(&mut lab).await);
        for n in names {
            lab.say(n, &format!("hello from {n}")).await.unwrap();
        }
        lab.await_delivery(WITHIN).await.unwrap();
        rss.extend(names.iter().map(|n| rss_kib(lab.backend().pid(n).unwrap())));
        let t0 = Instant::now();
        lab.kill("p3").await.unwrap();
        lab.await_mesh(None, WITHIN).await.unwrap();
        kills.push(lab.last_event_at().saturating_duration_since(t0));
        lab.shutdown().await;
    }
    println!("start to listening (median of 10): {}", ms(median(starts)));
    println!("six-peer demo, full mesh after the last peer listens (median of 10): {}", ms(median(meshes)));
    println!("SIGKILLed peer reported down by all five others (median of 10): {}", ms(median(kills)));
    rss.sort();
    println!(
        "resident memory per peer, six-peer mesh: median {} KiB, max {} KiB",
        rss[rss.len() / 2],
        rss[rss.len() - 1]
    );

    // 32 and 64 peers started together through one seed, each on its own loopback address.
    for (n, runs) in [(32, 5), (64, 5)] {
        let (mut from_spawn, mut from_listen) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            let mut lab = support::bench_lab();
            let (spawn, listen) = support::started_through_one_seed(&mut lab, n, WITHIN).await;
            from_spawn.push(spawn);
            from_listen.push(listen);
            lab.shutdown().await;
        }
        println!(
            "{n} peers started together through one seed: full mesh {} after the first spawn, {} after the last listens (medians of {runs})",
            ms(median(from_spawn)),
            ms(median(from_listen))
        );
    }

    // One line at a time: latency until shown by each of the five others, and by all five.
    let mut lab = support::bench_lab();
    demo(&mut lab).await;
    for i in 0..300 {
        lab.say("p1", &format!("ping {i}")).await.unwrap();
        lab.await_delivery(WITHIN).await.unwrap();
    }
    let (each, _) = lab.world().latencies();
    let all = lab.world().completion_times();
    println!(
        "one line at a time (300 lines): shown by each other peer p50 {} p99 {}; by all five p50 {} p99 {}",
        ms(pct(&each, 0.5)),
        ms(pct(&each, 0.99)),
        ms(pct(&all, 0.5)),
        ms(pct(&all, 0.99))
    );
    lab.shutdown().await;

    // 10,000 short lines as fast as stdin takes them, to five others.
    let mut bursts = Vec::new();
    for _ in 0..3 {
        let mut lab = support::bench_lab();
        demo(&mut lab).await;
        let t0 = Instant::now();
        for i in 0..10_000 {
            lab.say("p1", &format!("burst line {i}")).await.unwrap();
        }
        let (_, d) = lab.await_delivery(Duration::from_secs(120)).await.unwrap();
        assert_eq!((d.said, d.shown, d.duplicated), (10_000, 50_000, 0));
        bursts.push(lab.last_event_at().saturating_duration_since(t0));
        lab.shutdown().await;
    }
    println!("10,000 lines from one peer, all shown once by five others (median of 3): {}", ms(median(bursts)));
}

/// Signatures and verifications a second on one core (ed25519-dalek, 100-byte messages), the
/// median of five runs of 2,000 each; and a whole signed-hello handshake, both sides.
fn crypto_rates() {
    use meshlab::identity::{Domain, Identity, PublicKey};
    let me = Identity::generate();
    let key = PublicKey::of(&me.id()).unwrap();
    let msg = [7u8; 100];
    let sig = me.sign(Domain::Head, &[&msg]);
    let rate = |f: &dyn Fn()| {
        let mut runs: Vec<f64> = (0..5)
            .map(|_| {
                let t = Instant::now();
                for _ in 0..2000 {
                    f();
                }
                2000.0 / t.elapsed().as_secs_f64()
            })
            .collect();
        runs.sort_by(f64::total_cmp);
        runs[2]
    };
    let signs = rate(&|| {
        std::hint::black_box(me.sign(Domain::Head, &[&msg]));
    });
    let verifies = rate(&|| {
        assert!(key.verify(Domain::Head, &[&msg], &sig));
    });
    println!(
        "ed25519 on one core: {signs:.0} signatures/s ({:.1} us each), {verifies:.0} verifications/s ({:.1} us each)",
        1e6 / signs,
        1e6 / verifies
    );
}
