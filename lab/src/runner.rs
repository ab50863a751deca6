//! Runs a scenario on a lab: each step through the lab's verbs, a progress line per step, an
//! overall timeout, and a [`Report`] of everything measured. Every peer is gone when it returns.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::backend::Backend;
use crate::chaos::{self, ChaosRecord};
use crate::lab::{Lab, LabError, Undo};
use crate::progress::{self, Mode, Progress, human};
use crate::scenario::{Action, Scenario, Step};
use crate::world::{Delivery, LineOut, Mark};

#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// What to show on stdout while the run goes.
    pub progress: Mode,
    /// Replaces the seed of every chaos step.
    pub seed: Option<u64>,
    /// Keep the run's history (crate::history) in this file.
    pub history: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub index: usize,
    pub line: usize,
    pub action: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub started_ms: f64,
    pub elapsed_ms: f64,
    pub ok: bool,
    /// For awaits: the time until the condition held, from the step's start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub converged_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// For chaos steps: the seed, the faults applied and the lines said.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chaos: Option<ChaosRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub step: usize,
    pub line: usize,
    pub action: String,
    pub error: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Percentiles {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Percentiles {
    pub fn of(sorted: &[Duration]) -> Percentiles {
        let at = |p: f64| sorted.get(((sorted.len() as f64 - 1.0) * p).round() as usize).map_or(0.0, |d| ms(*d));
        Percentiles { count: sorted.len(), p50_ms: at(0.5), p99_ms: at(0.99), max_ms: at(1.0) }
    }
}

/// The mesh as it stood at the end: who ran, who was connected, what was cut.
#[derive(Debug, Clone, Default, Serialize)]
pub struct MeshSnapshot {
    pub peers: Vec<(String, bool)>,
    pub links: Vec<(String, String)>,
    pub cuts: Vec<(String, String)>,
}

/// The version of report.json's format (docs/report.md).
pub const REPORT_SCHEMA: u32 = 1;

/// Most showings report.json lists one by one (the delivery figures count them all).
pub const MAX_LISTED_SHOWINGS: usize = 200_000;

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// [`REPORT_SCHEMA`].
    pub schema: u32,
    pub scenario: String,
    pub description: String,
    pub backend: String,
    /// How the backend runs peers and makes cuts and link conditions.
    pub method: String,
    /// Whether cuts and link conditions were the peers' own (their lab hook) rather than the
    /// kernel's.
    pub cooperative: bool,
    pub time_scale: f64,
    pub passed: bool,
    pub started_unix_ms: u64,
    pub wall_ms: f64,
    pub steps: Vec<StepRecord>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<Failure>,
    pub delivery: Delivery,
    pub latency_direct: Percentiles,
    pub latency_catch_up: Percentiles,
    pub timeline: Vec<Mark>,
    pub mesh: MeshSnapshot,
    /// Every line said and each receiver's showing of it.
    pub lines: Vec<LineOut>,
    /// Whether showings were left out of `lines` (past [`MAX_LISTED_SHOWINGS`]).
    pub lines_truncated: bool,
    /// Every peer's stderr (logs), by peer name; written as separate files, not in the JSON.
    #[serde(skip)]
    pub logs: std::collections::BTreeMap<String, Vec<String>>,
}

pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Runs every step of `scenario` on `lab`, stopping at the first failure, then removes every
/// peer and returns the report.
pub async fn run<B: Backend>(scenario: &Scenario, lab: &mut Lab<B>, options: &RunOptions) -> Report {
    lab.common_flags = scenario.flags.clone();
    if scenario.keyed {
        lab.private_mesh();
    }
    let started = Instant::now();
    let started_unix_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    let mut shown = Progress::new(options.progress);
    if let Some(path) = &options.history
        && let Err(e) = lab.journal_to(path, &scenario.name)
    {
        shown.line(&format!("warning: no history kept: {e:#}"));
    }
    if shown.enabled() {
        let scale = lab.backend().time_scale();
        let scaled = if scale == 1.0 { String::new() } else { format!("; deadlines x{scale}") };
        let keyed = if scenario.keyed { "; a private mesh with a fresh key" } else { "" };
        shown.line(&format!("{} ({}{scaled}{keyed})", scenario.name, lab.backend().describe()));
        if !scenario.description.is_empty() {
            shown.line(&format!("  {}", scenario.description));
        }
    }
    let mut steps = Vec::new();
    let mut failure = None;
    let limit = lab.scaled(scenario.timeout);
    let total = scenario.steps.len();
    let all = async {
        for (i, step) in scenario.steps.iter().enumerate() {
            shown.step_started(&step.action.describe(), expected_length(lab, &step.action));
            let record = run_step(lab, i + 1, step, started, options, &mut failure, &shown).await;
            shown.step_done(&step_line(&record, total));
            if !record.ok
                && let Some(d) = &record.detail
            {
                shown.line(&format!("        line {}: {}", record.line, d.replace('\n', "\n        ")));
            }
            let ok = record.ok;
            steps.push(record);
            if !ok {
                break;
            }
        }
    };
    if tokio::time::timeout(limit, all).await.is_err() {
        let index = steps.len() + 1;
        let step = &scenario.steps[index - 1];
        failure = Some(Failure {
            step: index,
            line: step.line,
            action: step.action.describe(),
            error: format!("the scenario did not finish within its timeout ({})", humantime::format_duration(limit)),
        });
    }
    lab.end_journal();
    let report = finish(scenario, lab, started, started_unix_ms, steps, failure);
    lab.shutdown().await;
    if shown.enabled() {
        for line in summary(&report) {
            shown.line(&line);
        }
    }
    report
}

/// How long a step is expected to take, for the progress bar: a sleep's or a chaos step's
/// length, an await's deadline.
fn expected_length<B: Backend>(lab: &Lab<B>, action: &Action) -> Option<Duration> {
    match action {
        Action::Sleep(d) => Some(*d),
        Action::Chaos(c) => Some(c.duration),
        Action::AwaitMesh { within, .. } | Action::AwaitDelivery { within, .. } => Some(lab.scaled(*within)),
        _ => None,
    }
}

async fn run_step<B: Backend>(
    lab: &mut Lab<B>,
    index: usize,
    step: &Step,
    run_started: Instant,
    options: &RunOptions,
    failure: &mut Option<Failure>,
    shown: &Progress,
) -> StepRecord {
    let t0 = Instant::now();
    let outcome = execute(lab, step, options, shown).await;
    let mut record = StepRecord {
        index,
        line: step.line,
        action: step.action.describe(),
        note: step.note.clone(),
        started_ms: ms(t0 - run_started),
        elapsed_ms: ms(t0.elapsed()),
        ok: outcome.is_ok(),
        converged_ms: None,
        detail: None,
        chaos: None,
    };
    match outcome {
        Ok(Outcome { converged, detail, chaos }) => {
            record.converged_ms = converged.map(ms);
            record.detail = detail;
            record.chaos = chaos;
        }
        Err(e) => {
            record.detail = Some(e.to_string());
            *failure =
                Some(Failure { step: index, line: step.line, action: record.action.clone(), error: e.to_string() });
        }
    }
    record
}

