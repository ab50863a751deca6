//! One TCP connection to another peer, from handshake to close.
//!
//! A connection task drives the handshake ([`crate::handshake`]) under a deadline, hands the
//! result to the mesh, then runs a reader and a writer. The writer sends what the mesh queues;
//! the reader passes valid messages to the mesh and drops
//! the connection on silence, on a malformed frame or on a protocol violation, with one log
//! line saying why. Nothing a remote sends can make this task panic or allocate more than one
//! frame. When the mesh drops its queue sender, the writer flushes what is queued and the
//! connection closes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::frame::{self, Hello, Message};
use crate::handshake::{Established, Handshake, HandshakeError, Local, Progress, Side};
use crate::hook::Conditions;
use crate::linkwatch::{self, AcceptedLinks, SegmentWatch};
use crate::neighbours::ConnId;
use crate::noise::{Opener, Sealer};
use crate::outbox::{Budget, Drain, Outbox, outbox};

/// Who opened the connection.
#[derive(Debug)]
pub enum Role {
    /// We dialled this address.
    Dialer { target: String },
    /// It dialled us; it counts as half-open for its address until its hello is handled.
    Acceptor(HalfOpen),
}

/// Most accepted connections from one host still in their handshake: a flood of silent sockets
/// from one host cannot take every connection slot from the others. (Room for a 64-peer lab on
/// one loopback address starting all at once.)
pub const MAX_HALF_OPEN_PER_IP: usize = 64;

/// Accepted connections still in their handshake, per source address.
#[derive(Debug, Default)]
pub struct HalfOpenCounts(Mutex<HashMap<IpAddr, usize>>);

/// One accepted connection counted as half-open until dropped.
#[derive(Debug)]
pub struct HalfOpen {
    ip: IpAddr,
    counts: Arc<HalfOpenCounts>,
}

impl HalfOpenCounts {
    /// Counts a new connection from `ip`, unless its host already has too many.
    pub fn enter(self: &Arc<Self>, ip: IpAddr) -> Option<HalfOpen> {
        let ip = crate::addr::host_of(ip);
        let mut counts = self.0.lock().expect("never poisoned: nothing panics while holding it");
        let n = counts.entry(ip).or_default();
        if *n >= MAX_HALF_OPEN_PER_IP {
            return None;
        }
        *n += 1;
        Some(HalfOpen { ip, counts: self.clone() })
    }
}

impl Drop for HalfOpen {
    fn drop(&mut self) {
        let mut counts = self.counts.0.lock().expect("never poisoned: nothing panics while holding it");
        if let Some(n) = counts.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                counts.remove(&self.ip);
            }
        }
    }
}

/// A connection whose handshake completed.
pub struct Ready {
    pub conn: ConnId,
    pub role: Role,
    pub established: Box<Established>,
    pub observed: SocketAddr,
    pub outbox: Outbox,
    /// On an accepted link, its count of received segments (see crate::linkwatch).
    pub watch: Option<SegmentWatch>,
}

/// How a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The remote closed it or it was reset.
    Closed,
    /// Nothing arrived for the liveness timeout.
    Timeout,
    /// The remote broke the protocol.
    Violation,
    /// The mesh closed it.
    Local,
}

/// What connection tasks tell the mesh.
pub enum ConnEvent {
    Ready(Box<Ready>),
    Received {
        conn: ConnId,
        msg: Message,
    },
    Closed {
        conn: ConnId,
        reason: CloseReason,
    },
    /// A dial ended before its handshake completed.
    DialFailed {
        target: String,
        unresolved: bool,
        error: String,
    },
}

/// What every connection task shares.
pub struct Context {
    pub events: mpsc::Sender<ConnEvent>,
    /// Source address for outgoing connections (the --bind address, when not a wildcard).
    pub source: Option<IpAddr>,
    /// Our identity and, in a private mesh, the mesh key.
    pub local: Local,
    pub reported: Reported,
    pub half_open: Arc<HalfOpenCounts>,
    /// Bytes and frames that crossed this peer's connections, both ways.
    pub traffic: Arc<Traffic>,
    pub timeout: Duration,
    /// How accepted links are watched for cuts (see crate::linkwatch).
    pub accepted_links: AcceptedLinks,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
    /// The lab hook's link conditions (with `--lab` only).
    pub conditions: Option<Arc<Conditions>>,
}

