//! The lab's Rust API: plain verbs over a backend, and awaits that check the world model.
//!
//! `start`, `stop`, `kill`, `restart`, `partition`, `cut`, `heal`, `say`, `await_mesh`,
//! `await_delivery`, `sleep`: each does what it says, waits for the peers to confirm it through
//! their events (a started peer has listened, a stopped one has exited, a cut is acknowledged),
//! and fails with what was expected and what was seen. Scenario files are run through these
//! same verbs, and tests call them directly.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{self, UnboundedReceiver, UnboundedSender};

use crate::backend::{self, Backend, Links, PeerSpec, Stop};
use crate::history::{Entry, Journal, cut_pairs};
use crate::link::{Condition, Conditions};
use crate::world::{Cuts, Delivery, Observed, World};

/// How long a peer may take to start listening or to exit, before scaling.
const PROCESS_DEADLINE: Duration = Duration::from_secs(10);
/// How long a peer has to leave gracefully before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    /// A check did not hold by its deadline.
    #[error("expected {expected}\n  seen: {seen}")]
    Check { expected: String, seen: String },
    /// A rule was broken: duplicate or out-of-order line, broken event contract.
    #[error("{peer}: {what}")]
    Violation { peer: String, what: String },
    /// The step could not be carried out.
    #[error("{0:#}")]
    Backend(#[from] anyhow::Error),
}

/// How a peer is (re)started.
#[derive(Debug, Clone, Default)]
struct PeerConfig {
    via: Vec<String>,
    flags: Vec<String>,
}

pub struct Lab<B: Backend> {
    backend: B,
    world: World,
    events_tx: UnboundedSender<Observed>,
    events: UnboundedReceiver<Observed>,
    cuts: Cuts,
    conditions: Conditions,
    /// What the lab undoes by itself when its time comes (a step's `for`), soonest first.
    undos: Vec<(Instant, Undo)>,
    configs: BTreeMap<String, PeerConfig>,
    instances: u32,
    /// Lines written to each running peer's stdin since it started.
    written: HashMap<String, u64>,
    violations_reported: usize,
    /// The run's history, when one is kept (crate::history).
    journal: Option<Journal>,
    last_event_at: Instant,
    /// When the latest delivery await began (or the lab was made).
    last_delivery_check: Instant,
    /// Extra flags for every peer (a scenario's `flags`).
    pub common_flags: Vec<String>,
    /// Peers whose state directory outlives their processes.
    keeps_state: std::collections::BTreeSet<String>,
    /// The mesh key every peer started from now on gets (a private mesh).
    mesh_key: Option<String>,
}

