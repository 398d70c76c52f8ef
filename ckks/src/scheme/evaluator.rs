//! Homomorphic operations. Everything here uses public objects only.

use crate::arith::kernels::{self, RowConsts};
use crate::arith::ShoupConst;
use crate::error::{Error, Result};
use crate::ring::{BaseConverter, RnsPoly};
use crate::scheme::{
    galois_element, Ciphertext, GaloisKeys, KeySwitchingKey, Params, Plaintext, RelinKey,
};

/// Relative difference under which two scales count as equal. Scales are tracked exactly
/// (every rescale divides by the true prime), so equal-by-construction scales agree to the
/// last bits; anything larger is a planning error worth reporting.
pub const SCALE_TOLERANCE: f64 = 1e-9;

pub(crate) fn same_scale(a: f64, b: f64) -> bool {
    (a - b).abs() <= SCALE_TOLERANCE * a.abs().max(b.abs())
}

/// `round(w * unit)` as the integer a combination multiplies by, if it is finite and below
/// `limit` (see [`Evaluator::weight_limit`]).
pub(crate) fn encode_weight(w: f64, unit: f64, limit: f64) -> Result<i128> {
    let v = (w * unit).round();
    if v.is_finite() && v.abs() < limit {
        Ok(v as i128)
    } else {
        Err(Error::ValueOutOfRange {
            value: w,
            scale: unit,
        })
    }
}

/// One output of [`Evaluator::linear_combinations`]: terms `(input index, weight)`, the
/// output level and scale.
#[derive(Debug, Clone, Copy)]
pub struct LinearRow<'a> {
    pub terms: &'a [(u32, f64)],
    pub level: usize,
    pub target_scale: f64,
}

/// Evaluates operations on ciphertexts of one parameter set.
#[derive(Clone, Debug)]
pub struct Evaluator {
    params: Params,
}

