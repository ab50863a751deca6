//! The process backend: each peer is a local `peer` process on 127.0.0.1, needing no privilege.
//!
//! Each backend puts its peers on a loopback address of its own (a random 127.x.y.z), so that
//! labs running side by side (parallel tests) never meet, even when one's peer redials a port
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

use super::{Backend, PeerSpec, StateDirs, Stop, hook_commands, hook_flags, merge_flags, stop_within, with_lab_timing};
use crate::world::{Observation, Observed};

pub struct ProcessBackend {
    peer_bin: PathBuf,
    /// The loopback address every peer of this backend binds to.
    ip: Ipv4Addr,
    procs: HashMap<String, Proc>,
    /// Last port each name listened on, reused on restart.
    ports: HashMap<String, u16>,
    states: StateDirs,
}

struct Proc {
    pid: u32,
    /// A pidfd for the child: signals through it reach this process or nobody, even once the
    /// pid is reaped and reused.
    pidfd: OwnedFd,
    stdin: ChildStdin,
    exited: watch::Receiver<bool>,
    /// Cuts last sent through the hook.
    cuts: Vec<(String, bool, bool)>,
}

impl ProcessBackend {
    pub fn new(peer_bin: impl Into<PathBuf>) -> ProcessBackend {
        let [a, b, c] = rand::random::<[u8; 3]>();
        let ip = Ipv4Addr::new(127, a.max(1), b, c.clamp(2, 254));
        ProcessBackend {
            peer_bin: peer_bin.into(),
            ip,
            procs: HashMap::new(),
            ports: HashMap::new(),
            states: StateDirs::new(),
        }
    }

    fn command(&self, spec: &PeerSpec, port: u16) -> anyhow::Result<Command> {
        let mut cmd = Command::new(&self.peer_bin);
        cmd.args(["--json", "--name", &spec.name]).args(hook_flags(&spec.cuts));
        if spec.keep_state {
            cmd.arg("--state-dir").arg(self.states.of(&spec.name)?);
        }
        let place = [("--bind", self.ip.to_string()), ("--port", port.to_string())];
        cmd.args(merge_flags(&place, &with_lab_timing(&spec.flags)));
        cmd.args(&spec.bootstrap);
        cmd.env_remove("PORT").env_remove("PEER_NAME").env_remove("MESH_KEY");
        if let Some(key) = &spec.mesh_key {
            cmd.env("MESH_KEY", key);
        }
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
        // SAFETY: prctl is async-signal-safe and touches nothing but the calling (child) process.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// The loopback address this backend's peers listen on.
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
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
        "process"
    }

    fn describe(&self) -> String {
        format!("process backend: peers on {}, cuts through their lab hook", self.ip)
    }

    fn time_scale(&self) -> f64 {
        1.0
    }

    fn cuts_acknowledged_by_events(&self) -> bool {
        true
    }

    async fn start(&mut self, spec: PeerSpec, instance: u32, events: UnboundedSender<Observed>) -> anyhow::Result<()> {
        if self.procs.contains_key(&spec.name) {
            bail!("{} is already running", spec.name);
        }
        // A restarted peer asks for its old port, unless something else took it meanwhile.
        let port = self.ports.get(&spec.name).copied().filter(|p| port_is_free(self.ip, *p)).unwrap_or(0);
        let child = self
            .command(&spec, port)?
            .spawn()
            .with_context(|| format!("cannot start {} ({})", spec.name, self.peer_bin.display()))?;
        let proc = watch_child(child, &spec.name, instance, events, spec.cuts.clone())?;
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

    async fn set_cuts(&mut self, name: &str, cuts: &[(String, bool, bool)]) -> anyhow::Result<()> {
        let proc = self.proc(name)?;
        if proc.cuts == cuts {
            return Ok(());
        }
        let lines = hook_commands(&proc.cuts, cuts);
        proc.cuts = cuts.to_vec();
        proc.stdin.write_all(lines.as_bytes()).await.with_context(|| format!("cannot write to {name}'s stdin"))
    }

    async fn shutdown(&mut self) {
        for (_, mut proc) in self.procs.drain() {
            signal(&proc.pidfd, libc::SIGKILL);
            let _ = proc.exited.wait_for(|e| *e).await;
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
    cuts: Vec<(String, bool, bool)>,
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
    Ok(Proc { pid, pidfd, stdin, exited, cuts })
}
