//! The lab's fault-injection hook: lab use only, off unless the peer runs with `--lab`.
//!
//! The lab partitions peers on the process backend by telling each peer, on stdin, to drop all
//! traffic to and/or from peers of a given name and to refuse their connections. Nothing is
//! closed by the hook itself: heartbeats time out as after a real cut. Cuts are by name, not id,
//! so a cut survives the other peer's restart (a restarted peer has a new id).
//!
//! Link conditions are the same kind of cooperation: `/lab condition NAME loss=10 rate=64000
//! delay=50ms jitter=10ms` makes the connection to peers of that name hold back the frames it
//! sends (see crate::connection's shaper) as a lossy, slow or distant link would make them late;
//! `/lab condition NAME` alone lifts it.
//!
//! Commands: `/lab cut NAME [in|out|both]`, `/lab heal NAME`, `/lab heal` (every cut),
//! `/lab condition NAME [WORDS]`.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Which traffic of a cut peer is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// What it sends us.
    In,
    /// What we send it.
    Out,
    Both,
}

impl Direction {
    /// (drop inbound, drop outbound)
    pub fn drops(self) -> (bool, bool) {
        match self {
            Direction::In => (true, false),
            Direction::Out => (false, true),
            Direction::Both => (true, true),
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
            Direction::Both => "both",
        }
    }

