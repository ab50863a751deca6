//! Shared by the test files that use Docker or are timing-sensitive.
//!
//! Docker tests never run at the same time as each other or as timing-sensitive tests: they
//! hold an exclusive lock, timing-sensitive tests a shared one (a `flock` on one file, so the
//! rule holds across test binaries and test runners). Before the first Docker test of a run, the
//! image is built from the current tree, so no test ever runs a stale image.

#![allow(dead_code)] // each test file uses its own part of this module

pub mod client;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

/// Held for the duration of a test.
pub struct Serial(File);

fn lock(kind: i32) -> Serial {
    let file = File::create(std::env::temp_dir().join("meshlab-tests.lock")).expect("lock file");
    // SAFETY: flock on a file descriptor we own; released when the file is closed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), kind) };
    assert_eq!(rc, 0, "cannot lock the test lock file");
    Serial(file)
}

/// For a test that uses Docker: no other Docker or timing-sensitive test runs meanwhile.
pub fn exclusive() -> Serial {
    lock(libc::LOCK_EX)
}

/// For a timing-sensitive test: may run beside others like it, never beside a Docker test.
pub fn shared() -> Serial {
    lock(libc::LOCK_SH)
}

fn engine_reachable() -> bool {
    Command::new("docker").arg("info").output().is_ok_and(|o| o.status.success())
}

/// Whether Docker tests should run. Without a reachable engine they report themselves skipped,
/// unless LAB_REQUIRE_DOCKER=1 (set by .ci/run wherever an engine exists), which makes a missing
/// engine a failure.
pub fn docker(test: &str) -> bool {
    if engine_reachable() {
        return true;
    }
    if std::env::var("LAB_REQUIRE_DOCKER").is_ok_and(|v| v == "1") {
        panic!("{test}: LAB_REQUIRE_DOCKER=1 but no Docker engine is reachable");
    }
    eprintln!("SKIPPED {test}: no Docker engine reachable (set LAB_REQUIRE_DOCKER=1 to make this a failure)");
    false
}

/// Whether netns tests should run: they need root. Without it they report themselves skipped,
/// unless LAB_REQUIRE_NETNS=1 (set by .ci/run, which runs as root), which makes it a failure.
pub fn netns(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("LAB_REQUIRE_NETNS").is_ok_and(|v| v == "1") {
        panic!("{test}: LAB_REQUIRE_NETNS=1 but the tests do not run as root");
    }
    eprintln!("SKIPPED {test}: the netns backend needs root (set LAB_REQUIRE_NETNS=1 to make this a failure)");
    false
}

/// Builds the peer image from the current tree, once per test binary.
pub fn image() -> &'static str {
    static BUILT: OnceLock<Result<(), String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/build-image");
        let out = Command::new(script).output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
        }
    });
    if let Err(e) = built {
        panic!("scripts/build-image failed:\n{e}");
    }
    meshlab_lab::backend::docker::DEFAULT_IMAGE
}

/// A single-node swarm for the length of a test: this engine's own if it is already a manager,
/// else one made with `docker swarm init` and left when dropped, with the gateway bridge the
/// swarm made, so that the engine is left as the test found it. Hold [`exclusive`] while it lives.
pub struct Swarm {
    made: bool,
    bridge_was_there: bool,
}

impl Swarm {
    pub fn join() -> Swarm {
        let state = docker_text(&["info", "--format", "{{.Swarm.LocalNodeState}} {{.Swarm.ControlAvailable}}"]);
        let bridge_was_there =
            !docker_text(&["network", "ls", "--quiet", "--filter", "name=^docker_gwbridge$"]).is_empty();
        match state.as_str() {
            "active true" => Swarm { made: false, bridge_was_there },
            "inactive false" => {
                let out = Command::new("docker")
                    .args(["swarm", "init", "--advertise-addr", "127.0.0.1"])
                    .output()
                    .expect("docker swarm init");
                assert!(out.status.success(), "docker swarm init: {}", String::from_utf8_lossy(&out.stderr));
                Swarm { made: true, bridge_was_there }
            }
            other => panic!("this engine is in a swarm it does not manage ({other}): the swarm tests need a manager"),
        }
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        if !self.made {
            return;
        }
        let _ = Command::new("docker").args(["swarm", "leave", "--force"]).output();
        if !self.bridge_was_there {
            let _ = Command::new("docker").args(["network", "rm", "docker_gwbridge"]).output();
        }
    }
}

