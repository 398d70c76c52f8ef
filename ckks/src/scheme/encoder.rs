//! The canonical-embedding encoder: N/2 real slots <-> an integer polynomial at a scale.
//!
//! Slot `j` holds the evaluation of the message polynomial at `zeta^(5^j)`, where `zeta` is a
//! primitive 2N-th root of unity. With this ordering a slot-wise product is a polynomial
//! product, and the automorphism `X -> X^(5^k)` rotates the slots left by `k`.

use crate::arith::{kernels, Modulus, ShoupConst};
use crate::error::{Error, Result};
use crate::ring::RnsPoly;
use crate::scheme::{Params, Plaintext};

#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct C64 {
    re: f64,
    im: f64,
}

impl C64 {
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Self {
            re: self.re + o.re,
            im: self.im + o.im,
        }
    }
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        Self {
            re: self.re - o.re,
            im: self.im - o.im,
        }
    }
    #[inline(always)]
    fn mul(self, o: Self) -> Self {
        Self {
            re: self.re * o.re - self.im * o.im,
            im: self.re * o.im + self.im * o.re,
        }
    }
}

/// Roots of unity and the rotation group for one ring degree.
pub(crate) struct EncoderTables {
    slots: usize,
    /// 2N: the order of the roots.
    m: usize,
    /// `5^j mod 2N` for `j < N/2`.
    rot_group: Vec<usize>,
    /// `exp(2 pi i k / 2N)` for `k <= 2N`.
    roots: Vec<C64>,
}

impl EncoderTables {
    pub(crate) fn new(n: usize) -> Self {
        let slots = n / 2;
        let m = 2 * n;
        let mut rot_group = Vec::with_capacity(slots);
        let mut g = 1usize;
        for _ in 0..slots {
            rot_group.push(g);
            g = g * 5 % m;
        }
        let roots = (0..=m)
            .map(|k| {
                let a = 2.0 * std::f64::consts::PI * k as f64 / m as f64;
                C64 {
                    re: a.cos(),
                    im: a.sin(),
                }
            })
            .collect();
        Self {
            slots,
            m,
            rot_group,
            roots,
        }
    }

    fn bit_reverse(v: &mut [C64]) {
        let n = v.len();
        let bits = n.trailing_zeros();
        if bits == 0 {
            return;
        }
        for i in 0..n {
            let j = i.reverse_bits() >> (usize::BITS - bits);
            if i < j {
                v.swap(i, j);
            }
        }
    }

    /// Coefficient-side vector to slot values (the evaluation at `zeta^(5^j)`).
    fn coeffs_to_slots(&self, v: &mut [C64]) {
        let size = v.len();
        Self::bit_reverse(v);
        let mut len = 2;
        while len <= size {
            let lenh = len / 2;
            let lenq = len * 4;
            let step = self.m / lenq;
            for chunk in v.chunks_exact_mut(len) {
                for j in 0..lenh {
                    let w = self.roots[(self.rot_group[j] % lenq) * step];
                    let u = chunk[j];
                    let t = chunk[j + lenh].mul(w);
                    chunk[j] = u.add(t);
                    chunk[j + lenh] = u.sub(t);
                }
            }
            len *= 2;
        }
    }

    /// Inverse of `coeffs_to_slots`.
    fn slots_to_coeffs(&self, v: &mut [C64]) {
        let size = v.len();
        let mut len = size;
        while len >= 2 {
            let lenh = len / 2;
            let lenq = len * 4;
            let step = self.m / lenq;
            for chunk in v.chunks_exact_mut(len) {
                for j in 0..lenh {
                    let w = self.roots[(lenq - self.rot_group[j] % lenq) * step];
                    let u = chunk[j].add(chunk[j + lenh]);
                    let t = chunk[j].sub(chunk[j + lenh]).mul(w);
                    chunk[j] = u;
                    chunk[j + lenh] = t;
                }
            }
            len /= 2;
        }
        Self::bit_reverse(v);
        let inv = 1.0 / size as f64;
        for x in v.iter_mut() {
            x.re *= inv;
            x.im *= inv;
        }
    }
}

/// Encodes real vectors into plaintexts and decodes them back.
pub struct Encoder {
    params: Params,
}

impl Encoder {
    pub fn new(params: &Params) -> Self {
        Self {
            params: params.clone(),
        }
    }

    /// The real coefficients (before scaling) whose embedding is `values` (zero-padded).
    fn coefficients(&self, values: &[f64]) -> Result<Vec<f64>> {
        let t = self.params.encoder_tables();
        if values.len() > t.slots {
            return Err(Error::TooManyValues {
                given: values.len(),
                slots: t.slots,
            });
        }
        let mut v = vec![C64::default(); t.slots];
        for (x, &y) in v.iter_mut().zip(values) {
            if !y.is_finite() {
                return Err(Error::ValueOutOfRange {
                    value: y,
                    scale: 1.0,
                });
            }
            x.re = y;
        }
        t.slots_to_coeffs(&mut v);
        let mut coeffs = vec![0.0; 2 * t.slots];
        for (i, c) in v.iter().enumerate() {
            coeffs[i] = c.re;
            coeffs[i + t.slots] = c.im;
        }
        Ok(coeffs)
    }

