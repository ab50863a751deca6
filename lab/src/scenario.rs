//! Scenario files: an experiment written as a list of steps (docs/scenarios.md).
//!
//! A file is TOML: a few settings, then `[[step]]` tables, each with exactly one verb (`start`,
//! `stop`, `kill`, `restart`, `partition`, `cut`, `heal`, `say`, `await`, `sleep`, `chaos`) and the
//! options of that verb. Parsing checks everything that can be checked before running: unknown
//! keys, a step with no verb or two, peers used before they are started, lines that cannot be
//! typed. Every error names the file and line.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// Longest line a peer accepts on stdin: the limit docs/protocol.md documents (the lab knows the
/// peer by its contract alone, not by its code).
const MAX_TEXT: usize = 8 * 1024;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
const DEFAULT_WITHIN: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[error("{file}:{line}: {message}")]
pub struct ScenarioError {
    pub file: String,
    pub line: usize,
    pub message: String,
}

#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    /// Overall limit for the run (before the backend's scaling).
    pub timeout: Duration,
    /// Extra flags for every peer.
    pub flags: Vec<String>,
    /// A private mesh: the lab makes a fresh key and gives it to every peer.
    pub keyed: bool,
    pub steps: Vec<Step>,
}

/// One step, with where it was written.
#[derive(Debug, Clone)]
pub struct Step {
    pub line: usize,
    pub note: Option<String>,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Start { peers: Vec<String>, via: Vec<String>, flags: Vec<String>, keep_state: bool },
    Stop(Vec<String>),
    Kill(Vec<String>),
    Restart(Vec<String>),
    Partition(Vec<Vec<String>>),
    Cut { a: String, b: String, one_way: bool },
    Heal(Option<(String, String)>),
    Say { peer: String, text: String, count: u32 },
    AwaitMesh { peers: Option<Vec<String>>, within: Duration },
    AwaitDelivery { within: Duration },
    Sleep(Duration),
    Chaos(ChaosSpec),
}

/// A seeded random nemesis (see crate::chaos).
#[derive(Debug, Clone, PartialEq)]
pub struct ChaosSpec {
    pub duration: Duration,
    /// Lines said per second, across all peers.
    pub rate: f64,
    /// Seed of the fault schedule; a run without one picks one and prints it.
    pub seed: Option<u64>,
    /// Mean time between faults.
    pub every: Duration,
    /// Faults allowed (all by default).
    pub faults: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum HealSpec {
    /// `heal = "all"`
    All(String),
    /// `heal = ["a", "b"]`
    Pair(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "lowercase")]
enum AwaitKind {
    Mesh,
    Delivery,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    start: Option<OneOrMany>,
    via: Option<OneOrMany>,
    flags: Option<Vec<String>>,
    keep_state: Option<bool>,
    stop: Option<OneOrMany>,
    kill: Option<OneOrMany>,
    restart: Option<OneOrMany>,
    partition: Option<Vec<Vec<String>>>,
    cut: Option<Vec<String>>,
    one_way: Option<bool>,
    heal: Option<HealSpec>,
    say: Option<String>,
    text: Option<String>,
    count: Option<u32>,
    #[serde(rename = "await")]
    wait: Option<AwaitKind>,
    peers: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    within: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    sleep: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    chaos: Option<Duration>,
    rate: Option<f64>,
    seed: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    every: Option<Duration>,
    faults: Option<Vec<String>>,
    note: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: Option<String>,
    description: Option<String>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    flags: Option<Vec<String>>,
    keyed: Option<bool>,
    step: Vec<Spanned<RawStep>>,
}

const VERBS: &str = "start, stop, kill, restart, partition, cut, heal, say, await, sleep or chaos";
pub const FAULTS: &[&str] = &["kill", "restart", "stop", "start", "partition", "cut", "one-way", "heal"];

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let file = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ScenarioError {
            file: file.clone(),
            line: 0,
            message: format!("cannot read: {e}"),
        })?;
        let default_name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        Scenario::parse(&file, &default_name, &text)
    }

    /// Parses scenario text; `file` names it in errors.
    pub fn parse(file: &str, default_name: &str, text: &str) -> Result<Scenario, ScenarioError> {
        let fail = |line: usize, message: String| ScenarioError { file: file.to_owned(), line, message };
        let raw: RawScenario = toml::from_str(text).map_err(|e| {
            let line = e.span().map_or(0, |s| line_of(text, s.start));
            fail(line, e.message().trim().to_string())
        })?;
        if raw.step.is_empty() {
            return Err(fail(1, "a scenario needs at least one [[step]]".into()));
        }
        let mut steps = Vec::new();
        for spanned in raw.step {
            let line = line_of(text, spanned.span().start);
            let raw = spanned.into_inner();
            let note = raw.note.clone();
            let action = raw.into_action().map_err(|m| fail(line, m))?;
            steps.push(Step { line, note, action });
        }
        check_names(&steps).map_err(|(line, m)| fail(line, m))?;
        Ok(Scenario {
            name: raw.name.unwrap_or_else(|| default_name.to_owned()),
            description: raw.description.unwrap_or_default(),
            timeout: raw.timeout.unwrap_or(DEFAULT_TIMEOUT),
            flags: raw.flags.unwrap_or_default(),
            keyed: raw.keyed.unwrap_or(false),
            steps,
        })
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|b| *b == b'\n').count() + 1
}