/// What a docker command prints, trimmed ("" when it fails).
pub fn docker_text(args: &[&str]) -> String {
    let out = Command::new("docker").args(args).output().expect("docker");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `docker compose` where it exists, else `docker-compose`.
pub fn compose() -> Command {
    let v2 = Command::new("docker").args(["compose", "version"]).output().is_ok_and(|o| o.status.success());
    if v2 {
        let mut c = Command::new("docker");
        c.arg("compose");
        c
    } else {
        Command::new("docker-compose")
    }
}

/// Lines from a child's output with a deadline on each: a peer that goes quiet fails the test
/// instead of hanging it.
pub struct TimedLines {
    lines: std::sync::mpsc::Receiver<String>,
}

/// How long a test waits for the next line before failing.
pub const LINE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

impl TimedLines {
    pub fn new(source: impl std::io::Read + Send + 'static) -> TimedLines {
        use std::io::BufRead;
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(source).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        TimedLines { lines }
    }

    /// The next line if one comes within `wait` (None when it does not, or the output ended).
    pub fn next_within(&self, wait: std::time::Duration) -> Option<String> {
        self.lines.recv_timeout(wait).ok()
    }

    /// The next line; fails the test if none comes within the deadline or the output ends.
    pub fn next(&self) -> String {
        match self.lines.recv_timeout(LINE_DEADLINE) {
            Ok(line) => line,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("no output within {LINE_DEADLINE:?}"),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("the output ended"),
        }
    }
}

/// A loopback address of a test's own (127.x.y.z), so that tests running side by side never
/// reach each other's peers.
pub fn loopback() -> String {
    use std::hash::{BuildHasher, Hasher};
    let r = std::collections::hash_map::RandomState::new().build_hasher().finish().to_le_bytes();
    format!("127.{}.{}.{}", r[0].max(1), r[1], r[2].clamp(2, 254))
}

/// Peer names as owned strings.
pub fn names(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// The report's demo: 1 alone; 2 and 3 join through 1; 4 and 5 apart; 6 bridges 1 and 4.
/// Returns the time from 6 listening to the full mesh.
pub async fn six_peer_demo<B: meshlab_lab::backend::Backend>(lab: &mut meshlab_lab::Lab<B>) -> std::time::Duration {
    let within = std::time::Duration::from_secs(30);
    lab.start(&["p1"], &[], &[]).await.unwrap();
    lab.start(&["p2", "p3"], &["p1"], &[]).await.unwrap();
    lab.start(&["p4"], &[], &[]).await.unwrap();
    lab.start(&["p5"], &["p4"], &[]).await.unwrap();
    lab.await_mesh(Some(&names(&["p1", "p2", "p3"])), within).await.unwrap();
    lab.await_mesh(Some(&names(&["p4", "p5"])), within).await.unwrap();
    lab.start(&["p6"], &["p1", "p4"], &[]).await.unwrap();
    lab.await_mesh(None, within).await.unwrap();
    let listened = lab.world().peer("p6").unwrap().listening_at.unwrap();
    lab.last_event_at().saturating_duration_since(listened)
}

/// A release build of the peer, for tests that need its speed (hundreds of peers on two
/// cores): MESHLAB_RELEASE_PEER when set (.ci/run points it at the one its quick start built from
/// the same tree), else this tree's, built once per test binary.
pub fn release_peer() -> std::path::PathBuf {
    static BUILT: OnceLock<std::path::PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            if let Ok(path) = std::env::var("MESHLAB_RELEASE_PEER") {
                return path.into();
            }
            let root = Path::new(env!("CARGO_MANIFEST_DIR"));
            let out = Command::new(env!("CARGO"))
                .args(["build", "--release", "--locked", "--bin", "peer"])
                .current_dir(root)
                .output()
                .expect("cargo runs");
            assert!(out.status.success(), "cargo build --release failed:\n{}", String::from_utf8_lossy(&out.stderr));
            let target = std::env::var("CARGO_TARGET_DIR").map_or_else(|_| root.join("target"), Into::into);
            target.join("release/peer")
        })
        .clone()
}

/// The peer binary a benchmark measures: this tree's, or another build's given in
/// MESHLAB_BENCH_PEER (to compare two builds on the same machine, on the same day).
pub fn bench_peer() -> String {
    std::env::var("MESHLAB_BENCH_PEER").unwrap_or_else(|_| env!("CARGO_BIN_EXE_peer").to_string())
}

/// A lab for benchmarks: the peer binary under test (`bench_peer`), run with the peer's own
/// default timings instead of the lab's faster ones, which would flatter the figures. The
/// defaults are read from the peer's command-line definition, so they cannot drift from it;
/// MESHLAB_BENCH_TIMING overrides some of them (`--timeout 10s`, say).
pub fn bench_lab() -> meshlab_lab::Lab<meshlab_lab::backend::process::ProcessBackend> {
    use clap::Parser;
    let timing = std::env::var("MESHLAB_BENCH_TIMING").unwrap_or_default();
    let args = std::iter::once("peer").chain(timing.split_whitespace());
    let c = meshlab::config::Cli::try_parse_from(args).expect("MESHLAB_BENCH_TIMING holds peer timing flags").config;
    let defaults = [
        ("--heartbeat", c.heartbeat),
        ("--timeout", c.timeout),
        ("--redial-max", c.redial_max),
        ("--sync-interval", c.sync_interval),
        ("--handshake-timeout", c.handshake_timeout),
    ];
    let mut lab = meshlab_lab::Lab::new(meshlab_lab::backend::process::ProcessBackend::new(bench_peer()));
    for (flag, _) in meshlab_lab::backend::LAB_TIMING {
        let (_, value) = defaults.iter().find(|(f, _)| f == flag).expect("every lab timing has a peer default here");
        lab.common_flags.extend([flag.to_string(), humantime::format_duration(*value).to_string()]);
    }
    lab
}

