//! A seeded random nemesis: faults and chat lines at random times, the same ones for the same
//! seed.
//!
//! The whole schedule is drawn before anything runs, from the seed, the step's settings and the
//! peers running when the step starts (simulating which peers each fault leaves running), so
//! `--seed N` replays the same faults at the same offsets. While it runs, peers keep chatting at
//! the step's rate. At the end every cut is healed and every peer started again; the scenario's
//! next steps then await the mesh and the delivery of every line.
//!
//! Repertoire: kill (SIGKILL), stop (SIGTERM), start (a peer that is down), restart (kill, then
//! start: a crash and a reboot), partition into random groups, cut one link, cut one direction,
//! heal everything. At most half the peers are down at once. A peer with no bootstrap peers is
//! never stopped gracefully: after its goodbye nobody would dial it again.

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::backend::Backend;
use crate::lab::{Lab, LabError};
use crate::scenario::ChaosSpec;

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "fault", rename_all = "kebab-case")]
pub enum Fault {
    Kill { peer: String },
    Stop { peer: String },
    Start { peer: String },
    Restart { peer: String },
    Partition { groups: Vec<Vec<String>> },
    Cut { a: String, b: String },
    OneWay { from: String, to: String },
    Heal,
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

/// What a chaos step did, for the report.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChaosRecord {
    pub seed: u64,
    pub faults: Vec<Planned>,
    pub lines: usize,
}

/// The schedule for `spec` with `seed`, given every peer's name, whether it runs now and
/// whether it has bootstrap peers.
pub fn plan(seed: u64, spec: &ChaosSpec, peers: &[(String, bool, bool)]) -> Vec<Planned> {
    let mut rng = StdRng::seed_from_u64(seed);
    let names: Vec<String> = peers.iter().map(|p| p.0.clone()).collect();
    let mut running: Vec<String> = peers.iter().filter(|p| p.1).map(|p| p.0.clone()).collect();
    let can_leave = |name: &String| peers.iter().any(|p| p.0 == *name && p.2);
    let end = spec.duration.as_millis() as u64;
    let mut out = Vec::new();
    // Lines, evenly spread at the rate, each from a peer running at that moment: drawn after
    // the faults, so the two timelines interleave.
    let mut faults = Vec::new();
    let mean = spec.every.as_millis().max(1) as f64;
    let mut t = 0.0;
    loop {
        // Exponential gaps: faults arrive as a Poisson process with the given mean interval.
        t += -mean * (1.0 - rng.random::<f64>()).ln();
        if t as u64 >= end {
            break;
        }
        if let Some(fault) = draw_fault(&mut rng, spec, &names, &mut running, &can_leave) {
            faults.push(Planned { at_ms: t as u64, action: Action::Fault(fault) });
        }
    }
    let gap = 1000.0 / spec.rate;
    let mut fault_index = 0;
    let mut alive: Vec<String> = peers.iter().filter(|p| p.1).map(|p| p.0.clone()).collect();
    let mut at = gap / 2.0;
    while (at as u64) < end {
        while fault_index < faults.len() && faults[fault_index].at_ms <= at as u64 {
            apply(&faults[fault_index].action, &mut alive);
            out.push(faults[fault_index].clone());
            fault_index += 1;
        }
        if let Some(peer) = alive.choose(&mut rng) {
            out.push(Planned { at_ms: at as u64, action: Action::Say { say: peer.clone() } });
        }
        at += gap;
    }
    out.extend(faults.into_iter().skip(fault_index));
    out
}

fn apply(action: &Action, running: &mut Vec<String>) {
    match action {
        Action::Fault(Fault::Kill { peer } | Fault::Stop { peer }) => running.retain(|p| p != peer),
        Action::Fault(Fault::Start { peer }) => running.push(peer.clone()),
        _ => {}
    }
}

