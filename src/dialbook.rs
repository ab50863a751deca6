//! Whom to dial, and when: the addresses this peer knows of, each with a backoff schedule.
//!
//! Peers are redialled by address, not by id: a restarted peer gets a new id at the old address.
//! Entries come from the command line (bootstrap: never forgotten, retried while this peer has no
//! neighbour) or from members (learned: forgotten after the give-up time without success).
//! Failures back off exponentially up to a cap, with jitter. When both sides learn of each other
//! at once, only the smaller id dials at once; the other waits a polite delay before trying, so
//! simultaneous dials are rare (and harmless when they happen).

use std::collections::HashMap;
use std::time::Duration;

use tokio::time::Instant;

use crate::id::{PeerId, random_u64};

/// Most learned addresses kept.
pub const MAX_LEARNED: usize = 1024;

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
    entries: HashMap<String, Entry>,
    schedule: Schedule,
    /// How many entries are learned ones (kept for the cap).
    learned: usize,
}

impl DialBook {
    pub fn new(schedule: Schedule) -> DialBook {
        DialBook { entries: HashMap::new(), schedule, learned: 0 }
    }

    pub fn add_bootstrap(&mut self, addr: &str, now: Instant) {
        self.entries.entry(addr.to_owned()).or_insert_with(|| Entry::new(Kind::Bootstrap, None, Some(now)));
    }

    /// A member told us of `id` at `addr`. `first` is whether this side should dial first.
    pub fn learn(&mut self, addr: &str, id: &PeerId, first: bool, now: Instant) {
        let at = if first { now } else { now + self.schedule.polite };
        let learned = self.learned;
        match self.entries.get_mut(addr) {
            Some(e) => {
                e.id = Some(id.clone());
                if e.next.is_none() && !e.is_self {
                    e.next = Some(at);
                }
                if e.kind == Kind::Learned {
                    e.expires = Some(now + self.schedule.give_up);
                }
            }
            None if learned < MAX_LEARNED => {
                let mut e = Entry::new(Kind::Learned, Some(id.clone()), Some(at));
                e.expires = Some(now + self.schedule.give_up);
                self.entries.insert(addr.to_owned(), e);
                self.learned += 1;
            }
            None => {}
        }
    }

    /// Addresses due for a dial now, at most `limit`, skipping those whose peer is up.
    pub fn due(&mut self, now: Instant, limit: usize, is_up: impl Fn(&PeerId) -> bool) -> Vec<String> {
        let mut out = Vec::new();
        for (addr, e) in self.entries.iter_mut() {
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
        self.entries.values().filter(|e| !e.in_flight && !e.is_self).filter_map(|e| e.next).min()
    }

    pub fn in_flight(&self) -> usize {
        self.entries.values().filter(|e| e.in_flight).count()
    }

    /// A dial to `addr` reached peer `id`.
    pub fn connected(&mut self, addr: &str, id: &PeerId) {
        if let Some(e) = self.entries.get_mut(addr) {
            e.in_flight = false;
            e.failures = 0;
            e.next = None;
            e.expires = None;
            e.id = Some(id.clone());
        }
    }

    /// A dial to `addr` failed; returns true the first time a name fails to resolve.
    pub fn failed(&mut self, addr: &str, unresolved: bool, now: Instant) -> bool {
        let Some(e) = self.entries.get_mut(addr) else { return false };
        e.in_flight = false;
        e.failures = e.failures.saturating_add(1);
        e.next = Some(now + backoff(&self.schedule, e.failures));
        let first_warning = unresolved && !e.warned;
        e.warned |= unresolved;
        first_warning
    }

    /// Dialling `addr` reached this very peer: never dial it again.
    pub fn is_self(&mut self, addr: &str) {
        if let Some(e) = self.entries.get_mut(addr) {
            e.in_flight = false;
            e.is_self = true;
            e.next = None;
        }
    }

    /// `id` was lost without a goodbye: redial it (by every address it was reached at).
    pub fn lost(&mut self, id: &PeerId, addr: &str, first: bool, now: Instant) {
        let delay = if first { self.schedule.base } else { self.schedule.polite.max(self.schedule.base) };
        let mut found = false;
        for e in self.entries.values_mut().filter(|e| e.id.as_ref() == Some(id)) {
            found = true;
            e.next = Some(now + delay);
            e.failures = 0;
            if e.kind == Kind::Learned {
                e.expires = Some(now + self.schedule.give_up);
            }
        }
        if !found {
            self.learn(addr, id, first, now);
        }
    }

    /// `id` said goodbye: stop dialling it. Bootstrap entries stay, idle (they are retried only
    /// while this peer has no neighbour at all: a new process may answer there).
    pub fn left(&mut self, id: &PeerId) {
        self.entries.retain(|_, e| e.id.as_ref() != Some(id) || e.kind == Kind::Bootstrap);
        self.count_learned();
        for e in self.entries.values_mut().filter(|e| e.id.as_ref() == Some(id)) {
            e.next = None;
        }
    }

    /// This peer has no neighbour left: retry the bootstrap list.
    pub fn isolated(&mut self, now: Instant) {
        for e in self.entries.values_mut().filter(|e| e.kind == Kind::Bootstrap && !e.is_self) {
            if e.next.is_none() {
                e.next = Some(now);
            }
        }
    }

    /// Forgets learned addresses whose give-up time passed.
    pub fn expire(&mut self, now: Instant) {
        self.entries.retain(|_, e| e.in_flight || e.expires.is_none_or(|t| t > now));
        self.count_learned();
    }

    fn count_learned(&mut self) {
        self.learned = self.entries.values().filter(|e| e.kind == Kind::Learned).count();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Delay before the next try after `failures` failures: doubling from the base up to the cap,
/// with ±20% jitter so that peers cut off together do not retry in lockstep.
fn backoff(s: &Schedule, failures: u32) -> Duration {
    let exp = s.base.saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let d = exp.min(s.cap);
    let jitter = 0.8 + (random_u64() % 401) as f64 / 1000.0;
    d.mul_f64(jitter)
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
        c.to_string().repeat(32).parse().unwrap()
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let d1 = backoff(&S, 1);
        assert!(d1 >= Duration::from_millis(80) && d1 <= Duration::from_millis(120));
        let d3 = backoff(&S, 3);
        assert!(d3 >= Duration::from_millis(320) && d3 <= Duration::from_millis(480));
        for n in [7, 30, u32::MAX] {
            assert!(backoff(&S, n) <= Duration::from_secs(6));
        }
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
        b.left(&id('b'));
        assert_eq!(b.len(), 1);
        b.expire(now + S.give_up + Duration::from_secs(1));
        assert!(b.is_empty());
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
        b.lost(&id('c'), "h:3", true, now);
        assert_eq!(b.due(now + S.base, 10, |_| false), vec!["h:3".to_string()]);
    }

    #[test]
    fn learned_addresses_are_capped() {
        let now = Instant::now();
        let mut b = DialBook::new(S);
        for i in 0..(MAX_LEARNED + 50) {
            b.learn(&format!("10.0.{}.{}:1", i / 256, i % 256), &id('b'), true, now);
        }
        assert_eq!(b.len(), MAX_LEARNED);
    }
}
