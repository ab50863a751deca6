//! Which members a peer knows, as a small filter carried in its hello.
//!
//! Discovery must not cost every connection a whole member list: at 256 peers that is 32,640
//! connections times 255 entries. Instead each hello carries a Bloom filter of the ids its
//! sender knows (about 12 bits per member), and the other side sends back, in `peers` messages,
//! only the members it knows that the filter lacks. A newcomer's empty filter gets it the whole
//! list once; two members that know the same peers exchange nothing. Each filter is salted
//! afresh, so a member that one filter happens to hide (a false positive, well under 1%) is
//! still told by the next neighbour.
//!
//! Ids are public keys, uniformly random, so the filter's bit positions are taken from the id's
//! bytes mixed with the salt; an attacker cannot aim at a filter whose salt it does not know.

use serde::{Deserialize, Serialize};

use crate::id::{PeerId, hex, random_u64, unhex};

/// Bit positions per member.
const HASHES: u8 = 6;
/// Bits per member, before rounding up to a power of two.
const BITS_PER_MEMBER: usize = 12;
/// The largest filter (bits): room for about 5,000 members.
pub const MAX_BITS: usize = 1 << 16;

/// A filter as it travels in a hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Known {
    /// Bit positions per member.
    pub k: u8,
    pub salt: u64,
    /// The bits, in hex; their number is a power of two (0 for an empty filter).
    pub bits: String,
}

impl Known {
    /// A filter of `ids`, with a fresh salt.
    pub fn of<'a>(ids: impl ExactSizeIterator<Item = &'a PeerId>) -> Known {
        let wanted = (ids.len() * BITS_PER_MEMBER).max(64).next_power_of_two().min(MAX_BITS);
        let salt = random_u64();
        let mut bits = vec![0u8; if ids.len() == 0 { 0 } else { wanted / 8 }];
        if !bits.is_empty() {
            for id in ids {
                for bit in positions(id, salt, HASHES, bits.len() * 8) {
                    bits[bit / 8] |= 1 << (bit % 8);
                }
            }
        }
        Known { k: HASHES, salt, bits: hex(&bits) }
    }

    /// An empty filter: "I know no one".
    pub fn empty() -> Known {
        Known { k: HASHES, salt: 0, bits: String::new() }
    }

    /// Checks what arrived from the network.
    pub fn check(&self) -> Result<(), String> {
        let bits = self.bits.len() * 4;
        if !(1..=16).contains(&self.k) {
            return Err(format!("k must be 1 to 16, not {}", self.k));
        }
        if bits != 0 && (!bits.is_power_of_two() || !(64..=MAX_BITS).contains(&bits)) {
            return Err(format!("{bits} bits: a power of two from 64 to {MAX_BITS}"));
        }
        if !self.bits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("bits are hex".into());
        }
        Ok(())
    }

    /// The filter's bits, ready for membership tests.
    pub fn reader(&self) -> Reader {
        Reader { k: self.k, salt: self.salt, bits: unhex(&self.bits).unwrap_or_default() }
    }
}

/// A decoded filter.
pub struct Reader {
    k: u8,
    salt: u64,
    bits: Vec<u8>,
}

impl Reader {
    /// Whether the filter's sender (probably) knows `id`. An empty filter knows no one.
    pub fn contains(&self, id: &PeerId) -> bool {
        let n = self.bits.len() * 8;
        n > 0 && positions(id, self.salt, self.k, n).all(|bit| self.bits[bit / 8] & (1 << (bit % 8)) != 0)
    }
}

/// The bit positions of `id` in a filter of `n` bits (a power of two): `k` 64-bit words of the
/// id (random bytes), each mixed with the salt.
fn positions(id: &PeerId, salt: u64, k: u8, n: usize) -> impl Iterator<Item = usize> + '_ {
    let bytes = id.as_bytes();
    (0..usize::from(k)).map(move |i| {
        let at = (i * 8) % 25;
        let word = u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let mixed = (word ^ salt.rotate_left(i as u32 * 7)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        (mixed >> 32) as usize & (n - 1)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Hex;

    fn ids(n: usize) -> Vec<PeerId> {
        (0..n).map(|_| PeerId(Hex::random())).collect()
    }

    #[test]
    fn members_are_found_and_strangers_rarely() {
        let members = ids(256);
        let filter = Known::of(members.iter());
        filter.check().unwrap();
        assert!(filter.bits.len() * 4 <= 4096, "about 12 bits a member: {}", filter.bits.len() * 4);
        let reader = filter.reader();
        assert!(members.iter().all(|m| reader.contains(m)));
        let strangers = ids(10_000);
        let false_positives = strangers.iter().filter(|s| reader.contains(s)).count();
        assert!(false_positives < 100, "{false_positives} of 10,000 strangers pass");
    }

    #[test]
    fn an_empty_filter_knows_no_one_and_salts_differ() {
        let e = Known::of([].iter());
        assert_eq!(e.bits, "");
        assert!(!e.reader().contains(&ids(1)[0]));
        let m = ids(3);
        assert_ne!(Known::of(m.iter()).salt, Known::of(m.iter()).salt);
    }

    #[test]
    fn bad_filters_are_refused() {
        for bad in [
            Known { k: 0, salt: 0, bits: String::new() },
            Known { k: 6, salt: 0, bits: "ab".into() },
            Known { k: 6, salt: 0, bits: "zz".repeat(8) },
            Known { k: 6, salt: 0, bits: "00".repeat(MAX_BITS / 4) },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