fn draw_fault(
    rng: &mut StdRng,
    spec: &ChaosSpec,
    names: &[String],
    running: &mut Vec<String>,
    can_leave: &impl Fn(&String) -> bool,
) -> Option<Fault> {
    let allowed = |k: &str| spec.faults.iter().any(|f| f == k);
    let down: Vec<&String> = names.iter().filter(|n| !running.contains(n)).collect();
    let may_take_down = running.len() > names.len().div_ceil(2);
    let mut kinds = Vec::new();
    for kind in ["kill", "stop", "start", "restart", "partition", "cut", "one-way", "heal"] {
        let applicable = match kind {
            "kill" => may_take_down,
            "stop" => may_take_down && running.iter().any(can_leave),
            "start" => !down.is_empty(),
            "restart" => !running.is_empty(),
            "partition" | "cut" | "one-way" => names.len() >= 2,
            _ => true,
        };
        if applicable && allowed(kind) {
            kinds.push(kind);
        }
    }
    let kind = *kinds.choose(rng)?;
    let pick = |rng: &mut StdRng, from: &[String]| from.choose(rng).cloned();
    let fault = match kind {
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
        "cut" | "one-way" => {
            let pair: Vec<&String> = names.choose_multiple(rng, 2).collect();
            let (a, b) = (pair[0].clone(), pair[1].clone());
            if kind == "cut" { Fault::Cut { a, b } } else { Fault::OneWay { from: a, to: b } }
        }
        _ => Fault::Heal,
    };
    match &fault {
        Fault::Kill { peer } | Fault::Stop { peer } => running.retain(|p| p != peer),
        Fault::Start { peer } => running.push(peer.clone()),
        _ => {}
    }
    Some(fault)
}

/// Runs a chaos step: the planned faults and lines at their offsets, then heal all and start
/// every peer that is down.
pub async fn run<B: Backend>(lab: &mut Lab<B>, spec: &ChaosSpec, seed: u64) -> Result<ChaosRecord, LabError> {
    let world = lab.world();
    let peers: Vec<(String, bool, bool)> =
        world.names().map(|n| (n.clone(), world.peer(n).is_some_and(|p| p.running), lab.has_bootstrap(n))).collect();
    let schedule = plan(seed, spec, &peers);
    let started = Instant::now();
    let mut record = ChaosRecord { seed, ..ChaosRecord::default() };
    for planned in &schedule {
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
                record.faults.push(planned.clone());
            }
        }
    }
    if let Some(wait) = (started + spec.duration).checked_duration_since(Instant::now()) {
        lab.sleep(wait).await?;
    }
    lab.heal(None).await?;
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
        Fault::Partition { groups } => lab.partition(groups).await,
        Fault::Cut { a, b } => lab.cut(a, b, false).await,
        Fault::OneWay { from, to } => lab.cut(from, to, true).await,
        Fault::Heal => lab.heal(None).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::FAULTS;

    fn spec() -> ChaosSpec {
        ChaosSpec {
            duration: Duration::from_secs(30),
            rate: 5.0,
            seed: None,
            every: Duration::from_secs(1),
            faults: FAULTS.iter().map(|f| f.to_string()).collect(),
        }
    }

    fn peers(n: usize) -> Vec<(String, bool, bool)> {
        (1..=n).map(|i| (format!("p{i}"), true, i > 1)).collect()
    }

    #[test]
    fn the_same_seed_gives_the_same_schedule() {
        assert_eq!(plan(7, &spec(), &peers(12)), plan(7, &spec(), &peers(12)));
        assert_ne!(plan(7, &spec(), &peers(12)), plan(8, &spec(), &peers(12)));
    }

    #[test]
    fn schedules_respect_the_rate_the_faults_and_the_living() {
        let schedule = plan(3, &spec(), &peers(12));
        let says = schedule.iter().filter(|p| matches!(p.action, Action::Say { .. })).count();
        assert_eq!(says, 150, "5 lines a second for 30 s");
        let mut running: Vec<String> = peers(12).into_iter().map(|p| p.0).collect();
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
                    apply(&p.action, &mut running);
                    assert!(running.len() >= 6, "at most half the peers down");
                }
            }
        }
        assert_eq!(kinds.len(), 8, "every kind of fault appears in 30 s: {kinds:?}");
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
