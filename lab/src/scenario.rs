//! Scenario files: an experiment written as a list of steps (docs/scenarios.md).
//!
//! A file is TOML: a few settings, then `[[step]]` tables, each with exactly one verb (`start`,
//! `stop`, `kill`, `restart`, `pause`, `resume`, `partition`, `cut`, `heal`, `say`, `await`, `sleep`, `chaos`) and the
//! options of that verb. Parsing checks everything that can be checked before running: unknown
//! keys, a step with no verb or two, peers used before they are started, lines that cannot be
//! typed, and the limits below (so that no file can make the lab overflow a clock, allocate
//! without bound or write outside its report directory). Every error names the file and line.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use humantime::DurationError;

use crate::link::{self, Condition};
use serde::{Deserialize, Deserializer};
use toml::Spanned;

/// Longest line a peer accepts on stdin: the limit docs/protocol.md documents (the lab knows the
/// peer by its contract alone, not by its code).
const MAX_TEXT: usize = 8 * 1024;
/// Longest duration a scenario may write (`sleep`, `within`, `chaos`, `every`, `timeout`): far
/// beyond any experiment, yet short enough that scaled by a backend's factor and added to the
/// clock it cannot overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 60 * 60);
/// Most peer names one step may write (repeats included): each is work for the lab.
pub const MAX_PEERS_PER_STEP: usize = 1024;
/// Most distinct peers a scenario may start.
pub const MAX_PEERS: usize = 1024;
/// Most lines one `say` step types.
pub const MAX_SAY_COUNT: u32 = 100_000;
/// Longest peer or scenario name, in bytes.
const MAX_NAME: usize = 64;
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
    /// `for`: how long a cut, partition, condition or pause lasts before the lab undoes it by
    /// itself (until healed or resumed, without).
    pub hold: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Start {
        peers: Vec<String>,
        via: Vec<String>,
        flags: Vec<String>,
        keep_state: bool,
    },
    Stop(Vec<String>),
    Kill(Vec<String>),
    Restart(Vec<String>),
    /// Freezes peers (SIGSTOP, `docker pause`): their sockets stay open, nothing answers.
    Pause(Vec<String>),
    Resume(Vec<String>),
    Partition(Vec<Vec<String>>),
    Cut {
        a: String,
        b: String,
        one_way: bool,
    },
    Heal(Option<(String, String)>),
    /// A link condition on the link between two peers, or on every link of one.
    Condition {
        peers: Vec<String>,
        condition: Condition,
        one_way: bool,
    },
    Say {
        peer: String,
        text: String,
        count: u32,
    },
    AwaitMesh {
        peers: Option<Vec<String>>,
        within: Duration,
    },
    AwaitDelivery {
        within: Duration,
        /// A budget for the 99th percentile of direct showings' latency, over the lines said
        /// since the previous delivery await.
        p99: Option<Duration>,
    },
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
    /// Bounds of how long a partition, cut, condition or pause lasts before the nemesis undoes
    /// it; without, they last until a heal or resume fault or the step's end.
    pub hold: Option<(Duration, Duration)>,
}

/// Peers as a step names them: one, a list, or many numbered ones.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
    /// `{ count = 255, prefix = "n" }`: n001 to n255 (numbers as wide as the count).
    Numbered(Numbered),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Numbered {
    count: usize,
    prefix: String,
    /// The first number (default 1).
    #[serde(default = "one")]
    from: usize,
}

fn one() -> usize {
    1
}

