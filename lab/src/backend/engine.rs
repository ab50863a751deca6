//! Peers running as containers of one Docker engine: what the docker and swarm backends share
//! once a peer's container runs. They differ in how a container comes to be (created by the lab,
//! or a swarm task) and where it is on the network; from then on, its stdin and stdout are the
//! attach stream, a stop is a signal through the engine, a pause is the cgroup freezer, and cuts
//! are iptables rules in its network namespace (entered with nsenter, as root) or, where that is
//! impossible, the peer's lab hook.

use std::collections::HashMap;
use std::pin::Pin;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use bollard::Docker;
use bollard::container::{AttachContainerResults, LogOutput};
use bollard::models::ContainerInspectResponse;
use bollard::query_parameters::{AttachContainerOptionsBuilder, KillContainerOptionsBuilder};
use futures_util::StreamExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

use super::{AddressOf, Links, PeerSpec, Stop, apply_links, hook_commands, hook_flags, reapply_links, stop_within};
use crate::world::{Observation, Observed};

/// The label on everything a lab creates in an engine.
pub const LABEL: &str = "meshlab.lab";
/// The label naming the pid of the lab that created it.
pub const OWNER: &str = "meshlab.lab.owner";
/// The port peers listen on in their containers.
pub const PORT: u16 = 4000;
/// Where a peer's state directory is mounted in its container.
pub const STATE_MOUNT: &str = "/state";
/// The interface of a container on the lab's network.
const DEV: &str = "eth0";

/// How links are cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CutMethod {
    /// iptables rules inside each container's network namespace.
    PacketFilter,
    /// The peers' lab hook, because packet filtering is unavailable (the reason).
    Hook(String),
}

impl CutMethod {
    /// Packet filtering needs root, nsenter and iptables-restore on the host.
    pub fn probe() -> CutMethod {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return CutMethod::Hook("the lab does not run as root".into());
        }
        for tool in ["nsenter", "iptables-restore"] {
            let found =
                std::process::Command::new(tool).arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status();
            if !found.is_ok_and(|s| s.success()) {
                return CutMethod::Hook(format!("{tool} is not installed"));
            }
        }
        CutMethod::PacketFilter
    }

    /// The end of a backend's description: how cuts are made.
    pub fn describe(&self) -> String {
        match self {
            CutMethod::PacketFilter => "cuts by iptables in each container's network namespace".into(),
            CutMethod::Hook(why) => {
                format!("packet filtering unavailable ({why}), so cuts go through the peers' lab hook instead")
            }
        }
    }
}

/// A running peer's container.
pub struct Container {
    pub id: String,
    /// Its process on the host, whose network namespace holds its links.
    pub pid: u32,
    input: Pin<Box<dyn AsyncWrite + Send>>,
    exited: watch::Receiver<bool>,
    /// Cuts and conditions in force in it.
    links: Links,
}

/// The running peers of one engine, by name.
pub struct Containers {
    pub docker: Docker,
    pub method: CutMethod,
    peers: HashMap<String, Container>,
}

impl Containers {
    pub fn new(docker: Docker) -> Containers {
        Containers { docker, method: CutMethod::probe(), peers: HashMap::new() }
    }

    pub fn get(&self, name: &str) -> Option<&Container> {
        self.peers.get(name)
    }

    pub fn running(&self, name: &str) -> bool {
        self.peers.contains_key(name)
    }

    /// The names running, with the links in force in each.
    pub fn links(&self) -> impl Iterator<Item = (&str, &Links)> {
        self.peers.iter().map(|(name, c)| (name.as_str(), &c.links))
    }

    /// The peer's command line (after the image's entrypoint).
    pub fn args(&self, spec: &PeerSpec) -> Vec<String> {
        let mut args = vec!["--json".into(), "--name".into(), spec.name.clone(), "--port".into(), PORT.to_string()];
        if spec.keep_state {
            args.extend(["--state-dir".to_string(), STATE_MOUNT.to_string()]);
        }
        if let CutMethod::Hook(_) = self.method {
            args.extend(hook_flags(&spec.links));
        }
        args.extend(super::with_lab_timing(&spec.flags));
        args.extend(spec.bootstrap.iter().cloned());
        args
    }

