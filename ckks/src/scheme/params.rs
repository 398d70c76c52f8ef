//! CKKS parameter sets: ring degree, modulus chain, special primes, default scale, and the
//! 128-bit security check.

use crate::arith::{ntt_primes_below, Modulus, ShoupConst, MAX_MODULUS_BITS};
use crate::error::{Error, Result};
use crate::ring::RingContext;
use crate::scheme::encoder::EncoderTables;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Largest log2(Q*P) for 128-bit security with a uniform ternary secret (HE Standard,
/// homomorphicencryption.org, Table 1), indexed by log2(N).
pub const HE_STANDARD_128_MAX_LOG_QP: [(u32, u32); 5] =
    [(12, 109), (13, 218), (14, 438), (15, 881), (16, 1772)];

/// The 128-bit bound on log2(Q*P) for ring degree `2^log_n`, if the standard lists one.
pub fn max_log_qp_128(log_n: u32) -> Option<u32> {
    HE_STANDARD_128_MAX_LOG_QP
        .iter()
        .find(|(l, _)| *l == log_n)
        .map(|(_, m)| *m)
}

/// A parameter set described by bit sizes; primes are derived deterministically. Its JSON form
/// is how the server tells a client which parameters a model uses.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParamSpec {
    /// Ring degree N = 2^log_n; N/2 slots.
    pub log_n: u32,
    /// Bit sizes of the ciphertext primes q_0 (decryption prime) .. q_L.
    pub q_bits: Vec<u32>,
    /// Bit sizes of the special primes P used by key switching. Their count is the digit
    /// size `alpha` of hybrid key switching: `ceil((L+1)/alpha)` digits.
    pub p_bits: Vec<u32>,
    /// Default encoding scale is 2^log_scale.
    pub log_scale: u32,
}

impl ParamSpec {
    /// A chain of `limbs` ciphertext primes: one 50-bit q_0 (room for the decrypted message)
    /// and `limbs - 1` primes of `level_bits`; `digits` key-switching digits decide how many
    /// 50-bit special primes there are.
    pub fn chain(log_n: u32, limbs: usize, level_bits: u32, digits: usize) -> Self {
        let limbs = limbs.max(1);
        let digits = digits.clamp(1, limbs);
        let alpha = limbs.div_ceil(digits);
        let mut q_bits = vec![MAX_MODULUS_BITS];
        q_bits.extend(std::iter::repeat_n(level_bits, limbs - 1));
        Self {
            log_n,
            q_bits,
            p_bits: vec![MAX_MODULUS_BITS; alpha],
            log_scale: level_bits,
        }
    }

    pub fn log_qp(&self) -> u32 {
        self.q_bits.iter().chain(&self.p_bits).sum()
    }
}

/// Whether a parameter set passed the 128-bit check or was built explicitly for tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    /// log2(Q*P) within the HE Standard bound for 128-bit security.
    Bits128,
    /// Built by `Params::insecure_for_tests`: fine for tests, never for real data.
    InsecureForTests,
}

/// Named 128-bit presets.
pub mod presets {
    use super::ParamSpec;

    /// N = 8192: 4 limbs (50 + 3x40 bits), one 48-bit special prime; log2(QP) = 218.
    pub fn n8192() -> ParamSpec {
        ParamSpec {
            log_n: 13,
            q_bits: vec![50, 40, 40, 40],
            p_bits: vec![48],
            log_scale: 40,
        }
    }

    /// N = 16384: 8 limbs (50 + 7x40 bits), two 50-bit special primes (4 digits);
    /// log2(QP) = 430.
    pub fn n16384() -> ParamSpec {
        ParamSpec::chain(14, 8, 40, 4)
    }

    /// N = 32768: 17 limbs (50 + 16x40 = 690 bits, SEAL's classic 40-bit chain) and four
    /// 47-bit special primes (5 key-switching digits of at most 170 bits, below P's 188);
    /// log2(QP) = 878 <= 881.
    pub fn n32768() -> ParamSpec {
        ParamSpec {
            p_bits: vec![47; 4],
            ..ParamSpec::chain(15, 17, 40, 5)
        }
    }

    /// A small chain for tests: N = 1024, 3 limbs. NOT SECURE: only
    /// `Params::insecure_for_tests` accepts it, and the server refuses it unless started with
    /// `--insecure-test-params`.
    pub fn insecure_test_n1024() -> ParamSpec {
        ParamSpec::chain(10, 3, 40, 3)
    }