#[derive(Default)]
struct Outcome {
    converged: Option<Duration>,
    detail: Option<String>,
    chaos: Option<ChaosRecord>,
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

async fn execute<B: Backend>(
    lab: &mut Lab<B>,
    step: &Step,
    options: &RunOptions,
    shown: &Progress,
) -> Result<Outcome, LabError> {
    match &step.action {
        Action::Start { peers, via, flags, keep_state } => {
            if *keep_state {
                for p in peers {
                    lab.keep_state(p);
                }
            }
            lab.start(&refs(peers), &refs(via), flags).await?
        }
        Action::Stop(peers) => {
            for p in peers {
                lab.stop(p).await?;
            }
        }
        Action::Kill(peers) => {
            for p in peers {
                lab.kill(p).await?;
            }
        }
        Action::Restart(peers) => {
            for p in peers {
                lab.restart(p).await?;
            }
        }
        Action::Pause(peers) => {
            for p in peers {
                lab.pause(p).await?;
                if let Some(hold) = step.hold {
                    lab.undo_after(hold, Undo::Resume(p.clone()));
                }
            }
        }
        Action::Resume(peers) => {
            for p in peers {
                lab.resume(p).await?;
            }
        }
        Action::Partition(groups) => {
            let pairs = lab.partition(groups).await?;
            hold_then(lab, step, Undo::Heal(pairs));
        }
        Action::Cut { a, b, one_way } => {
            let pairs = lab.cut(a, b, *one_way).await?;
            hold_then(lab, step, Undo::Heal(pairs));
        }
        Action::Condition { peers, condition, one_way } => {
            let pairs = lab.condition(peers, *condition, *one_way).await?;
            hold_then(lab, step, Undo::Clear(pairs));
        }
        Action::Heal(pair) => lab.heal(pair.as_ref().map(|(a, b)| (a.as_str(), b.as_str()))).await?,
        Action::Say { peer, text, count } => {
            for i in 1..=*count {
                let line = if *count == 1 { text.clone() } else { format!("{text} #{i}") };
                lab.say(peer, &line).await?;
            }
        }
        Action::AwaitMesh { peers, within } => {
            let took = lab.await_mesh(peers.as_deref(), *within).await?;
            return Ok(Outcome {
                converged: Some(took),
                detail: Some(format!("converged in {:.1} ms", ms(took))),
                chaos: None,
            });
        }
        Action::AwaitDelivery { within, p99 } => {
            let since = lab.last_delivery_check();
            let (took, d) = lab.await_delivery(*within).await?;
            let mut detail = format!("{} lines, {} of {} owed showings in {:.1} ms", d.said, d.shown, d.owed, ms(took));
            if let Some(budget) = p99 {
                let (direct, _) = lab.world().latencies_since(since);
                let p = Percentiles::of(&direct);
                if p.p99_ms > ms(*budget) {
                    return Err(LabError::Check {
                        expected: format!("direct showings' p99 at most {}", humantime::format_duration(*budget)),
                        seen: format!(
                            "p99 {:.1} ms (p50 {:.1} ms, max {:.1} ms) over {} showings",
                            p.p99_ms, p.p50_ms, p.max_ms, p.count
                        ),
                    });
                }
                detail.push_str(&format!("; direct p99 {:.1} ms over {} showings", p.p99_ms, p.count));
            }
            return Ok(Outcome { converged: Some(took), detail: Some(detail), chaos: None });
        }
        Action::Sleep(d) => lab.sleep(*d).await?,
        Action::Chaos(spec) => {
            let seed = options.seed.or(spec.seed).unwrap_or_else(rand::random);
            shown.line(&format!("        chaos seed {seed} (replay it with --seed {seed})"));
            let mut tell = |record: &ChaosRecord, world: &crate::world::World| {
                shown.step_update(format!(
                    "{} faults, {} lines said, {} shown",
                    record.fault_count(),
                    record.lines,
                    world.showings()
                ));
            };
            let record = chaos::run(lab, spec, seed, &mut tell).await?;
            let kinds: Vec<String> = record.applied.iter().map(|(k, n)| format!("{n} {k}")).collect();
            let detail =
                format!("seed {seed}: {} faults ({}), {} lines", record.fault_count(), kinds.join(", "), record.lines);
            return Ok(Outcome { converged: None, detail: Some(detail), chaos: Some(record) });
        }
    }
    Ok(Outcome::default())
}

/// Has the lab undo what a step did once its `for` is up.
fn hold_then<B: Backend>(lab: &mut Lab<B>, step: &Step, undo: Undo) {
    if let Some(hold) = step.hold {
        lab.undo_after(hold, undo);
    }
}

fn finish<B: Backend>(
    scenario: &Scenario,
    lab: &Lab<B>,
    started: Instant,
    started_unix_ms: u64,
    steps: Vec<StepRecord>,
    failure: Option<Failure>,
) -> Report {
    let world = lab.world();
    let (direct, catch_up) = world.latencies();
    let running = world.running();
    let mut links = Vec::new();
    for (i, a) in running.iter().enumerate() {
        for b in &running[i + 1..] {
            let id = |n: &str| world.peer(n).and_then(|p| p.id.clone()).unwrap_or_default();
            let lists = |x: &str, y: &str| world.peer(x).is_some_and(|p| p.neighbours.contains(&id(y)));
            if lists(a, b) && lists(b, a) {
                links.push((a.clone(), b.clone()));
            }
        }
    }
    let mesh = MeshSnapshot {
        peers: world.names().map(|n| (n.clone(), world.peer(n).is_some_and(|p| p.running))).collect(),
        links,
        cuts: lab.cuts().pairs().cloned().collect(),
    };
    let delivery = world.delivery(lab.cuts());
    let (lines, lines_truncated) = world.line_records(MAX_LISTED_SHOWINGS);
    Report {
        schema: REPORT_SCHEMA,
        lines,
        lines_truncated,
        scenario: scenario.name.clone(),
        description: scenario.description.clone(),
        backend: lab.backend().name().to_string(),
        method: lab.backend().describe(),
        cooperative: lab.backend().cuts_acknowledged_by_events(),
        time_scale: lab.backend().time_scale(),
        passed: failure.is_none(),
        started_unix_ms,
        wall_ms: ms(started.elapsed()),
        steps,
        failure,
        delivery,
        latency_direct: Percentiles::of(&direct),
        latency_catch_up: Percentiles::of(&catch_up),
        timeline: world.timeline.clone(),
        mesh,
        logs: world.logs().iter().map(|(n, l)| (n.clone(), l.iter().cloned().collect())).collect(),
    }
}

/// A finished step's line: `  3/7 await mesh within 5s ........ ok   12.3 ms  (detail)`.
fn step_line(r: &StepRecord, total: usize) -> String {
    let width = total.to_string().len();
    let label = match &r.note {
        Some(note) => format!("{} — {note}", r.action),
        None => r.action.clone(),
    };
    let detail = match (&r.detail, r.ok) {
        (Some(d), true) => format!("  ({d})"),
        _ => String::new(),
    };
    let took = human(Duration::from_secs_f64(r.elapsed_ms / 1000.0));
    format!("  {:>width$}/{total} {label:.<60} {} {took:>9}{detail}", r.index, progress::verdict(r.ok))
}

/// The run's last lines: the verdict and counts, the latencies, where it failed.
fn summary(r: &Report) -> Vec<String> {
    let d = &r.delivery;
    let mut lines = vec![format!(
        "{} {} ({}) in {}: {} lines said, {} of {} owed showings, {} lost, {} duplicated, {} out of order, {} gapped",
        progress::pass_fail(r.passed),
        r.scenario,
        r.backend,
        human(Duration::from_secs_f64(r.wall_ms / 1000.0)),
        d.said,
        d.shown,
        d.owed,
        d.lost,
        d.duplicated,
        d.out_of_order,
        d.gapped
    )];
    for (kind, l) in [("direct", &r.latency_direct), ("caught up", &r.latency_catch_up)] {
        if l.count > 0 {
            lines.push(format!(
                "  latency, {kind}: p50 {}, p99 {}, max {} ({} showings)",
                human_ms(l.p50_ms),
                human_ms(l.p99_ms),
                human_ms(l.max_ms),
                l.count
            ));
        }
    }
    if let Some(f) = &r.failure {
        lines.push(format!("  failed at step {} (line {}): {}", f.step, f.line, f.action));
    }
    lines
}

fn human_ms(ms: f64) -> String {
    human(Duration::from_secs_f64(ms / 1000.0))
}
