//! The repository's docker-compose.yml, used as a person would: `docker compose up`, or `docker
//! stack deploy` on a swarm; watch the mesh form in the containers' output, type a line into one
//! container through `docker attach` (in a tmux terminal), see it shown by the five others, take
//! it down.

mod support;

use std::path::Path;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const PEERS: [&str; 6] = ["peer1", "peer2", "peer3", "peer4", "peer5", "peer6"];

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// The repository's compose file brought up under a name of its own, and taken down when
/// dropped, whatever happened.
enum Deployment {
    /// `docker compose -p NAME up -d`.
    Compose(String),
    /// `docker stack deploy -c docker-compose.yml NAME`.
    Stack(String),
}

impl Deployment {
    fn up(self) -> Deployment {
        match &self {
            Deployment::Compose(_) => run(self.compose().args(["up", "-d"])),
            Deployment::Stack(name) => run(Command::new("docker")
                .current_dir(env!("CARGO_MANIFEST_DIR"))
                .env_remove("MESH_KEY")
                .args(["stack", "deploy", "-c", "docker-compose.yml", name])),
        };
        self
    }

    fn compose(&self) -> Command {
        let mut c = support::compose();
        c.current_dir(env!("CARGO_MANIFEST_DIR")).args(["-f", "docker-compose.yml", "-p", self.name()]);
        c
    }

    fn name(&self) -> &str {
        match self {
            Deployment::Compose(name) | Deployment::Stack(name) => name,
        }
    }

    /// scripts/mesh-wait, pointed at this deployment as a user would point it at theirs.
    fn mesh_wait(&self) -> Output {
        let (variable, name) = match self {
            Deployment::Compose(name) => ("COMPOSE_PROJECT_NAME", name),
            Deployment::Stack(name) => ("MESHLAB_STACK", name),
        };
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/mesh-wait");
        run(Command::new(script).env(variable, name))
    }

    /// The running container of a service (a stack's task starts a moment after the deploy).
    fn container(&self, service: &str) -> String {
        let find = || match self {
            Deployment::Compose(_) => {
                String::from_utf8(run(self.compose().args(["ps", "-q", service])).stdout).unwrap().trim().to_owned()
            }
            Deployment::Stack(name) => {
                let label = format!("label=com.docker.swarm.service.name={name}_{service}");
                support::docker_text(&["ps", "--quiet", "--filter", &label])
            }
        };
        let mut id = String::new();
        wait_for(&format!("{service}'s container"), Duration::from_secs(30), || {
            id = find();
            !id.is_empty()
        });
        id
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        match self {
            Deployment::Compose(_) => {
                let _ = self.compose().args(["down", "--timeout", "5"]).output();
            }
            Deployment::Stack(name) => {
                let _ = Command::new("docker").args(["stack", "rm", name]).output();
                // The stack's network goes once the swarm has let go of its tasks.
                let network = format!("{name}_default");
                let until = Instant::now() + Duration::from_secs(30);
                while Command::new("docker")
                    .args(["network", "inspect", &network])
                    .output()
                    .is_ok_and(|o| o.status.success())
                    && Instant::now() < until
                {
                    std::thread::sleep(Duration::from_millis(200));
                    let _ = Command::new("docker").args(["network", "rm", &network]).output();
                }
            }
        }
    }
}

/// A container's output as text: the peers run on a terminal (`tty: true`), so the line being
/// typed is redrawn around each line shown; carriage returns and terminal escapes are dropped.
fn logs(id: &str) -> String {
    let out = run(Command::new("docker").args(["logs", id]));
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "") + &String::from_utf8_lossy(&out.stderr);
    without_escapes(&text)
}

/// `text` without its CSI escape sequences (ESC [ … final byte).
fn without_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            while chars.next().is_some_and(|c| !('@'..='~').contains(&c)) {}
            continue;
        }
        out.push(c);
    }
    out
}

/// Distinct peers a container's chat view showed joining (after the prompt, when the line
/// being typed was redrawn in front of it).
fn joined(log: &str) -> usize {
    let mut names: Vec<&str> = log
        .lines()
        .filter_map(|l| l.find("* ").map(|at| &l[at..]))
        .filter(|l| l.ends_with(" joined"))
        .filter_map(|l| l.split('@').next())
        .collect();
    names.sort();
    names.dedup();
    names.len()
}

fn wait_for(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let until = Instant::now() + deadline;
    while !done() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn compose_up_gives_a_six_peer_mesh_to_chat_in() {
    let _serial = support::exclusive();
    if !support::docker("compose_up_gives_a_six_peer_mesh_to_chat_in") {
        return;
    }
    support::image();
    a_six_peer_mesh_to_chat_in(Deployment::Compose(format!("meshlabtest{}", std::process::id())).up());
}

#[test]
fn stack_deploy_gives_a_six_peer_mesh_to_chat_in() {
    let _serial = support::exclusive();
    if !support::docker("stack_deploy_gives_a_six_peer_mesh_to_chat_in") {
        return;
    }
    support::image();
    let _swarm = support::Swarm::join();
    a_six_peer_mesh_to_chat_in(Deployment::Stack(format!("meshlabtest{}", std::process::id())).up());
}

fn a_six_peer_mesh_to_chat_in(deployment: Deployment) {
    assert!(Path::new("/usr/bin/tmux").exists() || Command::new("tmux").arg("-V").output().is_ok(), "tmux is needed");
    let ids: Vec<String> = PEERS.iter().map(|p| deployment.container(p)).collect();

    // The mesh forms: every container's output shows the five others joining.
    wait_for("every peer to show the five others joined", Duration::from_secs(30), || {
        ids.iter().all(|id| joined(&logs(id)) == 5)
    });
    for id in &ids {
        let log = logs(id);
        assert!(!log.contains(" left") && !log.contains(" disconnected"), "no one left: {log}");
    }
    // The repository's script finds the same containers and sees the same mesh.
    let waited = String::from_utf8_lossy(&deployment.mesh_wait().stdout).into_owned();
    assert!(waited.starts_with("full mesh: "), "{waited}");

    // Chat in peer3 through `docker attach`, as a person would.
    let peer3 = &ids[2];
    let session = format!("meshlab-compose-{}", std::process::id());
    let terminal = support::Terminal::open(&session, &format!("docker attach --detach-keys=ctrl-p,ctrl-q {peer3}"));
    let text = "hello from an attached terminal";
    // The attach is live once the terminal answers a command typed into it.
    wait_for("the attached terminal to answer /peers", Duration::from_secs(15), || {
        terminal.type_line("/peers");
        std::thread::sleep(Duration::from_millis(200));
        terminal.screen().contains("* 5 peers:")
    });
    terminal.type_line(text);
    // On a terminal (tty: true) each line shown has the time in front and the name coloured.
    let shown = |id: &String| logs(id).lines().filter(|l| l.contains("[peer3@") && l.ends_with(text)).count();
    wait_for("the five others to show the line", Duration::from_secs(15), || {
        ids.iter().filter(|id| *id != peer3).all(|id| shown(id) >= 1)
    });
    for (peer, id) in PEERS.iter().zip(&ids) {
        let expected = usize::from(id != peer3);
        assert_eq!(shown(id), expected, "{peer} shows the line {expected} time(s)");
    }
}
