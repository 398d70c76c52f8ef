//! Encryption (secret-key with a seeded `c_1`, or public-key) and decryption.

use crate::error::{Error, Result};
use crate::ring::RnsPoly;
use crate::sampling::{fresh_seed, gaussian, os_rng, seeded_rng, ternary, uniform_poly};
use crate::scheme::{Ciphertext, Params, Plaintext, PublicKey, SecretKey};
use rand_core::{CryptoRng, RngCore};
use zeroize::Zeroize;

/// Encrypts plaintexts; randomness from the operating system unless a test supplies it.
pub struct Encryptor<R: RngCore + CryptoRng> {
    params: Params,
    rng: R,
}

impl Encryptor<rand_chacha::ChaCha20Rng> {
    pub fn new(params: &Params) -> Self {
        Self::with_rng(params, os_rng())
    }
}

impl<R: RngCore + CryptoRng> Encryptor<R> {
    /// For reproducible tests; production code uses `new`.
    pub fn with_rng(params: &Params, rng: R) -> Self {
        Self {
            params: params.clone(),
            rng,
        }
    }

    fn small_poly(&mut self, coeffs: Vec<i64>, basis: &[usize]) -> RnsPoly {
        let mut coeffs = coeffs;
        let ring = self.params.ring();
        let mut p = ring.from_signed(&coeffs, basis);
        coeffs.zeroize();
        ring.forward(&mut p, basis);
        p
    }

    fn check(&self, params: &Params) -> Result<()> {
        if *params != self.params {
            return Err(Error::ParamsMismatch);
        }
        Ok(())
    }

    /// `(-a s + e + m, a)` with `a` expanded from a fresh public seed: the ciphertext ships
    /// as one polynomial and 32 bytes.
    pub fn encrypt_sk(&mut self, sk: &SecretKey, pt: &Plaintext) -> Result<Ciphertext> {
        self.check(&sk.params)?;
        let p = self.params.clone();
        let ring = p.ring();
        let level = pt.level;
        let basis = p.q_basis(level);
        let seed = fresh_seed(&mut self.rng);
        let mut a = RnsPoly::zero(p.n(), level + 1);
        let moduli: Vec<_> = basis.iter().map(|&i| ring.modulus(i)).collect();
        uniform_poly(&mut seeded_rng(&seed), &moduli, &mut a);
        let e = gaussian(&mut self.rng, p.n());
        let mut c0 = self.small_poly(e, &basis);
        let mut s = sk.at_level(level);
        let mut as_ = ring.mul(&a, &s, &basis);
        s.zeroize();
        ring.sub_assign(&mut c0, &as_, &basis);
        as_.zeroize();
        ring.add_assign(&mut c0, &pt.poly, &basis);
        Ok(Ciphertext {
            params: p.clone(),
            polys: vec![c0, a],
            level,
            scale: pt.scale,
            seed: Some(seed),
        })
    }

    /// Encodes and encrypts in one pass: the message and the error are added as integers
    /// before a single NTT, which saves one NTT per prime over `encode` + `encrypt_sk`.
    /// The result is the same seeded ciphertext.
    pub fn encrypt_values_sk(
        &mut self,
        sk: &SecretKey,
        values: &[f64],
        scale: f64,
        level: usize,
    ) -> Result<Ciphertext> {
        self.check(&sk.params)?;
        let p = self.params.clone();
        let ring = p.ring();
        let encoder = crate::scheme::Encoder::new(&p);
        let mut ints = encoder.scaled_coefficients(values, scale, level)?;
        let mut e = gaussian(&mut self.rng, p.n());
        for (m, &x) in ints.iter_mut().zip(&e) {
            *m += x as i128;
        }
        e.zeroize();
        let basis = p.q_basis(level);
        let mut c0 = encoder.integers_to_rns(&ints, level);
        ints.zeroize();
        ring.forward(&mut c0, &basis);
        let seed = fresh_seed(&mut self.rng);
        let mut a = RnsPoly::zero(p.n(), level + 1);
        let moduli: Vec<_> = basis.iter().map(|&i| ring.modulus(i)).collect();
        uniform_poly(&mut seeded_rng(&seed), &moduli, &mut a);
        let mut s = sk.at_level(level);
        let mut as_ = ring.mul(&a, &s, &basis);
        s.zeroize();
        ring.sub_assign(&mut c0, &as_, &basis);
        as_.zeroize();
        Ok(Ciphertext {
            params: p.clone(),
            polys: vec![c0, a],
            level,
            scale,
            seed: Some(seed),
        })
    }

    /// `(v b + e_0 + m, v a + e_1)` with ephemeral ternary `v`.
    pub fn encrypt_pk(&mut self, pk: &PublicKey, pt: &Plaintext) -> Result<Ciphertext> {
        self.check(&pk.params)?;
        let p = self.params.clone();
        let ring = p.ring();
        let level = pt.level;
        let basis = p.q_basis(level);
        let v_coeffs = ternary(&mut self.rng, p.n());
        let mut v = self.small_poly(v_coeffs, &basis);
        let e0 = gaussian(&mut self.rng, p.n());
        let mut c0 = self.small_poly(e0, &basis);
        let e1 = gaussian(&mut self.rng, p.n());
        let mut c1 = self.small_poly(e1, &basis);
        let b = pk.b.copy_rows(0..level + 1);
        let a = pk.a.copy_rows(0..level + 1);
        ring.mul_accumulate(&mut c0, &v, &b, &basis);
        ring.mul_accumulate(&mut c1, &v, &a, &basis);
        v.zeroize();
        ring.add_assign(&mut c0, &pt.poly, &basis);
        Ok(Ciphertext {
            params: p.clone(),
            polys: vec![c0, c1],
            level,
            scale: pt.scale,
            seed: None,
        })
    }
}

/// Decrypts with the secret key; accepts degree-1 and degree-2 ciphertexts.
pub fn decrypt(sk: &SecretKey, ct: &Ciphertext) -> Result<Plaintext> {
    if sk.params != ct.params {
        return Err(Error::ParamsMismatch);
    }
    let p = &ct.params;
    let ring = p.ring();
    let basis = p.q_basis(ct.level);
    let s = sk.at_level(ct.level);
    // Horner: c_0 + s (c_1 + s c_2).
    let mut acc = ct.polys[ct.polys.len() - 1].clone();
    for c in ct.polys[..ct.polys.len() - 1].iter().rev() {
        let mut next = c.clone();
        ring.mul_accumulate(&mut next, &acc, &s, &basis);
        acc = next;
    }
    let mut s = s;
    s.zeroize();
    Ok(Plaintext {
        poly: acc,
        level: ct.level,
        scale: ct.scale,
    })
}
