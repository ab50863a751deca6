//! One TCP connection to another peer, from handshake to close.
//!
//! A connection task runs the handshake (preamble, hello, version negotiation) under a deadline,
//! hands the result to the mesh, then runs a reader and a writer. The writer sends what the mesh
//! queues plus a heartbeat on every tick; the reader passes valid messages to the mesh and drops
//! the connection on silence, on a malformed frame or on a protocol violation, with one log
//! line saying why. Nothing a remote sends can make this task panic or allocate more than one
//! frame. When the mesh drops its queue sender, the writer flushes what is queued and the
//! connection closes.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, sleep_until, timeout, timeout_at};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::frame::{self, Hello, Message, PROTOCOL_MAX, PROTOCOL_MIN, Preamble, Security};
use crate::id::{PeerId, random_u64};
use crate::neighbours::{ConnId, Drops};
use crate::noise::{Handshake, Keys, NoiseError, Opener, Sealer};
use crate::outbox::{Drain, Outbox, outbox};

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
        let ip = host_of(ip);
        let mut counts = self.0.lock().expect("never poisoned: nothing panics while holding it");
        let n = counts.entry(ip).or_default();
        if *n >= MAX_HALF_OPEN_PER_IP {
            return None;
        }
        *n += 1;
        Some(HalfOpen { ip, counts: self.clone() })
    }
}

