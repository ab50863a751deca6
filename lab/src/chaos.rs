//! A seeded random nemesis: faults and chat lines at random times, the same ones for the same
//! seed.
//!
//! The schedule is drawn from the seed, the step's settings and the peers running when the step
//! starts (simulating which peers each fault leaves running), so `--seed N` replays the same
//! faults at the same offsets. It is drawn as the step goes, in time order, so that a long step
//! costs no memory up front. While it runs, peers keep chatting at the step's rate. At the end
//! every cut is healed, every paused peer resumed and every peer started again; the scenario's next steps then await the
//! mesh and the delivery of every line.
//!
//! Repertoire: kill (SIGKILL), stop (SIGTERM), start (a peer that is down), restart (kill, then
//! start: a crash and a reboot), partition into random groups, cut one link, cut one direction,
//! heal everything, pause a peer (SIGSTOP; `docker pause`) and resume one, and loss, a rate
//! limit or a delay on one link. With `hold`, each partition, cut, condition and pause ends by
//! itself after a time drawn between the bounds. At most half the peers are down or paused at
//! once. A peer with no bootstrap peers is never stopped gracefully: after its goodbye nobody
//! would dial it again.

use std::collections::BTreeMap;
use std::iter::Peekable;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::backend::Backend;
use crate::lab::{Lab, LabError, Undo};
use crate::link::Condition;
use crate::scenario::{ChaosSpec, FAULTS};
use crate::world::World;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "fault", rename_all = "kebab-case")]
pub enum Fault {
    Kill {
        peer: String,
    },
    Stop {
        peer: String,
    },
    Start {
        peer: String,
    },
    Restart {
        peer: String,
    },
    Partition {
        groups: Vec<Vec<String>>,
    },
    Cut {
        a: String,
        b: String,
    },
    OneWay {
        from: String,
        to: String,
    },
    Heal,
    Pause {
        peer: String,
    },
    Resume {
        peer: String,
    },
    /// Loss on the link between a and b, both ways.
    Loss {
        a: String,
        b: String,
        percent: f64,
    },
    /// A rate limit on the link between a and b, both ways.
    Rate {
        a: String,
        b: String,
        bits_per_second: u64,
    },
    /// Delay and jitter on the link between a and b, both ways.
    Delay {
        a: String,
        b: String,
        delay_ms: u64,
        jitter_ms: u64,
    },
    /// The end of a held partition or cut: these directed cuts heal.
    Mend {
        pairs: Vec<(String, String)>,
    },
    /// The end of a held condition: these directed links carry on unconditioned.
    Clear {
        pairs: Vec<(String, String)>,
    },
}

impl Fault {
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Kill { .. } => "kill",
            Fault::Stop { .. } => "stop",
            Fault::Start { .. } => "start",
            Fault::Restart { .. } => "restart",
            Fault::Partition { .. } => "partition",
            Fault::Cut { .. } => "cut",
            Fault::OneWay { .. } => "one-way",
            Fault::Heal => "heal",
            Fault::Pause { .. } => "pause",
            Fault::Resume { .. } => "resume",
            Fault::Loss { .. } => "loss",
            Fault::Rate { .. } => "rate",
            Fault::Delay { .. } => "delay",
            Fault::Mend { .. } => "mend",
            Fault::Clear { .. } => "clear",
        }
    }

    /// The condition a link fault puts on the link between two peers.
    fn condition(&self) -> Option<(&String, &String, Condition)> {
        let ms = Duration::from_millis;
        match self {
            Fault::Loss { a, b, percent } => Some((a, b, Condition { loss: Some(*percent), ..Default::default() })),
            Fault::Rate { a, b, bits_per_second } => {
                Some((a, b, Condition { rate: Some(*bits_per_second), ..Default::default() }))
            }
            Fault::Delay { a, b, delay_ms, jitter_ms } => Some((
                a,
                b,
                Condition {
                    delay: Some(ms(*delay_ms)),
                    jitter: (*jitter_ms > 0).then(|| ms(*jitter_ms)),
                    ..Default::default()
                },
            )),
            _ => None,
        }
    }

    /// The fault that ends this one when it is held: the cuts it made mend, the condition
    /// clears, the paused peer resumes.
    fn undo(&self) -> Option<Fault> {
        let both = |a: &String, b: &String| vec![(a.clone(), b.clone()), (b.clone(), a.clone())];
        Some(match self {
            Fault::Partition { groups } => {
                let mut pairs = Vec::new();
                for (i, x) in groups.iter().enumerate() {
                    for y in &groups[i + 1..] {
                        for a in x {
                            for b in y {
                                pairs.extend(both(a, b));
                            }
                        }
                    }
                }
                Fault::Mend { pairs }
            }
            Fault::Cut { a, b } => Fault::Mend { pairs: both(a, b) },
            Fault::OneWay { from, to } => Fault::Mend { pairs: vec![(from.clone(), to.clone())] },
            Fault::Pause { peer } => Fault::Resume { peer: peer.clone() },
            f => {
                let (a, b, _) = f.condition()?;
                Fault::Clear { pairs: both(a, b) }
            }
        })
    }
}

