//! A run's history: every event each peer printed and everything the lab did that the checks
//! depend on (which process is which, pauses, cuts), in the order the lab saw them, one JSON
//! object a line (`events.jsonl` next to the report; docs/report.md has the format).
//!
//! The delivery checker is a function of this history: [`replay`] feeds it to a fresh
//! [`World`] and the same cuts, so `lab check DIR` gives a finished run's delivery verdict
//! again, from the file alone, as Maelstrom checks a recorded history.

use std::collections::BTreeSet;
use std::io::{BufRead, BufWriter, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::event::PeerEvent;
use crate::world::{Cuts, Observation, Observed, World};

/// The history format's version, in its first line.
pub const VERSION: u32 = 1;

/// One line of a history. Times are milliseconds from the run's start.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "entry", rename_all = "snake_case")]
pub enum Entry {
    /// The first line.
    History {
        version: u32,
        scenario: String,
        backend: String,
    },
    /// The lab started process `instance` under `peer`.
    Start {
        at_ms: f64,
        peer: String,
        instance: u32,
    },
    /// A peer printed an event.
    Event {
        at_ms: f64,
        peer: String,
        instance: u32,
        event: PeerEvent,
    },
    /// A peer printed a line that is not an event.
    Breach {
        at_ms: f64,
        peer: String,
        instance: u32,
        line: String,
    },
    Exit {
        at_ms: f64,
        peer: String,
        instance: u32,
        status: String,
    },
    /// The lab paused or resumed a peer.
    Paused {
        at_ms: f64,
        peer: String,
        paused: bool,
    },
    /// The cuts in force from now on, as directed pairs (from, to).
    Cuts {
        at_ms: f64,
        pairs: Vec<(String, String)>,
    },
    /// A fault or action of the lab, as the timeline shows it.
    Mark {
        at_ms: f64,
        peer: String,
        kind: String,
        detail: String,
    },
    /// The run's checks ended here (what follows is teardown).
    End {
        at_ms: f64,
    },
}

/// Writes a history as the run goes.
pub struct Journal {
    out: BufWriter<std::fs::File>,
    started: Instant,
}

impl Journal {
    pub fn create(path: &Path, started: Instant, scenario: &str, backend: &str) -> anyhow::Result<Journal> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let file = std::fs::File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let mut journal = Journal { out: BufWriter::new(file), started };
        journal.write(&Entry::History { version: VERSION, scenario: scenario.into(), backend: backend.into() });
        Ok(journal)
    }

    /// Milliseconds from the run's start to `at`.
    pub fn at_ms(&self, at: Instant) -> f64 {
        (at.saturating_duration_since(self.started).as_secs_f64() * 1e6).round() / 1e3
    }

    /// Appends an entry. A history that cannot be written is given up with a warning, never
    /// a failed run.
    pub fn write(&mut self, entry: &Entry) {
        let line = serde_json::to_string(entry).expect("entries serialize");
        if let Err(e) = writeln!(self.out, "{line}") {
            tracing::warn!("cannot write the run's history: {e}");
        }
    }

    /// An observation as an entry (stderr lines go to the logs, not the history).
    pub fn observed(&mut self, o: &Observed) {
        let (at_ms, peer, instance) = (self.at_ms(o.at), o.peer.clone(), o.instance);
        let entry = match &o.what {
            Observation::Event(event) => Entry::Event { at_ms, peer, instance, event: event.clone() },
            Observation::Breach(line) => Entry::Breach { at_ms, peer, instance, line: line.clone() },
            Observation::Exited(status) => Entry::Exit { at_ms, peer, instance, status: status.clone() },
            Observation::Stderr(_) => return,
        };
        self.write(&entry);
    }

    pub fn finish(&mut self, at: Instant) {
        let at_ms = self.at_ms(at);
        self.write(&Entry::End { at_ms });
        if let Err(e) = self.out.flush() {
            tracing::warn!("cannot write the run's history: {e}");
        }
    }
}

/// A replayed history: the world and the cuts as they stood at its end.
pub struct Replayed {
    pub scenario: String,
    pub backend: String,
    pub world: World,
    pub cuts: Cuts,
}

/// Reads a history and replays it into a fresh world, up to its `end`.
pub fn replay(path: &Path) -> anyhow::Result<Replayed> {
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let base = Instant::now();
    let at = |ms: f64| base + Duration::from_secs_f64(ms.max(0.0) / 1000.0);
    let mut world = World::new(base);
    let mut cuts = Cuts::default();
    let (mut scenario, mut backend) = (String::new(), String::new());
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.with_context(|| format!("cannot read {}", path.display()))?;
        let entry: Entry = serde_json::from_str(&line)
            .with_context(|| format!("{}:{}: not a history entry", path.display(), i + 1))?;
        let observe = |world: &mut World, peer: String, instance, t, what| {
            world.observe(Observed { peer, instance, at: at(t), what });
        };
        match entry {
            Entry::History { version, scenario: s, backend: b } => {
                anyhow::ensure!(
                    version == VERSION,
                    "{}: history version {version}, this lab reads {VERSION}",
                    path.display()
                );
                (scenario, backend) = (s, b);
            }
            Entry::Start { peer, instance, .. } => world.started(&peer, instance),
            Entry::Event { at_ms, peer, instance, event } => {
                observe(&mut world, peer, instance, at_ms, Observation::Event(event))
            }
            Entry::Breach { at_ms, peer, instance, line } => {
                observe(&mut world, peer, instance, at_ms, Observation::Breach(line))
            }
            Entry::Exit { at_ms, peer, instance, status } => {
                observe(&mut world, peer, instance, at_ms, Observation::Exited(status))
            }
            Entry::Paused { peer, paused, .. } => world.set_paused(&peer, paused),
            Entry::Cuts { pairs, .. } => cuts = Cuts::from_pairs(pairs),
            Entry::Mark { at_ms, peer, kind, detail } => world.mark_at(at(at_ms), &peer, &kind, detail),
            Entry::End { .. } => break,
        }
    }
    Ok(Replayed { scenario, backend, world, cuts })
}

/// The directed cut pairs of `cuts`, for an entry.
pub fn cut_pairs(cuts: &Cuts) -> Vec<(String, String)> {
    cuts.pairs().cloned().collect::<BTreeSet<_>>().into_iter().collect()
}
