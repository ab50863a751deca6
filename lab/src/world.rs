//! The lab's model of an experiment, built only from what the peers print.
//!
//! Every observation (an event line, a process exit) updates the world: who runs, who is
//! connected to whom (from `peer_up`/`peer_down`), which lines were said (`sent`) and who showed
//! them (`message`). Checks are pure questions about this model: is the mesh what the current
//! cuts allow, has every owed line been shown exactly once and in order. A line is owed to a
//! receiver when it knew the sender before the line was said (its first `peer_up` for the
//! sender carried a lower `seq`) and some peer holding the line is reachable from it.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use crate::event::PeerEvent;

/// What one peer process printed or did, as the lab saw it.
#[derive(Debug, Clone)]
pub struct Observed {
    pub peer: String,
    pub instance: u32,
    pub at: Instant,
    pub what: Observation,
}

#[derive(Debug, Clone)]
pub enum Observation {
    Event(PeerEvent),
    /// A stdout line that is not a valid event: a breach of the event contract.
    Breach(String),
    Stderr(String),
    Exited(String),
}

impl Observation {
    /// What a line on a peer's stdout means: an event, or a breach of the event contract.
    pub fn from_stdout(line: &str) -> Observation {
        match PeerEvent::parse(line) {
            Ok(e) => Observation::Event(e),
            Err(breach) => Observation::Breach(breach),
        }
    }
}

/// Directed cuts between peer names: (from, to) means traffic from → to is dropped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cuts {
    directed: BTreeSet<(String, String)>,
}

impl Cuts {
    pub fn cut(&mut self, from: &str, to: &str) {
        self.directed.insert((from.to_owned(), to.to_owned()));
    }

    pub fn cut_both(&mut self, a: &str, b: &str) {
        self.cut(a, b);
        self.cut(b, a);
    }

    pub fn heal_pair(&mut self, a: &str, b: &str) {
        self.directed.remove(&(a.to_owned(), b.to_owned()));
        self.directed.remove(&(b.to_owned(), a.to_owned()));
    }

    pub fn heal_all(&mut self) {
        self.directed.clear();
    }

    pub fn heal_directed(&mut self, from: &str, to: &str) {
        self.directed.remove(&(from.to_owned(), to.to_owned()));
    }

    /// The pair cannot keep a connection (TCP needs both directions).
    pub fn severed(&self, a: &str, b: &str) -> bool {
        self.directed.contains(&(a.to_owned(), b.to_owned())) || self.directed.contains(&(b.to_owned(), a.to_owned()))
    }

    /// How `peer` must treat `other`: (drop what it receives from other, drop what it sends).
    pub fn view(&self, peer: &str, other: &str) -> (bool, bool) {
        let inbound = self.directed.contains(&(other.to_owned(), peer.to_owned()));
        let outbound = self.directed.contains(&(peer.to_owned(), other.to_owned()));
        (inbound, outbound)
    }