    /// Attaches to a container's stdin, stdout and stderr; `logs` also replays what it printed
    /// before (for a container that already runs).
    pub async fn attach(&self, id: &str, logs: bool) -> anyhow::Result<AttachContainerResults> {
        let attach =
            AttachContainerOptionsBuilder::new().stdin(true).stdout(true).stderr(true).stream(true).logs(logs).build();
        Ok(self.docker.attach_container(id, Some(attach)).await?)
    }

    /// Takes a started container on as peer `spec.name`: its output becomes observations and
    /// the links `spec` starts with are applied. Returns what the engine says of it.
    pub async fn adopt(
        &mut self,
        spec: &PeerSpec,
        id: &str,
        attached: AttachContainerResults,
        instance: u32,
        events: UnboundedSender<Observed>,
        address_of: impl AddressOf,
    ) -> anyhow::Result<ContainerInspectResponse> {
        let inspected =
            self.docker.inspect_container(id, None::<bollard::query_parameters::InspectContainerOptions>).await?;
        let pid =
            inspected.state.as_ref().and_then(|s| s.pid).filter(|p| *p > 0).context("the container has no process")?;
        let exited = watch_output(self.docker.clone(), id.to_owned(), attached.output, &spec.name, instance, events);
        let container =
            Container { id: id.to_owned(), pid: pid as u32, input: attached.input, exited, links: Links::default() };
        self.peers.insert(spec.name.clone(), container);
        if self.method == CutMethod::PacketFilter {
            self.set_links(&spec.name, &spec.links, address_of).await?;
        }
        self.peers.get_mut(&spec.name).expect("inserted above").links = spec.links.clone();
        Ok(inspected)
    }

    /// Forgets a peer that exited on its own; returns its container.
    pub fn exited(&mut self, name: &str) -> Option<Container> {
        self.peers.remove(name)
    }

    pub async fn say(&mut self, name: &str, line: &str) -> anyhow::Result<()> {
        let mut buf = line.as_bytes().to_vec();
        buf.push(b'\n');
        self.write(name, &buf).await
    }

    async fn write(&mut self, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        let c = self.peers.get_mut(name).with_context(|| format!("{name} is not running"))?;
        c.input.write_all(bytes).await.with_context(|| format!("cannot write to {name}'s stdin"))?;
        c.input.flush().await?;
        Ok(())
    }

    /// Stops a peer through the engine; returns its container (to remove) and how the stop went.
    pub async fn stop(
        &mut self,
        name: &str,
        how: Stop,
        grace: Duration,
    ) -> anyhow::Result<(Container, anyhow::Result<()>)> {
        let mut c = self.peers.remove(name).with_context(|| format!("{name} is not running"))?;
        let (docker, id) = (&self.docker, &c.id);
        let signal = |how| async move {
            let signal = if how == Stop::Kill { "SIGKILL" } else { "SIGTERM" };
            let kill = KillContainerOptionsBuilder::new().signal(signal).build();
            docker.kill_container(id, Some(kill)).await.with_context(|| format!("cannot signal {name}"))
        };
        let result = stop_within(name, how, grace, &mut c.exited, signal).await;
        Ok((c, result))
    }

    pub async fn pause(&mut self, name: &str) -> anyhow::Result<()> {
        let c = self.peers.get(name).with_context(|| format!("{name} is not running"))?;
        self.docker.pause_container(&c.id).await.with_context(|| format!("cannot pause {name}"))
    }

    pub async fn resume(&mut self, name: &str) -> anyhow::Result<()> {
        let c = self.peers.get(name).with_context(|| format!("{name} is not running"))?;
        self.docker.unpause_container(&c.id).await.with_context(|| format!("cannot resume {name}"))
    }

    /// Makes `name` treat each peer `links` lists as cut or conditioned.
    pub async fn set_links(&mut self, name: &str, links: &Links, address_of: impl AddressOf) -> anyhow::Result<()> {
        let c = self.peers.get(name).with_context(|| format!("{name} is not running"))?;
        if c.links == *links {
            return Ok(());
        }
        match self.method {
            CutMethod::PacketFilter => {
                let pid = c.pid.to_string();
                apply_links(&["nsenter", "-t", &pid, "-n"], DEV, &c.links, links, address_of)
                    .await
                    .with_context(|| format!("cannot apply {name}'s cuts and conditions in its network namespace"))?;
            }
            CutMethod::Hook(_) => {
                let lines = hook_commands(&c.links, links);
                self.write(name, lines.as_bytes()).await?;
            }
        }
        self.peers.get_mut(name).expect("checked above").links = links.clone();
        Ok(())
    }

