//! The peer's command line and `--json` event stream, as a user or a program sees them.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use assert_cmd::prelude::*;
use predicates::prelude::*;
use serde_json::Value;
use support::TimedLines;

fn peer() -> Command {
    let mut cmd = Command::cargo_bin("peer").unwrap();
    cmd.env_remove("PORT").env_remove("PEER_NAME").env_remove("RUST_LOG").env_remove("MESH_KEY");
    cmd
}

use support::loopback;

/// A peer on a free loopback port with its stdout as a stream of JSON events.
struct Running {
    child: support::Reaped,
    events: TimedLines,
    _serial: support::Serial,
}

impl Running {
    fn start(ip: &str, args: &[&str], stdin: Stdio) -> Running {
        let _serial = support::shared();
        let mut child = support::Reaped(
            peer()
                .args(["--json", "--bind", ip, "--port", "0"])
                .args(args)
                .stdin(stdin)
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let events = TimedLines::new(child.stdout.take().unwrap());
        Running { child, events, _serial }
    }

    /// The next event, parsed; silence or the stream's end fails the test.
    fn next(&mut self) -> Value {
        let line = self.events.next();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
    }

    fn next_of(&mut self, kind: &str) -> Value {
        loop {
            let e = self.next();
            if e["event"] == kind {
                return e;
            }
        }
    }

    fn say(&mut self, line: &str) {
        writeln!(self.child.stdin.as_mut().unwrap(), "{line}").unwrap();
    }

    fn terminate(mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }
}

/// `peer --help` as a user reads it: options grouped, the lab's flags hidden, durations named.
#[test]
fn help_reads_well() {
    let out = peer().arg("--help").env("COLUMNS", "100").output().unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    assert!(!help.contains("--lab"), "the lab's flags are hidden");
    insta::assert_snapshot!(help);
}

#[test]
fn help_lists_the_options_and_commands() {
    peer()
        .arg("--help")
        .assert()
        .success()
        .stdout(predicate::str::contains("[BOOTSTRAP]..."))
        .stdout(predicate::str::contains("--port").and(predicate::str::contains("[env: PORT=]")))
        .stdout(predicate::str::contains("--advertise"))
        .stdout(predicate::str::contains("--json"))
        .stdout(predicate::str::contains("/peers"));
}

#[test]
fn bad_arguments_exit_2_with_a_clear_message() {
    let cases: &[(&[&str], &str)] = &[
        (&["--port", "abc"], "invalid value 'abc' for '--port"),
        (&["no-port-here"], "expected host:port"),
        (&["host:0"], "bad port"),
        (&["--heartbeat", "2s", "--timeout", "1s"], "--timeout (1s) must be longer than --heartbeat (2s)"),
        (&["--timeout", "25days"], "--timeout must be at most 24 days"),
        (&["--lab-cut", "x"], "--lab"),
        (&["--lab", "--lab-cut", "x:sideways"], "sideways"),
        (&["--history-bytes", "100"], "--history-bytes must be at least 8192"),
        (&["--key-file", "/nonexistent/mesh.key"], "cannot read the mesh key /nonexistent/mesh.key"),
        (&["--frobnicate"], "unexpected argument"),
    ];
    for (args, message) in cases {
        peer().args(*args).assert().code(2).stderr(predicate::str::contains(*message));
    }
}

#[test]
fn a_port_in_use_is_one_clear_line_and_a_failure() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let out = peer().args(["--bind", "127.0.0.1", "--port", &port.to_string()]).stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with(&format!("error: cannot listen on 127.0.0.1:{port}: ")), "{stderr}");
}

