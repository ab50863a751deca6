//! What a peer remembers of the conversation: per-sender watermarks and a bounded history.
//!
//! Each sender (origin) has a watermark, the highest sequence number shown contiguously. A line
//! is shown when its number is the watermark plus one, so no line is ever shown twice and each
//! sender's lines appear in order; lines that arrive early wait in a small per-sender buffer.
//! The history keeps recent lines (bounded in lines, bytes and age) so that neighbours who
//! missed some can be sent them (anti-entropy, see docs/protocol.md). Peers exchange digests
//! (sender → watermark); [`Store::catch_up_for`] answers one with what the other side lacks.
//!
//! A sender is only known once met directly: its watermark starts at the sequence number it
//! announced in its hello, so a newcomer gets no backlog.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::frame::{Chat, MAX_DIGEST, Message, PeerInfo};
use crate::id::PeerId;

/// How much history a peer keeps for catch-up.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    pub lines: usize,
    pub bytes: usize,
    pub age: Duration,
}

/// Most senders remembered; the least recently active is forgotten first.
pub const MAX_ORIGINS: usize = 4096;
/// How far beyond a watermark an early line may be and still wait in the buffer.
pub const PENDING_WINDOW: u64 = 10_000;
/// Overhead counted per stored line besides its text and name.
const LINE_OVERHEAD: usize = 96;

/// One chat line as stored.
#[derive(Debug)]
pub struct Line {
    pub origin: PeerId,
    pub name: String,
    pub seq: u64,
    pub text: String,
    pub sent_at_ms: u64,
    stored: Instant,
}

impl Line {
    fn size(&self) -> usize {
        self.text.len() + self.name.len() + LINE_OVERHEAD
    }

    pub fn to_message(&self, catch_up: bool) -> Message {
        Message::Chat(Chat {
            origin: self.origin.clone(),
            name: self.name.clone(),
            seq: self.seq,
            text: self.text.clone(),
            sent_at_ms: self.sent_at_ms,
            catch_up,
        })
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
    chat: Chat,
    via: PeerId,
    since: Instant,
}

impl Pending {
    fn size(&self) -> usize {
        self.chat.text.len() + self.chat.name.len() + LINE_OVERHEAD
    }
}

#[derive(Debug)]
struct Origin {
    /// Last known name and address, for display.
    name: String,
    addr: String,
    mark: u64,
    /// Lines up to here were never held by this peer (it met the sender after them): it can
    /// neither send them nor say they are gone.
    floor: u64,
    lines: VecDeque<Arc<Line>>,
    pending: BTreeMap<u64, Pending>,
    last_active: Instant,
}

/// The outcome of receiving one chat line.
#[derive(Debug)]
pub enum Received {
    /// Shown now: this line and any buffered ones it unblocked, in order.
    Delivered(Vec<Delivery>),
    /// Already shown.
    Duplicate,
    /// Arrived early; waits for the lines before it.
    Buffered,
    /// From a sender this peer never met, or too far ahead: ignored.
    Ignored,
}

/// What a neighbour's digest asks of us.
#[derive(Debug, Default)]
pub struct CatchUp {
    /// Lines and gap notices to send it, in order.
    pub messages: Vec<Message>,
    /// The byte budget ran out before everything it lacks was listed: another round is needed.
    pub truncated: bool,
    /// The neighbour holds lines we lack: send it our digest so it sends them.
    pub they_are_ahead: bool,
}

pub struct Store {
    me: PeerId,
    retention: Retention,
    origins: HashMap<PeerId, Origin>,
    /// History in arrival order, for eviction; entries of forgotten origins are skipped.
    order: VecDeque<(PeerId, u64)>,
    lines: usize,
    bytes: usize,
    /// Early lines buffered, in lines and bytes (bounded like the history).
    pending: usize,
    pending_bytes: usize,
    /// Bumped whenever a watermark moves, so digests are sent only when they changed.
    version: u64,
}

impl Store {
    pub fn new(me: PeerId, my_seq: u64, retention: Retention, now: Instant) -> Store {
        let mut store = Store {
            me: me.clone(),
            retention,
            origins: HashMap::new(),
            order: VecDeque::new(),
            lines: 0,
            bytes: 0,
            pending: 0,
            pending_bytes: 0,
            version: 0,
        };
        // A peer held every line it ever said: it may answer for all of them (sending those its
        // history still holds and gaps for the rest), so its own floor is 0.
        let mut own = Origin::new(my_seq, now);
        own.floor = 0;
        store.origins.insert(me, own);
        store
    }

