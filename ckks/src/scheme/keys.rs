//! Keys: the ternary secret, the public key, and key-switching keys (relinearization and
//! Galois) for hybrid key switching.

use crate::error::{Error, Result};
use crate::ring::RnsPoly;
use crate::sampling::{fresh_seed, gaussian, os_rng, seeded_rng, ternary, uniform_poly};
use crate::scheme::Params;
use rand_core::{CryptoRng, RngCore};
use std::collections::BTreeMap;
use zeroize::Zeroize;

/// The secret `s`, uniform ternary. Zeroized on drop; `Debug` never prints it.
pub struct SecretKey {
    pub(crate) params: Params,
    /// Coefficients in {-1, 0, 1}.
    pub(crate) coeffs: Vec<i64>,
    /// `s` in the evaluation domain on every prime (`q_0..q_L, P`).
    pub(crate) ntt: RnsPoly,
}

impl Drop for SecretKey {
    fn drop(&mut self) {
        self.coeffs.zeroize();
        self.ntt.zeroize();
    }
}

impl std::fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretKey(<redacted>)")
    }
}

impl SecretKey {
    pub fn params(&self) -> &Params {
        &self.params
    }

    pub(crate) fn from_coeffs(params: &Params, coeffs: Vec<i64>) -> Self {
        let basis = params.key_basis();
        let mut ntt = params.ring().from_signed(&coeffs, &basis);
        params.ring().forward(&mut ntt, &basis);
        Self {
            params: params.clone(),
            coeffs,
            ntt,
        }
    }

    /// `s` restricted to `q_0..q_level` (evaluation domain).
    pub(crate) fn at_level(&self, level: usize) -> RnsPoly {
        self.ntt.copy_rows(0..level + 1)
    }
}

/// `(b, a) = (-a s + e, a)` on `q_0..q_L`, with `a` expanded from `seed`.
#[derive(Clone, Debug)]
pub struct PublicKey {
    pub(crate) params: Params,
    pub(crate) seed: [u8; 32],
    pub(crate) b: RnsPoly,
    pub(crate) a: RnsPoly,
}

impl PublicKey {
    pub fn params(&self) -> &Params {
        &self.params
    }
}

/// A hybrid key-switching key from some `s'` to `s`: per digit `j`,
/// `b_j = -a_j s + e_j + P * [digit j indicator] * s'` on `q_0..q_L, P`.
#[derive(Clone, Debug)]
pub struct KeySwitchingKey {
    pub(crate) params: Params,
    pub(crate) seed: [u8; 32],
    pub(crate) b: Vec<RnsPoly>,
    pub(crate) a: Vec<RnsPoly>,
}

impl KeySwitchingKey {
    pub fn params(&self) -> &Params {
        &self.params
    }
    pub fn digits(&self) -> usize {
        self.b.len()
    }
}

/// Switches `s^2` back to `s` after a multiplication.
#[derive(Clone, Debug)]
pub struct RelinKey(pub(crate) KeySwitchingKey);

impl RelinKey {
    pub fn params(&self) -> &Params {
        self.0.params()
    }
    pub fn key(&self) -> &KeySwitchingKey {
        &self.0
    }
}

/// Key-switching keys for slot rotations, by Galois element `5^k mod 2N`.
#[derive(Clone, Debug, Default)]
pub struct GaloisKeys {
    pub(crate) keys: BTreeMap<u64, KeySwitchingKey>,
}

impl GaloisKeys {
    pub fn get(&self, galois: u64) -> Result<&KeySwitchingKey> {
        self.keys
            .get(&galois)
            .ok_or(Error::MissingGaloisKey(galois))
    }
    pub fn elements(&self) -> impl Iterator<Item = u64> + '_ {
        self.keys.keys().copied()
    }
    pub fn insert(&mut self, galois: u64, key: KeySwitchingKey) {
        self.keys.insert(galois, key);
    }
}

/// The Galois element that rotates slots left by `steps` (negative: right).
pub fn galois_element(params: &Params, steps: i64) -> u64 {
    let m = 2 * params.n() as u64;
    let slots = params.slots() as i64;
    let k = steps.rem_euclid(slots) as u64;
    let mut g = 1u64;
    for _ in 0..k {
        g = g * 5 % m;
    }
    g
}

/// Generates keys from an operating-system-seeded cryptographic generator.
pub struct KeyGenerator<R: RngCore + CryptoRng> {
    params: Params,
    rng: R,
}

impl KeyGenerator<rand_chacha::ChaCha20Rng> {
    pub fn new(params: &Params) -> Self {
        Self::with_rng(params, os_rng())
    }
}

