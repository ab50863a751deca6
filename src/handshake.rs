//! The connection handshake, as a state machine without IO.
//!
//! It is fed the frames that arrive (and the time) and answers with the frames to send, until it
//! is done or fails, so tests and the fuzzer drive the very code a connection runs, in memory
//! and with a synthetic clock; [`crate::connection`] drives it over TCP.
//!
//! ```text
//! open mesh                                   private mesh (mesh key)
//! D -> preamble(nonce D)                      D -> preamble(nonce D), Noise psk,e
//! A -> preamble(nonce A)                      A -> preamble(nonce A)
//!                                             A -> Noise e,ee [hello A], auth A     (sealed)
//! D -> hello D, auth D                        D -> hello D, auth D                  (sealed)
//! A -> hello A, auth A
//! ```
//!
//! `auth` is the sender's Ed25519 signature (its id is its public key) over: its side (dialler
//! or acceptor), the other side's nonce, its own nonce, the Noise handshake hash when keyed, and
//! its hello exactly as sent. Fresh nonces on both sides make a signature good for one connection
//! only; in a private mesh the handshake hash also ties it to this very Noise session, so not
//! even a key holder can relay another member's handshake as its own. A hello without a valid
//! signature by the key of its `id` is refused: nobody can claim an id it does not hold.
//! (An open mesh has no session key: see the threat model in docs/protocol.md.)

use bytes::Bytes;
use tokio::time::Instant;

use crate::frame::{self, Hello, Message, Nonce, PROTOCOL_MAX, PROTOCOL_MIN, Preamble, Security};
use crate::identity::{Domain, Identity, KeyError, PublicKey, Signature};
use crate::noise::{MeshKey, Noise, NoiseError, Transport};

/// Which side of the connection this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Dialer,
    Acceptor,
}

impl Side {
    fn byte(self) -> u8 {
        match self {
            Side::Dialer => b'D',
            Side::Acceptor => b'A',
        }
    }

    fn other(self) -> Side {
        match self {
            Side::Dialer => Side::Acceptor,
            Side::Acceptor => Side::Dialer,
        }
    }
}

/// What this peer brings to every handshake.
pub struct Local {
    pub identity: Identity,
    pub mesh_key: Option<MeshKey>,
}

impl Local {
    pub fn security(&self) -> Security {
        if self.mesh_key.is_some() { Security::NoisePsk } else { Security::Open }
    }
}

/// Why a handshake failed. `Refused` and `Invalid` also tell the other side, with a `refuse`.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("bad preamble: {0}")]
    Preamble(String),
    #[error("bad hello: {0}")]
    Hello(String),
    #[error("refused by the other side: {0}")]
    RefusedByRemote(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("expected {expected}, got {got}")]
    Unexpected { expected: &'static str, got: String },
    #[error("no handshake within {0:?}")]
    Timeout(std::time::Duration),
    #[error("{0}")]
    Noise(#[from] NoiseError),
}

/// A failure, with the frames to send before closing (a refusal, when there is one to give).
#[derive(Debug)]
pub struct Failure {
    pub error: HandshakeError,
    pub send: Vec<Bytes>,
}

impl From<HandshakeError> for Failure {
    fn from(error: HandshakeError) -> Self {
        Failure { error, send: Vec::new() }
    }
}

impl From<NoiseError> for Failure {
    fn from(e: NoiseError) -> Self {
        HandshakeError::Noise(e).into()
    }
}

/// A completed handshake.
pub struct Established {
    /// The other side's hello, its signature checked.
    pub hello: Hello,
    pub version: u32,
    pub our_nonce: Nonce,
    pub their_nonce: Nonce,
    /// The other side's public key, decoded once.
    pub key: PublicKey,
    /// In a private mesh: seals and opens every frame from now on.
    pub transport: Option<Transport>,
}

/// What a frame moved the handshake to.
pub enum Progress {
    /// Send these frames (maybe none) and wait for the next one.
    Continue(Vec<Bytes>),
    /// The connection is established (everything this side had to send is sent).
    Done(Box<Established>),
}

enum Stage {
    /// Waiting for the other side's preamble (a keyed dialler has sent Noise's first message).
    Preamble(Option<Noise>),
    /// Keyed acceptor: waiting for Noise's first message.
    NoiseFirst(Noise),
    /// Keyed dialler: waiting for Noise's second message, which carries the acceptor's hello.
    NoiseSecond(Noise),
    /// Waiting for the other side's hello.
    Hello,
    /// Waiting for the other side's signature on the hello it sent.
    Auth {
        hello: Hello,
        raw: Bytes,
        key: PublicKey,
    },
    Done,
}

pub struct Handshake<'a> {
    side: Side,
    local: &'a Local,
    our_nonce: Nonce,
    /// Our hello, encoded once: the bytes we sign are the bytes we send.
    our_hello: Bytes,
    their_nonce: Option<Nonce>,
    version: u32,
    /// The Noise handshake hash, once keyed.
    channel: Option<[u8; 32]>,
    transport: Option<Transport>,
    stage: Stage,
    deadline: Instant,
    timeout: std::time::Duration,
}