impl OneOrMany {
    /// The names, or why they cannot be written out (too many, checked before any is made).
    fn into_vec(self) -> Result<Vec<String>, String> {
        Ok(match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
            OneOrMany::Numbered(Numbered { count, prefix, from }) => {
                if count == 0 || count > MAX_PEERS_PER_STEP {
                    return Err(format!("`count` must be 1 to {MAX_PEERS_PER_STEP} peers in one step, not {count}"));
                }
                let last = from.checked_add(count - 1).filter(|l| *l < 1_000_000).ok_or("numbers up to 999999")?;
                let width = last.to_string().len();
                (from..=last).map(|i| format!("{prefix}{i:0width$}")).collect()
            }
        })
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

/// A number, or text with a unit (`rate = "1mbit"`, `loss = "10%"`).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Quantity {
    Number(f64),
    Text(String),
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
    pause: Option<OneOrMany>,
    resume: Option<OneOrMany>,
    partition: Option<Vec<Vec<String>>>,
    cut: Option<Vec<String>>,
    condition: Option<OneOrMany>,
    loss: Option<Quantity>,
    #[serde(default, deserialize_with = "duration")]
    delay: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    jitter: Option<Duration>,
    #[serde(default, rename = "for", deserialize_with = "duration")]
    hold_for: Option<Duration>,
    one_way: Option<bool>,
    heal: Option<HealSpec>,
    say: Option<String>,
    text: Option<String>,
    count: Option<u32>,
    #[serde(rename = "await")]
    wait: Option<AwaitKind>,
    peers: Option<Vec<String>>,
    #[serde(default, deserialize_with = "duration")]
    within: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    p99: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    sleep: Option<Duration>,
    #[serde(default, deserialize_with = "duration")]
    chaos: Option<Duration>,
    rate: Option<Quantity>,
    seed: Option<u64>,
    #[serde(default, deserialize_with = "duration")]
    every: Option<Duration>,
    faults: Option<Vec<String>>,
    hold: Option<Vec<String>>,
    note: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: Option<Spanned<String>>,
    description: Option<String>,
    #[serde(default, deserialize_with = "duration")]
    timeout: Option<Duration>,
    flags: Option<Vec<String>>,
    keyed: Option<bool>,
    step: Vec<Spanned<RawStep>>,
}

const VERBS: &str =
    "start, stop, kill, restart, pause, resume, partition, cut, condition, heal, say, await, sleep or chaos";
pub const FAULTS: &[&str] = &[
    "kill",
    "stop",
    "start",
    "restart",
    "partition",
    "cut",
    "one-way",
    "heal",
    "pause",
    "resume",
    "loss",
    "rate",
    "delay",
];
/// The faults a chaos step draws when it names none: all but delays, which are asked for by
/// name (`faults`) since they need the kernel's netem, which not every kernel has (the default
/// nemesis runs everywhere).
pub const DEFAULT_FAULTS: &[&str] =
    &["kill", "restart", "stop", "start", "partition", "cut", "one-way", "heal", "pause", "resume", "loss", "rate"];

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
        let name = match raw.name {
            Some(name) => {
                let line = line_of(text, name.span().start);
                scenario_name(name.into_inner()).map_err(|m| fail(line, m))?
            }
            None => default_name.to_owned(),
        };
        let mut steps = Vec::new();
        for spanned in raw.step {
            let line = line_of(text, spanned.span().start);
            let raw = spanned.into_inner();
            let note = raw.note.clone();
            let hold = raw.hold_for;
            let action = raw.into_action().and_then(check_size).map_err(|m| fail(line, m))?;
            steps.push(Step { line, note, action, hold });
        }
        check_names(&steps).map_err(|(line, m)| fail(line, m))?;
        Ok(Scenario {
            name,
            description: raw.description.unwrap_or_default(),
            timeout: raw.timeout.unwrap_or(DEFAULT_TIMEOUT),
            flags: raw.flags.unwrap_or_default(),
            keyed: raw.keyed.unwrap_or(false),
            steps,
        })
    }
}

impl Scenario {
    /// Whether a step delays packets (a condition with delay or jitter, or a nemesis that may).
    pub fn needs_delay(&self) -> bool {
        self.steps.iter().any(|s| match &s.action {
            Action::Condition { condition, .. } => condition.delays(),
            Action::Chaos(c) => c.faults.iter().any(|f| f == "delay"),
            _ => false,
        })
    }
}

/// 1-based line of a byte offset.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].bytes().filter(|b| *b == b'\n').count() + 1
}

/// Reads a duration field (`250ms`, `1h 30m`), at most [`MAX_DURATION`].
fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(d)?;
    parse_duration(&text).map(Some).map_err(serde::de::Error::custom)
}