impl<R: RngCore + CryptoRng> KeyGenerator<R> {
    /// For reproducible tests; production code uses `new`.
    pub fn with_rng(params: &Params, rng: R) -> Self {
        Self {
            params: params.clone(),
            rng,
        }
    }

    pub fn secret_key(&mut self) -> SecretKey {
        let coeffs = ternary(&mut self.rng, self.params.n());
        SecretKey::from_coeffs(&self.params, coeffs)
    }

    /// Gaussian error in the evaluation domain on `basis`.
    fn error(&mut self, basis: &[usize]) -> RnsPoly {
        let mut e = gaussian(&mut self.rng, self.params.n());
        let ring = self.params.ring();
        let mut poly = ring.from_signed(&e, basis);
        e.zeroize();
        ring.forward(&mut poly, basis);
        poly
    }

    pub fn public_key(&mut self, sk: &SecretKey) -> PublicKey {
        let p = &self.params.clone();
        let level = p.max_level();
        let basis = p.q_basis(level);
        let seed = fresh_seed(&mut self.rng);
        let mut a = RnsPoly::zero(p.n(), level + 1);
        let moduli: Vec<_> = basis.iter().map(|&i| p.ring().modulus(i)).collect();
        uniform_poly(&mut seeded_rng(&seed), &moduli, &mut a);
        let mut b = self.error(&basis);
        let s = sk.at_level(level);
        let mut as_ = p.ring().mul(&a, &s, &basis);
        p.ring().sub_assign(&mut b, &as_, &basis);
        as_.zeroize();
        PublicKey {
            params: p.clone(),
            seed,
            b,
            a,
        }
    }

    /// A key from `from` (evaluation domain on `q_0..q_L`) to `sk`.
    pub(crate) fn switching_key(&mut self, sk: &SecretKey, from: &RnsPoly) -> KeySwitchingKey {
        let p = self.params.clone();
        let ring = p.ring();
        let top = p.max_level();
        let basis = p.key_basis();
        let moduli: Vec<_> = basis.iter().map(|&i| ring.modulus(i)).collect();
        let seed = fresh_seed(&mut self.rng);
        let mut a_rng = seeded_rng(&seed);
        let digits = p.digits(top);
        let (mut bs, mut as_) = (Vec::with_capacity(digits), Vec::with_capacity(digits));
        for j in 0..digits {
            let mut a = RnsPoly::zero(p.n(), basis.len());
            uniform_poly(&mut a_rng, &moduli, &mut a);
            let mut b = self.error(&basis);
            let mut prod = ring.mul(&a, &sk.ntt, &basis);
            ring.sub_assign(&mut b, &prod, &basis);
            prod.zeroize();
            let start = j * p.alpha();
            let end = ((j + 1) * p.alpha()).min(top + 1);
            for i in start..end {
                let m = ring.modulus(i);
                let f = p.p_mod_q()[i];
                let fs = m.shoup(f);
                let src = from.limb(i);
                for (x, &y) in b.limb_mut(i).iter_mut().zip(src) {
                    *x = m.add(*x, m.mul_shoup(y, f, fs));
                }
            }
            bs.push(b);
            as_.push(a);
        }
        KeySwitchingKey {
            params: p.clone(),
            seed,
            b: bs,
            a: as_,
        }
    }

    pub fn relin_key(&mut self, sk: &SecretKey) -> RelinKey {
        let p = self.params.clone();
        let basis = p.q_basis(p.max_level());
        let s = sk.at_level(p.max_level());
        let mut s2 = p.ring().mul(&s, &s, &basis);
        let key = self.switching_key(sk, &s2);
        s2.zeroize();
        RelinKey(key)
    }

    /// Keys for the given left-rotation steps.
    pub fn galois_keys(&mut self, sk: &SecretKey, steps: &[i64]) -> GaloisKeys {
        let p = self.params.clone();
        let basis = p.q_basis(p.max_level());
        let mut keys = GaloisKeys::default();
        for &k in steps {
            let g = galois_element(&p, k);
            if g == 1 || keys.keys.contains_key(&g) {
                continue;
            }
            let mut s_coeff = p.ring().from_signed(&sk.coeffs, &basis);
            let mut rotated = p.ring().automorphism(&s_coeff, g as usize, &basis);
            s_coeff.zeroize();
            p.ring().forward(&mut rotated, &basis);
            let key = self.switching_key(sk, &rotated);
            rotated.zeroize();
            keys.insert(g, key);
        }
        keys
    }
}