impl<'a> Handshake<'a> {
    /// Starts a handshake; returns it and the frames to send at once.
    pub fn start(
        side: Side,
        local: &'a Local,
        hello: &Hello,
        now: Instant,
        timeout: std::time::Duration,
    ) -> Result<(Handshake<'a>, Vec<Bytes>), Failure> {
        let our_nonce = Nonce::random();
        let mut send = vec![Preamble::new(local.security(), our_nonce).encode()];
        let noise = match (&local.mesh_key, side) {
            (Some(key), Side::Dialer) => {
                let mut noise = Noise::new(key, true)?;
                send.push(noise.write(&[])?);
                Some(noise)
            }
            _ => None,
        };
        let hs = Handshake {
            side,
            local,
            our_nonce,
            our_hello: Message::Hello(hello.clone()).encode(),
            their_nonce: None,
            version: 0,
            channel: None,
            transport: None,
            stage: Stage::Preamble(noise),
            deadline: now + timeout,
            timeout,
        };
        Ok((hs, send))
    }

    /// When the handshake must be done by.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The failure to report when the deadline passes with the handshake unfinished.
    pub fn timed_out(&self) -> Failure {
        HandshakeError::Timeout(self.timeout).into()
    }

    /// Feeds one frame that arrived at `now`.
    pub fn receive(&mut self, frame: &[u8], now: Instant) -> Result<Progress, Failure> {
        if now > self.deadline {
            return Err(self.timed_out());
        }
        match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Preamble(noise) => self.on_preamble(frame, noise),
            Stage::NoiseFirst(noise) => self.on_noise_first(frame, noise),
            Stage::NoiseSecond(noise) => self.on_noise_second(frame, noise),
            Stage::Hello => {
                let raw = self.open(frame)?;
                self.on_hello(raw)?;
                Ok(Progress::Continue(Vec::new()))
            }
            Stage::Auth { hello, raw, key } => self.on_auth(frame, hello, raw, key),
            Stage::Done => Err(HandshakeError::Unexpected { expected: "nothing", got: "a frame".into() }.into()),
        }
    }

    fn on_preamble(&mut self, frame: &[u8], noise: Option<Noise>) -> Result<Progress, Failure> {
        let theirs: Preamble = match serde_json::from_slice(frame) {
            Ok(p) => p,
            Err(_) => return Err(refusal_or(frame, HandshakeError::Preamble("not a meshlab preamble".into())).into()),
        };
        if theirs.protocol != frame::PROTOCOL_NAME {
            return Err(HandshakeError::Preamble(format!("unknown protocol {:?}", theirs.protocol)).into());
        }
        // Version 1 sent no range: it speaks 1 only.
        let (min, max) = theirs.versions.unwrap_or((1, 1));
        let Some(version) = frame::negotiate((PROTOCOL_MIN, PROTOCOL_MAX), (min, max)) else {
            return Err(self.refuse(format!(
                "no common protocol version: this peer speaks {PROTOCOL_MIN}..={PROTOCOL_MAX}, the other side {min}..={max}"
            )));
        };
        if theirs.security != self.local.security() {
            let reason = match self.local.security() {
                Security::Open => "this peer runs an open mesh (no key) but the other side uses a mesh key",
                Security::NoisePsk => "this peer's mesh requires a key but the other side has none",
            };
            return Err(self.refuse(reason.into()));
        }
        let Some(nonce) = theirs.nonce else {
            return Err(HandshakeError::Preamble("no nonce".into()).into());
        };
        if nonce == self.our_nonce {
            return Err(HandshakeError::Preamble("our own nonce came back".into()).into());
        }
        self.their_nonce = Some(nonce);
        self.version = version;
        match (&self.local.mesh_key, noise) {
            (None, _) => {
                self.stage = Stage::Hello;
                Ok(Progress::Continue(self.hello_and_auth()?))
            }
            (Some(_), Some(noise)) => {
                self.stage = Stage::NoiseSecond(noise);
                Ok(Progress::Continue(Vec::new()))
            }
            (Some(key), None) => {
                self.stage = Stage::NoiseFirst(Noise::new(key, false)?);
                Ok(Progress::Continue(Vec::new()))
            }
        }
    }

    /// Keyed acceptor: the dialler's first Noise message proves it holds the mesh key; the
    /// answer carries our hello, and our signature follows, sealed.
    fn on_noise_first(&mut self, frame: &[u8], mut noise: Noise) -> Result<Progress, Failure> {
        if noise.read(frame).is_err() {
            return Err(self.refuse("wrong mesh key: the other side does not hold this mesh's key".into()));
        }
        let second = noise.write(&self.our_hello)?;
        self.channel = Some(noise.hash());
        self.transport = Some(noise.finish()?);
        let auth = self.seal(&self.auth())?;
        self.stage = Stage::Hello;
        Ok(Progress::Continue(vec![second, auth]))
    }

    /// Keyed dialler: the acceptor's answer carries its hello; ours follows, sealed.
    fn on_noise_second(&mut self, frame: &[u8], mut noise: Noise) -> Result<Progress, Failure> {
        let raw = noise.read(frame).map_err(|e| refusal_or(frame, e.into()))?;
        self.channel = Some(noise.hash());
        self.transport = Some(noise.finish()?);
        self.on_hello(raw)?;
        Ok(Progress::Continue(self.hello_and_auth()?))
    }

    fn on_hello(&mut self, raw: Bytes) -> Result<(), Failure> {
        let hello = match Message::decode(&raw) {
            Ok(Message::Hello(h)) => h,
            Ok(Message::Refuse { reason }) => return Err(HandshakeError::RefusedByRemote(reason).into()),
            Ok(other) => {
                return Err(HandshakeError::Unexpected { expected: "hello", got: other.kind().into() }.into());
            }
            Err(e) => return Err(self.refuse(format!("bad hello: {e}"))),
        };
        let key = match PublicKey::of(&hello.id) {
            Ok(key) => key,
            Err(KeyError::NotAKey) => return Err(self.refuse("the hello's id is not a public key".into())),
            Err(KeyError::Weak) => return Err(self.refuse("the hello's id is a weak key".into())),
        };
        self.stage = Stage::Auth { hello, raw, key };
        Ok(())
    }

    fn on_auth(&mut self, frame: &[u8], hello: Hello, raw: Bytes, key: PublicKey) -> Result<Progress, Failure> {
        let sig = match Message::decode(&self.open(frame)?) {
            Ok(Message::Auth { sig }) => sig,
            Ok(Message::Refuse { reason }) => return Err(HandshakeError::RefusedByRemote(reason).into()),
            Ok(other) => {
                return Err(HandshakeError::Unexpected { expected: "auth", got: other.kind().into() }.into());
            }
            Err(e) => return Err(HandshakeError::Hello(e.to_string()).into()),
        };
        let their_nonce = self.their_nonce.expect("set with the preamble");
        let signed = self.transcript(self.side.other(), &self.our_nonce, &their_nonce);
        if !key.verify(Domain::Hello, &[&signed, &raw], &sig) {
            return Err(self.refuse("the hello is not signed by the key of the id it claims".into()));
        }
        let established = Established {
            hello,
            version: self.version,
            our_nonce: self.our_nonce,
            their_nonce,
            key,
            transport: self.transport.take(),
        };
        Ok(Progress::Done(Box::new(established)))
    }

    /// Our hello and our signature on it, as frames (sealed once keyed).
    fn hello_and_auth(&mut self) -> Result<Vec<Bytes>, Failure> {
        let hello = self.seal(&self.our_hello.clone())?;
        let auth = self.seal(&self.auth())?;
        Ok(vec![hello, auth])
    }

    /// Our `auth` message.
    fn auth(&self) -> Bytes {
        let their_nonce = self.their_nonce.expect("set with the preamble");
        let signed = self.transcript(self.side, &their_nonce, &self.our_nonce);
        let sig: Signature = self.local.identity.sign(Domain::Hello, &[&signed, &self.our_hello]);
        Message::Auth { sig }.encode()
    }

    /// What a hello signature covers besides the hello: the signer's side, the other side's
    /// nonce, the signer's nonce and the Noise handshake hash (zeros in an open mesh).
    fn transcript(&self, signer: Side, other_nonce: &Nonce, signer_nonce: &Nonce) -> Vec<u8> {
        let mut t = Vec::with_capacity(1 + 32 * 3);
        t.push(signer.byte());
        t.extend_from_slice(&other_nonce.0);
        t.extend_from_slice(&signer_nonce.0);
        t.extend_from_slice(&self.channel.unwrap_or([0; 32]));
        t
    }

    fn seal(&mut self, payload: &[u8]) -> Result<Bytes, NoiseError> {
        match &mut self.transport {
            Some(t) => t.seal.seal(payload),
            None => Ok(Bytes::copy_from_slice(payload)),
        }
    }

    fn open(&mut self, frame: &[u8]) -> Result<Bytes, Failure> {
        match &mut self.transport {
            Some(t) => Ok(t.open.open(frame)?),
            None => Ok(Bytes::copy_from_slice(frame)),
        }
    }

    /// A refusal: the error, and the `refuse` frame that tells the other side why.
    fn refuse(&mut self, reason: String) -> Failure {
        let frame = Message::Refuse { reason: reason.clone() }.encode();
        let send = self.seal(&frame).map(|f| vec![f]).unwrap_or_default();
        Failure { error: HandshakeError::Refused(reason), send }
    }
}

