//! The node agent: how the lab reaches peers on the nodes of a swarm other than its own.
//!
//! A swarm manager's Docker API schedules tasks on every node but cannot attach to a task on
//! another node, and cuts are packet rules in a task's network namespace, which only that node's
//! kernel has. So each node runs `lab agent` (as root, beside its Docker engine), and the lab
//! asks it for exactly what it does itself on its own node: attach to a container (its stdin
//! and stdout, the peer's public contract), signal, pause, thaw or remove it, read its address,
//! and feed iptables-restore or tc input into its network namespace. Nothing else: the agent
//! runs no command of the lab's choosing, starts no container, and touches only containers that
//! carry the lab's label (the swarm puts it on every task of the lab's services).
//!
//! The agent listens on TCP. Every connection is a Noise `NNpsk0` session (snow) keyed by a
//! 32-byte secret shared by the lab and its agents (a key file): a client without the key fails
//! the handshake and is dropped before its first request is read, and everything after the
//! handshake is encrypted and authenticated. Messages are JSON, one per Noise message, in
//! length-delimited frames. docs/swarm.md has the design and the runbook.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context as TaskContext, Poll};

use anyhow::{Context, bail};
use bollard::Docker;
use bollard::query_parameters::InspectContainerOptions;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use snow::TransportState;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use crate::backend::engine::{Chunk, Engine, LABEL, Tool};

/// The port agents listen on unless told otherwise.
pub const DEFAULT_PORT: u16 = 4747;
const NOISE: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// How long a connection may take to prove its key, either way.
const HANDSHAKE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);
/// A Noise message's limit.
const MAX_MESSAGE: usize = 65_535;
/// The most bytes of output or input in one message: as JSON numbers they take up to four
/// times as much room, and a Noise message holds 64 KiB.
const MAX_CHUNK: usize = 8 * 1024;

/// The secret shared by a lab and its agents.
#[derive(Clone)]
pub struct Key([u8; 32]);

impl Key {
    /// Reads a key file (64 hex digits).
    pub fn read(path: &Path) -> anyhow::Result<Key> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("cannot read agent key {}", path.display()))?;
        Key::from_hex(text.trim()).with_context(|| format!("{} is not an agent key (64 hex digits)", path.display()))
    }

    fn from_hex(text: &str) -> Option<Key> {
        if text.len() != 64 {
            return None;
        }
        let mut key = [0; 32];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(Key(key))
    }

    /// Reads the key file, or makes one (readable by its owner only) where there is none.
    pub fn read_or_make(path: &Path) -> anyhow::Result<Key> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        if path.exists() {
            return Key::read(path);
        }
        let key: [u8; 32] = rand::random();
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot make agent key {}", path.display()))?;
        writeln!(file, "{hex}")?;
        tracing::info!("made agent key {}: copy it to the lab's host", path.display());
        Ok(Key(key))
    }
}

