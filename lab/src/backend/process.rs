//! The process backend: each peer is a local `peer` process, needing no privilege; and the netns
//! backend, the same processes each in a network namespace of its own (see [`super::netns`]).
//!
//! Each peer gets a loopback address of its own, as hosts on a network have (Linux routes all
//! of 127.0.0.0/8 to the loopback interface): a lab takes a random block of 508 addresses
//! (127.a.b.2 to 127.a.b+1.255), and each peer name keeps its address across restarts. Labs
//! running side by side (parallel tests) thus never meet, even when one's peer redials a port
//! that the system has since given to another's. Ports are picked by the peer (`--port 0`) and
//! learnt from its `listening` event; a restarted peer asks for its old port again, like a real
//! restart would. Cuts go through the peer's lab
//! hook (`--lab`), so traffic is dropped inside the peers. Every child is killed when its handle
//! is dropped and, through PR_SET_PDEATHSIG, when the lab process itself dies, so no peer
//! outlives the lab.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

use super::netns::{self, Namespaces};
use super::{
    Backend, Links, PeerSpec, StateDirs, Stop, hook_commands, hook_flags, merge_flags, stop_within, with_lab_timing,
};
use crate::world::{Observation, Observed};

/// Most peer names one process-backend lab runs (its block of loopback addresses, less the one
/// kept spare for tests).
pub const MAX_PEERS: usize = 507;

pub struct ProcessBackend {
    peer_bin: PathBuf,
    network: Network,
    /// Each peer name's address, and how many were given out.
    addresses: HashMap<String, Ipv4Addr>,
    procs: HashMap<String, Proc>,
    /// Last port each name listened on, reused on restart.
    ports: HashMap<String, u16>,
    states: StateDirs,
}

/// Where the peer processes live.
enum Network {
    /// Each on a loopback address of its own in the block 127.a.b.0/23 (this is 127.a.b.0);
    /// cuts go through the peers' lab hook.
    Loopback([u8; 3]),
    /// Each in a network namespace of its own; cuts are packet drops in the namespaces.
    Namespaces(Namespaces),
}

struct Proc {
    pid: u32,
    /// A pidfd for the child: signals through it reach this process or nobody, even once the
    /// pid is reaped and reused.
    pidfd: OwnedFd,
    stdin: ChildStdin,
    exited: watch::Receiver<bool>,
    /// Cuts and conditions last sent through the hook.
    links: Links,
}

impl ProcessBackend {
    pub fn new(peer_bin: impl Into<PathBuf>) -> ProcessBackend {
        let [a, b] = rand::random::<[u8; 2]>();
        ProcessBackend::on(peer_bin.into(), Network::Loopback([127, a.max(1), b.min(253)]))
    }

    /// The netns backend: each peer in a network namespace of its own (needs root, else
    /// [`netns::NeedsRoot`]).
    pub fn in_namespaces(peer_bin: impl Into<PathBuf>) -> anyhow::Result<ProcessBackend> {
        Ok(ProcessBackend::on(peer_bin.into(), Network::Namespaces(Namespaces::create()?)))
    }

    fn on(peer_bin: PathBuf, network: Network) -> ProcessBackend {
        ProcessBackend {
            peer_bin,
            network,
            addresses: HashMap::new(),
            procs: HashMap::new(),
            ports: HashMap::new(),
            states: StateDirs::new(),
        }
    }

    /// The address of the `n`-th name of this lab (from 0): 127.a.b.2 onwards, over two /24s
    /// on loopback; 10.s.0.2 onwards in namespaces.
    fn nth(&self, n: usize) -> anyhow::Result<Ipv4Addr> {
        match &self.network {
            Network::Loopback([_, a, b]) => {
                anyhow::ensure!(n < MAX_PEERS, "the process backend runs at most {MAX_PEERS} peer names");
                Ok(Ipv4Addr::new(127, *a, b + (n / 254) as u8, 2 + (n % 254) as u8))
            }
            Network::Namespaces(net) => net.nth(n),
        }
    }

    /// The address of peer `name`, given on first use and kept.
    fn address(&mut self, name: &str) -> anyhow::Result<Ipv4Addr> {
        if let Some(ip) = self.addresses.get(name) {
            return Ok(*ip);
        }
        let ip = self.nth(self.addresses.len())?;
        self.addresses.insert(name.to_owned(), ip);
        Ok(ip)
    }

    /// The loopback address of peer `name`, once it has been started.
    pub fn ip_of(&self, name: &str) -> Option<Ipv4Addr> {
        self.addresses.get(name).copied()
    }

    /// The address the next new peer name will get.
    pub fn next_ip(&self) -> Ipv4Addr {
        self.next_ips(1)[0]
    }

