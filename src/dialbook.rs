//! Whom to dial, and when: the addresses this peer knows of, each with a backoff schedule.
//!
//! Peers are redialled by address, not by id: a restarted peer gets a new id at the old address.
//! Entries come from the command line (bootstrap: never forgotten, retried while this peer has no
//! neighbour) or from members (learned: forgotten after the give-up time without success).
//! Failures back off exponentially up to a cap, with jitter. When both sides learn of each other
//! at once, only the smaller id dials at once; the other waits a polite delay before trying, so
//! simultaneous dials are rare (and harmless when they happen).
//!
//! Ids that said goodbye, or were closed for flooding, are held off for a while: gossip still in
//! flight about them is ignored, and a flooder's connections are refused until the hold ends.

use std::cell::Cell;
use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::id::{PeerId, random_u64};

/// Most learned addresses kept (new ones are dropped when full: none displaces another).
pub const MAX_LEARNED: usize = 1024;
/// Most learned addresses on one host (an IPv4 address or an IPv6 /64): a member cannot point
/// the mesh at hundreds of listeners of its own.
pub const MAX_LEARNED_PER_HOST: usize = 32;

/// Most held-off ids kept (the oldest hold goes first).
const MAX_HELD: usize = 1024;

/// Why an id is held off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hold {
    /// It said goodbye: do not dial it again on stale gossip (it may still dial us).
    Left,
    /// It was closed for flooding: neither dial it nor admit it, for a cool-down.
    Flooded,
    /// It relayed lines (or a gone statement) their sender did not sign: neither dial it nor
    /// admit it for a while.
    Forged,
}

