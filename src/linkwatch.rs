//! How the accepting side of a link notices a silent cut without probing it.
//!
//! The kernel watches every link for cuts (see crate::connection): the dialling side's kernel
//! probes a quiet link (TCP keepalive) and ends it when nothing answers within `--timeout`. The
//! accepting side sends no probes of its own. Probes from both sides were two per link and second
//! at rest: at 256 peers on one two-core host, 65,280 a second, fired by the kernel's timers in
//! batches larger than the loopback's backlog holds, and two probes crossing each other got one
//! of them discarded as old (PAWS). Both ended live links, about ten a second.
//!
//! Instead the accepting side's mesh reads, every turn, how many segments its kernel has
//! received on each link it accepted (`TCP_INFO`'s `tcpi_segs_in`, which counts the other side's
//! keepalive probes as they arrive, as well as its data and acknowledgements: TCP then discards a
//! probe without noting the time, so nothing else tells that one came). A link on which nothing
//! at all arrived for the quiet limit is ended as timed out, like a link the kernel ended. A link
//! seen moving is not read at the next turn. One reading is one `getsockopt`, about 1.3 µs and
//! no packet.
//!
//! Both the dialler's probes and the readings are spaced by `--timeout` (see [`Cadence`]): at the
//! default 3 s a probe comes about once a second and most links are read once a second; a longer
//! timeout makes both rarer, so a mesh at rest costs less. Either way a cut is noticed within the
//! timeout plus half a second of the last segment that crossed, and from 3 s on one lost probe
//! does not end a live link (but for the few timeouts [`Cadence::of`] names).

use std::io;
use std::os::fd::AsRawFd;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// The readings' turn is a whole number of these.
const HALF_SECOND: Duration = Duration::from_millis(500);

/// Reading a link more seldom than this saves nothing worth having.
const LONGEST_TURN: Duration = Duration::from_secs(30);

/// The longest keepalive time the kernel takes (`TCP_KEEPIDLE`, in seconds).
const LONGEST_KEEPALIVE_IDLE: u64 = 32_767;

/// How long the accepting side's kernel may hold back its acknowledgement of a segment (its
/// delayed ACK): the dialler's keepalive time starts when that arrives.
const DELAYED_ACK: Duration = Duration::from_millis(200);

/// How the accepting side of a link watches it for cuts, chosen once per peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AcceptedLinks {
    /// Its mesh reads the count of segments received (see the module's doc).
    Counted,
    /// Its kernel probes too, as the dialling side's does: with a `--timeout` under two seconds,
    /// which readings cannot keep while the dialler's probes come a second apart, or when the
    /// open-file limit cannot hold a second descriptor for every link.
    Probed,
}

impl AcceptedLinks {
    pub fn choose(timeout: Duration, max_conns: u32, open_file_limit: u64) -> AcceptedLinks {
        let descriptors = 2 * u64::from(max_conns) + 64;
        if timeout >= Duration::from_secs(2) && open_file_limit >= descriptors {
            AcceptedLinks::Counted
        } else {
            AcceptedLinks::Probed
        }
    }
}

/// This process's limits on open files (soft and hard), if they can be read.
fn open_files() -> Option<libc::rlimit> {
    // SAFETY: getrlimit(2) writes into the struct we pass.
    let mut limit: libc::rlimit = unsafe { std::mem::zeroed() };
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0).then_some(limit)
}

/// This process's limit on open files (its soft limit).
pub fn open_file_limit() -> u64 {
    open_files().map_or(0, |limit| limit.rlim_cur)
}

/// Raises this process's limit on open files to the most it may have (its hard limit): a peer
/// with 512 links, counting the segments of those it accepted, needs over a thousand
/// descriptors, and the usual soft limit is 1,024.
pub fn raise_open_file_limit() {
    if let Some(mut limit) = open_files().filter(|l| l.rlim_cur < l.rlim_max) {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit(2) with a struct we own.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    }
}

/// The dialling side's kernel probes a link quiet for this long, then once a second until it
/// hears back: `--timeout` less two seconds, but at most half of it, in whole seconds as the
/// kernel counts them (at least one, at most the kernel's 32,767). So from a timeout of 3 s on,
/// at least two probes go out before the timeout, and one lost probe or answer does not end a
/// live link.
pub fn keepalive_idle(timeout: Duration) -> Duration {
    let quiet = timeout.saturating_sub(Duration::from_secs(2)).min(timeout / 2);
    Duration::from_secs(quiet.as_secs().clamp(1, LONGEST_KEEPALIVE_IDLE))
}

