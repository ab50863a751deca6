//! The peer table: which members this peer is directly connected to, over which connection.
//!
//! Exactly one connection per pair is kept. When two connections to the same peer exist (both
//! sides dialled at once, or one dialled twice), both ends keep the one dialled by the smaller
//! id, ties broken by the dialler's nonce: a rule both sides compute alike, so they agree without
//! talking. The loser is closed with a `dup` notice; a peer whose connection was closed that way
//! stays "up" for a short grace period while its replacement arrives, so a swap is never reported
//! as a departure.

use std::collections::HashMap;
use std::net::IpAddr;

use bytes::Bytes;
use tokio::time::Instant;

use crate::frame::{Nonce, PeerInfo};
use crate::id::PeerId;
use crate::identity::PublicKey;
use crate::linkwatch::SegmentWatch;
use crate::outbox::{Outbox, Refused};

/// Identifies one connection task.
pub type ConnId = u64;

/// Which of two connections between the same pair wins: the smaller link.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Link {
    pub dialer: PeerId,
    /// The dialler's preamble nonce on that connection.
    pub nonce: Nonce,
}

/// A directly connected peer.
#[derive(Debug)]
pub struct Neighbour {
    pub info: PeerInfo,
    /// Its public key (its id), decoded once: checks its goodbye and notices.
    pub key: PublicKey,
    pub conn: ConnId,
    pub outbox: Outbox,
    pub incarnation: u64,
    pub link: Link,
    /// The other side said this connection is a duplicate: a replacement is coming.
    pub superseded: bool,
    /// The other side said goodbye.
    pub leaving: bool,
    /// It needs a digest round to catch up: a frame to it could not be queued, or one of its
    /// lines was turned away here, or it said (in a probe) that it has lines we lack. Set through
    /// `send` or `mark_lagging`, which also tell the mesh to look (see `Budget::take_lagging`).
    pub lagging: bool,
    /// When a frame last came from it.
    pub last_heard: Instant,
    /// When a probe (`ping`) went to it that nothing has answered since.
    pub probe: Option<Instant>,
    /// When its word that another neighbour is silent (`suspect`) was last taken.
    pub suspected_at: Option<Instant>,
    /// When this connection was admitted.
    pub up_since: Instant,
    /// The host it connects from (for per-host limits).
    pub host: IpAddr,
    /// Its id was unknown when it was admitted (for the slots kept for known members).
    pub stranger: bool,
    /// On a link it dialled (this side accepted), its count of segments received, read to
    /// notice a silent cut (see crate::linkwatch).
    pub watch: Option<SegmentWatch>,
}

impl Neighbour {
    /// Queues a frame; a full queue marks the neighbour as lagging (catch-up repairs it). A
    /// closed queue needs nothing here: the connection's end is reported on its own.
    pub fn send(&mut self, frame: Bytes) {
        if self.outbox.push(frame) == Err(Refused::Full) {
            self.lagging = true;
        }
    }

    /// Marks it for a digest round at the next tick.
    pub fn mark_lagging(&mut self) {
        self.lagging = true;
        self.outbox.note_lagging();
    }
}

/// What admitting a new connection did.
#[derive(Debug)]
pub enum Admission {
    /// A peer not connected before.
    New,
    /// The peer was mid-swap; this is its replacement connection.
    Resumed,
    /// The peer restarted (same id, new process): its old connection is dead.
    Restarted(Neighbour),
    /// The new connection wins over the existing one, which must be closed as a duplicate.
    Replaced(Neighbour),
    /// The existing connection wins; the new one must be closed as a duplicate.
    Rejected(Neighbour),
}

struct Swapping {
    info: PeerInfo,
    incarnation: u64,
    until: Instant,
}

#[derive(Default)]
pub struct Table {
    /// Boxed: a hash table keeps up to twice as many slots as entries, and a neighbour is
    /// hundreds of bytes.
    by_id: HashMap<PeerId, Box<Neighbour>>,
    by_conn: HashMap<ConnId, PeerId>,
    swapping: HashMap<PeerId, Swapping>,
}

impl Table {
    pub fn admit(&mut self, n: Neighbour) -> Admission {
        let id = n.info.id;
        let admission = match self.by_id.get(&id) {
            Some(cur) if cur.incarnation != n.incarnation => Admission::Restarted(self.remove(&id)),
            Some(cur) if n.link < cur.link => Admission::Replaced(self.remove(&id)),
            Some(_) => return Admission::Rejected(n),
            None => match self.swapping.remove(&id) {
                Some(s) if s.incarnation == n.incarnation => Admission::Resumed,
                _ => Admission::New,
            },
        };
        self.by_conn.insert(n.conn, id);
        self.by_id.insert(id, Box::new(n));
        admission
    }

    /// Removes the neighbour on `conn`, if that connection is the registered one.
    pub fn remove_conn(&mut self, conn: ConnId) -> Option<Neighbour> {
        let id = *self.by_conn.get(&conn)?;
        Some(self.remove(&id))
    }

    fn remove(&mut self, id: &PeerId) -> Neighbour {
        let n = self.by_id.remove(id).expect("callers check presence");
        self.by_conn.remove(&n.conn);
        *n
    }

    /// Holds a superseded neighbour as still up until `until`, awaiting its new connection.
    pub fn hold_for_swap(&mut self, n: Neighbour, until: Instant) {
        let s = Swapping { info: n.info, incarnation: n.incarnation, until };
        self.swapping.insert(s.info.id, s);
    }