impl std::fmt::Display for Fault {
    /// As a person would say it: `kill p03`, `partition p01 p02 | p03 p04`, `10% loss p01 <-> p02`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pairs = |pairs: &[(String, String)]| {
            pairs.iter().map(|(a, b)| format!("{a} -> {b}")).collect::<Vec<_>>().join(", ")
        };
        match self {
            Fault::Kill { peer } => write!(f, "kill {peer}"),
            Fault::Stop { peer } => write!(f, "stop {peer} (graceful)"),
            Fault::Start { peer } => write!(f, "start {peer}"),
            Fault::Restart { peer } => write!(f, "restart {peer} (crash and reboot)"),
            Fault::Partition { groups } => {
                let groups: Vec<String> = groups.iter().map(|g| g.join(" ")).collect();
                write!(f, "partition {}", groups.join(" | "))
            }
            Fault::Cut { a, b } => write!(f, "cut {a} <-> {b}"),
            Fault::OneWay { from, to } => write!(f, "cut {from} -> {to} (one way)"),
            Fault::Heal => write!(f, "heal everything"),
            Fault::Pause { peer } => write!(f, "pause {peer}"),
            Fault::Resume { peer } => write!(f, "resume {peer}"),
            Fault::Mend { pairs: p } => write!(f, "heal {} (held long enough)", pairs(p)),
            Fault::Clear { pairs: p } => write!(f, "lift the condition on {} (held long enough)", pairs(p)),
            link => {
                let (a, b, condition) = link.condition().expect("every other fault is a link condition");
                write!(f, "{condition} on {a} <-> {b}")
            }
        }
    }
}

/// One scheduled action, at an offset from the step's start.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Planned {
    pub at_ms: u64,
    #[serde(flatten)]
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Action {
    Fault(Fault),
    Say { say: String },
}

/// Most faults a [`ChaosRecord`] lists one by one: a long step with frequent faults applies
/// millions, and the report would grow without bound; the counts by kind cover them all.
pub const MAX_LISTED_FAULTS: usize = 1000;

/// What a chaos step did, for the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChaosRecord {
    pub seed: u64,
    /// Faults applied, by kind.
    pub applied: BTreeMap<&'static str, usize>,
    /// The first [`MAX_LISTED_FAULTS`] faults applied, with their offsets.
    pub faults: Vec<Planned>,
    pub lines: usize,
}

impl ChaosRecord {
    /// Faults applied, listed or not.
    pub fn fault_count(&self) -> usize {
        self.applied.values().sum()
    }

    fn applied(&mut self, planned: &Planned, fault: &Fault) {
        *self.applied.entry(fault.kind()).or_default() += 1;
        if self.faults.len() < MAX_LISTED_FAULTS {
            self.faults.push(planned.clone());
        }
    }
}

/// The schedule for `spec` with `seed`, given every peer's name, whether it runs now and
/// whether it has bootstrap peers: faults and lines in time order, drawn as they are taken, so
/// that a long step costs no memory up front.
pub fn plan<'a>(seed: u64, spec: &'a ChaosSpec, peers: &[(String, bool, bool)]) -> Schedule<'a> {
    let running: Vec<String> = peers.iter().filter(|p| p.1).map(|p| p.0.clone()).collect();
    let end = spec.duration.as_millis() as u64;
    let faults = Faults {
        rng: StdRng::seed_from_u64(seed),
        spec,
        names: peers.iter().map(|p| p.0.clone()).collect(),
        leavers: peers.iter().filter(|p| p.2).map(|p| p.0.clone()).collect(),
        running: running.clone(),
        paused: Vec::new(),
        t: 0.0,
        next_at: None,
        undos: Vec::new(),
        end,
    };
    let gap = 1000.0 / spec.rate;
    Schedule {
        faults: faults.peekable(),
        lines: StdRng::seed_from_u64(seed ^ LINES_STREAM),
        alive: running,
        gap,
        next_line: gap / 2.0,
        end,
    }
}

