//! A ring `Z_Q[X]/(X^n+1)` in RNS form: the primes, their NTT tables and slot-wise operations.

use super::{NttTable, RnsPoly};
use crate::arith::{kernels, Modulus, ShoupConst};

/// All primes of a parameter set with their NTT tables.
///
/// Operations take a `basis`: the indices (into `moduli`) of the primes that a polynomial's
/// rows stand for, in row order. A ciphertext at level `l` has basis `0..=l`; key-switching
/// polynomials additionally carry the special primes.
#[derive(Clone, Debug)]
pub struct RingContext {
    n: usize,
    moduli: Vec<Modulus>,
    tables: Vec<NttTable>,
}

impl RingContext {
    /// `None` if some prime has no NTT of size `n` (not prime, or not `1 mod 2n`).
    pub fn new(n: usize, primes: &[u64]) -> Option<Self> {
        let moduli = primes
            .iter()
            .map(|&q| Modulus::new(q))
            .collect::<Option<Vec<_>>>()?;
        let tables = primes
            .iter()
            .map(|&q| NttTable::new(n, q))
            .collect::<Option<Vec<_>>>()?;
        Some(Self { n, moduli, tables })
    }

    #[inline]
    pub fn n(&self) -> usize {
        self.n
    }

    #[inline]
    pub fn modulus(&self, i: usize) -> &Modulus {
        &self.moduli[i]
    }

    pub fn moduli(&self) -> &[Modulus] {
        &self.moduli
    }

    #[inline]
    pub fn table(&self, i: usize) -> &NttTable {
        &self.tables[i]
    }

    pub fn forward(&self, p: &mut RnsPoly, basis: &[usize]) {
        debug_assert_eq!(p.limbs(), basis.len());
        for (row, &i) in p.rows_mut().zip(basis) {
            self.tables[i].forward(row);
        }
    }

    pub fn inverse(&self, p: &mut RnsPoly, basis: &[usize]) {
        debug_assert_eq!(p.limbs(), basis.len());
        for (row, &i) in p.rows_mut().zip(basis) {
            self.tables[i].inverse(row);
        }
    }

    pub fn add_assign(&self, a: &mut RnsPoly, b: &RnsPoly, basis: &[usize]) {
        for ((ra, rb), &i) in a.rows_mut().zip(b.rows()).zip(basis) {
            let q = self.moduli[i].value();
            for (x, &y) in ra.iter_mut().zip(rb) {
                let s = *x + y;
                *x = if s >= q { s - q } else { s };
            }
        }
    }

    pub fn sub_assign(&self, a: &mut RnsPoly, b: &RnsPoly, basis: &[usize]) {
        for ((ra, rb), &i) in a.rows_mut().zip(b.rows()).zip(basis) {
            let q = self.moduli[i].value();
            for (x, &y) in ra.iter_mut().zip(rb) {
                let d = *x + q - y;
                *x = if d >= q { d - q } else { d };
            }
        }
    }

    pub fn neg_assign(&self, a: &mut RnsPoly, basis: &[usize]) {
        for (ra, &i) in a.rows_mut().zip(basis) {
            let q = self.moduli[i].value();
            for x in ra.iter_mut() {
                *x = if *x == 0 { 0 } else { q - *x };
            }
        }
    }

    /// `acc += a * b` slot-wise (evaluation domain).
    pub fn mul_accumulate(&self, acc: &mut RnsPoly, a: &RnsPoly, b: &RnsPoly, basis: &[usize]) {
        for (((racc, ra), rb), &i) in acc.rows_mut().zip(a.rows()).zip(b.rows()).zip(basis) {
            self.tables[i].mul_accumulate(racc, ra, rb);
        }
    }

    /// `a * b` slot-wise (evaluation domain).
    pub fn mul(&self, a: &RnsPoly, b: &RnsPoly, basis: &[usize]) -> RnsPoly {
        let mut out = RnsPoly::zero(a.n(), basis.len());
        self.mul_accumulate(&mut out, a, b, basis);
        out
    }

    /// Multiplies row `k` by `scalars[k]` (already reduced mod that row's prime).
    pub fn mul_scalar_assign(&self, a: &mut RnsPoly, scalars: &[u64], basis: &[usize]) {
        for ((ra, &s), &i) in a.rows_mut().zip(scalars).zip(basis) {
            let m = &self.moduli[i];
            kernels::mul_const_assign(ra, &ShoupConst::new(s, m), m);
        }
    }

    /// Adds `scalars[k]` to every value of row `k`; in the evaluation domain this adds the
    /// constant polynomial, since a constant evaluates to itself everywhere.
    pub fn add_scalar_assign(&self, a: &mut RnsPoly, scalars: &[u64], basis: &[usize]) {
        for ((ra, &s), &i) in a.rows_mut().zip(scalars).zip(basis) {
            let m = &self.moduli[i];
            for x in ra.iter_mut() {
                *x = m.add(*x, s);
            }
        }
    }

    /// Writes small signed coefficients into every row (coefficient domain).
    pub fn from_signed(&self, coeffs: &[i64], basis: &[usize]) -> RnsPoly {
        let mut out = RnsPoly::zero(self.n, basis.len());
        for (row, &i) in out.rows_mut().zip(basis) {
            let m = &self.moduli[i];
            for (x, &c) in row.iter_mut().zip(coeffs) {
                *x = m.reduce_i64(c);
            }
        }
        out
    }

    /// Applies `X -> X^galois` in the coefficient domain (`galois` odd, below `2n`).
    pub fn automorphism(&self, a: &RnsPoly, galois: usize, basis: &[usize]) -> RnsPoly {
        let n = self.n;
        let two_n = 2 * n;
        let mut out = RnsPoly::zero(n, basis.len());
        for (k, &i) in basis.iter().enumerate() {
            let m = &self.moduli[i];
            let src = a.limb(k);
            let dst = out.limb_mut(k);
            let mut j = 0usize;
            for &x in src {
                if j < n {
                    dst[j] = x;
                } else {
                    dst[j - n] = m.neg(x);
                }
                j += galois;
                if j >= two_n {
                    j -= two_n;
                }
            }
        }
        out
    }
}