/// Remembers which failures were reported lately, so that a peer redialling every few seconds
/// produces one log line, not one per attempt.
#[derive(Default)]
pub struct Reported(std::sync::Mutex<std::collections::HashMap<String, Instant>>);

/// How long the same failure from the same place stays quiet after it was reported.
const REPORT_EVERY: Duration = Duration::from_secs(60);
/// Most failures remembered as reported.
const MAX_REPORTED: usize = 1024;

impl Reported {
    /// Whether `what` should be logged now.
    pub fn first(&self, what: String) -> bool {
        let mut seen = self.0.lock().expect("never poisoned: nothing panics while holding it");
        let now = Instant::now();
        if seen.len() >= MAX_REPORTED {
            seen.retain(|_, at| now.duration_since(*at) < REPORT_EVERY);
            if seen.len() >= MAX_REPORTED {
                // A storm of distinct failures: start over (some repeat early) rather than grow.
                seen.clear();
            }
        }
        match seen.get(&what) {
            Some(at) if now.duration_since(*at) < REPORT_EVERY => false,
            _ => {
                seen.insert(what, now);
                true
            }
        }
    }
}

/// Frames from the other side, decrypted once the connection is keyed.
struct Reader {
    frames: FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
    open: Option<Opener>,
}

impl Reader {
    /// The next frame, whole and (when keyed) decrypted. Cancel-safe: nothing is consumed until
    /// a whole frame has arrived.
    async fn next(&mut self) -> Option<std::io::Result<Bytes>> {
        // Here rather than after a frame is split off: by now that frame, which shares the
        // buffer's allocation, is gone.
        shrink_when_empty(self.frames.read_buffer_mut(), READ_BUFFER);
        let raw = match self.frames.next().await? {
            Ok(raw) => raw.freeze(),
            Err(e) => return Some(Err(e)),
        };
        Some(match &mut self.open {
            None => Ok(raw),
            Some(open) => open.open(&raw).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        })
    }
}

/// Frames to the other side, encrypted once the connection is keyed.
struct Writer {
    frames: FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>,
    seal: Option<Sealer>,
}

impl Writer {
    fn wrap(&mut self, payload: Bytes) -> std::io::Result<Bytes> {
        match &mut self.seal {
            None => Ok(payload),
            Some(seal) => seal.seal(&payload).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
        }
    }

    async fn feed(&mut self, payload: Bytes) -> std::io::Result<()> {
        let frame = self.wrap(payload)?;
        self.frames.feed(frame).await
    }

    /// Sends frames as they are (already sealed when they need to be).
    async fn send_raw(&mut self, frames: Vec<Bytes>) -> std::io::Result<()> {
        for f in frames {
            self.frames.feed(f).await?;
        }
        self.flush().await
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        SinkExt::<Bytes>::flush(&mut self.frames).await?;
        shrink_when_empty(self.frames.write_buffer_mut(), WRITE_BUFFER);
        Ok(())
    }
}

/// Gives back a buffer that grew past `size` (for a frame larger than a line: a digest, a
/// catch-up batch, a list of members) once it holds nothing: otherwise each of 255 connections
/// would keep the largest frame it ever carried. (`capacity` counts only what lies past the
/// frames already split off or written; `try_reclaim` finds whether the whole allocation is
/// this buffer's alone and larger than `size`.)
fn shrink_when_empty(buffer: &mut bytes::BytesMut, size: usize) {
    if buffer.is_empty() && buffer.try_reclaim(size + 1) {
        *buffer = bytes::BytesMut::with_capacity(size);
    }
}

/// Why a connection ended before its handshake completed.
#[derive(Debug, thiserror::Error)]
enum SetupError {
    #[error("connection closed during the handshake")]
    Eof,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
}

/// Dials `target` and runs the connection; reports a failed dial to the mesh.
pub async fn dial(target: String, hello: Hello, conn: ConnId, ctx: Arc<Context>, budget: Arc<Budget>) {
    match reach(&target, &ctx).await {
        Ok(stream) => run(stream, Role::Dialer { target }, hello, conn, ctx, budget).await,
        Err((unresolved, error)) => {
            let _ = ctx.events.send(ConnEvent::DialFailed { target, unresolved, error }).await;
        }
    }
}