/// Parses a duration term by term, adding the terms with checked arithmetic: humantime adds
/// them with `Duration::new`, which panics when the sum reaches u64::MAX seconds with a carry
/// (`18446744073709551615s 1000ms`).
fn parse_duration(text: &str) -> Result<Duration, String> {
    let limit = humantime::format_duration(MAX_DURATION);
    let too_long = || format!("duration {text:?} is over the limit of {limit}");
    let mut sum = Duration::ZERO;
    for (start, term) in terms(text) {
        let d = humantime::parse_duration(term).map_err(|e| match e {
            // Without a fraction, only a number too large for humantime overflows.
            DurationError::NumberOverflow if !term.contains('.') => too_long(),
            e => format!("bad duration {text:?}: {}", shifted(e, start)),
        })?;
        sum = sum.checked_add(d).filter(|s| *s <= MAX_DURATION).ok_or_else(too_long)?;
    }
    Ok(sum)
}

/// Splits a duration into its terms (`1h 30m` into `1h ` and `30m`) with their offsets: as
/// humantime reads it, a term ends where a digit follows its unit. There is always one.
fn terms(text: &str) -> Vec<(usize, &str)> {
    let mut starts = vec![0];
    let mut after_unit = false;
    for (i, c) in text.char_indices() {
        if c.is_ascii_digit() {
            if after_unit {
                starts.push(i);
            }
            after_unit = false;
        } else if !c.is_whitespace() && c != '.' {
            after_unit = true;
        }
    }
    starts.push(text.len());
    starts.windows(2).map(|w| (w[0], &text[w[0]..w[1]])).collect()
}

/// `e` with its offsets counted from the whole duration instead of from its term at `start`.
fn shifted(e: DurationError, start: usize) -> DurationError {
    match e {
        DurationError::InvalidCharacter(at) => DurationError::InvalidCharacter(start + at),
        DurationError::NumberExpected(at) => DurationError::NumberExpected(start + at),
        DurationError::UnknownUnit { start: from, end, unit, value } => {
            DurationError::UnknownUnit { start: start + from, end: start + end, unit, value }
        }
        e => e,
    }
}

/// Whether `name` is 1 to [`MAX_NAME`] bytes of ASCII letters, digits, `-`, `_` and `extra`.
fn is_plain(name: &str, extra: &[u8]) -> bool {
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || extra.contains(&b);
    !name.is_empty() && name.len() <= MAX_NAME && name.bytes().all(allowed)
}

/// A scenario's `name` names its report directory when several scenarios run, so it must be
/// one plain path component: never `..`, never a `/`.
fn scenario_name(name: String) -> Result<String, String> {
    if is_plain(&name, b".") && name != "." && name != ".." {
        return Ok(name);
    }
    Err(format!("bad scenario name {name:?}: use at most {MAX_NAME} letters, digits, -, _ and . (not . or .. alone)"))
}

/// Checks a step against [`MAX_PEERS_PER_STEP`]; every step goes through here, whatever form
/// wrote its peers.
fn check_size(action: Action) -> Result<Action, String> {
    let named = action.peer_count();
    if named > MAX_PEERS_PER_STEP {
        return Err(format!("a step names at most {MAX_PEERS_PER_STEP} peers, this one {named}"));
    }
    Ok(action)
}

