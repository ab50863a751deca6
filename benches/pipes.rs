//! A line's path through two peers, from a single-threaded driver: `cargo bench --bench pipes`.
//!
//! The driver writes a line into one peer's stdin (a pipe) and reads it back from another
//! peer's stdout (a pipe), one line every 5 ms, 1,000 lines; the same driver does the same
//! through `cat` for the floor that pipes and the driver themselves cost. It prints p50 and p99
//! of both. Nothing is asserted.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "../tests/support/mod.rs"]
mod support;

const LINES: usize = 1000;

fn pct(v: &[Duration], p: f64) -> String {
    let d = v[((v.len() as f64 - 1.0) * p).round() as usize];
    format!("{:.3} ms", d.as_secs_f64() * 1000.0)
}

/// Times `LINES` lines written to `input` until `output` shows them, 5 ms apart.
fn time_lines(input: &mut impl Write, output: &mut impl BufRead) -> Vec<Duration> {
    let mut times = Vec::with_capacity(LINES);
    let mut line = String::new();
    for i in 0..LINES {
        let text = format!("line {i}");
        let t0 = Instant::now();
        writeln!(input, "{text}").unwrap();
        input.flush().unwrap();
        loop {
            line.clear();
            assert!(output.read_line(&mut line).unwrap() > 0, "the output ended");
            if line.trim_end().ends_with(&text) {
                break;
            }
        }
        times.push(t0.elapsed());
        std::thread::sleep(Duration::from_millis(5));
    }
    times.sort();
    times
}

fn peer(args: &[&str]) -> support::Reaped {
    support::Reaped(
        Command::new(support::bench_peer())
            .args(args)
            .env_remove("MESH_KEY")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn main() {
    let ip = support::loopback();
    let port = std::net::TcpListener::bind((ip.as_str(), 0)).unwrap().local_addr().unwrap().port();
    let addr = format!("{ip}:{port}");
    let mut a = peer(&["--bind", &ip, "--port", &port.to_string(), "--name", "a"]);
    let mut b = peer(&["--bind", &ip, "--port", "0", "--name", "b", &addr]);
    let mut b_out = BufReader::new(b.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("joined") {
        line.clear();
        b_out.read_line(&mut line).unwrap();
    }
    // a's stdout (the chat view) shows nothing for its own lines: it may stay unread.
    let mut a_in = a.stdin.take().unwrap();
    let peers = time_lines(&mut a_in, &mut b_out);

    let mut cat = support::Reaped(Command::new("cat").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap());
    let mut cat_in = cat.stdin.take().unwrap();
    let mut cat_out = BufReader::new(cat.stdout.take().unwrap());
    let floor = time_lines(&mut cat_in, &mut cat_out);

    println!("peer binary {}", support::bench_peer());
    println!(
        "one line, stdin of one peer to stdout of another (1,000 lines, 5 ms apart): p50 {}, p99 {}",
        pct(&peers, 0.5),
        pct(&peers, 0.99)
    );
    println!("the same through cat: p50 {}, p99 {}", pct(&floor, 0.5), pct(&floor, 0.99));
}