/// A frame that is not what was expected may be the other side's refusal: report that instead.
fn refusal_or(payload: &[u8], otherwise: HandshakeError) -> HandshakeError {
    match Message::decode(payload) {
        Ok(Message::Refuse { reason }) => HandshakeError::RefusedByRemote(reason),
        _ => otherwise,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::chain;
    use crate::known::Known;

    const TIMEOUT: Duration = Duration::from_secs(5);

    fn local(mesh_key: Option<&MeshKey>) -> Local {
        Local { identity: Identity::generate(), mesh_key: mesh_key.cloned() }
    }

    fn hello_of(local: &Local, name: &str) -> Hello {
        let id = local.identity.id();
        Hello {
            id,
            incarnation: 7,
            name: name.into(),
            port: 4000,
            advertise: None,
            seq: 0,
            head: chain::genesis(&id),
            known: Known::empty(),
        }
    }

    /// Runs a dialler and an acceptor against each other in memory, frame by frame, letting
    /// `tamper` change what the dialler sends. Returns what each side ended with.
    fn run(
        dialer: &Local,
        acceptor: &Local,
        dialer_hello: Hello,
        mut tamper: impl FnMut(usize, Bytes) -> Bytes,
    ) -> (Result<Box<Established>, HandshakeError>, Result<Box<Established>, HandshakeError>) {
        let now = Instant::now();
        let (mut d, to_a) = Handshake::start(Side::Dialer, dialer, &dialer_hello, now, TIMEOUT).unwrap();
        let (mut a, to_d) =
            Handshake::start(Side::Acceptor, acceptor, &hello_of(acceptor, "acceptor"), now, TIMEOUT).unwrap();
        let mut to_a: std::collections::VecDeque<Bytes> =
            to_a.into_iter().enumerate().map(|(i, f)| tamper(i, f)).collect();
        let mut to_d: std::collections::VecDeque<Bytes> = to_d.into();
        let mut sent_by_d = to_a.len();
        let (mut d_done, mut a_done) = (None, None);
        for _ in 0..20 {
            if a_done.is_none()
                && let Some(f) = to_a.pop_front()
            {
                match a.receive(&f, now) {
                    Ok(Progress::Continue(out)) => to_d.extend(out),
                    Ok(Progress::Done(e)) => a_done = Some(Ok(e)),
                    Err(fail) => {
                        to_d.extend(fail.send);
                        a_done = Some(Err(fail.error));
                    }
                }
            }
            if d_done.is_none()
                && let Some(f) = to_d.pop_front()
            {
                match d.receive(&f, now) {
                    Ok(Progress::Continue(out)) => {
                        for f in out {
                            to_a.push_back(tamper(sent_by_d, f));
                            sent_by_d += 1;
                        }
                    }
                    Ok(Progress::Done(e)) => d_done = Some(Ok(e)),
                    Err(fail) => d_done = Some(Err(fail.error)),
                }
            }
        }
        (d_done.expect("the dialler finished"), a_done.expect("the acceptor finished"))
    }

    fn untouched(_: usize, f: Bytes) -> Bytes {
        f
    }

    #[test]
    fn open_and_keyed_handshakes_prove_both_ids() {
        let key = MeshKey::generate();
        for mesh_key in [None, Some(&key)] {
            let (d, a) = (local(mesh_key), local(mesh_key));
            let (on_d, on_a) = run(&d, &a, hello_of(&d, "dialler"), untouched);
            let (on_d, on_a) = (on_d.unwrap(), on_a.unwrap());
            assert_eq!(on_d.hello.id, a.identity.id());
            assert_eq!(on_a.hello.id, d.identity.id());
            assert_eq!((on_d.version, on_a.version), (2, 2));
            assert_eq!(on_d.our_nonce, on_a.their_nonce);
            assert_eq!(on_d.transport.is_some(), mesh_key.is_some());
        }
    }

    #[test]
    fn a_hello_claiming_another_id_is_refused() {
        let key = MeshKey::generate();
        for mesh_key in [None, Some(&key)] {
            let (d, a, victim) = (local(mesh_key), local(mesh_key), local(mesh_key));
            let (on_d, on_a) = run(&d, &a, hello_of(&victim, "impostor"), untouched);
            let refused = on_a.err().expect("refused").to_string();
            assert_eq!(refused, "refused: the hello is not signed by the key of the id it claims");
            assert!(on_d.is_ok(), "the dialler checked the acceptor, which is genuine");
        }
    }

    #[test]
    fn a_signature_from_another_connection_is_refused() {
        // A hello and its signature recorded on one connection, replayed on another: the
        // nonces differ, so the signature does not cover this connection.
        let (d, a) = (local(None), local(None));
        let mut recorded = Vec::new();
        let _ = run(&d, &a, hello_of(&d, "d"), |_, f| {
            recorded.push(f.clone());
            f
        });
        let (replayer, a2) = (local(None), local(None));
        let (_, on_a) = run(&replayer, &a2, hello_of(&replayer, "d"), |i, f| match i {
            1 | 2 => recorded[i].clone(),
            _ => f,
        });
        assert_eq!(on_a.err().unwrap().to_string(), "refused: the hello is not signed by the key of the id it claims");
    }

    #[test]
    fn a_wrong_mesh_key_and_a_missing_one_are_refused_with_reasons() {
        let (k1, k2) = (MeshKey::generate(), MeshKey::generate());
        let (d, a) = (local(Some(&k1)), local(Some(&k2)));
        let (on_d, on_a) = run(&d, &a, hello_of(&d, "d"), untouched);
        assert!(on_a.err().unwrap().to_string().contains("wrong mesh key"));
        assert!(on_d.err().unwrap().to_string().starts_with("refused by the other side: wrong mesh key"));
        let (d, a) = (local(None), local(Some(&k1)));
        let (on_d, on_a) = run(&d, &a, hello_of(&d, "d"), untouched);
        assert!(on_a.err().unwrap().to_string().contains("requires a key but the other side has none"));
        assert!(on_d.err().unwrap().to_string().contains("open mesh (no key) but the other side uses a mesh key"));
    }

    #[test]
    fn a_version_1_preamble_gets_a_refusal_naming_both_versions() {
        let a = local(None);
        let now = Instant::now();
        let (mut hs, _) = Handshake::start(Side::Acceptor, &a, &hello_of(&a, "a"), now, TIMEOUT).unwrap();
        let v1 = br#"{"protocol":"meshlab","security":"open"}"#;
        let Err(fail) = hs.receive(v1, now) else { panic!("accepted a version-1 peer") };
        let reason = "no common protocol version: this peer speaks 2..=2, the other side 1..=1";
        assert_eq!(fail.error.to_string(), format!("refused: {reason}"));
        let sent: serde_json::Value = serde_json::from_slice(&fail.send[0]).unwrap();
        assert_eq!(sent, serde_json::json!({"type": "refuse", "reason": reason}), "what a version-1 peer reads");
    }

    #[test]
    fn garbage_late_frames_and_the_deadline_fail_cleanly() {
        let a = local(None);
        let now = Instant::now();
        let (mut hs, _) = Handshake::start(Side::Acceptor, &a, &hello_of(&a, "a"), now, TIMEOUT).unwrap();
        assert!(hs.receive(b"\xff\x00garbage", now).is_err());
        let (mut hs, _) = Handshake::start(Side::Acceptor, &a, &hello_of(&a, "a"), now, TIMEOUT).unwrap();
        let late = now + TIMEOUT + Duration::from_millis(1);
        let Err(fail) = hs.receive(b"{}", late) else { panic!() };
        assert_eq!(fail.error.to_string(), "no handshake within 5s");
        assert_eq!(hs.deadline(), now + TIMEOUT);
    }
}
