//! Arithmetic modulo a word-sized prime.
//!
//! Every prime in this crate is below 2^50 (so tfhe-ntt takes its AVX-512 IFMA path), which
//! leaves headroom for lazy accumulation of products in `u128`.

/// Largest modulus bit size the crate accepts (tfhe-ntt's IFMA path needs q < 2^50).
pub const MAX_MODULUS_BITS: u32 = 50;

/// A modulus `q < 2^50` with precomputed Barrett constants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Modulus {
    value: u64,
    bits: u32,
    /// floor(2^(2*bits) / q): Barrett constant for products of two residues.
    mu: u64,
    /// floor(2^128 / q) as (high, low) words: Barrett constant for any `u128`.
    ratio_hi: u64,
    ratio_lo: u64,
}

impl Modulus {
    /// Returns `None` unless `2 <= q < 2^50`.
    pub fn new(q: u64) -> Option<Self> {
        if !(2..(1u64 << MAX_MODULUS_BITS)).contains(&q) {
            return None;
        }
        let bits = 64 - q.leading_zeros();
        let mu = ((1u128 << (2 * bits)) / q as u128) as u64;
        // floor(2^128 / q) = floor((2^128 - 1) / q) unless q divides 2^128, impossible for odd q
        // and harmless for q = 2^k (never a prime we use beyond 2).
        let ratio = u128::MAX / q as u128;
        Some(Self {
            value: q,
            bits,
            mu,
            ratio_hi: (ratio >> 64) as u64,
            ratio_lo: ratio as u64,
        })
    }

    #[inline(always)]
    pub fn value(&self) -> u64 {
        self.value
    }

    #[inline(always)]
    pub fn bits(&self) -> u32 {
        self.bits
    }

    #[inline(always)]
    pub fn add(&self, a: u64, b: u64) -> u64 {
        let s = a + b;
        if s >= self.value {
            s - self.value
        } else {
            s
        }
    }

    #[inline(always)]
    pub fn sub(&self, a: u64, b: u64) -> u64 {
        if a >= b {
            a - b
        } else {
            a + self.value - b
        }
    }

    #[inline(always)]
    pub fn neg(&self, a: u64) -> u64 {
        if a == 0 {
            0
        } else {
            self.value - a
        }
    }

    /// `x mod q` for `x < q^2` (a product of two residues).
    #[inline(always)]
    pub fn reduce_product(&self, x: u128) -> u64 {
        debug_assert!(x < (self.value as u128) * (self.value as u128));
        let t = (x >> (self.bits - 1)) as u64;
        let q_hat = ((t as u128 * self.mu as u128) >> (self.bits + 1)) as u64;
        let mut r = (x as u64).wrapping_sub(q_hat.wrapping_mul(self.value));
        if r >= self.value {
            r -= self.value;
        }
        if r >= self.value {
            r -= self.value;
        }
        r
    }

    /// `x mod q` for any `x < 2^128` (used after lazy accumulation of many products).
    #[inline(always)]
    pub fn reduce_u128(&self, x: u128) -> u64 {
        let x0 = x as u64 as u128;
        let x1 = (x >> 64) as u64 as u128;
        let r0 = self.ratio_lo as u128;
        let r1 = self.ratio_hi as u128;
        // q_hat = floor(x * ratio / 2^128), up to a small error from dropped low words.
        let low = (x0 * r0) >> 64;
        let m1 = x0 * r1;
        let m2 = x1 * r0;
        let mid = low + (m1 & u64::MAX as u128) + (m2 & u64::MAX as u128);
        let q_hat = (x1 * r1)
            .wrapping_add(m1 >> 64)
            .wrapping_add(m2 >> 64)
            .wrapping_add(mid >> 64) as u64;
        let mut r = (x as u64).wrapping_sub(q_hat.wrapping_mul(self.value));
        while r >= self.value {
            r -= self.value;
        }
        r
    }

    /// `x mod q` for any `u64`.
    #[inline(always)]
    pub fn reduce(&self, x: u64) -> u64 {
        if x < self.value {
            x
        } else {
            self.reduce_u128(x as u128)
        }
    }

    /// `x mod q` for a signed integer, in `[0, q)`.
    #[inline(always)]
    pub fn reduce_i64(&self, x: i64) -> u64 {
        let r = self.reduce(x.unsigned_abs());
        if x < 0 {
            self.neg(r)
        } else {
            r
        }
    }

    /// `x mod q` for a signed 128-bit integer, in `[0, q)`. Values already below `q` in
    /// magnitude (nearly every encoded message coefficient) skip the 128-bit reduction, whose
    /// products wasm emulates slowly.
    #[inline(always)]
    pub fn reduce_i128(&self, x: i128) -> u64 {
        let a = x.unsigned_abs();
        let r = if a < self.value as u128 {
            a as u64
        } else {
            self.reduce_u128(a)
        };
        if x < 0 {
            self.neg(r)
        } else {
            r
        }
    }

    /// `x mod q` for a finite, integral `f64` of any magnitude, in `[0, q)`: `x` is exactly
    /// `m * 2^e` with a 53-bit `m`, so no wide integer is needed. Constants encoded at a
    /// product scale (e.g. 2^120 for a sum of unrelinearized squares) exceed `i128`'s
    /// comfortable range while the modulus chain still has room for them.
    pub fn reduce_integral_f64(&self, x: f64) -> u64 {
        debug_assert!(x.is_finite() && x.fract() == 0.0);
        if x.abs() < 9.2e18 {
            return self.reduce_i64(x as i64);
        }
        let bits = x.abs().to_bits();
        // normal numbers only here (|x| >= 2^63): implicit leading one
        let exp = ((bits >> 52) & 0x7ff) as i64 - 1075;
        let mantissa = (bits & ((1u64 << 52) - 1)) | (1u64 << 52);
        let mut r = self.reduce(mantissa);
        let mut base = self.reduce(2);
        let mut e = exp as u64;
        while e > 0 {
            if e & 1 == 1 {
                r = self.mul(r, base);
            }
            base = self.mul(base, base);
            e >>= 1;
        }
        if x < 0.0 {
            self.neg(r)
        } else {
            r
        }
    }