impl RawStep {
    fn into_action(self) -> Result<Action, String> {
        let verbs = [
            ("start", self.start.is_some()),
            ("stop", self.stop.is_some()),
            ("kill", self.kill.is_some()),
            ("restart", self.restart.is_some()),
            ("pause", self.pause.is_some()),
            ("resume", self.resume.is_some()),
            ("partition", self.partition.is_some()),
            ("cut", self.cut.is_some()),
            ("condition", self.condition.is_some()),
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
            "cut" => &["one_way", "for"],
            "partition" | "pause" => &["for"],
            "condition" => &["loss", "rate", "delay", "jitter", "one_way", "for"],
            "say" => &["text", "count"],
            "await" => &["peers", "within", "p99"],
            "chaos" => &["rate", "seed", "every", "faults", "hold"],
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
            ("p99", self.p99.is_some()),
            ("loss", self.loss.is_some()),
            ("delay", self.delay.is_some()),
            ("jitter", self.jitter.is_some()),
            ("for", self.hold_for.is_some()),
            ("hold", self.hold.is_some()),
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
                via: self.via.map(OneOrMany::into_vec).transpose()?.unwrap_or_default(),
                flags: self.flags.unwrap_or_default(),
                keep_state: self.keep_state.unwrap_or(false),
            },
            "stop" => Action::Stop(names(self.stop)?),
            "kill" => Action::Kill(names(self.kill)?),
            "restart" => Action::Restart(names(self.restart)?),
            "pause" => Action::Pause(names(self.pause)?),
            "resume" => Action::Resume(names(self.resume)?),
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
            "condition" => {
                let peers = names(self.condition)?;
                if peers.len() > 2 || peers.len() == 2 && peers[0] == peers[1] {
                    return Err(
                        "a condition is on one peer (all its links) or on the link between two different peers".into(),
                    );
                }
                let condition = Condition {
                    loss: self.loss.map(|q| quantity(q, link::parse_loss)).transpose()?,
                    rate: self.rate.map(|q| quantity(q, link::parse_rate)).transpose()?,
                    delay: self.delay,
                    jitter: self.jitter,
                };
                condition.check()?;
                Action::Condition { peers, condition, one_way: self.one_way.unwrap_or(false) }
            }
            "heal" => match self.heal.expect("verb checked") {
                HealSpec::All(s) if s == "all" => Action::Heal(None),
                HealSpec::Pair(p) if p.len() == 2 => Action::Heal(Some((p[0].clone(), p[1].clone()))),
                _ => return Err("heal takes \"all\" or a pair: heal = [\"a\", \"b\"]".into()),
            },
            "say" => {
                let text = self.text.ok_or("a say step needs `text`")?;
                let count = self.count.unwrap_or(1);
                if !(1..=MAX_SAY_COUNT).contains(&count) {
                    return Err(format!("`count` must be between 1 and {MAX_SAY_COUNT}"));
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
                AwaitKind::Mesh if self.p99.is_some() => {
                    return Err("`p99` applies to await = \"delivery\" (the latency of lines)".into());
                }
                AwaitKind::Mesh => Action::AwaitMesh { peers: self.peers, within },
                AwaitKind::Delivery if self.peers.is_some() => {
                    return Err("`peers` does not apply to await = \"delivery\" (it checks every peer)".into());
                }
                AwaitKind::Delivery => Action::AwaitDelivery { within, p99: self.p99 },
            },
            "sleep" => Action::Sleep(self.sleep.expect("verb checked")),
            "chaos" => {
                let faults = self.faults.unwrap_or_else(|| DEFAULT_FAULTS.iter().map(|f| f.to_string()).collect());
                if let Some(bad) = faults.iter().find(|f| !FAULTS.contains(&f.as_str())) {
                    return Err(format!("unknown fault {bad:?}: expected some of {}", FAULTS.join(", ")));
                }
                let rate = match self.rate {
                    None => 5.0,
                    Some(Quantity::Number(n)) => n,
                    Some(Quantity::Text(_)) => return Err("a chaos step's `rate` is lines a second, a number".into()),
                };
                if !(rate > 0.0 && rate <= 1000.0) {
                    return Err("`rate` must be between 0 and 1000 lines a second".into());
                }
                let hold = self.hold.map(|bounds| hold_bounds(&bounds)).transpose()?;
                Action::Chaos(ChaosSpec {
                    duration: self.chaos.expect("verb checked"),
                    rate,
                    seed: self.seed,
                    every: self.every.unwrap_or(Duration::from_secs(2)),
                    faults,
                    hold,
                })
            }
            _ => unreachable!("every verb is listed"),
        })
    }
}

/// A quantity as a number or as text with its unit, read by `parse`.
fn quantity<T: FromF64>(q: Quantity, parse: fn(&str) -> Result<T, String>) -> Result<T, String> {
    match q {
        Quantity::Number(n) => T::from_f64(n),
        Quantity::Text(t) => parse(&t),
    }
}

/// How a bare number in a scenario becomes a quantity.
trait FromF64: Sized {
    fn from_f64(n: f64) -> Result<Self, String>;
}

impl FromF64 for f64 {
    fn from_f64(n: f64) -> Result<f64, String> {
        Ok(n)
    }
}

impl FromF64 for u64 {
    fn from_f64(n: f64) -> Result<u64, String> {
        if n.is_finite() && n >= 1.0 && n <= link::MAX_RATE as f64 {
            Ok(n.round() as u64)
        } else {
            Err(format!("bad rate {n}: bits per second, 1 to {}", link::MAX_RATE))
        }
    }
}

