//! Negacyclic NTT over one prime, delegated to tfhe-ntt.

use tfhe_ntt::prime64::Plan;

/// NTT tables for `Z_q[X]/(X^n + 1)`.
///
/// The forward transform leaves values in bit-reversed evaluation order; since every
/// operation we do in the evaluation domain is slot-wise, the order never matters except
/// for automorphisms, which we apply in the coefficient domain.
#[derive(Clone)]
pub struct NttTable {
    plan: Plan,
}

impl std::fmt::Debug for NttTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NttTable")
            .field("n", &self.plan.ntt_size())
            .field("q", &self.plan.modulus())
            .finish()
    }
}

impl NttTable {
    pub fn new(n: usize, q: u64) -> Option<Self> {
        Plan::try_new(n, q).map(|plan| Self { plan })
    }

    /// Coefficients (in `[0, q)`) to evaluations (in `[0, q)`).
    #[inline]
    pub fn forward(&self, buf: &mut [u64]) {
        self.plan.fwd(buf);
    }

    /// Evaluations to coefficients, including the 1/n factor.
    #[inline]
    pub fn inverse(&self, buf: &mut [u64]) {
        self.plan.inv(buf);
        self.plan.normalize(buf);
    }

    /// `acc += a * b (mod q)` slot-wise, on the vectorized path where the CPU has one.
    #[inline]
    pub fn mul_accumulate(&self, acc: &mut [u64], a: &[u64], b: &[u64]) {
        self.plan.mul_accumulate(acc, a, b);
    }

    /// Whether tfhe-ntt runs its AVX-512 IFMA kernels for this prime on this CPU.
    pub fn uses_ifma(&self) -> bool {
        self.plan.use_ifma()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arith::{ntt_primes_below, Modulus};
    use proptest::prelude::*;

    fn negacyclic(q: &Modulus, a: &[u64], b: &[u64]) -> Vec<u64> {
        let n = a.len();
        let mut out = vec![0u64; n];
        for i in 0..n {
            for j in 0..n {
                let p = q.mul(a[i], b[j]);
                if i + j < n {
                    out[i + j] = q.add(out[i + j], p);
                } else {
                    out[i + j - n] = q.sub(out[i + j - n], p);
                }
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(16))]
        #[test]
        fn ntt_product_is_negacyclic_convolution(
            bits in 30u32..=50, seed_a in proptest::collection::vec(any::<u64>(), 64),
            seed_b in proptest::collection::vec(any::<u64>(), 64)
        ) {
            let n = 64;
            let q = ntt_primes_below(bits, n, 1, &[]).unwrap()[0];
            let m = Modulus::new(q).unwrap();
            let t = NttTable::new(n, q).unwrap();
            let a: Vec<u64> = seed_a.iter().map(|x| x % q).collect();
            let b: Vec<u64> = seed_b.iter().map(|x| x % q).collect();
            let (mut fa, mut fb) = (a.clone(), b.clone());
            t.forward(&mut fa);
            t.forward(&mut fb);
            prop_assert!(fa.iter().all(|&x| x < q));
            let mut prod = vec![0u64; n];
            t.mul_accumulate(&mut prod, &fa, &fb);
            prop_assert!(prod.iter().all(|&x| x < q));
            t.inverse(&mut prod);
            prop_assert_eq!(prod, negacyclic(&m, &a, &b));
            t.inverse(&mut fa);
            prop_assert_eq!(fa, a);
        }
    }
}