impl RawStep {
    fn into_action(self) -> Result<Action, String> {
        let verbs = [
            ("start", self.start.is_some()),
            ("stop", self.stop.is_some()),
            ("kill", self.kill.is_some()),
            ("restart", self.restart.is_some()),
            ("partition", self.partition.is_some()),
            ("cut", self.cut.is_some()),
            ("heal", self.heal.is_some()),
            ("say", self.say.is_some()),
            ("await", self.wait.is_some()),
            ("sleep", self.sleep.is_some()),
            ("chaos", self.chaos.is_some()),
        ];
        let given: Vec<&str> = verbs.iter().filter(|(_, on)| *on).map(|(v, _)| *v).collect();
        let verb = match given.as_slice() {
            [one] => *one,
            [] => return Err(format!("a step needs one verb: {VERBS}")),
            many => return Err(format!("a step has one verb, this one has {}", many.join(" and "))),
        };
        let allowed: &[&str] = match verb {
            "start" => &["via", "flags", "keep_state"],
            "cut" => &["one_way"],
            "say" => &["text", "count"],
            "await" => &["peers", "within"],
            "chaos" => &["rate", "seed", "every", "faults"],
            _ => &[],
        };
        let options = [
            ("via", self.via.is_some()),
            ("flags", self.flags.is_some()),
            ("keep_state", self.keep_state.is_some()),
            ("one_way", self.one_way.is_some()),
            ("text", self.text.is_some()),
            ("count", self.count.is_some()),
            ("peers", self.peers.is_some()),
            ("within", self.within.is_some()),
            ("rate", self.rate.is_some()),
            ("seed", self.seed.is_some()),
            ("every", self.every.is_some()),
            ("faults", self.faults.is_some()),
        ];
        if let Some((option, _)) = options.iter().find(|(o, on)| *on && !allowed.contains(o)) {
            return Err(format!("`{option}` does not apply to a {verb} step"));
        }
        let within = self.within.unwrap_or(DEFAULT_WITHIN);
        Ok(match verb {
            "start" => Action::Start {
                peers: names(self.start)?,
                via: self.via.map(OneOrMany::into_vec).unwrap_or_default(),
                flags: self.flags.unwrap_or_default(),
                keep_state: self.keep_state.unwrap_or(false),
            },
            "stop" => Action::Stop(names(self.stop)?),
            "kill" => Action::Kill(names(self.kill)?),
            "restart" => Action::Restart(names(self.restart)?),
            "partition" => {
                let groups = self.partition.expect("verb checked");
                if groups.len() < 2 || groups.iter().any(Vec::is_empty) {
                    return Err("a partition needs at least two non-empty groups".into());
                }
                Action::Partition(groups)
            }
            "cut" => match self.cut.expect("verb checked").as_slice() {
                [a, b] if a != b => Action::Cut { a: a.clone(), b: b.clone(), one_way: self.one_way.unwrap_or(false) },
                _ => return Err("cut takes two different peers: cut = [\"a\", \"b\"]".into()),
            },
            "heal" => match self.heal.expect("verb checked") {
                HealSpec::All(s) if s == "all" => Action::Heal(None),
                HealSpec::Pair(p) if p.len() == 2 => Action::Heal(Some((p[0].clone(), p[1].clone()))),
                _ => return Err("heal takes \"all\" or a pair: heal = [\"a\", \"b\"]".into()),
            },
            "say" => {
                let text = self.text.ok_or("a say step needs `text`")?;
                let count = self.count.unwrap_or(1);
                if count == 0 {
                    return Err("`count` must be at least 1".into());
                }
                // As typed: a leading `/` is doubled, and `count` lines get a ` #N` suffix.
                let escape = usize::from(text.starts_with('/'));
                let suffix = if count > 1 { format!(" #{count}").len() } else { 0 };
                let typed = text.len() + escape + suffix;
                if text.trim().is_empty() || typed > MAX_TEXT || text.contains(['\n', '\r']) {
                    return Err(format!(
                        "`text` must be one line, not blank, of at most {MAX_TEXT} bytes as typed (here {typed})"
                    ));
                }
                Action::Say { peer: self.say.expect("verb checked"), text, count }
            }
            "await" => match self.wait.expect("verb checked") {
                AwaitKind::Mesh => Action::AwaitMesh { peers: self.peers, within },
                AwaitKind::Delivery if self.peers.is_some() => {
                    return Err("`peers` does not apply to await = \"delivery\" (it checks every peer)".into());
                }
                AwaitKind::Delivery => Action::AwaitDelivery { within },
            },
            "sleep" => Action::Sleep(self.sleep.expect("verb checked")),
            "chaos" => {
                let faults = self.faults.unwrap_or_else(|| FAULTS.iter().map(|f| f.to_string()).collect());
                if let Some(bad) = faults.iter().find(|f| !FAULTS.contains(&f.as_str())) {
                    return Err(format!("unknown fault {bad:?}: expected some of {}", FAULTS.join(", ")));
                }
                let rate = self.rate.unwrap_or(5.0);
                if !(rate > 0.0 && rate <= 1000.0) {
                    return Err("`rate` must be between 0 and 1000 lines a second".into());
                }
                Action::Chaos(ChaosSpec {
                    duration: self.chaos.expect("verb checked"),
                    rate,
                    seed: self.seed,
                    every: self.every.unwrap_or(Duration::from_secs(2)),
                    faults,
                })
            }
            _ => unreachable!("every verb is listed"),
        })
    }
}

