//! Where peers run. A backend starts, signals and feeds peer processes and applies cuts; it
//! reports everything a peer prints as [`Observed`] values. Scenarios never see which backend
//! runs them: the process backend (local processes, the peer's lab hook for cuts) and the docker
//! backend (containers, packet filtering for cuts) and the netns backend (processes in network
//! namespaces of their own, packet filtering for cuts) run the same files.

pub mod docker;
pub mod engine;
pub mod netns;
pub mod process;
pub mod swarm;

use std::net::Ipv4Addr;
use std::time::Duration;

use anyhow::Context;

use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

use crate::link::{Condition, shaping_commands};
use crate::world::Observed;
use engine::Tool;

/// A cut as the lab asks for it: (the other peer's name, drop inbound, drop outbound).
pub type Cut = (String, bool, bool);

/// What one peer applies to its links: its cuts, and the conditions of what it sends to each
/// other peer (by name).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Links {
    pub cuts: Vec<Cut>,
    pub conditions: Vec<(String, Condition)>,
}

impl Links {
    /// Whether any condition needs a queue on the peer's interface.
    pub fn shapes(&self) -> bool {
        self.conditions.iter().any(|(_, c)| c.shapes())
    }
}

/// How to start one peer.
#[derive(Debug, Clone)]
pub struct PeerSpec {
    pub name: String,
    /// Addresses to bootstrap from.
    pub bootstrap: Vec<String>,
    /// Extra command-line flags for the peer.
    pub flags: Vec<String>,
    /// Cuts and conditions in force when it starts.
    pub links: Links,
    /// Give it a state directory that outlives its process (`--state-dir`), the same one at
    /// each start under this name.
    pub keep_state: bool,
    /// The mesh key (MESH_KEY) for a private mesh; an open mesh without.
    pub mesh_key: Option<String>,
}

/// Per-name state directories on this host, removed with the backend.
pub struct StateDirs {
    root: std::path::PathBuf,
}

impl StateDirs {
    pub fn new() -> StateDirs {
        let root = std::env::temp_dir().join(format!(
            "meshlab-lab-state-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        StateDirs { root }
    }

    /// The directory of `name`, created (writable by any user: container peers run unprivileged).
    pub fn of(&self, name: &str) -> anyhow::Result<std::path::PathBuf> {
        use std::os::unix::fs::PermissionsExt;
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
        Ok(dir)
    }
}

impl Default for StateDirs {
    fn default() -> Self {
        StateDirs::new()
    }
}

impl Drop for StateDirs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// How to stop a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: the peer says goodbye.
    Graceful,
    /// SIGKILL: the peer vanishes.
    Kill,
}

/// Stops a peer as both backends do: `signal` it as `how` says, wait up to `grace` for `exited`,
/// then kill it and report that it had to be killed.
pub async fn stop_within<F, Fut>(
    name: &str,
    how: Stop,
    grace: Duration,
    exited: &mut watch::Receiver<bool>,
    mut signal: F,
) -> anyhow::Result<()>
where
    F: FnMut(Stop) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    signal(how).await?;
    if tokio::time::timeout(grace, exited.wait_for(|e| *e)).await.is_ok() {
        return Ok(());
    }
    let _ = signal(Stop::Kill).await;
    let _ = exited.wait_for(|e| *e).await;
    anyhow::bail!("{name} did not exit within {grace:?} of SIGTERM and was killed")
}

/// Timing flags the lab gives every peer unless a scenario sets them: heartbeats fast enough
/// that cuts show within two seconds (yet cheap enough for 32 peers on two cores), and short
/// redial backoff so that heals re-form quickly.
pub const LAB_TIMING: &[(&str, &str)] = &[
    ("--heartbeat", "300ms"),
    ("--timeout", "2s"),
    ("--redial-max", "500ms"),
    ("--sync-interval", "200ms"),
    ("--handshake-timeout", "2s"),
];

/// `defaults` (flag, value) pairs merged under `flags`: a default is dropped when `flags`
/// sets the same option (clap refuses an option given twice).
pub fn merge_flags(defaults: &[(&str, String)], flags: &[String]) -> Vec<String> {
    /// The peer's short forms of long options.
    const SHORT: &[(&str, &str)] = &[("--port", "-p")];
    let sets = |f: &str, flag: &str| {
        let short = SHORT.iter().find(|(long, _)| *long == flag).map(|(_, short)| *short);
        f == flag || f.starts_with(&format!("{flag}=")) || short.is_some_and(|s| f.starts_with(s))
    };
    let mut out = Vec::new();
    for (flag, value) in defaults {
        if !flags.iter().any(|f| sets(f, flag)) {
            out.push(flag.to_string());
            out.push(value.clone());
        }
    }
    out.extend(flags.iter().cloned());
    out
}