    /// Preset names as used on the command line and in the browser.
    pub const NAMES: [&str; 4] = ["n8192", "n16384", "n32768", "insecure-test-n1024"];

    /// Looks a preset up by name; `insecure-test-*` names build insecure test parameters.
    pub fn by_name(name: &str) -> Option<super::Result<super::Params>> {
        Some(match name {
            "n8192" => super::Params::new(n8192()),
            "n16384" => super::Params::new(n16384()),
            "n32768" => super::Params::new(n32768()),
            "insecure-test-n1024" => super::Params::insecure_for_tests(insecure_test_n1024()),
            _ => return None,
        })
    }

    /// The preset for a ring degree, if there is one.
    pub fn for_n(n: usize) -> Option<ParamSpec> {
        match n {
            8192 => Some(n8192()),
            16384 => Some(n16384()),
            32768 => Some(n32768()),
            _ => None,
        }
    }
}

/// A validated parameter set with everything derived from it; cheap to clone.
#[derive(Clone)]
pub struct Params(Arc<Inner>);

struct Inner {
    spec: ParamSpec,
    security: Security,
    q: Vec<u64>,
    p: Vec<u64>,
    ring: RingContext,
    fingerprint: [u8; 32],
    encoder: EncoderTables,
    /// `[l][i]`: `q_l^-1 mod q_i` for rescaling from level `l`.
    rescale_inv: Vec<Vec<ShoupConst>>,
    /// `[i]`: `P mod q_i` for all ciphertext primes.
    p_mod_q: Vec<u64>,
    /// `[i]`: `P^-1 mod q_i`.
    p_inv_mod_q: Vec<ShoupConst>,
}

impl std::fmt::Debug for Params {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Params")
            .field("n", &self.n())
            .field("q_bits", &self.0.spec.q_bits)
            .field("p_bits", &self.0.spec.p_bits)
            .field("security", &self.0.security)
            .finish()
    }
}

impl PartialEq for Params {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0) || self.0.fingerprint == other.0.fingerprint
    }
}

impl Params {
    /// Builds a 128-bit-secure parameter set; refuses anything the HE Standard does not
    /// cover.
    pub fn new(spec: ParamSpec) -> Result<Self> {
        let max = max_log_qp_128(spec.log_n).ok_or_else(|| {
            Error::InvalidParams(format!(
                "N = 2^{} has no 128-bit bound in the HE Standard (use N = 2^12 .. 2^16)",
                spec.log_n
            ))
        })?;
        let params = Self::build(spec, Security::Bits128)?;
        let log_qp = params.log_qp();
        if log_qp > max as f64 {
            return Err(Error::Insecure {
                n: params.n(),
                log_qp,
                max,
            });
        }
        Ok(params)
    }

    /// `Params::new`, or - only when `allow_insecure` - the insecure test build of a spec that
    /// fails the 128-bit check. For specs received over the wire (server model listings).
    pub fn from_spec(spec: ParamSpec, allow_insecure: bool) -> Result<Self> {
        match Self::new(spec.clone()) {
            Err(Error::Insecure { .. } | Error::InvalidParams(_)) if allow_insecure => {
                Self::insecure_for_tests(spec)
            }
            other => other,
        }
    }

    /// Builds a parameter set WITHOUT the security check, for tests only. The result says
    /// so (`security() == InsecureForTests`) and the evaluator service refuses it unless it
    /// was started with an explicit test flag.
    pub fn insecure_for_tests(spec: ParamSpec) -> Result<Self> {
        Self::build(spec, Security::InsecureForTests)
    }