/// From the first spawn, and from the last peer listening, to the full mesh of `n` peers
/// started together through one seed, each on its own loopback address.
pub async fn started_through_one_seed(
    lab: &mut meshlab_lab::Lab<meshlab_lab::backend::process::ProcessBackend>,
    n: usize,
    within: std::time::Duration,
) -> (std::time::Duration, std::time::Duration) {
    let t0 = std::time::Instant::now();
    lab.start(&["seed"], &[], &[]).await.unwrap();
    let others: Vec<String> = (1..n).map(|i| format!("n{i:03}")).collect();
    let refs: Vec<&str> = others.iter().map(String::as_str).collect();
    lab.start(&refs, &["seed"], &[]).await.unwrap();
    lab.await_mesh(None, within).await.unwrap();
    let last_listen = lab.world().names().filter_map(|p| lab.world().peer(p)?.listening_at).max().unwrap();
    let done = lab.last_event_at();
    (done.saturating_duration_since(t0), done.saturating_duration_since(last_listen))
}

/// A new pseudo-terminal: its master (what a terminal emulator reads) and its slave (what a
/// program started in it writes to).
pub fn pty() -> (std::fs::File, std::fs::File) {
    use std::os::fd::FromRawFd;
    // SAFETY: posix_openpt returns a new descriptor we own, or -1; grantpt, unlockpt and
    // ptsname only act on it, and ptsname's string is copied out before any other call.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(master >= 0 && libc::grantpt(master) == 0 && libc::unlockpt(master) == 0, "no pty");
        let name = std::ffi::CStr::from_ptr(libc::ptsname(master)).to_str().unwrap().to_owned();
        let slave = std::fs::OpenOptions::new().read(true).write(true).open(name).unwrap();
        (std::fs::File::from_raw_fd(master), slave)
    }
}