/// The lab's timing flags merged under the scenario's own.
pub fn with_lab_timing(flags: &[String]) -> Vec<String> {
    let defaults: Vec<(&str, String)> = LAB_TIMING.iter().map(|(f, v)| (*f, v.to_string())).collect();
    merge_flags(&defaults, flags)
}

/// The `/lab` hook commands that take a peer from links `old` to links `new` (for backends that
/// cut and condition links through the peer's lab hook).
pub fn hook_commands(old: &Links, new: &Links) -> String {
    let mut lines = String::new();
    for (other, _, _) in old.cuts.iter().filter(|c| !new.cuts.iter().any(|n| n.0 == c.0)) {
        lines.push_str(&format!("/lab heal {other}\n"));
    }
    for cut in new.cuts.iter().filter(|c| !old.cuts.contains(c)) {
        lines.push_str(&format!("/lab cut {} {}\n", cut.0, direction(cut.1, cut.2)));
    }
    for (other, _) in old.conditions.iter().filter(|c| !new.conditions.iter().any(|n| n.0 == c.0)) {
        lines.push_str(&format!("/lab condition {other}\n"));
    }
    for (other, condition) in new.conditions.iter().filter(|c| !old.conditions.contains(c)) {
        lines.push_str(&format!("/lab condition {other} {}\n", condition.hook_words()));
    }
    lines
}

/// The hook's word for a cut: `in`, `out` or `both`.
pub fn direction(inbound: bool, outbound: bool) -> &'static str {
    match (inbound, outbound) {
        (true, false) => "in",
        (false, true) => "out",
        _ => "both",
    }
}

/// `--lab-cut` and `--lab-condition` flags that start a peer with `links` in force.
pub fn hook_flags(links: &Links) -> Vec<String> {
    let mut flags = vec!["--lab".to_string()];
    for (other, inbound, outbound) in &links.cuts {
        flags.push("--lab-cut".into());
        flags.push(match (inbound, outbound) {
            (true, false) => format!("{other}:in"),
            (false, true) => format!("{other}:out"),
            _ => other.clone(),
        });
    }
    for (other, condition) in &links.conditions {
        flags.push("--lab-condition".into());
        flags.push(format!("{other} {}", condition.hook_words()));
    }
    flags
}

/// The kernel's neighbour (ARP) table is shared by every network namespace of the host, and a
/// full mesh of `n` hosts (containers or namespaces) fills it with about n² entries (each host's entry for each
/// other, and for the gateway). Past `gc_thresh3` (1,024 by default) the kernel drops new entries
/// and connections time out: at 64 hosts about half the pairs never connect. So before a
/// network outgrows the table, the table is raised (as root), or the run stops saying how.
pub fn ensure_neighbour_room(hosts: usize) -> anyhow::Result<()> {
    const THRESHOLDS: &str = "/proc/sys/net/ipv4/neigh/default";
    let needed = hosts * hosts + 256;
    let read = |name: &str| -> Option<usize> {
        std::fs::read_to_string(format!("{THRESHOLDS}/{name}")).ok()?.trim().parse().ok()
    };
    let Some(hard) = read("gc_thresh3") else {
        return Ok(()); // no IPv4 neighbour table to size here
    };
    if hard >= needed {
        return Ok(());
    }
    let target = needed.next_power_of_two();
    let raise = |name: &str, value: usize| std::fs::write(format!("{THRESHOLDS}/{name}"), value.to_string());
    let soft = read("gc_thresh2").unwrap_or(0).max(target / 2);
    raise("gc_thresh3", target).and_then(|()| raise("gc_thresh2", soft)).with_context(|| {
        format!(
            "{hosts} hosts need about {needed} entries in the host's neighbour table, which holds \
             {hard}: run `sysctl -w net.ipv4.neigh.default.gc_thresh3={target}` as root"
        )
    })?;
    tracing::warn!(
        "raised the host's neighbour table (net.ipv4.neigh.default.gc_thresh3) from {hard} to {target} entries \
         for {hosts} hosts"
    );
    Ok(())
}

/// A peer's address, for the rules that name it: `None` for a name with no address yet (a swarm
/// task gets its address when it starts), which no rule can match.
pub trait AddressOf: FnMut(&str) -> anyhow::Result<Option<Ipv4Addr>> {}
impl<F: FnMut(&str) -> anyhow::Result<Option<Ipv4Addr>>> AddressOf for F {}