    fn build(spec: ParamSpec, security: Security) -> Result<Self> {
        if !(4..=16).contains(&spec.log_n) {
            return Err(Error::InvalidParams(format!(
                "log_n = {} outside 4..=16",
                spec.log_n
            )));
        }
        if spec.q_bits.is_empty() || spec.q_bits.len() > 64 {
            return Err(Error::InvalidParams("need 1..=64 ciphertext primes".into()));
        }
        // Base conversion from the special primes sums up to DOT_MAX_TERMS lazy products.
        let max_special = spec.q_bits.len().min(crate::arith::kernels::DOT_MAX_TERMS);
        if spec.p_bits.is_empty() || spec.p_bits.len() > max_special {
            return Err(Error::InvalidParams(format!(
                "need between 1 and {max_special} special primes"
            )));
        }
        for &b in spec.q_bits.iter().chain(&spec.p_bits) {
            if !(17..=MAX_MODULUS_BITS).contains(&b) {
                return Err(Error::InvalidParams(format!(
                    "prime size {b} bits outside 17..={MAX_MODULUS_BITS}"
                )));
            }
        }
        if spec.log_scale == 0 || spec.log_scale > 60 {
            return Err(Error::InvalidParams("log_scale must be in 1..=60".into()));
        }
        let n = 1usize << spec.log_n;
        // Special primes first (largest of their size), then the chain in order; each request
        // skips primes already taken, so the result depends on the bit sizes alone.
        let mut taken: Vec<u64> = Vec::new();
        let pick = |bits: u32, taken: &mut Vec<u64>| -> Result<u64> {
            let q = ntt_primes_below(bits, n, 1, taken)
                .ok_or_else(|| {
                    Error::InvalidParams(format!("not enough {bits}-bit primes = 1 mod 2N"))
                })?
                .remove(0);
            taken.push(q);
            Ok(q)
        };
        let p: Vec<u64> = spec
            .p_bits
            .iter()
            .map(|&b| pick(b, &mut taken))
            .collect::<Result<_>>()?;
        let q: Vec<u64> = spec
            .q_bits
            .iter()
            .map(|&b| pick(b, &mut taken))
            .collect::<Result<_>>()?;
        let all: Vec<u64> = q.iter().chain(&p).copied().collect();
        let ring = RingContext::new(n, &all)
            .ok_or_else(|| Error::InvalidParams("no NTT for some prime".into()))?;

        let qm: Vec<Modulus> = q.iter().map(|&v| Modulus::new(v).unwrap()).collect();
        let rescale_inv = (0..q.len())
            .map(|l| {
                (0..l)
                    .map(|i| ShoupConst::new(qm[i].inv(q[l]).expect("distinct primes"), &qm[i]))
                    .collect()
            })
            .collect();
        let p_mod_q: Vec<u64> = qm
            .iter()
            .map(|qi| p.iter().fold(1u64, |acc, &pj| qi.mul(acc, qi.reduce(pj))))
            .collect();
        let p_inv_mod_q = qm
            .iter()
            .zip(&p_mod_q)
            .map(|(qi, &pm)| ShoupConst::new(qi.inv(pm).expect("distinct primes"), qi))
            .collect();

        let mut h = Sha256::new();
        h.update(b"beaa-ckks/params/v1");
        h.update((n as u64).to_le_bytes());
        h.update((q.len() as u64).to_le_bytes());
        for v in &q {
            h.update(v.to_le_bytes());
        }
        h.update((p.len() as u64).to_le_bytes());
        for v in &p {
            h.update(v.to_le_bytes());
        }
        h.update([spec.log_scale as u8, security as u8]);
        let fingerprint: [u8; 32] = h.finalize().into();

        Ok(Self(Arc::new(Inner {
            encoder: EncoderTables::new(n),
            spec,
            security,
            q,
            p,
            ring,
            fingerprint,
            rescale_inv,
            p_mod_q,
            p_inv_mod_q,
        })))
    }

    pub fn spec(&self) -> &ParamSpec {
        &self.0.spec
    }
    pub fn security(&self) -> Security {
        self.0.security
    }
    pub fn is_secure(&self) -> bool {
        self.0.security == Security::Bits128
    }
    pub fn n(&self) -> usize {
        self.0.ring.n()
    }
    pub fn slots(&self) -> usize {
        self.n() / 2
    }
    /// Highest level: a fresh ciphertext has `max_level() + 1` limbs.
    pub fn max_level(&self) -> usize {
        self.0.q.len() - 1
    }
    pub fn q(&self) -> &[u64] {
        &self.0.q
    }
    pub fn p(&self) -> &[u64] {
        &self.0.p
    }
    /// Digit size of hybrid key switching (= number of special primes).
    pub fn alpha(&self) -> usize {
        self.0.p.len()
    }
    /// Key-switching digits at `level`.
    pub fn digits(&self, level: usize) -> usize {
        (level + 1).div_ceil(self.alpha())
    }
    pub fn default_scale(&self) -> f64 {
        (self.0.spec.log_scale as f64).exp2()
    }
    pub fn ring(&self) -> &RingContext {
        &self.0.ring
    }
    pub fn fingerprint(&self) -> &[u8; 32] {
        &self.0.fingerprint
    }
    pub(crate) fn encoder_tables(&self) -> &EncoderTables {
        &self.0.encoder
    }
    pub(crate) fn rescale_inv(&self, level: usize) -> &[ShoupConst] {
        &self.0.rescale_inv[level]
    }
    pub(crate) fn p_mod_q(&self) -> &[u64] {
        &self.0.p_mod_q
    }
    pub(crate) fn p_inv_mod_q(&self) -> &[ShoupConst] {
        &self.0.p_inv_mod_q
    }