    /// The addresses the next `k` new peer names will get, in order.
    pub fn next_ips(&self, k: usize) -> Vec<Ipv4Addr> {
        (0..k).map(|i| self.nth(self.addresses.len() + i).expect("in the block")).collect()
    }

    /// An address of this lab's block that no peer has, for a test's own hosts (an attacker, a
    /// relay): the last one of the block.
    pub fn spare_ip(&self) -> Ipv4Addr {
        self.spare_ips(1)[0]
    }

    /// `k` addresses of this lab's block that no peer has (from the end of the block), as long
    /// as the lab runs fewer than `MAX_PEERS - k` peers.
    pub fn spare_ips(&self, k: usize) -> Vec<Ipv4Addr> {
        (0..k).map(|i| self.nth(MAX_PEERS - 1 - i).expect("in the block")).collect()
    }

    fn command(&self, spec: &PeerSpec, ip: Ipv4Addr, port: u16) -> anyhow::Result<Command> {
        let mut cmd = Command::new(&self.peer_bin);
        cmd.args(["--json", "--name", &spec.name]);
        if let Network::Loopback(_) = self.network {
            cmd.args(hook_flags(&spec.links));
        }
        if spec.keep_state {
            cmd.arg("--state-dir").arg(self.states.of(&spec.name)?);
        }
        let place = [("--bind", ip.to_string()), ("--port", port.to_string())];
        cmd.args(merge_flags(&place, &with_lab_timing(&spec.flags)));
        cmd.args(&spec.bootstrap);
        cmd.env_remove("PORT").env_remove("PEER_NAME").env_remove("MESH_KEY");
        if let Some(key) = &spec.mesh_key {
            cmd.env("MESH_KEY", key);
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        let namespace = match &self.network {
            Network::Loopback(_) => None,
            Network::Namespaces(net) => Some(net.handle_of(&spec.name)?.try_clone()?),
        };
        // SAFETY: prctl and setns are async-signal-safe and touch nothing but the calling (child)
        // process.
        unsafe {
            cmd.pre_exec(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                namespace.as_ref().map_or(Ok(()), netns::enter)
            });
        }
        Ok(cmd)
    }

    /// The process id of a running peer.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs.get(name).map(|p| p.pid)
    }

    fn proc(&mut self, name: &str) -> anyhow::Result<&mut Proc> {
        self.procs.get_mut(name).with_context(|| format!("{name} is not running"))
    }
}