/// Resolves `target` and connects to the first address that answers, both within the connect
/// timeout. Fails with whether the name did not resolve, and why.
async fn reach(target: &str, ctx: &Context) -> Result<TcpStream, (bool, String)> {
    let limit = ctx.connect_timeout;
    let deadline = Instant::now() + limit;
    let addrs: Vec<SocketAddr> = match timeout_at(deadline, tokio::net::lookup_host(target)).await {
        Ok(Ok(addrs)) => addrs.collect(),
        Ok(Err(e)) => return Err((true, e.to_string())),
        Err(_) => return Err((true, format!("name lookup timed out after {limit:?}"))),
    };
    let connect = async {
        let mut last = String::from("no address");
        for addr in addrs {
            match connect_from(ctx.source, addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = e.to_string(),
            }
        }
        Err((false, last))
    };
    timeout_at(deadline, connect).await.unwrap_or_else(|_| Err((false, format!("connect timed out after {limit:?}"))))
}

/// Connects to `addr`, from `source` when it is set and of the same family, so that a peer
/// bound to one address of a multi-homed host is seen by others at that address.
async fn connect_from(source: Option<IpAddr>, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(ip) = source.filter(|ip| ip.is_ipv4() == addr.is_ipv4()) {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(addr).await
}

/// Runs an established TCP connection until it closes: the handshake (with `hello` as ours),
/// then frames both ways.
pub async fn run(stream: TcpStream, role: Role, hello: Hello, conn: ConnId, ctx: Arc<Context>, budget: Arc<Budget>) {
    let observed = match stream.peer_addr() {
        Ok(a) => a,
        Err(_) => return, // already gone
    };
    let _ = stream.set_nodelay(true);
    let side = match role {
        Role::Dialer { .. } => Side::Dialer,
        Role::Acceptor(_) => Side::Acceptor,
    };
    let watch = watch_in_the_kernel(&stream, side, &ctx);
    let (rd, wr) = stream.into_split();
    let mut reader = Reader { frames: FramedRead::with_capacity(rd, frame::codec(), READ_BUFFER), open: None };
    let mut writer = Writer { frames: FramedWrite::with_capacity(wr, frame::codec(), WRITE_BUFFER), seal: None };
    // Boxed: a connection's task lives as long as the link, and an inline handshake would keep
    // its state (the largest part of the task) allocated all that time, 255 times over.
    let mut established = match Box::pin(handshake(&mut reader, &mut writer, side, &hello, &ctx)).await {
        Ok(done) => done,
        Err(e) => return Box::pin(handshake_failed(e, role, observed, &ctx)).await,
    };
    if let Some(t) = established.transport.take() {
        reader.open = Some(t.open);
        writer.seal = Some(t.seal);
    }
    let peer = format!("{}@{}", crate::output::clean(&established.hello.name), observed);
    tracing::debug!(%peer, version = established.version, "handshake complete");

    let (outbox, drain) = outbox(budget);
    let established_name = established.hello.name.clone();
    let ready = Ready { conn, role, established, observed, outbox, watch };
    if ctx.events.send(ConnEvent::Ready(Box::new(ready))).await.is_err() {
        return;
    }
    let shaper = ctx.conditions.clone().map(|table| Shaper::new(table, established_name));
    let mut writing = tokio::spawn(write_loop(writer, drain, ctx.traffic.clone(), shaper));
    let mut written = false;
    let reason = tokio::select! {
        reason = read_loop(&mut reader, conn, &ctx, &peer) => reason,
        result = &mut writing => {
            written = true;
            match result {
                Ok(Ok(())) => CloseReason::Local,
                _ => CloseReason::Closed,
            }
        }
    };
    if reason == CloseReason::Local {
        // The mesh closed this connection (or is gone): the writer flushes what was queued (a
        // goodbye, a dup notice) and shuts our side; then read until the other side closes too.
        // Closing with unread bytes would send a reset, which makes the other side discard our
        // last frames before reading them.
        if !written {
            let _ = timeout(LINGER, &mut writing).await;
        }
        let drain = async { while let Some(Ok(_)) = reader.next().await {} };
        let _ = timeout(LINGER, drain).await;
    }
    writing.abort();
    let _ = ctx.events.send(ConnEvent::Closed { conn, reason }).await;
}

/// A connection's read and write buffers start this small (they grow for a large frame): a
/// peer with 255 neighbours keeps 255 of each.
const READ_BUFFER: usize = 1024;
const WRITE_BUFFER: usize = 1024;

/// Lets the kernel watch a connection at rest, so that an idle link costs no wake-up of this
/// process. On both sides the kernel ends the connection when what this side sent, data or
/// probe, goes unacknowledged for `--timeout` (TCP_USER_TIMEOUT); the read then fails with
/// ETIMEDOUT. The dialling side's kernel also probes the other side once the link has been
/// quiet for [`linkwatch::keepalive_idle`], then once a second (TCP keepalive): a silent cut
/// is noticed within the timeout. The accepting side, when its links are
/// [`AcceptedLinks::Counted`], sends no probes: it counts the segments that arrive, the
/// dialler's probes among them, and returns the count for the mesh to read ([`linkwatch`]);
/// otherwise, or if the count cannot be read, its kernel probes as the dialler's does. (A
/// frozen process, whose kernel still answers, is the mesh's probes' business.)
fn watch_in_the_kernel(stream: &TcpStream, side: Side, ctx: &Context) -> Option<SegmentWatch> {
    let socket = socket2::SockRef::from(stream);
    if let Err(e) = socket.set_tcp_user_timeout(Some(ctx.timeout)) {
        tracing::debug!("cannot set a user timeout on a connection: {e}");
    }
    if side == Side::Acceptor && ctx.accepted_links == AcceptedLinks::Counted {
        match SegmentWatch::new(stream, Instant::now()) {
            Ok(watch) => return Some(watch),
            Err(e) => tracing::debug!("cannot count a connection's segments; its kernel probes it instead: {e}"),
        }
    }
    // Past the first probe TCP_USER_TIMEOUT ends the link; the count only has to be larger (the
    // kernel takes at most 127).
    let probes = (ctx.timeout.as_secs() + 1).min(127) as u32;
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(linkwatch::keepalive_idle(ctx.timeout))
        .with_interval(Duration::from_secs(1))
        .with_retries(probes);
    if let Err(e) = socket.set_tcp_keepalive(&keepalive) {
        tracing::debug!("cannot set keepalive on a connection: {e}");
    }
    None
}

/// Drives the handshake state machine over the connection, under its deadline.
async fn handshake(
    reader: &mut Reader,
    writer: &mut Writer,
    side: Side,
    hello: &Hello,
    ctx: &Context,
) -> Result<Box<Established>, SetupError> {
    let (mut hs, first) = match Handshake::start(side, &ctx.local, hello, Instant::now(), ctx.handshake_timeout) {
        Ok(started) => started,
        Err(fail) => return Err(fail.error.into()),
    };
    writer.send_raw(first).await?;
    let deadline = hs.deadline();
    loop {
        let frame = match timeout_at(deadline, reader.next()).await {
            Err(_) => return Err(hs.timed_out().error.into()),
            Ok(None) => return Err(SetupError::Eof),
            Ok(Some(frame)) => frame?,
        };
        match hs.receive(&frame, Instant::now()) {
            Ok(Progress::Continue(out)) => writer.send_raw(out).await?,
            Ok(Progress::Done(established)) => return Ok(established),
            Err(fail) => {
                let _ = writer.send_raw(fail.send).await;
                return Err(fail.error.into());
            }
        }
    }
}

/// Longest wait for the other side to close after we closed our side.
const LINGER: Duration = Duration::from_secs(2);

async fn handshake_failed(e: SetupError, role: Role, observed: SocketAddr, ctx: &Context) {
    match (&e, &role) {
        (SetupError::Eof, Role::Acceptor(_)) => {
            tracing::debug!("connection from {observed} closed before its hello")
        }
        _ if ctx.reported.first(format!("{} {}: {e}", direction(&role), observed.ip())) => {
            tracing::warn!("closing connection {} {observed}: {e}", direction(&role))
        }
        _ => tracing::debug!("closing connection {} {observed}: {e}", direction(&role)),
    }
    if let Role::Dialer { target } = role {
        let error = e.to_string();
        let _ = ctx.events.send(ConnEvent::DialFailed { target, unresolved: false, error }).await;
    }
}

fn direction(role: &Role) -> &'static str {
    match role {
        Role::Dialer { .. } => "to",
        Role::Acceptor(_) => "from",
    }
}

