//! The `lab` command line: exit status 0 when every check passes, 1 when one fails, 2 for a bad
//! scenario file or one over the limits (naming the line). A stand-in peer (a shell script that prints a listening
//! event and never connects) keeps these tests independent of the real peer.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

fn lab() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lab"))
}

fn temp_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("meshlab-lab-cli-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A peer that listens (as far as the lab can tell) and never meets anyone. It notes its pid
/// in `pids` next to itself.
fn lonely_peer(dir: &Path) -> PathBuf {
    let path = dir.join("lonely-peer");
    let script = format!(
        "#!/bin/sh\necho $$ >> {}\nprintf '{{\"event\":\"listening\",\"id\":\"%032x\",\"name\":\"x\",\"addr\":\"127.0.0.1:%d\"}}\\n' $$ $$\nexec sleep 600\n",
        dir.join("pids").display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn scenario(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn a_bad_scenario_file_exits_2_naming_the_line() {
    let dir = temp_dir("bad");
    let file = scenario(&dir, "bad.toml", "[[step]]\nstart = \"a\"\n\n[[step]]\nsay = \"b\"\ntext = \"hi\"\n");
    let out = lab().arg("run").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("bad.toml:4: unknown peer \"b\""), "{stderr}");
    let file = scenario(&dir, "broken.toml", "[[step]\nstart = \"a\"\n");
    let out = lab().arg("run").arg(&file).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8(out.stderr).unwrap().contains("broken.toml:1:"));
}

/// Runs `lab run` on `files`, which it must refuse at once: exit status 2, no panic. Returns
/// its stderr. Killed after ten seconds, so that a scenario it does run cannot hang the tests.
fn refused(files: &[&Path], more: &[&str]) -> String {
    let mut child = lab()
        .arg("run")
        .args(files)
        .args(more)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("lab ran {files:?} instead of refusing it");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

fn peer_list(prefix: &str, n: usize) -> String {
    let names: Vec<String> = (1..=n).map(|i| format!("\"{prefix}{i}\"")).collect();
    format!("[{}]", names.join(", "))
}

#[test]
fn inputs_over_the_limits_exit_2_naming_the_file_and_line() {
    let dir = temp_dir("limits");
    let start_a = "[[step]]\nstart = \"a\"\n";
    let cases = [
        (
            "sleep.toml",
            "[[step]]\nsleep = \"300000000000y\"\n".to_string(),
            2,
            "duration \"300000000000y\" is over the limit of 1day",
        ),
        (
            "carry.toml",
            "[[step]]\nsleep = \"18446744073709551615s 1000ms\"\n".into(),
            2,
            "duration \"18446744073709551615s 1000ms\" is over the limit of 1day",
        ),
        (
            "timeout.toml",
            "timeout = \"2d\"\n[[step]]\nsleep = \"1s\"\n".into(),
            1,
            "duration \"2d\" is over the limit of 1day",
        ),
        (
            "within.toml",
            format!("{start_a}[[step]]\nawait = \"mesh\"\nwithin = \"25h\"\n"),
            5,
            "duration \"25h\" is over the limit of 1day",
        ),
        (
            "every.toml",
            format!("{start_a}[[step]]\nchaos = \"1m\"\nevery = \"2d\"\n"),
            5,
            "duration \"2d\" is over the limit of 1day",
        ),
        (
            "chaos.toml",
            format!("{start_a}[[step]]\nchaos = \"100y\"\n"),
            4,
            "duration \"100y\" is over the limit of 1day",
        ),
        (
            "step.toml",
            format!("[[step]]\nstart = {}\n", peer_list("p", 1025)),
            1,
            "a step names at most 1024 peers, this one 1025",
        ),
        (
            "peers.toml",
            format!("[[step]]\nstart = {}\n[[step]]\nstart = {}\n", peer_list("p", 1000), peer_list("q", 25)),
            3,
            "a scenario starts at most 1024 peers, \"q25\" is one more",
        ),
        (
            "count.toml",
            format!("{start_a}[[step]]\nsay = \"a\"\ntext = \"hi\"\ncount = 100001\n"),
            3,
            "`count` must be between 1 and 100000",
        ),
    ];
    for (name, text, line, message) in cases {
        let file = scenario(&dir, name, &text);
        let stderr = refused(&[&file], &[]);
        assert!(stderr.contains(&format!("{}:{line}: {message}", file.display())), "{name}: {stderr}");
    }
}

#[test]
fn a_scenario_name_cannot_put_its_report_outside_the_report_directory() {
    let dir = temp_dir("escape");
    let evil = scenario(&dir, "evil.toml", "name = \"../../x\"\n[[step]]\nsleep = \"1ms\"\n");
    let good = scenario(&dir, "good.toml", "[[step]]\nsleep = \"1ms\"\n");
    let report = dir.join("a").join("b").join("report");
    let stderr = refused(&[&evil, &good], &["--report", report.to_str().unwrap()]);
    assert!(
        stderr.contains(&format!("{}:1: bad scenario name \"../../x\": use at most 64 letters", evil.display())),
        "{stderr}"
    );
    assert!(!dir.join("a").exists(), "nothing written, inside the report directory or out");
    // A name taken from the file (`..toml` gives `.`) cannot leave a directory of its own either.
    let dot = scenario(&dir, "..toml", "[[step]]\nsleep = \"1ms\"\n");
    let out = lab().arg("run").arg(&dot).arg(&good).arg("--report").arg(&report).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(report.join("scenario-1").join("report.json").is_file());
    assert!(report.join("good").join("report.json").is_file());
    assert!(!report.join("report.json").exists());
}

#[test]
fn a_failed_check_exits_1_and_says_which_step_expected_what_and_saw_what() {
    let dir = temp_dir("fail");
    let peer = lonely_peer(&dir);
    let file = scenario(
        &dir,
        "never-meshes.toml",
        "[[step]]\nstart = \"a\"\n[[step]]\nstart = \"b\"\nvia = \"a\"\n[[step]]\nawait = \"mesh\"\nwithin = \"300ms\"\n",
    );
    let report = dir.join("report");
    let out = lab().arg("run").arg(&file).arg("--peer-bin").arg(&peer).arg("--report").arg(&report).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("3/3 await mesh within 300ms"), "{stdout}");
    assert!(stdout.contains("FAILED"), "{stdout}");
    assert!(stdout.contains("line 6: expected a full mesh of a, b"), "{stdout}");
    assert!(stdout.contains("seen: a is not connected to b"), "{stdout}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(report.join("report.json")).unwrap()).unwrap();
    assert_eq!(json["passed"], false);
    assert_eq!(json["failure"]["line"], 6);
    assert!(std::fs::read_to_string(report.join("report.html")).unwrap().contains("<svg"));
}

#[test]
fn a_passing_run_exits_0() {
    let dir = temp_dir("pass");
    let peer = lonely_peer(&dir);
    let file =
        scenario(&dir, "solo.toml", "[[step]]\nstart = \"a\"\n[[step]]\nawait = \"mesh\"\n[[step]]\nstop = \"a\"\n");
    let out = lab().arg("run").arg(&file).arg("--peer-bin").arg(&peer).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn list_shows_the_shipped_scenarios() {
    let out = lab().arg("list").arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios")).output().unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    for name in ["six-peer-demo", "partition-heal", "churn", "thirty-two"] {
        assert!(stdout.contains(name), "{stdout}");
    }
}

/// Whether a process is still alive (a zombie awaiting its parent counts as gone).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) != Some("Z"))
}

fn pids(dir: &Path) -> Vec<u32> {
    std::fs::read_to_string(dir.join("pids")).unwrap_or_default().lines().filter_map(|l| l.parse().ok()).collect()
}

/// Starts `lab run` on a scenario that starts two peers then waits; returns once both run.
fn lab_with_two_peers(tag: &str) -> (std::process::Child, PathBuf) {
    let dir = temp_dir(tag);
    let _ = std::fs::remove_file(dir.join("pids"));
    let peer = lonely_peer(&dir);
    let file = scenario(&dir, "wait.toml", "[[step]]\nstart = [\"a\", \"b\"]\n[[step]]\nsleep = \"60s\"\n");
    let child = lab()
        .arg("run")
        .arg(&file)
        .arg("--peer-bin")
        .arg(&peer)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(|| pids(&dir).len() == 2, "both peers to start");
    (child, dir)
}

fn wait_for(mut done: impl FnMut() -> bool, what: &str) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on our own child process.
    unsafe { libc::kill(pid as i32, sig) };
}

#[test]
fn ctrl_c_removes_every_peer_and_exits_130() {
    let (mut child, dir) = lab_with_two_peers("sigint");
    signal(child.id(), libc::SIGINT);
    assert_eq!(child.wait().unwrap().code(), Some(130));
    for pid in pids(&dir) {
        wait_for(|| !alive(pid), "the peer to be gone");
    }
}

#[test]
fn peers_die_with_a_killed_lab() {
    let (mut child, dir) = lab_with_two_peers("sigkill");
    signal(child.id(), libc::SIGKILL);
    child.wait().unwrap();
    for pid in pids(&dir) {
        wait_for(|| !alive(pid), "the peer to die with its lab");
    }
}

#[test]
fn a_panic_in_a_test_leaves_no_peer_behind() {
    use meshlab_lab::Lab;
    use meshlab_lab::backend::process::ProcessBackend;
    let dir = temp_dir("panic");
    let _ = std::fs::remove_file(dir.join("pids"));
    let peer = lonely_peer(&dir);
    let outcome = std::thread::spawn(move || {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let mut lab = Lab::new(ProcessBackend::new(peer));
            lab.start(&["a", "b"], &[], &[]).await.unwrap();
            panic!("a test fails while its peers run");
        })
    })
    .join();
    assert!(outcome.is_err());
    let started = pids(&dir);
    assert_eq!(started.len(), 2);
    for pid in started {
        wait_for(|| !alive(pid), "the peer to be gone after the panic");
    }
}