#[test]
fn the_port_comes_from_the_environment_like_the_prototype() {
    let _serial = support::shared();
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let mut child = support::Reaped(
        peer()
            .args(["--json", "--bind", "127.0.0.1"])
            .env("PORT", free.to_string())
            .env("PEER_NAME", "from-env")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let line = TimedLines::new(child.stdout.take().unwrap()).next();
    drop(child);
    let e: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(e["addr"], format!("127.0.0.1:{free}"));
    assert_eq!(e["name"], "from-env");
}

#[test]
fn json_events_follow_the_contract() {
    let ip = loopback();
    let mut a = Running::start(&ip, &["--name", "a"], Stdio::piped());
    let listening = a.next();
    assert_eq!(listening["event"], "listening");
    let id = listening["id"].as_str().unwrap();
    assert_eq!(id.len(), 64, "an id is a public key");
    assert!(id.bytes().all(|b| b.is_ascii_hexdigit()));
    let addr = listening["addr"].as_str().unwrap();
    assert!(addr.starts_with(&format!("{ip}:")) && !addr.ends_with(":0"), "the real port: {addr}");

    let mut b = Running::start(&ip, &["--name", "b", addr], Stdio::piped());
    let b_id = b.next()["id"].as_str().unwrap().to_owned();
    let up = a.next_of("peer_up");
    assert_eq!(up["peer"]["id"], b_id.as_str());
    assert_eq!(up["peer"]["name"], "b");
    assert!(up["peer"]["addr"].as_str().unwrap().starts_with(&format!("{ip}:")), "observed address and announced port");
    b.next_of("peer_up");

    b.say("hello there");
    let sent = b.next_of("sent");
    assert_eq!(sent["seq"], 1);
    assert_eq!(sent["text"], "hello there");
    let msg = a.next_of("message");
    assert_eq!(msg["msg_id"], sent["msg_id"]);
    assert_eq!(msg["seq"], 1);
    assert_eq!(msg["text"], "hello there");
    assert_eq!(msg["from"]["id"], b_id.as_str());
    assert_eq!(msg["from"]["name"], "b");
    assert_eq!(msg["via"], b_id.as_str());
    assert!(msg["sent_at_ms"].as_u64().unwrap() > 1_600_000_000_000);

    a.say("/peers");
    let peers = a.next_of("peers");
    assert_eq!(peers["peers"][0]["name"], "b");
    a.say("/frobnicate");
    assert!(a.next_of("error")["message"].as_str().unwrap().contains("unknown command /frobnicate"));

    b.say("/quit");
    let down = a.next_of("peer_down");
    assert_eq!(down["reason"], "goodbye");
    assert!(b.child.wait().unwrap().success());
    assert!(a.terminate().success());
}

#[test]
fn the_chat_view_shows_name_at_addr_and_notices_only() {
    let ip = loopback();
    let mut a = Running::start(&ip, &["--name", "a"], Stdio::piped());
    let addr = a.next()["addr"].as_str().unwrap().to_owned();
    let mut b = support::Reaped(
        peer()
            .args(["--bind", &ip, "--port", "0", "--name", "b", &addr])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let view = TimedLines::new(b.stdout.take().unwrap());
    let line = view.next();
    assert!(line.starts_with(&format!("* a@{ip}:")) && line.ends_with(" joined"), "{line:?}");
    a.next_of("peer_up");
    a.say("hi \x1b[31mthere");
    assert_eq!(view.next(), format!("[a@{}] hi \u{fffd}[31mthere", addr));
    // Bidi overrides, line separators and zero-width characters are neutralised too.
    a.say("pay \u{202e}bob\u{2028}x\u{200b}y");
    assert_eq!(view.next(), format!("[a@{}] pay \u{fffd}bob\u{fffd}x\u{fffd}y", addr));
    a.say("/quit");
    let line = view.next();
    assert!(line.starts_with("* a@") && line.ends_with(" left"), "{line:?}");
}

#[test]
fn end_of_stdin_does_not_stop_the_peer() {
    let ip = loopback();
    let mut a = Running::start(&ip, &["--name", "a"], Stdio::null());
    let addr = a.next()["addr"].as_str().unwrap().to_owned();
    // Still serving after its stdin ended: a newcomer meets it.
    let mut b = Running::start(&ip, &["--name", "b", &addr], Stdio::piped());
    b.next();
    assert_eq!(a.next_of("peer_up")["peer"]["name"], "b");
    assert!(a.terminate().success(), "SIGTERM is a graceful exit");
    let down = b.next_of("peer_down");
    assert_eq!((down["peer"]["name"].as_str(), down["reason"].as_str()), (Some("a"), Some("goodbye")));
}

#[test]
fn overlong_and_non_utf8_lines_are_rejected_and_the_peer_carries_on() {
    let ip = loopback();
    let mut a = Running::start(&ip, &["--name", "a"], Stdio::piped());
    a.next();
    let stdin = a.child.stdin.as_mut().unwrap();
    stdin.write_all(&vec![b'x'; 20_000]).unwrap();
    stdin.write_all(b"\n\xff\xfe\nfine\n").unwrap();
    assert!(a.next_of("error")["message"].as_str().unwrap().contains("longer than 8192 bytes"));
    assert!(a.next_of("error")["message"].as_str().unwrap().contains("UTF-8"));
    assert_eq!(a.next_of("sent")["text"], "fine");
}

#[test]
fn others_dial_the_advertised_address() {
    let ip = loopback();
    let mut a = Running::start(&ip, &["--name", "a"], Stdio::piped());
    let addr = a.next()["addr"].as_str().unwrap().to_owned();
    let mut b = Running::start(&ip, &["--name", "b", "--advertise", "chat.example.org:4123", &addr], Stdio::piped());
    assert_eq!(b.next()["advertise"], "chat.example.org:4123");
    assert_eq!(a.next_of("peer_up")["peer"]["addr"], "chat.example.org:4123");
}

#[test]
fn keygen_prints_a_fresh_mesh_key() {
    let first = peer().arg("keygen").output().unwrap();
    let second = peer().arg("keygen").output().unwrap();
    let key = String::from_utf8(first.stdout.clone()).unwrap();
    assert!(first.status.success());
    assert_eq!(key.trim().len(), 64);
    assert!(key.trim().bytes().all(|b| b.is_ascii_hexdigit()));
    assert_ne!(first.stdout, second.stdout, "each key is fresh");
}

#[test]
fn a_bad_mesh_key_is_one_clear_error() {
    let out = peer().args(["--port", "0"]).env("MESH_KEY", "not-a-key").stdin(Stdio::null()).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "a bad argument, as clap reports them");
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert!(stderr.contains("bad mesh key in MESH_KEY: a mesh key is 64 hex characters"), "{stderr}");
}

/// On a terminal the line being typed stays whole: a line from another peer prints above it,
/// arrow keys edit it (never sent as text), the peer's own lines keep their `you>` mark, lines
/// shown carry the local time, and Ctrl-C leaves.
#[test]
fn a_chat_line_stays_whole_on_a_terminal() {
    let ip = loopback();
    let mut bob = Running::start(&ip, &["--name", "bob"], Stdio::piped());
    let addr = bob.next_of("listening")["addr"].as_str().unwrap().to_owned();
    let peer_bin = assert_cmd::cargo::cargo_bin("peer");
    let session = format!("meshlab-chat-{}", std::process::id());
    let alice = support::Terminal::open(
        &session,
        &format!("env -u NO_COLOR {} --name alice --bind {ip} --port 0 {addr}", peer_bin.display()),
    );
    alice.wait_for("its prompt", |s| s.lines().any(|l| l.starts_with("you>")));
    bob.next_of("peer_up");
    alice.type_text("half typ");
    alice.wait_for("the half-typed line", |s| s.contains("you> half typ"));
    bob.say("hello from bob");
    let screen = alice.wait_for("bob's line", |s| s.contains("] hello from bob"));
    let rows: Vec<&str> = screen.lines().collect();
    let incoming = rows.iter().position(|r| r.contains("[bob@") && r.ends_with("hello from bob")).unwrap();
    let typing = rows.iter().position(|r| r.trim_end() == "you> half typ").expect("the half-typed line is whole");
    assert!(incoming < typing, "the incoming line prints above the line being typed:\n{screen}");
    let time = rows[incoming].split(' ').next().unwrap();
    assert!(
        time.len() == 8 && time.as_bytes()[2] == b':' && time.as_bytes()[5] == b':',
        "local time first: {}",
        rows[incoming]
    );
    alice.keys(&["Left", "Left", "Left"]);
    alice.type_text("X");
    alice.keys(&["Enter"]);
    let said = bob.next_of("message");
    assert_eq!(said["text"], "half Xtyp", "arrow keys edit the line, never travel as text");
    alice.wait_for("its own line marked", |s| s.lines().any(|l| l.trim_end() == "you> half Xtyp"));
    alice.keys(&["C-c"]);
    assert_eq!(bob.next_of("peer_down")["reason"], "goodbye", "Ctrl-C leaves with a goodbye");
}
