//! Peers running as containers of one Docker engine: what the docker and swarm backends share
//! once a peer's container runs. They differ in how a container comes to be (created by the lab,
//! or a swarm task) and where it is on the network; from then on, its stdin and stdout are the
//! attach stream, a stop is a signal through the engine, a pause is the cgroup freezer, and cuts
//! are iptables rules in its network namespace (entered with nsenter, as root) or, where that is
//! impossible, the peer's lab hook.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{Ipam, IpamConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, KillContainerOptionsBuilder, RemoveContainerOptionsBuilder,
};
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

use super::{
    AddressOf, Links, Namespace, PeerSpec, Stop, apply_links, hook_commands, hook_flags, reapply_links, stop_within,
};
use crate::agent::{Agent, Answer, Call};
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

    /// Whether cuts and conditions go through the peers' hook, acknowledged by their events.
    pub fn through_hook(&self) -> bool {
        matches!(self, CutMethod::Hook(_))
    }

    /// Whether delays can be made: by netem in the kernel, or by the peers themselves.
    pub fn can_delay(&self) -> bool {
        match self {
            CutMethod::PacketFilter => super::kernel_has_netem(),
            CutMethod::Hook(_) => true,
        }
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

/// A tool the lab feeds input to in a container's network namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tool {
    IptablesRestore,
    TcBatch,
}

impl Tool {
    pub fn command(self) -> &'static [&'static str] {
        match self {
            Tool::IptablesRestore => &["iptables-restore"],
            Tool::TcBatch => &["tc", "-batch", "-"],
        }
    }
}

/// A piece of a container's output, or its end with its exit status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chunk {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    Ended(String),
}

impl Chunk {
    /// The chunk as pieces of at most `max` bytes.
    pub fn split(self, max: usize) -> Vec<Chunk> {
        match self {
            Chunk::Stdout(b) => b.chunks(max).map(|c| Chunk::Stdout(c.to_vec())).collect(),
            Chunk::Stderr(b) => b.chunks(max).map(|c| Chunk::Stderr(c.to_vec())).collect(),
            ended => vec![ended],
        }
    }
}

/// A container's output, ending with [`Chunk::Ended`].
pub type Output = Pin<Box<dyn Stream<Item = Chunk> + Send>>;
/// A container's stdin.
pub type Input = Pin<Box<dyn AsyncWrite + Send>>;

/// The engine a container runs on: the lab's own, or another node's through its agent.
#[derive(Clone)]
pub enum Engine {
    Local(Docker),
    Agent(Agent),
}

impl Engine {
    /// Attaches to a container's stdin and output (replaying what it printed so far).
    pub async fn attach(&self, id: &str) -> anyhow::Result<(Input, Output)> {
        match self {
            Engine::Local(docker) => {
                let options =
                    AttachContainerOptionsBuilder::new().stdin(true).stdout(true).stderr(true).stream(true).logs(true);
                let attached = docker.attach_container(id, Some(options.build())).await?;
                let chunks = attached.output.take_while(|o| std::future::ready(o.is_ok())).filter_map(|o| async move {
                    match o.ok()? {
                        LogOutput::StdOut { message } | LogOutput::Console { message } => {
                            Some(Chunk::Stdout(message.to_vec()))
                        }
                        LogOutput::StdErr { message } => Some(Chunk::Stderr(message.to_vec())),
                        LogOutput::StdIn { .. } => None,
                    }
                });
                let end = futures_util::stream::once(exit_status(docker.clone(), id.to_owned())).map(Chunk::Ended);
                Ok((attached.input, Box::pin(chunks.chain(end))))
            }
            Engine::Agent(agent) => {
                let (input, rx) = agent.attach(id).await?;
                let chunks = futures_util::stream::unfold(rx, |mut rx| async move { Some((rx.recv().await?, rx)) });
                Ok((input, Box::pin(chunks)))
            }
        }
    }

    /// A container's host pid, and its address on `network` (if it is on it).
    pub async fn inspect(&self, id: &str, network: &str) -> anyhow::Result<(u32, Option<Ipv4Addr>)> {
        match self {
            Engine::Local(docker) => {
                let inspected =
                    docker.inspect_container(id, None::<bollard::query_parameters::InspectContainerOptions>).await?;
                let pid =
                    inspected.state.and_then(|s| s.pid).filter(|p| *p > 0).context("the container has no process")?;
                let ip = inspected
                    .network_settings
                    .and_then(|s| s.networks?.remove(network)?.ip_address)
                    .and_then(|ip| ip.parse().ok());
                Ok((pid as u32, ip))
            }
            Engine::Agent(agent) => {
                match agent.call(Call::Inspect { container: id.into(), network: network.into() }).await? {
                    Answer::Inspected { pid, ip } => Ok((pid, ip)),
                    Answer::Done => anyhow::bail!("the agent at {} did not say where {id} is", agent.address()),
                }
            }
        }
    }