/// The second factor of [`Evaluator::tensor`]: `a` itself, another ciphertext, or `a` plus
/// a constant (residues per prime).
#[derive(Clone, Copy)]
enum Factor<'a> {
    Same,
    Other(&'a Ciphertext),
    SamePlus(&'a [u64]),
}

/// Bytes of input residues per block of [`Evaluator::linear_combinations`].
pub(crate) const GEMM_BLOCK_BYTES: usize = 512 * 1024;
/// Extra coefficients between packed GEMM input rows, so rows do not start at the same
/// offset modulo a cache way (measured: 8 better than 0 or 32 on AVX2).
pub(crate) const PACK_PAD: usize = 8;

impl Evaluator {
    pub fn new(params: &Params) -> Self {
        Self {
            params: params.clone(),
        }
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    /// Bound on the integer weights of a combination at `level`: a quarter of `Q_level`, and
    /// at most 2^120 (the `i128` the residues are reduced from).
    pub(crate) fn weight_limit(&self, level: usize) -> f64 {
        (self.params.log_q_at(level) - 2.0).min(120.0).exp2()
    }

    pub(crate) fn check(&self, ct: &Ciphertext) -> Result<()> {
        if ct.params != self.params {
            return Err(Error::ParamsMismatch);
        }
        Ok(())
    }

    fn check_pair(&self, a: &Ciphertext, b: &Ciphertext) -> Result<()> {
        self.check(a)?;
        self.check(b)?;
        if a.level != b.level {
            return Err(Error::LevelMismatch(a.level, b.level));
        }
        Ok(())
    }

    fn check_add(&self, a: &Ciphertext, b: &Ciphertext) -> Result<()> {
        self.check_pair(a, b)?;
        if !same_scale(a.scale, b.scale) {
            return Err(Error::ScaleMismatch(a.scale, b.scale));
        }
        Ok(())
    }

    /// `a = op(a, b)` polynomial by polynomial, padding `a` with zeros up to `b`'s degree.
    fn combine_assign(
        &self,
        a: &mut Ciphertext,
        b: &Ciphertext,
        op: fn(&crate::ring::RingContext, &mut RnsPoly, &RnsPoly, &[usize]),
    ) -> Result<()> {
        self.check_add(a, b)?;
        let basis = self.params.q_basis(a.level);
        while a.polys.len() < b.polys.len() {
            a.polys.push(RnsPoly::zero(self.params.n(), a.level + 1));
        }
        for (x, y) in a.polys.iter_mut().zip(&b.polys) {
            op(self.params.ring(), x, y, &basis);
        }
        a.seed = None;
        Ok(())
    }

    /// `a += b`.
    pub fn add_assign(&self, a: &mut Ciphertext, b: &Ciphertext) -> Result<()> {
        self.combine_assign(a, b, crate::ring::RingContext::add_assign)
    }

    pub fn add(&self, a: &Ciphertext, b: &Ciphertext) -> Result<Ciphertext> {
        let mut out = a.clone();
        self.add_assign(&mut out, b)?;
        Ok(out)
    }

    /// `a -= b`.
    pub fn sub_assign(&self, a: &mut Ciphertext, b: &Ciphertext) -> Result<()> {
        self.combine_assign(a, b, crate::ring::RingContext::sub_assign)
    }

    pub fn sub(&self, a: &Ciphertext, b: &Ciphertext) -> Result<Ciphertext> {
        let mut out = a.clone();
        self.sub_assign(&mut out, b)?;
        Ok(out)
    }

    pub fn neg_assign(&self, a: &mut Ciphertext) -> Result<()> {
        self.check(a)?;
        let basis = self.params.q_basis(a.level);
        for x in a.polys.iter_mut() {
            self.params.ring().neg_assign(x, &basis);
        }
        a.seed = None;
        Ok(())
    }

    /// The integer `round(value * scale)` as residues on `q_0..q_level`. It only has to fit
    /// well inside `Q_level`, not a machine integer: a constant added to a sum of
    /// unrelinearized squares is encoded at a scale near 2^120.
    fn scalar_residues(&self, value: f64, scale: f64, level: usize) -> Result<Vec<u64>> {
        let s = (value * scale).round();
        let limit = (self.params.log_q_at(level) - 2.0).exp2();
        if !(s.is_finite() && s.abs() < limit) {
            return Err(Error::ValueOutOfRange { value, scale });
        }
        Ok((0..=level)
            .map(|i| self.params.ring().modulus(i).reduce_integral_f64(s))
            .collect())
    }

    /// Adds the real constant `value` to every slot.
    pub fn add_const_assign(&self, a: &mut Ciphertext, value: f64) -> Result<()> {
        self.check(a)?;
        let r = self.scalar_residues(value, a.scale, a.level)?;
        let basis = self.params.q_basis(a.level);
        self.params
            .ring()
            .add_scalar_assign(&mut a.polys[0], &r, &basis);
        Ok(())
    }

    /// Multiplies every slot by the integer `k`; the scale is unchanged and no level is used.
    pub fn mul_int_assign(&self, a: &mut Ciphertext, k: i64) -> Result<()> {
        self.check(a)?;
        let basis = self.params.q_basis(a.level);
        let r: Vec<u64> = basis
            .iter()
            .map(|&i| self.params.ring().modulus(i).reduce_i64(k))
            .collect();
        for x in a.polys.iter_mut() {
            self.params.ring().mul_scalar_assign(x, &r, &basis);
        }
        a.seed = None;
        Ok(())
    }

    /// Multiplies every slot by the real `value`, encoded as the integer
    /// `round(value * const_scale)`; the ciphertext scale is multiplied by `const_scale`
    /// (usually followed by a rescale). No NTT is involved.
    pub fn mul_const_assign(&self, a: &mut Ciphertext, value: f64, const_scale: f64) -> Result<()> {
        self.check(a)?;
        let r = self.scalar_residues(value, const_scale, a.level)?;
        let basis = self.params.q_basis(a.level);
        for x in a.polys.iter_mut() {
            self.params.ring().mul_scalar_assign(x, &r, &basis);
        }
        a.scale *= const_scale;
        a.seed = None;
        Ok(())
    }

    /// `sum_k w_k * cts[k]` with every real weight encoded as the integer
    /// `round(w_k * const_scale)`. The inputs share level and scale; the result has scale
    /// `scale * const_scale` (usually followed by a rescale).
    pub fn weighted_sum(
        &self,
        cts: &[&Ciphertext],
        weights: &[f64],
        const_scale: f64,
    ) -> Result<Ciphertext> {
        let first = *cts
            .first()
            .ok_or_else(|| Error::InvalidArgument("weighted_sum of no ciphertexts".into()))?;
        if cts.len() != weights.len() {
            return Err(Error::InvalidArgument(format!(
                "{} ciphertexts but {} weights",
                cts.len(),
                weights.len()
            )));
        }
        for ct in cts {
            self.check_add(first, ct)?;
        }
        let terms: Vec<(&Ciphertext, f64)> =
            cts.iter().copied().zip(weights.iter().copied()).collect();
        self.linear_combination(&terms, first.scale * const_scale)
    }

    /// `sum_k w_k * x_k` at scale `target_scale`, for inputs of any levels and scales: term
    /// `k` is multiplied by the integer `round(w_k * target_scale / scale_k)`, and the result
    /// lives at the lowest input level (higher inputs contribute only their lower primes).
    /// One pass over the residues per prime: a row of a modular GEMM, reduced lazily.
    pub fn linear_combination(
        &self,
        terms: &[(&Ciphertext, f64)],
        target_scale: f64,
    ) -> Result<Ciphertext> {
        if terms.is_empty() {
            return Err(Error::InvalidArgument(
                "linear combination of no ciphertexts".into(),
            ));
        }
        for (ct, _) in terms {
            self.check(ct)?;
            if ct.degree() != 1 {
                return Err(Error::WrongDegree(ct.degree(), 1));
            }
        }
        let level = terms.iter().map(|(c, _)| c.level).min().expect("non-empty");
        let limit = self.weight_limit(level);
        let ints: Vec<i128> = terms
            .iter()
            .map(|(ct, w)| encode_weight(*w, target_scale / ct.scale, limit))
            .collect::<Result<_>>()?;
        let ring = self.params.ring();
        let n = self.params.n();
        let mut polys = vec![
            RnsPoly::for_overwrite(n, level + 1),
            RnsPoly::for_overwrite(n, level + 1),
        ];
        for i in 0..=level {
            let m = ring.modulus(i);
            let consts: Vec<ShoupConst> = ints
                .iter()
                .map(|&v| ShoupConst::new(m.reduce_i128(v), m))
                .collect();
            for (p, out) in polys.iter_mut().enumerate() {
                let rows: Vec<&[u64]> = terms.iter().map(|(ct, _)| ct.polys[p].limb(i)).collect();
                kernels::dot_const(out.limb_mut(i), &rows, &consts, m);
            }
        }
        Ok(Ciphertext {
            params: self.params.clone(),
            polys,
            level,
            scale: target_scale,
            seed: None,
        })
    }

    /// Many linear combinations over one shared set of inputs - a sparse modular GEMM
    /// `out_j = sum_t w_jt * inputs[i_jt]` - cache-blocked: for each prime and each block of
    /// coefficients, every output's dot product runs over the same input block while it sits
    /// in cache, so each input residue comes from memory once instead of once per output.
    /// Row `j` is computed at `rows[j].level` (at most its inputs' lowest level) with scale
    /// `rows[j].target_scale`; term weights are encoded as in [`Self::linear_combination`].
    /// Inputs may be unrelinearized squares (degree 2): a row over them is of degree 2, so one
    /// relinearization after the sum replaces one per input.
    pub fn linear_combinations(
        &self,
        inputs: &[&Ciphertext],
        rows: &[LinearRow<'_>],
    ) -> Result<Vec<Ciphertext>> {
        for ct in inputs {
            self.check(ct)?;
            if !(1..=2).contains(&ct.degree()) {
                return Err(Error::WrongDegree(ct.degree(), 1));
            }
        }
        // Integer weights per row, checked like linear_combination's.
        let mut ints: Vec<Vec<i128>> = Vec::with_capacity(rows.len());
        for row in rows {
            if row.terms.is_empty() {
                return Err(Error::InvalidArgument(
                    "linear combination of no ciphertexts".into(),
                ));
            }
            let limit = self.weight_limit(row.level);
            let mut r = Vec::with_capacity(row.terms.len());
            for &(i, w) in row.terms {
                let ct = inputs.get(i as usize).ok_or_else(|| {
                    Error::InvalidArgument(format!("term refers to input {i} of {}", inputs.len()))
                })?;
                if ct.level < row.level {
                    return Err(Error::LevelMismatch(ct.level, row.level));
                }
                r.push(encode_weight(w, row.target_scale / ct.scale, limit)?);
            }
            ints.push(r);
        }
        let ring = self.params.ring();
        let n = self.params.n();
        // A row is of degree 2 when any of its inputs is (unrelinearized squares).
        let degrees: Vec<usize> = rows
            .iter()
            .map(|r| {
                r.terms
                    .iter()
                    .map(|&(i, _)| inputs[i as usize].degree())
                    .max()
                    .unwrap_or(1)
            })
            .collect();
        let mut out: Vec<Vec<RnsPoly>> = rows
            .iter()
            .zip(&degrees)
            .map(|(r, &d)| {
                (0..=d)
                    .map(|_| RnsPoly::for_overwrite(n, r.level + 1))
                    .collect()
            })
            .collect();
        // Consecutive rows over the same inputs at the same level (the output channels of one
        // convolution position) form a group: one pass over the inputs computes up to
        // DOT_ROWS of them.
        let mut groups: Vec<std::ops::Range<usize>> = Vec::new();
        let mut j = 0;
        while j < rows.len() {
            let same = |e: usize| {
                rows[e].level == rows[j].level
                    && degrees[e] == degrees[j]
                    && rows[e].terms.len() == rows[j].terms.len()
                    && rows[e]
                        .terms
                        .iter()
                        .zip(rows[j].terms)
                        .all(|(a, b)| a.0 == b.0)
            };
            let mut e = j + 1;
            while e < rows.len() && e - j < kernels::DOT_ROWS && same(e) {
                e += 1;
            }
            groups.push(j..e);
            j = e;
        }
        // Blocks of one polynomial of every input of the widest row of about 512 KiB: long
        // enough runs for the unrolled kernel, short enough to be reread from L2 by every
        // group (measured best on the expand3 tile shape: `gemm_kernel`, `profile_ops gemm`).
        let widest = rows.iter().map(|r| r.terms.len()).max().unwrap_or(1);
        let block = (GEMM_BLOCK_BYTES / (8 * widest)).clamp(16, n) / 16 * 16;
        let top = rows.iter().map(|r| r.level).max().unwrap_or(0);
        // Per group, the constants of all its rows, term-major (the kernel's layout), for the
        // whole terms and for the degree-2 inputs only.
        let mut consts: Vec<Vec<ShoupConst>> = vec![Vec::new(); groups.len()];
        let mut consts2: Vec<Vec<ShoupConst>> = vec![Vec::new(); groups.len()];
        let mut slices: Vec<&[u64]> = Vec::with_capacity(widest);
        let mut scratch: Vec<u64> = Vec::new();
        let mut packed_key: Option<(usize, usize, usize)> = None;
        let mut packed_inputs: Vec<u32> = Vec::new();
        for i in 0..=top {
            let m = ring.modulus(i);
            for ((c, c2), g) in consts.iter_mut().zip(consts2.iter_mut()).zip(&groups) {
                c.clear();
                c2.clear();
                let lead = &rows[g.start];
                if lead.level < i {
                    continue;
                }
                for (t, &(input, _)) in lead.terms.iter().enumerate() {
                    let second = inputs[input as usize].degree() == 2;
                    for r in g.clone() {
                        let k = ShoupConst::new(m.reduce_i128(ints[r][t]), m);
                        c.push(k);
                        if second {
                            c2.push(k);
                        }
                    }
                }
            }
            // In the kernel's layout, once per prime for all blocks of coefficients.
            let prepared: Vec<[Option<RowConsts>; 2]> = consts
                .iter()
                .zip(&consts2)
                .zip(&groups)
                .map(|((c, c2), g)| {
                    let rows = g.len();
                    let prep =
                        |c: &Vec<ShoupConst>| (!c.is_empty()).then(|| RowConsts::new(c, rows, m));
                    [prep(c), prep(c2)]
                })
                .collect();
            let mut start = 0;
            while start < n {
                let end = (start + block).min(n);
                // Polynomial by polynomial, so the block of inputs all outputs read is one
                // polynomial's (stays in L2), not two or three interleaved.
                for p in 0..3 {
                    for (g, prep) in groups.iter().zip(&prepared) {
                        let lead = &rows[g.start];
                        if lead.level < i || p > degrees[g.start] {
                            continue;
                        }
                        slices.clear();
                        // Only the degree-2 inputs have a third polynomial.
                        slices.extend(lead.terms.iter().filter_map(|&(t, _)| {
                            inputs[t as usize]
                                .polys
                                .get(p)
                                .map(|x| &x.limb(i)[start..end])
                        }));
                        // One contiguous copy of the block's input rows, shared by every
                        // group over the same inputs: rows of separate ciphertexts sit at the
                        // same offsets modulo the cache's set size and evict one another
                        // (`profile_ops gemm`: AVX2 Zen 2 17.4 s -> 7.7 s per call; AVX-512
                        // IFMA Zen 4 2.44-2.80 s -> 1.93-2.25 s).
                        let len = end - start;
                        let stride = len + PACK_PAD;
                        let key = (i, start, p);
                        if packed_key != Some(key)
                            || !packed_inputs
                                .iter()
                                .copied()
                                .eq(lead.terms.iter().map(|t| t.0))
                        {
                            scratch.resize(slices.len() * stride, 0);
                            for (j, row) in slices.iter().enumerate() {
                                scratch[j * stride..j * stride + len].copy_from_slice(row);
                            }
                            packed_key = Some(key);
                            packed_inputs.clear();
                            packed_inputs.extend(lead.terms.iter().map(|t| t.0));
                        }
                        let xs: Vec<&[u64]> = (0..slices.len())
                            .map(|j| &scratch[j * stride..j * stride + len])
                            .collect();
                        let mut outs: Vec<&mut [u64]> = out[g.clone()]
                            .iter_mut()
                            .map(|o| &mut o[p].limb_mut(i)[start..end])
                            .collect();
                        let k = prep[usize::from(p == 2)]
                            .as_ref()
                            .expect("constants for every polynomial a group has");
                        kernels::dot_const_rows_prepared(&mut outs, &xs, k, m);
                    }
                }
                start = end;
            }
        }
        Ok(out
            .into_iter()
            .zip(rows)
            .map(|(polys, row)| Ciphertext {
                params: self.params.clone(),
                polys,
                level: row.level,
                scale: row.target_scale,
                seed: None,
            })
            .collect())
    }

    /// Slot-wise product with an encoded vector at the same or a higher level.
    pub fn mul_plain_assign(&self, a: &mut Ciphertext, pt: &Plaintext) -> Result<()> {
        self.check(a)?;
        if pt.level < a.level {
            return Err(Error::LevelMismatch(a.level, pt.level));
        }
        let basis = self.params.q_basis(a.level);
        let m = pt.poly.copy_rows(0..a.level + 1);
        for x in a.polys.iter_mut() {
            *x = self.params.ring().mul(x, &m, &basis);
        }
        a.scale *= pt.scale;
        a.seed = None;
        Ok(())
    }

    /// Tensor product of two degree-1 ciphertexts: a degree-2 result at scale `a.scale *
    /// b.scale`. Relinearize and rescale afterwards.
    pub fn mul(&self, a: &Ciphertext, b: &Ciphertext) -> Result<Ciphertext> {
        self.check_pair(a, b)?;
        if a.degree() != 1 || b.degree() != 1 {
            return Err(Error::WrongDegree(a.degree().max(b.degree()), 1));
        }
        Ok(self.tensor(a, Factor::Other(b)))
    }

    /// `a^2`, saving one product over `mul(a, a)`.
    pub fn square(&self, a: &Ciphertext) -> Result<Ciphertext> {
        self.check(a)?;
        if a.degree() != 1 {
            return Err(Error::WrongDegree(a.degree(), 1));
        }
        Ok(self.tensor(a, Factor::Same))
    }

    /// `a^2 + beta a` (degree 2, scale `a.scale^2`), `beta` encoded as the integer
    /// `round(beta * a.scale)`: the product `a * (a + beta)` in one tensor pass per prime,
    /// instead of a square, a constant multiple of `a` and an addition (five passes).
    pub fn square_plus(&self, a: &Ciphertext, beta: f64) -> Result<Ciphertext> {
        self.check(a)?;
        if a.degree() != 1 {
            return Err(Error::WrongDegree(a.degree(), 1));
        }
        let r = self.scalar_residues(beta, a.scale, a.level)?;
        Ok(self.tensor(a, Factor::SamePlus(&r)))
    }

    /// The degree-2 product of `a` and `b`, one fused pass per prime.
    fn tensor(&self, a: &Ciphertext, b: Factor) -> Ciphertext {
        let ring = self.params.ring();
        let n = self.params.n();
        let limbs = a.level + 1;
        let mut d = [
            RnsPoly::for_overwrite(n, limbs),
            RnsPoly::for_overwrite(n, limbs),
            RnsPoly::for_overwrite(n, limbs),
        ];
        // For `SamePlus`: `a0 + constant` for one prime (a constant is the same in every NTT
        // slot).
        let mut shifted = match b {
            Factor::SamePlus(_) => vec![0u64; n],
            _ => Vec::new(),
        };
        for i in 0..limbs {
            let m = ring.modulus(i);
            let (a0, a1) = (a.polys[0].limb(i), a.polys[1].limb(i));
            let b = match b {
                Factor::Same => None,
                Factor::Other(b) => Some([b.polys[0].limb(i), b.polys[1].limb(i)]),
                Factor::SamePlus(r) => {
                    for (s, &x) in shifted.iter_mut().zip(a0) {
                        *s = m.add(x, r[i]);
                    }
                    Some([&shifted[..], a1])
                }
            };
            let [d0, d1, d2] = &mut d;
            kernels::tensor(
                [d0.limb_mut(i), d1.limb_mut(i), d2.limb_mut(i)],
                [a0, a1],
                b,
                m,
            );
        }
        let b_scale = match b {
            Factor::Other(b) => b.scale,
            _ => a.scale,
        };
        Ciphertext {
            params: self.params.clone(),
            polys: d.into(),
            level: a.level,
            scale: a.scale * b_scale,
            seed: None,
        }
    }

    /// Degree 2 -> degree 1 with the relinearization key.
    pub fn relinearize_assign(&self, a: &mut Ciphertext, rlk: &RelinKey) -> Result<()> {
        self.check(a)?;
        if rlk.params() != &self.params {
            return Err(Error::ParamsMismatch);
        }
        if a.degree() != 2 {
            return Err(Error::WrongDegree(a.degree(), 2));
        }
        let d2 = a.polys.pop().expect("degree 2");
        let (o0, o1) =
            self.key_switch_core(&d2, a.level, &rlk.0, Some([&a.polys[0], &a.polys[1]]), 0);
        a.polys = vec![o0, o1];
        a.seed = None;
        Ok(())
    }

    pub fn relinearize(&self, a: &Ciphertext, rlk: &RelinKey) -> Result<Ciphertext> {
        let mut out = a.clone();
        self.relinearize_assign(&mut out, rlk)?;
        Ok(out)
    }

    /// Divides by the top prime `q_level` (rounding), dropping one level; the scale is
    /// divided by that exact prime.
    pub fn rescale_assign(&self, a: &mut Ciphertext) -> Result<()> {
        self.check(a)?;
        if a.level == 0 {
            return Err(Error::LevelTooLow { needed: 1, have: 0 });
        }
        let l = a.level;
        let ring = self.params.ring();
        let q_top = *ring.modulus(l);
        let half = q_top.value() / 2;
        let inv = self.params.rescale_inv(l);
        let n = self.params.n();
        let mut last = vec![0u64; n];
        let mut tmp = vec![0u64; n];
        for poly in a.polys.iter_mut() {
            last.copy_from_slice(poly.limb(l));
            ring.table(l).inverse(&mut last);
            // Adding q/2 before and subtracting it after turns truncation into rounding.
            for x in last.iter_mut() {
                *x = q_top.add(*x, half);
            }
            for (i, inv_i) in inv.iter().enumerate() {
                let qi = ring.modulus(i);
                let qv = qi.value();
                // ((last - half) mod q_i), then NTT. When q_i > half (primes of one size, or
                // q_0), `last - half` lies in (-q_i, q_i): one select, no reduction.
                if qv > half {
                    for (t, &x) in tmp.iter_mut().zip(&last) {
                        *t = if x >= half { x - half } else { x + qv - half };
                    }
                } else {
                    kernels::mul_const(&mut tmp, &last, &ShoupConst::new(1, qi), qi);
                    let half_i = qi.reduce(half);
                    for t in tmp.iter_mut() {
                        *t = if *t >= half_i {
                            *t - half_i
                        } else {
                            *t + qv - half_i
                        };
                    }
                }
                ring.table(i).forward(&mut tmp);
                kernels::sub_mul_const(poly.limb_mut(i), &tmp, inv_i, qi);
            }
            poly.truncate(l);
        }
        a.level = l - 1;
        a.scale /= q_top.value() as f64;
        a.seed = None;
        Ok(())
    }

    /// Rescales by the top `count` primes, one after another.
    pub fn rescale_by_assign(&self, a: &mut Ciphertext, count: usize) -> Result<()> {
        if count > a.level {
            return Err(Error::LevelTooLow {
                needed: count,
                have: a.level,
            });
        }
        for _ in 0..count {
            self.rescale_assign(a)?;
        }
        Ok(())
    }

    pub fn rescale(&self, a: &Ciphertext) -> Result<Ciphertext> {
        let mut out = a.clone();
        self.rescale_assign(&mut out)?;
        Ok(out)
    }

    /// Drops primes down to `level` without changing the message or the scale.
    pub fn drop_to_level(&self, a: &mut Ciphertext, level: usize) -> Result<()> {
        self.check(a)?;
        if level > a.level {
            return Err(Error::LevelTooLow {
                needed: level,
                have: a.level,
            });
        }
        for p in a.polys.iter_mut() {
            p.truncate(level + 1);
        }
        a.level = level;
        a.seed = None;
        Ok(())
    }

    /// Rotates the slots left by `steps` (right if negative).
    pub fn rotate(&self, a: &Ciphertext, steps: i64, keys: &GaloisKeys) -> Result<Ciphertext> {
        self.check(a)?;
        if a.degree() != 1 {
            return Err(Error::WrongDegree(a.degree(), 1));
        }
        let g = galois_element(&self.params, steps);
        if g == 1 {
            return Ok(a.clone());
        }
        let key = keys.get(g)?;
        if key.params() != &self.params {
            return Err(Error::ParamsMismatch);
        }
        let ring = self.params.ring();
        let basis = self.params.q_basis(a.level);
        let mut moved = Vec::with_capacity(2);
        for poly in &a.polys {
            let mut c = poly.clone();
            ring.inverse(&mut c, &basis);
            let mut r = ring.automorphism(&c, g as usize, &basis);
            ring.forward(&mut r, &basis);
            moved.push(r);
        }
        let (u0, u1) = self.key_switch(&moved[1], a.level, key);
        let mut c0 = moved.swap_remove(0);
        ring.add_assign(&mut c0, &u0, &basis);
        Ok(Ciphertext {
            params: self.params.clone(),
            polys: vec![c0, u1],
            level: a.level,
            scale: a.scale,
            seed: None,
        })
    }

    /// Hybrid key switching of `d` (evaluation domain on `q_0..q_level`): returns `(u0, u1)`
    /// with `u0 + u1 s ~ d s'` where the key goes from `s'` to `s`.
    pub fn key_switch(
        &self,
        d: &RnsPoly,
        level: usize,
        key: &KeySwitchingKey,
    ) -> (RnsPoly, RnsPoly) {
        self.key_switch_core(d, level, key, None, 0)
    }

    /// Relinearizes and rescales in one pass: the mod-down divides by `P * q_level` at once,
    /// so the rescale costs no transforms of its own. Same result as `relinearize_assign`
    /// followed by `rescale_assign`, up to rounding noise.
    pub fn relinearize_rescale_assign(&self, a: &mut Ciphertext, rlk: &RelinKey) -> Result<()> {
        self.relinearize_rescale_by_assign(a, rlk, 1)
    }

    /// Relinearizes and rescales by the top `count` primes in one key switch: the mod-down
    /// divides by `P * q_level * ... * q_(level - count + 1)`. For a sum of squares that
    /// needs two rescales this replaces two rescales of three polynomials (about half the
    /// transforms of the key switch itself) by two more rows in the mod-down; the key switch
    /// runs `count - 1` levels higher. Same values as `relinearize_assign` followed by
    /// `count` rescales, but the division floors (fast base conversion) with an error of up
    /// to the number of divided primes per coefficient where the rescales round to 1/2: at a
    /// small scale (the engine's logits, 2^28) keep the separate steps.
    pub fn relinearize_rescale_by_assign(
        &self,
        a: &mut Ciphertext,
        rlk: &RelinKey,
        count: usize,
    ) -> Result<()> {
        self.check(a)?;
        if rlk.params() != &self.params {
            return Err(Error::ParamsMismatch);
        }
        if a.degree() != 2 {
            return Err(Error::WrongDegree(a.degree(), 2));
        }
        if a.level < count {
            return Err(Error::LevelTooLow {
                needed: count,
                have: a.level,
            });
        }
        let l = a.level;
        let d2 = a.polys.pop().expect("degree 2");
        let (o0, o1) =
            self.key_switch_core(&d2, l, &rlk.0, Some([&a.polys[0], &a.polys[1]]), count);
        a.polys = vec![o0, o1];
        a.level = l - count;
        for i in 0..count {
            a.scale /= self.params.q()[l - i] as f64;
        }
        a.seed = None;
        Ok(())
    }

    /// Key switching, optionally adding `(c0, c1)` to the result before the final division
    /// (as `P * c`, so it costs no extra pass) and dividing by the top `rescale` primes too.
    ///
    /// Per digit: inverse NTT, fast base extension to the other primes and `P`, forward NTT,
    /// and the inner product with the key; finally divide by `P` (mod-down). The work is
    /// streamed one prime (row) at a time - the dividing primes first, then each remaining
    /// ciphertext prime from extension through mod-down - so the rows stay in cache.
    fn key_switch_core(
        &self,
        d: &RnsPoly,
        level: usize,
        key: &KeySwitchingKey,
        add: Option<[&RnsPoly; 2]>,
        rescale: usize,
    ) -> (RnsPoly, RnsPoly) {
        debug_assert!(rescale <= level);
        let p = &self.params;
        let ring = p.ring();
        let n = p.n();
        let alpha = p.alpha();
        let qp = p.qp_basis(level);
        let digits = p.digits(level);
        let digit_range = |j: usize| j * alpha..((j + 1) * alpha).min(level + 1);
        let qp_moduli: Vec<_> = qp.iter().map(|&r| *ring.modulus(r)).collect();

        // z: d in the coefficient domain, each row scaled for its digit's base extension.
        let converters: Vec<BaseConverter> = (0..digits)
            .map(|j| {
                let from: Vec<_> = digit_range(j).map(|i| *ring.modulus(i)).collect();
                BaseConverter::new(&from, &qp_moduli)
            })
            .collect();
        let mut z = d.clone();
        for (j, conv) in converters.iter().enumerate() {
            for (k, i) in digit_range(j).enumerate() {
                let row = z.limb_mut(i);
                ring.table(i).inverse(row);
                conv.scale_input(k, row);
            }
        }

        let mut ext = RnsPoly::for_overwrite(n, digits);
        // Inner product of the extended digits with the key for one prime (position `pos`
        // in `qp`), plus `P * c` when asked, into `out0`/`out1`.
        let mut key_row = |pos: usize, out0: &mut [u64], out1: &mut [u64]| {
            let r = qp[pos];
            let table = ring.table(r);
            for (j, conv) in converters.iter().enumerate() {
                let range = digit_range(j);
                if !range.contains(&pos) {
                    let rows: Vec<&[u64]> = range.map(|i| z.limb(i)).collect();
                    let row = ext.limb_mut(j);
                    conv.target_row(pos, &rows, row);
                    table.forward(row);
                }
            }
            // Inside its own digit a prime needs no extension: use d's row as it is.
            let xs: Vec<&[u64]> = (0..digits)
                .map(|j| {
                    if digit_range(j).contains(&pos) {
                        d.limb(pos)
                    } else {
                        ext.limb(j)
                    }
                })
                .collect();
            // Key rows are laid out in prime-index order, so row `r` is prime `r`.
            let bs: Vec<&[u64]> = key.b.iter().map(|k| k.limb(r)).collect();
            let as_: Vec<&[u64]> = key.a.iter().map(|k| k.limb(r)).collect();
            let m = ring.modulus(r);
            kernels::dot2(out0, out1, &xs, &bs[..digits], &as_[..digits], m);
            // P * c vanishes modulo the special primes.
            if let (Some([c0, c1]), true) = (add, pos <= level) {
                let pc = ShoupConst::new(p.p_mod_q()[pos], m);
                kernels::mul_const_acc(out0, c0.limb(pos), &pc, m);
                kernels::mul_const_acc(out1, c1.limb(pos), &pc, m);
            }
        };

        // The dividing primes: P, and the top `rescale` primes of q. Their rows go back to
        // the coefficient domain, scaled for the extension to the remaining primes.
        let out_level = level - rescale;
        let dividing: Vec<usize> = (level + 1..qp.len()).chain(out_level + 1..=level).collect();
        let div_moduli: Vec<_> = dividing.iter().map(|&pos| qp_moduli[pos]).collect();
        let down = BaseConverter::new(&div_moduli, &qp_moduli[..=out_level]);
        let mut p0 = RnsPoly::for_overwrite(n, dividing.len());
        let mut p1 = RnsPoly::for_overwrite(n, dividing.len());
        for (m, &pos) in dividing.iter().enumerate() {
            key_row(pos, p0.limb_mut(m), p1.limb_mut(m));
            for poly in [&mut p0, &mut p1] {
                let row = poly.limb_mut(m);
                ring.table(qp[pos]).inverse(row);
                down.scale_input(m, row);
            }
        }
        let p0_rows: Vec<&[u64]> = p0.rows().collect();
        let p1_rows: Vec<&[u64]> = p1.rows().collect();

        // Then each remaining prime: inner product, then (x - (x mod D)) / D.
        let mut out0 = RnsPoly::for_overwrite(n, out_level + 1);
        let mut out1 = RnsPoly::for_overwrite(n, out_level + 1);
        let mut tmp = vec![0u64; n];
        for k in 0..=out_level {
            let (o0, o1) = (out0.limb_mut(k), out1.limb_mut(k));
            key_row(k, o0, o1);
            let qk = ring.modulus(k);
            let inv = if rescale > 0 {
                let w = (out_level + 1..=level).fold(p.p_inv_mod_q()[k].w, |w, r| {
                    qk.mul(w, p.rescale_inv(r)[k].w)
                });
                ShoupConst::new(w, qk)
            } else {
                p.p_inv_mod_q()[k]
            };
            for (o, rows) in [(o0, &p0_rows), (o1, &p1_rows)] {
                down.target_row(k, rows, &mut tmp);
                ring.table(k).forward(&mut tmp);
                kernels::sub_mul_const(o, &tmp, &inv, qk);
            }
        }
        (out0, out1)
    }
}