    /// The integer coefficients `round(scale * coeffs)` of the message polynomial, checked to
    /// fit well inside `Q_level`.
    pub(crate) fn scaled_coefficients(
        &self,
        values: &[f64],
        scale: f64,
        level: usize,
    ) -> Result<Vec<i128>> {
        let p = &self.params;
        if level > p.max_level() {
            return Err(Error::LevelTooLow {
                needed: level,
                have: p.max_level(),
            });
        }
        if !(scale.is_finite() && scale >= 1.0) {
            return Err(Error::ValueOutOfRange { value: 1.0, scale });
        }
        let coeffs = self.coefficients(values)?;
        // Scaled coefficients must stay well inside (-Q/2, Q/2) and i128.
        let limit = (p.log_q_at(level) - 2.0).min(120.0).exp2();
        let mut ints = Vec::with_capacity(coeffs.len());
        for &c in &coeffs {
            let s = (c * scale).round();
            if s.is_nan() || s.abs() >= limit {
                let worst = values.iter().fold(0.0f64, |a, &b| a.max(b.abs()));
                return Err(Error::ValueOutOfRange {
                    value: worst,
                    scale,
                });
            }
            ints.push(s as i128);
        }
        Ok(ints)
    }

    /// Reduces integer coefficients onto `q_0..q_level` (coefficient domain).
    pub(crate) fn integers_to_rns(&self, ints: &[i128], level: usize) -> RnsPoly {
        let p = &self.params;
        let ring = p.ring();
        let mut poly = RnsPoly::zero(p.n(), level + 1);
        for (i, row) in poly.rows_mut().enumerate() {
            let m = ring.modulus(i);
            for (x, &c) in row.iter_mut().zip(ints) {
                *x = m.reduce_i128(c);
            }
        }
        poly
    }

    /// Encodes `values` (at most N/2; missing slots are 0) at `scale` on primes `q_0..q_level`,
    /// in the evaluation (NTT) domain.
    pub fn encode(&self, values: &[f64], scale: f64, level: usize) -> Result<Plaintext> {
        let ints = self.scaled_coefficients(values, scale, level)?;
        let mut poly = self.integers_to_rns(&ints, level);
        self.params
            .ring()
            .forward(&mut poly, &self.params.q_basis(level));
        Ok(Plaintext { poly, level, scale })
    }

    /// Decodes the real parts of all N/2 slots.
    pub fn decode(&self, pt: &Plaintext) -> Vec<f64> {
        let p = &self.params;
        let t = p.encoder_tables();
        let basis = p.q_basis(pt.level);
        let mut poly = pt.poly.clone();
        p.ring().inverse(&mut poly, &basis);
        let coeffs = crt_to_f64(p, &poly, pt.level);
        let mut v: Vec<C64> = (0..t.slots)
            .map(|i| C64 {
                re: coeffs[i] / pt.scale,
                im: coeffs[i + t.slots] / pt.scale,
            })
            .collect();
        t.coeffs_to_slots(&mut v);
        v.into_iter().map(|c| c.re).collect()
    }
}

