//! Peer identities, and the fixed-size byte strings of the protocol.
//!
//! From protocol 2 on, a peer id *is* the peer's Ed25519 public key (32 bytes, written as 64
//! lowercase hex characters): whoever holds an id can check, with nothing else, a signature by
//! its owner (see [`crate::identity`]). Ids, nonces, chain hashes and signatures arrive from the
//! network as hex strings, so parsing validates them; inside the peer they are plain bytes, cheap
//! to compare and hash.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// `N` bytes, written as `2N` lowercase hex characters on the wire.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hex<const N: usize>(pub [u8; N]);

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("expected {expected} lowercase hex characters, got {got:?}")]
pub struct InvalidHex {
    expected: usize,
    got: String,
}

impl<const N: usize> Hex<N> {
    pub fn random() -> Self {
        Hex(random_bytes())
    }

    /// The first 8 hex characters, for logs and the chat view.
    pub fn short(&self) -> String {
        hex(&self.0[..4.min(N)])
    }
}

impl<const N: usize> FromStr for Hex<N> {
    type Err = InvalidHex;
    fn from_str(s: &str) -> Result<Self, InvalidHex> {
        let invalid = || InvalidHex { expected: 2 * N, got: s.chars().take(80).collect() };
        let lowercase = s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if s.len() != 2 * N || !lowercase {
            return Err(invalid());
        }
        let bytes = unhex(s).ok_or_else(invalid)?;
        Ok(Hex(bytes.try_into().map_err(|_| invalid())?))
    }
}

impl<const N: usize> fmt::Display for Hex<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl<const N: usize> fmt::Debug for Hex<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.short())
    }
}

impl<const N: usize> Serialize for Hex<N> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex(&self.0))
    }
}

impl<'de, const N: usize> Deserialize<'de> for Hex<N> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor<const N: usize>;
        impl<const N: usize> serde::de::Visitor<'_> for Visitor<N> {
            type Value = Hex<N>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{} lowercase hex characters", 2 * N)
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Hex<N>, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(Visitor::<N>)
    }
}

/// A peer's id: its Ed25519 public key. Ordering is that of the key's bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PeerId(pub Hex<32>);

impl PeerId {
    pub fn from_bytes(bytes: [u8; 32]) -> PeerId {
        PeerId(Hex(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0.0
    }

    /// A short form for logs and the chat view.
    pub fn short(&self) -> String {
        self.0.short()
    }
}

impl FromStr for PeerId {
    type Err = InvalidHex;
    fn from_str(s: &str) -> Result<Self, InvalidHex> {
        s.parse().map(PeerId)
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// Lowercase hex of some bytes.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

/// The bytes of a hex string (either case), if it is one.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// Bytes from the operating system's random source.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).expect("the operating system has no random source");
    buf
}

/// A random u64 (incarnations, backoff jitter, filter salts).
pub fn random_u64() -> u64 {
    u64::from_le_bytes(random_bytes::<8>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_through_hex_and_json() {
        let id = PeerId(Hex::random());
        assert_eq!(id.to_string().parse::<PeerId>().unwrap(), id);
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(json.len(), 66);
        assert_eq!(serde_json::from_str::<PeerId>(&json).unwrap(), id);
        assert_eq!(id.short().len(), 8);
    }

    #[test]
    fn rejects_malformed_hex() {
        for bad in ["", "abc", &"g".repeat(64), &"A".repeat(64), &"a".repeat(66), &"a".repeat(63)] {
            assert!(bad.parse::<PeerId>().is_err(), "{bad:?} accepted");
        }
        assert!(serde_json::from_str::<Hex<4>>("\"0011223\"").is_err());
        assert!(serde_json::from_str::<Hex<4>>("17").is_err());
    }

    #[test]
    fn order_is_that_of_the_bytes() {
        let low: PeerId = format!("0{}", "f".repeat(63)).parse().unwrap();
        let high: PeerId = format!("1{}", "0".repeat(63)).parse().unwrap();
        assert!(low < high);
    }
}