    /// Every name `peer` has a cut with.
    pub fn involving(&self, peer: &str) -> BTreeSet<String> {
        self.directed
            .iter()
            .filter_map(|(a, b)| {
                if a == peer {
                    Some(b.clone())
                } else if b == peer {
                    Some(a.clone())
                } else {
                    None
                }
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.directed.is_empty()
    }

    pub fn pairs(&self) -> impl Iterator<Item = &(String, String)> {
        self.directed.iter()
    }

    pub fn from_pairs(pairs: impl IntoIterator<Item = (String, String)>) -> Cuts {
        Cuts { directed: pairs.into_iter().collect() }
    }
}

/// The lab's view of one named peer (its current process).
#[derive(Debug, Clone, Default)]
pub struct PeerState {
    pub instance: u32,
    pub id: Option<String>,
    /// The address the peer last listened on, as it printed it (kept across restarts).
    pub listen: Option<String>,
    /// The current process has printed its listening event.
    pub listening: bool,
    /// When the lab read that event.
    pub listening_at: Option<Instant>,
    pub running: bool,
    /// Frozen by the lab (`pause`): running, but neither a member the mesh should include nor
    /// a receiver owed lines until it resumes.
    pub paused: bool,
    /// Lines the current process accepted from stdin (`sent` events).
    pub sent: u64,
    /// Names in the peer's last answer to `/peers`, its last answer to `/stats`, and how many
    /// answers it gave to either.
    pub listed: Vec<String>,
    pub stats: Option<crate::event::Stats>,
    pub answers: u64,
    /// The lab hook's cut table, as the peer last reported it.
    pub hook: BTreeMap<String, String>,
    /// The lab hook's condition table, as the peer last reported it.
    pub hook_conditions: BTreeMap<String, String>,
    /// Ids of its neighbours.
    pub neighbours: BTreeSet<String>,
    /// What the current process logged on stderr (the last lines, bounded).
    pub stderr: VecDeque<String>,
    pub exit: Option<String>,
    /// The id, interned.
    key: Option<Key>,
    /// Lines this process showed or said.
    holds: HashSet<Key>,
}

impl PeerState {
    /// Running and not paused: a member the mesh includes and a receiver owed lines.
    pub fn live(&self) -> bool {
        self.running && !self.paused
    }
}

/// A line said by some peer.
#[derive(Debug, Clone)]
pub struct Said {
    pub msg_id: String,
    pub origin: String,
    pub origin_name: String,
    pub seq: u64,
    pub text: String,
    pub at: Instant,
}

/// An id or msg id as a small integer: at 256 peers the world holds millions of showings, and
/// each is keyed by two of them.
type Key = u32;

/// Strings to keys and back.
#[derive(Default)]
struct Interner {
    keys: HashMap<String, Key>,
    strings: Vec<String>,
}

impl Interner {
    fn intern(&mut self, s: &str) -> Key {
        if let Some(&k) = self.keys.get(s) {
            return k;
        }
        let k = Key::try_from(self.strings.len()).expect("fewer than 2^32 ids");
        self.strings.push(s.to_owned());
        self.keys.insert(s.to_owned(), k);
        k
    }

    fn get(&self, s: &str) -> Option<Key> {
        self.keys.get(s).copied()
    }

    fn string(&self, k: Key) -> &str {
        &self.strings[k as usize]
    }
}

/// Nanoseconds since the world started: a showing's times in 8 bytes instead of 16.
type Nanos = u64;

/// How one receiver showed one line.
#[derive(Debug, Clone)]
struct Receipt {
    count: u32,
    first_at: Nanos,
    /// The neighbour the first showing came through.
    via: Key,
    /// When the connection a caught-up line came over last came up (for catch-up latency).
    caught_up_after: Option<Nanos>,
}

/// What the world knows of one msg id.
#[derive(Debug, Default)]
struct LineRecord {
    /// Its index in `said`, once the sender's `sent` was read.
    said: Option<usize>,
    /// When the last receiver so far first showed it.
    last_shown: Option<Nanos>,
    /// Showings read before the sender's `sent`: their texts are checked when it comes.
    unchecked: Vec<(Key, String)>,
}

/// One thing worth drawing on the report's timeline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Mark {
    pub at_ms: u64,
    pub peer: String,
    pub kind: String,
    pub detail: String,
}

/// A line said, as the report records it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LineOut {
    pub msg_id: String,
    pub sender: String,
    pub seq: u64,
    /// When its sender confirmed it (`sent`), from the run's start.
    pub said_ms: f64,
    pub showings: Vec<ShowingOut>,
}

/// A receiver's first showing of a line.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShowingOut {
    pub receiver: String,
    pub at_ms: f64,
    /// The neighbour it came through (its name).
    pub via: String,
    /// Caught up (anti-entropy) rather than sent on directly.
    pub caught_up: bool,
    /// How many times it was shown (more than once is a duplicate).
    pub times: u32,
}

/// A rule broken, whatever the timing: these fail a run at once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub peer: String,
    pub what: String,
}

/// Delivery status of every owed line.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Delivery {
    pub said: usize,
    pub owed: usize,
    pub shown: usize,
    /// Owed showings not (yet) made.
    pub lost: usize,
    /// The first few of them, described.
    pub lost_examples: Vec<String>,
    pub duplicated: usize,
    pub out_of_order: usize,
    pub gapped: usize,
    /// The same figures for each receiver, by name.
    pub per_receiver: BTreeMap<String, Receiver>,
    /// When the last owed showing made so far was read.
    #[serde(skip)]
    pub last_shown_at: Option<Instant>,
}

/// Delivery figures of one receiver.
#[derive(Debug, Default, Clone, PartialEq, serde::Serialize)]
pub struct Receiver {
    pub owed: usize,
    pub shown: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub out_of_order: usize,
    pub gapped: usize,
}

impl Delivery {
    pub fn complete(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.out_of_order == 0
    }
}

pub struct World {
    pub started: Instant,
    peers: BTreeMap<String, PeerState>,
    /// Peer ids and msg ids as keys.
    ids: Interner,
    msgs: Interner,
    /// The name behind each id key, as events gave it.
    names: HashMap<Key, String>,
    said: Vec<Said>,
    /// For each line in `said`: its msg id and origin as keys.
    said_keys: Vec<(Key, Key)>,
    lines: Vec<LineRecord>,
    /// (receiver, msg) → how it was shown. Keyed by msg id, not by the `sent` event, because
    /// the lab may read a receiver's `message` before the sender's `sent`.
    receipts: HashMap<(Key, Key), Receipt>,
    /// (receiver, sender) → the sender's seq when the receiver first met it.
    baselines: HashMap<(Key, Key), u64>,
    /// (receiver, sender) → the highest seq shown.
    last_shown: HashMap<(Key, Key), u64>,
    /// (receiver, sender) → the seq up to which the receiver reported a gap.
    gapped_upto: HashMap<(Key, Key), u64>,
    /// (receiver, neighbour) → when their connection last came up.
    link_up: HashMap<(Key, Key), Instant>,
    violations: Vec<Violation>,
    /// Every peer's stderr across its processes, bounded per peer (for the report).
    logs: BTreeMap<String, VecDeque<String>>,
    /// Duplicates and out-of-order showings, by receiver name.
    duplicated: BTreeMap<String, usize>,
    out_of_order: BTreeMap<String, usize>,
    pub timeline: Vec<Mark>,
}