/// What the lab asks of an agent.
#[derive(Debug, Serialize, Deserialize)]
enum Request {
    Call {
        id: u64,
        call: Call,
    },
    /// Bytes for an attached container's stdin.
    Write {
        container: String,
        bytes: Vec<u8>,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Call {
    /// Attach to a running container (replaying what it printed so far).
    Attach {
        container: String,
    },
    /// The container's host pid and its address on `network`.
    Inspect {
        container: String,
        network: String,
    },
    Signal {
        container: String,
        signal: String,
    },
    Pause {
        container: String,
    },
    Unpause {
        container: String,
    },
    Remove {
        container: String,
    },
    /// Feed `input` to a tool in the container's network namespace.
    Feed {
        container: String,
        tool: Tool,
        input: String,
    },
}

/// What an agent sends back.
#[derive(Debug, Serialize, Deserialize)]
enum Message {
    Reply {
        id: u64,
        outcome: Result<Answer, String>,
    },
    /// Output of an attached container.
    Output {
        container: String,
        chunk: Chunk,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Answer {
    Done,
    Inspected { pid: u32, ip: Option<Ipv4Addr> },
}

/// One side of an agent connection after the handshake: frames out, encrypted.
struct Sending {
    frames: FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>,
    noise: Arc<Mutex<TransportState>>,
}

impl Sending {
    async fn send(&mut self, message: &impl Serialize) -> anyhow::Result<()> {
        let plain = serde_json::to_vec(message)?;
        let mut sealed = vec![0; MAX_MESSAGE];
        let len = self.noise.lock().expect("not poisoned").write_message(&plain, &mut sealed)?;
        sealed.truncate(len);
        self.frames.send(tokio_util::bytes::Bytes::from(sealed)).await?;
        Ok(())
    }
}

/// The other side: frames in, decrypted.
struct Receiving {
    frames: FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
    noise: Arc<Mutex<TransportState>>,
}

impl Receiving {
    /// The next message, or `None` when the connection ends.
    async fn recv<T: serde::de::DeserializeOwned>(&mut self) -> anyhow::Result<Option<T>> {
        let Some(frame) = self.frames.next().await.transpose()? else { return Ok(None) };
        let mut plain = vec![0; MAX_MESSAGE];
        let len = self.noise.lock().expect("not poisoned").read_message(&frame, &mut plain)?;
        Ok(Some(serde_json::from_slice(&plain[..len])?))
    }
}

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder().length_field_type::<u16>().max_frame_length(MAX_MESSAGE).new_codec()
}

/// Runs the Noise handshake on `stream`: the lab initiates, the agent responds. A wrong key
/// fails it.
async fn handshake(stream: TcpStream, key: &Key, initiator: bool) -> anyhow::Result<(Sending, Receiving)> {
    let _ = stream.set_nodelay(true);
    let (read, write) = stream.into_split();
    let (mut frames_in, mut frames_out) = (FramedRead::new(read, codec()), FramedWrite::new(write, codec()));
    let builder = snow::Builder::new(NOISE.parse()?).psk(0, &key.0);
    let mut state = if initiator { builder.build_initiator()? } else { builder.build_responder()? };
    let mut buf = vec![0; MAX_MESSAGE];
    // NNpsk0: -> psk, e; <- e, ee.
    for turn in [initiator, !initiator] {
        if turn {
            let len = state.write_message(&[], &mut buf)?;
            frames_out.send(tokio_util::bytes::Bytes::copy_from_slice(&buf[..len])).await?;
        } else {
            let frame = frames_in.next().await.context("the other side hung up during the handshake")??;
            state.read_message(&frame, &mut buf).context("the agent key does not match")?;
        }
    }
    let noise = Arc::new(Mutex::new(state.into_transport_mode()?));
    Ok((Sending { frames: frames_out, noise: noise.clone() }, Receiving { frames: frames_in, noise }))
}

/// Serves labs on `listener` with this node's Docker engine until the task is dropped.
pub async fn serve(listener: TcpListener, key: Key, docker: Docker) -> anyhow::Result<()> {
    loop {
        let (stream, from) = listener.accept().await?;
        let (key, docker) = (key.clone(), docker.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(HANDSHAKE_DEADLINE, handshake(stream, &key, false)).await {
                Err(_) => tracing::warn!("refused {from}: no handshake within {HANDSHAKE_DEADLINE:?}"),
                Ok(Err(e)) => tracing::warn!("refused {from}: {e:#}"),
                Ok(Ok((sending, receiving))) => {
                    tracing::info!("a lab at {from} connected");
                    if let Err(e) = serve_lab(sending, receiving, docker).await {
                        tracing::warn!("the lab at {from}: {e:#}");
                    }
                    tracing::info!("the lab at {from} left");
                }
            }
        });
    }
}

/// Answers one lab's requests in order, and streams the output of what it attached to.
async fn serve_lab(mut sending: Sending, mut receiving: Receiving, docker: Docker) -> anyhow::Result<()> {
    let (out, mut outgoing) = mpsc::unbounded_channel::<Message>();
    let writer = tokio::spawn(async move {
        while let Some(message) = outgoing.recv().await {
            if sending.send(&message).await.is_err() {
                break;
            }
        }
    });
    let mut inputs: HashMap<String, Pin<Box<dyn AsyncWrite + Send>>> = HashMap::new();
    while let Some(request) = receiving.recv::<Request>().await? {
        match request {
            Request::Write { container, bytes } => {
                if let Some(input) = inputs.get_mut(&container) {
                    let _ = input.write_all(&bytes).await;
                    let _ = input.flush().await;
                }
            }
            Request::Call { id, call } => {
                let outcome = answer(&docker, call, &mut inputs, &out).await.map_err(|e| format!("{e:#}"));
                let _ = out.send(Message::Reply { id, outcome });
            }
        }
    }
    writer.abort();
    Ok(())
}

async fn answer(
    docker: &Docker,
    call: Call,
    inputs: &mut HashMap<String, Pin<Box<dyn AsyncWrite + Send>>>,
    out: &mpsc::UnboundedSender<Message>,
) -> anyhow::Result<Answer> {
    let container = match &call {
        Call::Attach { container }
        | Call::Inspect { container, .. }
        | Call::Signal { container, .. }
        | Call::Pause { container }
        | Call::Unpause { container }
        | Call::Remove { container }
        | Call::Feed { container, .. } => container,
    };
    let inspected = docker.inspect_container(container, None::<InspectContainerOptions>).await?;
    if !inspected.config.and_then(|c| c.labels).is_some_and(|l| l.contains_key(LABEL)) {
        bail!("{container} is not a lab's container: the agent touches only those labelled {LABEL}");
    }
    let engine = Engine::Local(docker.clone());
    match call {
        Call::Attach { container } => {
            let (input, mut output) = engine.attach(&container).await?;
            inputs.insert(container.clone(), input);
            let out = out.clone();
            tokio::spawn(async move {
                while let Some(chunk) = output.next().await {
                    for chunk in chunk.split(MAX_CHUNK) {
                        if out.send(Message::Output { container: container.clone(), chunk }).is_err() {
                            return;
                        }
                    }
                }
            });
        }
        Call::Inspect { container, network } => {
            let (pid, ip) = engine.inspect(&container, &network).await?;
            return Ok(Answer::Inspected { pid, ip });
        }
        Call::Signal { container, signal } => engine.signal(&container, &signal).await?,
        Call::Pause { container } => engine.pause(&container).await?,
        Call::Unpause { container } => engine.unpause(&container).await?,
        Call::Remove { container } => {
            inputs.remove(&container);
            engine.remove(&container).await
        }
        Call::Feed { container, tool, input } => {
            let (pid, _) = engine.inspect(&container, "").await?;
            engine.feed(&container, pid, tool, &input).await?
        }
    }
    Ok(Answer::Done)
}

/// A lab's connection to one node's agent.
#[derive(Clone)]
pub struct Agent {
    inner: Arc<Inner>,
}

struct Inner {
    address: String,
    requests: mpsc::UnboundedSender<Request>,
    next: AtomicU64,
    pending: Mutex<HashMap<u64, oneshot::Sender<Result<Answer, String>>>>,
    outputs: Mutex<HashMap<String, mpsc::UnboundedSender<Chunk>>>,
}

impl Agent {
    /// Connects to the agent at `address` and proves the key.
    pub async fn connect(address: &str, key: &Key) -> anyhow::Result<Agent> {
        let reach = async {
            let stream = TcpStream::connect(address).await.context("cannot connect")?;
            handshake(stream, key, true).await.context("the agent refused the lab's key")
        };
        let reached = tokio::time::timeout(HANDSHAKE_DEADLINE, reach).await;
        let (mut sending, mut receiving) = reached
            .unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {HANDSHAKE_DEADLINE:?}")))
            .with_context(|| format!("cannot reach the agent at {address}"))?;
        let (requests, mut outgoing) = mpsc::unbounded_channel::<Request>();
        let inner = Arc::new(Inner {
            address: address.to_owned(),
            requests,
            next: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            outputs: Mutex::new(HashMap::new()),
        });
        tokio::spawn(async move {
            while let Some(request) = outgoing.recv().await {
                if sending.send(&request).await.is_err() {
                    break;
                }
            }
        });
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            while let Ok(Some(message)) = receiving.recv::<Message>().await {
                let Some(inner) = weak.upgrade() else { break };
                inner.deliver(message);
            }
            // The agent is gone: every call waiting on it fails, every attached output ends.
            if let Some(inner) = weak.upgrade() {
                inner.pending.lock().expect("not poisoned").clear();
                inner.outputs.lock().expect("not poisoned").clear();
            }
        });
        Ok(Agent { inner })
    }