/// Whether the netns tests can run: they need root. Without it they report themselves skipped,
/// unless LAB_REQUIRE_NETNS=1 (set by .ci/run, which runs as root).
fn netns(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var("LAB_REQUIRE_NETNS").as_deref() != Ok("1"),
        "{test}: LAB_REQUIRE_NETNS=1 but the tests do not run as root"
    );
    eprintln!("SKIPPED {test}: the netns backend needs root (set LAB_REQUIRE_NETNS=1 to make this a failure)");
    false
}

/// This run's namespaces and host FORWARD rules whose names start with `stem`.
fn netns_objects(stem: &str) -> usize {
    let namespaces = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(stem))
        .count();
    let rules = Command::new("iptables").args(["-S", "FORWARD"]).output().unwrap();
    namespaces + String::from_utf8_lossy(&rules.stdout).lines().filter(|l| l.contains(stem)).count()
}

/// A lab killed with SIGKILL leaves its namespaces and host rule behind; the next lab removes
/// them when it starts.
#[test]
fn netns_leftovers_of_a_dead_lab_are_removed_at_start() {
    if !netns("netns_leftovers_of_a_dead_lab_are_removed_at_start") {
        return;
    }
    let dir = temp_dir("netns-leftovers");
    let peer = lonely_peer(&dir);
    let file = scenario(&dir, "one.toml", "[[step]]\nstart = [\"a\", \"b\"]\n[[step]]\nsleep = \"60s\"\n");
    let mut child = lab()
        .args(["run", "--backend", "netns", "--peer-bin"])
        .arg(&peer)
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stem = format!("meshlab-{}-", child.id());
    wait_for(|| netns_objects(&stem) >= 3, "the lab to make two namespaces and its host rule");
    signal(child.id(), libc::SIGKILL);
    child.wait().unwrap();
    assert!(netns_objects(&stem) > 0, "a killed lab leaves its namespaces behind");
    let next = meshlab_lab::backend::process::ProcessBackend::in_namespaces(&peer).unwrap();
    assert_eq!(netns_objects(&stem), 0, "the next lab removes a dead lab's namespaces and rule");
    drop(next);
}