impl<B: Backend> Lab<B> {
    pub fn new(backend: B) -> Lab<B> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let now = Instant::now();
        Lab {
            backend,
            world: World::new(now),
            events_tx,
            events,
            cuts: Cuts::default(),
            conditions: Conditions::default(),
            undos: Vec::new(),
            configs: BTreeMap::new(),
            instances: 0,
            written: HashMap::new(),
            violations_reported: 0,
            journal: None,
            last_event_at: now,
            last_delivery_check: now,
            common_flags: Vec::new(),
            keeps_state: Default::default(),
            mesh_key: None,
        }
    }

    pub fn world(&self) -> &World {
        &self.world
    }

    /// When the lab read the latest observation that counted.
    pub fn last_event_at(&self) -> Instant {
        self.last_event_at
    }

    /// When the latest delivery await began: lines said since are the next one's.
    pub fn last_delivery_check(&self) -> Instant {
        self.last_delivery_check
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    pub fn cuts(&self) -> &Cuts {
        &self.cuts
    }

    pub fn conditions(&self) -> &Conditions {
        &self.conditions
    }

    /// From its next start on, `name` keeps its state directory (`--state-dir`) across
    /// restarts: it comes back as the same member and catches up on what it missed.
    pub fn keep_state(&mut self, name: &str) {
        self.keeps_state.insert(name.to_owned());
    }

    /// Makes the peers started from now on a private mesh with a fresh random key (64 hex
    /// characters, given to each as MESH_KEY). Returns the key.
    pub fn private_mesh(&mut self) -> String {
        let key: String = rand::random::<[u8; 32]>().iter().map(|b| format!("{b:02x}")).collect();
        self.mesh_key = Some(key.clone());
        key
    }

    /// Makes the peers started from now on open-mesh peers (no key).
    pub fn open_mesh(&mut self) {
        self.mesh_key = None;
    }

    /// Whether a peer was started with bootstrap peers.
    pub fn has_bootstrap(&self, name: &str) -> bool {
        self.configs.get(name).is_some_and(|c| !c.via.is_empty())
    }

    /// Deadlines are scaled by the backend's factor.
    pub fn scaled(&self, d: Duration) -> Duration {
        d.mul_f64(self.backend.time_scale())
    }

    /// Starts peers (all at once), each bootstrapping from the named peers, and waits until
    /// every one of them listens.
    pub async fn start(&mut self, names: &[&str], via: &[&str], flags: &[String]) -> Result<(), LabError> {
        let each: Vec<(&str, Vec<String>)> = names.iter().map(|n| (*n, flags.to_vec())).collect();
        self.start_each(&each, via).await
    }

    /// Like [`start`](Self::start), with flags of its own for each peer.
    pub async fn start_each(&mut self, peers: &[(&str, Vec<String>)], via: &[&str]) -> Result<(), LabError> {
        for (name, flags) in peers {
            if self.world.peer(name).is_some_and(|p| p.running) {
                return Err(anyhow::anyhow!("{name} is already running").into());
            }
            let config = PeerConfig { via: via.iter().map(|v| v.to_string()).collect(), flags: flags.clone() };
            self.configs.insert(name.to_string(), config);
        }
        let names: Vec<&str> = peers.iter().map(|(n, _)| *n).collect();
        self.launch(&names).await
    }

    /// Stops a peer gracefully (SIGTERM: it says goodbye) and waits for it to exit.
    pub async fn stop(&mut self, name: &str) -> Result<(), LabError> {
        self.halt(name, Stop::Graceful).await
    }

    /// Kills a peer (SIGKILL) and waits for it to exit.
    pub async fn kill(&mut self, name: &str) -> Result<(), LabError> {
        self.halt(name, Stop::Kill).await
    }

    /// Freezes a running peer (SIGSTOP; `docker pause`): its connections stay open and its
    /// kernel keeps answering, but it does nothing, as a peer stuck in a long pause would. Until
    /// it resumes, it is not a member the mesh should include nor a receiver owed lines.
    pub async fn pause(&mut self, name: &str) -> Result<(), LabError> {
        self.live(name)?;
        self.backend.pause(name).await?;
        self.set_paused(name, true);
        Ok(())
    }

    /// Thaws a paused peer: it finds its neighbours gone (they timed it out) and meets them
    /// again, and catches up on what was said meanwhile.
    pub async fn resume(&mut self, name: &str) -> Result<(), LabError> {
        if !self.world.peer(name).is_some_and(|p| p.paused) {
            return Err(anyhow::anyhow!("{name} is not paused").into());
        }
        self.backend.resume(name).await?;
        self.set_paused(name, false);
        Ok(())
    }

    fn live(&self, name: &str) -> Result<(), LabError> {
        match self.world.peer(name) {
            Some(p) if p.live() => Ok(()),
            Some(p) if p.paused => Err(anyhow::anyhow!("{name} is paused already").into()),
            _ => Err(anyhow::anyhow!("{name} is not running").into()),
        }
    }

    /// Starts a peer again under the same name, bootstrap and flags. A running peer is killed
    /// first: a restart is a crash and a reboot, after which the others find the peer again by
    /// its address (for a graceful one, `stop` then `start`). Cuts in force apply to the new
    /// process too.
    pub async fn restart(&mut self, name: &str) -> Result<(), LabError> {
        if !self.configs.contains_key(name) {
            return Err(anyhow::anyhow!("{name} was never started").into());
        }
        if self.world.peer(name).is_some_and(|p| p.running) {
            self.halt(name, Stop::Kill).await?;
        }
        self.launch(&[name]).await
    }

    /// Cuts every pair of peers in different groups, both ways. Returns the directed pairs
    /// cut, for [`undo_after`](Self::undo_after).
    pub async fn partition(&mut self, groups: &[Vec<String>]) -> Result<Vec<(String, String)>, LabError> {
        let mut pairs = Vec::new();
        for (i, a_group) in groups.iter().enumerate() {
            for b_group in &groups[i + 1..] {
                for a in a_group {
                    for b in b_group {
                        self.cuts.cut_both(a, b);
                        pairs.extend([(a.clone(), b.clone()), (b.clone(), a.clone())]);
                    }
                }
            }
        }
        let described: Vec<String> = groups.iter().map(|g| g.join(" ")).collect();
        self.note("*", "partition", described.join(" | "));
        self.apply_cuts().await?;
        Ok(pairs)
    }

    /// Cuts the link between two peers; with `one_way`, only traffic from `a` to `b`. Returns
    /// the directed pairs cut.
    pub async fn cut(&mut self, a: &str, b: &str, one_way: bool) -> Result<Vec<(String, String)>, LabError> {
        let mut pairs = vec![(a.to_owned(), b.to_owned())];
        if one_way {
            self.cuts.cut(a, b);
        } else {
            self.cuts.cut_both(a, b);
            pairs.push((b.to_owned(), a.to_owned()));
        }
        let arrow = if one_way { "->" } else { "<->" };
        self.note("*", "cut", format!("{a} {arrow} {b}"));
        self.apply_cuts().await?;
        Ok(pairs)
    }

    /// Heals every cut and condition, or just those between a pair.
    pub async fn heal(&mut self, pair: Option<(&str, &str)>) -> Result<(), LabError> {
        match pair {
            Some((a, b)) => {
                self.cuts.heal_pair(a, b);
                self.conditions.clear_pair(a, b);
            }
            None => {
                self.cuts.heal_all();
                self.conditions.clear_all();
            }
        }
        self.note("*", "heal", pair.map_or("all".into(), |(a, b)| format!("{a} <-> {b}")));
        self.apply_cuts().await
    }

    /// Puts `condition` on links, over what they have: on the link between two peers (with
    /// `one_way`, only on what the first sends the second), or on every link of one peer to
    /// the others started so far (with `one_way`, only on what it sends). Returns the directed
    /// pairs conditioned, for [`undo_after`](Self::undo_after).
    pub async fn condition(
        &mut self,
        peers: &[String],
        condition: Condition,
        one_way: bool,
    ) -> Result<Vec<(String, String)>, LabError> {
        condition.check().map_err(|e| anyhow::anyhow!(e))?;
        if condition.delays() && !self.backend.can_delay() {
            return Err(anyhow::Error::new(NoNetem).into());
        }
        let pairs: Vec<(String, String)> = match peers {
            [a, b] => {
                [(a.clone(), b.clone()), (b.clone(), a.clone())].into_iter().take(if one_way { 1 } else { 2 }).collect()
            }
            [a] => self
                .world
                .names()
                .filter(|n| *n != a)
                .flat_map(|n| {
                    let back = (!one_way).then(|| (n.clone(), a.clone()));
                    std::iter::once((a.clone(), n.clone())).chain(back)
                })
                .collect(),
            _ => return Err(anyhow::anyhow!("a condition is on one peer or on the link between two").into()),
        };
        for (from, to) in &pairs {
            self.conditions.set(from, to, condition);
        }
        let arrow = if one_way { "->" } else { "<->" };
        let which = match peers {
            [a, b] => format!("{a} {arrow} {b}"),
            [a] => format!("{a} {arrow} *"),
            _ => unreachable!("checked above"),
        };
        self.note("*", "condition", format!("{which}: {condition}"));
        self.apply_cuts().await?;
        Ok(pairs)
    }

    /// Has the lab undo `undo` by itself `after` from now, while later steps run.
    pub fn undo_after(&mut self, after: Duration, undo: Undo) {
        let at = Instant::now() + after;
        let i = self.undos.partition_point(|(t, _)| *t <= at);
        self.undos.insert(i, (at, undo));
    }

    /// Undoes `undo` now, and waits until the peers' hooks apply it where they must.
    pub async fn undo(&mut self, undo: Undo) -> Result<(), LabError> {
        if self.revert(undo).await? {
            self.apply_cuts().await?;
        }
        Ok(())
    }

    /// Undoes what is due (without waiting for hook acknowledgements: the checks that follow
    /// wait for the mesh they need).
    async fn undo_due(&mut self) -> Result<(), LabError> {
        let now = Instant::now();
        let due = self.undos.partition_point(|(t, _)| *t <= now);
        let mut links_changed = false;
        for (_, undo) in self.undos.drain(..due).collect::<Vec<_>>() {
            links_changed |= self.revert(undo).await?;
        }
        if links_changed {
            self.push_links().await?;
        }
        Ok(())
    }

    /// Takes `undo` off the lab's tables (or resumes a peer still paused); returns whether
    /// the cuts or conditions changed, for the caller to apply.
    async fn revert(&mut self, undo: Undo) -> Result<bool, LabError> {
        match undo {
            Undo::Heal(pairs) => {
                for (from, to) in &pairs {
                    self.cuts.heal_directed(from, to);
                }
                self.note("*", "heal", describe_pairs(&pairs));
                Ok(true)
            }
            Undo::Clear(pairs) => {
                for (from, to) in &pairs {
                    self.conditions.clear_directed(from, to);
                }
                self.note("*", "clear", describe_pairs(&pairs));
                Ok(true)
            }
            Undo::Resume(name) => {
                if self.world.peer(&name).is_some_and(|p| p.paused) {
                    self.backend.resume(&name).await?;
                    self.set_paused(&name, false);
                }
                Ok(false)
            }
        }
    }

    /// Types a line into a peer. It counts as said once the peer confirms it (`sent`).
    pub async fn say(&mut self, name: &str, text: &str) -> Result<(), LabError> {
        let line = if text.starts_with('/') { format!("/{text}") } else { text.to_owned() };
        self.backend.say(name, &line).await?;
        *self.written.entry(name.to_owned()).or_default() += 1;
        Ok(())
    }

    /// Types a command (a line starting with `/`, such as `/quit`) into a peer.
    pub async fn command(&mut self, name: &str, command: &str) -> Result<(), LabError> {
        Ok(self.backend.say(name, command).await?)
    }

    /// Asks a peer for its neighbours (`/peers`) and returns their names, sorted.
    pub async fn peers_of(&mut self, name: &str) -> Result<Vec<String>, LabError> {
        let before = self.world.peer(name).map_or(0, |p| p.answers);
        self.command(name, "/peers").await?;
        let deadline = Instant::now() + self.scaled(PROCESS_DEADLINE);
        self.wait_until(deadline, format!("{name} to answer /peers"), |w| {
            w.peer(name).filter(|p| p.answers == before).map(|_| "no answer yet".into())
        })
        .await?;
        Ok(self.world.peer(name).map(|p| p.listed.clone()).unwrap_or_default())
    }

    /// Asks every running peer for its counts (`/stats`) and returns them, by name.
    pub async fn stats(&mut self) -> Result<BTreeMap<String, crate::event::Stats>, LabError> {
        let running = self.world.running();
        let before: BTreeMap<String, u64> =
            running.iter().map(|n| (n.clone(), self.world.peer(n).map_or(0, |p| p.answers))).collect();
        for name in &running {
            self.command(name, "/stats").await?;
        }
        let deadline = Instant::now() + self.scaled(PROCESS_DEADLINE);
        self.wait_until(deadline, "every peer to answer /stats", |w| {
            before
                .iter()
                .find(|(n, a)| w.peer(n).is_some_and(|p| p.answers == **a))
                .map(|(n, _)| format!("{n} has not"))
        })
        .await?;
        Ok(running.into_iter().filter_map(|n| Some((n.clone(), self.world.peer(&n)?.stats.clone()?))).collect())
    }

    /// Waits until a peer's process has exited (after `/quit`, say).
    pub async fn await_exit(&mut self, name: &str, within: Duration) -> Result<(), LabError> {
        let deadline = Instant::now() + self.scaled(within);
        self.wait_until(deadline, format!("{name} to exit"), |w| {
            w.peer(name).filter(|p| p.running).map(|_| format!("{name} still runs"))
        })
        .await?;
        self.backend.exited(name);
        Ok(())
    }

    /// Waits until a peer has written a log line containing `needle` on stderr.
    pub async fn await_log(&mut self, name: &str, needle: &str, within: Duration) -> Result<(), LabError> {
        let deadline = Instant::now() + self.scaled(within);
        self.wait_until(deadline, format!("{name} to log {needle:?}"), |w| {
            let found = w.peer(name).is_some_and(|p| p.stderr.iter().any(|l| l.contains(needle)));
            (!found).then(|| format!("{name} has not logged it"))
        })
        .await
    }

    /// Waits until `peer` has a timeline mark of `kind` whose detail contains `needle` (a
    /// neighbour up or down, say). Returns the detail.
    pub async fn await_mark(
        &mut self,
        peer: &str,
        kind: &str,
        needle: &str,
        within: Duration,
    ) -> Result<String, LabError> {
        let deadline = Instant::now() + self.scaled(within);
        let find = |w: &World| {
            w.timeline
                .iter()
                .find(|m| m.peer == peer && m.kind == kind && m.detail.contains(needle))
                .map(|m| m.detail.clone())
        };
        self.wait_until(deadline, format!("{peer} to record {kind} {needle:?}"), |w| {
            find(w).is_none().then(|| "not yet".to_string())
        })
        .await?;
        Ok(find(&self.world).expect("waited for it"))
    }

    /// Waits until the mesh among `members` (all running peers when None) is what the cuts
    /// allow: every uncut pair connected both ways, every cut pair apart. With all peers, a
    /// neighbour that is not a live member also counts against it. Returns the time taken.
    pub async fn await_mesh(&mut self, members: Option<&[String]>, within: Duration) -> Result<Duration, LabError> {
        let started = Instant::now();
        let exact = members.is_none();
        let members = members.map_or_else(|| self.world.running(), |m| m.to_vec());
        let cuts = self.cuts.clone();
        let expected = if cuts.is_empty() {
            format!("a full mesh of {}", members.join(", "))
        } else {
            format!("a mesh of {} as the cuts allow", members.join(", "))
        };
        let deadline = started + self.scaled(within);
        self.wait_until(deadline, expected, |w| summarise(w.mesh_problems(&members, &cuts, exact, SUMMARISED + 1)))
            .await?;
        Ok(self.last_event_at.saturating_duration_since(started))
    }

    /// Waits until every line said so far has been shown exactly once, in order, by every
    /// running peer owed it. Returns the delivery figures and how long after the call the last
    /// owed showing was read (zero when all had been read before).
    pub async fn await_delivery(&mut self, within: Duration) -> Result<(Duration, Delivery), LabError> {
        let started = Instant::now();
        self.last_delivery_check = started;
        let deadline = started + self.scaled(within);
        let cuts = self.cuts.clone();
        let written = self.written.clone();
        let expected = "every line shown once by every peer owed it";
        self.wait_until(deadline, expected, |w| {
            let unconfirmed: Vec<String> = written
                .iter()
                .filter_map(|(name, n)| {
                    let p = w.peer(name)?;
                    (p.running && p.sent < *n).then(|| format!("{name} has confirmed {} of {n} lines", p.sent))
                })
                .collect();
            if !unconfirmed.is_empty() {
                return summarise(unconfirmed);
            }
            let d = w.delivery(&cuts);
            if d.complete() {
                return None;
            }
            let more = d.lost - d.lost_examples.len();
            let mut seen = d.lost_examples;
            seen.extend((more > 0).then(|| format!("{more} more")));
            Some(seen.join("; "))
        })
        .await?;
        let delivery = self.world.delivery(&self.cuts);
        let took = delivery.last_shown_at.map_or(Duration::ZERO, |t| t.saturating_duration_since(started));
        Ok((took, delivery))
    }

    /// Lets time pass while recording what the peers print.
    pub async fn sleep(&mut self, d: Duration) -> Result<(), LabError> {
        let deadline = Instant::now() + d;
        match self.wait_until(deadline, "", |_| Some(String::new())).await {
            Err(LabError::Check { .. }) | Ok(()) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Removes every peer the backend started.
    pub async fn shutdown(&mut self) {
        self.backend.shutdown().await;
        self.pump();
    }

    async fn launch(&mut self, names: &[&str]) -> Result<(), LabError> {
        let mut starts = Vec::new();
        for name in names {
            let config = self.configs[*name].clone();
            let bootstrap = config.via.iter().map(|v| self.address(v)).collect::<Result<Vec<_>, _>>()?;
            let links = self.links_of(name);
            let mut flags = self.common_flags.clone();
            flags.extend(config.flags);
            self.instances += 1;
            self.process_started(name, self.instances);
            self.written.remove(*name);
            let via = if config.via.is_empty() { String::new() } else { format!("via {}", config.via.join(", ")) };
            self.note(name, "start", via);
            let keep_state = self.keeps_state.contains(*name);
            let mesh_key = self.mesh_key.clone();
            let spec = PeerSpec { name: name.to_string(), bootstrap, flags, links, keep_state, mesh_key };
            starts.push((spec, self.instances));
        }
        self.backend.prepare(&starts).await?;
        for (spec, instance) in starts {
            self.backend.start(spec, instance, self.events_tx.clone()).await?;
        }
        let deadline = Instant::now() + self.scaled(PROCESS_DEADLINE);
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let waiting = names.clone();
        self.wait_until(deadline, format!("{} to start", names.join(", ")), |w| {
            for n in &waiting {
                let p = w.peer(n)?;
                if !p.running {
                    let tail: Vec<&str> = p.stderr.iter().rev().take(5).rev().map(String::as_str).collect();
                    return Some(format!(
                        "{n} exited ({}) before listening: {}",
                        p.exit.clone().unwrap_or_default(),
                        tail.join(" | ")
                    ));
                }
                if !p.listening {
                    return Some(format!("{n} has not printed its listening event"));
                }
            }
            None
        })
        .await?;
        for n in &names {
            let listen = self.world.peer(n).and_then(|p| p.listen.clone()).expect("waited for it");
            self.backend.listened(n, &listen);
        }
        Ok(())
    }

    async fn halt(&mut self, name: &str, how: Stop) -> Result<(), LabError> {
        // A frozen process would act on SIGTERM only once thawed.
        if self.world.peer(name).is_some_and(|p| p.paused) {
            self.resume(name).await?;
        }
        let kind = if how == Stop::Kill { "kill" } else { "stop" };
        self.note(name, kind, String::new());
        self.backend.stop(name, how, STOP_GRACE).await?;
        self.await_exit(name, PROCESS_DEADLINE).await?;
        self.written.remove(name);
        Ok(())
    }

    /// The address to bootstrap from to reach `name` (its last one, if it is down).
    fn address(&self, name: &str) -> Result<String, LabError> {
        let listen = self.world.peer(name).and_then(|p| p.listen.clone());
        let listen = listen.ok_or_else(|| anyhow::anyhow!("{name} has no address yet: start it first"))?;
        Ok(self.backend.address_of(name, &listen))
    }

    /// The cuts and conditions `name` must apply.
    fn links_of(&self, name: &str) -> Links {
        let cuts = self
            .cuts
            .involving(name)
            .into_iter()
            .map(|other| {
                let (inbound, outbound) = self.cuts.view(name, &other);
                (other, inbound, outbound)
            })
            .collect();
        Links { cuts, conditions: self.conditions.egress_of(name) }
    }

    /// Keeps the run's history in `path` from now on (docs/report.md).
    pub fn journal_to(&mut self, path: &std::path::Path, scenario: &str) -> anyhow::Result<()> {
        self.journal = Some(Journal::create(path, self.world.started, scenario, self.backend.name())?);
        Ok(())
    }

    /// Ends the history: the checks are over, teardown follows.
    pub fn end_journal(&mut self) {
        if let Some(mut j) = self.journal.take() {
            j.finish(Instant::now());
        }
    }

    /// A mark on the timeline, also in the history.
    fn note(&mut self, peer: &str, kind: &str, detail: String) {
        let now = Instant::now();
        if let Some(j) = &mut self.journal {
            let entry =
                Entry::Mark { at_ms: j.at_ms(now), peer: peer.into(), kind: kind.into(), detail: detail.clone() };
            j.write(&entry);
        }
        self.world.mark_at(now, peer, kind, detail);
    }

    fn set_paused(&mut self, name: &str, paused: bool) {
        if let Some(j) = &mut self.journal {
            let at_ms = j.at_ms(Instant::now());
            j.write(&Entry::Paused { at_ms, peer: name.into(), paused });
        }
        self.world.set_paused(name, paused);
        self.note(name, if paused { "pause" } else { "resume" }, String::new());
    }

    fn process_started(&mut self, name: &str, instance: u32) {
        if let Some(j) = &mut self.journal {
            let at_ms = j.at_ms(Instant::now());
            j.write(&Entry::Start { at_ms, peer: name.into(), instance });
        }
        self.world.started(name, instance);
    }

    /// Gives every peer process its cuts and conditions.
    async fn push_links(&mut self) -> Result<(), LabError> {
        if let Some(j) = &mut self.journal {
            let at_ms = j.at_ms(Instant::now());
            j.write(&Entry::Cuts { at_ms, pairs: cut_pairs(&self.cuts) });
        }
        // Paused peers too: a packet filter takes effect at once, and a hook command waits in
        // the peer's stdin until it resumes (only live peers are expected to acknowledge).
        let processes: Vec<String> =
            self.world.names().filter(|n| self.world.peer(n).is_some_and(|p| p.running)).cloned().collect();
        for name in &processes {
            let links = self.links_of(name);
            self.backend.set_links(name, &links).await?;
        }
        Ok(())
    }

    /// Gives every peer process its cuts and conditions and, where the peers' hook applies
    /// them, waits until every live one says it has.
    async fn apply_cuts(&mut self) -> Result<(), LabError> {
        self.push_links().await?;
        if !self.backend.cuts_acknowledged_by_events() {
            return Ok(());
        }
        type Table = BTreeMap<String, String>;
        let expected: Vec<(String, Table, Table)> = self
            .world
            .running()
            .iter()
            .map(|n| {
                let links = self.links_of(n);
                let cuts =
                    links.cuts.into_iter().map(|(o, i, out)| (o, backend::direction(i, out).to_string())).collect();
                let conditions = links.conditions.into_iter().map(|(o, c)| (o, c.hook_words())).collect();
                (n.clone(), cuts, conditions)
            })
            .collect();
        let deadline = Instant::now() + self.scaled(PROCESS_DEADLINE);
        self.wait_until(deadline, "every peer to apply its cuts and conditions", |w| {
            expected.iter().find_map(|(n, cuts, conditions)| {
                let p = w.peer(n)?;
                (p.live() && (p.hook != *cuts || p.hook_conditions != *conditions))
                    .then(|| format!("{n} has not applied its cuts and conditions"))
            })
        })
        .await
    }

    /// Records every observation available now.
    fn pump(&mut self) {
        while let Ok(o) = self.events.try_recv() {
            self.record(o);
        }
    }

    fn record(&mut self, o: Observed) {
        if let Some(j) = &mut self.journal {
            j.observed(&o);
        }
        let at = o.at;
        if self.world.observe(o) {
            self.last_event_at = self.last_event_at.max(at);
        }
    }

    fn check_violations(&mut self) -> Result<(), LabError> {
        let all = self.world.violations();
        if let Some(v) = all.get(self.violations_reported) {
            self.violations_reported = all.len();
            return Err(LabError::Violation { peer: v.peer.clone(), what: v.what.clone() });
        }
        Ok(())
    }

    /// Waits until `pending` returns None (the condition holds), recording observations as
    /// they arrive. Past the deadline, fails with `expected` and the reason `pending` gives
    /// then. A broken rule ends the wait at once.
    ///
    /// The condition is asked again at most every twice the time it took to answer last (and
    /// at least every few milliseconds): at 256 peers a delivery check covers every line and
    /// receiver, and events would otherwise queue up behind it. Times a check returns come from
    /// the events themselves, so this delay does not show in them.
    async fn wait_until(
        &mut self,
        deadline: Instant,
        expected: impl Into<String>,
        mut pending: impl FnMut(&World) -> Option<String>,
    ) -> Result<(), LabError> {
        let mut next_check = Instant::now();
        loop {
            self.undo_due().await?;
            self.pump();
            self.check_violations()?;
            let now = Instant::now();
            if now >= next_check {
                if pending(&self.world).is_none() {
                    return Ok(());
                }
                let took = now.elapsed();
                next_check = Instant::now() + (took * 2).max(MIN_CHECK_INTERVAL);
            }
            let next_undo = self.undos.first().map(|(t, _)| *t);
            let wake = next_check.min(deadline).min(next_undo.unwrap_or(deadline));
            match tokio::time::timeout_at(wake.into(), self.events.recv()).await {
                Ok(Some(o)) => self.record(o),
                Err(_) if wake < deadline => {}
                Err(_) if next_undo.is_some_and(|t| t <= deadline) => {}
                Ok(None) | Err(_) => {
                    self.pump();
                    self.check_violations()?;
                    return match pending(&self.world) {
                        None => Ok(()),
                        Some(seen) => Err(LabError::Check { expected: expected.into(), seen }),
                    };
                }
            }
        }
    }
}

/// What the lab undoes by itself when its time comes.
#[derive(Debug, Clone, PartialEq)]
pub enum Undo {
    /// Heal these directed cuts.
    Heal(Vec<(String, String)>),
    /// Clear the conditions of these directed links.
    Clear(Vec<(String, String)>),
    Resume(String),
}

/// Delay and jitter need the netem qdisc, which this kernel lacks.
#[derive(Debug, thiserror::Error)]
#[error(
    "delay and jitter need the kernel's sch_netem queueing discipline, which this kernel lacks (CONFIG_NET_SCH_NETEM): use a kernel with it, or --backend process, whose peers delay their own frames (cooperative)"
)]
pub struct NoNetem;

fn describe_pairs(pairs: &[(String, String)]) -> String {
    let words: Vec<String> = pairs.iter().map(|(a, b)| format!("{a} -> {b}")).collect();
    words.join(", ")
}

/// The shortest time between two answers to the same pending check.
const MIN_CHECK_INTERVAL: Duration = Duration::from_millis(2);

/// Items a failed check lists.
const SUMMARISED: usize = 6;

/// None when there is nothing to report; otherwise the first few items (and that there are
/// more, when there are).
fn summarise(items: Vec<String>) -> Option<String> {
    match items.len() {
        0 => None,
        n if n <= SUMMARISED => Some(items.join("; ")),
        _ => Some(format!("{}; and more", items[..SUMMARISED].join("; "))),
    }
}
