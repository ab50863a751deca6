//! The lab: every shipped scenario on the process backend, tests written against the lab's
//! Rust API, bad scenario files, and checks that must fail.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use meshlab_lab::Lab;
use meshlab_lab::backend::Backend;
use meshlab_lab::backend::docker::{CutMethod, DockerBackend};
use meshlab_lab::backend::process::ProcessBackend;
use meshlab_lab::progress::Mode;
use meshlab_lab::runner::{self, Report, RunOptions};
use meshlab_lab::scenario::Scenario;

const SHIPPED: &[&str] = &[
    "six-peer-demo",
    "lossy",
    "partition-heal",
    "churn",
    "thirty-two",
    "sixty-four",
    "two-fifty-six",
    "chaos",
    "private-mesh",
    "pause",
];

fn scenarios_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("lab/scenarios")
}

fn process_lab() -> Lab<ProcessBackend> {
    Lab::new(ProcessBackend::new(env!("CARGO_BIN_EXE_peer")))
}

async fn run_text(text: &str) -> Report {
    let _serial = support::shared();
    let scenario = Scenario::parse("inline.toml", "inline", text).unwrap();
    runner::run(&scenario, &mut process_lab(), &RunOptions { progress: Mode::Plain, ..Default::default() }).await
}

async fn run_shipped_on<B: Backend>(name: &str, lab: &mut Lab<B>, seed: Option<u64>) -> Report {
    let scenario = Scenario::load(&scenarios_dir().join(format!("{name}.toml"))).unwrap();
    let report = runner::run(&scenario, lab, &RunOptions { progress: Mode::Plain, seed, history: None }).await;
    assert!(report.passed, "{name} failed on {}: {:#?}", report.backend, report.failure);
    let d = &report.delivery;
    assert!(d.owed > 0 && d.shown == d.owed, "{d:?}");
    assert_eq!((d.duplicated, d.out_of_order, d.gapped), (0, 0, 0));
    report
}

async fn run_shipped(name: &str) -> Report {
    let _serial = support::shared();
    run_shipped_on(name, &mut process_lab(), None).await
}

/// For the heaviest scenarios: nothing else runs meanwhile on the two cores.
async fn run_shipped_alone(name: &str, seed: Option<u64>) -> Report {
    run_alone_with(name, seed, process_lab()).await
}

async fn run_alone_with(name: &str, seed: Option<u64>, mut lab: Lab<ProcessBackend>) -> Report {
    let _serial = support::exclusive();
    let scenario = Scenario::load(&scenarios_dir().join(format!("{name}.toml"))).unwrap();
    let options = RunOptions { progress: Mode::Plain, seed, history: None };
    let report = runner::run(&scenario, &mut lab, &options).await;
    assert!(report.passed, "{name} failed: {:#?}", report.failure);
    let d = &report.delivery;
    assert!(d.owed > 0 && d.shown == d.owed, "{d:?}");
    assert_eq!((d.duplicated, d.out_of_order, d.gapped), (0, 0, 0));
    report
}

/// Runs a shipped scenario on containers, when a Docker engine is reachable.
async fn run_shipped_on_docker(name: &str, seed: Option<u64>) {
    let _serial = support::exclusive();
    if !support::docker(name) {
        return;
    }
    let backend = DockerBackend::connect(support::image()).await.unwrap();
    assert_eq!(backend.cut_method(), &CutMethod::PacketFilter, "CI runs as root with iptables: cuts must be real");
    let report = run_shipped_on(name, &mut Lab::new(backend), seed).await;
    assert_eq!(report.backend, "docker");
}