/// Without root the netns backend says so and exits 2, before anything starts.
#[test]
fn netns_without_root_says_so_and_exits_2() {
    if !netns("netns_without_root_says_so_and_exits_2") {
        return;
    }
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_lab"))
        .args(["demo", "--backend", "netns"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("the netns backend needs root"), "{stderr}");
}

/// Delay needs the kernel's netem. Where it is missing (this machine's kernel), a scenario that
/// asks for delay stops before anything starts, saying why, with exit 2; where it is present,
/// the same scenario runs (and the delay test in tests/netns.rs applies).
#[test]
fn a_delay_on_a_kernel_without_netem_stops_before_it_starts() {
    if !netns("a_delay_on_a_kernel_without_netem_stops_before_it_starts") {
        return;
    }
    let dir = temp_dir("netem");
    let peer = lonely_peer(&dir);
    let file = scenario(
        &dir,
        "late.toml",
        "[[step]]\nstart = [\"a\", \"b\"]\n[[step]]\ncondition = [\"a\", \"b\"]\ndelay = \"50ms\"\n",
    );
    let out = lab().args(["run", "--backend", "netns", "--peer-bin"]).arg(&peer).arg(&file).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    if meshlab_lab::backend::kernel_has_netem() {
        assert_ne!(out.status.code(), Some(2), "this kernel has netem: {stderr}");
        return;
    }
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("delay and jitter need the kernel's sch_netem"), "{stderr}");
    assert!(!dir.join("pids").exists(), "no peer started");
}