async fn read_loop(reader: &mut Reader, conn: ConnId, ctx: &Context, peer: &str) -> CloseReason {
    loop {
        let payload = match reader.next().await {
            None => return CloseReason::Closed,
            Some(Ok(p)) => p,
            Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                tracing::warn!("closing connection to {peer}: bad frame: {e}");
                return CloseReason::Violation;
            }
            Some(Err(e)) if e.kind() == std::io::ErrorKind::TimedOut => {
                tracing::debug!("connection to {peer} timed out in the kernel: {e}");
                return CloseReason::Timeout;
            }
            Some(Err(e)) => {
                tracing::debug!("connection to {peer} failed: {e}");
                return CloseReason::Closed;
            }
        };
        ctx.traffic.received(payload.len());
        match Message::decode(&payload) {
            Ok(msg @ (Message::Hello(_) | Message::Auth { .. } | Message::Refuse { .. })) => {
                tracing::warn!("closing connection to {peer}: unexpected {} after the handshake", msg.kind());
                return CloseReason::Violation;
            }
            Ok(msg) => {
                if ctx.events.send(ConnEvent::Received { conn, msg }).await.is_err() {
                    return CloseReason::Local;
                }
            }
            Err(e) => {
                tracing::warn!("closing connection to {peer}: {e}");
                return CloseReason::Violation;
            }
        }
    }
}

