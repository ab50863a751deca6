//! The queue of frames towards one neighbour, bounded in frames and in bytes.
//!
//! The mesh never waits on a neighbour: it pushes frames here without blocking, and a push that
//! would exceed either bound is refused (the neighbour is then repaired by anti-entropy). The
//! connection's writer drains the queue as fast as the socket takes it.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use tokio::sync::mpsc;

/// Most frames queued towards one neighbour.
pub const MAX_FRAMES: usize = 4096;
/// Most bytes queued towards one neighbour.
pub const MAX_BYTES: usize = 4 * 1024 * 1024;

/// A new queue: the mesh's end and the writer's end.
pub fn outbox() -> (Outbox, Drain) {
    let (tx, rx) = mpsc::channel(MAX_FRAMES);
    let queued = Arc::new(AtomicUsize::new(0));
    (Outbox { tx, queued: queued.clone() }, Drain { rx, queued })
}

#[derive(Debug)]
pub struct Outbox {
    tx: mpsc::Sender<Bytes>,
    queued: Arc<AtomicUsize>,
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
        if self.queued.load(Ordering::Relaxed) + len > MAX_BYTES {
            return Err(Refused::Full);
        }
        match self.tx.try_send(frame) {
            Ok(()) => {
                self.queued.fetch_add(len, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => Err(Refused::Full),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(Refused::Closed),
        }
    }

    /// Bytes that may still be queued for catch-up, keeping half of the queue for live lines.
    pub fn catch_up_room(&self) -> usize {
        let frames_left = self.tx.capacity().saturating_sub(MAX_FRAMES / 2);
        let bytes_left = (MAX_BYTES / 2).saturating_sub(self.queued.load(Ordering::Relaxed));
        if frames_left == 0 { 0 } else { bytes_left }
    }
}

pub struct Drain {
    rx: mpsc::Receiver<Bytes>,
    queued: Arc<AtomicUsize>,
}

impl Drain {
    /// The next frame; None once the mesh dropped its end and the queue is empty.
    pub async fn recv(&mut self) -> Option<Bytes> {
        let frame = self.rx.recv().await?;
        self.queued.fetch_sub(frame.len(), Ordering::Relaxed);
        Some(frame)
    }

    /// The next frame if one is queued now.
    pub fn try_recv(&mut self) -> Option<Bytes> {
        let frame = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(frame.len(), Ordering::Relaxed);
        Some(frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bounded_in_bytes_and_counted_back_when_drained() {
        let (out, mut drain) = outbox();
        let big = Bytes::from(vec![0u8; MAX_BYTES / 4]);
        for _ in 0..4 {
            out.push(big.clone()).unwrap();
        }
        assert_eq!(out.push(Bytes::from_static(b"x")), Err(Refused::Full));
        assert_eq!(out.catch_up_room(), 0);
        drain.recv().await.unwrap();
        assert_eq!(out.push(Bytes::from_static(b"x")), Ok(()));
        drop(drain);
        while out.push(Bytes::from_static(b"y")) == Ok(()) {}
        assert_eq!(out.push(Bytes::from_static(b"y")), Err(Refused::Closed));
    }

    #[test]
    fn bounded_in_frames() {
        let (out, _drain) = outbox();
        for _ in 0..MAX_FRAMES {
            out.push(Bytes::from_static(b"x")).unwrap();
        }
        assert_eq!(out.push(Bytes::from_static(b"x")), Err(Refused::Full));
    }
}
