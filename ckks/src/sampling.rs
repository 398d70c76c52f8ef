//! Randomness: OS-seeded ChaCha20 for secrets and noise, seed-expanded uniform polynomials.
//!
//! Production paths draw their seeds from the operating system (`getrandom`, which in the
//! browser is `crypto.getRandomValues`). The `*_with_rng` entry points exist so tests can be
//! reproducible; they still require a cryptographic generator.

use crate::arith::Modulus;
use crate::ring::RnsPoly;
use rand_chacha::ChaCha20Rng;
use rand_core::{CryptoRng, RngCore, SeedableRng};

/// Standard deviation of the error distribution (HE Standard).
pub const ERROR_STD_DEV: f64 = 3.19;
/// Errors are cut at 6 sigma.
const ERROR_BOUND: f64 = 6.0 * ERROR_STD_DEV;

/// A cryptographic generator seeded from the operating system.
pub fn os_rng() -> ChaCha20Rng {
    ChaCha20Rng::from_entropy()
}

/// A fresh 32-byte seed from `rng`.
pub fn fresh_seed<R: RngCore + CryptoRng>(rng: &mut R) -> [u8; 32] {
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    seed
}

/// Uniform residues for one row, by rejection sampling on masked 64-bit words.
fn uniform_row<R: RngCore>(rng: &mut R, q: &Modulus, row: &mut [u64]) {
    let mask = if q.bits() == 64 {
        u64::MAX
    } else {
        (1u64 << q.bits()) - 1
    };
    for x in row.iter_mut() {
        loop {
            let v = rng.next_u64() & mask;
            if v < q.value() {
                *x = v;
                break;
            }
        }
    }
}

/// Fills `poly` (row `k` modulo `moduli[k]`) with uniform residues drawn from `rng`.
///
/// Used with a ChaCha20 stream expanded from a public seed, so both sides regenerate the
/// same polynomial; rows are drawn in order, so a prefix of rows is stable across levels.
pub fn uniform_poly<R: RngCore>(rng: &mut R, moduli: &[&Modulus], poly: &mut RnsPoly) {
    for (row, q) in poly.rows_mut().zip(moduli) {
        uniform_row(rng, q, row);
    }
}

/// The deterministic generator behind a public seed.
pub fn seeded_rng(seed: &[u8; 32]) -> ChaCha20Rng {
    ChaCha20Rng::from_seed(*seed)
}

/// The generator type behind seeded test keys.
pub type TestRng = ChaCha20Rng;

/// A generator from a fixed seed, for reproducible and cross-platform tests only: keys made
/// from it are as public as the seed.
pub fn test_rng(seed: [u8; 32]) -> TestRng {
    ChaCha20Rng::from_seed(seed)
}

/// Uniform ternary coefficients in {-1, 0, 1}.
pub fn ternary<R: RngCore + CryptoRng>(rng: &mut R, n: usize) -> Vec<i64> {
    let mut out = Vec::with_capacity(n);
    let mut buf = [0u8; 64];
    while out.len() < n {
        rng.fill_bytes(&mut buf);
        for &b in buf.iter() {
            // 255 = 3 * 85: rejecting 255 keeps b % 3 uniform.
            if b < 255 && out.len() < n {
                out.push((b % 3) as i64 - 1);
            }
        }
    }
    zeroize::Zeroize::zeroize(&mut buf);
    out
}

/// Rounded Gaussian coefficients with standard deviation `ERROR_STD_DEV`, cut at 6 sigma.
pub fn gaussian<R: RngCore + CryptoRng>(rng: &mut R, n: usize) -> Vec<i64> {
    let mut out = Vec::with_capacity(n);
    let unit = |r: &mut R| ((r.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
    while out.len() < n {
        // Box-Muller: two independent normals per pair of uniforms in (0, 1).
        let (u1, u2) = (unit(rng), unit(rng));
        let radius = (-2.0 * u1.ln()).sqrt() * ERROR_STD_DEV;
        let angle = 2.0 * std::f64::consts::PI * u2;
        for v in [radius * angle.cos(), radius * angle.sin()] {
            if v.abs() <= ERROR_BOUND && out.len() < n {
                out.push(v.round() as i64);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ternary_is_balanced() {
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        let t = ternary(&mut rng, 30000);
        let counts = [-1i64, 0, 1].map(|v| t.iter().filter(|&&x| x == v).count());
        for c in counts {
            assert!((9500..10500).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn gaussian_has_the_right_spread() {
        let mut rng = ChaCha20Rng::seed_from_u64(2);
        let g = gaussian(&mut rng, 100_000);
        let mean = g.iter().sum::<i64>() as f64 / g.len() as f64;
        let var = g.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / g.len() as f64;
        assert!(mean.abs() < 0.05, "{mean}");
        // Rounding adds 1/12 to the variance.
        assert!(
            (var.sqrt() - (ERROR_STD_DEV.powi(2) + 1.0 / 12.0).sqrt()).abs() < 0.05,
            "{var}"
        );
        assert!(g.iter().all(|x| (x.abs() as f64) <= ERROR_BOUND));
    }

    #[test]
    fn seed_expansion_is_deterministic_and_uniform() {
        let q = Modulus::new(crate::arith::ntt_primes_below(40, 16, 1, &[]).unwrap()[0]).unwrap();
        let mut a = RnsPoly::zero(4096, 1);
        let mut b = RnsPoly::zero(4096, 1);
        uniform_poly(&mut seeded_rng(&[7; 32]), &[&q], &mut a);
        uniform_poly(&mut seeded_rng(&[7; 32]), &[&q], &mut b);
        assert_eq!(a, b);
        assert!(a.limb(0).iter().all(|&x| x < q.value()));
        let mean = a.limb(0).iter().map(|&x| x as f64).sum::<f64>() / 4096.0;
        assert!((mean / q.value() as f64 - 0.5).abs() < 0.02);
    }
}
