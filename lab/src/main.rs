//! `lab`: run scenario files against real peers. Exit status: 0 when every check passes, 1 when
//! one fails, 2 for a bad scenario file or command line, 130 when interrupted.

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use meshlab_lab::agent::Key;
use meshlab_lab::backend::Backend;
use meshlab_lab::backend::docker::{DEFAULT_IMAGE, DockerBackend};
use meshlab_lab::backend::engine::CutMethod;
use meshlab_lab::backend::process::ProcessBackend;
use meshlab_lab::backend::swarm::{Agents, SwarmBackend};
use meshlab_lab::lab::NoNetem;
use meshlab_lab::progress::{Mode, print_line};
use meshlab_lab::runner::{self, RunOptions};
use meshlab_lab::scenario::Scenario;
use meshlab_lab::{Lab, history, junit, report};
use tokio::signal::unix::{Signal, SignalKind, signal};

/// The six-peer demo, built in so that `lab demo` works from anywhere.
const DEMO: &str = include_str!("../scenarios/six-peer-demo.toml");

#[derive(Parser)]
#[command(name = "lab", version, about = "Scripted multi-peer experiments for meshlab peers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run scenario files, one after another.
    ///
    /// Each file is checked before anything starts (exit 2 with the file and line of an
    /// error); each run prints a line per step and a verdict. Exit 0 when every check passes,
    /// 1 when one fails.
    Run {
        /// Scenario files (TOML, docs/scenarios.md); the shipped ones are in lab/scenarios.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        #[command(flatten)]
        common: Common,
        /// Seed for every chaos step (replays its fault schedule).
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Run the report's six-peer demo: the quickest way to see meshlab work.
    Demo {
        #[command(flatten)]
        common: Common,
    },
    /// Check a finished run again from its history (DIR/events.jsonl, kept with --report DIR):
    /// every owed line shown exactly once, in order. Exit 0 when it holds, 1 when not.
    Check {
        /// A report directory.
        dir: PathBuf,
    },
    /// Serve this node's peers to a lab on a swarm's manager (docs/swarm.md): run it as root on
    /// every node of the swarm but the lab's own.
    Agent {
        /// Where to listen.
        #[arg(long, default_value_t = SocketAddr::from(([0, 0, 0, 0], meshlab_lab::agent::DEFAULT_PORT)))]
        listen: SocketAddr,
        /// The key shared with the lab (64 hex digits); made here, readable by root only, if
        /// missing: copy it to the lab's host.
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
    },
    /// List the scenarios in a directory.
    List {
        #[arg(default_value_os_t = default_scenarios())]
        dir: PathBuf,
    },
}

#[derive(clap::Args)]
struct Common {
    /// Where the peers run.
    #[arg(long, value_enum, default_value_t = BackendKind::Process)]
    backend: BackendKind,
    /// Write the report here: report.html, figures/*.svg, report.json and the run's history
    /// events.jsonl, which `lab check DIR` re-checks (docs/report.md). With several files, one
    /// directory each inside it.
    #[arg(long, value_name = "DIR")]
    report: Option<PathBuf>,
    /// Also write a JUnit XML summary here (a test suite per scenario, a test case per step),
    /// for CI systems that show test results.
    #[arg(long, value_name = "FILE")]
    junit: Option<PathBuf>,
    /// The peer binary for the process and netns backends [default: `peer` next to this program, else on PATH].
    #[arg(long, env = "MESHLAB_PEER", value_name = "PATH")]
    peer_bin: Option<PathBuf>,
    /// The peer image for the docker and swarm backends (build it with scripts/build-image).
    #[arg(long, default_value = DEFAULT_IMAGE)]
    image: String,
    /// Swarm: the key shared with the `lab agent` of every other node. Without it, every task
    /// runs on the lab's own node.
    #[arg(long, env = "MESHLAB_AGENT_KEY_FILE", value_name = "FILE")]
    agent_key: Option<PathBuf>,
    /// Swarm: where a node's agent listens, when not at the node's swarm address on port 4747
    /// (NODE is a node id or hostname); repeat for more nodes.
    #[arg(long = "agent", value_name = "NODE=HOST:PORT", value_parser = node_address)]
    agents: Vec<(String, String)>,
}

fn node_address(text: &str) -> Result<(String, String), String> {
    let (node, address) = text.split_once('=').ok_or("expected NODE=HOST:PORT")?;
    Ok((node.to_owned(), address.to_owned()))
}