    pub async fn signal(&self, id: &str, signal: &str) -> anyhow::Result<()> {
        match self {
            Engine::Local(docker) => {
                let kill = KillContainerOptionsBuilder::new().signal(signal).build();
                Ok(docker.kill_container(id, Some(kill)).await?)
            }
            Engine::Agent(agent) => {
                agent.call(Call::Signal { container: id.into(), signal: signal.into() }).await.map(drop)
            }
        }
    }

    pub async fn pause(&self, id: &str) -> anyhow::Result<()> {
        match self {
            Engine::Local(docker) => Ok(docker.pause_container(id).await?),
            Engine::Agent(agent) => agent.call(Call::Pause { container: id.into() }).await.map(drop),
        }
    }

    pub async fn unpause(&self, id: &str) -> anyhow::Result<()> {
        match self {
            Engine::Local(docker) => Ok(docker.unpause_container(id).await?),
            Engine::Agent(agent) => agent.call(Call::Unpause { container: id.into() }).await.map(drop),
        }
    }

    /// Removes a container now, thawing it first: the engine may refuse to kill a frozen one.
    pub async fn remove(&self, id: &str) {
        match self {
            Engine::Local(docker) => {
                let _ = docker.unpause_container(id).await;
                let force = RemoveContainerOptionsBuilder::new().force(true).build();
                let _ = docker.remove_container(id, Some(force)).await;
            }
            Engine::Agent(agent) => {
                let _ = agent.call(Call::Remove { container: id.into() }).await;
            }
        }
    }

    /// Feeds `input` to `tool` in the network namespace of container `id` (host pid `pid`).
    pub async fn feed(&self, id: &str, pid: u32, tool: Tool, input: &str) -> anyhow::Result<()> {
        match self {
            Engine::Local(_) => {
                let pid = pid.to_string();
                let command: Vec<String> =
                    ["nsenter", "-t", &pid, "-n"].iter().chain(tool.command()).map(|s| s.to_string()).collect();
                super::feed(&command, input).await
            }
            Engine::Agent(agent) => {
                let call = Call::Feed { container: id.into(), tool, input: input.into() };
                agent.call(call).await.map(drop)
            }
        }
    }
}

/// A container's exit status, once it has exited.
async fn exit_status(docker: Docker, id: String) -> String {
    let mut wait = docker.wait_container(&id, None::<bollard::query_parameters::WaitContainerOptions>);
    match wait.next().await {
        Some(Ok(r)) => format!("exit status: {}", r.status_code),
        Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => format!("exit status: {code}"),
        _ => "exited".to_string(),
    }
}

/// A container's network namespace, through its engine.
struct InContainer<'a> {
    engine: &'a Engine,
    id: &'a str,
    pid: u32,
}

impl Namespace for InContainer<'_> {
    async fn feed(&self, tool: Tool, input: &str) -> anyhow::Result<()> {
        self.engine.feed(self.id, self.pid, tool, input).await
    }
}

/// A running peer's container.
pub struct Container {
    pub id: String,
    /// The engine it runs on.
    pub engine: Engine,
    /// Its process on its host, whose network namespace holds its links.
    pub pid: u32,
    input: Input,
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

    /// Takes a started container on as peer `spec.name`, given what `engine` attached to and
    /// what it said of it: its output becomes observations and the links `spec` starts with are
    /// applied.
    #[allow(clippy::too_many_arguments)]
    pub async fn adopt(
        &mut self,
        spec: &PeerSpec,
        engine: Engine,
        id: &str,
        pid: u32,
        (input, output): (Input, Output),
        instance: u32,
        events: UnboundedSender<Observed>,
        address_of: impl AddressOf,
    ) -> anyhow::Result<()> {
        let exited = watch_output(output, &spec.name, instance, events);
        let container = Container { id: id.to_owned(), engine, pid, input, exited, links: Links::default() };
        self.peers.insert(spec.name.clone(), container);
        if self.method == CutMethod::PacketFilter {
            self.set_links(&spec.name, &spec.links, address_of).await?;
        }
        self.peers.get_mut(&spec.name).expect("inserted above").links = spec.links.clone();
        Ok(())
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
        let (engine, id) = (&c.engine, &c.id);
        let signal = |how| async move {
            let signal = if how == Stop::Kill { "SIGKILL" } else { "SIGTERM" };
            engine.signal(id, signal).await.with_context(|| format!("cannot signal {name}"))
        };
        let result = stop_within(name, how, grace, &mut c.exited, signal).await;
        Ok((c, result))
    }

