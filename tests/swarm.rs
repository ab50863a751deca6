//! The swarm backend on a single-node swarm: the shipped scenarios run unchanged, cuts and
//! conditions are the kernel's in the tasks' network namespaces, and nothing is left behind. Each
//! test makes the swarm with `docker swarm init` and leaves it after (an engine that already
//! manages a swarm is used as it is and left in it).

mod support;

use std::path::Path;
use std::process::Command;

use meshlab_lab::Lab;
use meshlab_lab::agent::{self, Agent, Call, Key};
use meshlab_lab::backend::docker::CutMethod;
use meshlab_lab::backend::swarm::{Agents, SwarmBackend};
use meshlab_lab::progress::Mode;
use meshlab_lab::runner::{self, RunOptions};
use meshlab_lab::scenario::Scenario;

/// Takes the Docker lock and a swarm, or says why the test cannot run.
fn swarm(test: &str) -> Option<(support::Serial, support::Swarm)> {
    let serial = support::exclusive();
    if !support::docker(test) {
        return None;
    }
    support::image();
    Some((serial, support::Swarm::join()))
}

async fn run_shipped_on_swarm(name: &str, seed: Option<u64>) {
    let Some(_swarm) = swarm(name) else { return };
    run_on_swarm(name, seed, Agents::default()).await;
}