#[test]
fn every_scenario_file_is_run_by_a_test() {
    let mut files: Vec<String> = std::fs::read_dir(scenarios_dir())
        .unwrap()
        .filter_map(|e| Some(e.ok()?.path().file_stem()?.to_string_lossy().into_owned()))
        .collect();
    files.sort();
    let mut covered: Vec<String> = SHIPPED.iter().map(|s| s.to_string()).collect();
    covered.sort();
    assert_eq!(files, covered, "add a test for each scenario file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_peer_demo() {
    let report = run_shipped("six-peer-demo").await;
    // The demo's end: p1 and p2 killed, the four others still fully meshed.
    assert_eq!(report.mesh.links.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_heal() {
    let report = run_shipped("partition-heal").await;
    assert_eq!(report.mesh.links.len(), 15);
    assert!(report.latency_catch_up.count >= 18, "the split's 6 lines crossed to 3 peers each by catch-up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn() {
    run_shipped("churn").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two() {
    let report = run_shipped_alone("thirty-two", None).await;
    assert_eq!(report.mesh.links.len(), 32 * 31 / 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four() {
    let report = run_shipped_alone("sixty-four", None).await;
    assert_eq!(report.mesh.links.len(), 64 * 63 / 2);
}

/// 256 peers on two cores want the release build's speed (the tests' debug build cannot keep up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_fifty_six() {
    let lab = Lab::new(ProcessBackend::new(support::release_peer()));
    let report = run_alone_with("two-fifty-six", None, lab).await;
    assert_eq!(report.mesh.links.len(), 256 * 255 / 2);
}

/// A frozen peer (SIGSTOP) is dropped by the others' probes, and catches up once resumed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause() {
    let report = run_shipped("pause").await;
    let downs: Vec<&str> = report
        .timeline
        .iter()
        .filter(|m| m.kind == "down" && m.detail == "p3 (timeout)")
        .map(|m| m.peer.as_str())
        .collect();
    assert_eq!(downs.len(), 3, "p1, p2 and p4 each time the frozen p3 out: {downs:?}");
}

/// The same on containers (`docker pause`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_on_docker() {
    run_shipped_on_docker("pause", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_mesh() {
    run_shipped("private-mesh").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn private_mesh_on_docker() {
    run_shipped_on_docker("private-mesh", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos() {
    // A fixed seed, so that a failure here replays with `lab run lab/scenarios/chaos.toml --seed 11`.
    let report = run_shipped_alone("chaos", Some(11)).await;
    let record = report.steps.iter().find_map(|s| s.chaos.clone()).expect("the chaos step's record");
    assert_eq!(record.seed, 11);
    assert!(record.faults.len() >= 5 && record.lines == 100, "{} faults, {} lines", record.faults.len(), record.lines);
    assert_eq!(report.mesh.links.len(), 12 * 11 / 2);
}

/// On the process backend, conditions are cooperative: the peers hold back their own frames.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy() {
    run_shipped("lossy").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_on_docker() {
    run_shipped_on_docker("lossy", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_conditions_are_real() {
    let _serial = support::exclusive();
    if !support::docker("docker_conditions_are_real") {
        return;
    }
    let mut lab = Lab::new(DockerBackend::connect(support::image()).await.unwrap());
    support::conditions_are_real(&mut lab, |b, name| b.pid(name)).await;
    assert_eq!(docker_leftovers(), "", "after a pass");
}

/// Two peers alone, so that a line has one way to go: across a link the peers delay (the
/// process backend's cooperative conditions), a line takes at least the delay, which a p99
/// budget below it catches, naming the figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_link_delays_lines_and_a_p99_budget_catches_it() {
    let report = run_text(
        "[[step]]\nstart = \"a\"\n[[step]]\nstart = \"b\"\nvia = \"a\"\n[[step]]\nawait = \"mesh\"\n\
         [[step]]\ncondition = [\"a\", \"b\"]\ndelay = \"150ms\"\njitter = \"20ms\"\n\
         [[step]]\nsay = \"a\"\ntext = \"slow\"\ncount = 5\n[[step]]\nawait = \"delivery\"\np99 = \"50ms\"\n",
    )
    .await;
    let failure = report.failure.expect("the budget is below the delay");
    assert_eq!(failure.step, 6);
    assert!(
        failure.error.contains("direct showings' p99 at most 50ms") && failure.error.contains("over 5 showings"),
        "{}",
        failure.error
    );
    assert!(report.latency_direct.p50_ms >= 130.0, "{:?}", report.latency_direct);
    assert!(report.timeline.iter().any(|m| m.kind == "condition" && m.detail == "a <-> b: 150 ms ± 20 ms"));
}

/// A rate limit spaces frames out: a 1,000-byte line at 8 kbit/s needs a second on the wire.
/// (Much longer, and the receiver's probes would time the link out: at 8 kbit/s a 4,000-byte
/// line holds the link four seconds, twice the lab's `--timeout`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rate_limit_holds_a_long_line_back() {
    let long = "x".repeat(1000);
    let report = run_text(&format!(
        "[[step]]\nstart = \"a\"\n[[step]]\nstart = \"b\"\nvia = \"a\"\n[[step]]\nawait = \"mesh\"\n\
         [[step]]\ncondition = [\"a\", \"b\"]\nrate = \"8kbit\"\n[[step]]\nsay = \"a\"\ntext = \"{long}\"\n\
         [[step]]\nawait = \"delivery\"\nwithin = \"20s\"\n"
    ))
    .await;
    assert!(report.passed, "{:?}", report.failure);
    assert!(report.latency_direct.p50_ms >= 1000.0, "{:?}", report.latency_direct);
}

/// `for` undoes a step by itself: a cut held for a second heals while the next steps run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_held_for_a_while_heals_by_itself() {
    let report = run_text(
        "[[step]]\nstart = \"a\"\n[[step]]\nstart = [\"b\", \"c\"]\nvia = \"a\"\n[[step]]\nawait = \"mesh\"\n\
         [[step]]\ncut = [\"a\", \"b\"]\nfor = \"1s\"\n[[step]]\nawait = \"mesh\"\nwithin = \"500ms\"\nnote = \"apart\"\n\
         [[step]]\nsleep = \"1s\"\n[[step]]\nawait = \"mesh\"\nwithin = \"5s\"\nnote = \"together again\"\n",
    )
    .await;
    assert!(report.passed, "{:?}", report.failure);
    assert_eq!(report.mesh.links.len(), 3);
    assert!(report.mesh.cuts.is_empty());
    assert!(report.timeline.iter().any(|m| m.kind == "heal" && m.detail == "a -> b, b -> a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_docker() {
    run_shipped_on_docker("chaos", Some(12)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_during_a_split_never_claims_lines_are_gone() {
    let _serial = support::shared();
    // p3 meets p2 after p2 said five lines that p1 missed behind a cut: p3 never held them, so
    // it must not tell p1 they are lost; p1 gets them from p2 after the heal.
    let mut lab = process_lab();
    lab.start(&["p1"], &[], &[]).await.unwrap();
    lab.start(&["p2"], &["p1"], &[]).await.unwrap();
    lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
    lab.cut("p1", "p2", false).await.unwrap();
    lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
    lab.say("p2", "said while p1 was cut off").await.unwrap();
    for i in 2..=5 {
        lab.say("p2", &format!("and again, {i}")).await.unwrap();
    }
    lab.start(&["p3"], &["p2", "p1"], &[]).await.unwrap();
    lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
    lab.heal(None).await.unwrap();
    lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
    let (_, d) = lab.await_delivery(Duration::from_secs(5)).await.unwrap();
    assert_eq!((d.gapped, d.shown), (0, 5), "p1 shows all five lines; p3 was not owed them");
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_with_a_state_dir_comes_back_as_itself_and_catches_up_once() {
    let _serial = support::shared();
    let mut lab = process_lab();
    lab.start(&["a"], &[], &[]).await.unwrap();
    lab.keep_state("c");
    lab.start(&["b", "c"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
    lab.say("c", "before the crash").await.unwrap();
    lab.say("a", "c saw this one").await.unwrap();
    lab.await_delivery(Duration::from_secs(5)).await.unwrap();
    let id = lab.world().peer("c").unwrap().id.clone();

    lab.kill("c").await.unwrap();
    for i in 1..=5 {
        lab.say("a", &format!("said while c was down, {i}")).await.unwrap();
        lab.say("b", &format!("b too, {i}")).await.unwrap();
    }
    lab.await_delivery(Duration::from_secs(5)).await.unwrap();
    lab.restart("c").await.unwrap();
    assert_eq!(lab.world().peer("c").unwrap().id, id, "the same member");
    lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
    lab.say("c", "back").await.unwrap();
    let (_, d) = lab.await_delivery(Duration::from_secs(5)).await.unwrap();
    // c owes nothing twice (the world fails at once on a duplicate) and missed nothing.
    assert_eq!((d.lost, d.duplicated, d.gapped), (0, 0, 0));
    let seqs: Vec<u64> = lab.world().said().iter().filter(|s| Some(&s.origin) == id.as_ref()).map(|s| s.seq).collect();
    assert_eq!(seqs, vec![1, 2], "c's sequence numbers continue across the restart");
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_dir_peer_killed_right_after_meeting_remembers_whom_it_met() {
    let _serial = support::shared();
    let mut lab = process_lab();
    lab.start(&["a"], &[], &[]).await.unwrap();
    lab.keep_state("c");
    for round in 0..5 {
        // Killed as soon as it has shown its neighbours up: lines said since are still owed.
        // (Later rounds first let c show what it caught up on: a kill in the microseconds
        // between recording a line as shown and printing it would hide that line for good.)
        if round == 0 {
            lab.start(&["b", "c"], &["a"], &[]).await.unwrap();
            lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
        } else {
            lab.restart("c").await.unwrap();
            lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
            lab.await_delivery(Duration::from_secs(5)).await.unwrap();
        }
        lab.kill("c").await.unwrap();
        lab.say("a", &format!("a, round {round}")).await.unwrap();
        lab.say("b", &format!("b, round {round}")).await.unwrap();
    }
    lab.restart("c").await.unwrap();
    lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
    let (_, d) = lab.await_delivery(Duration::from_secs(5)).await.unwrap();
    assert_eq!(d.per_receiver["c"].shown, 10, "c caught up on all ten lines, once each");
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_said_alone_before_a_crash_is_delivered_after_the_restart() {
    let _serial = support::shared();
    let mut lab = process_lab();
    for name in ["a", "b", "c"] {
        lab.keep_state(name);
    }
    lab.start(&["a"], &[], &[]).await.unwrap();
    lab.start(&["b", "c"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
    lab.kill("a").await.unwrap();
    lab.kill("b").await.unwrap();
    lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
    lab.say("c", "said with nobody around").await.unwrap();
    lab.await_delivery(Duration::from_secs(5)).await.unwrap(); // c confirmed it: it counts as said
    lab.kill("c").await.unwrap();
    lab.restart("a").await.unwrap();
    lab.restart("b").await.unwrap();
    lab.restart("c").await.unwrap();
    lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
    let (_, d) = lab.await_delivery(Duration::from_secs(5)).await.unwrap();
    assert_eq!((d.owed, d.shown), (2, 2), "a and b show c's line once each");
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rust_api_reads_like_the_experiment() {
    let _serial = support::shared();
    let mut lab = process_lab();
    lab.start(&["a"], &[], &[]).await.unwrap();
    lab.start(&["b", "c", "d"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
    lab.cut("a", "b", false).await.unwrap();
    lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
    assert!(!lab.peers_of("a").await.unwrap().contains(&"b".to_string()));
    // a and b are cut from each other, but lines between them still arrive through c and d.
    lab.say("a", "to b, around the cut").await.unwrap();
    lab.say("b", "to a, around the cut").await.unwrap();
    let (_, d) = lab.await_delivery(Duration::from_secs(5)).await.unwrap();
    assert_eq!(d.shown, 6);
    lab.heal(None).await.unwrap();
    lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
    let pids: Vec<u32> = ["a", "b", "c", "d"].iter().map(|n| lab.backend().pid(n).unwrap()).collect();
    lab.shutdown().await;
    for pid in pids {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(state.is_empty() || state.contains(") Z "), "peer {pid} outlived shutdown");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_one_way_cut_ends_with_the_pair_apart() {
    let _serial = support::shared();
    let mut lab = process_lab();
    lab.start(&["a"], &[], &[]).await.unwrap();
    lab.start(&["b", "c"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
    lab.cut("a", "b", true).await.unwrap();
    lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
    lab.say("a", "a to b, one way cut").await.unwrap();
    lab.await_delivery(Duration::from_secs(5)).await.unwrap();
    lab.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mesh_check_that_should_fail_does_fail() {
    // p2 is started with a cut the lab does not know about: it can never mesh with p1.
    let report = run_text(
        r#"
        [[step]]
        start = "p1"

        [[step]]
        start = "p2"
        via = "p1"
        flags = ["--lab-cut", "p1"]

        [[step]]
        await = "mesh"
        within = "500ms"

        [[step]]
        say = "p1"
        text = "never reached"
        "#,
    )
    .await;
    assert!(!report.passed);
    let failure = report.failure.unwrap();
    assert_eq!((failure.step, failure.line), (3, 10));
    // p1 may hold p2 for an instant at each redial (p2 refuses only after the hello), so either
    // side may be the one reported.
    let apart = ["p1 is not connected to p2", "p2 is not connected to p1"];
    assert!(apart.iter().any(|a| failure.error.contains(a)), "{}", failure.error);
    assert_eq!(report.steps.len(), 3, "the run stops at the failed step");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_check_that_should_fail_does_fail() {
    let _serial = support::shared();
    let mut lab = process_lab();
    lab.start(&["p1"], &[], &[]).await.unwrap();
    lab.start(&["p2", "p3"], &["p1"], &[]).await.unwrap();
    lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
    // Behind the lab's back, p3 drops everything from p1 and p2: the lab still owes it p1's line.
    lab.command("p3", "/lab cut p1 in").await.unwrap();
    lab.command("p3", "/lab cut p2 in").await.unwrap();
    lab.peers_of("p3").await.unwrap(); // answered after both cuts are in force
    lab.say("p1", "p3 never shows this").await.unwrap();
    let err = lab.await_delivery(Duration::from_millis(800)).await.unwrap_err().to_string();
    assert!(err.contains("p3 has not shown p1's line 1 \"p3 never shows this\""), "{err}");
    lab.shutdown().await;
}

/// The report renders in a real browser (headless Chromium): every figure is there, drawn,
/// and nothing is wider than the window; each figure is also an SVG file of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_renders_in_a_headless_browser() {
    let _serial = support::shared();
    let dir = std::env::temp_dir().join(format!("meshlab-report-{}", std::process::id()));
    let scenario = Scenario::load(&scenarios_dir().join("partition-heal.toml")).unwrap();
    let report = runner::run(&scenario, &mut process_lab(), &RunOptions::default()).await;
    assert!(report.passed, "{:?}", report.failure);
    meshlab_lab::report::write(&dir, &report).unwrap();
    let figures = ["timeline", "latency", "cdf", "rate", "connections", "mesh"];
    for f in figures {
        let svg = std::fs::read_to_string(dir.join("figures").join(format!("{f}.svg"))).unwrap();
        assert!(svg.starts_with("<svg") && svg.contains("</svg>"), "{f}.svg is an SVG of its own");
    }
    let page = format!("file://{}", dir.join("report.html").display());
    let chromium = |args: &[&str]| {
        let out = std::process::Command::new("chromium")
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,2000"])
            .args(args)
            .arg(&page)
            .output()
            .expect("chromium renders the report in this test: install it (.ci/run does: apt-get install chromium)");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        out
    };
    let dom = String::from_utf8(chromium(&["--dump-dom"]).stdout).unwrap();
    for f in figures {
        assert!(dom.contains(&format!("<figure id=\"{f}\">")), "figure {f} is on the page");
    }
    assert!(dom.matches("<svg").count() >= figures.len(), "every figure is drawn");
    assert!(dom.contains("data-overflow=\"false\""), "nothing is wider than the window");
    let shot = dir.join("shot.png");
    chromium(&[&format!("--screenshot={}", shot.display())]);
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "a screenshot with something on it");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A frozen receiver misses a line held by one peer; a later line is held by a newcomer that
/// met the sender after the first; the sender and the first line's holder die. The receiver,
/// resumed, cannot show the second line without the first (and nobody may declare the first
/// gone but its dead sender): it is not owed, and the run passes. (Found by a chaos soak: the
/// lab used to count such lines as lost.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lines_behind_a_hole_nobody_can_fill_are_not_owed() {
    let report = run_text(HOLE).await;
    assert!(report.passed, "{:?}", report.failure);
    assert_eq!(report.delivery.lost, 0);
}

const HOLE: &str = r#"[[step]]
start = "h"

[[step]]
start = ["s", "r"]
via = "h"

[[step]]
await = "mesh"
within = "5s"

[[step]]
pause = "r"

[[step]]
await = "mesh"
within = "15s"
note = "r timed out by the others"

[[step]]
say = "s"
text = "one"

[[step]]
await = "delivery"
within = "5s"

[[step]]
start = "n"
via = ["h", "r"]
note = "n also dials the frozen r, and keeps redialling it"

[[step]]
await = "mesh"
within = "5s"

[[step]]
say = "s"
text = "two"

[[step]]
await = "delivery"
within = "5s"

[[step]]
kill = ["s", "h"]

[[step]]
resume = "r"

[[step]]
await = "mesh"
within = "15s"

[[step]]
await = "delivery"
within = "10s"
note = "r is owed 'two' (n holds it) but cannot show it without 'one'"
"#;

/// The shape of report.json (its fields and their types, every array reduced to its first
/// item), the contract programs read: a change to it shows here.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn report_json_keeps_its_shape() {
    let report = run_text(
        "[[step]]\nstart = \"a\"\n[[step]]\nstart = \"b\"\nvia = \"a\"\n[[step]]\nawait = \"mesh\"\n\
         [[step]]\nsay = \"a\"\ntext = \"hi\"\n[[step]]\nawait = \"delivery\"\np99 = \"10s\"\n\
         [[step]]\nchaos = \"300ms\"\nseed = 3\nevery = \"100ms\"\nfaults = [\"cut\", \"heal\"]\n[[step]]\nawait = \"mesh\"\n[[step]]\nawait = \"delivery\"\n",
    )
    .await;
    assert!(report.passed, "{:?}", report.failure);
    fn shape(v: &serde_json::Value) -> serde_json::Value {
        use serde_json::Value;
        match v {
            Value::Object(m) => Value::Object(m.iter().map(|(k, v)| (k.clone(), shape(v))).collect()),
            Value::Array(a) => Value::Array(a.first().map(shape).into_iter().collect()),
            Value::String(_) => "string".into(),
            Value::Number(_) => "number".into(),
            Value::Bool(_) => "bool".into(),
            Value::Null => "null".into(),
        }
    }
    let mut json = serde_json::to_value(&report).unwrap();
    // Per-receiver and fault tables are keyed by names and kinds: one entry shows their shape.
    for table in ["/delivery/per_receiver", "/steps/5/chaos/applied"] {
        if let Some(serde_json::Value::Object(m)) = json.pointer_mut(table) {
            let first = m.iter().next().map(|(_, v)| v.clone());
            m.clear();
            m.extend(first.map(|v| ("NAME".to_string(), v)));
        }
    }
    insta::assert_snapshot!(serde_json::to_string_pretty(&shape(&json)).unwrap());
}

/// The delivery checker is a function of the recorded history: replayed from events.jsonl
/// alone, a run gives the verdict and figures it gave live, failed or passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_replays_to_the_runs_verdict() {
    let _serial = support::shared();
    let dir = std::env::temp_dir().join(format!("meshlab-history-{}", std::process::id()));
    let history = dir.join("events.jsonl");
    let scenario = Scenario::load(&scenarios_dir().join("partition-heal.toml")).unwrap();
    let options = RunOptions { progress: Mode::Plain, history: Some(history.clone()), ..Default::default() };
    let report = runner::run(&scenario, &mut process_lab(), &options).await;
    assert!(report.passed, "{:?}", report.failure);
    let replayed = meshlab_lab::history::replay(&history).unwrap();
    let again = replayed.world.delivery(&replayed.cuts);
    let figures = |d: &meshlab_lab::world::Delivery| (d.said, d.owed, d.shown, d.lost, d.duplicated, d.out_of_order);
    assert!(again.complete());
    assert_eq!(figures(&again), figures(&report.delivery));
    assert_eq!(replayed.world.timeline.len(), report.timeline.len(), "the same timeline");
    assert_eq!(replayed.world.latencies().0.len(), report.latency_direct.count);

    // A run that loses a line (p3 drops everything behind the lab's back) replays to a failure.
    let mut lab = process_lab();
    lab.journal_to(&dir.join("lost.jsonl"), "lost").unwrap();
    lab.start(&["p1"], &[], &[]).await.unwrap();
    lab.start(&["p2", "p3"], &["p1"], &[]).await.unwrap();
    lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
    lab.command("p3", "/lab cut p1 in").await.unwrap();
    lab.command("p3", "/lab cut p2 in").await.unwrap();
    lab.peers_of("p3").await.unwrap();
    lab.say("p1", "p3 never shows this").await.unwrap();
    assert!(lab.await_delivery(Duration::from_millis(800)).await.is_err());
    let live = lab.world().delivery(lab.cuts());
    lab.end_journal();
    lab.shutdown().await;
    let replayed = meshlab_lab::history::replay(&dir.join("lost.jsonl")).unwrap();
    let again = replayed.world.delivery(&replayed.cuts);
    assert!(!again.complete());
    assert_eq!(figures(&again), figures(&live));
    assert_eq!(again.lost_examples, live.lost_examples);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_overall_timeout_stops_a_run() {
    let report = run_text("timeout = \"300ms\"\n[[step]]\nstart = \"a\"\n[[step]]\nsleep = \"5s\"\n").await;
    let failure = report.failure.unwrap();
    assert_eq!(failure.step, 2);
    assert!(failure.error.contains("did not finish within its timeout"), "{}", failure.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_peer_demo_on_docker() {
    run_shipped_on_docker("six-peer-demo", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_heal_on_docker() {
    run_shipped_on_docker("partition-heal", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn churn_on_docker() {
    run_shipped_on_docker("churn", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_on_docker() {
    run_shipped_on_docker("sixty-four", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_cuts_are_real_packet_drops_and_leave_nothing_behind() {
    let _serial = support::exclusive();
    if !support::docker("docker_cuts_are_real_packet_drops_and_leave_nothing_behind") {
        return;
    }
    let mut lab = Lab::new(DockerBackend::connect(support::image()).await.unwrap());
    support::cuts_are_real_packet_drops(&mut lab).await;
    assert_eq!(docker_leftovers(), "", "after a pass");
}

/// Containers and networks this test process's labs still own.
fn docker_leftovers() -> String {
    let owner = format!("label=meshlab.lab.owner={}", std::process::id());
    let ps =
        std::process::Command::new("docker").args(["ps", "--all", "--quiet", "--filter", &owner]).output().unwrap();
    let nets =
        std::process::Command::new("docker").args(["network", "ls", "--quiet", "--filter", &owner]).output().unwrap();
    String::from_utf8_lossy(&ps.stdout).into_owned() + &String::from_utf8_lossy(&nets.stdout)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_leaves_nothing_behind_after_a_failed_check_or_a_panic() {
    let _serial = support::exclusive();
    if !support::docker("docker_leaves_nothing_behind_after_a_failed_check_or_a_panic") {
        return;
    }
    let image = support::image();
    // A check that fails: p1 accepts one connection only, so three peers cannot mesh.
    let scenario = Scenario::parse(
        "t.toml",
        "t",
        "[[step]]\nstart = \"p1\"\nflags = [\"--max-conns\", \"1\"]\n[[step]]\nstart = [\"p2\", \"p3\"]\nvia = \"p1\"\n[[step]]\nawait = \"mesh\"\nwithin = \"500ms\"\n",
    )
    .unwrap();
    let mut lab = Lab::new(DockerBackend::connect(image).await.unwrap());
    let report = runner::run(&scenario, &mut lab, &RunOptions::default()).await;
    assert!(!report.passed);
    assert_eq!(docker_leftovers(), "", "after a failed check");
    // A test that panics while its containers run.
    let outcome = std::thread::spawn(move || {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let mut lab = Lab::new(DockerBackend::connect(image).await.unwrap());
            lab.start(&["a", "b"], &[], &[]).await.unwrap();
            panic!("a test fails while its containers run");
        })
    })
    .join();
    assert!(outcome.is_err());
    assert_eq!(docker_leftovers(), "", "after a panic");
}

#[test]
fn bad_scenario_files_give_a_clear_error_naming_the_line() {
    let cases = [
        ("[[step]]\nstart = \"a\"\n[[step]]\nteleport = \"a\"\n", "inline.toml:4: unknown field `teleport`"),
        ("[[step]]\nstart = \"a\"\n[[step]]\nkill = \"zed\"\n", "inline.toml:3: unknown peer \"zed\""),
        ("[[step]]\nstart = \"a\"\n[[step\n", "inline.toml:3: "),
        ("[[step]]\nstart = \"a\"\nsay = \"a\"\n", "inline.toml:1: a step has one verb, this one has start and say"),
    ];
    for (text, expected) in cases {
        let e = Scenario::parse("inline.toml", "inline", text).unwrap_err().to_string();
        assert!(e.starts_with(expected), "{e:?} does not start with {expected:?}");
    }
}