/// The iptables-restore input that drops what the cuts say, and a random share of what the
/// peer sends where a condition has loss, given each other peer's address.
pub fn filter_rules(links: &Links, mut address_of: impl AddressOf) -> anyhow::Result<String> {
    let mut rules = String::from("*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for (other, inbound, outbound) in &links.cuts {
        let Some(ip) = address_of(other)? else { continue };
        if *inbound {
            rules.push_str(&format!("-A INPUT -s {ip}/32 -j DROP\n"));
        }
        if *outbound {
            rules.push_str(&format!("-A OUTPUT -d {ip}/32 -j DROP\n"));
        }
    }
    for (other, condition) in &links.conditions {
        if let Some(loss) = condition.loss
            && let Some(ip) = address_of(other)?
        {
            let p = loss / 100.0;
            rules.push_str(&format!("-A OUTPUT -d {ip}/32 -m statistic --mode random --probability {p:.6} -j DROP\n"));
        }
    }
    rules.push_str("COMMIT\n");
    Ok(rules)
}

/// Makes a network namespace's packet filter and queues what `new` says, coming from `old`
/// (`dev` is its interface). Only what changed is redone.
pub async fn apply_links(
    namespace: &impl Namespace,
    dev: &str,
    old: &Links,
    new: &Links,
    mut address_of: impl AddressOf,
) -> anyhow::Result<()> {
    let loss =
        |l: &Links| -> Vec<(String, Option<f64>)> { l.conditions.iter().map(|c| (c.0.clone(), c.1.loss)).collect() };
    if old.cuts != new.cuts || loss(old) != loss(new) {
        apply_filter(namespace, new, &mut address_of).await?;
    }
    if shaped(old) != shaped(new) {
        apply_shaping(namespace, dev, old, new, &mut address_of).await?;
    }
    Ok(())
}

/// Makes a namespace's rules again for links already in force, after a peer they name came back
/// at another address.
pub async fn reapply_links(
    namespace: &impl Namespace,
    dev: &str,
    links: &Links,
    mut address_of: impl AddressOf,
) -> anyhow::Result<()> {
    apply_filter(namespace, links, &mut address_of).await?;
    if links.shapes() {
        apply_shaping(namespace, dev, links, links, &mut address_of).await?;
    }
    Ok(())
}

fn shaped(links: &Links) -> Vec<(String, Condition)> {
    links.conditions.iter().filter(|(_, c)| c.shapes()).cloned().collect()
}

/// A network namespace the lab feeds iptables-restore and tc input into.
#[allow(async_fn_in_trait)]
pub trait Namespace {
    async fn feed(&self, tool: Tool, input: &str) -> anyhow::Result<()>;
}

/// A namespace of this host, entered with a command prefix (`nsenter …`).
pub struct Entered<'a>(pub &'a [&'a str]);

impl Namespace for Entered<'_> {
    async fn feed(&self, tool: Tool, input: &str) -> anyhow::Result<()> {
        let command: Vec<String> = self.0.iter().chain(tool.command()).map(|s| s.to_string()).collect();
        feed(&command, input).await
    }
}

/// Replaces the namespace's packet filter with the one `links` make (iptables-restore replaces
/// the table at once, so no packet passes between the old rules and the new).
async fn apply_filter(namespace: &impl Namespace, links: &Links, address_of: impl AddressOf) -> anyhow::Result<()> {
    let rules = filter_rules(links, address_of)?;
    namespace.feed(Tool::IptablesRestore, &rules).await.context("iptables-restore failed")
}

/// Replaces the queues `old` made on `dev` with those `new` needs.
async fn apply_shaping(
    namespace: &impl Namespace,
    dev: &str,
    old: &Links,
    new: &Links,
    mut address_of: impl AddressOf,
) -> anyhow::Result<()> {
    let mut targets = Vec::new();
    for (other, c) in shaped(new) {
        if let Some(ip) = address_of(&other)? {
            targets.push((ip, c));
        }
    }
    let mut commands = Vec::new();
    if old.shapes() {
        commands.push(format!("qdisc del dev {dev} root"));
    }
    commands.extend(shaping_commands(dev, &targets));
    if commands.is_empty() {
        return Ok(());
    }
    namespace.feed(Tool::TcBatch, &(commands.join("\n") + "\n")).await.context("tc failed")
}

/// Feeds `input` to `command` (an iptables-restore or a tc -batch entered into a peer's
/// network namespace) and fails with what it printed on stderr.
pub async fn feed(command: &[String], input: &str) -> anyhow::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut child = tokio::process::Command::new(&command[0])
        .args(&command[1..])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot run {}", command[0]))?;
    child.stdin.take().expect("piped").write_all(input.as_bytes()).await?;
    let out = child.wait_with_output().await?;
    anyhow::ensure!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

