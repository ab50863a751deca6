//! The netns backend: shipped scenarios unchanged, cuts that are real packet drops, the root
//! check, and nothing left behind (after a pass, a failed check, a panic, or a dead lab).

mod support;

use std::path::Path;
use std::process::Command;

use meshlab_lab::Lab;
use meshlab_lab::backend::process::ProcessBackend;
use meshlab_lab::progress::Mode;
use meshlab_lab::runner::{self, Report, RunOptions};
use meshlab_lab::scenario::Scenario;

fn netns_lab(peer: impl Into<std::path::PathBuf>) -> Lab<ProcessBackend> {
    Lab::new(ProcessBackend::in_namespaces(peer).expect("the netns backend starts as root"))
}

async fn run_shipped_on_netns(name: &str, seed: Option<u64>, peer: &Path) -> Option<Report> {
    let _serial = support::exclusive();
    if !support::netns(name) {
        return None;
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("lab/scenarios/{name}.toml"));
    let scenario = Scenario::load(&path).unwrap();
    let mut lab = netns_lab(peer);
    let report = runner::run(&scenario, &mut lab, &RunOptions { progress: Mode::Plain, seed, history: None }).await;
    lab.shutdown().await;
    assert!(report.passed, "{name} failed on netns: {:#?}", report.failure);
    assert_eq!(report.backend, "netns");
    let d = &report.delivery;
    assert!(d.owed > 0 && d.shown == d.owed, "{d:?}");
    assert_eq!((d.duplicated, d.out_of_order, d.gapped), (0, 0, 0));
    assert_eq!(leftovers(), "", "after {name}");
    Some(report)
}

/// This process's namespaces and host rules.
fn leftovers() -> String {
    let mine = format!("meshlab-{}-", std::process::id());
    let mut found: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&mine))
        .collect();
    let rules = Command::new("iptables").args(["-S", "FORWARD"]).output().unwrap();
    found.extend(String::from_utf8_lossy(&rules.stdout).lines().filter(|l| l.contains(&mine)).map(String::from));
    found.join("\n")
}

const PEER: &str = env!("CARGO_BIN_EXE_peer");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_peer_demo_on_netns() {
    run_shipped_on_netns("six-peer-demo", None, Path::new(PEER)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_heal_on_netns() {
    run_shipped_on_netns("partition-heal", None, Path::new(PEER)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_netns() {
    run_shipped_on_netns("chaos", Some(7), Path::new(PEER)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_on_netns() {
    run_shipped_on_netns("lossy", None, Path::new(PEER)).await;
}

/// Loss and rate are the kernel's: counted in the peer's namespace, lifted by a heal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_conditions_are_real() {
    let _serial = support::exclusive();
    if !support::netns("netns_conditions_are_real") {
        return;
    }
    support::conditions_are_real(&mut netns_lab(PEER), |b, name| b.pid(name)).await;
    assert_eq!(leftovers(), "");
}

/// Delay and jitter through netem, where the kernel has it: a line across a delayed link takes
/// at least the delay (measured by the lab from the peers' own events).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the kernel's sch_netem, which this machine's kernel lacks (CONFIG_NET_SCH_NETEM unset): run with --ignored on a kernel that has it"]
async fn netns_delay_is_real() {
    let _serial = support::exclusive();
    assert!(meshlab_lab::backend::kernel_has_netem(), "this kernel has no netem: the test cannot run here");
    let mut lab = netns_lab(PEER);
    lab.start(&["a"], &[], &[]).await.unwrap();
    lab.start(&["b"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, std::time::Duration::from_secs(5)).await.unwrap();
    let late = meshlab_lab::link::Condition {
        delay: Some(std::time::Duration::from_millis(200)),
        jitter: Some(std::time::Duration::from_millis(20)),
        ..Default::default()
    };
    lab.condition(&support::names(&["a", "b"]), late, false).await.unwrap();
    lab.say("a", "late").await.unwrap();
    lab.await_delivery(std::time::Duration::from_secs(5)).await.unwrap();
    let (direct, _) = lab.world().latencies();
    assert!(direct[0] >= std::time::Duration::from_millis(180), "{direct:?}");
    lab.shutdown().await;
    assert_eq!(leftovers(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_on_netns() {
    run_shipped_on_netns("pause", None, Path::new(PEER)).await;
}

/// 256 namespaces, 32,640 connections: the release build of the peer, as on loopback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_fifty_six_on_netns() {
    if let Some(report) = run_shipped_on_netns("two-fifty-six", None, &support::release_peer()).await {
        assert_eq!(report.mesh.links.len(), 256 * 255 / 2);
    }
}

/// A cut is a packet filter in the namespaces, not the peers' hook: the peers see their link go
/// quiet and time out, as after a pulled cable, and chat goes around the cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_cuts_are_real_packet_drops() {
    let _serial = support::exclusive();
    if !support::netns("netns_cuts_are_real_packet_drops") {
        return;
    }
    support::cuts_are_real_packet_drops(&mut netns_lab(PEER)).await;
    assert_eq!(leftovers(), "");
}

/// A longer `--timeout` spaces the dialler's probes (after 3 s of quiet at 7 s) and the accepting
/// side's readings (every second, see meshlab::linkwatch::Cadence): a cut is still noticed by
/// both sides within the timeout and a second, and a live link at rest, probed every 3 s, is
/// not taken for cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_cut_at_a_long_timeout_is_noticed_within_it_and_a_second() {
    use std::time::Duration;
    let _serial = support::exclusive();
    if !support::netns("netns_cut_at_a_long_timeout_is_noticed_within_it_and_a_second") {
        return;
    }
    let mut lab = netns_lab(PEER);
    lab.common_flags = vec!["--timeout".into(), "7s".into()];
    // At rest for three probes; then the timeout and a second, and a second to spare.
    support::cut_is_noticed_by_both_sides(&mut lab, Duration::from_secs(10), Duration::from_secs(9)).await;
    lab.shutdown().await;
    assert_eq!(leftovers(), "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn netns_leaves_nothing_behind_after_a_failed_check_or_a_panic() {
    let _serial = support::exclusive();
    if !support::netns("netns_leaves_nothing_behind_after_a_failed_check_or_a_panic") {
        return;
    }
    // A check that fails (p1 accepts one connection only, so three peers cannot mesh): the
    // runner removes everything before it reports.
    let failing = "[[step]]\nstart = \"p1\"\nflags = [\"--max-conns\", \"1\"]\n[[step]]\nstart = [\"p2\", \"p3\"]\nvia = \"p1\"\n[[step]]\nawait = \"mesh\"\nwithin = \"500ms\"\n";
    let scenario = Scenario::parse("failing.toml", "failing", failing).unwrap();
    let mut lab = netns_lab(PEER);
    let report = runner::run(&scenario, &mut lab, &RunOptions::default()).await;
    assert!(!report.passed);
    assert_eq!(leftovers(), "", "after a failed check");
    // A test that panics while its peers run: the backend's drop removes everything.
    let outcome = std::thread::spawn(|| {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let mut lab = netns_lab(PEER);
            lab.start(&["a", "b"], &[], &[]).await.unwrap();
            panic!("a test fails while its peers run");
        })
    })
    .join();
    assert!(outcome.is_err());
    assert_eq!(leftovers(), "", "after a panic");
}