impl Backend for ProcessBackend {
    fn name(&self) -> &'static str {
        match self.network {
            Network::Loopback(_) => "process",
            Network::Namespaces(_) => "netns",
        }
    }

    fn describe(&self) -> String {
        match &self.network {
            Network::Loopback([_, a, b]) => {
                format!(
                    "process backend: each peer on its own address in 127.{a}.{b}.0/23, cuts and link conditions through their lab hook (cooperative)"
                )
            }
            Network::Namespaces(net) => net.describe(),
        }
    }

    fn time_scale(&self) -> f64 {
        1.0
    }

    fn cuts_acknowledged_by_events(&self) -> bool {
        matches!(self.network, Network::Loopback(_))
    }

    async fn prepare(&mut self, starts: &[(PeerSpec, u32)]) -> anyhow::Result<()> {
        let mut hosts = Vec::new();
        for (spec, _) in starts {
            hosts.push((spec.name.as_str(), self.address(&spec.name)?));
        }
        match &mut self.network {
            Network::Namespaces(net) => net.make(&hosts),
            Network::Loopback(_) => Ok(()),
        }
    }

    async fn start(&mut self, spec: PeerSpec, instance: u32, events: UnboundedSender<Observed>) -> anyhow::Result<()> {
        if self.procs.contains_key(&spec.name) {
            bail!("{} is already running", spec.name);
        }
        let ip = self.address(&spec.name)?;
        let port = match &mut self.network {
            // A restarted peer asks for its old port, unless something else took it meanwhile.
            Network::Loopback(_) => self.ports.get(&spec.name).copied().filter(|p| port_is_free(ip, *p)).unwrap_or(0),
            // Its own namespace, its own ports; the cuts in force are there before it starts.
            Network::Namespaces(net) => {
                net.make(&[(&spec.name, ip)])?;
                net.set_links(&spec.name, &spec.links).await?;
                netns::PORT
            }
        };
        let child = self
            .command(&spec, ip, port)?
            .spawn()
            .with_context(|| format!("cannot start {} ({})", spec.name, self.peer_bin.display()))?;
        let proc = watch_child(child, &spec.name, instance, events, spec.links.clone())?;
        self.procs.insert(spec.name, proc);
        Ok(())
    }

    fn address_of(&self, _name: &str, listen: &str) -> String {
        listen.to_owned()
    }

    fn exited(&mut self, name: &str) {
        self.procs.remove(name);
    }

    fn listened(&mut self, name: &str, listen: &str) {
        if let Some(port) = listen.rsplit_once(':').and_then(|(_, p)| p.parse().ok()) {
            self.ports.insert(name.to_owned(), port);
        }
    }

    async fn say(&mut self, name: &str, line: &str) -> anyhow::Result<()> {
        let proc = self.proc(name)?;
        let mut buf = line.as_bytes().to_vec();
        buf.push(b'\n');
        proc.stdin.write_all(&buf).await.with_context(|| format!("cannot write to {name}'s stdin"))
    }

    async fn stop(&mut self, name: &str, how: Stop, grace: Duration) -> anyhow::Result<()> {
        let mut proc = self.procs.remove(name).with_context(|| format!("{name} is not running"))?;
        let pidfd = &proc.pidfd;
        let signal = |how| async move {
            signal(pidfd, if how == Stop::Kill { libc::SIGKILL } else { libc::SIGTERM });
            Ok(())
        };
        stop_within(name, how, grace, &mut proc.exited, signal).await
    }

    async fn pause(&mut self, name: &str) -> anyhow::Result<()> {
        signal(&self.proc(name)?.pidfd, libc::SIGSTOP);
        Ok(())
    }

    async fn resume(&mut self, name: &str) -> anyhow::Result<()> {
        signal(&self.proc(name)?.pidfd, libc::SIGCONT);
        Ok(())
    }

    async fn set_links(&mut self, name: &str, links: &Links) -> anyhow::Result<()> {
        let proc = self.procs.get_mut(name).with_context(|| format!("{name} is not running"))?;
        if proc.links == *links {
            return Ok(());
        }
        let old = std::mem::replace(&mut proc.links, links.clone());
        match &mut self.network {
            Network::Loopback(_) => {
                let lines = hook_commands(&old, links);
                proc.stdin.write_all(lines.as_bytes()).await.with_context(|| format!("cannot write to {name}'s stdin"))
            }
            Network::Namespaces(net) => net.set_links(name, links).await,
        }
    }

    fn can_delay(&self) -> bool {
        match &self.network {
            Network::Loopback(_) => true,
            Network::Namespaces(_) => super::kernel_has_netem(),
        }
    }

    async fn shutdown(&mut self) {
        // Every peer is signalled first, then all are awaited: 256 peers go in one step.
        let procs: Vec<Proc> = self.procs.drain().map(|(_, p)| p).collect();
        for proc in &procs {
            signal(&proc.pidfd, libc::SIGKILL);
        }
        for mut proc in procs {
            let _ = proc.exited.wait_for(|e| *e).await;
        }
        if let Network::Namespaces(net) = &mut self.network {
            net.remove();
        }
    }
}

impl Drop for ProcessBackend {
    fn drop(&mut self) {
        for proc in self.procs.values() {
            signal(&proc.pidfd, libc::SIGKILL);
        }
    }
}

/// Signals a child through its pidfd; nothing happens if it already exited.
fn signal(pidfd: &OwnedFd, signal: i32) {
    // SAFETY: pidfd_send_signal(2) with a pidfd we own, no siginfo and no flags.
    unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, pidfd.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0);
    }
}

/// Opens a pidfd for a child not reaped yet (so the pid is still its own).
fn pidfd_open(pid: u32) -> anyhow::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("pidfd_open (Linux 5.3 or later is needed)");
    }
    // SAFETY: the fd was just returned by the kernel and is owned by no one else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn port_is_free(ip: Ipv4Addr, port: u16) -> bool {
    std::net::TcpListener::bind((ip, port)).is_ok()
}

/// Spawns the readers of a child's stdout and stderr and the watcher of its exit.
fn watch_child(
    mut child: Child,
    name: &str,
    instance: u32,
    events: UnboundedSender<Observed>,
    links: Links,
) -> anyhow::Result<Proc> {
    let pid = child.id().context("child has no pid")?;
    let pidfd = pidfd_open(pid)?;
    let stdin = child.stdin.take().context("no stdin")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let observe = {
        let name = name.to_owned();
        move |what: Observation| Observed { peer: name.clone(), instance, at: Instant::now(), what }
    };
    let tx = events.clone();
    let obs = observe.clone();
    let out = tokio::spawn(async move {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send(obs(Observation::from_stdout(&line)));
        }
    });
    let tx = events.clone();
    let obs = observe.clone();
    let err = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let _ = tx.send(obs(Observation::Stderr(line)));
        }
    });
    let (exited_tx, exited) = watch::channel(false);
    tokio::spawn(async move {
        let status = child.wait().await;
        let _ = out.await;
        let _ = err.await;
        let status = match status {
            Ok(s) => s.to_string(),
            Err(e) => format!("unknown ({e})"),
        };
        let _ = events.send(observe(Observation::Exited(status)));
        let _ = exited_tx.send(true);
    });
    Ok(Proc { pid, pidfd, stdin, exited, links })
}