async fn run_on_swarm(name: &str, seed: Option<u64>, agents: Agents) {
    let backend = SwarmBackend::connect(support::image(), agents).await.unwrap();
    assert_eq!(backend.cut_method(), &CutMethod::PacketFilter, "CI runs as root with iptables: cuts must be real");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("lab/scenarios/{name}.toml"));
    let scenario = Scenario::load(&path).unwrap();
    let report =
        runner::run(&scenario, &mut Lab::new(backend), &RunOptions { progress: Mode::Plain, seed, history: None })
            .await;
    assert!(report.passed, "{name} failed on the swarm: {:#?}", report.failure);
    assert_eq!(report.backend, "swarm");
    let d = &report.delivery;
    assert!(d.owed > 0 && d.shown == d.owed, "{d:?}");
    assert_eq!((d.duplicated, d.out_of_order, d.gapped), (0, 0, 0));
    assert_eq!(leftovers(&std::process::id().to_string()), "", "{name} left something behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn six_peer_demo_on_swarm() {
    run_shipped_on_swarm("six-peer-demo", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_heal_on_swarm() {
    run_shipped_on_swarm("partition-heal", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_on_swarm() {
    run_shipped_on_swarm("chaos", Some(12)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixty_four_on_swarm() {
    run_shipped_on_swarm("sixty-four", None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_cuts_are_real_packet_drops() {
    let Some(_swarm) = swarm("swarm_cuts_are_real_packet_drops") else { return };
    let mut lab = Lab::new(SwarmBackend::connect(support::image(), Agents::default()).await.unwrap());
    support::cuts_are_real_packet_drops(&mut lab).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_conditions_are_real() {
    let Some(_swarm) = swarm("swarm_conditions_are_real") else { return };
    let mut lab = Lab::new(SwarmBackend::connect(support::image(), Agents::default()).await.unwrap());
    support::conditions_are_real(&mut lab, |b, name| b.pid(name)).await;
}

/// A restarted peer is a new task at a new address: a cut made before the restart still holds
/// against it, in the kernel of the peer that cut it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_follows_a_restarted_peer_to_its_new_address() {
    use std::time::Duration;
    let Some(_swarm) = swarm("a_cut_follows_a_restarted_peer_to_its_new_address") else { return };
    let mut lab = Lab::new(SwarmBackend::connect(support::image(), Agents::default()).await.unwrap());
    lab.start(&["a"], &[], &[]).await.unwrap();
    lab.start(&["b", "c", "d"], &["a"], &[]).await.unwrap();
    lab.await_mesh(None, Duration::from_secs(20)).await.unwrap();
    lab.cut("a", "b", false).await.unwrap();
    let rules_before = drops(lab.backend().pid("a").unwrap());
    lab.restart("b").await.unwrap();
    let rules_after = drops(lab.backend().pid("a").unwrap());
    assert_eq!(rules_before.len(), 2, "a drops b both ways: {rules_before:?}");
    assert_eq!(rules_after.len(), 2, "{rules_after:?}");
    assert_ne!(rules_before, rules_after, "a's rules name b's new address");
    // The mesh re-forms around the cut (the lab awaits every pair but a–b), and a still has no
    // link to b.
    lab.await_mesh(None, Duration::from_secs(20)).await.unwrap();
    let peers = lab.peers_of("a").await.unwrap();
    assert!(!peers.iter().any(|p| p == "b"), "a is not linked to b: {peers:?}");
    lab.shutdown().await;
}

/// The DROP rules in a task's packet filter.
fn drops(pid: u32) -> Vec<String> {
    let out = Command::new("nsenter").args(["-t", &pid.to_string(), "-n", "iptables", "-S"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter(|l| l.contains("DROP")).map(String::from).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_leaves_nothing_behind_after_a_failed_check_a_panic_or_a_dead_lab() {
    let Some(_swarm) = swarm("swarm_leaves_nothing_behind_after_a_failed_check_a_panic_or_a_dead_lab") else {
        return;
    };
    let image = support::image();
    let me = std::process::id().to_string();
    // A check that fails: p1 accepts one connection only, so three peers cannot mesh.
    let scenario = Scenario::parse(
        "t.toml",
        "t",
        "[[step]]\nstart = \"p1\"\nflags = [\"--max-conns\", \"1\"]\n[[step]]\nstart = [\"p2\", \"p3\"]\nvia = \"p1\"\n[[step]]\nawait = \"mesh\"\nwithin = \"500ms\"\n",
    )
    .unwrap();
    let mut lab = Lab::new(SwarmBackend::connect(image, Agents::default()).await.unwrap());
    let report = runner::run(&scenario, &mut lab, &RunOptions::default()).await;
    assert!(!report.passed);
    assert_eq!(leftovers(&me), "", "after a failed check");
    // A test that panics while its tasks run.
    let outcome = std::thread::spawn(move || {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let mut lab = Lab::new(SwarmBackend::connect(image, Agents::default()).await.unwrap());
            lab.start(&["a", "b"], &[], &[]).await.unwrap();
            lab.pause("a").await.unwrap();
            panic!("a test fails while its tasks run");
        })
    })
    .join();
    assert!(outcome.is_err());
    assert_eq!(leftovers(&me), "", "after a panic");
    // What a lab killed with SIGKILL leaves: a service with a running task and an overlay
    // network, labelled with its pid, which is no longer alive.
    let mut gone = Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let dead = gone.id().to_string();
    let labels = ["--label", "meshlab.lab=1", "--label", &format!("meshlab.lab.owner={dead}")];
    let network = format!("meshlab-lab-dead{dead}");
    let made = |args: &[&str]| {
        let out = Command::new("docker").args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    made(&[&["network", "create", "--driver", "overlay", "--attachable"], &labels[..], &[network.as_str()]].concat());
    let container_labels =
        ["--container-label", "meshlab.lab=1", "--container-label", &format!("meshlab.lab.owner={dead}")];
    made(
        &[
            &["service", "create", "--detach", "--quiet", "--endpoint-mode", "dnsrr", "--network", &network],
            &labels[..],
            &container_labels[..],
            &[image, "--name", "ghost"],
        ]
        .concat(),
    );
    assert_ne!(leftovers(&dead), "", "the dead lab's service and network are there");
    let next = SwarmBackend::connect(image, Agents::default()).await.unwrap();
    assert_eq!(leftovers(&dead), "", "the next lab removes a dead lab's service, task and network");
    drop(next);
}

/// Outside a swarm the backend says how to make one, and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outside_a_swarm_the_backend_says_how_to_make_one() {
    let _serial = support::exclusive();
    if !support::docker("outside_a_swarm_the_backend_says_how_to_make_one") {
        return;
    }
    if support::docker_text(&["info", "--format", "{{.Swarm.LocalNodeState}}"]) != "inactive" {
        eprintln!("SKIPPED outside_a_swarm_the_backend_says_how_to_make_one: this engine is in a swarm");
        return;
    }
    let error = SwarmBackend::connect(support::image(), Agents::default()).await.err().expect("no swarm, no backend");
    let message = format!("{error:#}");
    assert!(message.contains("not in a swarm") && message.contains("docker swarm init"), "{message}");
    assert_eq!(support::docker_text(&["info", "--format", "{{.Swarm.LocalNodeState}}"]), "inactive");
}

/// Services, containers and networks whose owner label is `pid`.
fn leftovers(pid: &str) -> String {
    let owner = format!("label=meshlab.lab.owner={pid}");
    let services = support::docker_text(&["service", "ls", "--quiet", "--filter", &owner]);
    let containers = support::docker_text(&["ps", "--all", "--quiet", "--filter", &owner]);
    let networks = support::docker_text(&["network", "ls", "--quiet", "--filter", &owner]);
    [services, containers, networks].join(" ").trim().to_owned()
}

/// An agent serving this node's engine on a loopback port, in this process, with a fresh key.
async fn local_agent(tag: &str) -> (String, Key, tokio::task::JoinHandle<anyhow::Result<()>>) {
    let dir = std::env::temp_dir().join(format!("meshlab-agent-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = Key::read_or_make(&dir.join("agent.key")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let docker = bollard::Docker::connect_with_local_defaults().unwrap();
    let server = tokio::spawn(agent::serve(listener, key.clone(), docker));
    (address, key, server)
}

/// The lab reaches peers on other nodes through their agents. Here the node's own agent is
/// named for it, so every attach, signal, pause and packet rule goes through an agent
/// connection: the shipped partition and chaos scenarios pass, and cuts are the kernel's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_an_agent_the_lab_drives_peers_and_cuts_in_their_kernel() {
    let Some(_swarm) = swarm("through_an_agent_the_lab_drives_peers_and_cuts_in_their_kernel") else { return };
    let (address, key, server) = local_agent("drives").await;
    let node = support::docker_text(&["info", "--format", "{{.Swarm.NodeID}}"]);
    let agents = Agents { key: Some(key), at: vec![(node, address)] };
    run_on_swarm("partition-heal", None, agents.clone()).await;
    run_on_swarm("pause", None, agents.clone()).await;
    let mut lab = Lab::new(SwarmBackend::connect(support::image(), agents).await.unwrap());
    support::cuts_are_real_packet_drops(&mut lab).await;
    server.abort();
}

/// An agent answers only a lab with its key: a wrong key or bytes that are no handshake are
/// refused before any request is read, and the agent goes on serving the lab that has the key,
/// on the lab's containers only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_refuses_a_lab_without_its_key() {
    use tokio::io::AsyncWriteExt;
    let _serial = support::exclusive();
    if !support::docker("an_agent_refuses_a_lab_without_its_key") {
        return;
    }
    let (address, key, server) = local_agent("refuses").await;
    let (_, wrong, other) = local_agent("stranger").await;
    other.abort();
    let refused = Agent::connect(&address, &wrong).await.err().expect("a wrong key is refused");
    assert!(format!("{refused:#}").contains("refused the lab's key"), "{refused:#}");
    let mut garbage = tokio::net::TcpStream::connect(&address).await.unwrap();
    garbage.write_all(&[0, 48, 1, 2, 3].repeat(100)).await.unwrap();
    let lab = Agent::connect(&address, &key).await.expect("the key opens the agent");
    let answer = lab.call(Call::Pause { container: "no-such-container".into() }).await;
    let error = format!("{:#}", answer.expect_err("no such container"));
    assert!(error.contains("no-such-container"), "the engine's own error comes back: {error}");
    // A container that is not the lab's is not the agent's to touch, even for the key's holder.
    let other = support::docker_text(&[
        "create",
        "--name",
        &format!("meshlab-not-a-lab-{}", std::process::id()),
        support::image(),
    ]);
    let refused = lab.call(Call::Remove { container: other.clone() }).await.expect_err("not a lab's container");
    let still_there =
        support::docker_text(&["ps", "--all", "--quiet", "--no-trunc", "--filter", &format!("id={other}")]);
    support::docker_text(&["rm", "--force", &other]);
    assert!(format!("{refused:#}").contains("not a lab's container"), "{refused:#}");
    assert_eq!(still_there, other, "the agent left it alone");
    assert!(!server.is_finished(), "the agent still serves");
    server.abort();
}