const STDERR_KEPT: usize = 10_000;
/// Lost showings described in a delivery check (the rest are counted).
const LOST_EXAMPLES: usize = 6;

impl World {
    pub fn new(started: Instant) -> World {
        World {
            started,
            peers: BTreeMap::new(),
            ids: Interner::default(),
            msgs: Interner::default(),
            names: HashMap::new(),
            said: Vec::new(),
            said_keys: Vec::new(),
            lines: Vec::new(),
            receipts: HashMap::new(),
            baselines: HashMap::new(),
            last_shown: HashMap::new(),
            gapped_upto: HashMap::new(),
            link_up: HashMap::new(),
            violations: Vec::new(),
            logs: BTreeMap::new(),
            duplicated: BTreeMap::new(),
            out_of_order: BTreeMap::new(),
            timeline: Vec::new(),
        }
    }

    /// A new process was started under `name`.
    pub fn started(&mut self, name: &str, instance: u32) {
        let p = self.peers.entry(name.to_owned()).or_default();
        p.instance = instance;
        p.id = None;
        p.key = None;
        p.listening = false;
        p.listening_at = None;
        p.sent = 0;
        p.hook.clear();
        p.hook_conditions.clear();
        p.running = true;
        p.paused = false;
        p.neighbours.clear();
        p.holds.clear();
        p.exit = None;
        p.stderr.clear();
    }

    /// The lab froze (`true`) or thawed a peer.
    pub fn set_paused(&mut self, name: &str, paused: bool) {
        if let Some(p) = self.peers.get_mut(name) {
            p.paused = paused;
        }
    }

    /// Puts a mark on the timeline, now.
    pub fn mark(&mut self, peer: &str, kind: &str, detail: String) {
        self.mark_at(Instant::now(), peer, kind, detail);
    }

    /// Puts a mark on the timeline at `at`.
    pub fn mark_at(&mut self, at: Instant, peer: &str, kind: &str, detail: String) {
        let at_ms = at.saturating_duration_since(self.started).as_millis() as u64;
        self.timeline.push(Mark { at_ms, peer: peer.to_owned(), kind: kind.to_owned(), detail });
    }

    /// Records an observation. Returns false when it came from a process already replaced.
    pub fn observe(&mut self, o: Observed) -> bool {
        let Some(p) = self.peers.get_mut(&o.peer) else { return false };
        if p.instance != o.instance {
            return false;
        }
        match o.what {
            Observation::Event(e) => self.on_event(&o.peer, o.at, e),
            Observation::Breach(line) => {
                self.violations.push(Violation { peer: o.peer, what: format!("event contract broken: {line}") })
            }
            Observation::Stderr(line) => {
                if p.stderr.len() == STDERR_KEPT {
                    p.stderr.pop_front();
                }
                p.stderr.push_back(line.clone());
                let log = self.logs.entry(o.peer.clone()).or_default();
                if log.len() == STDERR_KEPT {
                    log.pop_front();
                }
                log.push_back(format!("[{}] {line}", o.instance));
            }
            Observation::Exited(status) => {
                p.running = false;
                p.paused = false;
                p.neighbours.clear();
                p.exit = Some(status.clone());
                self.mark_at(o.at, &o.peer, "exit", status);
            }
        }
        true
    }