/// Lines are drawn from a random stream of their own, so that the faults a seed gives do not
/// depend on the rate or on how many lines were drawn before them.
const LINES_STREAM: u64 = 0x9e37_79b9_7f4a_7c15;

/// A chaos step's schedule: the faults, with lines evenly spread at the rate between them, each
/// from a peer running at that moment.
pub struct Schedule<'a> {
    faults: Peekable<Faults<'a>>,
    lines: StdRng,
    /// Who runs, as the faults taken so far leave it.
    alive: Vec<String>,
    /// Milliseconds between lines, and the offset of the next one.
    gap: f64,
    next_line: f64,
    end: u64,
}

impl Iterator for Schedule<'_> {
    type Item = Planned;

    fn next(&mut self) -> Option<Planned> {
        loop {
            let line_at = self.next_line as u64;
            let lines_over = line_at >= self.end;
            if let Some(planned) = self.faults.next_if(|f| lines_over || f.at_ms <= line_at) {
                apply(&planned.action, &mut self.alive);
                return Some(planned);
            }
            // Nobody left to say a line and no fault to start anyone: nothing more happens.
            if lines_over || self.alive.is_empty() && self.faults.peek().is_none() {
                return None;
            }
            self.next_line += self.gap;
            if let Some(peer) = self.alive.choose(&mut self.lines) {
                return Some(Planned { at_ms: line_at, action: Action::Say { say: peer.clone() } });
            }
        }
    }
}

/// The faults of a schedule, simulating which peers each leaves running.
struct Faults<'a> {
    rng: StdRng,
    spec: &'a ChaosSpec,
    names: Vec<String>,
    /// Peers with bootstrap peers: those that may be stopped gracefully.
    leavers: Vec<String>,
    running: Vec<String>,
    /// Running peers the faults so far left paused.
    paused: Vec<String>,
    /// Offset of the latest draw, in milliseconds.
    t: f64,
    /// The offset of the next fault to draw, once drawn.
    next_at: Option<f64>,
    /// Ends of held faults to come, soonest first.
    undos: Vec<Planned>,
    end: u64,
}

impl Iterator for Faults<'_> {
    type Item = Planned;

    /// The next fault, until the end. Faults arrive as a Poisson process (exponential gaps) with
    /// the given mean interval; with `hold`, each partition, cut, condition and pause is undone
    /// after a hold drawn between the bounds. When no fault applies and nothing held is due to
    /// end, none ever will (only faults change which apply), so that ends the faults too.
    fn next(&mut self) -> Option<Planned> {
        loop {
            let t = match self.next_at {
                Some(t) => t,
                None => {
                    let mean = self.spec.every.as_millis().max(1) as f64;
                    self.t += -mean * (1.0 - self.rng.random::<f64>()).ln();
                    *self.next_at.insert(self.t)
                }
            };
            if self.undos.first().is_some_and(|u| (u.at_ms as f64) <= t && u.at_ms < self.end) {
                let undo = self.undos.remove(0);
                if let Action::Fault(Fault::Resume { peer }) = &undo.action {
                    if !self.paused.contains(peer) {
                        continue; // killed or resumed meanwhile
                    }
                    self.paused.retain(|p| p != peer);
                }
                return Some(undo);
            }
            if t as u64 >= self.end {
                return None;
            }
            self.next_at = None;
            let can_leave = |name: &String| self.leavers.contains(name);
            let drawn = draw_fault(&mut self.rng, self.spec, &self.names, &self.running, &self.paused, &can_leave);
            let Some(fault) = drawn else {
                if self.undos.iter().any(|u| u.at_ms < self.end) {
                    continue;
                }
                return None;
            };
            match &fault {
                Fault::Pause { peer } => self.paused.push(peer.clone()),
                Fault::Resume { peer } | Fault::Kill { peer } | Fault::Stop { peer } | Fault::Restart { peer } => {
                    self.paused.retain(|p| p != peer)
                }
                _ => {}
            }
            if let (Some((lo, hi)), Some(undo)) = (self.spec.hold, fault.undo()) {
                let hold = self.rng.random_range(lo.as_millis() as u64..=hi.as_millis() as u64);
                let at_ms = t as u64 + hold;
                let i = self.undos.partition_point(|u| u.at_ms <= at_ms);
                self.undos.insert(i, Planned { at_ms, action: Action::Fault(undo) });
            }
            let planned = Planned { at_ms: t as u64, action: Action::Fault(fault) };
            apply(&planned.action, &mut self.running);
            return Some(planned);
        }
    }
}