    /// Makes the rules of every running peer whose links name `moved` again, after `moved` came
    /// back at another address (hook cuts go by name and need nothing).
    pub async fn readdress(&self, moved: &str, mut address_of: impl AddressOf) -> anyhow::Result<()> {
        if self.method != CutMethod::PacketFilter {
            return Ok(());
        }
        for (name, c) in &self.peers {
            let names = c.links.cuts.iter().map(|c| &c.0).chain(c.links.conditions.iter().map(|c| &c.0));
            if names.into_iter().any(|n| n == moved) {
                let pid = c.pid.to_string();
                reapply_links(&["nsenter", "-t", &pid, "-n"], DEV, &c.links, &mut address_of)
                    .await
                    .with_context(|| format!("cannot redo {name}'s rules for {moved}'s new address"))?;
            }
        }
        Ok(())
    }

    /// Forgets every peer (their containers are removed by the backend).
    pub fn clear(&mut self) {
        self.peers.clear();
    }
}

/// A container's environment: the mesh key, and (like the process backend's children) the
/// lab's RUST_LOG.
pub fn env(spec: &PeerSpec) -> Vec<String> {
    let log = std::env::var("RUST_LOG").ok().map(|v| format!("RUST_LOG={v}"));
    let key = spec.mesh_key.as_ref().map(|k| format!("MESH_KEY={k}"));
    log.into_iter().chain(key).collect()
}

/// The labels of everything this lab creates.
pub fn labels() -> HashMap<String, String> {
    HashMap::from([(LABEL.to_string(), "1".to_string()), (OWNER.to_string(), std::process::id().to_string())])
}

/// Whether the lab that created something with these labels still runs.
pub fn owner_alive(labels: Option<&HashMap<String, String>>) -> bool {
    let Some(pid) = labels.and_then(|l| l.get(OWNER)).and_then(|p| p.parse::<i32>().ok()) else { return false };
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Runs the docker command with `args`, quietly, for cleanups where no runtime is left to await
/// on (a drop after a panic or an early return).
pub fn docker_command(args: &[&str]) {
    let _ = std::process::Command::new("docker").args(args).stdout(Stdio::null()).stderr(Stdio::null()).status();
}

/// Cuts a byte stream (the attach stream's chunks) into lines.
#[derive(Default)]
struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut lines = Vec::new();
        while let Some(end) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=end).collect();
            lines.push(String::from_utf8_lossy(&line[..end]).trim_end_matches('\r').to_string());
        }
        lines
    }
}

type Output = Pin<Box<dyn futures_util::Stream<Item = Result<LogOutput, bollard::errors::Error>> + Send>>;

/// Reads a container's output into observations until it ends, then reports its exit.
fn watch_output(
    docker: Docker,
    id: String,
    mut output: Output,
    name: &str,
    instance: u32,
    events: UnboundedSender<Observed>,
) -> watch::Receiver<bool> {
    let (exited_tx, exited) = watch::channel(false);
    let name = name.to_owned();
    tokio::spawn(async move {
        let observe = |what| Observed { peer: name.clone(), instance, at: Instant::now(), what };
        let (mut out, mut err) = (Lines::default(), Lines::default());
        while let Some(Ok(chunk)) = output.next().await {
            match chunk {
                LogOutput::StdOut { message } | LogOutput::Console { message } => {
                    for line in out.push(&message) {
                        let _ = events.send(observe(Observation::from_stdout(&line)));
                    }
                }
                LogOutput::StdErr { message } => {
                    for line in err.push(&message) {
                        let _ = events.send(observe(Observation::Stderr(line)));
                    }
                }
                LogOutput::StdIn { .. } => {}
            }
        }
        let mut wait = docker.wait_container(&id, None::<bollard::query_parameters::WaitContainerOptions>);
        let status = match wait.next().await {
            Some(Ok(r)) => format!("exit status: {}", r.status_code),
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => format!("exit status: {code}"),
            _ => "exited".to_string(),
        };
        let _ = events.send(observe(Observation::Exited(status)));
        let _ = exited_tx.send(true);
    });
    exited
}
