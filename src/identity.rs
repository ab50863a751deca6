//! Who a peer is: an Ed25519 key pair, whose public key is the peer's id.
//!
//! Everything a peer says that others must be able to pin on it is signed with this key, in a
//! domain of its own so that no signature can be replayed as another kind of statement: its
//! hello on every connection (bound to both sides' fresh nonces, see [`crate::handshake`]), the
//! heads of its line chain ([`crate::chain`]), the statement that its lines up to some point are
//! gone, its goodbye and its notices. Any peer can check any of them with the id alone. The
//! signatures are ed25519-dalek's; nothing here is cryptography of our own.

use ed25519_dalek::{Signer, SigningKey, Verifier, VerifyingKey};

use crate::id::{Hex, PeerId, random_bytes};

/// A signature, as it travels.
pub type Signature = Hex<64>;

/// What a signature vouches for; each kind is signed under its own prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Domain {
    /// A hello, bound to the connection's two nonces (and, keyed, the Noise handshake).
    Hello,
    /// The head of a chain of lines: "my line N has chain hash H".
    Head,
    /// "My lines up to N are gone from my history; my chain hash at N is H".
    Gone,
    /// "This incarnation of me leaves the mesh".
    Goodbye,
    /// A word for one neighbour's user.
    Notice,
}

impl Domain {
    fn prefix(self) -> &'static [u8] {
        match self {
            Domain::Hello => b"meshlab/2 hello\0",
            Domain::Head => b"meshlab/2 head\0",
            Domain::Gone => b"meshlab/2 gone\0",
            Domain::Goodbye => b"meshlab/2 goodbye\0",
            Domain::Notice => b"meshlab/2 notice\0",
        }
    }
}

fn message(domain: Domain, parts: &[&[u8]]) -> Vec<u8> {
    let len = domain.prefix().len() + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut m = Vec::with_capacity(len);
    m.extend_from_slice(domain.prefix());
    for p in parts {
        m.extend_from_slice(p);
    }
    m
}

/// A peer's key pair.
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
    id: PeerId,
}

impl Identity {
    /// A fresh random identity.
    pub fn generate() -> Identity {
        Identity::from_secret(random_bytes())
    }

    /// The identity whose secret key (seed) is these 32 bytes.
    pub fn from_secret(secret: [u8; 32]) -> Identity {
        let key = SigningKey::from_bytes(&secret);
        let id = PeerId::from_bytes(key.verifying_key().to_bytes());
        Identity { key, id }
    }

    pub fn id(&self) -> PeerId {
        self.id
    }

    /// The secret key, for the state directory.
    pub fn secret(&self) -> Hex<32> {
        Hex(self.key.to_bytes())
    }

    /// Signs `parts`, concatenated, in `domain`.
    pub fn sign(&self, domain: Domain, parts: &[&[u8]]) -> Signature {
        Hex(self.key.sign(&message(domain, parts)).to_bytes())
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({:?})", self.id)
    }
}

/// An id's public key, ready to check signatures with (decoding a key costs about as much as a
/// third of a verification, so holders of many signatures by one peer keep this).
#[derive(Clone, Copy, Debug)]
pub struct PublicKey(VerifyingKey);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("the id is not an Ed25519 public key")]
    NotAKey,
    #[error("the id is a weak (small-order) Ed25519 key")]
    Weak,
}

impl PublicKey {
    pub fn of(id: &PeerId) -> Result<PublicKey, KeyError> {
        let key = VerifyingKey::from_bytes(id.as_bytes()).map_err(|_| KeyError::NotAKey)?;
        if key.is_weak() {
            return Err(KeyError::Weak);
        }
        Ok(PublicKey(key))
    }

    /// Whether `sig` is this key's signature of `parts` in `domain`.
    pub fn verify(&self, domain: Domain, parts: &[&[u8]], sig: &Signature) -> bool {
        let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
        self.0.verify(&message(domain, parts), &sig).is_ok()
    }
}

/// Whether `sig` is `id`'s signature of `parts` in `domain`.
pub fn verify(id: &PeerId, domain: Domain, parts: &[&[u8]], sig: &Signature) -> bool {
    PublicKey::of(id).is_ok_and(|k| k.verify(domain, parts, sig))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_under_their_id_and_domain_only() {
        let me = Identity::generate();
        let sig = me.sign(Domain::Head, &[b"seven", b"hash"]);
        assert!(verify(&me.id(), Domain::Head, &[b"seven", b"hash"], &sig));
        assert!(verify(&me.id(), Domain::Head, &[b"sevenhash"], &sig), "parts are concatenated");
        assert!(!verify(&me.id(), Domain::Gone, &[b"seven", b"hash"], &sig), "another domain");
        assert!(!verify(&me.id(), Domain::Head, &[b"eight", b"hash"], &sig), "another message");
        assert!(!verify(&Identity::generate().id(), Domain::Head, &[b"seven", b"hash"], &sig), "another key");
        let mut bent = sig;
        bent.0[3] ^= 1;
        assert!(!verify(&me.id(), Domain::Head, &[b"seven", b"hash"], &bent));
    }

    #[test]
    fn an_identity_is_its_secret() {
        let me = Identity::generate();
        let again = Identity::from_secret(me.secret().0);
        assert_eq!(again.id(), me.id());
    }

    #[test]
    fn weak_and_invalid_keys_are_not_ids() {
        // The identity point (small order), and bytes that are no point at all.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert_eq!(PublicKey::of(&PeerId::from_bytes(identity)).unwrap_err(), KeyError::Weak);
        let not_a_point = (0u8..=255)
            .map(|b| {
                let mut k = [b; 32];
                k[31] &= 0x7f;
                k
            })
            .find(|k| VerifyingKey::from_bytes(k).is_err())
            .expect("some constant byte string is not a point");
        assert_eq!(PublicKey::of(&PeerId::from_bytes(not_a_point)).unwrap_err(), KeyError::NotAKey);
    }
}