    #[inline(always)]
    pub fn mul(&self, a: u64, b: u64) -> u64 {
        self.reduce_product(a as u128 * b as u128)
    }

    /// Shoup's precomputation for repeated multiplication by the constant `w < q`.
    #[inline(always)]
    pub fn shoup(&self, w: u64) -> u64 {
        debug_assert!(w < self.value);
        (((w as u128) << 64) / self.value as u128) as u64
    }

    /// `x * w mod q` with `w_shoup = self.shoup(w)`; any `x < 2^64`.
    #[inline(always)]
    pub fn mul_shoup(&self, x: u64, w: u64, w_shoup: u64) -> u64 {
        let q_hat = ((x as u128 * w_shoup as u128) >> 64) as u64;
        let r = x
            .wrapping_mul(w)
            .wrapping_sub(q_hat.wrapping_mul(self.value));
        if r >= self.value {
            r - self.value
        } else {
            r
        }
    }

    pub fn pow(&self, base: u64, mut exp: u64) -> u64 {
        let mut result = 1 % self.value;
        let mut b = self.reduce(base);
        while exp > 0 {
            if exp & 1 == 1 {
                result = self.mul(result, b);
            }
            b = self.mul(b, b);
            exp >>= 1;
        }
        result
    }

    /// Multiplicative inverse; `None` when `a` is not invertible (assumes `q` prime).
    pub fn inv(&self, a: u64) -> Option<u64> {
        let a = self.reduce(a);
        if a == 0 {
            None
        } else {
            Some(self.pow(a, self.value - 2))
        }
    }

    /// The centered representative of `x` in `(-q/2, q/2]`.
    #[inline(always)]
    pub fn center(&self, x: u64) -> i64 {
        if x > self.value / 2 {
            x as i64 - self.value as i64
        } else {
            x as i64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn q50() -> Modulus {
        Modulus::new(super::super::ntt_primes_below(50, 16, 1, &[]).unwrap()[0]).unwrap()
    }

    #[test]
    fn rejects_out_of_range() {
        assert!(Modulus::new(0).is_none());
        assert!(Modulus::new(1).is_none());
        assert!(Modulus::new(1 << 50).is_none());
        assert!(Modulus::new((1 << 50) - 1).is_some());
    }

    proptest! {
        #[test]
        fn products_match_u128(q in 2u64..(1u64 << 50), a in any::<u64>(), b in any::<u64>()) {
            let m = Modulus::new(q).unwrap();
            let (a, b) = (a % q, b % q);
            prop_assert_eq!(m.mul(a, b) as u128, (a as u128 * b as u128) % q as u128);
        }

        #[test]
        fn any_u128_reduces(q in 2u64..(1u64 << 50), x in any::<u128>()) {
            let m = Modulus::new(q).unwrap();
            prop_assert_eq!(m.reduce_u128(x) as u128, x % q as u128);
        }

        #[test]
        fn shoup_matches(q in 2u64..(1u64 << 50), x in any::<u64>(), w in any::<u64>()) {
            let m = Modulus::new(q).unwrap();
            let w = w % q;
            prop_assert_eq!(m.mul_shoup(x, w, m.shoup(w)) as u128, (x as u128 * w as u128) % q as u128);
        }

        #[test]
        fn add_sub_neg_signed(a in any::<u64>(), b in any::<u64>(), s in any::<i64>()) {
            let m = q50();
            let q = m.value();
            let (a, b) = (a % q, b % q);
            prop_assert_eq!(m.add(a, b), ((a as u128 + b as u128) % q as u128) as u64);
            prop_assert_eq!(m.add(m.sub(a, b), b), a);
            prop_assert_eq!(m.add(a, m.neg(a)), 0);
            prop_assert_eq!(m.reduce_i64(s) as i128, (s as i128).rem_euclid(q as i128));
        }

        #[test]
        fn integral_f64_reduces_like_i128(q in 2u64..(1u64 << 50), m in any::<i64>(), e in 0u32..63) {
            let md = Modulus::new(q).unwrap();
            // m * 2^e rounded to f64 is an integer below 2^126: i128 holds it exactly
            let x = (m as f64) * (e as f64).exp2();
            let want = (x as i128).rem_euclid(q as i128) as u64;
            prop_assert_eq!(md.reduce_integral_f64(x), want);
        }

        #[test]
        fn integral_f64_beyond_i128(q in 2u64..(1u64 << 50), m in 1i64..(1i64 << 53), e in 0u32..800) {
            // (m * 2^e) mod q == (m mod q) * (2^e mod q) mod q, checked through 2^e = 2^(e/2)^2 * ...
            let md = Modulus::new(q).unwrap();
            let x = (m as f64) * 2f64.powi(e as i32);
            let mut p2 = 1u64 % q;
            for _ in 0..e {
                p2 = md.add(p2, p2);
            }
            let want = md.mul(md.reduce_i64(m), p2);
            prop_assert_eq!(md.reduce_integral_f64(x), want);
            prop_assert_eq!(md.reduce_integral_f64(-x), md.neg(want));
        }

        #[test]
        fn inverse_inverts(a in 1u64..(1u64 << 49)) {
            let m = q50();
            prop_assert_eq!(m.mul(a, m.inv(a).unwrap()), 1);
        }
    }
}