    pub fn address(&self) -> &str {
        &self.inner.address
    }

    /// Makes a call and waits for its answer.
    pub async fn call(&self, call: Call) -> anyhow::Result<Answer> {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.inner.pending.lock().expect("not poisoned").insert(id, tx);
        let lost = || anyhow::anyhow!("lost the agent at {}", self.inner.address);
        self.inner.requests.send(Request::Call { id, call }).map_err(|_| lost())?;
        match rx.await.map_err(|_| lost())? {
            Ok(answer) => Ok(answer),
            Err(e) => bail!("the agent at {}: {e}", self.inner.address),
        }
    }

    /// Attaches to a container: its stdin, and its output as chunks ending with its exit.
    pub async fn attach(
        &self,
        container: &str,
    ) -> anyhow::Result<(Pin<Box<dyn AsyncWrite + Send>>, mpsc::UnboundedReceiver<Chunk>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner.outputs.lock().expect("not poisoned").insert(container.to_owned(), tx);
        self.call(Call::Attach { container: container.to_owned() }).await?;
        let input = Stdin { container: container.to_owned(), requests: self.inner.requests.clone() };
        Ok((Box::pin(input), rx))
    }
}

impl Inner {
    fn deliver(&self, message: Message) {
        match message {
            Message::Reply { id, outcome } => {
                if let Some(waiting) = self.pending.lock().expect("not poisoned").remove(&id) {
                    let _ = waiting.send(outcome);
                }
            }
            Message::Output { container, chunk } => {
                let mut outputs = self.outputs.lock().expect("not poisoned");
                let ended = matches!(chunk, Chunk::Ended(_));
                if let Some(tx) = outputs.get(&container) {
                    let _ = tx.send(chunk);
                }
                if ended {
                    outputs.remove(&container);
                }
            }
        }
    }
}

/// An attached container's stdin on another node: each write becomes a request.
struct Stdin {
    container: String,
    requests: mpsc::UnboundedSender<Request>,
}

impl AsyncWrite for Stdin {
    fn poll_write(self: Pin<&mut Self>, _: &mut TaskContext<'_>, bytes: &[u8]) -> Poll<std::io::Result<usize>> {
        let len = bytes.len().min(MAX_CHUNK);
        let sent =
            self.requests.send(Request::Write { container: self.container.clone(), bytes: bytes[..len].to_vec() });
        Poll::Ready(sent.map(|()| len).map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe)))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