    pub async fn pause(&mut self, name: &str) -> anyhow::Result<()> {
        let c = self.peers.get(name).with_context(|| format!("{name} is not running"))?;
        c.engine.pause(&c.id).await.with_context(|| format!("cannot pause {name}"))
    }

    pub async fn resume(&mut self, name: &str) -> anyhow::Result<()> {
        let c = self.peers.get(name).with_context(|| format!("{name} is not running"))?;
        c.engine.unpause(&c.id).await.with_context(|| format!("cannot resume {name}"))
    }

    /// Makes `name` treat each peer `links` lists as cut or conditioned.
    pub async fn set_links(&mut self, name: &str, links: &Links, address_of: impl AddressOf) -> anyhow::Result<()> {
        let c = self.peers.get(name).with_context(|| format!("{name} is not running"))?;
        if c.links == *links {
            return Ok(());
        }
        match self.method {
            CutMethod::PacketFilter => {
                let namespace = InContainer { engine: &c.engine, id: &c.id, pid: c.pid };
                apply_links(&namespace, DEV, &c.links, links, address_of)
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
                let namespace = InContainer { engine: &c.engine, id: &c.id, pid: c.pid };
                reapply_links(&namespace, DEV, &c.links, &mut address_of)
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

/// The network a run's peers share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkKind {
    /// A bridge on a /24 whose addresses the lab gives out (253 peers).
    Bridge,
    /// An attachable swarm overlay on a /22 (1,021 tasks), whose addresses the swarm gives out.
    Overlay,
}

/// Creates a network named `name` on a free subnet of 10.0.0.0/8 and returns its first three
/// octets.
pub async fn create_network(docker: &Docker, name: &str, kind: NetworkKind) -> anyhow::Result<[u8; 3]> {
    let mut last = None;
    for _ in 0..20 {
        let [b, c] = rand::random::<[u8; 2]>();
        let (subnet, prefix) = match kind {
            NetworkKind::Bridge => ([10, b.clamp(1, 254), c], 24),
            NetworkKind::Overlay => ([10, b.clamp(1, 254), c & !3], 22),
        };
        let [a, b, c] = subnet;
        let config = IpamConfig {
            subnet: Some(format!("{a}.{b}.{c}.0/{prefix}")),
            gateway: (kind == NetworkKind::Bridge).then(|| format!("{a}.{b}.{c}.1")),
            ..Default::default()
        };
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some(match kind {
                NetworkKind::Bridge => "bridge".into(),
                NetworkKind::Overlay => "overlay".into(),
            }),
            attachable: Some(kind == NetworkKind::Overlay),
            labels: Some(labels()),
            ipam: Some(Ipam { config: Some(vec![config]), ..Default::default() }),
            ..Default::default()
        };
        match docker.create_network(request).await {
            Ok(_) => return Ok(subnet),
            Err(e) => last = Some(e),
        }
    }
    let why = last.map(|e| e.to_string()).unwrap_or_default();
    Err(anyhow::anyhow!("cannot create a network for the lab: {why}"))
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

/// Reads a container's output into observations until it ends, then reports its exit.
fn watch_output(
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
        let mut status = "exited".to_string();
        while let Some(chunk) = output.next().await {
            match chunk {
                Chunk::Stdout(bytes) => {
                    for line in out.push(&bytes) {
                        let _ = events.send(observe(Observation::from_stdout(&line)));
                    }
                }
                Chunk::Stderr(bytes) => {
                    for line in err.push(&bytes) {
                        let _ = events.send(observe(Observation::Stderr(line)));
                    }
                }
                Chunk::Ended(how) => {
                    status = how;
                    break;
                }
            }
        }
        let _ = events.send(observe(Observation::Exited(status)));
        let _ = exited_tx.send(true);
    });
    exited
}
