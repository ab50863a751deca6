//! The peer's command line: every option, its default and its environment variable.
//!
//! The command line is a contract (the lab, the containers and users rely on it), so it lives
//! in one place and is parsed by clap; semantic checks that clap cannot express are in
//! [`Config::check`].

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser};

use crate::dialbook::Schedule;
use crate::frame::MAX_NAME;
use crate::store::Retention;

#[derive(Debug, Parser)]
#[command(
    name = "peer",
    version,
    about = "A full-mesh peer-to-peer chat peer: client and server at once.",
    args_conflicts_with_subcommands = true,
    long_about = "A full-mesh peer-to-peer chat peer: client and server at once.\n\n\
        Give it the address of any member and it connects to every live member. Each line typed \
        on stdin is shown once by every other peer. Commands: /peers, /help, /quit."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub config: Config,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Print a fresh random mesh key (64 hex characters) for --key-file or MESH_KEY.
    Keygen,
}

#[derive(Debug, Clone, Args)]
pub struct Config {
    /// Members to join through, as host:port (a name, an IPv4 address or [v6]:port).
    #[arg(value_name = "BOOTSTRAP", value_parser = parse_addr)]
    pub bootstrap: Vec<String>,

    /// Port to listen on; 0 picks a free one.
    #[arg(help_heading = "Network", short, long, env = "PORT", default_value_t = 4000)]
    pub port: u16,

    /// Address to listen on; a specific address is also the source of outgoing connections.
    #[arg(help_heading = "Network", long, value_name = "ADDRESS", default_value = "0.0.0.0")]
    pub bind: IpAddr,

    /// Name shown to others [default: the host name].
    #[arg(help_heading = "Network", long, env = "PEER_NAME", value_parser = parse_name)]
    pub name: Option<String>,

    /// Address others should dial to reach this peer, when the one they observe is not it.
    #[arg(help_heading = "Network", long, value_name = "HOST:PORT", value_parser = parse_addr)]
    pub advertise: Option<String>,

    /// Write one JSON event per line on stdout instead of the chat view.
    #[arg(help_heading = "Output", long)]
    pub json: bool,

    /// Interval between probes: each beat, a peer pings the neighbour it heard from least lately.
    #[arg(help_heading = "Timing", long, default_value = "1s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,

    /// A neighbour silent for this long is dropped.
    ///
    /// A silent cut is noticed within it and a second (for a timeout of whole seconds). A longer
    /// timeout probes and checks each link less often, so that a large mesh at rest costs less.
    #[arg(help_heading = "Timing", long, default_value = "3s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub timeout: Duration,

    /// A connection that has not completed its handshake after this long is closed.
    #[arg(help_heading = "Timing", long, default_value = "5s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Time allowed for one outgoing TCP connect.
    #[arg(help_heading = "Timing", long, default_value = "2s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// Longest wait between redials of a lost peer (backoff cap).
    #[arg(help_heading = "Timing", long, default_value = "5s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub redial_max: Duration,

    /// A lost peer that cannot be reached for this long is forgotten.
    #[arg(help_heading = "Timing", long, default_value = "10m", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub give_up: Duration,

    /// Interval between anti-entropy rounds (digests to neighbours that fell behind, requests
    /// to follow senders no longer heard directly). The default matches --heartbeat's, so that
    /// a peer at rest wakes once a second for both.
    #[arg(help_heading = "Timing", long, default_value = "1s", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub sync_interval: Duration,

    /// Lines a second a neighbour may send of its own, on average; past it (and the burst) its
    /// lines are refused for now, it is told so, and they are caught up later at this pace.
    #[arg(help_heading = "Limits", long, default_value_t = 100.0)]
    pub line_rate: f64,

    /// Lines a neighbour may send of its own in a burst, above the rate.
    #[arg(help_heading = "Limits", long, default_value_t = 10_000.0)]
    pub line_burst: f64,

