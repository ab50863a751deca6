//! The private mesh: a pre-shared mesh key and the Noise handshake that checks it.
//!
//! With a mesh key, every connection runs `Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s` right after
//! the preambles: the dialler is the initiator and both sides prove their static key. The mesh
//! key is mixed in from the first message, so a peer without it (or with another) is refused at
//! that message, before any Diffie-Hellman work and before a single byte of the mesh (hello,
//! peers, lines) is sent to it; and because everything after it is encrypted under the mesh key,
//! the two hellos travel inside the second and third handshake messages (three hops for a keyed
//! connection). Afterwards every frame is encrypted and authenticated, with an explicit nonce
//! per direction, so the reader and the writer of a connection need not share a lock. A peer's
//! id is derived from its static public key, so nobody can claim another's id in a handshake.

use std::sync::Arc;

use bytes::Bytes;
use snow::{Builder, HandshakeState, StatelessTransportState};

use crate::id::{PeerId, hex, random_bytes};

const PATTERN: &str = "Noise_XXpsk0_25519_ChaChaPoly_BLAKE2s";
const PROLOGUE: &[u8] = b"meshlab/1";
/// Bytes an encrypted frame adds to its plaintext.
pub const TAG: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("a mesh key is 64 hex characters (32 bytes); got {0} characters")]
    Length(usize),
    #[error("a mesh key is written in hex (0-9, a-f)")]
    NotHex,
}

/// The pre-shared key every member of a private mesh holds.
#[derive(Clone)]
pub struct MeshKey([u8; 32]);

impl MeshKey {
    pub fn generate() -> MeshKey {
        MeshKey(random_bytes())
    }

    pub fn parse(text: &str) -> Result<MeshKey, KeyError> {
        let text = text.trim();
        if text.len() != 64 {
            return Err(KeyError::Length(text.len()));
        }
        let bytes = unhex(text).ok_or(KeyError::NotHex)?;
        Ok(MeshKey(bytes.try_into().expect("64 hex characters are 32 bytes")))
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }
}

impl std::fmt::Debug for MeshKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MeshKey(…)")
    }
}

/// A peer's long-term Noise key pair, and the id derived from it.
#[derive(Clone)]
pub struct StaticKey {
    pub private: Vec<u8>,
    pub public: Vec<u8>,
}

impl StaticKey {
    pub fn generate() -> StaticKey {
        let pair = builder().generate_keypair().expect("the default resolver generates 25519 keys");
        StaticKey { private: pair.private, public: pair.public }
    }

    pub fn id(&self) -> PeerId {
        PeerId::from_key(&self.public)
    }

    /// The pair in hex, for the state directory.
    pub fn to_hex(&self) -> (String, String) {
        (hex(&self.private), hex(&self.public))
    }

    pub fn from_hex(private: &str, public: &str) -> Option<StaticKey> {
        let (private, public) = (unhex(private)?, unhex(public)?);
        (private.len() == 32 && public.len() == 32).then_some(StaticKey { private, public })
    }
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

impl Keys {
    /// Runs one whole handshake in memory, so that the first real one does not pay for cold
    /// code and tables. Called before the peer announces that it listens.
    pub fn warm_up(&self) {
        let other = Keys { mesh: self.mesh.clone(), local: StaticKey::generate() };
        let (Ok(mut i), Ok(mut r)) = (Handshake::new(self, true), Handshake::new(&other, false)) else { return };
        let _ = i.write(b"").and_then(|m| r.read(&m)).and_then(|_| r.write(b"")).and_then(|m| i.read(&m));
        let _ = i.write(b"").and_then(|m| r.read(&m));
        let _ = i.finish();
    }
}

/// What a keyed connection needs: the mesh key and our static key.
#[derive(Clone)]
pub struct Keys {
    pub mesh: MeshKey,
    pub local: StaticKey,
}

fn builder<'a>() -> Builder<'a> {
    Builder::with_resolver(PATTERN.parse().expect("a valid Noise pattern"), Box::new(crate::x25519::Resolver))
}

/// Room a handshake message needs beyond its payload (keys and tags).
const HANDSHAKE_OVERHEAD: usize = 128;

/// One side of a Noise handshake in progress.
pub struct Handshake(HandshakeState);

#[derive(Debug, thiserror::Error)]
#[error("noise handshake: {0}")]
pub struct NoiseError(String);

impl From<snow::Error> for NoiseError {
    fn from(e: snow::Error) -> Self {
        NoiseError(e.to_string())
    }
}

impl Handshake {
    pub fn new(keys: &Keys, initiator: bool) -> Result<Handshake, NoiseError> {
        let b = builder().local_private_key(&keys.local.private).psk(0, &keys.mesh.0).prologue(PROLOGUE);
        Ok(Handshake(if initiator { b.build_initiator()? } else { b.build_responder()? }))
    }

    /// The next handshake message to send, carrying `payload` (encrypted under the mesh key).
    pub fn write(&mut self, payload: &[u8]) -> Result<Bytes, NoiseError> {
        let mut buf = vec![0u8; payload.len() + HANDSHAKE_OVERHEAD];
        let n = self.0.write_message(payload, &mut buf)?;
        buf.truncate(n);
        Ok(Bytes::from(buf))
    }