fn apply(action: &Action, running: &mut Vec<String>) {
    match action {
        Action::Fault(Fault::Kill { peer } | Fault::Stop { peer }) => running.retain(|p| p != peer),
        Action::Fault(Fault::Start { peer }) => running.push(peer.clone()),
        _ => {}
    }
}

/// A fault among the allowed kinds that apply, given who runs.
fn draw_fault(
    rng: &mut StdRng,
    spec: &ChaosSpec,
    names: &[String],
    running: &[String],
    paused: &[String],
    can_leave: &impl Fn(&String) -> bool,
) -> Option<Fault> {
    let allowed = |k: &str| spec.faults.iter().any(|f| f == k);
    let down: Vec<&String> = names.iter().filter(|n| !running.contains(n)).collect();
    let may_take_down = running.len() > names.len().div_ceil(2);
    let live: Vec<String> = running.iter().filter(|p| !paused.contains(p)).cloned().collect();
    // Paused peers count as down for the limit of half the peers down at once.
    let may_pause = live.len() > names.len().div_ceil(2);
    let mut kinds = Vec::new();
    for &kind in FAULTS {
        let applicable = match kind {
            "pause" => may_pause,
            "resume" => !paused.is_empty(),
            "kill" => may_take_down,
            "stop" => may_take_down && running.iter().any(can_leave),
            "start" => !down.is_empty(),
            "restart" => !running.is_empty(),
            "partition" | "cut" | "one-way" | "loss" | "rate" | "delay" => names.len() >= 2,
            _ => true,
        };
        if applicable && allowed(kind) {
            kinds.push(kind);
        }
    }
    let kind = *kinds.choose(rng)?;
    let pick = |rng: &mut StdRng, from: &[String]| from.choose(rng).cloned();
    Some(match kind {
        "kill" => Fault::Kill { peer: pick(rng, running)? },
        "stop" => {
            let leavers: Vec<String> = running.iter().filter(|p| can_leave(p)).cloned().collect();
            Fault::Stop { peer: pick(rng, &leavers)? }
        }
        "start" => Fault::Start { peer: (*down.choose(rng)?).clone() },
        "restart" => Fault::Restart { peer: pick(rng, running)? },
        "partition" => {
            let mut shuffled = names.to_vec();
            shuffled.shuffle(rng);
            let groups = rng.random_range(2..=3.min(names.len()));
            let mut parts = vec![Vec::new(); groups];
            for (i, n) in shuffled.into_iter().enumerate() {
                parts[i % groups].push(n);
            }
            Fault::Partition { groups: parts }
        }
        "pause" => Fault::Pause { peer: pick(rng, &live)? },
        "resume" => Fault::Resume { peer: pick(rng, paused)? },
        "cut" | "one-way" => {
            let pair: Vec<&String> = names.choose_multiple(rng, 2).collect();
            let (a, b) = (pair[0].clone(), pair[1].clone());
            if kind == "cut" { Fault::Cut { a, b } } else { Fault::OneWay { from: a, to: b } }
        }
        "loss" | "rate" | "delay" => {
            let pair: Vec<&String> = names.choose_multiple(rng, 2).collect();
            let (a, b) = (pair[0].clone(), pair[1].clone());
            match kind {
                "loss" => Fault::Loss { a, b, percent: rng.random_range(5..=30) as f64 },
                "rate" => Fault::Rate { a, b, bits_per_second: *[64_000, 256_000, 1_000_000].choose(rng)? },
                _ => {
                    let delay_ms = rng.random_range(20..=200);
                    Fault::Delay { a, b, delay_ms, jitter_ms: rng.random_range(0..=delay_ms / 4) }
                }
            }
        }
        _ => Fault::Heal,
    })
}