async fn swarm_backend(common: &Common) -> anyhow::Result<SwarmBackend> {
    let key = common.agent_key.as_deref().map(Key::read).transpose()?;
    SwarmBackend::connect(&common.image, Agents { key, at: common.agents.clone() }).await
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendKind {
    /// Local processes on a loopback address (no privileges needed).
    Process,
    /// Containers of the peer image on a network of their own (needs a Docker engine).
    Docker,
    /// Local processes, each in a network namespace of its own, routed by the host (needs root).
    Netns,
    /// One-task services of the peer image on an overlay network of their own (needs this
    /// engine to be a swarm manager: `docker swarm init`).
    Swarm,
}

fn default_scenarios() -> PathBuf {
    let here = PathBuf::from("lab/scenarios");
    if here.is_dir() { here } else { PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scenarios") }
}

fn peer_bin(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| {
        let sibling = std::env::current_exe().ok().and_then(|e| Some(e.parent()?.join("peer")));
        sibling.filter(|p| p.is_file()).unwrap_or_else(|| PathBuf::from("peer"))
    })
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Installed before any peer starts, so that Ctrl-C at any moment removes them all.
    let mut interrupt = match signal(SignalKind::interrupt()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot watch Ctrl-C: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::List { dir } => list(&dir),
        Command::Agent { listen, key_file } => agent(listen, &key_file).await,
        Command::Check { dir } => check(&dir),
        Command::Demo { common } => {
            let scenario =
                Scenario::parse("six-peer-demo.toml", "six-peer-demo", DEMO).expect("the built-in demo parses");
            run_all(vec![scenario], common, None, &mut interrupt).await
        }
        Command::Run { files, common, seed } => {
            let mut scenarios = Vec::new();
            for f in &files {
                match Scenario::load(f) {
                    Ok(s) => scenarios.push(s),
                    Err(e) => {
                        eprintln!("error: {e}");
                        return ExitCode::from(2);
                    }
                }
            }
            run_all(scenarios, common, seed, &mut interrupt).await
        }
    }
}

async fn run_all(scenarios: Vec<Scenario>, common: Common, seed: Option<u64>, interrupt: &mut Signal) -> ExitCode {
    let options = RunOptions { progress: Mode::for_stdout(), seed, history: None };
    let peer = peer_bin(common.peer_bin.clone());
    let several = scenarios.len() > 1;
    let mut reports = Vec::new();
    for (index, scenario) in scenarios.iter().enumerate() {
        let report_dir =
            common.report.as_ref().map(|d| if several { report_dir_of(d, &scenario.name, index) } else { d.clone() });
        let options = RunOptions { history: report_dir.as_ref().map(|d| d.join("events.jsonl")), ..options.clone() };
        let outcome = match common.backend {
            BackendKind::Process => {
                run_one(scenario, ProcessBackend::new(&peer), &options, report_dir.as_deref(), interrupt).await
            }
            BackendKind::Netns => match ProcessBackend::in_namespaces(&peer) {
                Ok(backend) => run_one(scenario, backend, &options, report_dir.as_deref(), interrupt).await,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(2);
                }
            },
            BackendKind::Docker => match DockerBackend::connect(&common.image).await {
                Ok(backend) => run_one(scenario, backend, &options, report_dir.as_deref(), interrupt).await,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(2);
                }
            },
            BackendKind::Swarm => match swarm_backend(&common).await {
                Ok(backend) => run_one(scenario, backend, &options, report_dir.as_deref(), interrupt).await,
                Err(e) => {
                    eprintln!("error: {e:#}");
                    return ExitCode::from(2);
                }
            },
        };
        match outcome {
            Ok(report) => reports.push(report),
            Err(e) => {
                eprintln!("error: {e:#}");
                let code = match () {
                    () if e.is::<Interrupted>() => 130,
                    () if e.is::<NoNetem>() => 2,
                    () => 1,
                };
                return ExitCode::from(code);
            }
        }
        print_line("");
    }
    let failed = reports.iter().filter(|r| !r.passed).count();
    if several {
        print_line(&format!("{} of {} scenarios passed", scenarios.len() - failed, scenarios.len()));
    }
    if let Some(path) = &common.junit
        && let Err(e) = junit::write(path, &reports)
    {
        eprintln!("error: {e:#}");
        return ExitCode::from(1);
    }
    if failed == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

