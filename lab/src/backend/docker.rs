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
use std::time::Duration;

use anyhow::{Context, bail};
use bollard::Docker;
use bollard::models::{ContainerCreateBody, EndpointIpamConfig, EndpointSettings, HostConfig, NetworkingConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use tokio::sync::mpsc::UnboundedSender;

use super::engine::{
    Containers, Engine, LABEL, NetworkKind, PORT, STATE_MOUNT, create_network, docker_command, env, labels, owner_alive,
};
use super::{Backend, Links, PeerSpec, StateDirs, Stop, ensure_neighbour_room};
use crate::world::Observed;

pub use super::engine::CutMethod;

/// The image scripts/build-image makes.
pub const DEFAULT_IMAGE: &str = "meshlab-peer:latest";
/// Containers start slower than processes: scenario deadlines are multiplied by this.
pub const TIME_SCALE: f64 = 3.0;

pub struct DockerBackend {
    containers: Containers,
    image: String,
    network: String,
    /// The run's subnet: 10.a.b.0/24; peer names get fixed host numbers in it.
    subnet: [u8; 3],
    hosts: HashMap<String, u8>,
    /// Every container this backend created and has not removed.
    created: Vec<String>,
    states: StateDirs,
    shut: bool,
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
        let network = format!("meshlab-lab-{run}");
        let subnet = create_network(&docker, &network, NetworkKind::Bridge).await?;
        Ok(DockerBackend {
            containers: Containers::new(docker),
            image: image.to_owned(),
            network,
            subnet,
            hosts: HashMap::new(),
            created: Vec::new(),
            states: StateDirs::new(),
            shut: false,
        })
    }

    pub fn cut_method(&self) -> &CutMethod {
        &self.containers.method
    }

    /// The host pid of a running peer's container (whose network namespace holds its links).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.containers.get(name).map(|c| c.pid)
    }

    /// The fixed address of a peer name on the run's subnet, given at its first start.
    fn ip_of(&mut self, name: &str) -> anyhow::Result<Ipv4Addr> {
        if !self.hosts.contains_key(name) {
            let next = u8::try_from(2 + self.hosts.len()) // .1 is the gateway
                .ok()
                .filter(|h| *h < 255)
                .context("the docker backend runs at most 253 peer names (one /24 network)")?;
            self.hosts.insert(name.to_owned(), next);
        }
        Ok(address(self.subnet, &self.hosts, name).expect("given above"))
    }

    fn container_name(&self, peer: &str) -> String {
        format!("{}-{peer}", self.network)
    }

    async fn remove(&mut self, id: &str) {
        Engine::Local(self.containers.docker.clone()).remove(id).await;
        self.created.retain(|c| c != id);
    }
}

impl Backend for DockerBackend {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn describe(&self) -> String {
        format!(
            "docker backend: containers of {} on network {}, {}",
            self.image,
            self.network,
            self.containers.method.describe()
        )
    }

    fn time_scale(&self) -> f64 {
        TIME_SCALE
    }

    fn cuts_acknowledged_by_events(&self) -> bool {
        self.containers.method.through_hook()
    }

    async fn start(&mut self, spec: PeerSpec, instance: u32, events: UnboundedSender<Observed>) -> anyhow::Result<()> {
        if self.containers.running(&spec.name) {
            bail!("{} is already running", spec.name);
        }
        let first_start = !self.hosts.contains_key(&spec.name);
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
            cmd: Some(self.containers.args(&spec)),
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
        let docker = &self.containers.docker;
        let options = CreateContainerOptionsBuilder::new().name(&name).build();
        let id =
            docker.create_container(Some(options), body).await.with_context(|| format!("cannot create {name}"))?.id;
        self.created.push(id.clone());
        let engine = Engine::Local(docker.clone());
        let attached = engine.attach(&id).await.with_context(|| format!("cannot attach to {name}"))?;
        docker
            .start_container(&id, None::<bollard::query_parameters::StartContainerOptions>)
            .await
            .with_context(|| format!("cannot start {name}"))?;
        let (pid, _) = engine.inspect(&id, &self.network).await?;
        let (subnet, hosts) = (self.subnet, &self.hosts);
        let known = |n: &str| Ok(address(subnet, hosts, n));
        self.containers.adopt(&spec, engine, &id, pid, attached, instance, events, known).await?;
        if first_start {
            // Cuts made before it ever ran could name no address for it.
            self.containers.readdress(&spec.name, |n| Ok(address(subnet, hosts, n))).await?;
        }
        Ok(())
    }

    fn address_of(&self, name: &str, _listen: &str) -> String {
        format!("{name}:{PORT}")
    }

    fn exited(&mut self, name: &str) {
        if let Some(c) = self.containers.exited(name) {
            let docker = self.containers.docker.clone();
            self.created.retain(|x| *x != c.id);
            tokio::spawn(async move {
                let force = RemoveContainerOptionsBuilder::new().force(true).build();
                let _ = docker.remove_container(&c.id, Some(force)).await;
            });
        }
    }

    async fn say(&mut self, name: &str, line: &str) -> anyhow::Result<()> {
        self.containers.say(name, line).await
    }

    async fn stop(&mut self, name: &str, how: Stop, grace: Duration) -> anyhow::Result<()> {
        let (container, result) = self.containers.stop(name, how, grace).await?;
        self.remove(&container.id).await;
        result
    }

    async fn pause(&mut self, name: &str) -> anyhow::Result<()> {
        self.containers.pause(name).await
    }

    async fn resume(&mut self, name: &str) -> anyhow::Result<()> {
        self.containers.resume(name).await
    }

    async fn set_links(&mut self, name: &str, links: &Links) -> anyhow::Result<()> {
        let (subnet, hosts) = (self.subnet, &self.hosts);
        self.containers.set_links(name, links, |n| Ok(address(subnet, hosts, n))).await
    }

    fn can_delay(&self) -> bool {
        self.containers.method.can_delay()
    }

    async fn shutdown(&mut self) {
        for id in self.created.clone() {
            self.remove(&id).await;
        }
        self.containers.clear();
        let _ = self.containers.docker.remove_network(&self.network).await;
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
            let ids: Vec<&str> = self.created.iter().map(String::as_str).collect();
            docker_command(&[&["unpause"], &ids[..]].concat());
            docker_command(&[&["rm", "--force"], &ids[..]].concat());
        }
        docker_command(&["network", "rm", &self.network]);
    }
}

/// The address a name was given on the subnet, if it was.
fn address(subnet: [u8; 3], hosts: &HashMap<String, u8>, name: &str) -> Option<Ipv4Addr> {
    let [a, b, c] = subnet;
    hosts.get(name).map(|host| Ipv4Addr::new(a, b, c, *host))
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