    /// Reads the other side's handshake message and returns its payload. With XXpsk0, the
    /// responder's read of the first message is where a wrong mesh key shows.
    pub fn read(&mut self, message: &[u8]) -> Result<Bytes, NoiseError> {
        let mut buf = vec![0u8; message.len()];
        let n = self.0.read_message(message, &mut buf)?;
        buf.truncate(n);
        Ok(Bytes::from(buf))
    }

    /// The transport after the handshake, and the id the other side's static key stands for.
    pub fn finish(self) -> Result<(Transport, PeerId), NoiseError> {
        let remote = self
            .0
            .get_remote_static()
            .map(PeerId::from_key)
            .ok_or_else(|| NoiseError("no remote static key".into()))?;
        let state = Arc::new(self.0.into_stateless_transport_mode()?);
        let transport = Transport { seal: Sealer { state: state.clone(), nonce: 0 }, open: Opener { state, nonce: 0 } };
        Ok((transport, remote))
    }
}

/// The two directions of an established keyed connection.
pub struct Transport {
    pub seal: Sealer,
    pub open: Opener,
}

/// Encrypts outgoing frames, in order.
pub struct Sealer {
    state: Arc<StatelessTransportState>,
    nonce: u64,
}

impl Sealer {
    pub fn seal(&mut self, plaintext: &[u8]) -> Result<Bytes, NoiseError> {
        let mut buf = vec![0u8; plaintext.len() + TAG];
        let n = self.state.write_message(self.nonce, plaintext, &mut buf)?;
        self.nonce += 1;
        buf.truncate(n);
        Ok(Bytes::from(buf))
    }
}

/// Decrypts and authenticates incoming frames, in order.
pub struct Opener {
    state: Arc<StatelessTransportState>,
    nonce: u64,
}

impl Opener {
    pub fn open(&mut self, ciphertext: &[u8]) -> Result<Bytes, NoiseError> {
        let mut buf = vec![0u8; ciphertext.len()];
        let n = self.state.read_message(self.nonce, ciphertext, &mut buf)?;
        self.nonce += 1;
        buf.truncate(n);
        Ok(Bytes::from(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(a: &Keys, b: &Keys) -> Result<(Transport, Transport, PeerId, PeerId), NoiseError> {
        let mut i = Handshake::new(a, true)?;
        let mut r = Handshake::new(b, false)?;
        assert!(r.read(&i.write(b"")?)?.is_empty());
        assert_eq!(&i.read(&r.write(b"responder's hello")?)?[..], b"responder's hello");
        assert_eq!(&r.read(&i.write(b"initiator's hello")?)?[..], b"initiator's hello");
        let (ti, seen_by_i) = i.finish()?;
        let (tr, seen_by_r) = r.finish()?;
        Ok((ti, tr, seen_by_i, seen_by_r))
    }

    fn keys(mesh: &MeshKey) -> Keys {
        Keys { mesh: mesh.clone(), local: StaticKey::generate() }
    }

    #[test]
    fn the_same_mesh_key_connects_and_proves_ids() {
        let mesh = MeshKey::generate();
        let (a, b) = (keys(&mesh), keys(&mesh));
        let (mut ti, mut tr, seen_by_i, seen_by_r) = run(&a, &b).unwrap();
        assert_eq!(seen_by_i, b.local.id());
        assert_eq!(seen_by_r, a.local.id());
        for text in [&b"hello"[..], b"", &[7u8; 1000]] {
            let sealed = ti.seal.seal(text).unwrap();
            assert_eq!(&tr.open.open(&sealed).unwrap()[..], text);
            assert_eq!(sealed.len(), text.len() + TAG);
            if !text.is_empty() {
                assert_ne!(&sealed[..text.len()], text, "the ciphertext differs from the text");
            }
        }
        let back = tr.seal.seal(b"reply").unwrap();
        assert_eq!(&ti.open.open(&back).unwrap()[..], b"reply");
    }

    #[test]
    fn another_mesh_key_is_refused_at_the_first_message() {
        let (a, b) = (keys(&MeshKey::generate()), keys(&MeshKey::generate()));
        let mut i = Handshake::new(&a, true).unwrap();
        let mut r = Handshake::new(&b, false).unwrap();
        assert!(r.read(&i.write(b"").unwrap()).is_err());
    }

    #[test]
    fn tampered_or_replayed_frames_are_rejected() {
        let mesh = MeshKey::generate();
        let (mut ti, mut tr, _, _) = run(&keys(&mesh), &keys(&mesh)).unwrap();
        let sealed = ti.seal.seal(b"line").unwrap();
        let mut bad = sealed.to_vec();
        bad[0] ^= 1;
        assert!(tr.open.open(&bad).is_err());
        let fresh = ti.seal.seal(b"next").unwrap();
        assert!(tr.open.open(&fresh).is_err(), "out of order after a failure");
    }

    #[test]
    fn keys_parse_from_hex() {
        let key = MeshKey::generate();
        assert_eq!(MeshKey::parse(&format!(" {}\n", key.to_hex())).unwrap().0, key.0);
        assert!(matches!(MeshKey::parse("abc"), Err(KeyError::Length(3))));
        assert!(matches!(MeshKey::parse(&"zz".repeat(32)), Err(KeyError::NotHex)));
    }
}