    fn on_event(&mut self, name: &str, at: Instant, e: PeerEvent) {
        match e {
            PeerEvent::Listening { id, addr, .. } => {
                let key = self.ids.intern(&id);
                self.names.insert(key, name.to_owned());
                let p = self.peers.get_mut(name).expect("checked by observe");
                p.id = Some(id);
                p.key = Some(key);
                p.listen = Some(addr);
                p.listening = true;
                p.listening_at = Some(at);
            }
            PeerEvent::PeerUp { peer, seq } => {
                let (me, other) = (self.key_of(name), self.ids.intern(&peer.id));
                if self.names.get(&other) != Some(&peer.name) {
                    self.names.insert(other, peer.name.clone());
                }
                self.baselines.entry((me, other)).or_insert(seq);
                self.link_up.insert((me, other), at);
                self.peer_mut(name).neighbours.insert(peer.id);
                self.mark_at(at, name, "up", peer.name);
            }
            PeerEvent::PeerDown { peer, reason } => {
                self.peer_mut(name).neighbours.remove(&peer.id);
                self.mark_at(at, name, "down", format!("{} ({reason})", peer.name));
            }
            PeerEvent::Sent { msg_id, seq, text } => self.on_sent(name, at, msg_id, seq, text),
            PeerEvent::Message { msg_id, seq, from, via, caught_up, text } => {
                self.on_message(name, at, &msg_id, seq, &from.id, &via, caught_up, text)
            }
            PeerEvent::Gap { from, upto, .. } => {
                let key = (self.key_of(name), self.ids.intern(&from.id));
                self.gapped_upto.insert(key, upto);
                self.mark_at(at, name, "gap", from.name);
            }
            PeerEvent::Error { message } => self.mark_at(at, name, "error", message),
            PeerEvent::Notice { from, text } => self.mark_at(at, name, "notice", format!("{}: {text}", from.name)),
            PeerEvent::Hook { cuts, conditions } => {
                let p = self.peer_mut(name);
                p.hook = cuts;
                p.hook_conditions = conditions;
            }
            PeerEvent::Peers { peers } => {
                let p = self.peer_mut(name);
                p.listed = peers.into_iter().map(|r| r.name).collect();
                p.answers += 1;
            }
            PeerEvent::Stats(stats) => {
                let p = self.peer_mut(name);
                p.stats = Some(stats);
                p.answers += 1;
            }
            PeerEvent::Other => {}
        }
    }

    fn peer_mut(&mut self, name: &str) -> &mut PeerState {
        self.peers.get_mut(name).expect("checked by observe")
    }

    /// The id key of a peer's current process (the empty id before it listened).
    fn key_of(&mut self, name: &str) -> Key {
        match self.peers.get(name).and_then(|p| p.key) {
            Some(k) => k,
            None => self.ids.intern(""),
        }
    }

    fn record_of(&mut self, msg: Key) -> &mut LineRecord {
        let i = msg as usize;
        if self.lines.len() <= i {
            self.lines.resize_with(i + 1, LineRecord::default);
        }
        &mut self.lines[i]
    }

    fn nanos(&self, at: Instant) -> Nanos {
        at.saturating_duration_since(self.started).as_nanos() as Nanos
    }

    fn instant(&self, nanos: Nanos) -> Instant {
        self.started + Duration::from_nanos(nanos)
    }

    /// Every showing of a line must show what its sender said: a line shown with other words
    /// (a forgery that got through) breaks the run at once, whichever of the two the lab read
    /// first.
    fn on_sent(&mut self, name: &str, at: Instant, msg_id: String, seq: u64, text: String) {
        let (origin, msg) = (self.key_of(name), self.msgs.intern(&msg_id));
        let index = self.said.len();
        let record = self.record_of(msg);
        record.said = Some(index);
        let unchecked = std::mem::take(&mut record.unchecked);
        for (receiver, shown) in unchecked.into_iter().filter(|(_, shown)| *shown != text) {
            let what =
                format!("{} showed {msg_id} as {shown:?}, but its sender said {text:?}", self.name_of_key(receiver));
            self.violations.push(Violation { peer: "*".into(), what });
        }
        let p = self.peer_mut(name);
        p.sent += 1;
        p.holds.insert(msg);
        let origin_id = p.id.clone().unwrap_or_default();
        self.said_keys.push((msg, origin));
        self.said.push(Said { msg_id, origin: origin_id, origin_name: name.to_owned(), seq, text, at });
    }

    #[allow(clippy::too_many_arguments)]
    fn on_message(
        &mut self,
        name: &str,
        at: Instant,
        msg_id: &str,
        seq: u64,
        from: &str,
        via: &str,
        caught_up: bool,
        text: String,
    ) {
        let (me, msg) = (self.key_of(name), self.msgs.intern(msg_id));
        let said = self.record_of(msg).said;
        match said {
            Some(i) if self.said[i].text != text => {
                let what = format!("showed {msg_id} as {text:?}, but its sender said {:?}", self.said[i].text);
                self.violations.push(Violation { peer: name.into(), what });
            }
            Some(_) => {}
            None => self.record_of(msg).unchecked.push((me, text)),
        }
        if self.peers.get(name).and_then(|p| p.id.as_deref()) == Some(from) {
            self.violations.push(Violation { peer: name.into(), what: format!("showed its own line {msg_id}") });
            return;
        }
        let order_key = (me, self.ids.intern(from));
        let last = self.last_shown.get(&order_key).copied().unwrap_or(0);
        if seq <= last {
            let what = if self.receipts.contains_key(&(me, msg)) {
                *self.duplicated.entry(name.to_owned()).or_default() += 1;
                format!("showed {msg_id} twice")
            } else {
                *self.out_of_order.entry(name.to_owned()).or_default() += 1;
                format!("showed {msg_id} (seq {seq}) after seq {last} of the same sender")
            };
            self.violations.push(Violation { peer: name.into(), what });
        }
        self.last_shown.insert(order_key, seq.max(last));
        self.peer_mut(name).holds.insert(msg);
        let first_at = self.nanos(at);
        let via_key = self.ids.intern(via);
        let caught_up_after = match self.ids.get(via) {
            Some(via) if caught_up => self.link_up.get(&(me, via)).map(|t| self.nanos(*t)),
            _ => None,
        }
        .or(caught_up.then_some(0));
        let mut first = false;
        self.receipts.entry((me, msg)).and_modify(|r| r.count += 1).or_insert_with(|| {
            first = true;
            Receipt { count: 1, first_at, via: via_key, caught_up_after }
        });
        if first {
            let record = self.record_of(msg);
            record.last_shown = Some(record.last_shown.map_or(first_at, |t| t.max(first_at)));
        }
    }