/// The longest the accepting side may hear nothing from a live dialler at rest that lost one
/// probe: its acknowledgement of the last segment held back ([`DELAYED_ACK`]), the dialler's
/// keepalive time, and a second until the next probe, each wait fired up to an eighth of it late
/// (the kernel's timer wheel rounds a timer up to its level's granularity, at most an eighth).
fn lost_probe_gap(timeout: Duration) -> Duration {
    let late = |wait: Duration| wait + wait / 8;
    DELAYED_ACK + late(keepalive_idle(timeout)) + late(Duration::from_secs(1))
}

/// How often the accepting side reads its links' counts, and how long nothing may arrive on one
/// before it is ended, for a given `--timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cadence {
    pub turn: Duration,
    pub quiet_limit: Duration,
}

impl Cadence {
    /// The longest turn, in half seconds, with a quiet limit that is a whole number of turns and
    /// - outlasts a dialler's probe lost at rest (see `lost_probe_gap`);
    /// - still ends a cut link within the timeout plus half a second of the last segment that
    ///   crossed, which is seen up to two turns late (the turn after a move is passed).
    ///
    /// Where no limit does both (under 3 s, and from 4 s to 4.5 s with timers at their
    /// latest), the turn is half a second and the limit the longest that keeps the promise.
    pub fn of(timeout: Duration) -> Cadence {
        let outlast = lost_probe_gap(timeout);
        let within = timeout.saturating_add(HALF_SECOND);
        let with_turn = |halves: u32| {
            let turn = HALF_SECOND * halves;
            let room = within.saturating_sub(2 * turn);
            let turns = (room.as_nanos() / turn.as_nanos()).min(u128::from(u32::MAX)) as u32;
            Cadence { turn, quiet_limit: turn.saturating_mul(turns) }
        };
        let most = (within.min(LONGEST_TURN * 3).as_millis() / (3 * HALF_SECOND.as_millis())) as u32;
        (1..=most).rev().map(with_turn).find(|c| c.quiet_limit >= outlast).unwrap_or_else(|| with_turn(1))
    }
}

/// One accepted link's count of received segments, as last read.
#[derive(Debug)]
pub struct SegmentWatch {
    /// A duplicate of the connection's socket (the connection's task owns the other): reading
    /// a count never races the task, and the socket stays the same until this is dropped.
    socket: socket2::Socket,
    count: u32,
    moved_at: Instant,
    /// The count moved at the last reading: the next turn passes.
    skip: bool,
}

impl SegmentWatch {
    pub fn new(stream: &TcpStream, now: Instant) -> io::Result<SegmentWatch> {
        let socket = socket2::SockRef::from(stream).try_clone()?;
        let count = segments_in(&socket)?;
        Ok(SegmentWatch { socket, count, moved_at: now, skip: false })
    }

    /// Reads the count, unless it moved at the last reading: whether nothing has arrived for
    /// `limit` as of `now`. A count that cannot be read says nothing (the connection's task
    /// reports a broken socket itself).
    pub fn quiet_for(&mut self, limit: Duration, now: Instant) -> bool {
        if std::mem::take(&mut self.skip) {
            return false;
        }
        match segments_in(&self.socket) {
            Ok(count) if count != self.count => {
                self.count = count;
                self.moved_at = now;
                self.skip = true;
                false
            }
            Ok(_) => now.saturating_duration_since(self.moved_at) >= limit,
            Err(_) => false,
        }
    }
}

