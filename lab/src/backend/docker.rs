//! The docker backend: each peer is a container of the locally built image, on a network the
//! lab creates for the run.
//!
//! Containers are made and driven with bollard (the Docker API): created with stdin open, then
//! attached for stdin, stdout and stderr (testcontainers is not used: it cannot open a
//! container's stdin). Each peer name has a fixed address on the run's subnet and a network
//! alias, so peers bootstrap by name (`p1:4000`) and a restarted peer comes back at the same
//! address. Cuts are real packet drops: iptables rules in each container's network namespace
//! (entered with nsenter from the host, as root). Where that is not possible the backend says so
//! and cuts through the peers' lab hook instead.
//!
//! Everything the backend creates carries the label `meshlab.lab` and its owner's pid; on
//! connect it removes leftovers whose owner is dead (a lab killed earlier), and on shutdown, or
//! when dropped, it removes its own.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::pin::Pin;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::{
    ContainerCreateBody, EndpointIpamConfig, EndpointSettings, HostConfig, Ipam, IpamConfig, NetworkCreateRequest,
    NetworkingConfig,
};
use bollard::query_parameters::{
    AttachContainerOptionsBuilder, CreateContainerOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, ListNetworksOptionsBuilder, RemoveContainerOptionsBuilder,
};
use futures_util::StreamExt;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

use super::{
    Backend, Links, PeerSpec, StateDirs, Stop, apply_links, ensure_neighbour_room, hook_commands, hook_flags,
    stop_within, with_lab_timing,
};
use crate::world::{Observation, Observed};

/// The image scripts/build-image makes.
pub const DEFAULT_IMAGE: &str = "meshlab-peer:latest";
/// Containers start slower than processes: scenario deadlines are multiplied by this.
pub const TIME_SCALE: f64 = 3.0;
const LABEL: &str = "meshlab.lab";
const OWNER: &str = "meshlab.lab.owner";
const PORT: u16 = 4000;
/// Where a peer's state directory is mounted in its container.
const STATE_MOUNT: &str = "/state";

/// How links are cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CutMethod {
    /// iptables rules inside each container's network namespace.
    PacketFilter,
    /// The peers' lab hook, because packet filtering is unavailable (the reason).
    Hook(String),
}

pub struct DockerBackend {
    docker: Docker,
    image: String,
    network: String,
    /// The run's subnet: 10.a.b.0/24; peer names get fixed host numbers in it.
    subnet: [u8; 3],
    hosts: HashMap<String, u8>,
    peers: HashMap<String, Container>,
    method: CutMethod,
    /// Every container this backend created and has not removed.
    created: Vec<String>,
    states: StateDirs,
    shut: bool,
}

struct Container {
    id: String,
    pid: u32,
    input: Pin<Box<dyn AsyncWrite + Send>>,
    exited: watch::Receiver<bool>,
    /// Cuts and conditions in force in it.
    links: Links,
}

impl DockerBackend {
    /// Connects to the local engine, checks the image, removes leftovers of dead labs and
    /// creates this run's network.
    pub async fn connect(image: &str) -> anyhow::Result<DockerBackend> {
        let docker = Docker::connect_with_local_defaults().context("cannot reach a Docker engine")?;
        let docker = docker.negotiate_version().await.context("cannot reach a Docker engine")?;
        docker.ping().await.context("the Docker engine does not answer")?;
        docker
            .inspect_image(image)
            .await
            .with_context(|| format!("image {image} not found: build it with scripts/build-image"))?;
        remove_leftovers(&docker).await;
        let run = format!("{:08x}", rand::random::<u32>());
        let (network, subnet) = create_network(&docker, &run).await?;
        Ok(DockerBackend {
            docker,
            image: image.to_owned(),
            network,
            subnet,
            hosts: HashMap::new(),
            peers: HashMap::new(),
            method: probe_cut_method(),
            created: Vec::new(),
            states: StateDirs::new(),
            shut: false,
        })
    }

    pub fn cut_method(&self) -> &CutMethod {
        &self.method
    }