/// Most frames written before a flush.
const BATCH: usize = 64;

/// Writes queued frames, as many as are queued before each flush; through the lab hook's
/// shaper when there is one.
async fn write_loop(
    writer: Writer,
    queue: Drain,
    traffic: Arc<Traffic>,
    shaper: Option<Shaper>,
) -> std::io::Result<()> {
    match shaper {
        None => write_plainly(writer, queue, traffic).await,
        Some(shaper) => write_shaped(writer, queue, traffic, shaper).await,
    }
}

async fn write_plainly(mut writer: Writer, mut queue: Drain, traffic: Arc<Traffic>) -> std::io::Result<()> {
    loop {
        let Some(payload) = queue.recv().await else { return writer.flush().await };
        let mut batch = vec![payload];
        while batch.len() < BATCH {
            match queue.try_recv() {
                Some(p) => batch.push(p),
                None => break,
            }
        }
        for p in batch {
            traffic.sent(p.len());
            writer.feed(p).await?;
        }
        writer.flush().await?;
    }
}

/// Most bytes the shaper holds back at once; past it, frames wait in the queue (whose bounds
/// then refuse more, as a slow link's would).
const MAX_HELD: usize = 1024 * 1024;

/// Writes queued frames as the lab hook's condition for this neighbour says: each is taken off
/// the queue when it comes, given its release time, and written then, in order.
async fn write_shaped(
    mut writer: Writer,
    mut queue: Drain,
    traffic: Arc<Traffic>,
    mut shaper: Shaper,
) -> std::io::Result<()> {
    let mut held: std::collections::VecDeque<(Instant, Bytes)> = Default::default();
    let mut held_bytes = 0;
    loop {
        let release = held.front().map(|(at, _)| *at);
        tokio::select! {
            frame = queue.recv(), if held_bytes < MAX_HELD => {
                let Some(p) = frame else { break };
                let mut batch = vec![p];
                while batch.len() < BATCH {
                    match queue.try_recv() {
                        Some(p) => batch.push(p),
                        None => break,
                    }
                }
                let now = Instant::now();
                for p in batch {
                    traffic.sent(p.len());
                    match shaper.release_time(p.len(), now) {
                        at if at <= now && held.is_empty() => writer.feed(p).await?,
                        at => {
                            held_bytes += p.len();
                            held.push_back((at, p));
                        }
                    }
                }
                writer.flush().await?;
            }
            () = tokio::time::sleep_until(release.unwrap_or_else(Instant::now)), if release.is_some() => {
                let now = Instant::now();
                while held.front().is_some_and(|(at, _)| *at <= now) {
                    let (_, p) = held.pop_front().expect("checked");
                    held_bytes -= p.len();
                    writer.feed(p).await?;
                }
                writer.flush().await?;
            }
        }
    }
    for (_, p) in held {
        writer.feed(p).await?;
    }
    writer.flush().await
}

/// The lab hook's link condition towards one neighbour, applied to each frame we send it: held
/// back for the delay (give or take the jitter) and spaced out to the rate, never released
/// before an earlier frame (a stream keeps its order). A frame "lost" is not dropped, since a
/// TCP stream loses nothing: it comes late, as a retransmission would, after a retransmission
/// timeout that doubles each time the retransmission is lost too; the frames behind it wait
/// for it.
pub struct Shaper {
    conditions: Arc<Conditions>,
    name: String,
    /// When the last frame is released; a rate-limited link is busy until then.
    last_release: Instant,
}