fn names(v: Option<OneOrMany>) -> Result<Vec<String>, String> {
    let v = v.expect("verb checked").into_vec();
    if v.is_empty() {
        return Err("name at least one peer".into());
    }
    for n in &v {
        let ok =
            !n.is_empty() && n.len() <= 64 && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return Err(format!("bad peer name {n:?}: use letters, digits, - and _"));
        }
    }
    Ok(v)
}

/// Checks, in order, that every peer is started before it is used, and not started twice.
fn check_names(steps: &[Step]) -> Result<(), (usize, String)> {
    let mut known: BTreeSet<&str> = BTreeSet::new();
    let mut running: BTreeSet<&str> = BTreeSet::new();
    let unknown = |line, n: &str| Err((line, format!("unknown peer {n:?}: no step starts it before this line")));
    for step in steps {
        let line = step.line;
        match &step.action {
            Action::Start { peers, via, .. } => {
                for v in via {
                    if !known.contains(v.as_str()) && !peers.contains(v) {
                        return unknown(line, v);
                    }
                    if peers.contains(v) {
                        return Err((line, format!("{v:?} cannot bootstrap from itself")));
                    }
                }
                for p in peers {
                    if !running.insert(p) {
                        return Err((line, format!("{p:?} is already running")));
                    }
                    known.insert(p);
                }
            }
            Action::Stop(ps) | Action::Kill(ps) => {
                for p in ps {
                    if !known.contains(p.as_str()) {
                        return unknown(line, p);
                    }
                    if !running.remove(p.as_str()) {
                        return Err((line, format!("{p:?} is not running here")));
                    }
                }
            }
            Action::Restart(ps) => {
                for p in ps {
                    if !known.contains(p.as_str()) {
                        return unknown(line, p);
                    }
                    running.insert(p);
                }
            }
            Action::Say { peer, .. } => {
                if !known.contains(peer.as_str()) {
                    return unknown(line, peer);
                }
                if !running.contains(peer.as_str()) {
                    return Err((line, format!("{peer:?} is not running here")));
                }
            }
            Action::Partition(groups) => {
                for p in groups.iter().flatten() {
                    if !known.contains(p.as_str()) {
                        return unknown(line, p);
                    }
                }
            }
            Action::Cut { a, b, .. } | Action::Heal(Some((a, b))) => {
                for p in [a, b] {
                    if !known.contains(p.as_str()) {
                        return unknown(line, p);
                    }
                }
            }
            Action::AwaitMesh { peers: Some(ps), .. } => {
                for p in ps {
                    if !known.contains(p.as_str()) {
                        return unknown(line, p);
                    }
                }
            }
            Action::Chaos(_) => {
                // The nemesis ends with every peer started.
                running.extend(known.iter().copied());
            }
            Action::Heal(None)
            | Action::AwaitMesh { peers: None, .. }
            | Action::AwaitDelivery { .. }
            | Action::Sleep(_) => {}
        }
    }
    Ok(())
}