    /// Most open connections, incoming and outgoing together. A quarter of them are kept for
    /// members met before (strangers cannot take them), and 16 for this peer's own dials.
    #[arg(help_heading = "Limits", long, default_value_t = 512, value_parser = clap::value_parser!(u32).range(4..=65536))]
    pub max_conns: u32,

    /// Most connections from one host (an IPv4 address or an IPv6 /64).
    #[arg(help_heading = "Limits", long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=65536))]
    pub max_conns_per_host: u32,

    /// The memory this peer may use for what others send it or make it queue: history, early
    /// lines, frames queued towards neighbours and stdout, whatever its neighbours do. Written
    /// in bytes, or with a suffix: 64MiB, 512KiB, 1GiB.
    #[arg(help_heading = "Limits", long, default_value = "64MiB", value_parser = parse_bytes)]
    pub max_memory: usize,

    /// Lines kept for catch-up.
    #[arg(help_heading = "Limits", long, default_value_t = 10_000)]
    pub history_lines: usize,

    /// Bytes of lines kept for catch-up.
    #[arg(help_heading = "Limits", long, default_value = "8MiB", value_parser = parse_bytes)]
    pub history_bytes: usize,

    /// How long lines are kept for catch-up.
    #[arg(help_heading = "Limits", long, default_value = "10m", value_name = "DURATION", value_parser = humantime::parse_duration)]
    pub history_age: Duration,

    /// A file holding the mesh key (64 hex characters; `peer keygen` prints one). With a key,
    /// only peers holding it can join, and every connection is encrypted (Noise). The key can
    /// also come from the environment variable MESH_KEY.
    #[arg(help_heading = "Private mesh", long, value_name = "PATH")]
    pub key_file: Option<PathBuf>,

    /// Keep this peer's identity, sequence numbers, own lines and watermarks in DIR, so that a
    /// restart resumes as the same member and catches up on what it missed.
    #[arg(help_heading = "State", long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Enable the lab's fault-injection commands on stdin (/lab cut, /lab heal, /lab condition). Lab use only.
    #[arg(hide = true, long)]
    pub lab: bool,

    /// Start with traffic to and from peer NAME cut: NAME, NAME:in or NAME:out. Needs --lab.
    #[arg(hide = true, long, value_name = "NAME[:in|:out]", requires = "lab", value_parser = crate::hook::parse_spec)]
    pub lab_cut: Vec<crate::hook::LabCommand>,

    /// Start with what we send peer NAME conditioned: "NAME loss=10 rate=64000 delay=50ms
    /// jitter=10ms" (any of them). Needs --lab.
    #[arg(hide = true, long, value_name = "NAME WORDS", requires = "lab", value_parser = crate::hook::parse_condition_spec)]
    pub lab_condition: Vec<crate::hook::LabCommand>,
}

impl Config {
    /// Checks that the options make sense together.
    pub fn check(&self) -> Result<(), String> {
        if self.timeout <= self.heartbeat {
            return Err(format!(
                "--timeout ({}) must be longer than --heartbeat ({})",
                humantime::format_duration(self.timeout),
                humantime::format_duration(self.heartbeat)
            ));
        }
        // TCP_USER_TIMEOUT is an int of milliseconds: the kernel would refuse more, and the
        // links would fall back to its default of about 15 minutes.
        let longest = Duration::from_secs(24 * 86_400);
        if self.timeout > longest {
            return Err("--timeout must be at most 24 days (the kernel's TCP_USER_TIMEOUT holds no more)".into());
        }
        let positive = [
            ("--heartbeat", self.heartbeat),
            ("--handshake-timeout", self.handshake_timeout),
            ("--connect-timeout", self.connect_timeout),
            ("--redial-max", self.redial_max),
            ("--sync-interval", self.sync_interval),
        ];
        if let Some((flag, _)) = positive.iter().find(|(_, d)| d.is_zero()) {
            return Err(format!("{flag} must be greater than zero"));
        }
        if !(self.line_rate > 0.0 && self.line_burst >= 1.0) {
            return Err("--line-rate must be above 0 and --line-burst at least 1".into());
        }
        if self.history_lines == 0 {
            return Err("--history-lines must be at least 1".into());
        }
        if self.history_bytes < crate::frame::MAX_TEXT {
            return Err(format!("--history-bytes must be at least {} (the longest line)", crate::frame::MAX_TEXT));
        }
        if self.max_memory < 8 << 20 {
            return Err("--max-memory must be at least 8MiB".into());
        }
        if self.history_bytes > self.max_memory / 8 {
            return Err(format!(
                "--history-bytes ({}) may be at most an eighth of --max-memory ({}): the early-line buffer takes as much again",
                self.history_bytes, self.max_memory
            ));
        }
        Ok(())
    }