impl Hold {
    /// How long the hold lasts: long enough to outlive any gossip in flight about a departed
    /// peer; for a flooder, a cool-down after which its lines are caught up at the allowed pace.
    pub fn duration(self) -> Duration {
        match self {
            Hold::Left => Duration::from_secs(60),
            Hold::Flooded => Duration::from_secs(10),
            Hold::Forged => Duration::from_secs(60),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// First retry delay after a failure.
    pub base: Duration,
    /// Longest delay between retries.
    pub cap: Duration,
    /// How long the larger id waits before dialling a peer both sides just learned of.
    pub polite: Duration,
    /// How long a learned address is retried without success before it is forgotten.
    pub give_up: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Bootstrap,
    Learned,
}

#[derive(Debug)]
struct Entry {
    kind: Kind,
    /// The id last found at this address.
    id: Option<PeerId>,
    /// When to dial next; None while connected or after a goodbye.
    next: Option<Instant>,
    failures: u32,
    /// Learned entries are forgotten at this time unless they connect.
    expires: Option<Instant>,
    in_flight: bool,
    /// Dialling it reached this very peer.
    is_self: bool,
    /// A resolution failure was already reported.
    warned: bool,
}

pub struct DialBook {
    /// Only through `entries_mut` once built, which forgets the summary.
    entries: HashMap<String, Entry>,
    /// What the mesh's loop asks of the book before every wait, kept between changes: with 255
    /// members, scanning the entries for it on every event cost more than the events did.
    summary: Cell<Option<Summary>>,
    schedule: Schedule,
    /// How many entries are learned ones (kept for the cap).
    learned: usize,
    /// Ids held off, with why and until when.
    held: HashMap<PeerId, (Hold, Instant)>,
}

impl DialBook {
    pub fn new(schedule: Schedule) -> DialBook {
        DialBook { entries: HashMap::new(), summary: Cell::new(None), schedule, learned: 0, held: HashMap::new() }
    }

    /// The entries, to change: the summary is worked out again when next asked for.
    fn entries_mut(&mut self) -> &mut HashMap<String, Entry> {
        self.summary.set(None);
        &mut self.entries
    }

    fn summary(&self) -> Summary {
        if let Some(summary) = self.summary.get() {
            return summary;
        }
        let mut summary = Summary::default();
        for e in self.entries.values() {
            summary.in_flight += usize::from(e.in_flight);
            if !e.in_flight && !e.is_self {
                summary.next_due = summary.next_due.into_iter().chain(e.next).min();
            }
            if !e.in_flight {
                summary.next_expiry = summary.next_expiry.into_iter().chain(e.expires).min();
            }
        }
        self.summary.set(Some(summary));
        summary
    }

    pub fn add_bootstrap(&mut self, addr: &str, now: Instant) {
        self.entries_mut().entry(addr.to_owned()).or_insert_with(|| Entry::new(Kind::Bootstrap, None, Some(now)));
    }

    /// A member told us of `id` at `addr`. `first` is whether this side should dial first.
    /// Returns false when the address was not taken (a hold, or no room).
    pub fn learn(&mut self, addr: &str, id: &PeerId, first: bool, now: Instant) -> bool {
        if self.hold_of(id, now).is_some() {
            return false;
        }
        let at = if first { now } else { now + self.schedule.polite };
        let learned = self.learned;
        let room = learned < MAX_LEARNED && !self.entries.contains_key(addr) && self.room_on_host(addr);
        let give_up = self.schedule.give_up;
        match self.entries_mut().get_mut(addr) {
            Some(e) => {
                e.id = Some(*id);
                if e.next.is_none() && !e.is_self {
                    e.next = Some(at);
                }
                if e.kind == Kind::Learned {
                    e.expires = Some(now + give_up);
                }
                true
            }
            None if room => {
                let mut e = Entry::new(Kind::Learned, Some(*id), Some(at));
                e.expires = Some(now + give_up);
                self.entries_mut().insert(addr.to_owned(), e);
                self.learned += 1;
                true
            }
            None => false,
        }
    }

    fn room_on_host(&self, addr: &str) -> bool {
        let Some(host) = crate::addr::host_of_addr(addr) else { return true };
        let on_host = self
            .entries
            .iter()
            .filter(|(a, e)| e.kind == Kind::Learned && crate::addr::host_of_addr(a) == Some(host))
            .count();
        on_host < MAX_LEARNED_PER_HOST
    }

    /// The ids this peer is dialling or means to (for the filter of members it knows).
    pub fn known_ids(&self) -> impl Iterator<Item = &PeerId> {
        self.entries.values().filter(|e| e.next.is_some() || e.in_flight).filter_map(|e| e.id.as_ref())
    }

    /// Addresses due for a dial now, at most `limit`, skipping those whose peer is up.
    pub fn due(&mut self, now: Instant, limit: usize, is_up: impl Fn(&PeerId) -> bool) -> Vec<String> {
        let mut out = Vec::new();
        if self.next_due().is_none_or(|t| t > now) || limit == 0 {
            return out;
        }
        for (addr, e) in self.entries_mut().iter_mut() {
            if out.len() >= limit {
                break;
            }
            if e.in_flight || e.is_self || e.next.is_none_or(|t| t > now) {
                continue;
            }
            if e.id.as_ref().is_some_and(&is_up) {
                e.next = None;
                continue;
            }
            e.in_flight = true;
            out.push(addr.clone());
        }
        out
    }

    /// The earliest time something is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.summary().next_due
    }

    pub fn in_flight(&self) -> usize {
        self.summary().in_flight
    }

    /// A dial to `addr` reached peer `id`.
    pub fn connected(&mut self, addr: &str, id: &PeerId) {
        if let Some(e) = self.entries_mut().get_mut(addr) {
            e.in_flight = false;
            e.next = None;
            e.expires = None;
            e.id = Some(*id);
        }
    }

    /// A dial to `addr` failed; returns true the first time a name fails to resolve.
    pub fn failed(&mut self, addr: &str, unresolved: bool, now: Instant) -> bool {
        let schedule = self.schedule;
        let Some(e) = self.entries_mut().get_mut(addr) else { return false };
        e.in_flight = false;
        e.failures = e.failures.saturating_add(1);
        e.next = Some(now + backoff(&schedule, e.failures));
        let first_warning = unresolved && !e.warned;
        e.warned |= unresolved;
        first_warning
    }

    /// Dialling `addr` reached this very peer: never dial it again.
    pub fn is_self(&mut self, addr: &str) {
        if let Some(e) = self.entries_mut().get_mut(addr) {
            e.in_flight = false;
            e.is_self = true;
            e.next = None;
        }
    }

    /// `id` was lost without a goodbye: redial it (by every address it was reached at). A
    /// connection that was not `stable` (it ended soon after it came up) counts as a failed dial,
    /// so a peer that closes every connection right after the handshake (one holding us off, say)
    /// is retried with growing backoff rather than in a tight loop.
    pub fn lost(&mut self, id: &PeerId, addr: &str, first: bool, stable: bool, now: Instant) {
        let schedule = self.schedule;
        let usual = if first { schedule.base } else { schedule.polite.max(schedule.base) };
        let mut found = false;
        for e in self.entries_mut().values_mut().filter(|e| e.id.as_ref() == Some(id)) {
            found = true;
            e.failures = if stable { 0 } else { e.failures.saturating_add(1) };
            let delay = if stable { usual } else { usual.max(backoff(&schedule, e.failures)) };
            e.next = Some(now + delay);
            if e.kind == Kind::Learned {
                e.expires = Some(now + schedule.give_up);
            }
        }
        if !found {
            self.learn(addr, id, first, now);
        }
    }

    /// `id` said goodbye, or flooded: stop dialling it, and hold it off for a while. Bootstrap
    /// entries stay, idle (they are retried only while this peer has no neighbour at all: a new
    /// process may answer there).
    pub fn left(&mut self, id: &PeerId, why: Hold, now: Instant) {
        self.entries_mut().retain(|_, e| e.id.as_ref() != Some(id) || e.kind == Kind::Bootstrap);
        self.count_learned();
        for e in self.entries_mut().values_mut().filter(|e| e.id.as_ref() == Some(id)) {
            e.next = None;
        }
        self.held.retain(|_, (_, until)| *until > now);
        if self.held.len() >= MAX_HELD
            && let Some(oldest) = self.held.iter().min_by_key(|(_, (_, until))| *until).map(|(id, _)| *id)
        {
            self.held.remove(&oldest);
        }
        self.held.insert(*id, (why, now + why.duration()));
    }

    /// Whether `id` is held off, and why.
    pub fn hold_of(&self, id: &PeerId, now: Instant) -> Option<Hold> {
        self.held.get(id).filter(|(_, until)| *until > now).map(|(why, _)| *why)
    }

    /// `id` was admitted again (it dialled us after a goodbye, as a restarted peer with the same
    /// state does): its hold ends.
    pub fn met(&mut self, id: &PeerId) {
        self.held.remove(id);
    }

    /// This peer has no neighbour left: retry the bootstrap list.
    pub fn isolated(&mut self, now: Instant) {
        for e in self.entries_mut().values_mut().filter(|e| e.kind == Kind::Bootstrap && !e.is_self) {
            if e.next.is_none() {
                e.next = Some(now);
            }
        }
    }

    /// Forgets learned addresses whose give-up time passed.
    pub fn expire(&mut self, now: Instant) {
        if self.summary().next_expiry.is_none_or(|t| t > now) {
            return;
        }
        self.entries_mut().retain(|_, e| e.in_flight || e.expires.is_none_or(|t| t > now));
        self.count_learned();
    }

    fn count_learned(&mut self) {
        self.learned = self.entries.values().filter(|e| e.kind == Kind::Learned).count();
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// Delay before the next try after `failures` failures: doubling from the base up to the cap,
/// less up to 20% of jitter so that peers cut off together do not retry in lockstep (also once
/// they all reach the cap).
fn backoff(s: &Schedule, failures: u32) -> Duration {
    let exp = s.base.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let jitter = 0.8 + (random_u64() % 201) as f64 / 1000.0;
    exp.min(s.cap).mul_f64(jitter)
}

/// What the mesh's loop asks of the book, all found in one pass over the entries.
#[derive(Debug, Clone, Copy, Default)]
struct Summary {
    /// Dials under way.
    in_flight: usize,
    /// The earliest time a dial is due.
    next_due: Option<Instant>,
    /// The earliest time a learned address (not being dialled) may be forgotten.
    next_expiry: Option<Instant>,
}

impl Entry {
    fn new(kind: Kind, id: Option<PeerId>, next: Option<Instant>) -> Entry {
        Entry { kind, id, next, failures: 0, expires: None, in_flight: false, is_self: false, warned: false }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Schedule = Schedule {
        base: Duration::from_millis(100),
        cap: Duration::from_secs(5),
        polite: Duration::from_millis(500),
        give_up: Duration::from_secs(600),
    };

    fn id(c: char) -> PeerId {
        c.to_string().repeat(64).parse().unwrap()
    }

    /// The summary as a fresh scan finds it.
    fn scanned(b: &DialBook) -> (usize, Option<Instant>, Option<Instant>) {
        let e = || b.entries.values();
        (
            e().filter(|e| e.in_flight).count(),
            e().filter(|e| !e.in_flight && !e.is_self).filter_map(|e| e.next).min(),
            e().filter(|e| !e.in_flight).filter_map(|e| e.expires).min(),
        )
    }

    proptest::proptest! {
        /// The summary the mesh's loop reads before every wait is kept between changes: after
        /// any sequence of changes it is what a scan of the entries finds.
        #[test]
        fn the_kept_summary_is_what_a_scan_finds(ops in proptest::collection::vec((0u8..9, 0u8..4, 0u64..20), 1..60)) {
            let start = Instant::now();
            let mut b = DialBook::new(S);
            for (op, who, at) in ops {
                let now = start + Duration::from_millis(at * 100);
                let (addr, peer) = (format!("h{who}:1"), id(char::from(b'a' + who)));
                match op {
                    0 => b.add_bootstrap(&addr, now),
                    1 => { b.learn(&addr, &peer, who % 2 == 0, now); }
                    2 => { b.due(now, 2, |p| *p == id('a')); }
                    3 => b.connected(&addr, &peer),
                    4 => { b.failed(&addr, false, now); }
                    5 => b.lost(&peer, &addr, true, who % 2 == 1, now),
                    6 => b.left(&peer, Hold::Left, now),
                    7 => b.isolated(now),
                    _ => b.expire(now + S.give_up),
                }
                let summary = b.summary();
                proptest::prop_assert_eq!((summary.in_flight, summary.next_due, summary.next_expiry), scanned(&b));
            }
        }
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let d1 = backoff(&S, 1);
        assert!(d1 >= Duration::from_millis(80) && d1 <= Duration::from_millis(100));
        let d3 = backoff(&S, 3);
        assert!(d3 >= Duration::from_millis(320) && d3 <= Duration::from_millis(400));
        for n in [7, 30, u32::MAX] {
            assert!(backoff(&S, n) <= S.cap && backoff(&S, n) >= S.cap.mul_f64(0.8));
        }
        let at_cap: std::collections::HashSet<Duration> = (0..20).map(|_| backoff(&S, 30)).collect();
        assert!(at_cap.len() > 1, "peers at the cap still retry at different moments");
    }

    #[test]
    fn the_larger_id_waits_politely() {
        let now = Instant::now();
        let mut b = DialBook::new(S);
        b.learn("h:1", &id('b'), false, now);
        assert!(b.due(now, 10, |_| false).is_empty());
        assert_eq!(b.due(now + S.polite, 10, |_| false), vec!["h:1".to_string()]);
    }

    #[test]
    fn failures_back_off_and_success_resets() {
        let now = Instant::now();
        let mut b = DialBook::new(S);
        b.add_bootstrap("h:1", now);
        assert_eq!(b.due(now, 10, |_| false).len(), 1);
        assert!(b.due(now, 10, |_| false).is_empty(), "in flight");
        b.failed("h:1", false, now);
        assert!(b.due(now + Duration::from_millis(50), 10, |_| false).is_empty());
        assert_eq!(b.due(now + Duration::from_millis(200), 10, |_| false).len(), 1);
        b.connected("h:1", &id('b'));
        assert_eq!(b.next_due(), None);
    }

    #[test]
    fn a_name_that_does_not_resolve_warns_once() {
        let now = Instant::now();
        let mut b = DialBook::new(S);
        b.add_bootstrap("nowhere:1", now);
        b.due(now, 10, |_| false);
        assert!(b.failed("nowhere:1", true, now));
        b.due(now + Duration::from_secs(1), 10, |_| false);
        assert!(!b.failed("nowhere:1", true, now));
        assert_eq!(b.len(), 1, "bootstrap entries are kept");
    }

    #[test]
    fn goodbye_stops_redials_and_give_up_forgets() {
        let now = Instant::now();
        let mut b = DialBook::new(S);
        b.learn("h:1", &id('b'), true, now);
        b.learn("h:2", &id('c'), true, now);
        b.left(&id('b'), Hold::Left, now);
        assert_eq!(b.len(), 1);
        b.expire(now + S.give_up + Duration::from_secs(1));
        assert_eq!(b.len(), 0);
    }

    #[test]
    fn stale_gossip_about_a_departed_peer_is_ignored_for_a_while() {
        let now = Instant::now();
        let mut b = DialBook::new(S);
        b.learn("h:1", &id('b'), true, now);
        b.left(&id('b'), Hold::Left, now);
        b.learn("h:1", &id('b'), true, now + Duration::from_millis(10));
        assert!(b.due(now + S.cap, 10, |_| false).is_empty(), "not redialled on stale gossip");
        assert_eq!(b.hold_of(&id('b'), now), Some(Hold::Left));
        let end = now + Hold::Left.duration();
        b.learn("h:1", &id('b'), true, end);
        assert_eq!(b.due(end, 10, |_| false), vec!["h:1".to_string()], "the hold ends");
    }

    #[test]
    fn a_flooder_is_held_off_until_met_again_or_the_hold_ends() {
        let now = Instant::now();
        let mut b = DialBook::new(S);
        b.left(&id('d'), Hold::Flooded, now);
        let cool_down = Hold::Flooded.duration();
        assert_eq!(b.hold_of(&id('d'), now + cool_down / 2), Some(Hold::Flooded));
        assert_eq!(b.hold_of(&id('d'), now + cool_down), None);
        b.left(&id('e'), Hold::Left, now);
        b.met(&id('e'));
        assert_eq!(b.hold_of(&id('e'), now), None);
    }

    #[test]
    fn holds_are_bounded() {
        let now = Instant::now();
        let mut b = DialBook::new(S);
        for i in 0..(MAX_HELD + 10) {
            b.left(&format!("{i:064x}").parse().unwrap(), Hold::Left, now + Duration::from_millis(i as u64));
        }
        assert_eq!(b.held.len(), MAX_HELD);
        assert_eq!(b.hold_of(&format!("{:064x}", 0).parse().unwrap(), now), None, "the oldest went first");
    }

    #[test]
    fn a_lost_peer_is_redialled_and_self_never() {
        let now = Instant::now();
        let mut b = DialBook::new(S);
        b.add_bootstrap("me:1", now);
        b.due(now, 10, |_| false);
        b.is_self("me:1");
        b.isolated(now);
        assert!(b.due(now + S.cap, 10, |_| false).is_empty());
        b.lost(&id('c'), "h:3", true, true, now);
        assert_eq!(b.due(now + S.base, 10, |_| false), vec!["h:3".to_string()]);
    }

    #[test]
    fn a_peer_that_keeps_closing_right_after_the_handshake_is_retried_with_growing_backoff() {
        let mut now = Instant::now();
        let mut b = DialBook::new(S);
        b.learn("h:1", &id('b'), true, now);
        let mut delays = Vec::new();
        for _ in 0..8 {
            let due = b.next_due().unwrap();
            now = due;
            assert_eq!(b.due(now, 10, |_| false).len(), 1);
            b.connected("h:1", &id('b'));
            b.lost(&id('b'), "h:1", true, false, now);
            delays.push(b.next_due().unwrap() - now);
        }
        assert!(delays[7] >= S.cap.mul_f64(0.8), "{delays:?}");
        b.lost(&id('b'), "h:1", true, true, now);
        assert_eq!(b.next_due().unwrap() - now, S.base, "a stable connection's loss starts over");
    }

    #[test]
    fn learned_addresses_are_capped_in_all_and_per_host() {
        let now = Instant::now();
        let mut b = DialBook::new(S);
        for i in 0..(MAX_LEARNED + 50) {
            b.learn(&format!("10.{}.{}.1:1", i / 256, i % 256), &id('b'), true, now);
        }
        assert_eq!(b.len(), MAX_LEARNED);
        let mut b = DialBook::new(S);
        let taken = (1..=300).filter(|port| b.learn(&format!("10.9.9.9:{port}"), &id('b'), true, now)).count();
        assert_eq!(taken, MAX_LEARNED_PER_HOST, "300 listeners on one host");
        assert!(b.learn("10.9.9.10:1", &id('c'), true, now), "another host still gets in");
        assert!(b.learn("attacker.example:1", &id('c'), true, now), "names are resolved at each dial");
    }
}