/// `lab run … | head -1`: once stdout is closed the run goes on, passes and writes its report
/// (no "failed printing to stdout" panic, no exit 134).
#[test]
fn a_closed_stdout_never_stops_a_run_or_its_report() {
    use std::io::BufRead;
    let dir = temp_dir("closed-stdout");
    let peer = lonely_peer(&dir);
    let file = scenario(
        &dir,
        "quiet.toml",
        "[[step]]\nstart = \"a\"\n[[step]]\nsleep = \"300ms\"\n[[step]]\nsleep = \"10ms\"\n",
    );
    let report = dir.join("report");
    let mut child = lab()
        .args(["run", "--peer-bin"])
        .arg(&peer)
        .arg("--report")
        .arg(&report)
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.starts_with("quiet ("), "{first}");
    // The reader is dropped here: the pipe is closed while the run sleeps.
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(report.join("report.json").exists() && report.join("report.html").exists());
}

/// `lab check DIR` re-checks a finished run from the history `--report DIR` kept, and says
/// whether it agrees with the run's report.
#[test]
fn lab_check_rechecks_a_finished_run_from_its_history() {
    let dir = temp_dir("check");
    let peer = lonely_peer(&dir);
    let file = scenario(&dir, "alone.toml", "[[step]]\nstart = \"a\"\n[[step]]\nawait = \"delivery\"\n");
    let report = dir.join("report");
    let run = lab().args(["run", "--peer-bin"]).arg(&peer).arg("--report").arg(&report).arg(&file).output().unwrap();
    assert_eq!(run.status.code(), Some(0), "{}", String::from_utf8_lossy(&run.stderr));
    let out = lab().arg("check").arg(&report).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.starts_with("PASS alone (process), from its history"), "{stdout}");
    assert!(stdout.contains("the same figures as the run's report"), "{stdout}");
    let missing = lab().arg("check").arg(dir.join("nowhere")).output().unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot open"), "a clear error");
}

/// `lab run --help` describes its arguments and options.
#[test]
fn lab_run_help_reads_well() {
    let out = lab().args(["run", "--help"]).output().unwrap();
    assert!(out.status.success());
    insta::assert_snapshot!(String::from_utf8(out.stdout).unwrap());
}

/// On a terminal a long step shows a live bar (elapsed of its length, time left) and the
/// verdict is coloured, unless NO_COLOR is set.
#[test]
fn a_terminal_shows_a_live_bar_and_colour_unless_no_color() {
    let dir = temp_dir("live");
    let peer = lonely_peer(&dir);
    let file = scenario(&dir, "wait.toml", "[[step]]\nstart = \"a\"\n[[step]]\nsleep = \"3s\"\n");
    for (env, coloured) in [("-u NO_COLOR", true), ("NO_COLOR=1", false)] {
        let session = format!("meshlab-live-{}-{coloured}", std::process::id());
        let command = format!(
            "env {env} {} run --peer-bin {} {}; sleep 30",
            env!("CARGO_BIN_EXE_lab"),
            peer.display(),
            file.display()
        );
        let tmux = |args: &[&str]| Command::new("tmux").args(args).output().expect("tmux drives a terminal here");
        assert!(tmux(&["new-session", "-d", "-s", &session, "-x", "160", "-y", "20", &command]).status.success());
        let screen =
            || String::from_utf8_lossy(&tmux(&["capture-pane", "-e", "-p", "-t", &session]).stdout).into_owned();
        let bar = wait_for_screen(&screen, |s| s.contains("of 3.0 s") && s.contains("left"));
        assert!(bar.contains("sleep 3s"), "{bar}");
        let end = wait_for_screen(&screen, |s| s.contains("PASS") || s.contains("FAIL"));
        let _ = tmux(&["kill-session", "-t", &session]);
        assert!(!end.contains("of 3.0 s"), "the bar goes when its step ends:\n{end}");
        assert_eq!(end.contains("\u{1b}[32m") || end.contains("\u{1b}[1m"), coloured, "env {env}:\n{end}");
    }
}