    fn parse(s: &str) -> Result<Direction, String> {
        match s {
            "in" => Ok(Direction::In),
            "out" => Ok(Direction::Out),
            "both" => Ok(Direction::Both),
            other => Err(format!("unknown direction {other:?}: expected in, out or both")),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum LabCommand {
    Cut {
        name: String,
        direction: Direction,
    },
    /// Heal one name, or every cut when None.
    Heal {
        name: Option<String>,
    },
    /// Condition what we send to peers of a name, or lift the condition when None.
    Condition {
        name: String,
        condition: Option<Condition>,
    },
}

/// What happens to the frames we send to one peer: held back for a delay (varied by up to the
/// jitter either way), spaced out to a rate, and a share of them late as if lost and sent again.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Condition {
    /// Percent of frames lost (and sent again, late).
    pub loss: f64,
    /// Bits per second, when limited.
    pub rate: Option<u64>,
    pub delay: Duration,
    pub jitter: Duration,
}

impl Condition {
    /// Reads `loss=10 rate=64000 delay=50ms jitter=10ms` (any of them, at least one).
    pub fn parse(words: &[&str]) -> Result<Condition, String> {
        let mut c = Condition::default();
        if words.is_empty() {
            return Err("a condition needs loss=, rate=, delay= or jitter=".into());
        }
        let millis = |v: &str| v.strip_suffix("ms").and_then(|n| n.parse().ok()).map(Duration::from_millis);
        for word in words {
            let bad = || format!("bad condition {word:?}: expected loss=PERCENT, rate=BITS, delay=Nms or jitter=Nms");
            let (key, value) = word.split_once('=').ok_or_else(bad)?;
            match key {
                "loss" => c.loss = value.parse().ok().filter(|l| (0.0..100.0).contains(l)).ok_or_else(bad)?,
                "rate" => c.rate = Some(value.parse().ok().filter(|r| *r > 0).ok_or_else(bad)?),
                "delay" => c.delay = millis(value).ok_or_else(bad)?,
                "jitter" => c.jitter = millis(value).ok_or_else(bad)?,
                _ => return Err(bad()),
            }
        }
        Ok(c)
    }

    /// The words it was given in, in their order (what the `hook` event shows).
    pub fn words(&self) -> String {
        let mut words = Vec::new();
        if self.loss > 0.0 {
            words.push(format!("loss={}", self.loss));
        }
        if let Some(r) = self.rate {
            words.push(format!("rate={r}"));
        }
        if !self.delay.is_zero() {
            words.push(format!("delay={}ms", self.delay.as_millis()));
        }
        if !self.jitter.is_zero() {
            words.push(format!("jitter={}ms", self.jitter.as_millis()));
        }
        words.join(" ")
    }
}

/// The conditions in force, by peer name: the mesh's hook writes them, every connection's
/// writer reads them.
#[derive(Debug, Default)]
pub struct Conditions(RwLock<BTreeMap<String, Condition>>);

impl Conditions {
    pub fn of(&self, name: &str) -> Option<Condition> {
        self.0.read().expect("never poisoned: nothing panics while holding it").get(name).copied()
    }

    fn set(&self, name: String, condition: Option<Condition>) {
        let mut table = self.0.write().expect("never poisoned: nothing panics while holding it");
        match condition {
            Some(c) => table.insert(name, c),
            None => table.remove(&name),
        };
    }

    fn table(&self) -> BTreeMap<String, String> {
        let table = self.0.read().expect("never poisoned: nothing panics while holding it");
        table.iter().map(|(n, c)| (n.clone(), c.words())).collect()
    }
}

/// Parses the words after `/lab`.
pub fn parse_command(args: &str) -> Result<LabCommand, String> {
    let words: Vec<&str> = args.split_whitespace().collect();
    match words.as_slice() {
        ["cut", name] => Ok(LabCommand::Cut { name: name.to_string(), direction: Direction::Both }),
        ["cut", name, dir] => Ok(LabCommand::Cut { name: name.to_string(), direction: Direction::parse(dir)? }),
        ["heal"] => Ok(LabCommand::Heal { name: None }),
        ["heal", name] => Ok(LabCommand::Heal { name: Some(name.to_string()) }),
        ["condition", name] => Ok(LabCommand::Condition { name: name.to_string(), condition: None }),
        ["condition", name, words @ ..] => {
            Ok(LabCommand::Condition { name: name.to_string(), condition: Some(Condition::parse(words)?) })
        }
        _ => Err(format!(
            "bad lab command {args:?}: expected 'cut NAME [in|out|both]', 'heal [NAME]' or 'condition NAME [WORDS]'"
        )),
    }
}

/// Parses a `--lab-condition` value: `NAME loss=10 rate=64000 …`.
pub fn parse_condition_spec(spec: &str) -> Result<LabCommand, String> {
    match parse_command(&format!("condition {spec}"))? {
        cmd @ LabCommand::Condition { condition: Some(_), .. } => Ok(cmd),
        _ => Err(format!(
            "bad --lab-condition {spec:?}: expected NAME and at least one of loss=, rate=, delay=, jitter="
        )),
    }
}

/// Parses a `--lab-cut` value: `NAME`, `NAME:in` or `NAME:out`.
pub fn parse_spec(spec: &str) -> Result<LabCommand, String> {
    let (name, direction) = match spec.rsplit_once(':') {
        Some((name, dir)) => (name, Direction::parse(dir)?),
        None => (spec, Direction::Both),
    };
    if name.is_empty() {
        return Err(format!("bad --lab-cut {spec:?}: empty name"));
    }
    Ok(LabCommand::Cut { name: name.to_string(), direction })
}

#[derive(Debug, Default)]
pub struct Hook {
    cuts: BTreeMap<String, Direction>,
    conditions: Arc<Conditions>,
}

impl Hook {
    /// The conditions in force, for the connections' writers.
    pub fn conditions(&self) -> Arc<Conditions> {
        self.conditions.clone()
    }

    pub fn condition_table(&self) -> BTreeMap<String, String> {
        self.conditions.table()
    }

    pub fn apply(&mut self, cmd: LabCommand) {
        match cmd {
            LabCommand::Condition { name, condition } => self.conditions.set(name, condition),
            LabCommand::Cut { name, direction } => {
                self.cuts.insert(name, direction);
            }
            LabCommand::Heal { name: Some(name) } => {
                self.cuts.remove(&name);
            }
            LabCommand::Heal { name: None } => self.cuts.clear(),
        }
    }

    /// How traffic with peers named `name` is cut, if it is.
    pub fn cut(&self, name: &str) -> Option<Direction> {
        self.cuts.get(name).copied()
    }

    pub fn table(&self) -> BTreeMap<String, &'static str> {
        self.cuts.iter().map(|(n, d)| (n.clone(), d.as_str())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commands_and_specs() {
        assert_eq!(parse_command("cut b").unwrap(), LabCommand::Cut { name: "b".into(), direction: Direction::Both });
        assert_eq!(
            parse_command(" cut b in ").unwrap(),
            LabCommand::Cut { name: "b".into(), direction: Direction::In }
        );
        assert_eq!(parse_command("heal").unwrap(), LabCommand::Heal { name: None });
        assert!(parse_command("cut").is_err());
        assert!(parse_command("cut b sideways").is_err());
        assert_eq!(parse_spec("p2:out").unwrap(), LabCommand::Cut { name: "p2".into(), direction: Direction::Out });
        assert!(parse_spec(":in").is_err());
        let slow = Condition { loss: 2.5, rate: Some(64_000), delay: Duration::from_millis(50), ..Default::default() };
        assert_eq!(
            parse_command("condition b loss=2.5 rate=64000 delay=50ms").unwrap(),
            LabCommand::Condition { name: "b".into(), condition: Some(slow) }
        );
        assert_eq!(slow.words(), "loss=2.5 rate=64000 delay=50ms");
        assert_eq!(parse_command("condition b").unwrap(), LabCommand::Condition { name: "b".into(), condition: None });
        for bad in ["condition b loss=100", "condition b rate=0", "condition b delay=5s", "condition b speed=1"] {
            assert!(parse_command(bad).is_err(), "{bad}");
        }
        assert!(parse_condition_spec("b").is_err(), "a flag sets a condition, it does not lift one");
    }

    #[test]
    fn conditions_are_shared_with_the_writers() {
        let mut h = Hook::default();
        let seen = h.conditions();
        h.apply(parse_command("condition b loss=10").unwrap());
        assert_eq!(seen.of("b").map(|c| c.loss), Some(10.0));
        assert_eq!(h.condition_table()["b"], "loss=10");
        h.apply(parse_command("condition b").unwrap());
        assert_eq!(seen.of("b"), None);
    }

    #[test]
    fn heal_undoes_cuts() {
        let mut h = Hook::default();
        h.apply(parse_command("cut a").unwrap());
        h.apply(parse_command("cut b out").unwrap());
        assert_eq!(h.cut("b"), Some(Direction::Out));
        h.apply(parse_command("heal a").unwrap());
        assert_eq!(h.cut("a"), None);
        h.apply(parse_command("heal").unwrap());
        assert!(h.table().is_empty());
    }
}