    /// The host pid of a running peer's container (whose network namespace holds its links).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.peers.get(name).map(|c| c.pid)
    }

    /// The fixed address of a peer name on the run's subnet.
    fn ip_of(&mut self, name: &str) -> anyhow::Result<Ipv4Addr> {
        let host = match self.hosts.get(name) {
            Some(host) => *host,
            None => {
                let next = u8::try_from(2 + self.hosts.len()) // .1 is the gateway
                    .ok()
                    .filter(|h| *h < 255)
                    .context("the docker backend runs at most 253 peer names (one /24 network)")?;
                *self.hosts.entry(name.to_owned()).or_insert(next)
            }
        };
        let [a, b, c] = self.subnet;
        Ok(Ipv4Addr::new(a, b, c, host))
    }

    fn container_name(&self, peer: &str) -> String {
        format!("{}-{peer}", self.network)
    }

    fn args(&self, spec: &PeerSpec) -> Vec<String> {
        let mut args = vec!["--json".into(), "--name".into(), spec.name.clone(), "--port".into(), PORT.to_string()];
        if spec.keep_state {
            args.extend(["--state-dir".to_string(), STATE_MOUNT.to_string()]);
        }
        if let CutMethod::Hook(_) = self.method {
            args.extend(hook_flags(&spec.links));
        }
        args.extend(with_lab_timing(&spec.flags));
        args.extend(spec.bootstrap.iter().cloned());
        args
    }

    async fn apply_in_namespace(&mut self, name: &str, old: &Links, new: &Links) -> anyhow::Result<()> {
        let pid = self.peers.get(name).with_context(|| format!("{name} is not running"))?.pid.to_string();
        apply_links(&["nsenter", "-t", &pid, "-n"], "eth0", old, new, |other| self.ip_of(other))
            .await
            .with_context(|| format!("cannot apply {name}'s cuts and conditions in its network namespace"))
    }

    async fn remove(&mut self, id: &str) {
        // A paused container is thawed first: the engine may refuse to kill a frozen one.
        let _ = self.docker.unpause_container(id).await;
        let force = RemoveContainerOptionsBuilder::new().force(true).build();
        let _ = self.docker.remove_container(id, Some(force)).await;
        self.created.retain(|c| c != id);
    }
}

impl Backend for DockerBackend {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn describe(&self) -> String {
        match &self.method {
            CutMethod::PacketFilter => {
                format!(
                    "docker backend: containers of {} on network {}, cuts by iptables in each container's network namespace",
                    self.image, self.network
                )
            }
            CutMethod::Hook(why) => format!(
                "docker backend: containers of {} on network {}; packet filtering unavailable ({why}), so cuts go through the peers' lab hook instead",
                self.image, self.network
            ),
        }
    }

    fn time_scale(&self) -> f64 {
        TIME_SCALE
    }

    fn cuts_acknowledged_by_events(&self) -> bool {
        matches!(self.method, CutMethod::Hook(_))
    }

