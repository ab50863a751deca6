//! What a peer remembers of the conversation: per-sender watermarks and chains, and a bounded
//! history.
//!
//! Each sender (origin) has a watermark, the highest sequence number shown contiguously, and the
//! chain hash there ([`crate::chain`]). A batch of lines is shown when it continues the
//! watermark and its sender's signature on the batch's chain head checks out, whichever
//! neighbour relayed it; so no line is ever shown twice, each sender's lines appear in order,
//! and nobody but the sender can put words in its mouth. Batches that arrive early wait in a
//! bounded buffer. The history keeps recent lines (bounded in lines, bytes and age), with their
//! chain hashes and the signed heads, so that neighbours who missed some can be sent them
//! (anti-entropy, see docs/protocol.md). Lines can be declared gone only on their sender's own
//! signed word ([`Gone`]), which the store keeps and passes on.
//!
//! A sender is only known once met directly: its watermark and chain hash start at what its
//! (signed) hello announced, so a newcomer gets no backlog. Records of senders are bounded per
//! host and in all, and a connected member's record is never the one forgotten.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::chain::{self, ChainHash};
use crate::frame::{self, Gone, LineBody, Lines, MAX_DIGEST, Message, PeerInfo};
use crate::id::PeerId;
use crate::identity::{Identity, PublicKey, Signature};
use crate::state::OwnLine;

/// How much history a peer keeps for catch-up.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub lines: usize,
    pub bytes: usize,
    pub age: Duration,
}

/// Most senders remembered; the least recently active one not connected is forgotten first.
pub const MAX_ORIGINS: usize = 4096;
/// Most sender records introduced from one host (an IPv4 address or an IPv6 /64).
pub const MAX_ORIGINS_PER_HOST: usize = 64;
/// How far beyond a watermark an early batch may start and still wait in the buffer.
pub const PENDING_WINDOW: u64 = 10_000;
/// Overhead counted per stored line besides its text and name (its hash, signature, links).
const LINE_OVERHEAD: usize = 192;
/// Bytes counted per early batch besides its lines.
const PENDING_OVERHEAD: usize = 256;

/// One chat line as stored.
#[derive(Debug)]
pub struct Line {
    pub origin: PeerId,
    pub name: String,
    pub seq: u64,
    pub text: String,
    pub sent_at_ms: u64,
    /// The chain hash of this line.
    pub hash: ChainHash,
    /// The sender's signature on the chain head here, when a batch ended here.
    pub sig: Option<Signature>,
    /// Whether `sig` was checked. A batch that came straight from its sender, on a connection
    /// that proved the sender's key, is shown unchecked (the check is off a line's path); it is
    /// checked before it is ever relayed.
    checked: AtomicBool,
    stored: Instant,
}

impl Line {
    fn size(&self) -> usize {
        self.text.len() + self.name.len() + LINE_OVERHEAD
    }

    fn body(&self) -> LineBody {
        LineBody { seq: self.seq, text: self.text.clone(), at: self.sent_at_ms }
    }
}

/// A line ready to be shown, with how it arrived.
#[derive(Debug)]
pub struct Delivery {
    pub line: Arc<Line>,
    /// The neighbour it came from.
    pub via: PeerId,
    pub caught_up: bool,
}

#[derive(Debug)]
struct Pending {
    batch: Lines,
    via: PeerId,
    since: Instant,
    size: usize,
}

#[derive(Debug)]
struct Origin {
    key: PublicKey,
    /// Last known name and address, for display.
    name: String,
    addr: String,
    mark: u64,
    /// The chain hash at the watermark.
    head: ChainHash,
    /// Lines up to here were never held by this peer (it met the sender after them): it can
    /// neither send them nor say they are gone.
    floor: u64,
    lines: VecDeque<Arc<Line>>,
    /// Early batches, by their first sequence number.
    pending: BTreeMap<u64, Pending>,
    /// The sender's latest signed word that lines are gone, to pass on.
    gone: Option<Gone>,
    /// The highest sequence number the sender is known to have said (its hello, its probes,
    /// others' digests): a sender known to have said nothing is left out of digests.
    latest: u64,
    /// The host whose connection introduced this sender (None: restored from the state dir).
    host: Option<IpAddr>,
    last_active: Instant,
}

/// A statement its sender's signature does not back.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("not signed by its sender")]
pub struct Forged;

/// The outcome of receiving a batch of lines.
#[derive(Debug, Default)]
pub struct Received {
    /// Shown now, in order: this batch's new lines and any buffered ones it unblocked.
    pub delivered: Vec<Delivery>,
    /// What became of the batch itself.
    pub outcome: Outcome,
    /// Neighbours that relayed a batch whose signature does not check out (this one, or a
    /// buffered one that could be checked now).
    pub forged_by: Vec<PeerId>,
    /// Only some of the batch's new lines could be shown now: the rest must be asked for again.
    pub cut_short: bool,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub enum Outcome {
    #[default]
    Shown,
    /// Every line was shown before.
    Duplicate,
    /// Arrived early; waits for the lines before it.
    Buffered,
    /// From a sender this peer never met, or too far ahead, or no room to wait: ignored.
    Ignored,
    /// The signature does not check out.
    Forged,
}

/// What a neighbour's digest asks of us.
#[derive(Debug, Default)]
pub struct CatchUp {
    /// `lines` and `gone` messages to send it, in order.
    pub messages: Vec<Message>,
    /// Bytes those messages take, about.
    pub bytes: usize,
    /// The byte budget ran out before everything it lacks was listed: another round is needed.
    pub truncated: bool,
    /// The neighbour holds lines we lack: send it our digest so it sends them.
    pub they_are_ahead: bool,
    /// Senders whose own lines, shown as they came, turned out not signed by them when they
    /// were to be passed on: they are not, and the sender is a forger.
    pub forged_by: Vec<PeerId>,
}

/// A batch of lines this peer is about to say: recorded first, then stored and sent.
#[derive(Debug, Clone)]
pub struct Said {
    pub lines: Vec<OwnLine>,
}

pub struct Store {
    me: PeerId,
    retention: Retention,
    /// Boxed: a hash table keeps up to twice as many slots as entries, and an origin is
    /// hundreds of bytes.
    origins: HashMap<PeerId, Box<Origin>>,
    /// How many records each host introduced.
    per_host: HashMap<IpAddr, usize>,
    /// History in arrival order, for eviction; entries of forgotten origins are skipped.
    order: VecDeque<(PeerId, u64)>,
    lines: usize,
    bytes: usize,
    /// Early batches buffered, in bytes, in all and per neighbour that sent them.
    pending_bytes: usize,
    pending_by_via: HashMap<PeerId, usize>,
    /// This peer's own lines up to here left the history; their last chain hash.
    own_floor: (u64, ChainHash),
    /// Our signed word for `own_floor`, made when first asked for.
    own_gone: Option<Gone>,
    /// Bumped whenever a watermark moves, so digests are sent only when they changed.
    version: u64,
}

/// How a sender first met is set up.
pub struct Met<'a> {
    pub info: &'a PeerInfo,
    pub seq: u64,
    pub head: ChainHash,
    pub key: PublicKey,
    pub host: IpAddr,
}