/// Where the `index`-th scenario's report goes when several run: `dir/NAME`. Parsing refuses a
/// `name` that is not one plain path component, but a default name comes from the file name
/// (`..toml` gives `.`); so any name that could lead anywhere but a directory of its own inside
/// `dir` gets `scenario-N` instead.
fn report_dir_of(dir: &Path, name: &str, index: usize) -> PathBuf {
    let mut parts = Path::new(name).components();
    match (parts.next(), parts.next()) {
        (Some(Component::Normal(name)), None) => dir.join(name),
        _ => dir.join(format!("scenario-{}", index + 1)),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("interrupted: every peer was removed")]
struct Interrupted;

/// Runs one scenario; Ctrl-C removes every peer before exiting.
async fn run_one<B: Backend>(
    scenario: &Scenario,
    backend: B,
    options: &RunOptions,
    report_dir: Option<&Path>,
    interrupt: &mut Signal,
) -> anyhow::Result<runner::Report> {
    if scenario.needs_delay() && !backend.can_delay() {
        return Err(NoNetem.into());
    }
    let mut lab = Lab::new(backend);
    let report = tokio::select! {
        report = runner::run(scenario, &mut lab, options) => report,
        _ = interrupt.recv() => {
            lab.shutdown().await;
            return Err(Interrupted.into());
        }
    };
    if let Some(dir) = report_dir {
        let writing = std::time::Instant::now();
        report::write(dir, &report)?;
        let took = meshlab_lab::progress::human(writing.elapsed());
        print_line(&format!("report: {} (written in {took})", dir.join("report.html").display()));
    }
    Ok(report)
}

/// Replays a run's history and gives its delivery verdict, next to the one the run gave.
fn check(dir: &Path) -> ExitCode {
    let replayed = match history::replay(&dir.join("events.jsonl")) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let d = replayed.world.delivery(&replayed.cuts);
    let verdict = if d.complete() { "PASS" } else { "FAIL" };
    print_line(&format!(
        "{verdict} {} ({}), from its history: {} lines said, {} of {} owed showings, {} lost, {} duplicated, {} out of order, {} gapped",
        replayed.scenario, replayed.backend, d.said, d.shown, d.owed, d.lost, d.duplicated, d.out_of_order, d.gapped
    ));
    for example in &d.lost_examples {
        print_line(&format!("  lost: {example}"));
    }
    let recorded = std::fs::read_to_string(dir.join("report.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
        .and_then(|report| report.get("delivery").cloned());
    match recorded {
        Some(run) => {
            let same = ["said", "owed", "shown", "lost", "duplicated", "out_of_order", "gapped"].iter().all(|k| {
                let replayed = serde_json::to_value(&d).ok().and_then(|v| v.get(k).cloned());
                run.get(k) == replayed.as_ref()
            });
            print_line(if same {
                "  the same figures as the run's report"
            } else {
                "  the run's report.json says otherwise"
            });
        }
        None => print_line("  (no report.json to compare with)"),
    }
    if d.complete() { ExitCode::SUCCESS } else { ExitCode::from(1) }
}

fn list(dir: &Path) -> ExitCode {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir).with_context(|| format!("cannot read {}", dir.display()))
    {
        Ok(entries) => entries
            .filter_map(|e| Some(e.ok()?.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect(),
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    files.sort();
    let mut bad = false;
    for f in files {
        match Scenario::load(&f) {
            Ok(s) => print_line(&format!("{:<22} {:>3} steps  {}", s.name, s.steps.len(), s.description)),
            Err(e) => {
                print_line(&e.to_string());
                bad = true;
            }
        }
    }
    if bad { ExitCode::from(2) } else { ExitCode::SUCCESS }
}

/// Serves this node's containers to labs until killed. Exit 2 when it cannot: no root or tools
/// for packet rules, no Docker engine, an unreadable key, a taken address.
async fn agent(listen: SocketAddr, key_file: &Path) -> ExitCode {
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_max_level(tracing::Level::INFO).init();
    let ready = async {
        if let CutMethod::Hook(why) = CutMethod::probe() {
            anyhow::bail!("the agent makes packet rules in containers' namespaces, and cannot here: {why}");
        }
        let key = Key::read_or_make(key_file)?;
        let docker = bollard::Docker::connect_with_local_defaults().context("cannot reach a Docker engine")?;
        let docker = docker.negotiate_version().await.context("cannot reach a Docker engine")?;
        let listener =
            tokio::net::TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
        print_line(&format!("agent listening on {}", listener.local_addr()?));
        anyhow::Ok((listener, key, docker))
    };
    let (listener, key, docker) = match ready.await {
        Ok(ready) => ready,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    match meshlab_lab::agent::serve(listener, key, docker).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_of_several_scenarios_stay_inside_the_report_directory() {
        let dir = Path::new("out");
        assert_eq!(report_dir_of(dir, "chaos", 0), dir.join("chaos"));
        for name in ["../../x", "..", ".", "", "/etc", "a/b", "./a"] {
            assert_eq!(report_dir_of(dir, name, 2), dir.join("scenario-3"), "{name:?}");
        }
    }
}