    async fn start(&mut self, spec: PeerSpec, instance: u32, events: UnboundedSender<Observed>) -> anyhow::Result<()> {
        if self.peers.contains_key(&spec.name) {
            bail!("{} is already running", spec.name);
        }
        let ip = self.ip_of(&spec.name)?;
        ensure_neighbour_room(self.hosts.len())?;
        let name = self.container_name(&spec.name);
        let binds = match spec.keep_state {
            true => Some(format!("{}:{STATE_MOUNT}", self.states.of(&spec.name)?.display())),
            false => None,
        };
        let endpoint = EndpointSettings {
            aliases: Some(vec![spec.name.clone()]),
            ipam_config: Some(EndpointIpamConfig { ipv4_address: Some(ip.to_string()), ..Default::default() }),
            ..Default::default()
        };
        let body = ContainerCreateBody {
            image: Some(self.image.clone()),
            cmd: Some(self.args(&spec)),
            env: Some(env(&spec)),
            hostname: Some(spec.name.clone()),
            labels: Some(labels()),
            open_stdin: Some(true),
            stdin_once: Some(false),
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            host_config: Some(HostConfig {
                network_mode: Some(self.network.clone()),
                binds: binds.map(|b| vec![b]),
                ..Default::default()
            }),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(self.network.clone(), endpoint)])),
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let id = self
            .docker
            .create_container(Some(options), body)
            .await
            .with_context(|| format!("cannot create {name}"))?
            .id;
        self.created.push(id.clone());
        let attach =
            AttachContainerOptionsBuilder::new().stdin(true).stdout(true).stderr(true).stream(true).logs(true).build();
        let attached = self
            .docker
            .attach_container(&id, Some(attach))
            .await
            .with_context(|| format!("cannot attach to {name}"))?;
        self.docker
            .start_container(&id, None::<bollard::query_parameters::StartContainerOptions>)
            .await
            .with_context(|| format!("cannot start {name}"))?;
        let state =
            self.docker.inspect_container(&id, None::<bollard::query_parameters::InspectContainerOptions>).await?.state;
        let pid = state.and_then(|s| s.pid).filter(|p| *p > 0).context("the container has no process")? as u32;
        let exited = watch_output(self.docker.clone(), id.clone(), attached.output, &spec.name, instance, events);
        self.peers
            .insert(spec.name.clone(), Container { id, pid, input: attached.input, exited, links: Links::default() });
        if self.method == CutMethod::PacketFilter && spec.links != Links::default() {
            self.set_links(&spec.name, &spec.links).await?;
        }
        if let Some(c) = self.peers.get_mut(&spec.name) {
            c.links = spec.links;
        }
        Ok(())
    }

    fn address_of(&self, name: &str, _listen: &str) -> String {
        format!("{name}:{PORT}")
    }

    fn exited(&mut self, name: &str) {
        if let Some(c) = self.peers.remove(name) {
            let docker = self.docker.clone();
            self.created.retain(|x| *x != c.id);
            tokio::spawn(async move {
                let force = RemoveContainerOptionsBuilder::new().force(true).build();
                let _ = docker.remove_container(&c.id, Some(force)).await;
            });
        }
    }

    async fn say(&mut self, name: &str, line: &str) -> anyhow::Result<()> {
        let c = self.peers.get_mut(name).with_context(|| format!("{name} is not running"))?;
        let mut buf = line.as_bytes().to_vec();
        buf.push(b'\n');
        c.input.write_all(&buf).await.with_context(|| format!("cannot write to {name}'s stdin"))?;
        c.input.flush().await?;
        Ok(())
    }

    async fn stop(&mut self, name: &str, how: Stop, grace: Duration) -> anyhow::Result<()> {
        let mut c = self.peers.remove(name).with_context(|| format!("{name} is not running"))?;
        let (docker, id) = (&self.docker, &c.id);
        let signal = |how| async move {
            let signal = if how == Stop::Kill { "SIGKILL" } else { "SIGTERM" };
            let kill = KillContainerOptionsBuilder::new().signal(signal).build();
            docker.kill_container(id, Some(kill)).await.with_context(|| format!("cannot signal {name}"))
        };
        let result = stop_within(name, how, grace, &mut c.exited, signal).await;
        self.remove(&c.id).await;
        result
    }

    async fn pause(&mut self, name: &str) -> anyhow::Result<()> {
        let c = self.peers.get(name).with_context(|| format!("{name} is not running"))?;
        self.docker.pause_container(&c.id).await.with_context(|| format!("cannot pause {name}"))
    }

    async fn resume(&mut self, name: &str) -> anyhow::Result<()> {
        let c = self.peers.get(name).with_context(|| format!("{name} is not running"))?;
        self.docker.unpause_container(&c.id).await.with_context(|| format!("cannot resume {name}"))
    }

    async fn set_links(&mut self, name: &str, links: &Links) -> anyhow::Result<()> {
        let current = self.peers.get(name).with_context(|| format!("{name} is not running"))?.links.clone();
        if current == *links {
            return Ok(());
        }
        match self.method {
            CutMethod::PacketFilter => self.apply_in_namespace(name, &current, links).await?,
            CutMethod::Hook(_) => {
                let lines = hook_commands(&current, links);
                let c = self.peers.get_mut(name).expect("checked above");
                c.input.write_all(lines.as_bytes()).await.with_context(|| format!("cannot write to {name}'s stdin"))?;
                c.input.flush().await?;
            }
        }
        self.peers.get_mut(name).expect("checked above").links = links.clone();
        Ok(())
    }

    fn can_delay(&self) -> bool {
        match self.method {
            CutMethod::PacketFilter => super::kernel_has_netem(),
            CutMethod::Hook(_) => true,
        }
    }

    async fn shutdown(&mut self) {
        for id in self.created.clone() {
            self.remove(&id).await;
        }
        self.peers.clear();
        let _ = self.docker.remove_network(&self.network).await;
        self.shut = true;
    }
}

