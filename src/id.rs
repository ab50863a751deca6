//! Peer identities.
//!
//! A peer id names one member of the mesh: 128 bits written as 32 lowercase hex characters.
//! It is random per process start, unless the peer keeps it in a state directory or derives it
//! from its Noise static key. Ids arrive from the network, so parsing validates them.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Length of a peer id in hex characters.
pub const ID_HEX_LEN: usize = 32;

/// A validated peer id. Ordering is the numeric order of the 128-bit value.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PeerId(String);

#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid peer id {0:?}: expected {ID_HEX_LEN} lowercase hex characters")]
pub struct InvalidId(String);

impl PeerId {
    /// A fresh random id.
    pub fn random() -> Self {
        PeerId(hex(&random_bytes::<16>()))
    }

    /// An id derived from bytes (for example a public key): the first 16 bytes, in hex.
    pub fn from_key(key: &[u8]) -> Self {
        let mut bytes = [0u8; 16];
        let n = key.len().min(16);
        bytes[..n].copy_from_slice(&key[..n]);
        PeerId(hex(&bytes))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A short form for logs and the chat view.
    pub fn short(&self) -> &str {
        &self.0[..8]
    }
}

impl TryFrom<String> for PeerId {
    type Error = InvalidId;
    fn try_from(s: String) -> Result<Self, InvalidId> {
        let valid = s.len() == ID_HEX_LEN && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if valid { Ok(PeerId(s)) } else { Err(InvalidId(s.chars().take(80).collect())) }
    }
}

impl std::str::FromStr for PeerId {
    type Err = InvalidId;
    fn from_str(s: &str) -> Result<Self, InvalidId> {
        PeerId::try_from(s.to_owned())
    }
}

impl From<PeerId> for String {
    fn from(id: PeerId) -> String {
        id.0
    }
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.short())
    }
}

/// Lowercase hex of some bytes.
pub fn hex(bytes: &[u8]) -> String {
    use fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// Bytes from the operating system's random source.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    getrandom::fill(&mut buf).expect("the operating system has no random source");
    buf
}

/// A random u64 (connection nonces, backoff jitter).
pub fn random_u64() -> u64 {
    u64::from_le_bytes(random_bytes::<8>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ids_are_valid_and_distinct() {
        let a = PeerId::random();
        let b = PeerId::random();
        assert_ne!(a, b);
        assert_eq!(a.as_str().parse::<PeerId>().unwrap(), a);
    }

    #[test]
    fn rejects_malformed_ids() {
        for bad in ["", "abc", &"G".repeat(32), &"A".repeat(32), &"a".repeat(33)] {
            assert!(bad.parse::<PeerId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn order_is_numeric() {
        let low: PeerId = format!("0{}", "f".repeat(31)).parse().unwrap();
        let high: PeerId = format!("1{}", "0".repeat(31)).parse().unwrap();
        assert!(low < high);
    }
}