/// The host an address belongs to: an IPv4 address (also IPv4-mapped), or an IPv6 /64, since
/// one IPv6 host usually holds a whole /64.
fn host_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
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
#[derive(Debug)]
pub struct Ready {
    pub conn: ConnId,
    pub role: Role,
    pub hello: Hello,
    pub version: u32,
    /// The nonce we sent in our hello.
    pub our_nonce: u64,
    pub observed: SocketAddr,
    pub outbox: Outbox,
    pub drops: Arc<Drops>,
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
#[derive(Debug)]
pub enum ConnEvent {
    /// The handshake needs the hello to send (the mesh knows the peer list and sequence).
    HelloWanted(oneshot::Sender<Hello>),
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
    /// The mesh key and our static key, in a private mesh.
    pub keys: Option<Keys>,
    pub reported: Reported,
    pub half_open: Arc<HalfOpenCounts>,
    pub heartbeat: Duration,
    pub timeout: Duration,
    pub handshake_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Context {
    pub fn security(&self) -> Security {
        if self.keys.is_some() { Security::NoisePsk } else { Security::Open }
    }
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

    async fn send(&mut self, payload: Bytes) -> std::io::Result<()> {
        let frame = self.wrap(payload)?;
        self.frames.send(frame).await
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        SinkExt::<Bytes>::flush(&mut self.frames).await
    }
}

#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("connection closed during the handshake")]
    Eof,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("bad preamble: {0}")]
    Preamble(String),
    #[error("bad hello: {0}")]
    Hello(String),
    #[error("refused by the other side: {0}")]
    RefusedByRemote(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("no handshake within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Noise(#[from] NoiseError),
    #[error("the peer is shutting down")]
    ShuttingDown,
}

/// Dials `target` and runs the connection; reports a failed dial to the mesh.
pub async fn dial(target: String, conn: ConnId, ctx: Arc<Context>) {
    match reach(&target, &ctx).await {
        Ok(stream) => run(stream, Role::Dialer { target }, conn, ctx).await,
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

/// Runs an established TCP connection until it closes.
pub async fn run(stream: TcpStream, role: Role, conn: ConnId, ctx: Arc<Context>) {
    let observed = match stream.peer_addr() {
        Ok(a) => a,
        Err(_) => return, // already gone
    };
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let mut reader = Reader { frames: FramedRead::new(rd, frame::codec()), open: None };
    let mut writer = Writer { frames: FramedWrite::new(wr, frame::codec()), seal: None };
    let initiator = matches!(role, Role::Dialer { .. });

    let shaken = timeout(ctx.handshake_timeout, handshake(&mut reader, &mut writer, &ctx, initiator))
        .await
        .unwrap_or(Err(HandshakeError::Timeout(ctx.handshake_timeout)));
    let (hello, version, our_nonce) = match shaken {
        Ok(done) => done,
        Err(e) => return handshake_failed(e, role, observed, &ctx).await,
    };
    let peer = format!("{}@{}", crate::output::clean(&hello.name), observed);
    tracing::debug!(%peer, version, "handshake complete");

    let (outbox, drain) = outbox();
    let drops = Arc::new(Drops::default());
    let ready = Ready { conn, role, hello, version, our_nonce, observed, outbox, drops: drops.clone() };
    if ctx.events.send(ConnEvent::Ready(Box::new(ready))).await.is_err() {
        return;
    }
    let mut writing = tokio::spawn(write_loop(writer, drain, ctx.heartbeat, drops.clone()));
    let mut written = false;
    let reason = tokio::select! {
        reason = read_loop(&mut reader, conn, &ctx, &drops, &peer) => reason,
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

/// Longest wait for the other side to close after we closed our side.
const LINGER: Duration = Duration::from_secs(2);

async fn handshake_failed(e: HandshakeError, role: Role, observed: SocketAddr, ctx: &Context) {
    match (&e, &role) {
        (HandshakeError::ShuttingDown, _) => {}
        (HandshakeError::Eof, Role::Acceptor(_)) => {
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

async fn handshake(
    reader: &mut Reader,
    writer: &mut Writer,
    ctx: &Context,
    initiator: bool,
) -> Result<(Hello, u32, u64), HandshakeError> {
    // Ask the mesh for our hello now; the answer is awaited once the hello may be sent.
    let (want, got) = oneshot::channel();
    ctx.events.send(ConnEvent::HelloWanted(want)).await.map_err(|_| HandshakeError::ShuttingDown)?;
    // The dialler of a keyed connection sends the first Noise message with its preamble, not
    // waiting for the other's: one round trip less.
    let mut noise_hs = match &ctx.keys {
        Some(keys) => Some(Handshake::new(keys, initiator)?),
        None => None,
    };
    writer.feed(frame::encode_preamble(ctx.security())).await?;
    if let Some(hs) = noise_hs.as_mut().filter(|_| initiator) {
        writer.feed(hs.write(&[])?).await?;
    }
    writer.flush().await?;
    let first = reader.next().await.ok_or(HandshakeError::Eof)??;
    let preamble: Preamble = match serde_json::from_slice(&first) {
        Ok(p) => p,
        Err(_) => return Err(refusal_or(&first, HandshakeError::Preamble("not a meshlab preamble".into()))),
    };
    if preamble.protocol != frame::PROTOCOL_NAME {
        return Err(HandshakeError::Preamble(format!("unknown protocol {:?}", preamble.protocol)));
    }
    if preamble.security != ctx.security() {
        let reason = match ctx.security() {
            Security::Open => "this peer runs an open mesh (no key) but the other side uses a mesh key",
            Security::NoisePsk => "this peer's mesh requires a key but the other side has none",
        };
        refuse(writer, reason).await;
        return Err(HandshakeError::Refused(reason.into()));
    }
    let ours = got.await.map_err(|_| HandshakeError::ShuttingDown)?;
    let ours = Hello { nonce: random_u64(), ..ours };
    let hello = Message::Hello(ours.clone()).encode();
    let (payload, proven) = match noise_hs {
        // The hellos travel inside the Noise messages.
        Some(hs) => {
            let (payload, id) = noise(reader, writer, hs, initiator, &hello).await?;
            (payload, Some(id))
        }
        None => {
            writer.send(hello).await?;
            (reader.next().await.ok_or(HandshakeError::Eof)??, None)
        }
    };
    let theirs = match Message::decode(&payload) {
        Ok(Message::Hello(h)) => h,
        Ok(Message::Refuse { reason }) => return Err(HandshakeError::RefusedByRemote(reason)),
        Ok(other) => return Err(HandshakeError::Hello(format!("expected hello, got {}", kind(&other)))),
        Err(e) => return Err(HandshakeError::Hello(e.to_string())),
    };
    if let Some(id) = proven
        && theirs.id != id
    {
        let reason = "the hello claims an id that the peer's key does not prove";
        refuse(writer, reason).await;
        return Err(HandshakeError::Refused(reason.into()));
    }
    let Some(version) = frame::negotiate((PROTOCOL_MIN, PROTOCOL_MAX), (theirs.min_version, theirs.max_version)) else {
        let reason = format!(
            "no common protocol version: this peer speaks {PROTOCOL_MIN}..={PROTOCOL_MAX}, the other side {}..={}",
            theirs.min_version, theirs.max_version
        );
        refuse(writer, &reason).await;
        return Err(HandshakeError::Refused(reason));
    };
    Ok((theirs, version, ours.nonce))
}

/// The Noise XXpsk0 handshake (the dialler initiates; its first message went out with its
/// preamble). The hellos ride in messages 2 and 3. Returns the other side's hello and the id its
/// static key proves. A responder that cannot read the first message (another mesh key) refuses
/// in clear, so that the dialler can say why.
async fn noise(
    reader: &mut Reader,
    writer: &mut Writer,
    mut hs: Handshake,
    initiator: bool,
    hello: &[u8],
) -> Result<(Bytes, PeerId), HandshakeError> {
    let theirs = if initiator {
        let second = reader.next().await.ok_or(HandshakeError::Eof)??;
        let theirs = hs.read(&second).map_err(|e| refusal_or(&second, e.into()))?;
        writer.send(hs.write(hello)?).await?;
        theirs
    } else {
        let first = reader.next().await.ok_or(HandshakeError::Eof)??;
        if hs.read(&first).is_err() {
            let reason = "wrong mesh key: the other side does not hold this mesh's key";
            refuse(writer, reason).await;
            return Err(HandshakeError::Refused(reason.into()));
        }
        writer.send(hs.write(hello)?).await?;
        let third = reader.next().await.ok_or(HandshakeError::Eof)??;
        hs.read(&third)?
    };
    let (transport, remote) = hs.finish()?;
    reader.open = Some(transport.open);
    writer.seal = Some(transport.seal);
    Ok((theirs, remote))
}

/// A frame that is not a preamble may be the other side's refusal: report that instead.
fn refusal_or(payload: &[u8], otherwise: HandshakeError) -> HandshakeError {
    match Message::decode(payload) {
        Ok(Message::Refuse { reason }) => HandshakeError::RefusedByRemote(reason),
        _ => otherwise,
    }
}

async fn refuse(writer: &mut Writer, reason: &str) {
    let _ = writer.send(Message::Refuse { reason: reason.into() }.encode()).await;
}

fn kind(msg: &Message) -> String {
    let json = serde_json::to_value(msg).unwrap_or_default();
    json.get("type").and_then(|t| t.as_str()).unwrap_or("?").to_string()
}

async fn read_loop(reader: &mut Reader, conn: ConnId, ctx: &Context, drops: &Drops, peer: &str) -> CloseReason {
    let mut deadline = Instant::now() + ctx.timeout;
    loop {
        let next = tokio::select! {
            next = reader.next() => next,
            _ = sleep_until(deadline) => return CloseReason::Timeout,
        };
        let payload = match next {
            None => return CloseReason::Closed,
            Some(Ok(p)) => p,
            Some(Err(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                tracing::warn!("closing connection to {peer}: bad frame: {e}");
                return CloseReason::Violation;
            }
            Some(Err(e)) => {
                tracing::debug!("connection to {peer} failed: {e}");
                return CloseReason::Closed;
            }
        };
        if drops.inbound.load(Ordering::Relaxed) {
            continue;
        }
        deadline = Instant::now() + ctx.timeout;
        match Message::decode(&payload) {
            Ok(Message::Ping) => {}
            Ok(msg @ (Message::Hello(_) | Message::Refuse { .. })) => {
                tracing::warn!("closing connection to {peer}: unexpected {} after the handshake", kind(&msg));
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

/// Writes queued frames, and a heartbeat whenever the connection has been idle for an interval.
async fn write_loop(
    mut writer: Writer,
    mut queue: Drain,
    heartbeat: Duration,
    drops: Arc<Drops>,
) -> std::io::Result<()> {
    let ping = Message::Ping.encode();
    let mut tick = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let dropped = || drops.outbound.load(Ordering::Relaxed);
    let mut last_write = Instant::now();
    loop {
        tokio::select! {
            biased;
            next = queue.recv() => {
                let Some(payload) = next else { return writer.flush().await };
                let mut batch = vec![payload];
                while batch.len() < BATCH {
                    match queue.try_recv() {
                        Some(p) => batch.push(p),
                        None => break,
                    }
                }
                if !dropped() {
                    for p in batch {
                        writer.feed(p).await?;
                    }
                    writer.flush().await?;
                    last_write = Instant::now();
                }
            }
            _ = tick.tick() => {
                if !dropped() && last_write.elapsed() + heartbeat / 10 >= heartbeat {
                    writer.send(ping.clone()).await?;
                    last_write = Instant::now();
                }
            }
        }
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
    fn an_ipv6_host_is_its_slash_64() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(host_of(a), host_of(b));
        assert_ne!(host_of(a), host_of(other));
    }
}
