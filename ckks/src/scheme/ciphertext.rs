//! Plaintexts and ciphertexts: polynomials in the evaluation domain with a level and a scale.

use crate::ring::RnsPoly;
use crate::scheme::Params;

/// An encoded message: one polynomial over `q_0..q_level` at `scale`.
#[derive(Clone, Debug, PartialEq)]
pub struct Plaintext {
    pub(crate) poly: RnsPoly,
    pub(crate) level: usize,
    pub(crate) scale: f64,
}

impl Plaintext {
    pub fn level(&self) -> usize {
        self.level
    }
    pub fn scale(&self) -> f64 {
        self.scale
    }
    pub fn poly(&self) -> &RnsPoly {
        &self.poly
    }
}

/// A CKKS ciphertext `(c_0, c_1[, c_2])` over `q_0..q_level`, decrypting to
/// `c_0 + c_1 s [+ c_2 s^2] ~ scale * message`.
#[derive(Clone)]
pub struct Ciphertext {
    pub(crate) params: Params,
    pub(crate) polys: Vec<RnsPoly>,
    pub(crate) level: usize,
    pub(crate) scale: f64,
    /// Set while `c_1` is exactly the expansion of this public seed (a fresh secret-key
    /// encryption); serialization then ships the seed instead of `c_1`.
    pub(crate) seed: Option<[u8; 32]>,
}

impl std::fmt::Debug for Ciphertext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ciphertext")
            .field("degree", &(self.polys.len() - 1))
            .field("level", &self.level)
            .field("scale_log2", &self.scale.log2())
            .field("seeded", &self.seed.is_some())
            .finish()
    }
}

impl Ciphertext {
    pub fn params(&self) -> &Params {
        &self.params
    }
    pub fn level(&self) -> usize {
        self.level
    }
    pub fn scale(&self) -> f64 {
        self.scale
    }
    /// 1 for a normal ciphertext, 2 after a multiplication and before relinearization.
    pub fn degree(&self) -> usize {
        self.polys.len() - 1
    }
    pub fn polys(&self) -> &[RnsPoly] {
        &self.polys
    }
    /// Whether `c_1` can be shipped as a 32-byte seed.
    pub fn is_seeded(&self) -> bool {
        self.seed.is_some()
    }
    /// Overrides the recorded scale, e.g. when a planner knows two nearly equal scales
    /// represent the same value. The caller owns the approximation this introduces.
    pub fn set_scale(&mut self, scale: f64) {
        self.scale = scale;
    }
}