    pub fn retention(&self) -> Retention {
        Retention { lines: self.history_lines, bytes: self.history_bytes, age: self.history_age }
    }

    /// How --max-memory is shared out: the history and the early-line buffer take
    /// --history-bytes each (at most an eighth each), frames queued towards neighbours a
    /// quarter, stdout an eighth; the rest is for connections (a frame of 64 KiB being read on
    /// each at most) and the program itself. Catch-up is made at most a sixteenth of it a second (4 MiB/s by default).
    pub fn limits(&self) -> Limits {
        Limits {
            queued_bytes: self.max_memory / 4,
            stdout_bytes: self.max_memory / 8,
            catch_up_rate: self.max_memory / 16,
        }
    }

    pub fn schedule(&self) -> Schedule {
        let base = Duration::from_millis(100).min(self.redial_max);
        Schedule { base, cap: self.redial_max, polite: Duration::from_millis(500), give_up: self.give_up }
    }

    /// The mesh key: from --key-file, else from MESH_KEY (empty means none).
    pub fn mesh_key(&self) -> anyhow::Result<Option<crate::noise::MeshKey>> {
        use anyhow::Context as _;
        if let Some(path) = &self.key_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the mesh key {}", path.display()))?;
            let key =
                crate::noise::MeshKey::parse(&text).with_context(|| format!("bad mesh key in {}", path.display()))?;
            return Ok(Some(key));
        }
        match std::env::var("MESH_KEY") {
            Ok(text) if !text.trim().is_empty() => {
                Ok(Some(crate::noise::MeshKey::parse(&text).context("bad mesh key in MESH_KEY")?))
            }
            _ => Ok(None),
        }
    }

    /// The name to use: --name, PEER_NAME, the host name, or "peer".
    pub fn name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .and_then(|h| parse_name(h.trim()).ok())
                .unwrap_or_else(|| "peer".into())
        })
    }
}

/// Shares of --max-memory.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Frames queued towards all neighbours together.
    pub queued_bytes: usize,
    /// Events queued for stdout.
    pub stdout_bytes: usize,
    /// Bytes of catch-up made a second, for all neighbours together.
    pub catch_up_rate: usize,
}

/// A size in bytes: a number, optionally followed by KiB, MiB or GiB (or K, M, G, the same).
fn parse_bytes(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" | "k" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        other => return Err(format!("unknown unit {other:?}: use KiB, MiB or GiB")),
    };
    let n: usize = digits.parse().map_err(|_| format!("{s:?} is not a size such as 64MiB"))?;
    n.checked_mul(scale).ok_or_else(|| format!("{s:?} is too large"))
}

fn parse_addr(s: &str) -> Result<String, String> {
    crate::addr::parse(s).map_err(|e| e.to_string())
}

fn parse_name(s: &str) -> Result<String, String> {
    match crate::frame::check_name(s) {
        Ok(()) => Ok(s.to_owned()),
        Err(e) => Err(format!("{e} (a name is 1 to {MAX_NAME} bytes of printable text, without [, ] or @)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_bytes("64MiB"), Ok(64 << 20));
        assert_eq!(parse_bytes("512 KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("1G"), Ok(1 << 30));
        assert_eq!(parse_bytes("4096"), Ok(4096));
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5TB").is_err());
        assert!(parse_bytes("99999999999999999999GiB").is_err());
    }
}
