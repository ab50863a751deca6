//! Authorship of lines: each sender's lines form a hash chain, whose heads it signs.
//!
//! Line `n` of a sender has the chain hash `h(n) = SHA-256("meshlab/2 line\0", h(n-1), n, at,
//! name, text)`, starting from `h(0) = SHA-256("meshlab/2 genesis\0", id)`. A sender signs the
//! head of each batch of lines it says ([`Domain::Head`]: "my line n has hash h(n)"), so one
//! signature vouches for every line up to it. A receiver that knows `h(m)` for its watermark `m`
//! checks a batch `m+1..=n` with one verification, whichever neighbour relayed it: it hashes the
//! lines from `h(m)` and checks the signature on `h(n)`. A line cannot be forged, altered,
//! reordered or dropped from the middle of a chain without the check failing.
//!
//! The same hashes let a sender say that its lines up to `n` are gone ([`Domain::Gone`]) and give
//! `h(n)`, so that a receiver can skip them and still check what follows. Nobody else can say so.

use sha2::{Digest, Sha256};

use crate::id::{Hex, PeerId};
use crate::identity::{Domain, Identity, PublicKey, Signature};

/// A chain hash.
pub type ChainHash = Hex<32>;

/// The chain hash before a sender's first line.
pub fn genesis(origin: &PeerId) -> ChainHash {
    Hex(Sha256::new().chain_update(b"meshlab/2 genesis\0").chain_update(origin.as_bytes()).finalize().into())
}

/// The chain hash of line `seq`, given the hash of the line before it.
pub fn next(prev: &ChainHash, seq: u64, at_ms: u64, name: &str, text: &str) -> ChainHash {
    debug_assert!(name.len() <= 255, "names are at most 64 bytes");
    Hex(Sha256::new()
        .chain_update(b"meshlab/2 line\0")
        .chain_update(prev.0)
        .chain_update(seq.to_be_bytes())
        .chain_update(at_ms.to_be_bytes())
        .chain_update([name.len() as u8])
        .chain_update(name.as_bytes())
        .chain_update(text.as_bytes())
        .finalize()
        .into())
}

/// A sender's signature on the head of its chain at `seq`.
pub fn sign_head(me: &Identity, seq: u64, hash: &ChainHash) -> Signature {
    me.sign(Domain::Head, &[&seq.to_be_bytes(), &hash.0])
}

pub fn head_is_signed(key: &PublicKey, seq: u64, hash: &ChainHash, sig: &Signature) -> bool {
    key.verify(Domain::Head, &[&seq.to_be_bytes(), &hash.0], sig)
}

/// A sender's signed word that its lines up to `upto` are gone.
pub fn sign_gone(me: &Identity, upto: u64, hash: &ChainHash) -> Signature {
    me.sign(Domain::Gone, &[&upto.to_be_bytes(), &hash.0])
}

pub fn gone_is_signed(key: &PublicKey, upto: u64, hash: &ChainHash, sig: &Signature) -> bool {
    key.verify(Domain::Gone, &[&upto.to_be_bytes(), &hash.0], sig)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_field_and_the_past_change_the_hash() {
        let id = Identity::generate().id();
        let g = genesis(&id);
        assert_ne!(g, genesis(&Identity::generate().id()));
        let one = next(&g, 1, 10, "alice", "hi");
        for other in [
            next(&g, 2, 10, "alice", "hi"),
            next(&g, 1, 11, "alice", "hi"),
            next(&g, 1, 10, "alicf", "hi"),
            next(&g, 1, 10, "alice", "ho"),
            next(&g, 1, 10, "alic", "ehi"),
            next(&one, 1, 10, "alice", "hi"),
        ] {
            assert_ne!(one, other);
        }
    }

    #[test]
    fn heads_and_gone_statements_are_not_interchangeable() {
        let me = Identity::generate();
        let key = PublicKey::of(&me.id()).unwrap();
        let h = next(&genesis(&me.id()), 1, 0, "a", "x");
        let head = sign_head(&me, 1, &h);
        assert!(head_is_signed(&key, 1, &h, &head));
        assert!(!gone_is_signed(&key, 1, &h, &head), "a head is no word that lines are gone");
        assert!(!head_is_signed(&key, 2, &h, &head));
        let gone = sign_gone(&me, 1, &h);
        assert!(gone_is_signed(&key, 1, &h, &gone));
        assert!(!head_is_signed(&key, 1, &h, &gone));
    }
}