impl Action {
    /// A short description for progress lines and reports.
    pub fn describe(&self) -> String {
        let list = |v: &[String]| v.join(", ");
        match self {
            Action::Start { peers, via, .. } if via.is_empty() => format!("start {}", list(peers)),
            Action::Start { peers, via, .. } => format!("start {} via {}", list(peers), list(via)),
            Action::Stop(p) => format!("stop {}", list(p)),
            Action::Kill(p) => format!("kill {}", list(p)),
            Action::Restart(p) => format!("restart {}", list(p)),
            Action::Partition(groups) => {
                let g: Vec<String> = groups.iter().map(|g| g.join(" ")).collect();
                format!("partition {}", g.join(" | "))
            }
            Action::Cut { a, b, one_way: true } => format!("cut {a} -> {b} (one way)"),
            Action::Cut { a, b, .. } => format!("cut {a} <-> {b}"),
            Action::Heal(None) => "heal all".into(),
            Action::Heal(Some((a, b))) => format!("heal {a} <-> {b}"),
            Action::Say { peer, text, count: 1 } => format!("say {peer}: {text}"),
            Action::Say { peer, text, count } => format!("say {peer}: {text} (x{count})"),
            Action::AwaitMesh { peers: None, within } => {
                format!("await mesh within {}", humantime::format_duration(*within))
            }
            Action::AwaitMesh { peers: Some(p), within } => {
                format!("await mesh of {} within {}", list(p), humantime::format_duration(*within))
            }
            Action::AwaitDelivery { within } => {
                format!("await delivery within {}", humantime::format_duration(*within))
            }
            Action::Sleep(d) => format!("sleep {}", humantime::format_duration(*d)),
            Action::Chaos(c) => format!("chaos for {} at {} lines/s", humantime::format_duration(c.duration), c.rate),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        Scenario::parse("t.toml", "t", text)
    }

    #[test]
    fn reads_every_verb() {
        let s = parse(
            r#"
            name = "all"
            flags = ["--history-lines", "100"]
            [[step]]
            start = "a"
            [[step]]
            start = ["b", "c"]
            via = "a"
            note = "b and c join through a"
            [[step]]
            await = "mesh"
            within = "2s"
            [[step]]
            say = "a"
            text = "hi"
            count = 3
            [[step]]
            partition = [["a"], ["b", "c"]]
            [[step]]
            cut = ["b", "c"]
            one_way = true
            [[step]]
            heal = ["b", "c"]
            [[step]]
            heal = "all"
            [[step]]
            await = "delivery"
            [[step]]
            kill = "a"
            [[step]]
            restart = "a"
            [[step]]
            stop = ["b"]
            [[step]]
            sleep = "10ms"
            [[step]]
            chaos = "1s"
            seed = 7
            "#,
        )
        .unwrap();
        assert_eq!(s.steps.len(), 14);
        assert_eq!(s.flags, vec!["--history-lines", "100"]);
        assert_eq!(s.steps[1].note.as_deref(), Some("b and c join through a"));
        assert_eq!(s.steps[1].line, 6, "the line of its [[step]] header");
        assert_eq!(s.steps[2].action, Action::AwaitMesh { peers: None, within: Duration::from_secs(2) });
        assert_eq!(s.steps[5].action, Action::Cut { a: "b".into(), b: "c".into(), one_way: true });
    }

    fn error(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(
            error("[[step]]\nstart = \"a\"\n[[step]]\njump = \"a\"\n"),
            "t.toml:4: unknown field `jump`, expected one of `start`, `via`, `flags`, `keep_state`, `stop`, `kill`, `restart`, `partition`, `cut`, `one_way`, `heal`, `say`, `text`, `count`, `await`, `peers`, `within`, `sleep`, `chaos`, `rate`, `seed`, `every`, `faults`, `note`"
        );
        assert_eq!(
            error("[[step]]\nstart = \"a\"\n\n[[step]]\nsay = \"b\"\ntext = \"x\"\n"),
            "t.toml:4: unknown peer \"b\": no step starts it before this line"
        );
        assert!(error("[[step]]\nstart = \"a\"\n[[step]\n").starts_with("t.toml:3: "));
        assert_eq!(
            error("[[step]]\nstart = \"a\"\nkill = \"a\"\n"),
            "t.toml:1: a step has one verb, this one has start and kill"
        );
        assert_eq!(error("[[step]]\nnote = \"x\"\n"), format!("t.toml:1: a step needs one verb: {VERBS}"));
        assert_eq!(
            error("[[step]]\nstart = \"a\"\nwithin = \"1s\"\n"),
            "t.toml:1: `within` does not apply to a start step"
        );
        assert_eq!(error("[[step]]\nstart = \"a\"\n[[step]]\nstart = \"a\"\n"), "t.toml:3: \"a\" is already running");
        assert_eq!(
            error("[[step]]\nstart = \"a\"\n[[step]]\nkill = \"a\"\n[[step]]\nsay = \"a\"\ntext = \"x\"\n"),
            "t.toml:5: \"a\" is not running here"
        );
        assert!(error("[[step]]\nawait = \"everything\"\n").contains("unknown variant `everything`"));
        assert!(error("[[step]]\nsleep = \"soon\"\n").starts_with("t.toml:2: "));
        assert_eq!(error("name = \"x\"\n"), "t.toml:1: missing field `step`");
    }

    #[test]
    fn say_text_is_checked_as_it_will_be_typed() {
        let say = |text: &str, count: usize| {
            format!("[[step]]\nstart = \"a\"\n[[step]]\nsay = \"a\"\ntext = \"{text}\"\ncount = {count}\n")
        };
        assert!(error(&say("   ", 1)).contains("not blank"));
        assert!(parse(&say(&"x".repeat(MAX_TEXT), 1)).is_ok());
        assert!(error(&say(&"x".repeat(MAX_TEXT), 2)).contains("(here 8195)"), "the ` #2` suffix counts");
        assert!(
            error(&say(&format!("/{}", "x".repeat(MAX_TEXT - 1)), 1)).contains("(here 8193)"),
            "so does the escape"
        );
    }
}