/// The screen once `done` holds; fails after 15 s with the screen.
fn wait_for_screen(screen: &dyn Fn() -> String, done: impl Fn(&str) -> bool) -> String {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let s = screen();
        if done(&s) {
            return s;
        }
        assert!(std::time::Instant::now() < deadline, "the terminal never showed it:\n{s}");
        std::thread::sleep(std::time::Duration::from_millis(50)); // polling the screen, no event to wait on
    }
}

/// `--junit FILE` summarises the runs for CI: a suite per scenario, a case per step, a failed
/// step as a failure carrying what was expected and what was seen.
#[test]
fn junit_summarises_runs_for_ci() {
    let dir = temp_dir("junit");
    let peer = lonely_peer(&dir);
    let passing = scenario(&dir, "quiet.toml", "[[step]]\nstart = \"a\"\n");
    let failing = scenario(
        &dir,
        "lonely.toml",
        "[[step]]\nstart = \"a\"\n[[step]]\nstart = \"b\"\nvia = \"a\"\n[[step]]\nawait = \"mesh\"\nwithin = \"300ms\"\n",
    );
    let xml = dir.join("junit.xml");
    let out = lab()
        .args(["run", "--peer-bin"])
        .arg(&peer)
        .arg("--junit")
        .arg(&xml)
        .arg(&passing)
        .arg(&failing)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "one scenario fails");
    let xml = std::fs::read_to_string(&xml).unwrap();
    assert!(xml.contains(r#"<testsuites name="meshlab lab" tests="4" failures="1""#), "{xml}");
    assert!(
        xml.contains(r#"<testsuite name="quiet" tests="1""#) && xml.contains(r#"<testsuite name="lonely" tests="3""#),
        "{xml}"
    );
    assert!(
        xml.contains("03 await mesh within 300ms (line 6)") && xml.contains("expected a full mesh of a, b"),
        "{xml}"
    );
}

/// `lab agent` makes its key (readable by its owner only) where there is none and listens; without
/// root it cannot enter namespaces, and says so with exit 2.
#[test]
fn lab_agent_makes_its_key_listens_and_needs_root() {
    if !netns("lab_agent_makes_its_key_listens_and_needs_root") {
        return;
    }
    let dir = temp_dir("agent");
    let key = dir.join("agent.key");
    let _ = std::fs::remove_file(&key);
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(env!("CARGO_BIN_EXE_lab"))
        .args(["agent", "--listen", "127.0.0.1:0", "--key-file"])
        .arg(&key)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("the lab does not run as root"), "{stderr}");
    assert!(!key.exists(), "nothing made without root");

    let mut child = lab()
        .args(["agent", "--listen", "127.0.0.1:0", "--key-file"])
        .arg(&key)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let engine = Command::new("docker").arg("info").output().is_ok_and(|o| o.status.success());
    if !engine {
        let status = child.wait().unwrap();
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert_eq!(status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("cannot reach a Docker engine"), "{stderr}");
        return;
    }
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let _ = tx.send(line);
    });
    let line = rx.recv_timeout(std::time::Duration::from_secs(10)).expect("the agent says where it listens");
    signal(child.id(), libc::SIGKILL);
    child.wait().unwrap();
    assert!(line.starts_with("agent listening on 127.0.0.1:"), "{line}");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the key is its owner's only");
    let text = std::fs::read_to_string(&key).unwrap();
    assert!(text.trim().len() == 64 && text.trim().chars().all(|c| c.is_ascii_hexdigit()), "{text}");
}