/// Centered CRT reconstruction of every coefficient, as `f64`.
///
/// Garner's mixed-radix digits `x = a_0 + a_1 q_0 + a_2 q_0 q_1 + ...` are computed row by
/// row with the vectorized constant-multiply kernels (digit `k` is final once every lower
/// digit has been folded into row `k`). A value above `Q/2` is evaluated as `-(Q - x)`,
/// whose digits are `q_k - 1 - a_k` plus one, so small negative values never suffer
/// cancellation against `Q`.
fn crt_to_f64(params: &Params, poly: &RnsPoly, level: usize) -> Vec<f64> {
    let ring = params.ring();
    let n = poly.n();
    if level == 0 {
        let m = ring.modulus(0);
        return poly.limb(0).iter().map(|&x| m.center(x) as f64).collect();
    }
    let moduli: Vec<Modulus> = (0..=level).map(|i| *ring.modulus(i)).collect();
    // digits[k] starts as the residues mod q_k; acc[k] collects the lower digits' value mod q_k.
    let mut digits = poly.clone();
    let mut acc = RnsPoly::zero(n, level + 1);
    for k in 0..=level {
        let mk = &moduli[k];
        // prefix = q_0 ... q_{k-1} mod q_k
        let prefix = moduli[..k]
            .iter()
            .fold(1u64, |p, qj| mk.mul(p, mk.reduce(qj.value())));
        let inv = ShoupConst::new(mk.inv(prefix).expect("distinct primes"), mk);
        kernels::sub_mul_const(digits.limb_mut(k), acc.limb(k), &inv, mk);
        // Fold digit k (weight q_0 ... q_{k-1}) into every higher row.
        for (j, mj) in moduli.iter().enumerate().skip(k + 1) {
            let weight = moduli[..k]
                .iter()
                .fold(1u64, |p, qi| mj.mul(p, mj.reduce(qi.value())));
            let w = ShoupConst::new(weight, mj);
            let (lo, hi) = (digits.limb(k).to_vec(), acc.limb_mut(j));
            kernels::mul_const_acc(hi, &lo, &w, mj);
        }
    }
    let half_q: f64 = moduli.iter().map(|m| m.value() as f64).product::<f64>() / 2.0;
    (0..n)
        .map(|c| {
            let mut v = 0.0f64;
            for k in (0..=level).rev() {
                v = v * moduli[k].value() as f64 + digits.limb(k)[c] as f64;
            }
            if v <= half_q {
                v
            } else {
                let mut w = 0.0f64;
                for k in (0..=level).rev() {
                    w = w * moduli[k].value() as f64
                        + (moduli[k].value() - 1 - digits.limb(k)[c]) as f64;
                }
                -(w + 1.0)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheme::ParamSpec;

    fn params(log_n: u32, limbs: usize) -> Params {
        Params::insecure_for_tests(ParamSpec::chain(log_n, limbs, 40, limbs)).unwrap()
    }

    fn values(n: usize, seed: u64) -> Vec<f64> {
        let mut x = seed;
        (0..n)
            .map(|_| {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn round_trip_at_every_level() {
        let p = params(12, 4);
        let enc = Encoder::new(&p);
        let v = values(p.slots(), 1);
        for level in 0..=p.max_level() {
            let pt = enc.encode(&v, 2f64.powi(40), level).unwrap();
            let back = enc.decode(&pt);
            let err = v
                .iter()
                .zip(&back)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f64::max);
            assert!(err < 1e-9, "level {level}: {err}");
        }
    }

    #[test]
    fn negative_values_near_zero_decode_exactly_at_high_level() {
        let p = params(10, 6);
        let enc = Encoder::new(&p);
        let v = vec![-1e-3, 2e-3, -5.0, 7.5];
        let pt = enc.encode(&v, 2f64.powi(30), p.max_level()).unwrap();
        let back = enc.decode(&pt);
        for (a, b) in v.iter().zip(&back) {
            assert!((a - b).abs() < 1e-7, "{a} {b}");
        }
        assert!(back[4..].iter().all(|x| x.abs() < 1e-7));
    }

    #[test]
    fn slotwise_product_is_ring_product() {
        let p = params(11, 3);
        let enc = Encoder::new(&p);
        let (a, b) = (values(p.slots(), 2), values(p.slots(), 3));
        let pa = enc.encode(&a, 2f64.powi(30), 2).unwrap();
        let pb = enc.encode(&b, 2f64.powi(30), 2).unwrap();
        let basis = p.q_basis(2);
        let prod = Plaintext {
            poly: p.ring().mul(&pa.poly, &pb.poly, &basis),
            level: 2,
            scale: 2f64.powi(60),
        };
        let got = enc.decode(&prod);
        for i in 0..p.slots() {
            assert!((got[i] - a[i] * b[i]).abs() < 1e-6, "slot {i}");
        }
    }

    /// Coefficients reduce to their exact residues on both sides of every prime (and of
    /// zero), where `reduce_i128` switches between its shortcut and the 128-bit reduction.
    #[test]
    fn integers_to_rns_matches_reduce_i128() {
        let p = params(10, 3);
        let enc = Encoder::new(&p);
        let q: Vec<u64> = (0..3).map(|i| p.ring().modulus(i).value()).collect();
        let mut ints: Vec<i128> = vec![0, 1, -1, 7, -7, i128::MAX / 3, i128::MIN / 3];
        for &qi in &q {
            let qi = qi as i128;
            ints.extend([
                qi - 1,
                qi,
                qi + 1,
                -qi + 1,
                -qi,
                -qi - 1,
                5 * qi + 3,
                -(5 * qi) - 3,
            ]);
        }
        ints.resize(p.n(), 12345);
        let poly = enc.integers_to_rns(&ints, 2);
        for (i, row) in poly.rows().enumerate() {
            let m = p.ring().modulus(i);
            for (x, &c) in row.iter().zip(&ints) {
                let want = c.rem_euclid(m.value() as i128) as u64;
                assert_eq!(*x, want, "prime {i}, value {c}");
            }
        }
    }

    #[test]
    fn rejects_bad_inputs() {
        let p = params(10, 2);
        let enc = Encoder::new(&p);
        assert!(matches!(
            enc.encode(&vec![0.0; p.slots() + 1], 1e6, 0),
            Err(Error::TooManyValues { .. })
        ));
        assert!(enc.encode(&[f64::NAN], 1e6, 0).is_err());
        assert!(enc.encode(&[1e30], 2f64.powi(40), 1).is_err());
        assert!(enc.encode(&[1.0], 1e6, 5).is_err());
    }
}