/// The first retransmission timeout of a lost segment (Linux's least, on a short link).
const RETRANSMISSION_TIMEOUT: Duration = Duration::from_millis(200);
/// Most times one frame is lost in a row (a real stream would give up about here).
const MAX_RETRANSMISSIONS: u32 = 6;

impl Shaper {
    pub fn new(conditions: Arc<Conditions>, name: String) -> Shaper {
        Shaper { conditions, name, last_release: Instant::now() }
    }

    /// When a frame of `len` bytes handed over at `now` goes out.
    pub fn release_time(&mut self, len: usize, now: Instant) -> Instant {
        let Some(c) = self.conditions.of(&self.name) else {
            self.last_release = self.last_release.max(now);
            return self.last_release;
        };
        let draw = || f64::from(getrandom::u32().unwrap_or(0)) / f64::from(u32::MAX);
        let jitter = c.jitter.mul_f64(draw() * 2.0);
        let mut at = (now + c.delay + jitter).checked_sub(c.jitter).unwrap_or(now).max(now);
        let mut timeout = RETRANSMISSION_TIMEOUT;
        for _ in 0..MAX_RETRANSMISSIONS {
            if c.loss <= 0.0 || draw() * 100.0 >= c.loss {
                break;
            }
            at += timeout;
            timeout *= 2;
        }
        if let Some(rate) = c.rate {
            let sending = Duration::from_secs_f64(len as f64 * 8.0 / rate as f64);
            at = at.max(self.last_release) + sending;
        }
        self.last_release = at.max(self.last_release);
        self.last_release
    }
}

/// Counts of what crossed a peer's connections: frames and payload bytes (as the mesh sees
/// them, before sealing), each way.
#[derive(Debug, Default)]
pub struct Traffic {
    pub frames_in: AtomicU64,
    pub bytes_in: AtomicU64,
    pub frames_out: AtomicU64,
    pub bytes_out: AtomicU64,
}

impl Traffic {
    fn received(&self, bytes: usize) {
        self.frames_in.fetch_add(1, Ordering::Relaxed);
        self.bytes_in.fetch_add(bytes as u64 + 4, Ordering::Relaxed);
    }

    fn sent(&self, bytes: usize) {
        self.frames_out.fetch_add(1, Ordering::Relaxed);
        self.bytes_out.fetch_add(bytes as u64 + 4, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_open_connections_are_capped_per_host_and_released() {
        let counts = Arc::new(HalfOpenCounts::default());
        let one: IpAddr = "10.0.0.1".parse().unwrap();
        let held: Vec<HalfOpen> = (0..MAX_HALF_OPEN_PER_IP).map(|_| counts.enter(one).unwrap()).collect();
        assert!(counts.enter(one).is_none(), "the host is at its cap");
        assert!(counts.enter("::ffff:10.0.0.1".parse().unwrap()).is_none(), "IPv4-mapped is the same host");
        assert!(counts.enter("10.0.0.2".parse().unwrap()).is_some(), "other hosts still get in");
        drop(held);
        assert!(counts.enter(one).is_some(), "released when their handshakes end");
        assert!(counts.0.lock().unwrap().len() <= 1, "no entry left for hosts with none open");
    }
    #[test]
    fn an_empty_buffer_that_grew_for_a_large_frame_is_given_back() {
        use bytes::BufMut;
        let mut buffer = bytes::BytesMut::with_capacity(READ_BUFFER);
        buffer.put_bytes(7, 8 * READ_BUFFER);
        let frame = buffer.split_to(8 * READ_BUFFER).freeze();
        shrink_when_empty(&mut buffer, READ_BUFFER);
        assert!(!buffer.try_reclaim(READ_BUFFER + 1), "kept while the frame shares its allocation");
        drop(frame);
        shrink_when_empty(&mut buffer, READ_BUFFER);
        assert!(!buffer.try_reclaim(READ_BUFFER + 1), "the large allocation is given back");
        assert!(buffer.capacity() >= READ_BUFFER, "for a buffer of the usual size");

        buffer.put_bytes(7, 100);
        drop(buffer.split_to(100));
        let rest = buffer.as_ptr();
        shrink_when_empty(&mut buffer, READ_BUFFER);
        assert_eq!(buffer.as_ptr(), rest, "a buffer of the usual size is kept, not made anew");
    }
}
