//! The lab's fault-injection hook: lab use only, off unless the peer runs with `--lab`.
//!
//! The lab partitions peers on the process backend by telling each peer, on stdin, to drop all
//! traffic to and/or from peers of a given name and to refuse their connections. Nothing is
//! closed by the hook itself: heartbeats time out as after a real cut. Cuts are by name, not id,
//! so a cut survives the other peer's restart (a restarted peer has a new id).
//!
//! Commands: `/lab cut NAME [in|out|both]`, `/lab heal NAME`, `/lab heal` (everything).

use std::collections::BTreeMap;

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabCommand {
    Cut {
        name: String,
        direction: Direction,
    },
    /// Heal one name, or every cut when None.
    Heal {
        name: Option<String>,
    },
}

/// Parses the words after `/lab`.
pub fn parse_command(args: &str) -> Result<LabCommand, String> {
    let words: Vec<&str> = args.split_whitespace().collect();
    match words.as_slice() {
        ["cut", name] => Ok(LabCommand::Cut { name: name.to_string(), direction: Direction::Both }),
        ["cut", name, dir] => Ok(LabCommand::Cut { name: name.to_string(), direction: Direction::parse(dir)? }),
        ["heal"] => Ok(LabCommand::Heal { name: None }),
        ["heal", name] => Ok(LabCommand::Heal { name: Some(name.to_string()) }),
        _ => Err(format!("bad lab command {args:?}: expected 'cut NAME [in|out|both]' or 'heal [NAME]'")),
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
}

impl Hook {
    pub fn apply(&mut self, cmd: LabCommand) {
        match cmd {
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
