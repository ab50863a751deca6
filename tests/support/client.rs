//! A hand-driven peer for tests: it runs the real handshake state machine (so it passes as a
//! member, with any identity and hello it likes) and then sends whatever frames a test wants,
//! well-formed or hostile.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use meshlab::chain::{self, ChainHash};
use meshlab::frame::{self, Hello, LineBody, Lines, Message};
use meshlab::handshake::{Handshake, Local, Progress, Side};
use meshlab::identity::Identity;
use meshlab::known::Known;
use meshlab::noise::{MeshKey, Transport};
use tokio::net::{TcpSocket, TcpStream};
use tokio::time::Instant;
use tokio_util::codec::{Framed, LengthDelimitedCodec};

const DEADLINE: Duration = Duration::from_secs(10);

/// A hello as a newly started peer would send it.
pub fn hello_of(me: &Identity, name: &str) -> Hello {
    Hello {
        id: me.id(),
        incarnation: meshlab::id::random_u64(),
        name: name.into(),
        port: 9,
        advertise: None,
        seq: 0,
        head: chain::genesis(&me.id()),
        known: Known::empty(),
    }
}

/// `texts` said by `me` after line `after` (whose chain hash is `head`), signed as one batch.
/// Returns the batch and the new chain head.
pub fn signed_lines(me: &Identity, name: &str, after: u64, head: ChainHash, texts: &[&str]) -> (Lines, ChainHash) {
    let mut h = head;
    let lines: Vec<LineBody> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let seq = after + 1 + i as u64;
            h = chain::next(&h, seq, 1, name, t);
            LineBody { seq, text: t.to_string(), at: 1 }
        })
        .collect();
    let sig = chain::sign_head(me, after + texts.len() as u64, &h);
    (Lines { origin: me.id(), name: name.into(), lines, sig, catch_up: false }, h)
}

/// What became of a connection attempt: None when it was admitted, else why not. (A dialler's
/// side of the handshake ends before the acceptor has checked the dialler's hello, so a
/// refusal can come right after it; an admitted dialler is sent the acceptor's digest first.)
pub async fn refusal(attempt: Result<Client, String>) -> Option<String> {
    match attempt {
        Err(e) => Some(e),
        Ok(mut c) => match c.recv().await {
            Some(Message::Refuse { reason }) => Some(format!("refused by the other side: {reason}")),
            Some(_) => None,
            None => Some("closed".into()),
        },
    }
}

/// A connection to a peer, past the handshake.
pub struct Client {
    framed: Framed<TcpStream, LengthDelimitedCodec>,
    transport: Option<Transport>,
    /// The peer's hello.
    pub theirs: Hello,
}

impl Client {
    /// Connects to `addr` (from `source`, if given) and completes the handshake as `me`, with
    /// `hello` as its hello (which may claim anything), in the mesh of `mesh_key`.
    pub async fn connect(
        addr: &str,
        source: Option<IpAddr>,
        me: &Identity,
        hello: Hello,
        mesh_key: Option<MeshKey>,
    ) -> Result<Client, String> {
        let addr: SocketAddr = addr.parse().map_err(|e| format!("{e}"))?;
        let socket = TcpSocket::new_v4().map_err(|e| e.to_string())?;
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0)).map_err(|e| e.to_string())?;
        }
        let stream = socket.connect(addr).await.map_err(|e| e.to_string())?;
        Self::handshake(stream, Side::Dialer, me, hello, mesh_key).await
    }

    /// Accepts one connection on `listener` and completes the handshake as `me`, in an open mesh.
    pub async fn accept(listener: &tokio::net::TcpListener, me: &Identity, hello: Hello) -> Result<Client, String> {
        let (stream, _) = listener.accept().await.map_err(|e| e.to_string())?;
        Self::handshake(stream, Side::Acceptor, me, hello, None).await
    }

    async fn handshake(
        stream: TcpStream,
        side: Side,
        me: &Identity,
        hello: Hello,
        mesh_key: Option<MeshKey>,
    ) -> Result<Client, String> {
        let mut framed = Framed::new(stream, frame::codec());
        let local = Local { identity: me.clone(), mesh_key };
        let (mut hs, first) =
            Handshake::start(side, &local, &hello, Instant::now(), DEADLINE).map_err(|f| f.error.to_string())?;
        for f in first {
            framed.send(f).await.map_err(|e| e.to_string())?;
        }
        loop {
            let frame = tokio::time::timeout(DEADLINE, framed.next())
                .await
                .map_err(|_| "no answer".to_string())?
                .ok_or("closed during the handshake")?
                .map_err(|e| e.to_string())?;
            match hs.receive(&frame, Instant::now()) {
                Ok(Progress::Continue(out)) => {
                    for f in out {
                        framed.send(f).await.map_err(|e| e.to_string())?;
                    }
                }
                Ok(Progress::Done(mut done)) => {
                    let transport = done.transport.take();
                    return Ok(Client { framed, transport, theirs: done.hello });
                }
                Err(fail) => {
                    for f in fail.send {
                        let _ = framed.send(f).await;
                    }
                    return Err(fail.error.to_string());
                }
            }
        }
    }

    /// Keeps the connection alive in the background (a ping now and then, whatever arrives
    /// read and dropped) until the task is aborted or the peer closes it.
    pub fn keep_alive(mut self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    frame = self.framed.next() => if !matches!(frame, Some(Ok(_))) { return },
                    _ = tick.tick() => if self.send(&Message::Ping { seq: 0 }).await.is_err() { return },
                }
            }
        })
    }

    /// Sends a message (sealed in a private mesh).
    pub async fn send(&mut self, msg: &Message) -> std::io::Result<()> {
        self.send_raw(msg.encode()).await
    }

    /// Sends a payload as it is (sealed in a private mesh).
    pub async fn send_raw(&mut self, payload: Bytes) -> std::io::Result<()> {
        let frame = match &mut self.transport {
            Some(t) => t.seal.seal(&payload).map_err(|e| std::io::Error::other(e.to_string()))?,
            None => payload,
        };
        self.framed.send(frame).await
    }

    /// The next message, or None once the peer closed the connection (or sent nothing for the
    /// deadline, which fails the test).
    pub async fn recv(&mut self) -> Option<Message> {
        let frame = tokio::time::timeout(DEADLINE, self.framed.next()).await.expect("no frame within the deadline")?;
        let frame = frame.ok()?;
        let plain = match &mut self.transport {
            Some(t) => t.open.open(&frame).ok()?,
            None => frame.freeze(),
        };
        Some(Message::decode(&plain).expect("the peer sends valid messages"))
    }

    /// Reads until the peer closes the connection; fails if it stays open past the deadline.
    pub async fn closed_by_peer(mut self) {
        let drain = async { while let Some(Ok(_)) = self.framed.next().await {} };
        tokio::time::timeout(DEADLINE, drain).await.expect("the peer left the connection open");
    }
}