/// Runs a chaos step: the planned faults and lines at their offsets, then heal all and start
/// every peer that is down.
/// `tell` hears of each fault applied and line said, with the world as it stands.
pub async fn run<B: Backend>(
    lab: &mut Lab<B>,
    spec: &ChaosSpec,
    seed: u64,
    tell: &mut dyn FnMut(&ChaosRecord, &World),
) -> Result<ChaosRecord, LabError> {
    let world = lab.world();
    let peers: Vec<(String, bool, bool)> =
        world.names().map(|n| (n.clone(), world.peer(n).is_some_and(|p| p.running), lab.has_bootstrap(n))).collect();
    let started = Instant::now();
    let mut record = ChaosRecord { seed, ..ChaosRecord::default() };
    for planned in plan(seed, spec, &peers) {
        let due = started + Duration::from_millis(planned.at_ms);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            lab.sleep(wait).await?;
        }
        match &planned.action {
            Action::Say { say } => {
                record.lines += 1;
                lab.say(say, &format!("chaos line {} from {say}", record.lines)).await?;
            }
            Action::Fault(fault) => {
                inflict(lab, fault).await?;
                record.applied(&planned, fault);
            }
        }
        tell(&record, lab.world());
    }
    if let Some(wait) = (started + spec.duration).checked_duration_since(Instant::now()) {
        lab.sleep(wait).await?;
    }
    lab.heal(None).await?;
    let paused: Vec<String> =
        lab.world().names().filter(|n| lab.world().peer(n).is_some_and(|p| p.paused)).cloned().collect();
    for peer in paused {
        lab.resume(&peer).await?;
    }
    let down: Vec<String> =
        lab.world().names().filter(|n| !lab.world().peer(n).is_some_and(|p| p.running)).cloned().collect();
    for peer in down {
        lab.restart(&peer).await?;
    }
    Ok(record)
}