impl Drop for DockerBackend {
    /// After a panic or an early return there is no runtime to await on: remove what is left
    /// with the docker command, synchronously.
    fn drop(&mut self) {
        if self.shut {
            return;
        }
        if !self.created.is_empty() {
            let _ = std::process::Command::new("docker")
                .arg("unpause")
                .args(&self.created)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let _ = std::process::Command::new("docker")
                .args(["rm", "--force"])
                .args(&self.created)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::process::Command::new("docker")
            .args(["network", "rm", &self.network])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// A container's environment: the mesh key, and (like the process backend's children) the
/// lab's RUST_LOG.
fn env(spec: &PeerSpec) -> Vec<String> {
    let log = std::env::var("RUST_LOG").ok().map(|v| format!("RUST_LOG={v}"));
    let key = spec.mesh_key.as_ref().map(|k| format!("MESH_KEY={k}"));
    log.into_iter().chain(key).collect()
}

fn labels() -> HashMap<String, String> {
    HashMap::from([(LABEL.to_string(), "1".to_string()), (OWNER.to_string(), std::process::id().to_string())])
}

fn owner_alive(labels: Option<&HashMap<String, String>>) -> bool {
    let Some(pid) = labels.and_then(|l| l.get(OWNER)).and_then(|p| p.parse::<i32>().ok()) else { return false };
    // SAFETY: kill(2) with signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// Removes containers and networks left by labs that are no longer running.
async fn remove_leftovers(docker: &Docker) {
    let filters = HashMap::from([("label".to_string(), vec![LABEL.to_string()])]);
    let list = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
    for c in docker.list_containers(Some(list)).await.unwrap_or_default() {
        if !owner_alive(c.labels.as_ref())
            && let Some(id) = c.id
        {
            let force = RemoveContainerOptionsBuilder::new().force(true).build();
            let _ = docker.remove_container(&id, Some(force)).await;
        }
    }
    let list = ListNetworksOptionsBuilder::new().filters(&filters).build();
    for n in docker.list_networks(Some(list)).await.unwrap_or_default() {
        if !owner_alive(n.labels.as_ref())
            && let Some(id) = n.id
        {
            let _ = docker.remove_network(&id).await;
        }
    }
}

/// Creates the run's network on a free 10.x.y.0/24 subnet.
async fn create_network(docker: &Docker, run: &str) -> anyhow::Result<(String, [u8; 3])> {
    let name = format!("meshlab-lab-{run}");
    let mut last = None;
    for _ in 0..20 {
        let [b, c] = rand::random::<[u8; 2]>();
        let subnet = [10, b.clamp(1, 254), c];
        let request = NetworkCreateRequest {
            name: name.clone(),
            driver: Some("bridge".into()),
            labels: Some(labels()),
            ipam: Some(Ipam {
                config: Some(vec![IpamConfig {
                    subnet: Some(format!("10.{}.{}.0/24", subnet[1], subnet[2])),
                    gateway: Some(format!("10.{}.{}.1", subnet[1], subnet[2])),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        match docker.create_network(request).await {
            Ok(_) => return Ok((name, subnet)),
            Err(e) => last = Some(e),
        }
    }
    Err(anyhow::anyhow!("cannot create a network for the lab: {}", last.map(|e| e.to_string()).unwrap_or_default()))
}

/// Packet filtering needs root, nsenter and iptables-restore on the host.
fn probe_cut_method() -> CutMethod {
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