    /// Peers whose swap grace ran out: they are gone.
    pub fn expired_swaps(&mut self, now: Instant) -> Vec<PeerInfo> {
        let ids: Vec<PeerId> = self.swapping.iter().filter(|(_, s)| s.until <= now).map(|(id, _)| *id).collect();
        ids.into_iter().filter_map(|id| self.swapping.remove(&id)).map(|s| s.info).collect()
    }

    pub fn by_conn_mut(&mut self, conn: ConnId) -> Option<&mut Neighbour> {
        let id = self.by_conn.get(&conn)?;
        self.by_id.get_mut(id).map(|n| &mut **n)
    }

    pub fn get_mut(&mut self, id: &PeerId) -> Option<&mut Neighbour> {
        self.by_id.get_mut(id).map(|n| &mut **n)
    }

    /// Connected, or mid-swap (which counts as connected).
    pub fn is_up(&self, id: &PeerId) -> bool {
        self.by_id.contains_key(id) || self.swapping.contains_key(id)
    }

    /// Neighbours connected now.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty() && self.swapping.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Neighbour> {
        self.by_id.values().map(|n| &**n)
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut Neighbour> {
        self.by_id.values_mut().map(|n| &mut **n)
    }

    /// Everyone this peer counts as connected, sorted by name.
    pub fn infos(&self) -> Vec<PeerInfo> {
        let mut v: Vec<PeerInfo> =
            self.by_id.values().map(|n| n.info.clone()).chain(self.swapping.values().map(|s| s.info.clone())).collect();
        v.sort_by(|a, b| (&a.name, &a.id).cmp(&(&b.name, &b.id)));
        v
    }

    /// Takes every neighbour out (for leaving).
    pub fn drain(&mut self) -> Vec<Neighbour> {
        self.by_conn.clear();
        self.swapping.clear();
        self.by_id.drain().map(|(_, n)| *n).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(c: char) -> PeerId {
        c.to_string().repeat(64).parse().unwrap()
    }

    fn neighbour(conn: ConnId, dialer: char, nonce: u8, incarnation: u64) -> Neighbour {
        let (outbox, _drain) = crate::outbox::outbox(crate::outbox::Budget::new(1 << 20));
        Neighbour {
            info: PeerInfo { id: id('b'), name: "b".into(), addr: "127.0.0.1:2".into() },
            key: PublicKey::of(&crate::identity::Identity::generate().id()).unwrap(),
            conn,
            outbox,
            incarnation,
            link: Link { dialer: id(dialer), nonce: crate::id::Hex([nonce; 32]) },
            superseded: false,
            leaving: false,
            lagging: false,
            last_heard: Instant::now(),
            probe: None,
            suspected_at: None,
            up_since: Instant::now(),
            host: IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            watch: None,
            stranger: false,
        }
    }

    #[test]
    fn both_ends_keep_the_same_connection_whatever_the_order() {
        // Connection 1 dialled by 'a' (smaller), connection 2 dialled by 'b'.
        let mut one = Table::default();
        assert!(matches!(one.admit(neighbour(1, 'a', 9, 0)), Admission::New));
        assert!(matches!(one.admit(neighbour(2, 'b', 1, 0)), Admission::Rejected(n) if n.conn == 2));
        let mut other = Table::default();
        assert!(matches!(other.admit(neighbour(2, 'b', 1, 0)), Admission::New));
        assert!(matches!(other.admit(neighbour(1, 'a', 9, 0)), Admission::Replaced(n) if n.conn == 2));
        assert_eq!(one.by_id[&id('b')].conn, 1);
        assert_eq!(other.by_id[&id('b')].conn, 1);
    }

    #[test]
    fn same_dialler_twice_is_decided_by_nonce() {
        let mut t = Table::default();
        t.admit(neighbour(1, 'a', 7, 0));
        assert!(matches!(t.admit(neighbour(2, 'a', 3, 0)), Admission::Replaced(_)));
        assert!(t.remove_conn(1).is_none(), "the replaced connection is no longer registered");
    }

    #[test]
    fn a_restarted_peer_replaces_its_dead_connection() {
        let mut t = Table::default();
        t.admit(neighbour(1, 'a', 1, 10));
        assert!(matches!(t.admit(neighbour(2, 'b', 9, 11)), Admission::Restarted(n) if n.conn == 1));
    }

    #[test]
    fn a_swap_within_grace_is_silent() {
        let mut t = Table::default();
        t.admit(neighbour(1, 'b', 1, 0));
        let old = t.remove_conn(1).unwrap();
        let now = Instant::now();
        t.hold_for_swap(old, now + std::time::Duration::from_secs(1));
        assert!(t.is_up(&id('b')));
        assert!(matches!(t.admit(neighbour(2, 'a', 1, 0)), Admission::Resumed));
        assert!(t.expired_swaps(now + std::time::Duration::from_secs(2)).is_empty());
    }

    #[test]
    fn an_expired_swap_is_a_departure() {
        let mut t = Table::default();
        t.admit(neighbour(1, 'b', 1, 0));
        let old = t.remove_conn(1).unwrap();
        let now = Instant::now();
        t.hold_for_swap(old, now);
        assert_eq!(t.expired_swaps(now).len(), 1);
        assert!(!t.is_up(&id('b')));
    }
}