    pub fn my_seq(&self) -> u64 {
        self.origins[&self.me].mark
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// The watermark of every known sender (for the state directory).
    pub fn marks(&self) -> BTreeMap<PeerId, u64> {
        self.origins.iter().map(|(id, o)| (id.clone(), o.mark)).collect()
    }

    /// The watermark of one sender.
    pub fn mark(&self, id: &PeerId) -> Option<u64> {
        self.origins.get(id).map(|o| o.mark)
    }

    /// This peer's own lines still held, oldest first (for the state directory).
    pub fn own_lines(&self) -> Vec<crate::state::OwnLine> {
        let own = &self.origins[&self.me].lines;
        own.iter()
            .map(|l| crate::state::OwnLine { seq: l.seq, text: l.text.clone(), sent_at_ms: l.sent_at_ms })
            .collect()
    }

    /// Puts back a line this peer said before a restart, so that it can still be caught up.
    pub fn restore_own(&mut self, name: &str, line: crate::state::OwnLine, now: Instant) {
        let me = self.me.clone();
        let line = Arc::new(Line {
            origin: me,
            name: name.into(),
            seq: line.seq,
            text: line.text,
            sent_at_ms: line.sent_at_ms,
            stored: now,
        });
        self.store(line);
    }

    /// Records a line said by this peer and returns it.
    pub fn say(&mut self, name: &str, text: String, sent_at_ms: u64, now: Instant) -> Arc<Line> {
        let me = self.me.clone();
        let seq = self.my_seq() + 1;
        let line = Arc::new(Line { origin: me.clone(), name: name.into(), seq, text, sent_at_ms, stored: now });
        self.store(line.clone());
        let o = self.origins.get_mut(&me).expect("own origin always present");
        o.mark = seq;
        o.last_active = now;
        self.version += 1;
        line
    }

    /// A sender met directly. New senders start at `seq`, the last line they had said.
    /// Returns whether the sender is new.
    pub fn meet(&mut self, peer: &PeerInfo, seq: u64, now: Instant) -> bool {
        let new = !self.origins.contains_key(&peer.id);
        if new {
            if self.origins.len() >= MAX_ORIGINS {
                self.forget_least_active();
            }
            self.origins.insert(peer.id.clone(), Origin::new(seq, now));
            self.version += 1;
        }
        let o = self.origins.get_mut(&peer.id).expect("inserted above");
        o.last_active = now;
        o.name.clone_from(&peer.name);
        o.addr.clone_from(&peer.addr);
        new
    }

    /// Name and address of a sender, as last known.
    pub fn info(&self, id: &PeerId) -> PeerInfo {
        let (name, addr) = self.origins.get(id).map_or(("?", "?"), |o| (o.name.as_str(), o.addr.as_str()));
        PeerInfo { id: id.clone(), name: name.into(), addr: addr.into() }
    }

    /// Restores a watermark kept across a restart: lines up to it are not held here.
    pub fn restore_mark(&mut self, id: PeerId, mark: u64, now: Instant) {
        if id != self.me {
            self.origins.insert(id, Origin::new(mark, now));
        }
    }

    pub fn receive(&mut self, chat: Chat, via: PeerId, now: Instant) -> Received {
        if chat.origin == self.me {
            return Received::Duplicate;
        }
        let Some(o) = self.origins.get_mut(&chat.origin) else { return Received::Ignored };
        o.last_active = now;
        if chat.seq <= o.mark {
            return Received::Duplicate;
        }
        if chat.seq > o.mark + 1 {
            let p = Pending { chat, via, since: now };
            let full = self.pending >= self.retention.lines || self.pending_bytes + p.size() > self.retention.bytes;
            if p.chat.seq - o.mark > PENDING_WINDOW || full {
                return Received::Ignored;
            }
            let size = p.size();
            if o.pending.insert(p.chat.seq, p).is_none() {
                self.pending += 1;
                self.pending_bytes += size;
            }
            return Received::Buffered;
        }
        let origin = chat.origin.clone();
        let mut out = vec![self.accept(Pending { chat, via, since: now }, now)];
        out.extend(self.drain_pending(&origin, now));
        Received::Delivered(out)
    }

    /// Lines `from..=upto` of `origin` are gone for good: skip them, if they continue what was
    /// shown (a gap that starts beyond the watermark cannot be applied yet: the lines between
    /// may still come). Returns how many were missed and the buffered lines this unblocks.
    pub fn skip(&mut self, origin: &PeerId, from: u64, upto: u64, now: Instant) -> Option<(u64, Vec<Delivery>)> {
        let o = self.origins.get_mut(origin)?;
        if upto <= o.mark || from > o.mark.saturating_add(1) || *origin == self.me {
            return None;
        }
        // Buffered lines inside the skipped range are still shown; only the rest are missed.
        let held: Vec<u64> = o.pending.range(..=upto).map(|(s, _)| *s).collect();
        let missed = upto - o.mark - held.len() as u64;
        let unblocked: Vec<Pending> = held.iter().filter_map(|seq| o.pending.remove(seq)).collect();
        self.pending -= unblocked.len();
        self.pending_bytes -= unblocked.iter().map(Pending::size).sum::<usize>();
        let mut out: Vec<Delivery> = unblocked.into_iter().map(|p| self.accept(p, now)).collect();
        let o = self.origins.get_mut(origin).expect("checked above");
        o.mark = upto;
        self.version += 1;
        out.extend(self.drain_pending(origin, now));
        Some((missed, out))
    }

    /// Our digest, split into frames of at most [`MAX_DIGEST`] senders. Senders silent for
    /// longer than the retention age are left out: nobody holds their lines any more.
    pub fn digests(&self, now: Instant) -> Vec<Message> {
        let live = self
            .origins
            .iter()
            .filter(|(id, o)| **id == self.me || now.duration_since(o.last_active) <= self.retention.age);
        let mut out = Vec::new();
        let mut have = BTreeMap::new();
        for (id, o) in live {
            have.insert(id.clone(), o.mark);
            if have.len() == MAX_DIGEST {
                out.push(Message::Digest { have: std::mem::take(&mut have) });
            }
        }
        if !have.is_empty() || out.is_empty() {
            out.push(Message::Digest { have });
        }
        out
    }

    /// Answers a neighbour's digest: what it lacks that we hold (up to about `budget` bytes of
    /// lines), and whether it is ahead.
    pub fn catch_up_for(&self, theirs: &BTreeMap<PeerId, u64>, budget: usize) -> CatchUp {
        let mut out = CatchUp::default();
        let mut spent = 0;
        for (id, &their_mark) in theirs {
            let Some(o) = self.origins.get(id) else { continue };
            if their_mark > o.mark {
                out.they_are_ahead = true;
                continue;
            }
            // Below our floor we never held anything: others must answer for those lines.
            let from = their_mark.max(o.floor);
            if from >= o.mark {
                continue;
            }
            let mut expected = from + 1;
            let start = o.lines.partition_point(|l| l.seq <= from);
            for line in o.lines.range(start..) {
                if spent >= budget {
                    out.truncated = true;
                    return out;
                }
                if line.seq > expected {
                    out.messages.push(Message::Gap { origin: id.clone(), from: expected, upto: line.seq - 1 });
                }
                out.messages.push(line.to_message(true));
                spent += line.size();
                expected = line.seq.saturating_add(1);
            }
            if expected <= o.mark {
                out.messages.push(Message::Gap { origin: id.clone(), from: expected, upto: o.mark });
            }
        }
        out
    }

    /// Drops history, and early lines still waiting, older than the retention age.
    pub fn expire(&mut self, now: Instant) {
        let age = self.retention.age;
        for o in self.origins.values_mut() {
            let stale: Vec<u64> =
                o.pending.iter().filter(|(_, p)| now.duration_since(p.since) > age).map(|(s, _)| *s).collect();
            for seq in stale {
                let p = o.pending.remove(&seq).expect("key just listed");
                self.pending -= 1;
                self.pending_bytes -= p.size();
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

    fn accept(&mut self, p: Pending, now: Instant) -> Delivery {
        let Pending { chat, via, .. } = p;
        let line = Arc::new(Line {
            origin: chat.origin,
            name: chat.name,
            seq: chat.seq,
            text: chat.text,
            sent_at_ms: chat.sent_at_ms,
            stored: now,
        });
        let o = self.origins.get_mut(&line.origin).expect("accepted lines have an origin");
        o.mark = line.seq;
        o.name.clone_from(&line.name);
        self.version += 1;
        self.store(line.clone());
        Delivery { line, via, caught_up: chat.catch_up }
    }

    fn drain_pending(&mut self, origin: &PeerId, now: Instant) -> Vec<Delivery> {
        let mut out = Vec::new();
        while let Some(p) = self.origins.get_mut(origin).and_then(|o| o.pending.remove(&o.mark.saturating_add(1))) {
            self.pending -= 1;
            self.pending_bytes -= p.size();
            out.push(self.accept(p, now));
        }
        out
    }

    fn store(&mut self, line: Arc<Line>) {
        self.lines += 1;
        self.bytes += line.size();
        self.order.push_back((line.origin.clone(), line.seq));
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
        }
    }

    fn compact_order(&mut self) {
        let origins = &self.origins;
        self.order
            .retain(|(id, seq)| origins.get(id).is_some_and(|o| o.lines.binary_search_by_key(seq, |l| l.seq).is_ok()))
    }

    fn forget_least_active(&mut self) {
        let victim = self
            .origins
            .iter()
            .filter(|(id, _)| **id != self.me)
            .min_by_key(|(_, o)| o.last_active)
            .map(|(id, _)| id.clone());
        if let Some(id) = victim {
            let o = self.origins.remove(&id).expect("victim exists");
            self.lines -= o.lines.len();
            self.bytes -= o.lines.iter().map(|l| l.size()).sum::<usize>();
            self.pending -= o.pending.len();
            self.pending_bytes -= o.pending.values().map(Pending::size).sum::<usize>();
        }
    }
}

impl Origin {
    fn new(mark: u64, now: Instant) -> Origin {
        Origin {
            name: "?".into(),
            addr: "?".into(),
            mark,
            floor: mark,
            lines: VecDeque::new(),
            pending: BTreeMap::new(),
            last_active: now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RET: Retention = Retention { lines: 100, bytes: 1 << 20, age: Duration::from_secs(600) };

    fn id(c: char) -> PeerId {
        c.to_string().repeat(32).parse().unwrap()
    }

    fn chat(origin: char, seq: u64) -> Chat {
        Chat {
            origin: id(origin),
            name: origin.to_string(),
            seq,
            text: format!("{origin}{seq}"),
            sent_at_ms: 0,
            catch_up: false,
        }
    }

    fn shown(r: Received) -> Vec<u64> {
        match r {
            Received::Delivered(d) => d.iter().map(|d| d.line.seq).collect(),
            _ => vec![],
        }
    }

    fn peer(c: char) -> PeerInfo {
        PeerInfo { id: id(c), name: c.to_string(), addr: "127.0.0.1:1".into() }
    }

    fn store() -> (Store, Instant) {
        let now = Instant::now();
        let mut s = Store::new(id('a'), 0, RET, now);
        s.meet(&peer('b'), 0, now);
        (s, now)
    }

    #[test]
    fn shows_each_line_once_and_in_order() {
        let (mut s, now) = store();
        assert_eq!(shown(s.receive(chat('b', 1), id('b'), now)), vec![1]);
        assert!(matches!(s.receive(chat('b', 1), id('c'), now), Received::Duplicate));
        assert!(matches!(s.receive(chat('b', 3), id('b'), now), Received::Buffered));
        assert!(matches!(s.receive(chat('b', 3), id('b'), now), Received::Buffered));
        assert_eq!(shown(s.receive(chat('b', 2), id('c'), now)), vec![2, 3]);
        assert!(matches!(s.receive(chat('b', 3), id('b'), now), Received::Duplicate));
    }

    #[test]
    fn unknown_senders_and_far_future_lines_are_ignored() {
        let (mut s, now) = store();
        assert!(matches!(s.receive(chat('e', 1), id('b'), now), Received::Ignored));
        assert!(matches!(s.receive(chat('b', u64::MAX), id('b'), now), Received::Ignored));
    }

    #[test]
    fn a_newcomer_starts_at_the_announced_seq() {
        let now = Instant::now();
        let mut s = Store::new(id('a'), 0, RET, now);
        s.meet(&peer('b'), 41, now);
        assert!(matches!(s.receive(chat('b', 41), id('b'), now), Received::Duplicate));
        assert_eq!(shown(s.receive(chat('b', 42), id('b'), now)), vec![42]);
    }

    #[test]
    fn catch_up_sends_what_the_other_side_lacks() {
        let (mut s, now) = store();
        for seq in 1..=5 {
            s.receive(chat('b', seq), id('b'), now);
        }
        s.say("a", "mine".into(), 0, now);
        let theirs: BTreeMap<_, _> = [(id('b'), 2), (id('a'), 0), (id('e'), 9)].into();
        let c = s.catch_up_for(&theirs, usize::MAX);
        let seqs: Vec<_> = c
            .messages
            .iter()
            .map(|m| match m {
                Message::Chat(c) => (c.origin.clone(), c.seq),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(seqs, vec![(id('a'), 1), (id('b'), 3), (id('b'), 4), (id('b'), 5)]);
        assert!(!c.they_are_ahead);
        let ahead: BTreeMap<_, _> = [(id('b'), 9)].into();
        assert!(s.catch_up_for(&ahead, usize::MAX).they_are_ahead);
    }

    #[test]
    fn evicted_lines_become_gap_notices() {
        let now = Instant::now();
        let ret = Retention { lines: 3, ..RET };
        let mut s = Store::new(id('a'), 0, ret, now);
        s.meet(&peer('b'), 0, now);
        for seq in 1..=5 {
            s.receive(chat('b', seq), id('b'), now);
        }
        assert_eq!(s.held(), 3);
        let c = s.catch_up_for(&[(id('b'), 0)].into(), usize::MAX);
        assert_eq!(c.messages[0], Message::Gap { origin: id('b'), from: 1, upto: 2 });
        assert_eq!(c.messages.len(), 4);
    }

    #[test]
    fn a_peer_never_speaks_for_lines_below_its_floor() {
        // We met b when it had said 10 lines: we never held 1..=10.
        let now = Instant::now();
        let mut s = Store::new(id('a'), 0, RET, now);
        s.meet(&peer('b'), 10, now);
        for seq in 11..=12 {
            s.receive(chat('b', seq), id('b'), now);
        }
        // A neighbour that has 1..=5 gets 11 and 12, and no claim that 6..=10 are gone.
        let c = s.catch_up_for(&[(id('b'), 5)].into(), usize::MAX);
        assert!(c.messages.iter().all(|m| matches!(m, Message::Chat(_))), "{:?}", c.messages);
        assert_eq!(c.messages.len(), 2);
    }

    #[test]
    fn catch_up_is_bounded_by_the_budget() {
        let (mut s, now) = store();
        for seq in 1..=50 {
            s.receive(chat('b', seq), id('b'), now);
        }
        let c = s.catch_up_for(&[(id('b'), 0)].into(), 10 * (LINE_OVERHEAD + 4));
        assert!(c.truncated);
        assert!(c.messages.len() <= 11, "{}", c.messages.len());
    }

    #[test]
    fn hostile_sequence_numbers_neither_panic_nor_poison_below_the_mark() {
        let (mut s, now) = store();
        s.receive(chat('b', 1), id('b'), now);
        assert!(s.skip(&id('b'), 2, u64::MAX, now).is_some());
        assert!(matches!(s.receive(chat('b', u64::MAX), id('b'), now), Received::Duplicate));
        let c = s.catch_up_for(&[(id('b'), u64::MAX), (id('a'), u64::MAX)].into(), usize::MAX);
        assert!(c.messages.is_empty());
        let c = s.catch_up_for(&[(id('b'), 0)].into(), usize::MAX);
        assert!(matches!(c.messages.last(), Some(Message::Gap { upto: u64::MAX, .. })));
    }

    #[test]
    fn early_lines_are_bounded_in_bytes_and_expire() {
        let now = Instant::now();
        let ret = Retention { lines: 1000, bytes: 3 * (LINE_OVERHEAD + 8), age: Duration::from_secs(5) };
        let mut s = Store::new(id('a'), 0, ret, now);
        s.meet(&peer('b'), 0, now);
        let results: Vec<bool> =
            (10..15).map(|seq| matches!(s.receive(chat('b', seq), id('b'), now), Received::Buffered)).collect();
        assert_eq!(results, vec![true, true, true, false, false]);
        s.expire(now + Duration::from_secs(6));
        assert!(matches!(s.receive(chat('b', 14), id('b'), now + Duration::from_secs(6)), Received::Buffered));
    }

    #[test]
    fn a_gap_beyond_the_watermark_waits() {
        let (mut s, now) = store();
        assert!(s.skip(&id('b'), 5, 9, now).is_none(), "1..=4 may still come");
        let (missed, _) = s.skip(&id('b'), 1, 9, now).unwrap();
        assert_eq!(missed, 9);
    }

    #[test]
    fn skipping_counts_missed_lines_and_keeps_buffered_ones() {
        let (mut s, now) = store();
        s.receive(chat('b', 4), id('b'), now);
        s.receive(chat('b', 6), id('b'), now);
        let (missed, shown) = s.skip(&id('b'), 1, 5, now).unwrap();
        assert_eq!(missed, 4);
        assert_eq!(shown.iter().map(|d| d.line.seq).collect::<Vec<_>>(), vec![4, 6]);
        assert!(s.skip(&id('b'), 1, 3, now).is_none());
    }

    #[test]
    fn history_is_bounded_by_lines_bytes_and_age() {
        let now = Instant::now();
        let ret = Retention { lines: 1000, bytes: 10 * (LINE_OVERHEAD + 10), age: Duration::from_secs(5) };
        let mut s = Store::new(id('a'), 0, ret, now);
        for i in 0..100 {
            s.say("a", format!("{i:08}"), 0, now);
        }
        assert!(s.held() <= 10);
        s.expire(now + Duration::from_secs(6));
        assert_eq!(s.held(), 0);
        assert_eq!(s.my_seq(), 100);
    }

    #[test]
    fn memory_stays_flat_over_a_long_run() {
        let now = Instant::now();
        let mut s = Store::new(id('a'), 0, RET, now);
        for origin in 0..(MAX_ORIGINS + 500) {
            let o: PeerId = format!("{origin:032x}").parse().unwrap();
            s.meet(&PeerInfo { id: o.clone(), name: "o".into(), addr: "127.0.0.1:1".into() }, 0, now);
            for seq in 1..=3 {
                let mut c = chat('b', seq);
                c.origin = o.clone();
                s.receive(c, o.clone(), now);
            }
        }
        assert!(s.origins.len() <= MAX_ORIGINS);
        assert!(s.held() <= RET.lines);
        assert!(s.order.len() <= 2 * RET.lines + 1);
    }
}