/// A process's resident memory, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A child process that is killed and reaped when dropped, also when its test panics: no test
/// leaves a peer behind.
pub struct Reaped(pub std::process::Child);

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Peers a, b and c (b and c joined through a), at rest for `rest` with no link lost; then the
/// link between a and b cut by packet filters, with no word to either: both sides notice
/// `within` (the dialling side's kernel probes, the accepting side counts what arrives, see
/// meshlab::linkwatch) and end the link as timed out.
pub async fn cut_is_noticed_by_both_sides<B: meshlab_lab::backend::Backend>(
    lab: &mut meshlab_lab::Lab<B>,
    rest: std::time::Duration,
    within: std::time::Duration,
) {
    lab.start(&["a"], &[], &[]).await.unwrap();
    lab.start(&["b", "c"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, std::time::Duration::from_secs(10)).await.unwrap();
    if !rest.is_zero() {
        lab.sleep(rest).await.unwrap();
        let lost: Vec<_> = lab.world().timeline.iter().filter(|m| m.kind == "down").collect();
        assert!(lost.is_empty(), "links lost at rest: {lost:?}");
    }
    lab.cut("a", "b", false).await.unwrap();
    lab.await_mesh(None, within).await.unwrap();
    let downs: Vec<String> =
        lab.world().timeline.iter().filter(|m| m.kind == "down").map(|m| m.detail.clone()).collect();
    assert!(downs.contains(&"b (timeout)".to_string()) && downs.contains(&"a (timeout)".to_string()), "{downs:?}");
    assert!(lab.world().timeline.iter().all(|m| m.kind != "hook"), "no peer was told of the cut");
}

/// On a backend whose cuts are packet filters: a cut link goes quiet and each side times it out
/// (no peer is told of the cut, as after a pulled cable); chat goes around the cut through a
/// third peer, and a heal brings the link back. Shuts the lab down.
pub async fn cuts_are_real_packet_drops<B: meshlab_lab::backend::Backend>(lab: &mut meshlab_lab::Lab<B>) {
    use std::time::Duration;
    // Within the timeout (the lab's 2 s) and a second, and a second to spare. The probes of a
    // frozen peer would take longer (a probe after 3 s of quiet, then 2 s for its answer).
    cut_is_noticed_by_both_sides(lab, Duration::ZERO, Duration::from_secs(4)).await;
    lab.say("a", "around the cut, through c").await.unwrap();
    lab.await_delivery(Duration::from_secs(5)).await.unwrap();
    lab.heal(None).await.unwrap();
    lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
    lab.shutdown().await;
}

/// On a backend whose conditions are the kernel's: loss is a random drop in the sender's packet
/// filter and rate an htb class on its interface, both counting packets in the peer's network
/// namespace (found through `pid_of`); every line still arrives exactly once, and a heal takes
/// both away. Shuts the lab down.
pub async fn conditions_are_real<B: meshlab_lab::backend::Backend>(
    lab: &mut meshlab_lab::Lab<B>,
    pid_of: impl Fn(&B, &str) -> Option<u32>,
) {
    use meshlab_lab::link::Condition;
    use std::time::Duration;
    lab.start(&["a"], &[], &[]).await.unwrap();
    lab.start(&["b", "c"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, Duration::from_secs(5)).await.unwrap();
    let bad = Condition { loss: Some(30.0), rate: Some(64_000), ..Default::default() };
    lab.condition(&names(&["a", "b"]), bad, false).await.unwrap();
    // One line at a time, each delivered before the next: at least 60 packets from a, each
    // dropped with a chance of 30%.
    for i in 1..=30 {
        lab.say("a", &format!("line {i} over a lossy, slow link")).await.unwrap();
        let (_, delivery) = lab.await_delivery(Duration::from_secs(30)).await.unwrap();
        assert_eq!((delivery.shown, delivery.duplicated), (2 * i, 0), "{delivery:?}");
    }
    let pid = pid_of(lab.backend(), "a").expect("a runs").to_string();
    let inside = |args: &[&str]| {
        let out = Command::new("nsenter").args(["-t", &pid, "-n"]).args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let filter = inside(&["iptables", "-L", "OUTPUT", "-v", "-x", "-n"]);
    let dropped: u64 = filter
        .lines()
        .find(|l| l.contains("statistic"))
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no loss rule in a's packet filter:\n{filter}"));
    assert!(dropped > 0, "the loss rule dropped nothing:\n{filter}");
    let classes = inside(&["tc", "-s", "class", "show", "dev", "eth0"]);
    let shaped: u64 = classes
        .split("Sent ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no rate class on a's interface:\n{classes}"));
    assert!(shaped > 0 && classes.contains("rate 64Kbit"), "{classes}");
    lab.heal(None).await.unwrap();
    assert!(!inside(&["iptables", "-S", "OUTPUT"]).contains("statistic"), "the heal lifts the loss");
    assert!(!inside(&["tc", "qdisc", "show", "dev", "eth0"]).contains("htb"), "and the rate limit");
    lab.shutdown().await;
}

/// A tmux session running one command in a terminal, killed when dropped.
pub struct Terminal {
    session: String,
}

impl Terminal {
    pub fn open(session: &str, command: &str) -> Terminal {
        tmux(&["new-session", "-d", "-s", session, "-x", "200", "-y", "50", command]);
        Terminal { session: session.to_owned() }
    }

    /// Types `text` as it is (no key names), in one burst (as a paste without bracketing
    /// would arrive; rustyline before 19 left all but the first key of a burst unread until the
    /// next one).
    pub fn type_text(&self, text: &str) {
        tmux(&["send-keys", "-t", &self.session, "-l", text]);
    }

    /// Presses keys by tmux's names (`Left`, `Enter`, `C-c`).
    pub fn keys(&self, keys: &[&str]) {
        let mut args = vec!["send-keys", "-t", &self.session];
        args.extend(keys);
        tmux(&args);
    }

    pub fn type_line(&self, text: &str) {
        self.type_text(text);
        self.keys(&["Enter"]);
    }

    pub fn screen(&self) -> String {
        String::from_utf8(tmux(&["capture-pane", "-p", "-t", &self.session]).stdout).unwrap()
    }

    /// Waits until the screen satisfies `done`, failing after [`LINE_DEADLINE`] with the screen.
    pub fn wait_for(&self, what: &str, done: impl Fn(&str) -> bool) -> String {
        let deadline = std::time::Instant::now() + LINE_DEADLINE;
        loop {
            let screen = self.screen();
            if done(&screen) {
                return screen;
            }
            assert!(std::time::Instant::now() < deadline, "the terminal never showed {what}:\n{screen}");
            std::thread::sleep(std::time::Duration::from_millis(50)); // polling the screen, no event to wait on
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = Command::new("tmux").args(["kill-session", "-t", &self.session]).output();
    }
}

fn tmux(args: &[&str]) -> std::process::Output {
    let out =
        Command::new("tmux").args(args).output().expect("tmux drives a terminal in these tests (.ci/run installs it)");
    assert!(out.status.success(), "tmux {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    out
}