/// `hold = ["1s", "5s"]`: the shortest and longest hold, the first not above the second.
fn hold_bounds(bounds: &[String]) -> Result<(Duration, Duration), String> {
    let [lo, hi] = bounds else {
        return Err("`hold` takes two durations, the shortest and the longest: hold = [\"1s\", \"5s\"]".into());
    };
    let (lo, hi) = (parse_duration(lo)?, parse_duration(hi)?);
    if lo > hi || hi.is_zero() {
        return Err("`hold` gives the shortest hold first, and the longest above zero".into());
    }
    Ok((lo, hi))
}

fn names(v: Option<OneOrMany>) -> Result<Vec<String>, String> {
    let v = v.expect("verb checked").into_vec()?;
    if v.is_empty() {
        return Err("name at least one peer".into());
    }
    if let Some(n) = v.iter().find(|n| !is_plain(n, b"")) {
        return Err(format!("bad peer name {n:?}: use at most {MAX_NAME} letters, digits, - and _"));
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
                    if known.insert(p) && known.len() > MAX_PEERS {
                        return Err((line, format!("a scenario starts at most {MAX_PEERS} peers, {p:?} is one more")));
                    }
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
            Action::Pause(ps) | Action::Resume(ps) => {
                for p in ps {
                    if !known.contains(p.as_str()) {
                        return unknown(line, p);
                    }
                    if !running.contains(p.as_str()) {
                        return Err((line, format!("{p:?} is not running here")));
                    }
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
            Action::Condition { peers, .. } => {
                for p in peers {
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
    /// How many peer names the step writes, repeats included.
    fn peer_count(&self) -> usize {
        match self {
            Action::Start { peers, via, .. } => peers.len() + via.len(),
            Action::Stop(peers)
            | Action::Kill(peers)
            | Action::Restart(peers)
            | Action::Pause(peers)
            | Action::Resume(peers) => peers.len(),
            Action::Partition(groups) => groups.iter().map(Vec::len).sum(),
            Action::AwaitMesh { peers, .. } => peers.as_ref().map_or(0, Vec::len),
            Action::Cut { .. } | Action::Heal(Some(_)) => 2,
            Action::Condition { peers, .. } => peers.len(),
            Action::Say { .. } => 1,
            Action::Heal(None) | Action::AwaitDelivery { .. } | Action::Sleep(_) | Action::Chaos(_) => 0,
        }
    }

    /// A short description for progress lines and reports.
    pub fn describe(&self) -> String {
        let list = |v: &[String]| v.join(", ");
        match self {
            Action::Start { peers, via, .. } if via.is_empty() => format!("start {}", list(peers)),
            Action::Start { peers, via, .. } => format!("start {} via {}", list(peers), list(via)),
            Action::Stop(p) => format!("stop {}", list(p)),
            Action::Kill(p) => format!("kill {}", list(p)),
            Action::Restart(p) => format!("restart {}", list(p)),
            Action::Pause(p) => format!("pause {}", list(p)),
            Action::Resume(p) => format!("resume {}", list(p)),
            Action::Partition(groups) => {
                let g: Vec<String> = groups.iter().map(|g| g.join(" ")).collect();
                format!("partition {}", g.join(" | "))
            }
            Action::Cut { a, b, one_way: true } => format!("cut {a} -> {b} (one way)"),
            Action::Cut { a, b, .. } => format!("cut {a} <-> {b}"),
            Action::Heal(None) => "heal all".into(),
            Action::Heal(Some((a, b))) => format!("heal {a} <-> {b}"),
            Action::Condition { peers, condition, one_way } => {
                let arrow = if *one_way { "->" } else { "<->" };
                match peers.as_slice() {
                    [a, b] => format!("condition {a} {arrow} {b}: {condition}"),
                    _ => format!("condition {} {arrow} all: {condition}", list(peers)),
                }
            }
            Action::Say { peer, text, count: 1 } => format!("say {peer}: {text}"),
            Action::Say { peer, text, count } => format!("say {peer}: {text} (x{count})"),
            Action::AwaitMesh { peers: None, within } => {
                format!("await mesh within {}", humantime::format_duration(*within))
            }
            Action::AwaitMesh { peers: Some(p), within } => {
                format!("await mesh of {} within {}", list(p), humantime::format_duration(*within))
            }
            Action::AwaitDelivery { within, p99: None } => {
                format!("await delivery within {}", humantime::format_duration(*within))
            }
            Action::AwaitDelivery { within, p99: Some(p99) } => format!(
                "await delivery within {}, p99 at most {}",
                humantime::format_duration(*within),
                humantime::format_duration(*p99)
            ),
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
    fn many_peers_start_in_one_line() {
        let s = parse("[[step]]\nstart = \"seed\"\n[[step]]\nstart = { count = 255, prefix = \"n\" }\nvia = \"seed\"\n[[step]]\nkill = { count = 2, prefix = \"n\", from = 254 }\n").unwrap();
        let Action::Start { peers, .. } = &s.steps[1].action else { panic!() };
        assert_eq!((peers.len(), peers[0].as_str(), peers[254].as_str()), (255, "n001", "n255"));
        assert_eq!(s.steps[2].action, Action::Kill(vec!["n254".into(), "n255".into()]));
        let nine = parse("[[step]]\nstart = { count = 9, prefix = \"p\" }\n").unwrap();
        let Action::Start { peers, .. } = &nine.steps[0].action else { panic!() };
        assert_eq!(peers.first().map(String::as_str), Some("p1"), "numbers are as wide as the count");
        assert!(error("[[step]]\nstart = { count = 2000, prefix = \"n\" }\n").contains("1 to 1024 peers in one step"));
        assert!(error("[[step]]\nstart = { count = 0, prefix = \"n\" }\n").starts_with("t.toml:1: "));
        assert!(error("[[step]]\nstart = { count = 2, prefix = \"bad name\" }\n").contains("bad peer name"));
    }

    #[test]
    fn errors_name_the_line() {
        assert_eq!(
            error("[[step]]\nstart = \"a\"\n[[step]]\njump = \"a\"\n"),
            "t.toml:4: unknown field `jump`, expected one of `start`, `via`, `flags`, `keep_state`, `stop`, `kill`, `restart`, `pause`, `resume`, `partition`, `cut`, `condition`, `loss`, `delay`, `jitter`, `for`, `one_way`, `heal`, `say`, `text`, `count`, `await`, `peers`, `within`, `p99`, `sleep`, `chaos`, `rate`, `seed`, `every`, `faults`, `hold`, `note`"
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
    fn conditions_holds_and_budgets_read_as_written() {
        let s = parse(
            "[[step]]\nstart = [\"a\", \"b\"]\n[[step]]\ncondition = [\"a\", \"b\"]\nloss = \"10%\"\nrate = \"1mbit\"\nfor = \"5s\"\n\
             [[step]]\ncondition = \"a\"\ndelay = \"50ms\"\njitter = \"10ms\"\none_way = true\n[[step]]\ncondition = [\"a\", \"b\"]\nloss = 2.5\nrate = 64000\n\
             [[step]]\nawait = \"delivery\"\np99 = \"300ms\"\n[[step]]\nchaos = \"10s\"\nhold = [\"1s\", \"5s\"]\nfaults = [\"loss\", \"delay\"]\n",
        )
        .unwrap();
        let ms = Duration::from_millis;
        let lossy = Condition { loss: Some(10.0), rate: Some(1_000_000), ..Default::default() };
        assert_eq!(
            s.steps[1].action,
            Action::Condition { peers: vec!["a".into(), "b".into()], condition: lossy, one_way: false }
        );
        assert_eq!(s.steps[1].hold, Some(Duration::from_secs(5)));
        let late = Condition { delay: Some(ms(50)), jitter: Some(ms(10)), ..Default::default() };
        assert_eq!(s.steps[2].action, Action::Condition { peers: vec!["a".into()], condition: late, one_way: true });
        let Action::Condition { condition, .. } = &s.steps[3].action else { panic!() };
        assert_eq!((condition.loss, condition.rate), (Some(2.5), Some(64_000)));
        assert_eq!(s.steps[4].action, Action::AwaitDelivery { within: DEFAULT_WITHIN, p99: Some(ms(300)) });
        let Action::Chaos(chaos) = &s.steps[5].action else { panic!() };
        assert_eq!(chaos.hold, Some((Duration::from_secs(1), Duration::from_secs(5))));
        assert!(s.needs_delay());

        let with = |step: &str| error(&format!("[[step]]\nstart = [\"a\", \"b\"]\n[[step]]\n{step}"));
        assert!(with("condition = [\"a\", \"b\"]\n").contains("needs `loss`, `rate`, `delay` or `jitter`"));
        assert!(with("condition = [\"a\", \"b\"]\nloss = \"100%\"\n").contains("below 100%"));
        assert!(with("condition = [\"a\", \"b\"]\nrate = \"1mbps\"\n").contains("bad rate"));
        assert!(with("condition = [\"a\", \"b\"]\njitter = \"5ms\"\n").contains("varies a `delay`"));
        assert!(with("condition = [\"a\", \"a\"]\nloss = 5\n").contains("two different peers"));
        assert!(with("condition = [\"a\", \"zed\"]\nloss = 5\n").contains("unknown peer \"zed\""));
        assert!(with("kill = \"a\"\nfor = \"1s\"\n").contains("`for` does not apply to a kill step"));
        assert!(with("chaos = \"1s\"\nhold = [\"5s\", \"1s\"]\n").contains("shortest hold first"));
        assert!(with("chaos = \"1s\"\nrate = \"1mbit\"\n").contains("lines a second"));
        assert!(with("await = \"mesh\"\np99 = \"1s\"\n").contains("`p99` applies to await = \"delivery\""));
        assert!(
            !parse("[[step]]\nstart = \"a\"\n[[step]]\nchaos = \"1s\"\n").unwrap().needs_delay(),
            "the default nemesis never delays"
        );
    }

    /// The errors a scenario's author reads, as they read them.
    #[test]
    fn scenario_errors_read_well() {
        let cases = [
            "[[step]]\nstart = \"a\"\n[[step]]\njump = \"a\"\n",
            "[[step]]\nstart = \"a\"\nkill = \"a\"\n",
            "[[step]]\nstart = \"a\"\n[[step]]\nsay = \"b\"\ntext = \"x\"\n",
            "[[step]]\nstart = [\"a\", \"b\"]\n[[step]]\ncondition = [\"a\", \"b\"]\nloss = \"120%\"\n",
            "[[step]]\nstart = [\"a\", \"b\"]\n[[step]]\ncondition = [\"a\", \"b\"]\nrate = \"fast\"\n",
            "[[step]]\nstart = \"a\"\n[[step]]\nchaos = \"10s\"\nfaults = [\"meteor\"]\n",
            "[[step]]\nstart = \"a\"\n[[step]]\nchaos = \"10s\"\nhold = [\"1s\"]\n",
            "[[step]]\nstart = \"a\"\n[[step]]\nawait = \"mesh\"\np99 = \"1s\"\n",
            "[[step]]\nsleep = \"2d\"\n",
            "[[step]]\nstart = { count = 2000, prefix = \"n\" }\n",
        ];
        let errors: Vec<String> = cases.iter().map(|c| error(c)).collect();
        insta::assert_snapshot!(errors.join("\n"));
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

    #[test]
    fn durations_are_at_most_a_day_wherever_they_are_written() {
        let cases = [
            ("timeout = \"2d\"\n[[step]]\nsleep = \"1s\"\n", 1, "2d"),
            ("[[step]]\nsleep = \"300000000000y\"\n", 2, "300000000000y"),
            ("[[step]]\nstart = \"a\"\n[[step]]\nawait = \"mesh\"\nwithin = \"25h\"\n", 5, "25h"),
            ("[[step]]\nstart = \"a\"\n[[step]]\nchaos = \"100y\"\n", 4, "100y"),
            ("[[step]]\nstart = \"a\"\n[[step]]\nchaos = \"1s\"\nevery = \"1d 1ns\"\n", 5, "1d 1ns"),
            // humantime alone panics on this one: its terms add up to u64::MAX seconds and a carry.
            ("[[step]]\nsleep = \"18446744073709551615s 1000ms\"\n", 2, "18446744073709551615s 1000ms"),
            ("[[step]]\nsleep = \"99999999999999999999s\"\n", 2, "99999999999999999999s"),
        ];
        for (text, line, written) in cases {
            assert_eq!(error(text), format!("t.toml:{line}: duration {written:?} is over the limit of 1day"));
        }
        assert_eq!(parse("[[step]]\nsleep = \"23h 59m 60s\"\n").unwrap().steps[0].action, Action::Sleep(MAX_DURATION));
    }

    #[test]
    fn durations_read_as_humantime_reads_them() {
        assert_eq!(parse_duration("1.5h30m"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration(" 1 2s 500 ms "), Ok(Duration::from_millis(12_500)));
        assert_eq!(parse_duration("1h -3m"), Err("bad duration \"1h -3m\": expected number at 3".into()));
        assert_eq!(parse_duration("2s 1h."), Err("bad duration \"2s 1h.\": invalid character at 5".into()));
        assert_eq!(parse_duration(""), Err("bad duration \"\": value was empty".into()));
        assert!(parse_duration("1m 3x").unwrap_err().contains("unknown time unit \"x\""));
    }

    #[test]
    fn the_longest_duration_scaled_by_any_backend_still_fits_the_clock() {
        let largest = crate::backend::docker::TIME_SCALE.max(crate::backend::swarm::TIME_SCALE);
        let scaled = MAX_DURATION.mul_f64(largest);
        assert!(std::time::Instant::now().checked_add(scaled).is_some());
    }

    fn list(prefix: &str, n: usize) -> String {
        let names: Vec<String> = (1..=n).map(|i| format!("\"{prefix}{i}\"")).collect();
        format!("[{}]", names.join(", "))
    }

    #[test]
    fn a_step_names_at_most_so_many_peers() {
        let start = |n| format!("[[step]]\nstart = {}\n", list("p", n));
        assert!(parse(&start(MAX_PEERS_PER_STEP)).is_ok());
        assert_eq!(error(&start(MAX_PEERS_PER_STEP + 1)), "t.toml:1: a step names at most 1024 peers, this one 1025");
        let repeats = format!("[[step]]\nstart = \"a\"\n[[step]]\nrestart = [{}]\n", vec!["\"a\""; 1025].join(", "));
        assert_eq!(error(&repeats), "t.toml:3: a step names at most 1024 peers, this one 1025", "repeats count");
    }

    #[test]
    fn a_scenario_starts_at_most_so_many_peers() {
        let text = format!(
            "[[step]]\nstart = {}\n[[step]]\nstart = {}\nvia = \"p1\"\n",
            list("p", MAX_PEERS - 1),
            list("q", 2)
        );
        assert_eq!(error(&text), "t.toml:3: a scenario starts at most 1024 peers, \"q2\" is one more");
        let restarted =
            format!("[[step]]\nstart = {}\n[[step]]\nstop = \"p1\"\n[[step]]\nstart = \"p1\"\n", list("p", MAX_PEERS));
        assert!(parse(&restarted).is_ok(), "the same peer started again is not one more");
    }

    #[test]
    fn a_say_step_types_at_most_so_many_lines() {
        let say =
            |count: u32| format!("[[step]]\nstart = \"a\"\n[[step]]\nsay = \"a\"\ntext = \"x\"\ncount = {count}\n");
        assert!(parse(&say(MAX_SAY_COUNT)).is_ok());
        for count in [0, MAX_SAY_COUNT + 1] {
            assert_eq!(error(&say(count)), "t.toml:3: `count` must be between 1 and 100000");
        }
    }

    #[test]
    fn a_scenario_name_is_one_plain_path_component() {
        let named = |name: &str| format!("description = \"d\"\nname = \"{name}\"\n[[step]]\nsleep = \"1ms\"\n");
        assert_eq!(parse(&named("v1.2_x-y")).unwrap().name, "v1.2_x-y");
        for bad in ["../../x", "..", ".", "", "a/b", "a b", &"x".repeat(65)] {
            assert_eq!(
                error(&named(bad)),
                format!(
                    "t.toml:2: bad scenario name {bad:?}: use at most 64 letters, digits, -, _ and . (not . or .. alone)"
                )
            );
        }
        assert_eq!(parse("[[step]]\nsleep = \"1ms\"\n").unwrap().name, "t", "the default: the file's name");
    }
}