    /// log2 of the product of the ciphertext primes up to `level`.
    pub fn log_q_at(&self, level: usize) -> f64 {
        self.0.q[..=level].iter().map(|&v| (v as f64).log2()).sum()
    }
    /// log2(Q*P), the quantity bounded by the security table.
    pub fn log_qp(&self) -> f64 {
        self.log_q_at(self.max_level()) + self.0.p.iter().map(|&v| (v as f64).log2()).sum::<f64>()
    }

    /// Row indices (into the ring's primes) of a ciphertext at `level`.
    pub fn q_basis(&self, level: usize) -> Vec<usize> {
        (0..=level).collect()
    }
    /// Row indices of a key-switching polynomial used at `level`: `q_0..q_level`, then `P`.
    pub fn qp_basis(&self, level: usize) -> Vec<usize> {
        let top = self.0.q.len();
        (0..=level).chain(top..top + self.0.p.len()).collect()
    }
    /// Row indices of the full key basis `q_0..q_L, P`.
    pub fn key_basis(&self) -> Vec<usize> {
        self.qp_basis(self.max_level())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_secure_and_match_the_table() {
        for spec in [presets::n8192(), presets::n16384(), presets::n32768()] {
            let p = Params::new(spec.clone()).unwrap();
            assert!(p.is_secure());
            assert!(p.log_qp() <= max_log_qp_128(spec.log_n).unwrap() as f64);
            assert!(p.q().iter().chain(p.p()).all(|&q| q < 1 << 50));
        }
        let p = Params::new(presets::n32768()).unwrap();
        assert_eq!(p.max_level() + 1, 17);
        assert_eq!(p.digits(p.max_level()), 5);
    }

    #[test]
    fn insecure_sets_are_refused_unless_named_for_tests() {
        // 17 limbs at N = 16384 exceed 438 bits.
        let spec = ParamSpec::chain(14, 17, 40, 6);
        match Params::new(spec.clone()) {
            Err(Error::Insecure { n, max, .. }) => assert_eq!((n, max), (16384, 438)),
            other => panic!("expected Insecure, got {other:?}"),
        }
        let p = Params::insecure_for_tests(spec).unwrap();
        assert_eq!(p.security(), Security::InsecureForTests);
        assert!(!p.is_secure());
        // Small rings have no bound at all.
        assert!(Params::new(ParamSpec::chain(10, 2, 30, 1)).is_err());
        // Exactly at the bound is allowed (N = 8192: 218 bits).
        assert_eq!(presets::n8192().log_qp(), 218);
    }

    #[test]
    fn fingerprint_depends_on_everything() {
        let a = Params::insecure_for_tests(ParamSpec::chain(10, 3, 30, 3)).unwrap();
        let b = Params::insecure_for_tests(ParamSpec::chain(10, 3, 30, 3)).unwrap();
        let c = Params::insecure_for_tests(ParamSpec::chain(10, 3, 31, 3)).unwrap();
        let d = Params::insecure_for_tests(ParamSpec::chain(11, 3, 30, 3)).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert_ne!(a.fingerprint(), c.fingerprint());
        assert_ne!(a.fingerprint(), d.fingerprint());
    }

    #[test]
    fn rejects_bad_specs() {
        let ok = ParamSpec::chain(10, 3, 30, 3);
        for bad in [
            ParamSpec {
                log_n: 3,
                ..ok.clone()
            },
            ParamSpec {
                q_bits: vec![],
                ..ok.clone()
            },
            ParamSpec {
                p_bits: vec![],
                ..ok.clone()
            },
            ParamSpec {
                q_bits: vec![51],
                ..ok.clone()
            },
            ParamSpec {
                log_scale: 0,
                ..ok.clone()
            },
        ] {
            assert!(Params::insecure_for_tests(bad).is_err());
        }
    }
}