    pub fn peer(&self, name: &str) -> Option<&PeerState> {
        self.peers.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &String> {
        self.peers.keys()
    }

    /// Peers running and not paused.
    pub fn running(&self) -> Vec<String> {
        self.peers.iter().filter(|(_, p)| p.live()).map(|(n, _)| n.clone()).collect()
    }

    /// The name behind an id, if the lab has seen it.
    pub fn name_of(&self, id: &str) -> String {
        match self.ids.get(id) {
            Some(key) => self.name_of_key(key),
            None => format!("{}…", short(id)),
        }
    }

    fn name_of_key(&self, key: Key) -> String {
        self.names.get(&key).cloned().unwrap_or_else(|| format!("{}…", short(self.ids.string(key))))
    }

    /// Every peer's stderr lines, each prefixed with its process's instance number.
    pub fn logs(&self) -> &BTreeMap<String, VecDeque<String>> {
        &self.logs
    }

    pub fn violations(&self) -> &[Violation] {
        &self.violations
    }

    pub fn said(&self) -> &[Said] {
        &self.said
    }

    /// How the mesh differs from what the cuts allow among `members` (empty: converged).
    /// With `exact`, a member connected to anyone outside the expected set also counts.
    /// At most `limit` are listed (a check that only needs to know whether there are any stops
    /// at the first: at 256 peers a full list is 65,000 pairs).
    pub fn mesh_problems(&self, members: &[String], cuts: &Cuts, exact: bool, limit: usize) -> Vec<String> {
        let mut problems = Vec::new();
        let ids: Vec<Option<&String>> =
            members.iter().map(|m| self.peers.get(m).filter(|p| p.live()).and_then(|p| p.id.as_ref())).collect();
        for (a, a_id) in members.iter().zip(&ids) {
            if problems.len() >= limit {
                break;
            }
            let Some(pa) = self.peers.get(a) else {
                problems.push(format!("{a} was never started"));
                continue;
            };
            if a_id.is_none() {
                problems.push(format!("{a} is not running"));
                continue;
            }
            let mut expected = 0;
            for (b, b_id) in members.iter().zip(&ids).filter(|(b, _)| *b != a) {
                let Some(b_id) = b_id else { continue };
                let linked = pa.neighbours.contains(*b_id);
                if cuts.severed(a, b) {
                    if linked {
                        problems.push(format!("{a} is still connected to {b} across a cut"));
                    }
                } else {
                    expected += usize::from(linked);
                    if !linked {
                        problems.push(format!("{a} is not connected to {b}"));
                    }
                }
            }
            if exact && pa.neighbours.len() > expected {
                let members: HashSet<&String> = ids.iter().flatten().copied().collect();
                for extra in pa.neighbours.iter().filter(|n| !members.contains(n)) {
                    problems.push(format!(
                        "{a} lists {} ({}) which is not a live member",
                        self.name_of(extra),
                        short(extra)
                    ));
                }
            }
        }
        problems
    }

    /// Checks every line said so far against every running receiver.
    pub fn delivery(&self, cuts: &Cuts) -> Delivery {
        let running: Vec<(&String, &PeerState, Key)> =
            self.peers.iter().filter(|(_, p)| p.live()).filter_map(|(n, p)| Some((n, p, p.key?))).collect();
        let names: Vec<&str> = running.iter().map(|(n, _, _)| n.as_str()).collect();
        let (component, components) = components(&names, cuts);
        let mut d = Delivery {
            said: self.said.len(),
            duplicated: self.duplicated.values().sum(),
            out_of_order: self.out_of_order.values().sum(),
            ..Delivery::default()
        };
        let mut per_receiver: Vec<Receiver> = vec![Receiver::default(); running.len()];
        let mut last_shown: Option<Nanos> = None;
        let mut reachable = vec![false; components];
        // (receiver, sender) pairs behind a hole: a line the receiver has not shown, nor skipped,
        // that no peer it can reach holds. A sender's lines are shown in order, so the later
        // ones cannot be shown either (only the sender may declare lines gone) and are not owed.
        let mut behind_a_hole: HashSet<(usize, Key)> = HashSet::new();
        for (line, &(msg, origin)) in self.said.iter().zip(&self.said_keys) {
            // Holders: processes that showed the line, and its sender if still running under
            // the same identity (a peer with a state directory keeps its own lines).
            reachable.fill(false);
            let origin_at = running.iter().position(|(_, _, key)| *key == origin);
            if let Some(i) = origin_at {
                reachable[component[i]] = true;
            }
            if origin_at.is_none() || components > 1 {
                for (i, (_, p, _)) in running.iter().enumerate() {
                    if p.holds.contains(&msg) {
                        reachable[component[i]] = true;
                    }
                }
            }
            for (i, (name, _, me)) in running.iter().enumerate() {
                if *me == origin {
                    continue;
                }
                match self.baselines.get(&(*me, origin)) {
                    Some(&base) if line.seq > base => {}
                    _ => continue,
                }
                let shown = self.receipts.get(&(*me, msg));
                let skipped = self.gapped_upto.get(&(*me, origin)).is_some_and(|&u| line.seq <= u);
                if shown.is_none() && !skipped {
                    if !reachable[component[i]] {
                        behind_a_hole.insert((i, origin));
                        continue;
                    }
                    if behind_a_hole.contains(&(i, origin)) {
                        continue;
                    }
                } else if !reachable[component[i]] && shown.is_none() {
                    continue;
                }
                let r = &mut per_receiver[i];
                r.owed += 1;
                if let Some(receipt) = shown {
                    r.shown += 1;
                    last_shown = Some(last_shown.map_or(receipt.first_at, |t| t.max(receipt.first_at)));
                } else if self.gapped_upto.get(&(*me, origin)).is_some_and(|&u| line.seq <= u) {
                    r.gapped += 1;
                } else {
                    r.lost += 1;
                    if d.lost_examples.len() < LOST_EXAMPLES {
                        let example =
                            format!("{name} has not shown {}'s line {} {:?}", line.origin_name, line.seq, line.text);
                        d.lost_examples.push(example);
                    }
                }
            }
        }
        for ((name, _, _), r) in running.iter().zip(per_receiver) {
            d.owed += r.owed;
            d.shown += r.shown;
            d.lost += r.lost;
            d.gapped += r.gapped;
            if r != Receiver::default() {
                d.per_receiver.insert((*name).clone(), r);
            }
        }
        for (name, n) in &self.duplicated {
            d.per_receiver.entry(name.clone()).or_default().duplicated = *n;
        }
        for (name, n) in &self.out_of_order {
            d.per_receiver.entry(name.clone()).or_default().out_of_order = *n;
        }
        d.last_shown_at = last_shown.map(|t| self.instant(t));
        d
    }

    /// Every line said, with each showing of it (the first by each receiver), in the order
    /// said; at most `limit` showings in all (the second value says whether some were left
    /// out).
    pub fn line_records(&self, limit: usize) -> (Vec<LineOut>, bool) {
        let mut by_msg: HashMap<Key, Vec<(Key, &Receipt)>> = HashMap::new();
        for ((receiver, msg), r) in &self.receipts {
            by_msg.entry(*msg).or_default().push((*receiver, r));
        }
        let mut left = limit;
        let mut truncated = false;
        let ms = |n: Nanos| (n as f64 / 1e3).round() / 1e3;
        let lines = self
            .said
            .iter()
            .zip(&self.said_keys)
            .map(|(s, (msg, _))| {
                let mut showings: Vec<ShowingOut> = by_msg
                    .get(msg)
                    .map(|v| {
                        v.iter()
                            .map(|(receiver, r)| ShowingOut {
                                receiver: self.name_of_key(*receiver),
                                at_ms: ms(r.first_at),
                                via: self.name_of_key(r.via),
                                caught_up: r.caught_up_after.is_some(),
                                times: r.count,
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                showings.sort_by(|a, b| a.at_ms.total_cmp(&b.at_ms));
                if showings.len() > left {
                    truncated = true;
                    showings.truncate(left);
                }
                left -= showings.len();
                LineOut {
                    msg_id: s.msg_id.clone(),
                    sender: s.origin_name.clone(),
                    seq: s.seq,
                    said_ms: ms(self.nanos(s.at)),
                    showings,
                }
            })
            .collect();
        (lines, truncated)
    }

    /// Showings recorded so far (first showings of a line by a receiver).
    pub fn showings(&self) -> usize {
        self.receipts.len()
    }

    /// When the current process named `receiver` showed the line `msg_id` (first time), if it did.
    pub fn shown_at(&self, receiver: &str, msg_id: &str) -> Option<Instant> {
        let me = self.peers.get(receiver)?.key?;
        let receipt = self.receipts.get(&(me, self.msgs.get(msg_id)?))?;
        Some(self.instant(receipt.first_at))
    }

    /// When `peer`'s current process first brought a neighbour up.
    pub fn first_up(&self, peer: &str) -> Option<Instant> {
        let p = self.peers.get(peer)?;
        let (me, since) = (p.key?, p.listening_at?);
        self.link_up.iter().filter(|((k, _), at)| *k == me && **at >= since).map(|(_, at)| *at).min()
    }

    /// For each line shown by someone, the time until the last of its receivers showed it.
    pub fn completion_times(&self) -> Vec<Duration> {
        let mut out: Vec<Duration> = self
            .said
            .iter()
            .zip(&self.said_keys)
            .filter_map(|(s, (msg, _))| {
                let last = self.lines[*msg as usize].last_shown?;
                Some(self.instant(last).saturating_duration_since(s.at))
            })
            .collect();
        out.sort();
        out
    }

    /// Latencies of first showings, split into direct and caught-up lines.
    pub fn latencies(&self) -> (Vec<Duration>, Vec<Duration>) {
        self.latencies_since(self.started)
    }

    /// Latencies of first showings of the lines said at or after `since`, split into direct and
    /// caught-up lines, each sorted.
    pub fn latencies_since(&self, since: Instant) -> (Vec<Duration>, Vec<Duration>) {
        let mut direct = Vec::new();
        let mut catch_up = Vec::new();
        for ((_, msg), r) in &self.receipts {
            let Some(index) = self.lines[*msg as usize].said else { continue };
            if self.said[index].at < since {
                continue;
            }
            let said = self.nanos(self.said[index].at);
            let latency = |from: Nanos| Duration::from_nanos(r.first_at.saturating_sub(from));
            match r.caught_up_after {
                Some(link_up) => catch_up.push(latency(link_up.max(said))),
                None => direct.push(latency(said)),
            }
        }
        direct.sort();
        catch_up.sort();
        (direct, catch_up)
    }
}

/// The first characters of an id printed by a peer (which may be anything).
fn short(id: &str) -> String {
    id.chars().take(8).collect()
}

/// Groups of peers that can reach each other over the links the cuts leave: each name's group,
/// in the order of `names`, and how many groups there are.
fn components(names: &[&str], cuts: &Cuts) -> (Vec<usize>, usize) {
    if cuts.is_empty() {
        return (vec![0; names.len()], 1);
    }
    let mut component: Vec<Option<usize>> = vec![None; names.len()];
    let mut count = 0;
    for start in 0..names.len() {
        if component[start].is_some() {
            continue;
        }
        let mut queue = VecDeque::from([start]);
        component[start] = Some(count);
        while let Some(x) = queue.pop_front() {
            for y in 0..names.len() {
                if component[y].is_none() && !cuts.severed(names[x], names[y]) {
                    component[y] = Some(count);
                    queue.push_back(y);
                }
            }
        }
        count += 1;
    }
    (component.into_iter().map(|c| c.expect("every name visited")).collect(), count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::PeerRef;

    fn ev(w: &mut World, peer: &str, e: PeerEvent) {
        let instance = w.peers.get(peer).map_or(0, |p| p.instance);
        w.observe(Observed { peer: peer.into(), instance, at: Instant::now(), what: Observation::Event(e) });
    }

    fn r(name: &str) -> PeerRef {
        PeerRef { id: format!("id-{name}"), name: name.into(), addr: "x:1".into() }
    }

    fn world(names: &[&str]) -> World {
        let mut w = World::new(Instant::now());
        for n in names {
            w.started(n, 1);
            ev(&mut w, n, PeerEvent::Listening { id: format!("id-{n}"), name: n.to_string(), addr: "x:1".into() });
        }
        w
    }

    fn link(w: &mut World, a: &str, b: &str) {
        ev(w, a, PeerEvent::PeerUp { peer: r(b), seq: 0 });
        ev(w, b, PeerEvent::PeerUp { peer: r(a), seq: 0 });
    }

    fn say(w: &mut World, who: &str, seq: u64) {
        let msg_id = format!("id-{who}-{seq}");
        ev(w, who, PeerEvent::Sent { msg_id, seq, text: "t".into() });
    }

    fn show(w: &mut World, who: &str, from: &str, seq: u64) {
        let msg_id = format!("id-{from}-{seq}");
        let via = format!("id-{from}");
        ev(w, who, PeerEvent::Message { msg_id, seq, from: r(from), via, text: "t".into(), caught_up: false });
    }

    #[test]
    fn a_line_shown_with_other_words_than_its_sender_said_is_a_violation() {
        let mut w = world(&["a", "b", "c"]);
        link(&mut w, "a", "b");
        link(&mut w, "a", "c");
        // c shows a forgery before the lab has read a's `sent`; b shows one after.
        let forged = || PeerEvent::Message {
            msg_id: "id-a-1".into(),
            seq: 1,
            from: r("a"),
            via: "id-m".into(),
            text: "pay mallory".into(),
            caught_up: true,
        };
        ev(&mut w, "c", forged());
        say(&mut w, "a", 1);
        assert_eq!(w.violations().len(), 1, "{:?}", w.violations());
        ev(&mut w, "b", forged());
        assert_eq!(w.violations().len(), 2, "{:?}", w.violations());
        assert!(w.violations()[1].what.contains("as \"pay mallory\", but its sender said \"t\""));
    }

    #[test]
    fn mesh_respects_cuts() {
        let mut w = world(&["a", "b", "c"]);
        let all: Vec<String> = ["a", "b", "c"].map(String::from).to_vec();
        link(&mut w, "a", "b");
        link(&mut w, "b", "c");
        assert_eq!(w.mesh_problems(&all, &Cuts::default(), true, usize::MAX).len(), 2, "a-c missing on both sides");
        let mut cuts = Cuts::default();
        cuts.cut_both("a", "c");
        assert!(w.mesh_problems(&all, &cuts, true, usize::MAX).is_empty());
        link(&mut w, "a", "c");
        assert!(!w.mesh_problems(&all, &cuts, true, usize::MAX).is_empty(), "a connection across a cut is a problem");
    }

    #[test]
    fn delivery_tracks_owed_lost_and_duplicates() {
        let mut w = world(&["a", "b", "c"]);
        link(&mut w, "a", "b");
        link(&mut w, "a", "c");
        say(&mut w, "a", 1);
        show(&mut w, "b", "a", 1);
        let d = w.delivery(&Cuts::default());
        assert_eq!((d.owed, d.shown, d.lost), (2, 1, 1));
        show(&mut w, "c", "a", 1);
        assert!(w.delivery(&Cuts::default()).complete());
        show(&mut w, "c", "a", 1);
        let d = w.delivery(&Cuts::default());
        assert_eq!(d.duplicated, 1);
        assert_eq!(d.per_receiver["c"], Receiver { owed: 1, shown: 1, duplicated: 1, ..Receiver::default() });
        assert_eq!(d.per_receiver["b"], Receiver { owed: 1, shown: 1, ..Receiver::default() });
        assert_eq!(w.violations().len(), 1);
    }

    #[test]
    fn lines_are_not_owed_across_an_unhealed_cut_or_before_meeting() {
        let mut w = world(&["a", "b", "c"]);
        link(&mut w, "a", "b");
        say(&mut w, "a", 1); // c never met a: not owed to c
        let mut cuts = Cuts::default();
        cuts.cut_both("a", "b");
        assert_eq!(w.delivery(&cuts).owed, 1, "b still reaches a through c");
        cuts.cut_both("b", "c");
        let d = w.delivery(&cuts);
        assert_eq!(d.owed, 0, "b cannot reach any holder");
        cuts.heal_all();
        assert_eq!(w.delivery(&cuts).owed, 1);
    }

    /// A sender's lines are shown in order: behind a line nobody reachable holds (its sender
    /// and every holder gone), the later ones cannot be shown, and are not owed, even where a
    /// peer that met the sender later holds them.
    #[test]
    fn lines_behind_a_hole_nobody_can_fill_are_not_owed() {
        let mut w = world(&["s", "h", "r", "n"]);
        link(&mut w, "s", "h");
        link(&mut w, "s", "r");
        say(&mut w, "s", 1);
        show(&mut w, "h", "s", 1); // r (frozen, say) has not shown it
        ev(&mut w, "n", PeerEvent::PeerUp { peer: r("s"), seq: 1 }); // n met s after line 1
        say(&mut w, "s", 2);
        show(&mut w, "h", "s", 2);
        show(&mut w, "n", "s", 2);
        assert_eq!(w.delivery(&Cuts::default()).lost, 2, "r is owed both while s and h run");
        for gone in ["s", "h"] {
            let instance = w.peers[gone].instance;
            w.observe(Observed {
                peer: gone.into(),
                instance,
                at: Instant::now(),
                what: Observation::Exited("killed".into()),
            });
        }
        let d = w.delivery(&Cuts::default());
        assert_eq!((d.owed, d.lost), (1, 0), "n's line 2 is shown; r is owed nothing it could show: {d:?}");
    }

    #[test]
    fn out_of_order_is_a_violation() {
        let mut w = world(&["a", "b"]);
        link(&mut w, "a", "b");
        say(&mut w, "a", 1);
        say(&mut w, "a", 2);
        show(&mut w, "b", "a", 2);
        show(&mut w, "b", "a", 1);
        assert_eq!(w.delivery(&Cuts::default()).out_of_order, 1);
    }
}
