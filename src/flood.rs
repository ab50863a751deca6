//! Flood control: how many lines of its own each member may send, kept per identity.
//!
//! Each member has a token bucket (`--line-rate` a second on average, `--line-burst` at once).
//! The buckets belong to ids, not to connections, and outlive them: a member that reconnects
//! (with a new incarnation, say) after each burst finds its bucket as it left it. The buckets
//! are bounded in number; the least recently used goes first.

use std::collections::HashMap;

use tokio::time::Instant;

use crate::id::PeerId;

/// Most buckets kept.
const MAX_BUCKETS: usize = 4096;

/// A token bucket: how many lines of its own a neighbour may still send.
#[derive(Debug)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
    rate: f64,
    burst: f64,
    /// Live lines (not catch-up) refused in the current window.
    refused_live: u64,
    window: Instant,
}

/// Refusals of live lines are counted over windows this long.
const FLOOD_WINDOW: std::time::Duration = std::time::Duration::from_secs(5);

/// What the bucket says of a batch of lines.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    /// Some lines refused for now.
    Refuse {
        /// The first live refusal of the window: worth telling the sender.
        first: bool,
        /// More live lines refused in this window than a whole burst: the sender floods.
        flooding: bool,
    },
}

impl Bucket {
    pub fn new(rate: f64, burst: f64, now: Instant) -> Bucket {
        Bucket { tokens: burst, last: now, rate, burst, refused_live: 0, window: now }
    }

    /// Takes a token for each of up to `n` lines; returns how many it took. Lines beyond that
    /// are refused for now (the first live refusal of a window is worth telling the sender).
    /// Catch-up lines (sent because we asked) are limited alike but never count as flooding.
    pub fn take(&mut self, now: Instant, n: u64, live: bool) -> (u64, Verdict) {
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst);
        self.last = now;
        let taken = (self.tokens.floor() as u64).min(n);
        self.tokens -= taken as f64;
        if taken == n {
            return (taken, Verdict::Accept);
        }
        if !live {
            return (taken, Verdict::Refuse { first: false, flooding: false });
        }
        if now.duration_since(self.window) > FLOOD_WINDOW {
            self.window = now;
            self.refused_live = 0;
        }
        let first = self.refused_live == 0;
        self.refused_live += n - taken;
        (taken, Verdict::Refuse { first, flooding: self.refused_live as f64 > self.burst })
    }

    /// Whole tokens the bucket holds at `now`.
    pub fn available(&self, now: Instant) -> u64 {
        (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(self.burst) as u64
    }

    /// How full the bucket would be at `now`, from 0 to 1.
    fn level(&self, now: Instant) -> f64 {
        ((self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate) / self.burst).min(1.0)
    }
}

/// Every member's bucket.
pub struct Buckets {
    rate: f64,
    burst: f64,
    by_id: HashMap<PeerId, Bucket>,
}

impl Buckets {
    pub fn new(rate: f64, burst: f64) -> Buckets {
        Buckets { rate, burst, by_id: HashMap::new() }
    }

    /// The bucket of `id`, made full if it has none.
    pub fn of(&mut self, id: &PeerId, now: Instant) -> &mut Bucket {
        if !self.by_id.contains_key(id) && self.by_id.len() >= MAX_BUCKETS {
            // A full bucket is as good as none: forget the fullest first, then the oldest.
            let victim = self
                .by_id
                .iter()
                .max_by(|a, b| a.1.level(now).total_cmp(&b.1.level(now)).then(b.1.last.cmp(&a.1.last)))
                .map(|(id, _)| *id);
            if let Some(v) = victim {
                self.by_id.remove(&v);
            }
        }
        self.by_id.entry(*id).or_insert_with(|| Bucket::new(self.rate, self.burst, now))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, 5.0, t0);
        let verdicts: Vec<Verdict> = (0..7).map(|_| b.take(t0, 1, true).1).collect();
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Accept).count(), 5);
        assert_eq!(verdicts[5], Verdict::Refuse { first: true, flooding: false });
        assert_eq!(verdicts[6], Verdict::Refuse { first: false, flooding: false });
        assert_eq!(b.take(t0 + Duration::from_millis(100), 1, true).1, Verdict::Accept, "a tenth of a second later");
        let later = t0 + Duration::from_millis(100);
        let floods: Vec<bool> =
            (0..4).map(|_| matches!(b.take(later, 1, true).1, Verdict::Refuse { flooding: true, .. })).collect();
        assert_eq!(floods, [false, false, false, true], "the sixth refusal of the window is past the burst of 5");
        // A new window forgets the old refusals.
        let next_window = t0 + FLOOD_WINDOW + Duration::from_secs(1);
        assert_eq!(
            b.take(next_window, 100, true).1,
            Verdict::Refuse { first: true, flooding: true },
            "a flood at once"
        );
        let after = next_window + FLOOD_WINDOW + Duration::from_secs(1);
        assert_eq!(b.take(after, 20, true).1, Verdict::Refuse { first: true, flooding: true });
        assert_eq!(
            b.take(after, 1, false).1,
            Verdict::Refuse { first: false, flooding: false },
            "catch-up never floods"
        );
    }

    #[test]
    fn a_batch_takes_what_the_bucket_has() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, 5.0, t0);
        assert_eq!(b.take(t0, 3, true), (3, Verdict::Accept));
        assert_eq!(
            b.take(t0, 3, true),
            (2, Verdict::Refuse { first: true, flooding: false }),
            "2 of 3 now, the third later"
        );
        assert_eq!(b.take(t0, 2, true), (0, Verdict::Refuse { first: false, flooding: false }));
    }

    #[test]
    fn catch_up_we_asked_for_is_limited_but_never_flooding() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, 5.0, t0);
        let verdicts: Vec<Verdict> = (0..1000).map(|_| b.take(t0, 1, false).1).collect();
        assert_eq!(verdicts.iter().filter(|v| **v == Verdict::Accept).count(), 5);
        assert!(verdicts.iter().all(|v| !matches!(v, Verdict::Refuse { flooding: true, .. })));
    }

    #[test]
    fn a_bucket_follows_its_id_across_reconnects() {
        let t0 = Instant::now();
        let mut buckets = Buckets::new(10.0, 5.0);
        let id = crate::identity::Identity::generate().id();
        for _ in 0..5 {
            assert_eq!(buckets.of(&id, t0).take(t0, 1, true).1, Verdict::Accept);
        }
        // A new connection of the same member: the same, empty bucket.
        assert_eq!(buckets.of(&id, t0).take(t0, 1, true).1, Verdict::Refuse { first: true, flooding: false });
        let other = crate::identity::Identity::generate().id();
        assert_eq!(buckets.of(&other, t0).take(t0, 1, true).1, Verdict::Accept, "others have their own");
    }

    #[test]
    fn buckets_are_bounded_and_keep_the_empty_ones() {
        let t0 = Instant::now();
        let mut buckets = Buckets::new(1.0, 2.0);
        let drained = crate::identity::Identity::generate().id();
        buckets.of(&drained, t0).take(t0, 1, true);
        buckets.of(&drained, t0).take(t0, 1, true);
        for _ in 0..MAX_BUCKETS + 10 {
            buckets.of(&crate::identity::Identity::generate().id(), t0);
        }
        assert!(buckets.by_id.len() <= MAX_BUCKETS);
        assert!(matches!(buckets.of(&drained, t0).take(t0, 1, true).1, Verdict::Refuse { .. }), "still drained");
    }
}
