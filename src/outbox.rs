//! The queue of frames towards one neighbour, bounded in frames and in bytes, and all queues
//! together bounded in bytes.
//!
//! The mesh never waits on a neighbour: it pushes frames here without blocking, and a push that
//! would exceed a bound is refused (the neighbour is then repaired by anti-entropy). The
//! connection's writer drains the queue as fast as the socket takes it. The shared bound keeps
//! neighbours that never read (a hundred of them, say) from holding the peer's memory between
//! them: past it, every queue refuses until some drain.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

/// Most frames queued towards one neighbour.
pub const MAX_FRAMES: usize = 4096;
/// Most bytes queued towards one neighbour.
pub const MAX_BYTES: usize = 4 * 1024 * 1024;

/// The bytes queued towards all neighbours together, and their bound.
#[derive(Debug)]
pub struct Budget {
    queued: AtomicUsize,
    cap: usize,
    /// Some neighbour needs a digest round (a queue refused a frame, say) since the mesh last
    /// looked: the mesh looks for those neighbours only then, not over all 255 every tick.
    lagging: AtomicBool,
}

impl Budget {
    pub fn new(cap: usize) -> Arc<Budget> {
        Arc::new(Budget { queued: AtomicUsize::new(0), cap, lagging: AtomicBool::new(false) })
    }

    /// Whether some neighbour was found lagging since the last call.
    pub fn take_lagging(&self) -> bool {
        self.lagging.swap(false, Ordering::Relaxed)
    }

    /// Bytes queued towards all neighbours.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

/// A new queue drawing on `budget`: the mesh's end and the writer's end.
pub fn outbox(budget: Arc<Budget>) -> (Outbox, Drain) {
    let (tx, rx) = mpsc::channel(MAX_FRAMES);
    let queued = Arc::new(AtomicUsize::new(0));
    (Outbox { tx, queued: queued.clone(), budget: budget.clone() }, Drain { rx, queued, budget })
}

#[derive(Debug)]
pub struct Outbox {
    tx: mpsc::Sender<Bytes>,
    queued: Arc<AtomicUsize>,
    budget: Arc<Budget>,
}

/// Why a frame was not queued.
#[derive(Debug, PartialEq, Eq)]
pub enum Refused {
    Full,
    Closed,
}

impl Outbox {
    /// Queues a frame unless the queue is full in frames or bytes. Only the peer's one thread
    /// pushes, so checking the byte count and then adding to it cannot overshoot.
    pub fn push(&self, frame: Bytes) -> Result<(), Refused> {
        let len = frame.len();
        if self.queued.load(Ordering::Relaxed) + len > MAX_BYTES || self.budget.queued() + len > self.budget.cap {
            self.note_lagging();
            return Err(Refused::Full);
        }
        match self.tx.try_send(frame) {
            Ok(()) => {
                self.queued.fetch_add(len, Ordering::Relaxed);
                self.budget.queued.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.note_lagging();
                Err(Refused::Full)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Refused::Closed),
        }
    }

    /// Tells the mesh (through the shared budget) that this queue's neighbour needs a digest
    /// round.
    pub fn note_lagging(&self) {
        self.budget.lagging.store(true, Ordering::Relaxed);
    }

    /// Bytes that may be queued now for catch-up: none while earlier frames still wait (catch-up
    /// pauses until the neighbour reads), else half of the queue and of what the shared budget
    /// has left, keeping the rest for live lines.
    pub fn catch_up_room(&self) -> usize {
        if self.queued.load(Ordering::Relaxed) > 0 {
            return 0;
        }
        let shared = self.budget.cap.saturating_sub(self.budget.queued()) / 2;
        (MAX_BYTES / 2).min(shared)
    }

    /// Bytes waiting in this queue.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }
}

pub struct Drain {
    rx: mpsc::Receiver<Bytes>,
    queued: Arc<AtomicUsize>,
    budget: Arc<Budget>,
}

impl Drain {
    /// The next frame; None once the mesh dropped its end and the queue is empty.
    pub async fn recv(&mut self) -> Option<Bytes> {
        let frame = self.rx.recv().await?;
        self.taken(&frame);
        Some(frame)
    }

    /// The next frame if one is queued now.
    pub fn try_recv(&mut self) -> Option<Bytes> {
        let frame = self.rx.try_recv().ok()?;
        self.taken(&frame);
        Some(frame)
    }

    fn taken(&self, frame: &Bytes) {
        self.queued.fetch_sub(frame.len(), Ordering::Relaxed);
        self.budget.queued.fetch_sub(frame.len(), Ordering::Relaxed);
    }
}

impl Drop for Drain {
    /// What was never written no longer counts against the shared budget.
    fn drop(&mut self) {
        self.rx.close();
        while let Ok(frame) = self.rx.try_recv() {
            self.taken(&frame);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget() -> Arc<Budget> {
        Budget::new(usize::MAX / 2)
    }

    #[tokio::test]
    async fn bounded_in_bytes_and_counted_back_when_drained() {
        let (out, mut drain) = outbox(budget());
        let big = Bytes::from(vec![0u8; MAX_BYTES / 4]);
        for _ in 0..4 {
            out.push(big.clone()).unwrap();
        }
        assert_eq!(out.push(Bytes::from_static(b"x")), Err(Refused::Full));
        assert_eq!(out.catch_up_room(), 0);
        drain.recv().await.unwrap();
        assert_eq!(out.push(Bytes::from_static(b"x")), Ok(()));
        assert_eq!(out.catch_up_room(), 0, "catch-up waits while frames are queued");
        drop(drain);
        while out.push(Bytes::from_static(b"y")) == Ok(()) {}
        assert_eq!(out.push(Bytes::from_static(b"y")), Err(Refused::Closed));
    }

    #[test]
    fn all_queues_share_one_budget_and_get_it_back() {
        let shared = Budget::new(1000);
        let (a, drain_a) = outbox(shared.clone());
        let (b, mut drain_b) = outbox(shared.clone());
        assert_eq!(a.catch_up_room(), 500);
        a.push(Bytes::from(vec![0u8; 700])).unwrap();
        assert!(!shared.take_lagging(), "no queue refused a frame yet");
        assert_eq!(b.push(Bytes::from(vec![0u8; 400])), Err(Refused::Full), "the shared budget is spent");
        assert!(shared.take_lagging(), "a refusal is told to the mesh, once");
        assert!(!shared.take_lagging());
        assert_eq!(b.catch_up_room(), 150);
        b.push(Bytes::from(vec![0u8; 300])).unwrap();
        drain_b.try_recv().unwrap();
        drop(drain_a);
        assert_eq!(shared.queued(), 0, "a closed queue gives its bytes back");
    }

    #[test]
    fn bounded_in_frames() {
        let (out, _drain) = outbox(budget());
        for _ in 0..MAX_FRAMES {
            out.push(Bytes::from_static(b"x")).unwrap();
        }
        assert_eq!(out.push(Bytes::from_static(b"x")), Err(Refused::Full));
        assert!(out.budget.take_lagging(), "a queue full in frames is told to the mesh too");
    }
}