/// The kernel's count of segments received on `socket`, any kind (it wraps).
fn segments_in(socket: &socket2::Socket) -> io::Result<u32> {
    // SAFETY: tcp_info is plain data; the kernel fills at most `len` bytes of it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt(2) on a socket we own, into a buffer of `len` bytes.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // Kernels before 4.2 do not fill it in.
    if (len as usize) < std::mem::offset_of!(libc::tcp_info, tcpi_segs_in) + 4 {
        return Err(io::Error::new(io::ErrorKind::Unsupported, "this kernel does not count segments received"));
    }
    Ok(info.tcpi_segs_in)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_default_cadence_reads_twice_a_second_and_leaves_a_probe_room() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        // Default: probes a second apart after one second of quiet; one lost probe leaves a gap
        // of two seconds, which must not end the link.
        assert_eq!(keepalive_idle(s(3)), s(1));
        assert_eq!(Cadence::of(s(3)), Cadence { turn: ms(500), quiet_limit: ms(2500) });
        assert_eq!(keepalive_idle(s(4)), s(2));
        assert_eq!(Cadence::of(s(4)), Cadence { turn: ms(500), quiet_limit: ms(3500) });
        // The lab's 2 s, the shortest counted (see AcceptedLinks): the dialler probes a second
        // apart anyway.
        assert_eq!(keepalive_idle(s(2)), s(1));
        assert_eq!(Cadence::of(s(2)), Cadence { turn: ms(500), quiet_limit: ms(1500) });
    }

    #[test]
    fn a_longer_timeout_probes_and_reads_more_seldom() {
        let s = Duration::from_secs;
        assert_eq!(keepalive_idle(s(10)), s(5));
        assert_eq!(
            Cadence::of(s(10)),
            Cadence { turn: Duration::from_millis(1500), quiet_limit: Duration::from_millis(7500) }
        );
        assert_eq!(keepalive_idle(s(3600)), s(1800));
        assert_eq!(Cadence::of(s(3600)).turn, LONGEST_TURN);
        // The idle time grows in whole seconds, so the turn does not grow at every step, but a
        // timeout twice as long never reads more often.
        for t in (30..=600).map(|tenths| Duration::from_millis(100 * tenths)) {
            let (once, twice) = (Cadence::of(t), Cadence::of(2 * t));
            assert!(twice.turn >= once.turn, "{t:?}: {once:?}, twice as long: {twice:?}");
        }
    }

    #[test]
    fn every_cadence_keeps_the_promise_and_outlasts_a_lost_probe() {
        let ms = Duration::from_millis;
        // The kernel, written out apart from the code: a wait fires up to an eighth of it late,
        // the last segment's acknowledgement may be held 200 ms, and after a lost probe the
        // next one comes a second later.
        let gap = |t: Duration| {
            let idle = keepalive_idle(t).as_secs_f64();
            Duration::from_secs_f64(0.2 + idle * 1.125 + 1.125)
        };
        for t in (20..=3000).map(|tenths| ms(100 * tenths)) {
            let c = Cadence::of(t);
            assert!(c.turn >= HALF_SECOND && c.turn.as_millis().is_multiple_of(500), "{t:?}: {c:?}");
            assert!(c.quiet_limit.as_nanos().is_multiple_of(c.turn.as_nanos()), "{t:?}: {c:?} ends between turns");
            assert!(c.quiet_limit >= 2 * c.turn, "{t:?}: {c:?}");
            // The last segment that crossed is seen up to two turns late.
            assert!(c.quiet_limit + 2 * c.turn <= t + HALF_SECOND, "{t:?}: {c:?} is too slow");
            let no_room = t < ms(3000) || (ms(4000)..ms(4500)).contains(&t);
            assert!(no_room || c.quiet_limit >= gap(t), "{t:?}: {c:?} ends a link that lost one probe");
        }
        // A probe lost after 6 s of quiet comes again 8.1 s after the last segment at worst.
        assert!(Cadence::of(Duration::from_secs(12)).quiet_limit >= ms(8100));
    }

    #[test]
    fn absurd_timeouts_neither_panic_nor_wrap() {
        assert_eq!(keepalive_idle(Duration::MAX), Duration::from_secs(32_767));
        let c = Cadence::of(Duration::MAX);
        assert_eq!(c.turn, LONGEST_TURN);
        assert!(c.quiet_limit > Duration::from_secs(100 * 365 * 86_400), "longer than a century: {c:?}");
    }

    #[test]
    fn accepted_links_are_counted_unless_the_timeout_or_the_descriptors_are_too_short() {
        let s = Duration::from_secs;
        assert_eq!(AcceptedLinks::choose(s(3), 512, 20_000), AcceptedLinks::Counted);
        assert_eq!(AcceptedLinks::choose(s(2), 512, 20_000), AcceptedLinks::Counted);
        assert_eq!(AcceptedLinks::choose(Duration::from_millis(1500), 512, 20_000), AcceptedLinks::Probed);
        assert_eq!(AcceptedLinks::choose(s(3), 512, 1024), AcceptedLinks::Probed);
        assert_eq!(AcceptedLinks::choose(s(3), 256, 1024), AcceptedLinks::Counted);
    }

    #[tokio::test]
    async fn a_link_is_quiet_until_a_segment_arrives() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut dialer = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (mut accepted, _) = listener.accept().await.unwrap();
        let t0 = Instant::now();
        let mut watch = SegmentWatch::new(&accepted, t0).unwrap();
        let limit = Duration::from_secs(2);
        assert!(!watch.quiet_for(limit, t0 + Duration::from_secs(1)), "quiet, but not for long enough");
        assert!(watch.quiet_for(limit, t0 + limit), "nothing arrived for the limit");

        dialer.write_all(b"x").await.unwrap();
        let mut byte = [0u8; 1];
        accepted.read_exact(&mut byte).await.unwrap();
        let t1 = t0 + Duration::from_secs(5);
        assert!(!watch.quiet_for(limit, t1), "a segment arrived: the clock starts again");
        assert!(!watch.quiet_for(limit, t1 + limit), "the turn after a move is passed");
        assert!(!watch.quiet_for(limit, t1 + Duration::from_secs(1)));
        assert!(watch.quiet_for(limit, t1 + limit));
    }
}