/// Whether this kernel can delay packets (the `netem` qdisc), tried on the loopback of a
/// throwaway network namespace (needs root). Loads the module where it is one.
pub fn kernel_has_netem() -> bool {
    let _ = std::process::Command::new("modprobe").arg("sch_netem").stderr(std::process::Stdio::null()).status();
    let ns = format!("meshlab-netem-probe-{}", std::process::id());
    let ip = |args: &[&str]| std::process::Command::new("ip").args(args).stderr(std::process::Stdio::null()).status();
    if !ip(&["netns", "add", &ns]).is_ok_and(|s| s.success()) {
        return false;
    }
    let has = ip(&["-n", &ns, "link", "set", "lo", "up"]).is_ok_and(|s| s.success())
        && std::process::Command::new("ip")
            .args(["netns", "exec", &ns, "tc", "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    let _ = ip(&["netns", "del", &ns]);
    has
}

#[allow(async_fn_in_trait)]
pub trait Backend {
    /// Short name for progress lines and reports.
    fn name(&self) -> &'static str;

    /// A sentence on how this backend runs peers and cuts links, for the progress view.
    fn describe(&self) -> String {
        self.name().to_string()
    }

    /// Scenario deadlines are multiplied by this (containers start slower than processes).
    fn time_scale(&self) -> f64;

    /// Whether cuts and conditions are applied through the peer's hook (cooperative),
    /// acknowledged by `hook` events.
    fn cuts_acknowledged_by_events(&self) -> bool;

    /// Whether delays and jitter can be made here (the netem qdisc, on a packet backend).
    fn can_delay(&self) -> bool {
        true
    }

    /// Told the peers about to start together (each with its instance), before the first
    /// starts: a backend can make their hosts all at once (the netns backend's namespaces, the
    /// swarm backend's services) rather than one per start while the peers already started
    /// compete for the CPU.
    async fn prepare(&mut self, _starts: &[(PeerSpec, u32)]) -> anyhow::Result<()> {
        Ok(())
    }

    /// Starts a peer; what it prints goes to `events`, tagged with `instance`.
    async fn start(&mut self, spec: PeerSpec, instance: u32, events: UnboundedSender<Observed>) -> anyhow::Result<()>;

    /// The address other peers dial to reach `name`, given what it printed when listening.
    fn address_of(&self, name: &str, listen: &str) -> String;

    /// Told once a started peer has printed its listening address.
    fn listened(&mut self, _name: &str, _listen: &str) {}

    /// Writes one line on the peer's stdin.
    async fn say(&mut self, name: &str, line: &str) -> anyhow::Result<()>;

    /// Stops a peer and returns once it has exited.
    async fn stop(&mut self, name: &str, how: Stop, grace: Duration) -> anyhow::Result<()>;

    /// Freezes a running peer (SIGSTOP, or the container's cgroup freezer): its sockets stay
    /// open and its kernel keeps answering, but the peer itself does nothing.
    async fn pause(&mut self, name: &str) -> anyhow::Result<()>;

    /// Thaws a paused peer.
    async fn resume(&mut self, name: &str) -> anyhow::Result<()>;

    /// Told that `name` exited on its own (after `/quit`), so it is no longer running.
    fn exited(&mut self, _name: &str) {}

    /// Makes `name` treat each peer `links` lists as cut or conditioned; peers not listed are
    /// neither.
    async fn set_links(&mut self, name: &str, links: &Links) -> anyhow::Result<()>;

    /// Removes everything the backend created. Safe to call more than once.
    async fn shutdown(&mut self);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scenario_flag_replaces_the_default_in_any_spelling() {
        let defaults = [("--port", "4000".to_string()), ("--heartbeat", "300ms".to_string())];
        let merged = |flags: &[&str]| merge_flags(&defaults, &flags.iter().map(|f| f.to_string()).collect::<Vec<_>>());
        assert_eq!(merged(&[]), ["--port", "4000", "--heartbeat", "300ms"]);
        assert_eq!(merged(&["--port", "5"]), ["--heartbeat", "300ms", "--port", "5"]);
        assert_eq!(merged(&["--port=5"]), ["--heartbeat", "300ms", "--port=5"]);
        assert_eq!(merged(&["-p", "5"]), ["--heartbeat", "300ms", "-p", "5"]);
        assert_eq!(merged(&["-p5", "--heartbeat=1s"]), ["-p5", "--heartbeat=1s"]);
    }
}