async fn inflict<B: Backend>(lab: &mut Lab<B>, fault: &Fault) -> Result<(), LabError> {
    match fault {
        Fault::Kill { peer } => lab.kill(peer).await,
        Fault::Stop { peer } => lab.stop(peer).await,
        Fault::Start { peer } | Fault::Restart { peer } => lab.restart(peer).await,
        Fault::Partition { groups } => lab.partition(groups).await.map(drop),
        Fault::Cut { a, b } => lab.cut(a, b, false).await.map(drop),
        Fault::OneWay { from, to } => lab.cut(from, to, true).await.map(drop),
        Fault::Heal => lab.heal(None).await,
        Fault::Pause { peer } => lab.pause(peer).await,
        Fault::Resume { peer } => lab.resume(peer).await,
        Fault::Mend { pairs } => lab.undo(Undo::Heal(pairs.clone())).await,
        Fault::Clear { pairs } => lab.undo(Undo::Clear(pairs.clone())).await,
        link => {
            let (a, b, condition) = link.condition().expect("every other fault is a link condition");
            lab.condition(&[a.clone(), b.clone()], condition, false).await.map(drop)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ChaosSpec {
        ChaosSpec {
            duration: Duration::from_secs(30),
            rate: 5.0,
            seed: None,
            every: Duration::from_secs(1),
            faults: FAULTS.iter().map(|f| f.to_string()).collect(),
            hold: None,
        }
    }

    fn peers(n: usize) -> Vec<(String, bool, bool)> {
        (1..=n).map(|i| (format!("p{i}"), true, i > 1)).collect()
    }

    fn drawn(seed: u64, spec: &ChaosSpec, peers: &[(String, bool, bool)]) -> Vec<Planned> {
        plan(seed, spec, peers).collect()
    }

    fn faults(schedule: &[Planned]) -> Vec<&Planned> {
        schedule.iter().filter(|p| matches!(p.action, Action::Fault(_))).collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        assert_eq!(drawn(7, &spec(), &peers(12)), drawn(7, &spec(), &peers(12)));
        assert_ne!(drawn(7, &spec(), &peers(12)), drawn(8, &spec(), &peers(12)));
    }

    #[test]
    fn the_faults_do_not_depend_on_the_lines() {
        let mut busy = spec();
        busy.rate = 1000.0;
        let (calm, busy) = (drawn(5, &spec(), &peers(12)), drawn(5, &busy, &peers(12)));
        assert_eq!(faults(&calm), faults(&busy));
        let mut longer = spec();
        longer.duration *= 2;
        let head: Vec<Planned> = plan(5, &longer, &peers(12)).take_while(|p| p.at_ms < 30_000).collect();
        assert_eq!(head, calm, "a longer step begins as the shorter one");
    }

    #[test]
    fn a_long_step_is_drawn_as_it_goes() {
        let century = ChaosSpec {
            duration: Duration::from_secs(100 * 365 * 24 * 3600),
            rate: 1000.0,
            every: Duration::from_millis(1),
            ..spec()
        };
        let head: Vec<Planned> = plan(9, &century, &peers(12)).take(100_000).collect();
        assert_eq!(head.len(), 100_000);
        assert!(head.windows(2).all(|w| w[0].at_ms <= w[1].at_ms), "in time order");
        assert!(head.iter().any(|p| matches!(p.action, Action::Say { .. })), "lines between the faults");
    }

    #[test]
    fn a_schedule_with_nothing_to_do_ends_at_once() {
        let idle = ChaosSpec {
            duration: Duration::from_secs(100 * 365 * 24 * 3600),
            every: Duration::from_millis(1),
            faults: vec!["kill".into()],
            ..spec()
        };
        assert_eq!(plan(1, &idle, &[]).next(), None, "no peer to say a line, no fault that applies");
    }

    #[test]
    fn the_record_lists_a_bounded_number_of_faults_and_counts_them_all() {
        let mut record = ChaosRecord::default();
        let heal = Planned { at_ms: 1, action: Action::Fault(Fault::Heal) };
        for _ in 0..MAX_LISTED_FAULTS + 500 {
            record.applied(&heal, &Fault::Heal);
        }
        assert_eq!(record.faults.len(), MAX_LISTED_FAULTS);
        assert_eq!(record.fault_count(), MAX_LISTED_FAULTS + 500);
        assert_eq!(record.applied["heal"], MAX_LISTED_FAULTS + 500);
    }

    #[test]
    fn schedules_respect_the_rate_the_faults_and_the_living() {
        let schedule = drawn(4, &spec(), &peers(12));
        let says = schedule.iter().filter(|p| matches!(p.action, Action::Say { .. })).count();
        assert_eq!(says, 150, "5 lines a second for 30 s");
        let mut running: Vec<String> = peers(12).into_iter().map(|p| p.0).collect();
        let mut paused: Vec<String> = Vec::new();
        let mut kinds = std::collections::BTreeSet::new();
        let mut last = 0;
        for p in &schedule {
            assert!(p.at_ms >= last, "in time order");
            last = p.at_ms;
            match &p.action {
                Action::Say { say } => assert!(running.contains(say), "{say} says a line while down"),
                Action::Fault(f) => {
                    kinds.insert(f.kind());
                    if let Fault::Stop { peer } = f {
                        assert_ne!(peer, "p1", "p1 has no bootstrap peers");
                    }
                    match f {
                        Fault::Pause { peer } => {
                            assert!(running.contains(peer) && !paused.contains(peer), "{peer} paused twice or down");
                            paused.push(peer.clone());
                        }
                        Fault::Resume { peer } => assert!(paused.contains(peer), "{peer} resumed but not paused"),
                        _ => {}
                    }
                    if let Fault::Resume { peer }
                    | Fault::Kill { peer }
                    | Fault::Stop { peer }
                    | Fault::Restart { peer } = f
                    {
                        paused.retain(|p| p != peer);
                    }
                    apply(&p.action, &mut running);
                    assert!(running.len() - paused.len() >= 6, "at most half the peers down or paused");
                }
            }
        }
        assert_eq!(kinds.len(), FAULTS.len(), "every kind of fault appears in 30 s: {kinds:?}");
    }

    #[test]
    fn held_faults_end_within_their_bounds() {
        let mut s = spec();
        s.faults = ["partition", "cut", "one-way", "pause", "loss", "rate", "delay"].map(String::from).to_vec();
        s.hold = Some((Duration::from_secs(1), Duration::from_secs(3)));
        let schedule = drawn(11, &s, &peers(6));
        let mut open: Vec<(u64, Fault)> = Vec::new();
        let mut ended = 0;
        for p in &schedule {
            let Action::Fault(f) = &p.action else { continue };
            match f {
                Fault::Mend { .. } | Fault::Clear { .. } | Fault::Resume { .. } => {
                    let i = open.iter().position(|(_, o)| o.undo().as_ref() == Some(f)).expect("ends a fault begun");
                    let (began, _) = open.remove(i);
                    assert!((1000..=3000).contains(&(p.at_ms - began)), "held {} ms", p.at_ms - began);
                    ended += 1;
                }
                f => open.push((p.at_ms, f.clone())),
            }
        }
        assert!(ended > 10, "faults end by themselves: {ended}");
        assert!(open.iter().all(|(at, _)| at + 1000 > 30_000 - 3000), "only faults begun near the end stay open");
    }

    #[test]
    fn only_allowed_faults_are_drawn() {
        let mut s = spec();
        s.faults = vec!["cut".into(), "heal".into()];
        for p in plan(1, &s, &peers(6)) {
            if let Action::Fault(f) = p.action {
                assert!(matches!(f, Fault::Cut { .. } | Fault::Heal), "{f:?}");
            }
        }
    }
}
