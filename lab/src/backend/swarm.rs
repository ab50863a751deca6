//! The swarm backend: each peer is a one-task service of the locally built image on an
//! attachable overlay network the lab creates, scheduled by Docker Swarm.
//!
//! Swarm has no service virtual IPs here (no IPVS), so every service uses `endpoint_mode:
//! dnsrr`, and peers find each other by a network alias that is their name (`p1:4000`). A
//! task's address is known only once it runs and changes when its peer restarts (a restart is a
//! new service): rules naming the peer are then made again. Once the task runs it is a container
//! like the docker backend's ([`super::engine`]): the lab attaches to it through the engine of the
//! node it runs on for stdin and stdout, signals, pauses and cuts it in its network namespace.
//! docs/swarm.md says how this reaches tasks on other nodes and what is built of it.
//!
//! The lab never joins, leaves or changes the swarm itself. Everything it creates carries the
//! label `meshlab.lab` and its owner's pid; leftovers of dead labs are removed at connect, its
//! own at shutdown or when dropped.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bollard::Docker;
use bollard::models::{
    EndpointSpec, EndpointSpecModeEnum, LocalNodeState, Mount, MountTypeEnum, NetworkAttachmentConfig, ServiceSpec,
    ServiceSpecMode, ServiceSpecModeReplicated, Task, TaskSpec, TaskSpecContainerSpec, TaskSpecPlacement,
    TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum, TaskState,
};
use bollard::query_parameters::{
    ListContainersOptionsBuilder, ListNetworksOptionsBuilder, ListServicesOptionsBuilder, ListTasksOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use tokio::sync::mpsc::UnboundedSender;

use super::engine::{
    Container, Containers, CutMethod, Engine, LABEL, NetworkKind, OWNER, PORT, STATE_MOUNT, create_network,
    docker_command, env, labels, owner_alive,
};
use super::{AddressOf, Backend, Links, PeerSpec, StateDirs, Stop, ensure_neighbour_room};
use crate::agent::{Agent, DEFAULT_PORT, Key};
use crate::world::Observed;

/// Tasks are scheduled, then started as containers: slower than the docker backend's.
pub const TIME_SCALE: f64 = 4.0;
/// How long a task may take from its service's creation to running...
const TASK_DEADLINE: Duration = Duration::from_secs(60);
/// ...and more for each service created with it and still waiting (a swarm node starts about
/// two tasks a second).
const TASK_EACH: Duration = Duration::from_millis(500);
/// How often a starting task's state is read.
const TASK_POLL: Duration = Duration::from_millis(50);
/// How long the swarm may take to let go of a removed network's endpoints.
const NETWORK_DEADLINE: Duration = Duration::from_secs(20);
/// How often a network being removed is looked for.
const NETWORK_POLL: Duration = Duration::from_millis(100);

/// How the lab reaches the agents of the swarm's other nodes (docs/swarm.md).
#[derive(Clone, Default)]
pub struct Agents {
    /// The key the lab shares with them. Without it, every task runs on the lab's own node.
    pub key: Option<Key>,
    /// Where an agent listens, by node id or hostname, where not at the node's swarm address on
    /// the default port. A node listed here is reached through its agent even when it is the
    /// lab's own.
    pub at: Vec<(String, String)>,
}

pub struct SwarmBackend {
    containers: Containers,
    agents: Agents,
    /// Agents connected so far, by node id.
    connected: HashMap<String, Agent>,
    image: String,
    network: String,
    /// The id of the node this lab's engine is.
    node: String,
    /// The service of each running peer, by name.
    services: HashMap<String, String>,
    /// Services created ahead of their peer's start (a batch starting together), by name and
    /// instance.
    prepared: HashMap<(String, u32), String>,
    /// Every service this backend created and has not removed.
    created: Vec<String>,
    /// Each name's address at its last start.
    addresses: HashMap<String, Ipv4Addr>,
    states: StateDirs,
    shut: bool,
}

impl SwarmBackend {
    /// Connects to the local engine, which must be a manager of an active swarm; checks the
    /// image, removes leftovers of dead labs and creates this run's overlay network.
    pub async fn connect(image: &str, agents: Agents) -> anyhow::Result<SwarmBackend> {
        let docker = Docker::connect_with_local_defaults().context("cannot reach a Docker engine")?;
        let docker = docker.negotiate_version().await.context("cannot reach a Docker engine")?;
        let swarm = docker.info().await.context("the Docker engine does not answer")?.swarm.unwrap_or_default();
        if swarm.local_node_state != Some(LocalNodeState::ACTIVE) {
            bail!(
                "this Docker engine is not in a swarm: `docker swarm init` makes a single-node one (the lab never \
                 joins, leaves or changes a swarm; docs/swarm.md)"
            );
        }
        if swarm.control_available != Some(true) {
            bail!("this Docker engine is a swarm worker: run the lab on a manager node (docs/swarm.md)");
        }
        let node = swarm.node_id.context("the swarm does not name this node")?;
        docker
            .inspect_image(image)
            .await
            .with_context(|| format!("image {image} not found: build it with scripts/build-image"))?;
        remove_leftovers(&docker).await;
        let network = format!("meshlab-lab-{:08x}", rand::random::<u32>());
        create_network(&docker, &network, NetworkKind::Overlay).await?;
        Ok(SwarmBackend {
            containers: Containers::new(docker),
            agents,
            connected: HashMap::new(),
            image: image.to_owned(),
            network,
            node,
            services: HashMap::new(),
            prepared: HashMap::new(),
            created: Vec::new(),
            addresses: HashMap::new(),
            states: StateDirs::new(),
            shut: false,
        })
    }

    pub fn cut_method(&self) -> &CutMethod {
        &self.containers.method
    }

    /// The host pid of a running peer's task container.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.containers.get(name).map(|c| c.pid)
    }

    /// The service that runs one start of a peer.
    fn service_spec(&self, spec: &PeerSpec, instance: u32) -> anyhow::Result<ServiceSpec> {
        let mounts = match spec.keep_state {
            true => Some(vec![Mount {
                target: Some(STATE_MOUNT.into()),
                source: Some(self.states.of(&spec.name)?.display().to_string()),
                typ: Some(MountTypeEnum::BIND),
                ..Default::default()
            }]),
            false => None,
        };
        let container = TaskSpecContainerSpec {
            image: Some(self.image.clone()),
            args: Some(self.containers.args(spec)),
            env: Some(env(spec)),
            hostname: Some(spec.name.clone()),
            labels: Some(labels()),
            open_stdin: Some(true),
            tty: Some(false),
            mounts,
            ..Default::default()
        };
        Ok(ServiceSpec {
            name: Some(format!("{}-{}-{instance}", self.network, spec.name)),
            labels: Some(labels()),
            task_template: Some(TaskSpec {
                container_spec: Some(container),
                restart_policy: Some(TaskSpecRestartPolicy {
                    condition: Some(TaskSpecRestartPolicyConditionEnum::NONE),
                    ..Default::default()
                }),
                placement: self.agents.key.is_none().then(|| TaskSpecPlacement {
                    constraints: Some(vec![format!("node.id=={}", self.node)]),
                    ..Default::default()
                }),
                networks: Some(vec![NetworkAttachmentConfig {
                    target: Some(self.network.clone()),
                    aliases: Some(vec![spec.name.clone()]),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            mode: Some(ServiceSpecMode {
                replicated: Some(ServiceSpecModeReplicated { replicas: Some(1) }),
                ..Default::default()
            }),
            endpoint_spec: Some(EndpointSpec { mode: Some(EndpointSpecModeEnum::DNSRR), ..Default::default() }),
            ..Default::default()
        })
    }

    /// Creates the service that runs one start of a peer; returns its id.
    async fn create_service(&self, spec: &PeerSpec, instance: u32) -> anyhow::Result<String> {
        let service_spec = self.service_spec(spec, instance)?;
        let created = self.containers.docker.create_service(service_spec, None).await;
        let service = created.with_context(|| format!("cannot create {}'s service", spec.name))?.id;
        service.with_context(|| format!("the swarm gave {}'s service no id", spec.name))
    }

    /// Waits for the service's task to run; returns its container's id and its node's.
    async fn running_task(&self, service: &str, name: &str) -> anyhow::Result<(String, String)> {
        let patience = TASK_DEADLINE + TASK_EACH * self.prepared.len() as u32;
        let deadline = Instant::now() + patience;
        let filters = HashMap::from([("service", vec![service])]);
        loop {
            let tasks =
                self.containers.docker.list_tasks(Some(ListTasksOptionsBuilder::new().filters(&filters).build()));
            let task = tasks.await.with_context(|| format!("cannot read {name}'s task"))?.into_iter().next();
            if let Some(container) = task.as_ref().and_then(|t| self.container_of(t, name).transpose()) {
                return container;
            }
            if Instant::now() > deadline {
                bail!("{name}'s task did not start within {patience:?}");
            }
            tokio::time::sleep(TASK_POLL).await;
        }
    }

    /// A task's container and node once it runs, an error once it cannot, nothing while it
    /// starts.
    fn container_of(&self, task: &Task, name: &str) -> anyhow::Result<Option<(String, String)>> {
        let status = task.status.clone().unwrap_or_default();
        match status.state {
            Some(TaskState::RUNNING) => {}
            Some(state @ (TaskState::FAILED | TaskState::REJECTED | TaskState::COMPLETE | TaskState::SHUTDOWN)) => {
                let why = status.err.or(status.message).unwrap_or_default();
                bail!("{name}'s task is {state}: {why}")
            }
            _ => return Ok(None),
        }
        let node = task.node_id.clone().with_context(|| format!("{name}'s task runs on no node"))?;
        let container = status.container_status.and_then(|c| c.container_id);
        let container = container.with_context(|| format!("{name}'s task runs without a container"))?;
        Ok(Some((container, node)))
    }
}

impl SwarmBackend {
    /// The engine that runs a node's containers: the lab's own, or the node's agent.
    async fn engine_for(&mut self, node: &str) -> anyhow::Result<Engine> {
        if let Some(agent) = self.connected.get(node) {
            return Ok(Engine::Agent(agent.clone()));
        }
        let described =
            self.containers.docker.inspect_node(node).await.with_context(|| format!("cannot read node {node}"))?;
        let hostname = described.description.and_then(|d| d.hostname).unwrap_or_default();
        let listed = self.agents.at.iter().find(|(n, _)| n == node || *n == hostname).map(|(_, at)| at.clone());
        if listed.is_none() && node == self.node {
            return Ok(Engine::Local(self.containers.docker.clone()));
        }
        let key = self.agents.key.as_ref().with_context(|| {
            format!("a task runs on node {hostname} ({node}), which the lab reaches only through its agent: give --agent-key (docs/swarm.md)")
        })?;
        let address = match listed {
            Some(at) => at,
            None => {
                let addr =
                    described.status.and_then(|s| s.addr).with_context(|| format!("node {hostname} has no address"))?;
                format!("{addr}:{DEFAULT_PORT}")
            }
        };
        let agent =
            Agent::connect(&address, key).await.with_context(|| format!("cannot reach node {hostname}'s agent"))?;
        self.connected.insert(node.to_owned(), agent.clone());
        Ok(Engine::Agent(agent))
    }
}

impl Backend for SwarmBackend {
    fn name(&self) -> &'static str {
        "swarm"
    }

    fn describe(&self) -> String {
        let reach = match (&self.agents.key, self.agents.at.is_empty()) {
            (None, _) => "every task on this node",
            (Some(_), true) => "tasks spread over the nodes, reached through their agents",
            (Some(_), false) => "tasks spread over the nodes, reached through their agents (some given by --agent)",
        };
        format!(
            "swarm backend: services of {} on overlay network {} (endpoint_mode dnsrr), {reach}; {}",
            self.image,
            self.network,
            self.containers.method.describe()
        )
    }

    fn time_scale(&self) -> f64 {
        TIME_SCALE
    }

    /// Creates the services of a batch together, so that the swarm schedules and starts their
    /// tasks side by side rather than one after another.
    async fn prepare(&mut self, starts: &[(PeerSpec, u32)]) -> anyhow::Result<()> {
        let this = &*self;
        let creating = starts.iter().map(|(spec, instance)| async move {
            (spec.name.clone(), *instance, this.create_service(spec, *instance).await)
        });
        let mut failed = None;
        for (name, instance, created) in futures_util::future::join_all(creating).await {
            match created {
                Ok(service) => {
                    self.created.push(service.clone());
                    self.prepared.insert((name, instance), service);
                }
                Err(e) => failed = Some(e),
            }
        }
        failed.map_or(Ok(()), Err)
    }

    fn cuts_acknowledged_by_events(&self) -> bool {
        self.containers.method.through_hook()
    }

    async fn start(&mut self, spec: PeerSpec, instance: u32, events: UnboundedSender<Observed>) -> anyhow::Result<()> {
        if self.containers.running(&spec.name) {
            bail!("{} is already running", spec.name);
        }
        ensure_neighbour_room(self.addresses.len() + 1)?;
        let service = match self.prepared.remove(&(spec.name.clone(), instance)) {
            Some(service) => service,
            None => {
                let service = self.create_service(&spec, instance).await?;
                self.created.push(service.clone());
                service
            }
        };
        self.services.insert(spec.name.clone(), service.clone());
        let (id, node) = self.running_task(&service, &spec.name).await?;
        let engine = self.engine_for(&node).await?;
        let (pid, ip) = engine.inspect(&id, &self.network).await?;
        let ip = ip.with_context(|| format!("{}'s task has no address on {}", spec.name, self.network))?;
        let attached = engine.attach(&id).await.with_context(|| format!("cannot attach to {}", spec.name))?;
        let known_now = known(&self.addresses);
        self.containers.adopt(&spec, engine, &id, pid, attached, instance, events, known_now).await?;
        if self.addresses.insert(spec.name.clone(), ip) != Some(ip) {
            self.containers.readdress(&spec.name, known(&self.addresses)).await?;
        }
        Ok(())
    }

    fn address_of(&self, name: &str, _listen: &str) -> String {
        format!("{name}:{PORT}")
    }

    fn exited(&mut self, name: &str) {
        let container = self.containers.exited(name);
        if let Some(service) = self.services.remove(name) {
            self.created.retain(|s| *s != service);
            let docker = self.containers.docker.clone();
            tokio::spawn(async move { remove_peer(&docker, &service, container).await });
        }
    }

    async fn say(&mut self, name: &str, line: &str) -> anyhow::Result<()> {
        self.containers.say(name, line).await
    }

    async fn stop(&mut self, name: &str, how: Stop, grace: Duration) -> anyhow::Result<()> {
        let (container, result) = self.containers.stop(name, how, grace).await?;
        if let Some(service) = self.services.remove(name) {
            self.created.retain(|s| *s != service);
            remove_peer(&self.containers.docker, &service, Some(container)).await;
        }
        result
    }

    async fn pause(&mut self, name: &str) -> anyhow::Result<()> {
        self.containers.pause(name).await
    }

    async fn resume(&mut self, name: &str) -> anyhow::Result<()> {
        self.containers.resume(name).await
    }

    async fn set_links(&mut self, name: &str, links: &Links) -> anyhow::Result<()> {
        self.containers.set_links(name, links, known(&self.addresses)).await
    }

    fn can_delay(&self) -> bool {
        self.containers.method.can_delay()
    }

    async fn shutdown(&mut self) {
        let docker = self.containers.docker.clone();
        for service in self.services.drain().map(|(_, s)| s).chain(self.created.drain(..)) {
            let _ = docker.delete_service(&service).await;
        }
        self.containers.clear();
        remove_containers(&docker, |labels| labels.get(OWNER) == Some(&std::process::id().to_string())).await;
        remove_network(&docker, &self.network).await;
        self.shut = true;
    }
}

impl Drop for SwarmBackend {
    /// After a panic or an early return there is no runtime to await on: remove what is left
    /// with the docker command, synchronously.
    fn drop(&mut self) {
        if self.shut {
            return;
        }
        let services: Vec<&str> = self.services.values().chain(&self.created).map(String::as_str).collect();
        if !services.is_empty() {
            docker_command(&[&["service", "rm"], &services[..]].concat());
        }
        let owner = format!("label={OWNER}={}", std::process::id());
        let listed = std::process::Command::new("docker").args(["ps", "--all", "--quiet", "--filter", &owner]).output();
        let ids = listed.map(|o| String::from_utf8_lossy(&o.stdout).to_string()).unwrap_or_default();
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            docker_command(&[&["unpause"], &ids[..]].concat());
            docker_command(&[&["rm", "--force"], &ids[..]].concat());
        }
        // The swarm lets go of the network a moment after its tasks are gone.
        let deadline = Instant::now() + NETWORK_DEADLINE;
        while Instant::now() < deadline {
            docker_command(&["network", "rm", &self.network]);
            let inspect = std::process::Command::new("docker").args(["network", "inspect", &self.network]).output();
            if inspect.is_ok_and(|o| !o.status.success()) {
                return;
            }
            std::thread::sleep(NETWORK_POLL);
        }
    }
}

/// Looks names up in the addresses their tasks had at their last start.
fn known(addresses: &HashMap<String, Ipv4Addr>) -> impl AddressOf + '_ {
    |name: &str| Ok(addresses.get(name).copied())
}

/// Deletes a peer's service and removes its task's container now, rather than when the swarm
/// gets to it.
async fn remove_peer(docker: &Docker, service: &str, container: Option<Container>) {
    let _ = docker.delete_service(service).await;
    if let Some(c) = container {
        c.engine.remove(&c.id).await;
    }
}

/// Removes the lab's containers whose labels `select` picks (a deleted service's task goes by
/// itself, but only after a while), thawing paused ones first: the engine may refuse to kill a
/// frozen container.
async fn remove_containers(docker: &Docker, select: impl Fn(&HashMap<String, String>) -> bool) {
    let filters = HashMap::from([("label".to_string(), vec![LABEL.to_string()])]);
    let list = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
    for c in docker.list_containers(Some(list)).await.unwrap_or_default() {
        if c.labels.as_ref().is_some_and(&select)
            && let Some(id) = c.id
        {
            let _ = docker.unpause_container(&id).await;
            let force = RemoveContainerOptionsBuilder::new().force(true).build();
            let _ = docker.remove_container(&id, Some(force)).await;
        }
    }
}

/// Removes an overlay network and waits until it is gone: the engine refuses while the swarm
/// still holds endpoints of deleted tasks, and a removal it accepts completes a moment later.
async fn remove_network(docker: &Docker, network: &str) {
    let deadline = Instant::now() + NETWORK_DEADLINE;
    while Instant::now() < deadline {
        let _ = docker.remove_network(network).await;
        let inspect = docker.inspect_network(network, None::<bollard::query_parameters::InspectNetworkOptions>);
        if inspect.await.is_err() {
            return;
        }
        tokio::time::sleep(NETWORK_POLL).await;
    }
    tracing::warn!("the swarm did not remove network {network} within {NETWORK_DEADLINE:?}");
}

/// Removes services, containers and networks left by labs that are no longer running.
async fn remove_leftovers(docker: &Docker) {
    let filters = HashMap::from([("label".to_string(), vec![LABEL.to_string()])]);
    for s in docker
        .list_services(Some(ListServicesOptionsBuilder::new().filters(&filters).build()))
        .await
        .unwrap_or_default()
    {
        let labels = s.spec.as_ref().and_then(|spec| spec.labels.as_ref());
        if !owner_alive(labels)
            && let Some(id) = s.id
        {
            let _ = docker.delete_service(&id).await;
        }
    }
    remove_containers(docker, |labels| !owner_alive(Some(labels))).await;
    let list = ListNetworksOptionsBuilder::new().filters(&filters).build();
    for n in docker.list_networks(Some(list)).await.unwrap_or_default() {
        if n.driver.as_deref() == Some("overlay")
            && !owner_alive(n.labels.as_ref())
            && let Some(id) = n.id
        {
            remove_network(docker, &id).await;
        }
    }
}
