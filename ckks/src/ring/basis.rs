//! Fast (approximate) base conversion between RNS bases, the core of key switching.

use super::RnsPoly;
use crate::arith::{kernels, Modulus, ShoupConst};

/// Converts residues modulo `from = {q_i}` to residues modulo each prime of `to`:
/// `y_t = sum_i [x_i * (Q/q_i)^-1]_{q_i} * (Q/q_i mod t)`, which equals `x + u*Q` for a small
/// `0 <= u < |from|` (the usual overflow of fast base conversion, absorbed by the noise).
pub struct BaseConverter {
    from: Vec<Modulus>,
    to: Vec<Modulus>,
    /// `(Q/q_i)^-1 mod q_i`.
    qhat_inv: Vec<ShoupConst>,
    /// `Q/q_i mod t`, laid out `[t][i]`.
    qhat_mod_to: Vec<Vec<ShoupConst>>,
}

impl BaseConverter {
    pub fn new(from: &[Modulus], to: &[Modulus]) -> Self {
        let qhat_inv = from
            .iter()
            .enumerate()
            .map(|(i, qi)| {
                let mut prod = 1u64;
                for (j, qj) in from.iter().enumerate() {
                    if j != i {
                        prod = qi.mul(prod, qi.reduce(qj.value()));
                    }
                }
                ShoupConst::new(qi.inv(prod).expect("distinct primes are coprime"), qi)
            })
            .collect();
        let qhat_mod_to = to
            .iter()
            .map(|t| {
                (0..from.len())
                    .map(|i| {
                        let mut prod = 1u64;
                        for (j, qj) in from.iter().enumerate() {
                            if j != i {
                                prod = t.mul(prod, t.reduce(qj.value()));
                            }
                        }
                        ShoupConst::new(prod, t)
                    })
                    .collect()
            })
            .collect();
        Self {
            from: from.to_vec(),
            to: to.to_vec(),
            qhat_inv,
            qhat_mod_to,
        }
    }

    /// Number of source primes.
    pub fn from_len(&self) -> usize {
        self.from.len()
    }

    /// First step, per source prime `i`: `z_i = [x_i * (Q/q_i)^-1]_{q_i}`, in place.
    pub fn scale_input(&self, i: usize, row: &mut [u64]) {
        kernels::mul_const_assign(row, &self.qhat_inv[i], &self.from[i]);
    }

    /// Second step, per target prime `t`: `out = sum_i z_i * (Q/q_i mod t)` from the scaled
    /// rows of `scale_input`. The `z_i` are below 2^50, so the kernels reduce them modulo any
    /// target directly.
    pub fn target_row(&self, t: usize, z: &[&[u64]], out: &mut [u64]) {
        kernels::dot_const(out, z, &self.qhat_mod_to[t], &self.to[t]);
    }

    /// `input` rows are coefficient-domain residues modulo `from`; writes one row per `to`
    /// prime into `output` (rows `out_rows[k]` of `output`).
    pub fn convert(&self, input: &[&[u64]], output: &mut RnsPoly, out_rows: &[usize]) {
        debug_assert_eq!(input.len(), self.from.len());
        debug_assert_eq!(out_rows.len(), self.to.len());
        let z: Vec<Vec<u64>> = input
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let mut r = row.to_vec();
                self.scale_input(i, &mut r);
                r
            })
            .collect();
        let z: Vec<&[u64]> = z.iter().map(|r| r.as_slice()).collect();
        for (t, &r) in out_rows.iter().enumerate() {
            self.target_row(t, &z, output.limb_mut(r));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arith::ntt_primes_below;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        /// The converted value is x + u*Q with 0 <= u < |from|.
        #[test]
        fn conversion_is_exact_up_to_small_multiple(x in any::<u128>(), k in 1usize..=3) {
            let n = 16;
            let from_p = ntt_primes_below(40, n, k, &[]).unwrap();
            let to_p = ntt_primes_below(50, n, 2, &[]).unwrap();
            let from: Vec<Modulus> = from_p.iter().map(|&q| Modulus::new(q).unwrap()).collect();
            let to: Vec<Modulus> = to_p.iter().map(|&q| Modulus::new(q).unwrap()).collect();
            let big_q: u128 = from_p.iter().map(|&q| q as u128).product();
            let x = x % big_q;
            let rows: Vec<Vec<u64>> = from_p.iter().map(|&q| vec![(x % q as u128) as u64; n]).collect();
            let input: Vec<&[u64]> = rows.iter().map(|r| r.as_slice()).collect();
            let mut out = RnsPoly::zero(n, 2);
            BaseConverter::new(&from, &to).convert(&input, &mut out, &[0, 1]);
            let ok = (0..k as u128).any(|u| {
                to_p.iter().enumerate().all(|(r, &t)| {
                    let v = x + u * big_q;
                    // Reduce piecewise to stay in u128 for k <= 3 primes of 40 bits.
                    out.limb(r)[0] as u128 == v % t as u128
                })
            });
            prop_assert!(ok);
        }
    }
}