impl Store {
    /// A store for `me`, whose own chain stands at `my_seq` with hash `my_head`.
    pub fn new(me: PeerId, my_seq: u64, my_head: ChainHash, retention: Retention, now: Instant) -> Store {
        let key = PublicKey::of(&me).expect("our own id is a key");
        let mut store = Store {
            me,
            retention,
            origins: HashMap::new(),
            per_host: HashMap::new(),
            order: VecDeque::new(),
            lines: 0,
            bytes: 0,
            pending_bytes: 0,
            pending_by_via: HashMap::new(),
            own_floor: (my_seq, my_head),
            own_gone: None,
            version: 0,
        };
        // A peer held every line it ever said: it may answer for all of them (sending those its
        // history still holds and its signed word that the rest are gone), so its floor is 0.
        let mut own = Origin::new(key, my_seq, my_head, None, now);
        own.floor = 0;
        store.origins.insert(me, own);
        store
    }

    pub fn my_seq(&self) -> u64 {
        self.origins[&self.me].mark
    }

    pub fn my_head(&self) -> ChainHash {
        self.origins[&self.me].head
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// The watermark and chain hash of every known sender (for the state directory).
    pub fn marks(&self) -> BTreeMap<PeerId, (u64, ChainHash)> {
        self.origins.iter().map(|(id, o)| (*id, (o.mark, o.head))).collect()
    }

    /// The watermark and chain hash of one sender.
    pub fn mark(&self, id: &PeerId) -> Option<(u64, ChainHash)> {
        self.origins.get(id).map(|o| (o.mark, o.head))
    }

    /// Whether this peer has a record of `id` (met it, and has not forgotten it).
    pub fn knows(&self, id: &PeerId) -> bool {
        self.origins.contains_key(id)
    }

    /// This peer's own lines still held, oldest first (for the state directory).
    pub fn own_lines(&self) -> Vec<OwnLine> {
        self.origins[&self.me].lines.iter().map(|l| own_line(l)).collect()
    }

    /// Where this peer's own lines that left the history end (for the state directory).
    pub fn own_floor(&self) -> (u64, ChainHash) {
        self.own_floor
    }

    /// Puts back lines this peer said before a restart, so that they can still be caught up.
    /// `floor` is where its lines that had left the history ended.
    pub fn restore_own(&mut self, lines: Vec<OwnLine>, floor: (u64, ChainHash), now: Instant) {
        self.own_floor = floor;
        for l in lines {
            let line = Arc::new(Line {
                origin: self.me,
                name: l.name,
                seq: l.seq,
                text: l.text,
                sent_at_ms: l.sent_at_ms,
                hash: l.hash,
                sig: l.sig,
                checked: AtomicBool::new(true),
                stored: now,
            });
            self.store(line);
        }
    }

    /// Restores a sender's watermark kept across a restart: lines up to it are not held here.
    pub fn restore_mark(&mut self, id: PeerId, mark: u64, head: ChainHash, now: Instant) {
        if id == self.me {
            return;
        }
        match PublicKey::of(&id) {
            Ok(key) => {
                self.origins.insert(id, Origin::new(key, mark, head, None, now));
            }
            Err(e) => tracing::warn!("ignoring a watermark in the state directory: {id:?}: {e}"),
        }
    }

    /// Prepares lines for this peer to say, in signed batches that each fit a frame. Nothing is
    /// stored yet: the caller records them, then hands them to [`Store::said`].
    pub fn compose(&self, me: &Identity, name: &str, texts: Vec<String>, at: u64) -> Vec<Said> {
        let own = &self.origins[&self.me];
        let (mut seq, mut head) = (own.mark, own.head);
        let mut batches = Vec::new();
        let mut current: Vec<OwnLine> = Vec::new();
        let mut cost = 0;
        for text in texts {
            let line_cost = frame::line_cost(&text);
            if !current.is_empty() && (current.len() == frame::MAX_BATCH || cost + line_cost > frame::LINES_BUDGET) {
                batches.push(seal(me, std::mem::take(&mut current)));
                cost = 0;
            }
            seq += 1;
            head = chain::next(&head, seq, at, name, &text);
            cost += line_cost;
            current.push(OwnLine { seq, name: name.to_owned(), text, sent_at_ms: at, hash: head, sig: None });
        }
        if !current.is_empty() {
            batches.push(seal(me, current));
        }
        batches
    }

    /// Stores a batch this peer said (recorded by now) and returns the message that sends it.
    pub fn said(&mut self, batch: Said, now: Instant) -> Lines {
        let last = batch.lines.last().expect("batches are not empty");
        let (seq, head, sig) = (last.seq, last.hash, last.sig.expect("batches are signed"));
        let name = last.name.clone();
        let bodies =
            batch.lines.iter().map(|l| LineBody { seq: l.seq, text: l.text.clone(), at: l.sent_at_ms }).collect();
        for l in batch.lines {
            let line = Arc::new(Line {
                origin: self.me,
                name: l.name,
                seq: l.seq,
                text: l.text,
                sent_at_ms: l.sent_at_ms,
                hash: l.hash,
                sig: l.sig,
                checked: AtomicBool::new(true),
                stored: now,
            });
            self.store(line);
        }
        let own = self.origins.get_mut(&self.me).expect("own origin always present");
        own.mark = seq;
        own.head = head;
        own.last_active = now;
        self.version += 1;
        Lines { origin: self.me, name, lines: bodies, sig, catch_up: false }
    }

    /// A sender met directly, with what its signed hello says. New senders start at its `seq`
    /// and chain hash. Returns whether the sender is new. Making room forgets the least active
    /// sender not `connected`, from the same host first.
    pub fn meet(&mut self, m: Met, connected: impl Fn(&PeerId) -> bool, now: Instant) -> bool {
        let id = m.info.id;
        let new = !self.origins.contains_key(&id);
        if new {
            let host = crate::addr::host_of(m.host);
            if self.per_host.get(&host).copied().unwrap_or(0) >= MAX_ORIGINS_PER_HOST {
                self.forget_least_active(Some(host), &connected);
            }
            if self.origins.len() >= MAX_ORIGINS {
                self.forget_least_active(None, &connected);
            }
            *self.per_host.entry(host).or_default() += 1;
            self.origins.insert(id, Origin::new(m.key, m.seq, m.head, Some(host), now));
            self.version += 1;
        }
        let o = self.origins.get_mut(&id).expect("inserted above");
        if !new && m.seq == o.mark && m.head != o.head {
            tracing::warn!(peer = %id.short(), seq = m.seq, "its chain differs from the one held here: its state was lost or copied");
        }
        o.last_active = now;
        o.name.clone_from(&m.info.name);
        o.addr.clone_from(&m.info.addr);
        new
    }

    /// Name and address of a sender, as last known.
    pub fn info(&self, id: &PeerId) -> PeerInfo {
        let (name, addr) = self.origins.get(id).map_or(("?", "?"), |o| (o.name.as_str(), o.addr.as_str()));
        PeerInfo { id: *id, name: name.into(), addr: addr.into() }
    }

    /// A batch of lines from neighbour `via`, of which at most `room` new lines may be shown
    /// now (its sender's flood limit): the batch is checked whole, its first new lines are shown
    /// and the rest left for a later round (`Received::cut_short`).
    pub fn receive(&mut self, batch: Lines, via: PeerId, room: usize, now: Instant) -> Received {
        let mut r = Received::default();
        let origin = batch.origin;
        if origin == self.me {
            r.outcome = Outcome::Duplicate;
            return r;
        }
        let Some(o) = self.origins.get_mut(&origin) else {
            r.outcome = Outcome::Ignored;
            return r;
        };
        o.last_active = now;
        if batch.last() <= o.mark {
            r.outcome = Outcome::Duplicate;
            return r;
        }
        if batch.first() > o.mark.saturating_add(1) {
            r.outcome = self.buffer(batch, via, now);
            return r;
        }
        r.outcome = match self.accept(batch, via, room, now) {
            Ok((delivered, cut_short)) => {
                r.cut_short = cut_short;
                r.delivered = delivered;
                Outcome::Shown
            }
            Err(Forged) => {
                r.forged_by.push(via);
                Outcome::Forged
            }
        };
        if !r.cut_short {
            self.drain_pending(&origin, now, &mut r);
        }
        r
    }

    /// A sender's word that its lines up to `gone.upto` are gone. Skips them if it is signed and
    /// goes beyond the watermark; returns how many lines were missed and the buffered lines this
    /// unblocks.
    pub fn skip(&mut self, gone: Gone, now: Instant) -> Result<Option<(u64, Received)>, Forged> {
        let origin = gone.origin;
        let Some(o) = self.origins.get_mut(&origin) else { return Ok(None) };
        if origin == self.me {
            return Ok(None);
        }
        if !chain::gone_is_signed(&o.key, gone.upto, &gone.head, &gone.sig) {
            return Err(Forged);
        }
        if o.gone.as_ref().is_none_or(|g| g.upto < gone.upto) {
            o.gone = Some(gone.clone());
        }
        if gone.upto <= o.mark {
            return Ok(None);
        }
        let missed = gone.upto - o.mark;
        o.mark = gone.upto;
        o.head = gone.head;
        // Buffered lines up to there can no longer be checked: they are missed too.
        let dropped: Vec<u64> =
            o.pending.iter().filter(|(_, p)| p.batch.last() <= gone.upto).map(|(first, _)| *first).collect();
        for first in dropped {
            self.unbuffer(&origin, first);
        }
        self.version += 1;
        let mut r = Received::default();
        self.drain_pending(&origin, now, &mut r);
        Ok(Some((missed, r)))
    }

    /// Our digest (of `only` these senders, whatever they said, or of all), split into frames
    /// of at most [`MAX_DIGEST`] senders. Of all, senders known to have said nothing are left
    /// out (so a mesh that has not chatted yet exchanges no digests at all), and so are senders
    /// silent for longer than the retention age: nobody holds their lines any more. Empty:
    /// nothing to send.
    pub fn digests(&self, now: Instant, only: Option<&[PeerId]>) -> Vec<Message> {
        let age = self.retention.age;
        let wanted = |id: &PeerId, o: &Origin| match only {
            Some(ids) => ids.contains(id),
            None => (*id == self.me || now.duration_since(o.last_active) <= age) && o.latest.max(o.mark) > 0,
        };
        let mut out = Vec::new();
        let mut have = BTreeMap::new();
        for (id, o) in self.origins.iter().filter(|(id, o)| wanted(id, o)) {
            have.insert(*id, o.mark);
            if have.len() == MAX_DIGEST {
                out.push(Message::Digest { have: std::mem::take(&mut have), follow: Vec::new() });
            }
        }
        if !have.is_empty() {
            out.push(Message::Digest { have, follow: Vec::new() });
        }
        out
    }

    /// A sender is known to have said lines up to `seq`.
    pub fn note_latest(&mut self, id: &PeerId, seq: u64) {
        if let Some(o) = self.origins.get_mut(id) {
            o.latest = o.latest.max(seq);
        }
    }

    /// Whether `id` is a sender heard of within `age`.
    pub fn active_within(&self, id: &PeerId, age: Duration, now: Instant) -> bool {
        self.origins.get(id).is_some_and(|o| now.duration_since(o.last_active) <= age)
    }

    /// `lines` messages (checked, ending at signed heads) of `origin`'s held lines from `from`
    /// on: for passing new lines on to a neighbour that follows the sender.
    pub fn lines_from(&self, origin: &PeerId, from: u64, budget: usize) -> CatchUp {
        let mut out = CatchUp::default();
        if let Some(o) = self.origins.get(origin) {
            let start = o.lines.partition_point(|l| l.seq < from);
            out.truncated = !send_lines(o, start, budget, &mut out);
        }
        out
    }

    /// Answers neighbour `to`'s digest: what it lacks that we hold (up to about `budget` bytes
    /// as sent), and whether it is ahead. Our own gone statement is signed with `me` if needed.
    pub fn catch_up_for(
        &mut self,
        to: &PeerId,
        theirs: &BTreeMap<PeerId, u64>,
        budget: usize,
        me: &Identity,
    ) -> CatchUp {
        let mut out = CatchUp::default();
        for (id, &their_mark) in theirs {
            let Some(o) = self.origins.get_mut(id) else { continue };
            if their_mark > o.mark {
                o.latest = o.latest.max(their_mark);
                out.they_are_ahead = true;
                continue;
            }
            let o = &self.origins[id];
            if id == to {
                continue; // its own lines: it knows them better
            }
            // Below our floor we never held anything: others must answer for those lines.
            let mut from = their_mark.max(o.floor);
            if from >= o.mark {
                continue;
            }
            let lowest = o.lines.front().map_or(o.mark.saturating_add(1), |l| l.seq);
            if from + 1 < lowest {
                // We no longer hold the next line it needs: pass on the sender's word that it is
                // gone, if we have one that reaches beyond what it holds.
                let gone = if *id == self.me { self.own_gone(me) } else { o.gone.clone() };
                if let Some(g) = gone.filter(|g| g.upto > from) {
                    from = g.upto;
                    out.bytes += 300;
                    out.messages.push(Message::Gone(g));
                }
            }
            let o = &self.origins[id];
            let lowest = o.lines.front().map_or(o.mark.saturating_add(1), |l| l.seq);
            if from + 1 < lowest || from >= o.mark {
                continue;
            }
            let start = o.lines.partition_point(|l| l.seq <= from);
            if !send_lines(o, start, budget, &mut out) {
                out.truncated = true;
                return out;
            }
        }
        out
    }

    /// Our signed word that our lines up to the floor are gone, signed once per floor.
    fn own_gone(&mut self, me: &Identity) -> Option<Gone> {
        let (upto, head) = self.own_floor;
        if upto == 0 {
            return None;
        }
        if self.own_gone.as_ref().is_none_or(|g| g.upto != upto) {
            let sig = chain::sign_gone(me, upto, &head);
            self.own_gone = Some(Gone { origin: self.me, upto, head, sig });
        }
        self.own_gone.clone()
    }

    /// Drops history, and early batches still waiting, older than the retention age.
    pub fn expire(&mut self, now: Instant) {
        let age = self.retention.age;
        // Nothing buffered is the usual case: then no walk over every sender.
        if self.pending_bytes > 0 {
            let stale: Vec<(PeerId, u64)> = self
                .origins
                .iter()
                .flat_map(|(id, o)| {
                    let stale = o.pending.iter().filter(|(_, p)| now.duration_since(p.since) > age);
                    stale.map(move |(first, _)| (*id, *first))
                })
                .collect();
            for (id, first) in stale {
                self.unbuffer(&id, first);
            }
        }
        while let Some((id, seq)) = self.order.front() {
            let stale = match self.origins.get(id).and_then(|o| o.lines.front()) {
                Some(line) if line.seq == *seq => now.duration_since(line.stored) > self.retention.age,
                _ => true,
            };
            if !stale {
                break;
            }
            self.evict_oldest();
        }
    }

    /// Lines held in history.
    #[cfg(test)]
    fn held(&self) -> usize {
        self.lines
    }

    /// Checks a batch that continues the watermark and shows its first `room` new lines (all of
    /// them, at most). Returns them, and whether some were left out.
    /// A batch straight from its sender is not checked now (see [`Line::checked`]).
    fn accept(
        &mut self,
        batch: Lines,
        via: PeerId,
        room: usize,
        now: Instant,
    ) -> Result<(Vec<Delivery>, bool), Forged> {
        let direct = via == batch.origin;
        let o = self.origins.get_mut(&batch.origin).expect("checked by the caller");
        let skip = (o.mark + 1 - batch.first()) as usize;
        let mut head = o.head;
        let hashes: Vec<ChainHash> = batch.lines[skip..]
            .iter()
            .map(|l| {
                head = chain::next(&head, l.seq, l.at, &batch.name, &l.text);
                head
            })
            .collect();
        if !direct && !chain::head_is_signed(&o.key, batch.last(), &head, &batch.sig) {
            return Err(Forged);
        }
        let taken = hashes.len().min(room);
        if taken == 0 {
            return Ok((Vec::new(), true));
        }
        let (first, last) = (batch.first(), batch.last());
        o.mark = first + (skip + taken) as u64 - 1;
        o.head = hashes[taken - 1];
        o.name.clone_from(&batch.name);
        self.version += 1;
        let mut out = Vec::with_capacity(taken);
        for (body, hash) in batch.lines.into_iter().skip(skip).zip(hashes).take(taken) {
            let line = Arc::new(Line {
                origin: batch.origin,
                name: batch.name.clone(),
                seq: body.seq,
                text: body.text,
                sent_at_ms: body.at,
                hash,
                sig: (body.seq == last).then_some(batch.sig),
                checked: AtomicBool::new(!direct),
                stored: now,
            });
            self.store(line.clone());
            out.push(Delivery { line, via, caught_up: batch.catch_up });
        }
        Ok((out, taken < (last - first + 1) as usize - skip))
    }

    /// Keeps an early batch until the lines before it arrive, if there is room.
    fn buffer(&mut self, batch: Lines, via: PeerId, now: Instant) -> Outcome {
        let size = PENDING_OVERHEAD + batch.lines.iter().map(|l| l.text.len()).sum::<usize>();
        let budget = self.retention.bytes;
        // One neighbour may fill an eighth of the buffer: a hostile one cannot starve the rest.
        let theirs = self.pending_by_via.get(&via).copied().unwrap_or(0);
        let o = self.origins.get_mut(&batch.origin).expect("checked by the caller");
        let too_far = batch.first() - o.mark > PENDING_WINDOW;
        if too_far || self.pending_bytes + size > budget || theirs + size > budget / 8 {
            return Outcome::Ignored;
        }
        let first = batch.first();
        if o.pending.get(&first).is_some_and(|p| p.batch.last() >= batch.last()) {
            return Outcome::Buffered;
        }
        if let Some(old) = o.pending.insert(first, Pending { batch, via, since: now, size }) {
            self.release(&old);
        }
        self.pending_bytes += size;
        *self.pending_by_via.entry(via).or_default() += size;
        Outcome::Buffered
    }

    fn unbuffer(&mut self, origin: &PeerId, first: u64) -> Option<Pending> {
        let p = self.origins.get_mut(origin)?.pending.remove(&first)?;
        self.release(&p);
        Some(p)
    }

    fn release(&mut self, p: &Pending) {
        self.pending_bytes -= p.size;
        if let Some(n) = self.pending_by_via.get_mut(&p.via) {
            *n -= p.size;
            if *n == 0 {
                self.pending_by_via.remove(&p.via);
            }
        }
    }

    /// Shows buffered batches that continue the watermark now, in order.
    fn drain_pending(&mut self, origin: &PeerId, now: Instant, r: &mut Received) {
        loop {
            let Some(o) = self.origins.get(origin) else { return };
            let next = o.mark.saturating_add(1);
            let Some(first) = o.pending.range(..=next).next().map(|(first, _)| *first) else { return };
            let p = self.unbuffer(origin, first).expect("listed above");
            if p.batch.last() <= self.origins[origin].mark {
                continue;
            }
            match self.accept(p.batch, p.via, usize::MAX, now) {
                Ok((shown, _)) => r.delivered.extend(shown),
                Err(Forged) => r.forged_by.push(p.via),
            }
        }
    }

    fn store(&mut self, line: Arc<Line>) {
        self.lines += 1;
        self.bytes += line.size();
        self.order.push_back((line.origin, line.seq));
        let o = self.origins.get_mut(&line.origin).expect("stored lines have an origin");
        o.lines.push_back(line);
        while self.lines > self.retention.lines || self.bytes > self.retention.bytes {
            self.evict_oldest();
        }
        if self.order.len() > 2 * self.retention.lines.max(16) {
            self.compact_order();
        }
    }

    /// Removes the oldest entry of the history order (and its line, if still held).
    fn evict_oldest(&mut self) {
        let Some((id, seq)) = self.order.pop_front() else { return };
        let Some(o) = self.origins.get_mut(&id) else { return };
        if o.lines.front().is_some_and(|l| l.seq == seq) {
            let line = o.lines.pop_front().expect("front checked");
            self.lines -= 1;
            self.bytes -= line.size();
            if id == self.me {
                self.own_floor = (line.seq, line.hash);
            }
        }
    }

    fn compact_order(&mut self) {
        let origins = &self.origins;
        self.order
            .retain(|(id, seq)| origins.get(id).is_some_and(|o| o.lines.binary_search_by_key(seq, |l| l.seq).is_ok()))
    }

    /// Forgets the least recently active sender (of `host`, if given) that is not connected.
    fn forget_least_active(&mut self, host: Option<IpAddr>, connected: &impl Fn(&PeerId) -> bool) {
        let victim = self
            .origins
            .iter()
            .filter(|(id, o)| **id != self.me && !connected(id) && host.is_none_or(|h| o.host == Some(h)))
            .min_by_key(|(_, o)| o.last_active)
            .map(|(id, _)| *id);
        let Some(id) = victim else { return };
        let firsts: Vec<u64> = self.origins[&id].pending.keys().copied().collect();
        for first in firsts {
            self.unbuffer(&id, first);
        }
        let o = self.origins.remove(&id).expect("victim exists");
        self.lines -= o.lines.len();
        self.bytes -= o.lines.iter().map(|l| l.size()).sum::<usize>();
        if let Some(h) = o.host
            && let Some(n) = self.per_host.get_mut(&h)
        {
            *n -= 1;
            if *n == 0 {
                self.per_host.remove(&h);
            }
        }
    }
}

impl Origin {
    fn new(key: PublicKey, mark: u64, head: ChainHash, host: Option<IpAddr>, now: Instant) -> Box<Origin> {
        Box::new(Origin {
            key,
            name: "?".into(),
            addr: "?".into(),
            mark,
            head,
            floor: mark,
            lines: VecDeque::new(),
            pending: BTreeMap::new(),
            gone: None,
            latest: mark,
            host,
            last_active: now,
        })
    }
}

/// Signs the head of a batch of own lines.
fn seal(me: &Identity, mut lines: Vec<OwnLine>) -> Said {
    let last = lines.last_mut().expect("batches are not empty");
    last.sig = Some(chain::sign_head(me, last.seq, &last.hash));
    Said { lines }
}

fn own_line(l: &Line) -> OwnLine {
    OwnLine {
        seq: l.seq,
        name: l.name.clone(),
        text: l.text.clone(),
        sent_at_ms: l.sent_at_ms,
        hash: l.hash,
        sig: l.sig,
    }
}

/// Whether a held line ends a batch whose signature checks out (checked now if it came
/// straight from its sender unchecked). A signature that fails makes `out` name the sender.
fn signed_head(o: &Origin, line: &Line, out: &mut CatchUp) -> bool {
    let Some(sig) = &line.sig else { return false };
    if line.checked.load(Ordering::Relaxed) {
        return true;
    }
    if chain::head_is_signed(&o.key, line.seq, &line.hash, sig) {
        line.checked.store(true, Ordering::Relaxed);
        return true;
    }
    if !out.forged_by.contains(&line.origin) {
        out.forged_by.push(line.origin);
    }
    false
}

/// Adds `lines` messages for `o`'s held lines from index `start`, each ending at a signed head
/// and fitting a frame, while the budget lasts. Returns false when the budget ran out first.
fn send_lines(o: &Origin, start: usize, budget: usize, out: &mut CatchUp) -> bool {
    let held = &o.lines;
    let mut from = start;
    while from < held.len() {
        // The longest run from `from` that ends at a signed head and fits a frame and the budget.
        let (mut cost, mut end, mut over_budget) = (0, None, false);
        for (i, line) in held.iter().enumerate().skip(from) {
            cost += frame::line_cost(&line.text);
            if cost > frame::LINES_BUDGET || i - from >= frame::MAX_BATCH {
                break;
            }
            if out.bytes + cost + 512 > budget {
                over_budget = true;
                break;
            }
            if signed_head(o, line, out) {
                end = Some((i, cost));
            }
        }
        let Some((end, cost)) = end else { return !over_budget };
        let last = &held[end];
        out.bytes += cost + 512;
        out.messages.push(Message::Lines(Lines {
            origin: last.origin,
            name: last.name.clone(),
            lines: held.range(from..=end).map(|l| l.body()).collect(),
            sig: last.sig.expect("ends at a signed head"),
            catch_up: true,
        }));
        from = end + 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    const RET: Retention = Retention { lines: 100, bytes: 1 << 20, age: Duration::from_secs(600) };
    const HOST: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    /// A sender with its own store, to say lines as it would.
    struct Sender {
        me: Identity,
        store: Store,
    }

    impl Sender {
        fn new() -> Sender {
            let me = Identity::generate();
            let store = Store::new(me.id(), 0, chain::genesis(&me.id()), RET, Instant::now());
            Sender { me, store }
        }

        fn id(&self) -> PeerId {
            self.me.id()
        }

        /// Says lines, one batch per call (or several if they do not fit a frame).
        fn say(&mut self, texts: &[&str]) -> Vec<Lines> {
            let texts = texts.iter().map(|t| t.to_string()).collect();
            let batches = self.store.compose(&self.me, "sender", texts, 1);
            batches.into_iter().map(|b| self.store.said(b, Instant::now())).collect()
        }

        fn one(&mut self, texts: &[&str]) -> Lines {
            let mut v = self.say(texts);
            assert_eq!(v.len(), 1);
            v.remove(0)
        }
    }

    fn receiver() -> (Store, Identity) {
        let me = Identity::generate();
        (Store::new(me.id(), 0, chain::genesis(&me.id()), RET, Instant::now()), me)
    }

    fn meet(store: &mut Store, s: &Sender) {
        let info = PeerInfo { id: s.id(), name: "sender".into(), addr: "127.0.0.1:1".into() };
        let (seq, head) = (s.store.my_seq(), s.store.my_head());
        let m = Met { info: &info, seq, head, key: PublicKey::of(&s.id()).unwrap(), host: HOST };
        store.meet(m, |_| false, Instant::now());
    }

    fn shown(r: &Received) -> Vec<u64> {
        r.delivered.iter().map(|d| d.line.seq).collect()
    }

    #[test]
    fn shows_each_line_once_and_in_order_whoever_relays_it() {
        let (mut s, _) = receiver();
        let mut alice = Sender::new();
        meet(&mut s, &alice);
        let (b1, b2, b3) = (alice.one(&["1"]), alice.one(&["2", "3"]), alice.one(&["4"]));
        let now = Instant::now();
        let relay = Identity::generate().id();
        assert_eq!(shown(&s.receive(b1.clone(), alice.id(), usize::MAX, now)), vec![1]);
        assert_eq!(s.receive(b1, relay, usize::MAX, now).outcome, Outcome::Duplicate);
        assert_eq!(s.receive(b3.clone(), alice.id(), usize::MAX, now).outcome, Outcome::Buffered);
        let r = s.receive(b2, relay, usize::MAX, now);
        assert_eq!(shown(&r), vec![2, 3, 4], "the early batch follows at once");
        assert_eq!(s.receive(b3, alice.id(), usize::MAX, now).outcome, Outcome::Duplicate);
    }

    #[test]
    fn a_batch_checked_whole_can_be_shown_in_part_and_the_rest_later() {
        let (mut s, _) = receiver();
        let mut alice = Sender::new();
        meet(&mut s, &alice);
        let (b, later) = (alice.one(&["1", "2", "3", "4", "5"]), alice.one(&["6"]));
        let now = Instant::now();
        let r = s.receive(b.clone(), alice.id(), 2, now);
        assert_eq!((shown(&r), r.cut_short), (vec![1, 2], true));
        assert_eq!(s.receive(later.clone(), alice.id(), usize::MAX, now).outcome, Outcome::Buffered);
        let r = s.receive(b, alice.id(), usize::MAX, now);
        assert_eq!((shown(&r), r.cut_short), (vec![3, 4, 5, 6], false), "the rest checks out from line 2's hash");
        let mut forged = alice.one(&["7", "8"]);
        forged.lines[1].text = "eight".into();
        let relay = Identity::generate().id();
        let r = s.receive(forged, relay, 1, now);
        assert_eq!(r.outcome, Outcome::Forged, "checked whole even when only one line may be shown");
        assert!(shown(&r).is_empty());
    }

    #[test]
    fn forged_altered_or_reordered_lines_are_refused() {
        let (mut s, _) = receiver();
        let mut alice = Sender::new();
        meet(&mut s, &alice);
        let genuine = alice.one(&["pay alice", "thanks"]);
        let now = Instant::now();
        let mallory = Identity::generate().id();
        let mut altered = genuine.clone();
        altered.lines[0].text = "pay mallory".into();
        let mut renamed = genuine.clone();
        renamed.name = "alice2".into();
        let mut swapped = genuine.clone();
        swapped.lines.swap(0, 1);
        swapped.lines[0].seq = 1;
        swapped.lines[1].seq = 2;
        let mut truncated = genuine.clone();
        truncated.lines.pop();
        for bad in [altered, renamed, swapped, truncated] {
            let r = s.receive(bad, mallory, usize::MAX, now);
            assert_eq!((r.outcome, r.forged_by), (Outcome::Forged, vec![mallory]));
        }
        // A batch made up by someone else, signed with another key.
        let mut impostor = Sender::new();
        let mut made_up = impostor.one(&["hello"]);
        made_up.origin = alice.id();
        assert_eq!(s.receive(made_up, mallory, usize::MAX, now).outcome, Outcome::Forged);
        assert_eq!(
            shown(&s.receive(genuine, alice.id(), usize::MAX, now)),
            vec![1, 2],
            "the real lines still get through"
        );
    }

    #[test]
    fn a_senders_own_batch_is_shown_unchecked_but_checked_before_it_is_passed_on() {
        let (mut s, me) = receiver();
        let mut alice = Sender::new();
        meet(&mut s, &alice);
        let now = Instant::now();
        let good = alice.one(&["fine"]);
        let mut bad = alice.one(&["tampered on the way"]);
        bad.lines[0].text = "injected".into();
        assert_eq!(shown(&s.receive(good, alice.id(), usize::MAX, now)), vec![1]);
        assert_eq!(shown(&s.receive(bad, alice.id(), usize::MAX, now)), vec![2], "straight from alice: shown");
        let asker = Identity::generate().id();
        let c = s.catch_up_for(&asker, &[(alice.id(), 0)].into(), usize::MAX, &me);
        let sent: Vec<u64> = c
            .messages
            .iter()
            .flat_map(|m| match m {
                Message::Lines(b) => b.lines.iter().map(|l| l.seq).collect(),
                _ => vec![],
            })
            .collect();
        assert_eq!(sent, vec![1], "the line that does not check out is never passed on");
        assert_eq!(c.forged_by, vec![alice.id()]);
    }

    #[test]
    fn a_forged_early_batch_is_caught_when_it_can_be_checked() {
        let (mut s, _) = receiver();
        let mut alice = Sender::new();
        meet(&mut s, &alice);
        let (b1, mut b2) = (alice.one(&["1"]), alice.one(&["2"]));
        b2.lines[0].text = "forged".into();
        let mallory = Identity::generate().id();
        let now = Instant::now();
        assert_eq!(s.receive(b2, mallory, usize::MAX, now).outcome, Outcome::Buffered);
        let r = s.receive(b1, alice.id(), usize::MAX, now);
        assert_eq!((shown(&r), r.forged_by), (vec![1], vec![mallory]));
    }

    #[test]
    fn unknown_senders_and_far_future_batches_are_ignored() {
        let (mut s, _) = receiver();
        let mut alice = Sender::new();
        let now = Instant::now();
        let b = alice.one(&["x"]);
        assert_eq!(s.receive(b.clone(), alice.id(), usize::MAX, now).outcome, Outcome::Ignored, "never met");
        meet(&mut s, &alice);
        let mut far = b;
        far.lines[0].seq = u64::MAX;
        assert_eq!(s.receive(far, alice.id(), usize::MAX, now).outcome, Outcome::Ignored);
    }

    #[test]
    fn a_newcomer_starts_at_the_announced_seq_and_checks_from_there() {
        let mut alice = Sender::new();
        let early = alice.one(&["before we met"]);
        let (mut s, _) = receiver();
        meet(&mut s, &alice);
        let now = Instant::now();
        assert_eq!(s.receive(early, alice.id(), usize::MAX, now).outcome, Outcome::Duplicate);
        assert_eq!(shown(&s.receive(alice.one(&["after"]), alice.id(), usize::MAX, now)), vec![2]);
    }

    #[test]
    fn catch_up_sends_what_the_other_side_lacks_in_signed_batches() {
        let (mut s, me) = receiver();
        let mut alice = Sender::new();
        meet(&mut s, &alice);
        let now = Instant::now();
        for texts in [&["1"][..], &["2", "3"], &["4", "5"]] {
            s.receive(alice.one(texts), alice.id(), usize::MAX, now);
        }
        let mine = s.compose(&me, "me", vec!["mine".into()], 0);
        s.said(mine.into_iter().next().unwrap(), now);
        let stranger = Identity::generate().id();
        let asker = Identity::generate().id();
        let theirs: BTreeMap<_, _> = [(alice.id(), 2), (me.id(), 0), (stranger, 9)].into();
        let c = s.catch_up_for(&asker, &theirs, usize::MAX, &me);
        assert!(!c.they_are_ahead);
        // A fresh receiver that had alice up to 2 and met us at 0 takes it all.
        let (mut other, _) = receiver();
        let info = PeerInfo { id: alice.id(), name: "sender".into(), addr: "x:1".into() };
        let seq2 = chain::next(&chain::next(&chain::genesis(&alice.id()), 1, 1, "sender", "1"), 2, 1, "sender", "2");
        let key = PublicKey::of(&alice.id()).unwrap();
        other.meet(Met { info: &info, seq: 2, head: seq2, key, host: HOST }, |_| false, now);
        let info = PeerInfo { id: me.id(), name: "me".into(), addr: "x:2".into() };
        let m = Met {
            info: &info,
            seq: 0,
            head: chain::genesis(&me.id()),
            key: PublicKey::of(&me.id()).unwrap(),
            host: HOST,
        };
        other.meet(m, |_| false, now);
        let mut got = Vec::new();
        for m in c.messages {
            let Message::Lines(b) = m else { panic!("only lines expected") };
            assert!(b.catch_up);
            got.extend(shown(&other.receive(b, s.me, usize::MAX, now)));
        }
        got.sort();
        assert_eq!(got, vec![1, 3, 4, 5], "alice's 3, 4, 5 (3 starts mid-batch), and our line");
        let ahead: BTreeMap<_, _> = [(alice.id(), 9)].into();
        assert!(s.catch_up_for(&asker, &ahead, usize::MAX, &me).they_are_ahead);
        // A sender is never sent its own lines, but saying it has more of them counts.
        let c = s.catch_up_for(&alice.id(), &ahead, usize::MAX, &me);
        assert!(c.they_are_ahead && c.messages.is_empty());
        let c = s.catch_up_for(&alice.id(), &[(alice.id(), 0)].into(), usize::MAX, &me);
        assert!(c.messages.is_empty(), "its own lines are not sent back to it");
    }

    #[test]
    fn only_the_sender_can_say_its_lines_are_gone() {
        let now = Instant::now();
        let ret = Retention { lines: 3, ..RET };
        let mut alice = Sender::new();
        alice.store = Store::new(alice.id(), 0, chain::genesis(&alice.id()), ret, now);
        let (mut s, _) = receiver();
        meet(&mut s, &alice);
        for i in 1..=5 {
            alice.say(&[&i.to_string()]);
        }
        // alice holds 3..=5 and signs that 1..=2 are gone.
        let c = alice.store.catch_up_for(&s.me, &[(alice.id(), 0)].into(), usize::MAX, &alice.me.clone());
        let Message::Gone(gone) = &c.messages[0] else { panic!("{:?}", c.messages) };
        assert_eq!(gone.upto, 2);
        let mallory = Identity::generate();
        let mut forged = gone.clone();
        forged.upto = 4;
        assert!(s.skip(forged, now).is_err(), "a relayer cannot stretch it");
        let mut claim = gone.clone();
        claim.sig = mallory.sign(crate::identity::Domain::Gone, &[&4u64.to_be_bytes(), &gone.head.0]);
        assert!(s.skip(claim, now).is_err(), "nor sign one itself");
        let (missed, _) = s.skip(gone.clone(), now).unwrap().unwrap();
        assert_eq!(missed, 2);
        let mut shown_now = 0;
        for m in &c.messages[1..] {
            let Message::Lines(b) = m else { panic!() };
            shown_now += shown(&s.receive(b.clone(), alice.id(), usize::MAX, now)).len();
        }
        assert_eq!(shown_now, 3, "3..=5 check out from the gone statement's hash");
        // We keep alice's word and pass it on to whoever is further behind.
        let (me2, asker) = (Identity::generate(), Identity::generate().id());
        let c = s.catch_up_for(&asker, &[(alice.id(), 0)].into(), usize::MAX, &me2);
        assert!(matches!(&c.messages[0], Message::Gone(g) if g == gone));
    }

    #[test]
    fn a_peer_never_speaks_for_lines_below_its_floor() {
        let mut alice = Sender::new();
        for i in 1..=10 {
            alice.say(&[&i.to_string()]);
        }
        let (mut s, me) = receiver();
        meet(&mut s, &alice); // met at 10
        let now = Instant::now();
        s.receive(alice.one(&["11", "12"]), alice.id(), usize::MAX, now);
        let asker = Identity::generate().id();
        let c = s.catch_up_for(&asker, &[(alice.id(), 5)].into(), usize::MAX, &me);
        // 11..=12 go (the asker keeps them until someone bridges 6..=10); no word on 6..=10.
        assert!(
            matches!(&c.messages[..], [Message::Lines(b)] if b.first() == 11 && b.last() == 12),
            "{:?}",
            c.messages
        );
    }

    #[test]
    fn catch_up_is_bounded_by_the_budget_in_bytes_as_sent() {
        let (mut s, me) = receiver();
        let mut alice = Sender::new();
        meet(&mut s, &alice);
        let now = Instant::now();
        for i in 0..50 {
            s.receive(alice.one(&[&"\x01".repeat(100 + i)]), alice.id(), usize::MAX, now);
        }
        let asker = Identity::generate().id();
        let c = s.catch_up_for(&asker, &[(alice.id(), 0)].into(), 10 * 700, &me);
        assert!(c.truncated);
        let sent: usize = c.messages.iter().map(|m| m.encode().len()).sum();
        assert!(sent <= 10 * 700, "{sent} bytes queued for a budget of 7000");
        assert!(!c.messages.is_empty());
    }

    #[test]
    fn large_sayings_are_split_into_batches_that_fit_a_frame() {
        let mut alice = Sender::new();
        let texts: Vec<String> = (0..20).map(|_| "\x01".repeat(frame::MAX_TEXT)).collect();
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let batches = alice.say(&refs);
        assert!(batches.len() >= 20 * 8 * 6 / 64, "{} batches", batches.len());
        for b in &batches {
            assert!(Message::Lines(b.clone()).encode().len() + crate::noise::TAG <= frame::MAX_FRAME);
        }
        let many: Vec<&str> = vec!["x"; 1000];
        assert_eq!(alice.say(&many).len(), 1000usize.div_ceil(frame::MAX_BATCH));
    }

    #[test]
    fn history_is_bounded_by_lines_bytes_and_age_and_the_floor_follows() {
        let now = Instant::now();
        let ret = Retention { lines: 1000, bytes: 10 * (LINE_OVERHEAD + 8 + 6), age: Duration::from_secs(5) };
        let me = Identity::generate();
        let mut s = Store::new(me.id(), 0, chain::genesis(&me.id()), ret, now);
        for i in 0..100 {
            let b = s.compose(&me, "sender", vec![format!("{i:08}")], 0);
            s.said(b.into_iter().next().unwrap(), now);
        }
        assert!(s.held() <= 10);
        assert_eq!(s.own_floor().0, 100 - s.held() as u64);
        s.expire(now + Duration::from_secs(6));
        assert_eq!(s.held(), 0);
        assert_eq!((s.my_seq(), s.own_floor().0), (100, 100));
    }

    #[test]
    fn records_are_bounded_per_host_and_connected_members_are_never_forgotten() {
        let now = Instant::now();
        let (mut s, _) = receiver();
        let member = Sender::new();
        meet(&mut s, &member);
        let attacker: IpAddr = "10.9.9.9".parse().unwrap();
        for _ in 0..(MAX_ORIGINS + 500) {
            let id = Identity::generate().id();
            let info = PeerInfo { id, name: "sybil".into(), addr: "10.9.9.9:1".into() };
            let m = Met {
                info: &info,
                seq: 0,
                head: chain::genesis(&id),
                key: PublicKey::of(&id).unwrap(),
                host: attacker,
            };
            s.meet(m, |id| *id == member.id(), now);
        }
        assert!(s.knows(&member.id()), "the connected member's record stays");
        assert!(s.origins.len() <= MAX_ORIGINS_PER_HOST + 2, "{} records", s.origins.len());
    }

    #[test]
    fn early_batches_are_bounded_per_neighbour_and_expire() {
        let now = Instant::now();
        let me = Identity::generate();
        let ret = Retention { lines: 1000, bytes: 8 * 1024, age: Duration::from_secs(5) };
        let mut s = Store::new(me.id(), 0, chain::genesis(&me.id()), ret, now);
        let mut alice = Sender::new();
        meet(&mut s, &alice);
        let batches: Vec<Lines> = (0..40).map(|_| alice.one(&[&"y".repeat(100)])).collect();
        let hostile = Identity::generate().id();
        let buffered = batches[1..]
            .iter()
            .filter(|b| s.receive((*b).clone(), hostile, usize::MAX, now).outcome == Outcome::Buffered)
            .count();
        assert!(buffered <= 3, "one neighbour holds at most an eighth of the buffer: {buffered}");
        let other = Identity::generate().id();
        assert_eq!(
            s.receive(batches[39].clone(), other, usize::MAX, now).outcome,
            Outcome::Buffered,
            "others still have room"
        );
        s.expire(now + Duration::from_secs(6));
        assert_eq!(s.pending_bytes, 0);
        assert!(s.pending_by_via.is_empty());
    }
}
