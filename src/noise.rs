//! The private mesh: a pre-shared mesh key, and the Noise handshake that checks it.
//!
//! With a mesh key, every connection runs `Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s` (snow) right
//! after the preambles: the mesh key is mixed in from the first message, so a peer without it
//! (or with another) is refused at that message, before any Diffie-Hellman work and before a
//! single byte of the mesh is sent to it; everything after it is encrypted and authenticated.
//! The pattern has no static keys: who each side is, is proven by its Ed25519 signature over the
//! Noise handshake hash (the Noise specification's channel binding, section 11.2), the same
//! signed hello as in an open mesh (see crate::handshake). That costs each side one key
//! generation and one Diffie-Hellman, where an XX pattern costs four.
//!
//! After the handshake every frame is sealed with an explicit nonce per direction, so the reader
//! and the writer of a connection need not share a lock.

use std::sync::Arc;

use bytes::Bytes;
use snow::{Builder, HandshakeState, StatelessTransportState};

use crate::id::{hex, random_bytes, unhex};

const PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
const PROLOGUE: &[u8] = b"meshlab/2";
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

/// One side of a Noise handshake in progress.
pub struct Noise(HandshakeState);

#[derive(Debug, thiserror::Error)]
#[error("noise handshake: {0}")]
pub struct NoiseError(String);

impl From<snow::Error> for NoiseError {
    fn from(e: snow::Error) -> Self {
        NoiseError(e.to_string())
    }
}

/// Room a handshake message needs beyond its payload (an ephemeral key and a tag).
const HANDSHAKE_OVERHEAD: usize = 64;

impl Noise {
    pub fn new(mesh: &MeshKey, initiator: bool) -> Result<Noise, NoiseError> {
        let b = Builder::new(PATTERN.parse().expect("a valid Noise pattern")).psk(0, &mesh.0).prologue(PROLOGUE);
        Ok(Noise(if initiator { b.build_initiator()? } else { b.build_responder()? }))
    }

    /// The next handshake message to send, carrying `payload` (encrypted under the mesh key).
    pub fn write(&mut self, payload: &[u8]) -> Result<Bytes, NoiseError> {
        let mut buf = vec![0u8; payload.len() + HANDSHAKE_OVERHEAD];
        let n = self.0.write_message(payload, &mut buf)?;
        buf.truncate(n);
        Ok(Bytes::from(buf))
    }

    /// Reads the other side's handshake message and returns its payload. The responder's read
    /// of the first message is where a wrong mesh key shows.
    pub fn read(&mut self, message: &[u8]) -> Result<Bytes, NoiseError> {
        let mut buf = vec![0u8; message.len()];
        let n = self.0.read_message(message, &mut buf)?;
        buf.truncate(n);
        Ok(Bytes::from(buf))
    }

    /// The handshake hash: both sides hold the same value once the handshake is complete, and
    /// no third party can make two sessions share one.
    pub fn hash(&self) -> [u8; 32] {
        self.0.get_handshake_hash().try_into().expect("BLAKE2s hashes are 32 bytes")
    }

    /// The transport after the handshake.
    pub fn finish(self) -> Result<Transport, NoiseError> {
        let state = Arc::new(self.0.into_stateless_transport_mode()?);
        Ok(Transport { seal: Sealer { state: state.clone(), nonce: 0 }, open: Opener { state, nonce: 0 } })
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

    fn run(a: &MeshKey, b: &MeshKey) -> Result<(Transport, Transport, [u8; 32], [u8; 32]), NoiseError> {
        let mut i = Noise::new(a, true)?;
        let mut r = Noise::new(b, false)?;
        assert!(r.read(&i.write(b"")?)?.is_empty());
        assert_eq!(&i.read(&r.write(b"responder's hello")?)?[..], b"responder's hello");
        let (hi, hr) = (i.hash(), r.hash());
        Ok((i.finish()?, r.finish()?, hi, hr))
    }

    #[test]
    fn the_same_mesh_key_connects_and_both_sides_share_the_hash() {
        let mesh = MeshKey::generate();
        let (mut ti, mut tr, hi, hr) = run(&mesh, &mesh).unwrap();
        assert_eq!(hi, hr);
        let (.., other, _) = run(&mesh, &mesh).unwrap();
        assert_ne!(hi, other, "every session has its own hash");
        for text in [&b"hello"[..], b"", &[7u8; 1000]] {
            let sealed = ti.seal.seal(text).unwrap();
            assert_eq!(&tr.open.open(&sealed).unwrap()[..], text);
            assert_eq!(sealed.len(), text.len() + TAG);
        }
        let back = tr.seal.seal(b"reply").unwrap();
        assert_eq!(&ti.open.open(&back).unwrap()[..], b"reply");
    }

    #[test]
    fn another_mesh_key_is_refused_at_the_first_message() {
        let mut i = Noise::new(&MeshKey::generate(), true).unwrap();
        let mut r = Noise::new(&MeshKey::generate(), false).unwrap();
        assert!(r.read(&i.write(b"").unwrap()).is_err());
    }

    #[test]
    fn tampered_or_replayed_frames_are_rejected() {
        let mesh = MeshKey::generate();
        let (mut ti, mut tr, _, _) = run(&mesh, &mesh).unwrap();
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
