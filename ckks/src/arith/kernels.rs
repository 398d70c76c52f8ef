//! Row kernels: multiply a row of residues by a constant (Shoup), with AVX-512 IFMA where
//! the CPU has it and a portable scalar path elsewhere (including wasm32).
//!
//! The IFMA path uses 52-bit Shoup constants `w52 = floor(w * 2^52 / t)`: for any `x < 2^52`
//! the estimate `floor(x * w52 / 2^52)` is at most one below `floor(x * w / t)`, so one
//! conditional subtraction finishes the reduction. Inputs therefore need not be reduced
//! modulo `t` (only below 2^52), which is what base conversion between primes of different
//! sizes needs. The GEMM's rows kernel instead folds its long lazy sums with two Montgomery
//! reductions by 2^52 and takes its constants prescaled by 2^104 ([`RowConsts`]).

use super::Modulus;

/// A constant `w < t` prepared for the row kernels.
#[derive(Clone, Copy, Debug)]
pub struct ShoupConst {
    pub w: u64,
    /// floor(w * 2^64 / t), for the scalar path.
    w64: u64,
    /// floor(w * 2^52 / t), for the IFMA path.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    w52: u64,
}

impl ShoupConst {
    pub fn new(w: u64, t: &Modulus) -> Self {
        debug_assert!(w < t.value());
        Self {
            w,
            w64: t.shoup(w),
            w52: (((w as u128) << 52) / t.value() as u128) as u64,
        }
    }
}

#[inline(always)]
fn scalar_mul(x: u64, c: &ShoupConst, t: u64) -> u64 {
    let q_hat = ((x as u128 * c.w64 as u128) >> 64) as u64;
    let r = x.wrapping_mul(c.w).wrapping_sub(q_hat.wrapping_mul(t));
    if r >= t {
        r - t
    } else {
        r
    }
}

#[cfg(target_arch = "x86_64")]
fn has_ifma() -> bool {
    std::arch::is_x86_feature_detected!("avx512ifma")
}

/// Which row-kernel path this CPU runs: `"avx512-ifma"`, `"avx2-fma"` or `"scalar"` (benchmarks
/// report it: the same job differs by several times between them).
pub fn kernel_path() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if has_ifma() {
            return "avx512-ifma";
        }
        if has_avx2_fma() {
            return "avx2-fma";
        }
    }
    "scalar"
}

/// AVX2 with FMA (x86-64 since 2013-2015): the row kernels' path (module `avx2`) where IFMA
/// is missing, 64-bit multiply-adds being scalar otherwise.
#[cfg(target_arch = "x86_64")]
fn has_avx2_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
}

/// `out[k] = x[k] * w mod t` for `x[k] < 2^52`.
pub fn mul_const(out: &mut [u64], x: &[u64], c: &ShoupConst, t: &Modulus) {
    debug_assert_eq!(out.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if has_ifma() {
        // SAFETY: the CPU supports avx512f + avx512ifma (checked above).
        unsafe { ifma::mul_const(out, x, c, t.value()) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports avx2 + fma (checked above).
        unsafe { avx2::mul_const(out, x, c, t.value()) };
        return;
    }
    let tv = t.value();
    for (o, &v) in out.iter_mut().zip(x) {
        *o = scalar_mul(v, c, tv);
    }
}

/// `x[k] = x[k] * w mod t` in place, for `x[k] < 2^52`.
pub fn mul_const_assign(x: &mut [u64], c: &ShoupConst, t: &Modulus) {
    #[cfg(target_arch = "x86_64")]
    if has_ifma() {
        // SAFETY: the CPU supports avx512f + avx512ifma (checked above).
        unsafe { ifma::mul_const_assign(x, c, t.value()) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports avx2 + fma (checked above).
        unsafe { avx2::mul_const_assign(x, c, t.value()) };
        return;
    }
    let tv = t.value();
    for v in x.iter_mut() {
        *v = scalar_mul(*v, c, tv);
    }
}

/// `acc[k] = (acc[k] + x[k] * w) mod t` for `acc[k] < t`, `x[k] < 2^52`.
pub fn mul_const_acc(acc: &mut [u64], x: &[u64], c: &ShoupConst, t: &Modulus) {
    debug_assert_eq!(acc.len(), x.len());
    #[cfg(target_arch = "x86_64")]
    if has_ifma() {
        // SAFETY: as above.
        unsafe { ifma::mul_const_acc(acc, x, c, t.value()) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports avx2 + fma (checked above).
        unsafe { avx2::mul_const_acc(acc, x, c, t.value()) };
        return;
    }
    let tv = t.value();
    for (a, &v) in acc.iter_mut().zip(x) {
        let s = *a + scalar_mul(v, c, tv);
        *a = if s >= tv { s - tv } else { s };
    }
}

/// `y[k] = (y[k] - c[k]) * w mod t` for `y[k], c[k] < t`.
pub fn sub_mul_const(y: &mut [u64], sub: &[u64], c: &ShoupConst, t: &Modulus) {
    debug_assert_eq!(y.len(), sub.len());
    #[cfg(target_arch = "x86_64")]
    if has_ifma() {
        // SAFETY: as above.
        unsafe { ifma::sub_mul_const(y, sub, c, t.value()) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports avx2 + fma (checked above).
        unsafe { avx2::sub_mul_const(y, sub, c, t.value()) };
        return;
    }
    let tv = t.value();
    for (a, &s) in y.iter_mut().zip(sub) {
        *a = scalar_mul(*a + tv - s, c, tv);
    }
}

/// `out[k] = sum_i x_i[k] * c_i mod t` for constants `c_i < t` and inputs below 2^50, reduced
/// once per `DOT_MAX_TERMS` terms: the second half of a base conversion, and the inner loop of
/// a linear layer over ciphertext residues.
pub fn dot_const(out: &mut [u64], x: &[&[u64]], c: &[ShoupConst], t: &Modulus) {
    assert!(!x.is_empty() && x.len() == c.len());
    #[cfg(target_arch = "x86_64")]
    if has_ifma() {
        // SAFETY: the CPU supports avx512f + avx512ifma (checked above); the kernel folds
        // every DOT_MAX_TERMS terms itself.
        unsafe { ifma::dot_const(out, x, c, t) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        dot_const_rows(&mut [out], x, c, t);
        return;
    }
    let first = x.len().min(DOT_MAX_TERMS);
    dot_const_chunk(out, &x[..first], &c[..first], t);
    let mut rest = vec![0u64; if x.len() > first { out.len() } else { 0 }];
    let mut done = first;
    while done < x.len() {
        let end = (done + DOT_MAX_TERMS).min(x.len());
        dot_const_chunk(&mut rest, &x[done..end], &c[done..end], t);
        let tv = t.value();
        for (o, r) in out.iter_mut().zip(&rest) {
            let s = *o + r;
            *o = if s >= tv { s - tv } else { s };
        }
        done = end;
    }
}

/// Most outputs [`dot_const_rows`] computes in one pass over its inputs.
pub const DOT_ROWS: usize = 4;

/// `outs[r][k] = sum_i x_i[k] * c[i * R + r] mod t` for `R = outs.len()` outputs over the
/// same inputs (constants term-major, `R` per input): the outputs of one convolution position
/// share their inputs, so each input vector loaded feeds `R` outputs' multiply-adds instead of
/// one. Any `R`; the vector paths work `DOT_ROWS` at a time. For many calls over blocks of
/// the same rows, prepare the constants once ([`RowConsts`], [`dot_const_rows_prepared`]).
pub fn dot_const_rows(outs: &mut [&mut [u64]], x: &[&[u64]], c: &[ShoupConst], t: &Modulus) {
    let prepared = RowConsts::new(c, outs.len(), t);
    dot_const_rows_prepared(outs, x, &prepared, t);
}

/// The constants of [`dot_const_rows`] (term-major, `rows` per input) split into the passes of
/// at most [`DOT_ROWS`] outputs this CPU's kernel makes, in its layout. A GEMM over short
/// blocks of coefficients builds them once per prime instead of once per block: on AVX2 the
/// preparation (a division per constant) cost as much as the multiply-adds on 48-coefficient
/// blocks of 1,152-term rows (conv2's shape; BENCHMARKS.md, "Winograd").
pub struct RowConsts {
    rows: usize,
    terms: usize,
    passes: Passes,
}

enum Passes {
    /// Per pass, its rows' constants term-major: the portable path's layout (one row per
    /// pass).
    Shoup(Vec<Vec<ShoupConst>>),
    /// Per pass of at most [`DOT_ROWS`] rows, `w 2^104 mod t` term-major: the IFMA kernel
    /// folds its lazy sums with two Montgomery reductions by 2^52, which this factor undoes.
    #[cfg(target_arch = "x86_64")]
    Ifma(ifma::RowsFold, Vec<Vec<u64>>),
    /// Per pass, `[w, w >> 32, bits(w / t)]` term-major.
    #[cfg(target_arch = "x86_64")]
    Avx2(Vec<Vec<[u64; 3]>>),
}

impl RowConsts {
    pub fn new(c: &[ShoupConst], rows: usize, t: &Modulus) -> Self {
        assert!(rows > 0 && c.len().is_multiple_of(rows));
        let terms = c.len() / rows;
        #[cfg(target_arch = "x86_64")]
        {
            if has_ifma() && rows > 1 {
                return Self {
                    rows,
                    terms,
                    passes: {
                        let fold = ifma::RowsFold::new(t);
                        let passes = ifma_passes(c, rows, &fold, t);
                        Passes::Ifma(fold, passes)
                    },
                };
            }
            if has_avx2_fma() {
                return Self {
                    rows,
                    terms,
                    passes: Passes::Avx2(avx2_passes(c, rows, t)),
                };
            }
        }
        let _ = t;
        Self {
            rows,
            terms,
            passes: Passes::Shoup(split_passes(c, rows, 1)),
        }
    }
}

/// Term-major constants of `rows` outputs split into passes of at most `per_pass` outputs,
/// each term-major itself.
fn split_passes(c: &[ShoupConst], rows: usize, per_pass: usize) -> Vec<Vec<ShoupConst>> {
    (0..rows)
        .step_by(per_pass)
        .map(|done| {
            let take = (rows - done).min(per_pass);
            c.chunks(rows)
                .flat_map(|per_term| per_term[done..done + take].iter().copied())
                .collect()
        })
        .collect()
}

/// [`split_passes`] in the IFMA rows kernel's layout: each constant prescaled by `fold`.
#[cfg(target_arch = "x86_64")]
fn ifma_passes(c: &[ShoupConst], rows: usize, fold: &ifma::RowsFold, t: &Modulus) -> Vec<Vec<u64>> {
    split_passes(c, rows, DOT_ROWS)
        .into_iter()
        .map(|pass| pass.iter().map(|k| fold.prescale(k.w, t)).collect())
        .collect()
}

/// [`split_passes`] in the AVX2 kernel's layout.
#[cfg(target_arch = "x86_64")]
fn avx2_passes(c: &[ShoupConst], rows: usize, t: &Modulus) -> Vec<Vec<[u64; 3]>> {
    let tv = t.value() as f64;
    split_passes(c, rows, avx2::ROWS)
        .into_iter()
        .map(|pass| {
            pass.iter()
                .map(|k| [k.w, k.w >> 32, (k.w as f64 / tv).to_bits()])
                .collect()
        })
        .collect()
}

/// [`dot_const_rows`] with constants prepared by [`RowConsts::new`] (for `outs.len()` rows
/// and `x.len()` terms, modulo `t`).
pub fn dot_const_rows_prepared(outs: &mut [&mut [u64]], x: &[&[u64]], k: &RowConsts, t: &Modulus) {
    assert!(outs.len() == k.rows && x.len() == k.terms && !x.is_empty());
    match &k.passes {
        #[cfg(target_arch = "x86_64")]
        Passes::Ifma(fold, passes) => {
            for (outs, part) in outs.chunks_mut(DOT_ROWS).zip(passes) {
                // SAFETY: the constants were prepared for avx512f + avx512ifma, which the CPU
                // supports; lengths are checked by the kernel.
                unsafe { ifma::dot_const_rows(outs, x, part, fold, t) };
            }
        }
        #[cfg(target_arch = "x86_64")]
        Passes::Avx2(passes) => {
            for (outs, part) in outs.chunks_mut(avx2::ROWS).zip(passes) {
                // SAFETY: the constants were prepared for avx2 + fma, which the CPU
                // supports; lengths are checked by the kernel.
                unsafe { avx2::dot_const_rows(outs, x, part, t) };
            }
        }
        Passes::Shoup(passes) => {
            for (out, own) in outs.iter_mut().zip(passes) {
                dot_const(out, x, own, t);
            }
        }
    }
}

/// The portable path of [`dot_const`] for at most `DOT_MAX_TERMS` terms (IFMA CPUs never get
/// here).
fn dot_const_chunk(out: &mut [u64], x: &[&[u64]], c: &[ShoupConst], t: &Modulus) {
    debug_assert!(x.len() <= DOT_MAX_TERMS);
    for (k, o) in out.iter_mut().enumerate() {
        let s: u128 = x
            .iter()
            .zip(c)
            .map(|(row, ci)| row[k] as u128 * ci.w as u128)
            .sum();
        *o = t.reduce_u128(s);
    }
}

/// The tensor product of two degree-1 ciphertexts, one row:
/// `d0 = a0 b0`, `d1 = a0 b1 + a1 b0`, `d2 = a1 b1` (mod t), in one pass over the inputs.
/// With `b = None` it squares: `d0 = a0^2`, `d1 = 2 a0 a1`, `d2 = a1^2`.
pub fn tensor(d: [&mut [u64]; 3], a: [&[u64]; 2], b: Option<[&[u64]; 2]>, t: &Modulus) {
    #[cfg(target_arch = "x86_64")]
    if has_ifma() {
        // SAFETY: the CPU supports avx512f + avx512ifma (checked above).
        unsafe { ifma::tensor(d, a, b, t) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports avx2 + fma (checked above).
        unsafe { avx2::tensor(d, a, b, t) };
        return;
    }
    tensor_portable(d, a, b, t, 0);
}

/// The portable [`tensor`] from coefficient `from` on (the vector kernels' tails).
fn tensor_portable(
    d: [&mut [u64]; 3],
    a: [&[u64]; 2],
    b: Option<[&[u64]; 2]>,
    t: &Modulus,
    from: usize,
) {
    let [d0, d1, d2] = d;
    let [a0, a1] = a;
    let (b0, b1, twice) = match b {
        Some([b0, b1]) => (b0, b1, false),
        None => (a0, a1, true),
    };
    for k in from..d0.len() {
        let (x0, x1, y0, y1) = (a0[k] as u128, a1[k] as u128, b0[k] as u128, b1[k] as u128);
        d0[k] = t.reduce_u128(x0 * y0);
        d1[k] = if twice {
            t.reduce_u128(2 * x0 * y1)
        } else {
            t.reduce_u128(x0 * y1 + x1 * y0)
        };
        d2[k] = t.reduce_u128(x1 * y1);
    }
}

/// Largest number of products `dot2` may sum before reducing.
pub const DOT_MAX_TERMS: usize = 16;

/// Terms the IFMA rows kernel (the GEMM's) sums lazily between folds: each term adds below
/// 2^52 to the 64-bit low half, so 4,096 terms cannot overflow it (the high half, below 2^50
/// per term for inputs below 2^52, stays below 2^62). In practice every row of the GEMM
/// is folded once. Folding every 16 terms, as `dot_const` does, spent about a fifth of the
/// kernel's instructions on folds.
const ROWS_FOLD_TERMS: usize = 4096;

/// Two inner products at once, reduced once at the end:
/// `out0[k] = sum_j x_j[k] * b_j[k] mod t`, `out1[k] = sum_j x_j[k] * a_j[k] mod t`.
///
/// Inputs `x_j` below 2^50, factors `a_j`, `b_j` reduced below `t`. This is the
/// key-switching inner product: the extended digits `x_j` against the two halves of the key
/// (whose rows are residues). Sums are reduced once per `DOT_MAX_TERMS` terms.
pub fn dot2(
    out0: &mut [u64],
    out1: &mut [u64],
    x: &[&[u64]],
    b: &[&[u64]],
    a: &[&[u64]],
    t: &Modulus,
) {
    assert!(!x.is_empty() && x.len() == b.len() && x.len() == a.len());
    let first = x.len().min(DOT_MAX_TERMS);
    dot2_chunk(out0, out1, &x[..first], &b[..first], &a[..first], t);
    if x.len() > first {
        let (mut r0, mut r1) = (vec![0u64; out0.len()], vec![0u64; out1.len()]);
        dot2(&mut r0, &mut r1, &x[first..], &b[first..], &a[first..], t);
        let tv = t.value();
        for (o, r) in out0.iter_mut().zip(&r0).chain(out1.iter_mut().zip(&r1)) {
            let s = *o + r;
            *o = if s >= tv { s - tv } else { s };
        }
    }
}

fn dot2_chunk(
    out0: &mut [u64],
    out1: &mut [u64],
    x: &[&[u64]],
    b: &[&[u64]],
    a: &[&[u64]],
    t: &Modulus,
) {
    debug_assert!(x.len() <= DOT_MAX_TERMS);
    #[cfg(target_arch = "x86_64")]
    if has_ifma() {
        // SAFETY: the CPU supports avx512f + avx512ifma (checked above).
        unsafe { ifma::dot2(out0, out1, x, b, a, t) };
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if has_avx2_fma() {
        // SAFETY: the CPU supports avx2 + fma (checked above).
        unsafe { avx2::dot2(out0, out1, x, b, a, t) };
        return;
    }
    dot2_portable(out0, out1, x, b, a, t, 0);
}

/// The portable [`dot2`] chunk from coefficient `from` on (the vector kernels' tails).
fn dot2_portable(
    out0: &mut [u64],
    out1: &mut [u64],
    x: &[&[u64]],
    b: &[&[u64]],
    a: &[&[u64]],
    t: &Modulus,
    from: usize,
) {
    for k in from..out0.len() {
        let (mut s0, mut s1) = (0u128, 0u128);
        for j in 0..x.len() {
            let v = x[j][k] as u128;
            s0 += v * b[j][k] as u128;
            s1 += v * a[j][k] as u128;
        }
        out0[k] = t.reduce_u128(s0);
        out1[k] = t.reduce_u128(s1);
    }
}

#[cfg(target_arch = "x86_64")]
mod ifma {
    use super::ShoupConst;
    use std::arch::x86_64::*;

    const MASK52: u64 = (1u64 << 52) - 1;

    /// `x * w mod t` in `[0, t)` for 8 lanes with `x < 2^52`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512ifma")]
    fn lanes_mul(x: __m512i, w: __m512i, w52: __m512i, t: __m512i) -> __m512i {
        let zero = _mm512_setzero_si512();
        let q_hat = _mm512_madd52hi_epu64(zero, x, w52);
        let xw = _mm512_madd52lo_epu64(zero, x, w);
        let qt = _mm512_madd52lo_epu64(zero, q_hat, t);
        let r = _mm512_and_si512(_mm512_sub_epi64(xw, qt), _mm512_set1_epi64(MASK52 as i64));
        _mm512_min_epu64(r, _mm512_sub_epi64(r, t))
    }

    /// `hi * 2^52 + lo mod t` for lazily accumulated 52-bit halves (`hi < 2^52`,
    /// `lo < 2^56`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512ifma")]
    fn lanes_fold(
        lo: __m512i,
        hi: __m512i,
        k: &ShoupConst,
        one: &ShoupConst,
        t: __m512i,
    ) -> __m512i {
        let mask = _mm512_set1_epi64(MASK52 as i64);
        let hi = _mm512_add_epi64(hi, _mm512_srli_epi64(lo, 52));
        let lo = _mm512_and_si512(lo, mask);
        let a = lanes_mul(
            hi,
            _mm512_set1_epi64(k.w as i64),
            _mm512_set1_epi64(k.w52 as i64),
            t,
        );
        let b = lanes_mul(
            lo,
            _mm512_set1_epi64(one.w as i64),
            _mm512_set1_epi64(one.w52 as i64),
            t,
        );
        let s = _mm512_add_epi64(a, b);
        _mm512_min_epu64(s, _mm512_sub_epi64(s, t))
    }

    /// # Safety
    /// Needs avx512f and avx512ifma.
    #[target_feature(enable = "avx512f,avx512ifma")]
    pub unsafe fn tensor(
        d: [&mut [u64]; 3],
        a: [&[u64]; 2],
        b: Option<[&[u64]; 2]>,
        t: &crate::arith::Modulus,
    ) {
        let [d0, d1, d2] = d;
        let [a0, a1] = a;
        let square = b.is_none();
        let [b0, b1] = b.unwrap_or(a);
        let n = d0.len();
        for row in [&d1[..], &d2[..], a0, a1, b0, b1] {
            assert!(row.len() >= n);
        }
        let tv = t.value();
        let k52 = ShoupConst::new(((1u128 << 52) % tv as u128) as u64, t);
        let one = ShoupConst::new(1, t);
        let tt = _mm512_set1_epi64(tv as i64);
        let zero = _mm512_setzero_si512();
        let mut k = 0;
        while k + 8 <= n {
            // SAFETY: k + 8 <= n <= every row's length (asserted above).
            unsafe {
                let ld = |r: &[u64]| _mm512_loadu_si512(r.as_ptr().add(k) as *const _);
                let (x0, x1, y0, y1) = (ld(a0), ld(a1), ld(b0), ld(b1));
                let p0 = lanes_fold(
                    _mm512_madd52lo_epu64(zero, x0, y0),
                    _mm512_madd52hi_epu64(zero, x0, y0),
                    &k52,
                    &one,
                    tt,
                );
                let (lo1, hi1) = if square {
                    let lo = _mm512_madd52lo_epu64(zero, x0, y1);
                    let hi = _mm512_madd52hi_epu64(zero, x0, y1);
                    (_mm512_add_epi64(lo, lo), _mm512_add_epi64(hi, hi))
                } else {
                    (
                        _mm512_madd52lo_epu64(_mm512_madd52lo_epu64(zero, x0, y1), x1, y0),
                        _mm512_madd52hi_epu64(_mm512_madd52hi_epu64(zero, x0, y1), x1, y0),
                    )
                };
                let p1 = lanes_fold(lo1, hi1, &k52, &one, tt);
                let p2 = lanes_fold(
                    _mm512_madd52lo_epu64(zero, x1, y1),
                    _mm512_madd52hi_epu64(zero, x1, y1),
                    &k52,
                    &one,
                    tt,
                );
                _mm512_storeu_si512(d0.as_mut_ptr().add(k) as *mut _, p0);
                _mm512_storeu_si512(d1.as_mut_ptr().add(k) as *mut _, p1);
                _mm512_storeu_si512(d2.as_mut_ptr().add(k) as *mut _, p2);
            }
            k += 8;
        }
        for j in k..n {
            let (x0, x1, y0, y1) = (a0[j] as u128, a1[j] as u128, b0[j] as u128, b1[j] as u128);
            d0[j] = t.reduce_u128(x0 * y0);
            d1[j] = t.reduce_u128(x0 * y1 + x1 * y0);
            d2[j] = t.reduce_u128(x1 * y1);
        }
    }

    /// `out[k..k + 8U]` of [`dot_const`]: `U` vectors of coefficients, every `DOT_MAX_TERMS`
    /// lazy products folded into a reduced sum kept in registers, one store per vector.
    ///
    /// # Safety
    /// Needs avx512f and avx512ifma; `out` and every row at least `k + 8U` long.
    #[inline]
    #[target_feature(enable = "avx512f,avx512ifma")]
    unsafe fn dot_vectors<const U: usize>(
        out: &mut [u64],
        x: &[&[u64]],
        ws: &[__m512i],
        k: usize,
        k52: &ShoupConst,
        one: &ShoupConst,
        tt: __m512i,
    ) {
        let mut acc = [_mm512_setzero_si512(); U];
        for (rows, wc) in x
            .chunks(super::DOT_MAX_TERMS)
            .zip(ws.chunks(super::DOT_MAX_TERMS))
        {
            let mut lo = [_mm512_setzero_si512(); U];
            let mut hi = [_mm512_setzero_si512(); U];
            for (row, &w) in rows.iter().zip(wc) {
                for u in 0..U {
                    // SAFETY: k + 8U <= the row's length (the caller's contract).
                    let v = unsafe { _mm512_loadu_si512(row.as_ptr().add(k + 8 * u) as *const _) };
                    lo[u] = _mm512_madd52lo_epu64(lo[u], v, w);
                    hi[u] = _mm512_madd52hi_epu64(hi[u], v, w);
                }
            }
            for u in 0..U {
                let s = _mm512_add_epi64(acc[u], lanes_fold(lo[u], hi[u], k52, one, tt));
                acc[u] = _mm512_min_epu64(s, _mm512_sub_epi64(s, tt));
            }
        }
        for (u, a) in acc.iter().enumerate() {
            // SAFETY: k + 8U <= out.len() (the caller's contract).
            unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(k + 8 * u) as *mut _, *a) };
        }
    }

    /// # Safety
    /// Needs avx512f and avx512ifma.
    #[target_feature(enable = "avx512f,avx512ifma")]
    pub unsafe fn dot_const(
        out: &mut [u64],
        x: &[&[u64]],
        c: &[ShoupConst],
        t: &crate::arith::Modulus,
    ) {
        let n = out.len();
        for row in x {
            assert!(row.len() >= n);
        }
        let tv = t.value();
        let k52 = ShoupConst::new(((1u128 << 52) % tv as u128) as u64, t);
        let one = ShoupConst::new(1, t);
        let tt = _mm512_set1_epi64(tv as i64);
        let ws: Vec<__m512i> = c.iter().map(|ci| _mm512_set1_epi64(ci.w as i64)).collect();
        let mut k = 0;
        // Four vectors of coefficients at a time: eight independent multiply-add chains hide
        // the IFMA latency that a single lo/hi pair waits on. Then single vectors.
        while k + 32 <= n {
            // SAFETY: k + 32 <= n <= every row's length (asserted above).
            unsafe { dot_vectors::<4>(out, x, &ws, k, &k52, &one, tt) };
            k += 32;
        }
        while k + 8 <= n {
            // SAFETY: k + 8 <= n <= every row's length (asserted above).
            unsafe { dot_vectors::<1>(out, x, &ws, k, &k52, &one, tt) };
            k += 8;
        }
        for kk in k..n {
            let s: u128 = x
                .iter()
                .zip(c)
                .map(|(row, ci)| row[kk] as u128 * ci.w as u128)
                .sum();
            out[kk] = t.reduce_u128(s);
        }
    }

    /// The constants of [`lanes_redc2`] for one prime.
    pub struct RowsFold {
        /// `-t^-1 mod 2^52`.
        t_inv: u64,
        /// `2^104 mod t`, the factor the constants are prescaled by.
        r104: u64,
        /// `2^-104 mod t`, for the scalar tail (which sums the prescaled products exactly).
        inv104: u64,
    }

    impl RowsFold {
        pub fn new(t: &crate::arith::Modulus) -> Self {
            let tv = t.value();
            // Newton's iteration for t^-1 mod 2^64 (t odd): each step doubles the correct bits.
            let mut inv = tv;
            for _ in 0..6 {
                inv = inv.wrapping_mul(2u64.wrapping_sub(tv.wrapping_mul(inv)));
            }
            debug_assert_eq!(tv.wrapping_mul(inv), 1);
            let r52 = ((1u128 << 52) % tv as u128) as u64;
            let r104 = t.mul(r52, r52);
            Self {
                t_inv: inv.wrapping_neg() & MASK52,
                r104,
                inv104: t.inv(r104).expect("an odd prime"),
            }
        }

        /// `w 2^104 mod t`: a constant `w < t` in the kernel's form.
        pub fn prescale(&self, w: u64, t: &crate::arith::Modulus) -> u64 {
            t.mul(w, self.r104)
        }
    }

    /// `(hi 2^52 + lo) 2^-104 mod t` in `[0, t)` for lazy sums with `lo < 2^64`,
    /// `hi < 2^62` and `2^12 < t < 2^52`: two Montgomery reductions by 2^52, three IFMAs
    /// each. For `l < 2^52` and `q = l (-t^-1) mod 2^52`, `l + lo52(q t)` is exactly 0 or
    /// 2^52, so `(V + q t) / 2^52` is `V`'s upper part plus `hi52(q t)` plus that carry.
    /// The first leaves below `2^63`, the second below `2^11 + t`: one subtraction
    /// finishes. (A Shoup fold of both halves took nine IFMAs and twice the other work.)
    #[inline]
    #[target_feature(enable = "avx512f,avx512ifma")]
    fn lanes_redc2(lo: __m512i, hi: __m512i, t_inv: __m512i, t: __m512i) -> __m512i {
        let zero = _mm512_setzero_si512();
        let mask = _mm512_set1_epi64(MASK52 as i64);
        let reduce = |low: __m512i, high: __m512i| {
            let q = _mm512_madd52lo_epu64(zero, low, t_inv);
            let carry = _mm512_srli_epi64(_mm512_madd52lo_epu64(low, q, t), 52);
            _mm512_madd52hi_epu64(_mm512_add_epi64(high, carry), q, t)
        };
        let r = reduce(
            _mm512_and_si512(lo, mask),
            _mm512_add_epi64(hi, _mm512_srli_epi64(lo, 52)),
        );
        let s = reduce(_mm512_and_si512(r, mask), _mm512_srli_epi64(r, 52));
        _mm512_min_epu64(s, _mm512_sub_epi64(s, t))
    }

    /// `out_r[k..k + 8U]` of [`dot_const_rows`] for `R` outputs: each input vector is loaded
    /// once and multiplied by `R` broadcast constants (prescaled by 2^104); lazy sums folded
    /// every `ROWS_FOLD_TERMS` terms.
    ///
    /// # Safety
    /// Needs avx512f and avx512ifma; every `outs[r]` and every row at least `k + 8U` long.
    #[inline]
    #[target_feature(enable = "avx512f,avx512ifma")]
    unsafe fn dot_rows_vectors<const R: usize, const U: usize>(
        outs: &[*mut u64; R],
        x: &[&[u64]],
        ws: &[u64],
        k: usize,
        t_inv: __m512i,
        tt: __m512i,
    ) {
        let zero = _mm512_setzero_si512();
        let mut acc = [[zero; U]; R];
        for (chunk, (rows, wc)) in x
            .chunks(super::ROWS_FOLD_TERMS)
            .zip(ws.chunks(super::ROWS_FOLD_TERMS * R))
            .enumerate()
        {
            let mut lo = [[zero; U]; R];
            let mut hi = [[zero; U]; R];
            for (row, w) in rows.iter().zip(wc.chunks_exact(R)) {
                let mut v = [zero; U];
                for (u, vu) in v.iter_mut().enumerate() {
                    // SAFETY: k + 8U <= the row's length (the caller's contract).
                    *vu = unsafe { _mm512_loadu_si512(row.as_ptr().add(k + 8 * u) as *const _) };
                }
                for r in 0..R {
                    let wr = _mm512_set1_epi64(w[r] as i64);
                    for u in 0..U {
                        lo[r][u] = _mm512_madd52lo_epu64(lo[r][u], v[u], wr);
                        hi[r][u] = _mm512_madd52hi_epu64(hi[r][u], v[u], wr);
                    }
                }
            }
            for r in 0..R {
                for u in 0..U {
                    let f = lanes_redc2(lo[r][u], hi[r][u], t_inv, tt);
                    acc[r][u] = if chunk == 0 {
                        f
                    } else {
                        let s = _mm512_add_epi64(acc[r][u], f);
                        _mm512_min_epu64(s, _mm512_sub_epi64(s, tt))
                    };
                }
            }
        }
        for (out, acc_r) in outs.iter().zip(&acc) {
            for (u, a) in acc_r.iter().enumerate() {
                // SAFETY: k + 8U <= every output's length (the caller's contract).
                unsafe { _mm512_storeu_si512(out.add(k + 8 * u) as *mut _, *a) };
            }
        }
    }

    /// `outs[r][k] = sum_i x_i[k] * w[i R + r] 2^-104 mod t` for `R = outs.len()` outputs
    /// (at most `DOT_ROWS`), inputs below 2^52 and constants `w` below `t` prepared by
    /// [`RowsFold::prescale`].
    ///
    /// # Safety
    /// Needs avx512f and avx512ifma.
    #[target_feature(enable = "avx512f,avx512ifma")]
    pub unsafe fn dot_const_rows(
        outs: &mut [&mut [u64]],
        x: &[&[u64]],
        w: &[u64],
        fold: &RowsFold,
        t: &crate::arith::Modulus,
    ) {
        match outs.len() {
            1 => unsafe { rows_impl::<1>(outs, x, w, fold, t) },
            2 => unsafe { rows_impl::<2>(outs, x, w, fold, t) },
            3 => unsafe { rows_impl::<3>(outs, x, w, fold, t) },
            4 => unsafe { rows_impl::<4>(outs, x, w, fold, t) },
            r => panic!("dot_const_rows: {r} outputs in one pass"),
        }
    }

    #[target_feature(enable = "avx512f,avx512ifma")]
    unsafe fn rows_impl<const R: usize>(
        outs: &mut [&mut [u64]],
        x: &[&[u64]],
        w: &[u64],
        fold: &RowsFold,
        t: &crate::arith::Modulus,
    ) {
        let n = outs[0].len();
        for o in outs.iter() {
            assert_eq!(o.len(), n);
        }
        for row in x {
            assert!(row.len() >= n);
        }
        assert_eq!(w.len(), x.len() * R);
        let tv = t.value();
        assert!(tv > 1 << 12 && tv < 1 << 52);
        let tt = _mm512_set1_epi64(tv as i64);
        let t_inv = _mm512_set1_epi64(fold.t_inv as i64);
        let ptrs: [*mut u64; R] = std::array::from_fn(|r| outs[r].as_mut_ptr());
        let mut k = 0;
        while k + 8 * ROWS_UNROLL <= n {
            // SAFETY: k + 8 ROWS_UNROLL <= n <= every row's and output's length (asserted).
            unsafe { dot_rows_vectors::<R, ROWS_UNROLL>(&ptrs, x, w, k, t_inv, tt) };
            k += 8 * ROWS_UNROLL;
        }
        while k + 8 <= n {
            // SAFETY: as above.
            unsafe { dot_rows_vectors::<R, 1>(&ptrs, x, w, k, t_inv, tt) };
            k += 8;
        }
        for kk in k..n {
            for (r, o) in outs.iter_mut().enumerate() {
                let s: u128 = x
                    .iter()
                    .enumerate()
                    .map(|(j, row)| row[kk] as u128 * w[j * R + r] as u128)
                    .sum();
                o[kk] = t.mul(t.reduce_u128(s), fold.inv104);
            }
        }
    }

    /// Vectors of coefficients per pass in [`dot_const_rows`]: `R x U` lo/hi chains.
    const ROWS_UNROLL: usize = 2;

    /// # Safety
    /// Needs avx512f and avx512ifma; all rows at least `out0.len()` long.
    #[target_feature(enable = "avx512f,avx512ifma")]
    pub unsafe fn dot2(
        out0: &mut [u64],
        out1: &mut [u64],
        x: &[&[u64]],
        b: &[&[u64]],
        a: &[&[u64]],
        t: &crate::arith::Modulus,
    ) {
        let n = out0.len();
        let tv = t.value();
        let k52 = ShoupConst::new(((1u128 << 52) % tv as u128) as u64, t);
        let one = ShoupConst::new(1, t);
        let tt = _mm512_set1_epi64(tv as i64);
        let terms = x.len();
        for row in x.iter().chain(b).chain(a) {
            assert!(row.len() >= n);
        }
        assert!(out1.len() >= n);
        let mut k = 0;
        while k + 8 <= n {
            let zero = _mm512_setzero_si512();
            let (mut lo0, mut hi0, mut lo1, mut hi1) = (zero, zero, zero, zero);
            for j in 0..terms {
                // SAFETY: k + 8 <= n <= every row's length (asserted above).
                unsafe {
                    let v = _mm512_loadu_si512(x[j].as_ptr().add(k) as *const _);
                    let bb = _mm512_loadu_si512(b[j].as_ptr().add(k) as *const _);
                    let aa = _mm512_loadu_si512(a[j].as_ptr().add(k) as *const _);
                    lo0 = _mm512_madd52lo_epu64(lo0, v, bb);
                    hi0 = _mm512_madd52hi_epu64(hi0, v, bb);
                    lo1 = _mm512_madd52lo_epu64(lo1, v, aa);
                    hi1 = _mm512_madd52hi_epu64(hi1, v, aa);
                }
            }
            // SAFETY: as above.
            unsafe {
                _mm512_storeu_si512(
                    out0.as_mut_ptr().add(k) as *mut _,
                    lanes_fold(lo0, hi0, &k52, &one, tt),
                );
                _mm512_storeu_si512(
                    out1.as_mut_ptr().add(k) as *mut _,
                    lanes_fold(lo1, hi1, &k52, &one, tt),
                );
            }
            k += 8;
        }
        for kk in k..n {
            let (mut s0, mut s1) = (0u128, 0u128);
            for j in 0..terms {
                let v = x[j][kk] as u128;
                s0 += v * b[j][kk] as u128;
                s1 += v * a[j][kk] as u128;
            }
            out0[kk] = t.reduce_u128(s0);
            out1[kk] = t.reduce_u128(s1);
        }
    }

    /// Runs `f(dst block, src block)` over whole 8-lane blocks, storing into `dst`; returns
    /// where the scalar tail starts.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn zip_blocks(dst: &mut [u64], src: &[u64], f: impl Fn(__m512i, __m512i) -> __m512i) -> usize {
        let n = dst.len().min(src.len());
        let mut k = 0;
        while k + 8 <= n {
            // SAFETY: k + 8 <= n bounds both slices; unaligned loads and stores.
            unsafe {
                let d = _mm512_loadu_si512(dst.as_ptr().add(k) as *const _);
                let s = _mm512_loadu_si512(src.as_ptr().add(k) as *const _);
                _mm512_storeu_si512(dst.as_mut_ptr().add(k) as *mut _, f(d, s));
            }
            k += 8;
        }
        k
    }

    /// The broadcast constants of `lanes_mul`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn splat(c: &ShoupConst, t: u64) -> (__m512i, __m512i, __m512i) {
        (
            _mm512_set1_epi64(c.w as i64),
            _mm512_set1_epi64(c.w52 as i64),
            _mm512_set1_epi64(t as i64),
        )
    }

    /// # Safety
    /// Needs avx512f and avx512ifma.
    #[target_feature(enable = "avx512f,avx512ifma")]
    pub unsafe fn mul_const(out: &mut [u64], x: &[u64], c: &ShoupConst, t: u64) {
        let (w, w52, tv) = splat(c, t);
        let k = zip_blocks(out, x, |_, v| lanes_mul(v, w, w52, tv));
        for (o, &v) in out[k..].iter_mut().zip(&x[k..]) {
            *o = super::scalar_mul(v, c, t);
        }
    }

    /// # Safety
    /// Needs avx512f and avx512ifma.
    #[target_feature(enable = "avx512f,avx512ifma")]
    pub unsafe fn mul_const_assign(x: &mut [u64], c: &ShoupConst, t: u64) {
        let (w, w52, tv) = splat(c, t);
        let n = x.len();
        let mut k = 0;
        while k + 8 <= n {
            // SAFETY: k + 8 <= n bounds the slice.
            unsafe {
                let p = x.as_mut_ptr().add(k);
                let v = _mm512_loadu_si512(p as *const _);
                _mm512_storeu_si512(p as *mut _, lanes_mul(v, w, w52, tv));
            }
            k += 8;
        }
        for v in x[k..].iter_mut() {
            *v = super::scalar_mul(*v, c, t);
        }
    }

    /// # Safety
    /// Needs avx512f and avx512ifma.
    #[target_feature(enable = "avx512f,avx512ifma")]
    pub unsafe fn mul_const_acc(acc: &mut [u64], x: &[u64], c: &ShoupConst, t: u64) {
        let (w, w52, tv) = splat(c, t);
        let k = zip_blocks(acc, x, |a, v| {
            let s = _mm512_add_epi64(a, lanes_mul(v, w, w52, tv));
            _mm512_min_epu64(s, _mm512_sub_epi64(s, tv))
        });
        for (a, &v) in acc[k..].iter_mut().zip(&x[k..]) {
            let s = *a + super::scalar_mul(v, c, t);
            *a = if s >= t { s - t } else { s };
        }
    }

    /// # Safety
    /// Needs avx512f and avx512ifma.
    #[target_feature(enable = "avx512f,avx512ifma")]
    pub unsafe fn sub_mul_const(y: &mut [u64], sub: &[u64], c: &ShoupConst, t: u64) {
        let (w, w52, tv) = splat(c, t);
        let k = zip_blocks(y, sub, |a, s| {
            lanes_mul(_mm512_sub_epi64(_mm512_add_epi64(a, tv), s), w, w52, tv)
        });
        for (a, &s) in y[k..].iter_mut().zip(&sub[k..]) {
            *a = super::scalar_mul(*a + t - s, c, t);
        }
    }
}

/// The GEMM's row kernel for AVX2 + FMA CPUs without IFMA (AMD Zen 1-3, Intel before Ice
/// Lake), where 64-bit products are otherwise scalar. AVX2 has no 64 x 64-bit multiply, so a
/// sum `S = sum_j x_j w_j` (inputs `x_j < 2^52`, constants `w_j < t < 2^50`) is computed as
/// two exact parts:
/// - `S mod 2^64`, from three 32 x 32-bit products per term (the low 64 bits of `x_j w_j`);
/// - `Q = sum_j q_j` with `q_j = round(x_j * (w_j / t))`, one double-precision FMA per term;
///   each `q_j` is within one of `x_j w_j / t`, so `|S - Q t| <= m t` for `m` terms.
///
/// `S - Q t` is therefore exact in wrapping 64-bit arithmetic for `m < 2^13`, and one more
/// floating-point quotient of that small number reduces it into `[0, t)`.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::ShoupConst;
    use std::arch::x86_64::*;

    /// Terms summed before a reduction: `2 m t < 2^61`.
    const CHUNK: usize = 1024;
    /// Bits of 2^52 as an f64: `bits(2^52 + v) = TWO52 + v` for integers `0 <= v < 2^52`.
    const TWO52: u64 = 0x4330_0000_0000_0000;

    /// 2^52 in every lane: adding it to an integer-valued double in `[0, 2^52)` leaves the
    /// integer in the low mantissa bits (`TWO52 + v`).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn two52() -> __m256d {
        _mm256_castsi256_pd(_mm256_set1_epi64x(TWO52 as i64))
    }

    /// An integer lane `v < 2^52` as an exact f64.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn to_f64(v: __m256i) -> __m256d {
        _mm256_sub_pd(
            _mm256_castsi256_pd(_mm256_or_si256(v, _mm256_castpd_si256(two52()))),
            two52(),
        )
    }

    /// `a * b mod 2^64` from 32-bit halves (`a_hi = a >> 32`, `b_hi = b >> 32`, passed in so
    /// a caller can share them across products): `a_lo b_lo + (a_lo b_hi + a_hi b_lo) 2^32`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn mul_lo(a: __m256i, a_hi: __m256i, b: __m256i, b_hi: __m256i) -> __m256i {
        let cross = _mm256_add_epi64(_mm256_mul_epu32(a, b_hi), _mm256_mul_epu32(a_hi, b));
        _mm256_add_epi64(_mm256_mul_epu32(a, b), _mm256_slli_epi64(cross, 32))
    }

    /// `S mod t` from `S mod 2^64` and `Q` (see the module note) for `m` terms whose
    /// quotients are each within `bias / m` of the exact ones.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn finish(s: __m256i, q_bits: __m256i, m: usize, bias: usize, t: u64) -> __m256i {
        let tv = _mm256_set1_epi64x(t as i64);
        let t_hi = _mm256_set1_epi64x((t >> 32) as i64);
        let q = _mm256_sub_epi64(
            q_bits,
            _mm256_set1_epi64x(TWO52.wrapping_mul(m as u64) as i64),
        );
        // S - Q t, shifted by bias t into [0, 2 bias t].
        let r = _mm256_add_epi64(
            _mm256_sub_epi64(s, mul_lo(q, _mm256_srli_epi64(q, 32), tv, t_hi)),
            _mm256_set1_epi64x((bias as u64 * t) as i64),
        );
        let hi = to_f64(_mm256_srli_epi64(r, 32));
        let lo = to_f64(_mm256_and_si256(r, _mm256_set1_epi64x(0xffff_ffff)));
        let approx = _mm256_fmadd_pd(hi, _mm256_set1_pd(4294967296.0), lo);
        let e = _mm256_fmadd_pd(approx, _mm256_set1_pd(1.0 / t as f64), two52());
        // round(r / t) < 2^13: no high half.
        let k = _mm256_sub_epi64(_mm256_castpd_si256(e), _mm256_castpd_si256(two52()));
        let rem = _mm256_sub_epi64(r, mul_lo(k, _mm256_setzero_si256(), tv, t_hi));
        reduce_signed(rem, t)
    }

    /// `v` in `(-t, 2t)` (signed lanes) into `[0, t)`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn reduce_signed(v: __m256i, t: u64) -> __m256i {
        let tv = _mm256_set1_epi64x(t as i64);
        let neg = _mm256_cmpgt_epi64(_mm256_setzero_si256(), v);
        let v = _mm256_add_epi64(v, _mm256_and_si256(neg, tv));
        let big = _mm256_cmpgt_epi64(v, _mm256_set1_epi64x(t as i64 - 1));
        _mm256_sub_epi64(v, _mm256_and_si256(big, tv))
    }

    /// One pass of at most [`ROWS`] outputs with constants prepared by `RowConsts`
    /// (`[w, w >> 32, bits(w / t)]` per term and output, term-major).
    ///
    /// # Safety
    /// Needs avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_const_rows(
        outs: &mut [&mut [u64]],
        x: &[&[u64]],
        consts: &[[u64; 3]],
        t: &crate::arith::Modulus,
    ) {
        let take = outs.len();
        let n = outs[0].len();
        for o in outs.iter() {
            assert_eq!(o.len(), n);
        }
        for row in x {
            assert!(row.len() >= n);
        }
        assert!((1..=ROWS).contains(&take) && consts.len() == x.len() * take);
        let tv = t.value();
        assert!(tv < 1 << 50);
        // SAFETY: every row and output is at least n long (asserted above).
        unsafe {
            match take {
                1 => rows::<1>(outs, x, consts, tv),
                2 => rows::<2>(outs, x, consts, tv),
                3 => rows::<3>(outs, x, consts, tv),
                _ => rows::<4>(outs, x, consts, tv),
            }
        }
    }

    /// Outputs per pass: each input vector loaded feeds this many outputs.
    pub const ROWS: usize = 4;

    /// One vector of 4 coefficients from `k` for `R` outputs.
    ///
    /// # Safety
    /// Needs avx2 and fma; `k + 4` within every row and output.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows_vector<const R: usize>(
        ptrs: &[*mut u64; R],
        x: &[&[u64]],
        consts: &[[u64; 3]],
        k: usize,
        t: u64,
    ) {
        let two52 = two52();
        let zero = _mm256_setzero_si256();
        let mut total = [zero; R];
        for (chunk_no, (rows, cs)) in x.chunks(CHUNK).zip(consts.chunks(CHUNK * R)).enumerate() {
            let mut s = [zero; R];
            let mut q = [zero; R];
            for (row, w) in rows.iter().zip(cs.chunks_exact(R)) {
                // SAFETY: k + 4 <= the row's length (the caller's contract).
                let v = unsafe { _mm256_loadu_si256(row.as_ptr().add(k) as *const __m256i) };
                let (vd, v_hi) = (to_f64(v), _mm256_srli_epi64(v, 32));
                for r in 0..R {
                    let [wl, wh, wq] = w[r];
                    let (wv, whv) = (_mm256_set1_epi64x(wl as i64), _mm256_set1_epi64x(wh as i64));
                    s[r] = _mm256_add_epi64(s[r], mul_lo(v, v_hi, wv, whv));
                    let e = _mm256_fmadd_pd(vd, _mm256_set1_pd(f64::from_bits(wq)), two52);
                    q[r] = _mm256_add_epi64(q[r], _mm256_castpd_si256(e));
                }
            }
            for r in 0..R {
                let part = finish(s[r], q[r], rows.len(), rows.len(), t);
                total[r] = if chunk_no == 0 {
                    part
                } else {
                    reduce_signed(_mm256_add_epi64(total[r], part), t)
                };
            }
        }
        for (p, v) in ptrs.iter().zip(&total) {
            // SAFETY: k + 4 <= every output's length (the caller's contract).
            unsafe { _mm256_storeu_si256(p.add(k) as *mut __m256i, *v) };
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows<const R: usize>(
        outs: &mut [&mut [u64]],
        x: &[&[u64]],
        consts: &[[u64; 3]],
        t: u64,
    ) {
        let n = outs[0].len();
        let ptrs: [*mut u64; R] = std::array::from_fn(|r| outs[r].as_mut_ptr());
        let mut k = 0;
        // One vector per row visit: two (a whole cache line) measured no faster on packed rows.
        while k + 4 <= n {
            // SAFETY: k + 4 <= n.
            unsafe { rows_vector::<R>(&ptrs, x, consts, k, t) };
            k += 4;
        }
        for kk in k..n {
            for (r, p) in ptrs.iter().enumerate() {
                let s: u128 = x
                    .iter()
                    .zip(consts.chunks_exact(R))
                    .map(|(row, w)| row[kk] as u128 * w[r][0] as u128 % t as u128)
                    .sum();
                // SAFETY: kk < n = every output's length.
                unsafe { *p.add(kk) = (s % t as u128) as u64 };
            }
        }
    }

    /// Two inner products over the same inputs with per-coefficient factors (the key
    /// switching's digits against the two halves of the key), inputs below `2^50` and
    /// factors below `t` (so each `x b / t` is below `2^50`), at most `DOT_MAX_TERMS` terms.
    ///
    /// # Safety
    /// Needs avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot2(
        out0: &mut [u64],
        out1: &mut [u64],
        x: &[&[u64]],
        b: &[&[u64]],
        a: &[&[u64]],
        t: &crate::arith::Modulus,
    ) {
        let n = out0.len();
        let tv = t.value();
        assert!(tv < 1 << 50 && out1.len() >= n && x.len() <= super::DOT_MAX_TERMS);
        for row in x.iter().chain(b).chain(a) {
            assert!(row.len() >= n);
        }
        debug_assert!(b.iter().chain(a).all(|r| r[..n].iter().all(|&v| v < tv)));
        let m = x.len();
        let two52 = two52();
        let tinv = _mm256_set1_pd(1.0 / tv as f64);
        let mut k = 0;
        while k + 4 <= n {
            let zero = _mm256_setzero_si256();
            let (mut s0, mut q0, mut s1, mut q1) = (zero, zero, zero, zero);
            for j in 0..m {
                // SAFETY: k + 4 <= n <= every row's length (asserted above).
                let (v, bb, aa) = unsafe {
                    (
                        _mm256_loadu_si256(x[j].as_ptr().add(k) as *const __m256i),
                        _mm256_loadu_si256(b[j].as_ptr().add(k) as *const __m256i),
                        _mm256_loadu_si256(a[j].as_ptr().add(k) as *const __m256i),
                    )
                };
                let (vd, v_hi) = (to_f64(v), _mm256_srli_epi64(v, 32));
                for (key, s, q) in [(bb, &mut s0, &mut q0), (aa, &mut s1, &mut q1)] {
                    let key_hi = _mm256_srli_epi64(key, 32);
                    *s = _mm256_add_epi64(*s, mul_lo(v, v_hi, key, key_hi));
                    // key / t rounded twice: each quotient is within 3/4 of the exact one.
                    let kq = _mm256_mul_pd(to_f64(key), tinv);
                    *q = _mm256_add_epi64(*q, _mm256_castpd_si256(_mm256_fmadd_pd(vd, kq, two52)));
                }
            }
            // SAFETY: k + 4 <= n <= both outputs' lengths.
            unsafe {
                _mm256_storeu_si256(
                    out0.as_mut_ptr().add(k) as *mut __m256i,
                    finish(s0, q0, m, m, tv),
                );
                _mm256_storeu_si256(
                    out1.as_mut_ptr().add(k) as *mut __m256i,
                    finish(s1, q1, m, m, tv),
                );
            }
            k += 4;
        }
        super::dot2_portable(out0, out1, x, b, a, t, k);
    }

    /// `x w - q t` for `q = round(x * wq)`, `wq ~ w / t` (relative error below 2^-51), as an
    /// exact double in `[-t, t]`: inputs `x < 2^52` and `w < t < 2^50` as exact doubles. Both
    /// products are split exactly by FMA (`x w = h + l`); `h - q t` cancels exactly since
    /// the two are within a factor two of each other (or both exact below 2^53).
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn mul_rem(x: __m256d, w: __m256d, wq: __m256d, t: __m256d) -> __m256d {
        let two52 = two52();
        let h = _mm256_mul_pd(x, w);
        let l = _mm256_fmsub_pd(x, w, h);
        let q = _mm256_sub_pd(_mm256_fmadd_pd(x, wq, two52), two52);
        let hq = _mm256_mul_pd(q, t);
        let lq = _mm256_fmsub_pd(q, t, hq);
        _mm256_add_pd(_mm256_sub_pd(h, hq), _mm256_sub_pd(l, lq))
    }

    /// An exact integer-valued double in `[-t, 2t)` as a residue lane in `[0, t)`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn to_residue(r: __m256d, t: u64) -> __m256i {
        let td = _mm256_set1_pd(t as f64);
        let neg = _mm256_cmp_pd(r, _mm256_setzero_pd(), _CMP_LT_OQ);
        let r = _mm256_add_pd(r, _mm256_and_pd(neg, td));
        let big = _mm256_cmp_pd(r, td, _CMP_GE_OQ);
        let r = _mm256_sub_pd(r, _mm256_and_pd(big, td));
        let two52 = two52();
        _mm256_sub_epi64(
            _mm256_castpd_si256(_mm256_add_pd(r, two52)),
            _mm256_castpd_si256(two52),
        )
    }

    /// Applies `f(lane) -> residue` to 4-lane blocks, the tail one lane at a time.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn const_map(
        n: usize,
        w: u64,
        t: u64,
        mut f: impl FnMut(usize, __m256d, __m256d, __m256d),
        mut tail: impl FnMut(usize),
    ) {
        let wd = _mm256_set1_pd(w as f64);
        let wq = _mm256_set1_pd(w as f64 / t as f64);
        let td = _mm256_set1_pd(t as f64);
        let mut k = 0;
        while k + 4 <= n {
            f(k, wd, wq, td);
            k += 4;
        }
        for kk in k..n {
            tail(kk);
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load(p: *const u64) -> __m256i {
        // SAFETY: the caller's contract: 4 readable lanes.
        unsafe { _mm256_loadu_si256(p as *const __m256i) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn store(p: *mut u64, v: __m256i) {
        // SAFETY: the caller's contract: 4 writable lanes.
        unsafe { _mm256_storeu_si256(p as *mut __m256i, v) }
    }

    /// # Safety
    /// Needs avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn mul_const(out: &mut [u64], x: &[u64], c: &ShoupConst, t: u64) {
        assert!(x.len() >= out.len());
        // SAFETY: n = out.len() lanes readable from x and writable to out.
        unsafe { mul_const_ptr(out.as_mut_ptr(), x.as_ptr(), out.len(), c, t) }
    }

    /// # Safety
    /// Needs avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn mul_const_assign(x: &mut [u64], c: &ShoupConst, t: u64) {
        let p = x.as_mut_ptr();
        // SAFETY: reading and writing the same lanes in place.
        unsafe { mul_const_ptr(p, p, x.len(), c, t) }
    }

    /// `out = x w mod t` over `n` lanes (`out` may be `x`).
    ///
    /// # Safety
    /// Needs avx2 and fma; `n` lanes readable at `x` and writable at `out`.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn mul_const_ptr(out: *mut u64, x: *const u64, n: usize, c: &ShoupConst, t: u64) {
        assert!(t < 1 << 50);
        const_map(
            n,
            c.w,
            t,
            // SAFETY: k + 4 <= n (the caller's contract).
            |k, w, wq, td| unsafe {
                store(
                    out.add(k),
                    to_residue(mul_rem(to_f64(load(x.add(k))), w, wq, td), t),
                )
            },
            // SAFETY: kk < n.
            |kk| unsafe { *out.add(kk) = super::scalar_mul(*x.add(kk), c, t) },
        );
    }

    /// `acc + x w mod t` for `acc < t`.
    ///
    /// # Safety
    /// Needs avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn mul_const_acc(acc: &mut [u64], x: &[u64], c: &ShoupConst, t: u64) {
        let n = acc.len();
        assert!(x.len() >= n && t < 1 << 50);
        let (pa, px) = (acc.as_mut_ptr(), x.as_ptr());
        const_map(
            n,
            c.w,
            t,
            // SAFETY: k + 4 <= n <= both lengths.
            |k, w, wq, td| unsafe {
                let r = mul_rem(to_f64(load(px.add(k))), w, wq, td);
                let s = _mm256_add_pd(r, to_f64(load(pa.add(k))));
                store(pa.add(k), to_residue(s, t))
            },
            // SAFETY: kk < n.
            |kk| unsafe {
                let s = *pa.add(kk) + super::scalar_mul(*px.add(kk), c, t);
                *pa.add(kk) = if s >= t { s - t } else { s };
            },
        );
    }

    /// `(y - sub) w mod t` for `y, sub < t`.
    ///
    /// # Safety
    /// Needs avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn sub_mul_const(y: &mut [u64], sub: &[u64], c: &ShoupConst, t: u64) {
        let n = y.len();
        assert!(sub.len() >= n && t < 1 << 50);
        let (py, ps) = (y.as_mut_ptr(), sub.as_ptr());
        const_map(
            n,
            c.w,
            t,
            // SAFETY: k + 4 <= n <= both lengths.
            |k, w, wq, td| unsafe {
                // y - sub in (-t, t) is exact as a double; w (y - sub) has the same residue.
                let d = _mm256_sub_pd(to_f64(load(py.add(k))), to_f64(load(ps.add(k))));
                let d = _mm256_add_pd(d, td);
                store(py.add(k), to_residue(mul_rem(d, w, wq, td), t))
            },
            // SAFETY: kk < n.
            |kk| unsafe { *py.add(kk) = super::scalar_mul(*py.add(kk) + t - *ps.add(kk), c, t) },
        );
    }

    /// The tensor product of two degree-1 ciphertexts on one row (see `super::tensor`),
    /// all inputs residues below `t`.
    ///
    /// # Safety
    /// Needs avx2 and fma.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn tensor(
        d: [&mut [u64]; 3],
        a: [&[u64]; 2],
        b: Option<[&[u64]; 2]>,
        t: &crate::arith::Modulus,
    ) {
        let tv = t.value();
        let [d0, d1, d2] = d;
        let n = d0.len();
        let [a0, a1] = a;
        let (b0, b1, square) = match b {
            Some([b0, b1]) => (b0, b1, false),
            None => (a0, a1, true),
        };
        assert!(tv < 1 << 50 && d1.len() == n && d2.len() == n);
        for row in [a0, a1, b0, b1] {
            assert!(row.len() >= n);
        }
        let td = _mm256_set1_pd(tv as f64);
        let tinv = _mm256_set1_pd(1.0 / tv as f64);
        let mut k = 0;
        while k + 4 <= n {
            // SAFETY: k + 4 <= n <= every row's length (asserted above).
            let (x0, x1, y0, y1) = unsafe {
                (
                    to_f64(load(a0.as_ptr().add(k))),
                    to_f64(load(a1.as_ptr().add(k))),
                    to_f64(load(b0.as_ptr().add(k))),
                    to_f64(load(b1.as_ptr().add(k))),
                )
            };
            // y / t rounded twice: relative error below 2^-51.
            let (q0, q1) = (_mm256_mul_pd(y0, tinv), _mm256_mul_pd(y1, tinv));
            let r0 = mul_rem(x0, y0, q0, td);
            let r2 = mul_rem(x1, y1, q1, td);
            let r1 = if square {
                mul_rem(_mm256_add_pd(x0, x0), y1, q1, td)
            } else {
                _mm256_add_pd(mul_rem(x0, y1, q1, td), mul_rem(x1, y0, q0, td))
            };
            // r1 in [-2t, 2t]: one more quotient brings it into [-t, t].
            let k1 = _mm256_round_pd(
                _mm256_mul_pd(r1, tinv),
                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC,
            );
            let r1 = _mm256_fnmadd_pd(k1, td, r1);
            // SAFETY: k + 4 <= n = every output's length.
            unsafe {
                store(d0.as_mut_ptr().add(k), to_residue(r0, tv));
                store(d1.as_mut_ptr().add(k), to_residue(r1, tv));
                store(d2.as_mut_ptr().add(k), to_residue(r2, tv));
            }
            k += 4;
        }
        let b = (!square).then_some([b0, b1]);
        super::tensor_portable([d0, d1, d2], [a0, a1], b, t, k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arith::ntt_primes_below;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn tensor_matches_u128(bits in 20u32..=50, len in 1usize..40, seed in any::<u64>()) {
            let t = Modulus::new(ntt_primes_below(bits, 16, 1, &[]).unwrap()[0]).unwrap();
            let tv = t.value() as u128;
            let mut state = seed;
            let mut row = || -> Vec<u64> { (0..len).map(|_| { state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); (state >> 14) % t.value() }).collect() };
            let (a0, a1, b0, b1) = (row(), row(), row(), row());
            let (mut d0, mut d1, mut d2) = (vec![0u64; len], vec![0u64; len], vec![0u64; len]);
            tensor([&mut d0, &mut d1, &mut d2], [&a0, &a1], Some([&b0, &b1]), &t);
            for k in 0..len {
                let (x0, x1, y0, y1) = (a0[k] as u128, a1[k] as u128, b0[k] as u128, b1[k] as u128);
                prop_assert_eq!(d0[k] as u128, x0 * y0 % tv);
                prop_assert_eq!(d1[k] as u128, (x0 * y1 + x1 * y0) % tv);
                prop_assert_eq!(d2[k] as u128, x1 * y1 % tv);
            }
            tensor([&mut d0, &mut d1, &mut d2], [&a0, &a1], None, &t);
            for k in 0..len {
                let (x0, x1) = (a0[k] as u128, a1[k] as u128);
                prop_assert_eq!(d0[k] as u128, x0 * x0 % tv);
                prop_assert_eq!(d1[k] as u128, 2 * x0 * x1 % tv);
                prop_assert_eq!(d2[k] as u128, x1 * x1 % tv);
            }
        }

        #[test]
        fn dot2_matches_u128(bits in 20u32..=50, terms in 1usize..=2 * DOT_MAX_TERMS + 3, len in 1usize..40, seed in any::<u64>()) {
            let t = Modulus::new(ntt_primes_below(bits, 16, 1, &[]).unwrap()[0]).unwrap();
            let mut state = seed;
            let mut next = || { state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); state >> 14 };
            // Inputs below 2^50, the worst case for the lazy sums; key factors reduced.
            let mk = |next: &mut dyn FnMut() -> u64, below: u64| -> Vec<Vec<u64>> { (0..terms).map(|_| (0..len).map(|_| next() % below).collect()).collect() };
            let (x, b, a) = (mk(&mut next, 1 << 50), mk(&mut next, t.value()), mk(&mut next, t.value()));
            fn r(v: &[Vec<u64>]) -> Vec<&[u64]> {
                v.iter().map(|r| r.as_slice()).collect()
            }
            let (mut o0, mut o1) = (vec![0u64; len], vec![0u64; len]);
            dot2(&mut o0, &mut o1, &r(&x), &r(&b), &r(&a), &t);
            for k in 0..len {
                let s0: u128 = (0..terms).map(|j| x[j][k] as u128 * b[j][k] as u128 % t.value() as u128).sum();
                let s1: u128 = (0..terms).map(|j| x[j][k] as u128 * a[j][k] as u128 % t.value() as u128).sum();
                prop_assert_eq!(o0[k] as u128, s0 % t.value() as u128);
                prop_assert_eq!(o1[k] as u128, s1 % t.value() as u128);
            }
        }
    }

    /// A deterministic stream of test words.
    #[cfg(target_arch = "x86_64")]
    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    /// The AVX2 kernel on its own (IFMA machines never dispatch to it): inputs up to 2^52
    /// (the contract of `dot_const`), 50-bit and smaller primes, term counts across its
    /// reduction chunk, lengths covering the vector body and the tail.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_rows_match_u128() {
        if !has_avx2_fma() {
            return;
        }
        let mut next = xorshift(0x2545_f491_4f6c_dd1du64);
        for (bits, outputs, terms, len, xbits) in [
            (50, 4, 3, 9, 52),
            (50, 5, 1030, 7, 52),
            (50, 1, 2049, 5, 50),
            (40, 3, 300, 13, 40),
            (20, 2, 17, 4, 52),
            (50, 9, 64, 8, 52),
            (50, 2, 5, 11, 50),
            (30, 1, 16, 6, 50),
        ] {
            let t = Modulus::new(ntt_primes_below(bits, 16, 1, &[]).unwrap()[0]).unwrap();
            let tv = t.value() as u128;
            let x: Vec<Vec<u64>> = (0..terms)
                .map(|j| {
                    (0..len)
                        .map(|k| match (j + k) % 5 {
                            0 => (1u64 << xbits) - 1,
                            1 => 0,
                            _ => next() >> (64 - xbits),
                        })
                        .collect()
                })
                .collect();
            let c: Vec<ShoupConst> = (0..terms * outputs)
                .map(|i| {
                    ShoupConst::new(
                        if i % 7 == 0 {
                            t.value() - 1
                        } else {
                            next() % t.value()
                        },
                        &t,
                    )
                })
                .collect();
            let rows: Vec<&[u64]> = x.iter().map(|r| r.as_slice()).collect();
            let mut outs = vec![vec![0u64; len]; outputs];
            let mut refs: Vec<&mut [u64]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            for (refs, part) in refs
                .chunks_mut(avx2::ROWS)
                .zip(avx2_passes(&c, outputs, &t))
            {
                // SAFETY: the CPU supports avx2 + fma (checked above).
                unsafe { avx2::dot_const_rows(refs, &rows, &part, &t) };
            }
            for (r, o) in outs.iter().enumerate() {
                for k in 0..len {
                    let s: u128 = (0..terms)
                        .map(|j| x[j][k] as u128 * c[j * outputs + r].w as u128 % tv)
                        .sum();
                    assert_eq!(
                        o[k] as u128,
                        s % tv,
                        "{bits}-bit prime, {terms} terms, output {r}, k {k}"
                    );
                }
            }
            // The key-switching product: inputs below 2^50, factors below t.
            let m = terms.min(DOT_MAX_TERMS);
            let key = |off: usize| -> Vec<Vec<u64>> {
                (0..m)
                    .map(|j| {
                        (0..len)
                            .map(|k| c[(j * len + k + off) % c.len()].w)
                            .collect()
                    })
                    .collect()
            };
            let (b, a) = (key(0), key(1));
            let xs: Vec<&[u64]> = x[..m].iter().map(|r| r.as_slice()).collect();
            let b_rows: Vec<&[u64]> = b.iter().map(|r| r.as_slice()).collect();
            let a_rows: Vec<&[u64]> = a.iter().map(|r| r.as_slice()).collect();
            let (mut o0, mut o1) = (vec![0u64; len], vec![0u64; len]);
            if xbits <= 50 {
                // SAFETY: as above.
                unsafe { avx2::dot2(&mut o0, &mut o1, &xs, &b_rows, &a_rows, &t) };
                for k in 0..len {
                    let s0: u128 = (0..m).map(|j| x[j][k] as u128 * b[j][k] as u128 % tv).sum();
                    let s1: u128 = (0..m).map(|j| x[j][k] as u128 * a[j][k] as u128 % tv).sum();
                    assert_eq!((o0[k] as u128, o1[k] as u128), (s0 % tv, s1 % tv));
                }
            }
        }
    }

    /// The AVX2 single-product kernels on their own (IFMA machines never dispatch to them),
    /// at the edges: inputs 0 and 2^52 - 1, constants 0 and t - 1, 4-lane bodies and tails.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn avx2_products_match_u128() {
        if !has_avx2_fma() {
            return;
        }
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15u64);
        for bits in [20, 36, 40, 49, 50] {
            let t = Modulus::new(ntt_primes_below(bits, 16, 1, &[]).unwrap()[0]).unwrap();
            let tv = t.value();
            let m = |a: u128, b: u128| (a * b % tv as u128) as u64;
            for w in [0, 1, tv - 1, next() % tv] {
                let c = ShoupConst::new(w, &t);
                let len = 4 + (next() % 9) as usize;
                let edge = |k: usize, v: u64, max: u64| match k % 4 {
                    0 => 0,
                    1 => max - 1,
                    _ => v % max,
                };
                let x: Vec<u64> = (0..len).map(|k| edge(k, next(), 1 << 52)).collect();
                let r1: Vec<u64> = (0..len).map(|k| edge(k + 1, next(), tv)).collect();
                let r2: Vec<u64> = (0..len).map(|k| edge(k + 2, next(), tv)).collect();
                let r3: Vec<u64> = (0..len).map(|k| edge(k + 3, next(), tv)).collect();
                let want: Vec<u64> = x.iter().map(|&v| m(v as u128, w as u128)).collect();
                let mut out = vec![0; len];
                let mut inplace = x.clone();
                let mut acc = r1.clone();
                let mut y = r1.clone();
                // SAFETY: the CPU supports avx2 + fma (checked above).
                unsafe {
                    avx2::mul_const(&mut out, &x, &c, tv);
                    avx2::mul_const_assign(&mut inplace, &c, tv);
                    avx2::mul_const_acc(&mut acc, &x, &c, tv);
                    avx2::sub_mul_const(&mut y, &r2, &c, tv);
                }
                assert_eq!(out, want, "{bits} bits, w {w}");
                assert_eq!(inplace, want);
                let want_acc: Vec<u64> = r1.iter().zip(&want).map(|(a, b)| (a + b) % tv).collect();
                assert_eq!(acc, want_acc);
                let want_y: Vec<u64> = r1
                    .iter()
                    .zip(&r2)
                    .map(|(a, b)| m((a + tv - b) as u128, w as u128))
                    .collect();
                assert_eq!(y, want_y);
                let (mut d0, mut d1, mut d2) = (vec![0; len], vec![0; len], vec![0; len]);
                for square in [false, true] {
                    let b = (!square).then_some([r3.as_slice(), r1.as_slice()]);
                    // SAFETY: as above.
                    unsafe { avx2::tensor([&mut d0, &mut d1, &mut d2], [&r1, &r2], b, &t) };
                    let [y0, y1] = b.unwrap_or([r1.as_slice(), r2.as_slice()]);
                    for k in 0..len {
                        let (a0, a1) = (r1[k] as u128, r2[k] as u128);
                        let (b0, b1) = (y0[k] as u128, y1[k] as u128);
                        assert_eq!(d0[k], m(a0, b0));
                        assert_eq!(d1[k], ((a0 * b1 + a1 * b0) % tv as u128) as u64);
                        assert_eq!(d2[k], m(a1, b1));
                    }
                }
            }
        }
    }

    /// The lazy sums' worst case: every input 2^50 - 1 and every constant t - 1 for the
    /// largest prime below 2^50, over several folds and a partial one (the fold bounds).
    #[test]
    fn dot_const_rows_largest_terms() {
        let t = Modulus::new(ntt_primes_below(50, 16, 1, &[]).unwrap()[0]).unwrap();
        let tv = t.value() as u128;
        let terms = 2 * ROWS_FOLD_TERMS + 5;
        let len = 37;
        let x = vec![(1u64 << 50) - 1; len];
        let rows: Vec<&[u64]> = (0..terms).map(|_| x.as_slice()).collect();
        for outputs in [1, DOT_ROWS] {
            let c = vec![ShoupConst::new(t.value() - 1, &t); terms * outputs];
            let mut outs = vec![vec![0u64; len]; outputs];
            let mut refs: Vec<&mut [u64]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            dot_const_rows(&mut refs, &rows, &c, &t);
            let one = x[0] as u128 % tv * (tv - 1) % tv;
            let want = (one * terms as u128 % tv) as u64;
            for o in &outs {
                assert!(o.iter().all(|&v| v == want), "{:?} vs {want}", &o[..4]);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Every output count (several passes of DOT_ROWS and a remainder), term counts across
        /// the lazy-fold boundaries, lengths covering the 16- and 8-wide bodies and the tail,
        /// inputs up to 2^50 (the lazy sums' worst case).
        #[test]
        fn dot_const_rows_matches_u128(bits in 20u32..=50, outputs in 1usize..=2 * DOT_ROWS + 1, terms in prop_oneof![1usize..=300, ROWS_FOLD_TERMS - 2..=ROWS_FOLD_TERMS + 3], len in 1usize..60, seed in any::<u64>()) {
            let t = Modulus::new(ntt_primes_below(bits, 16, 1, &[]).unwrap()[0]).unwrap();
            let tv = t.value() as u128;
            let mut state = seed;
            let mut next = || { state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407); state >> 14 };
            let x: Vec<Vec<u64>> = (0..terms).map(|_| (0..len).map(|_| next() & ((1u64 << 50) - 1)).collect()).collect();
            let c: Vec<ShoupConst> = (0..terms * outputs).map(|_| ShoupConst::new(next() % t.value(), &t)).collect();
            let rows: Vec<&[u64]> = x.iter().map(|r| r.as_slice()).collect();
            let mut outs = vec![vec![0u64; len]; outputs];
            let mut refs: Vec<&mut [u64]> = outs.iter_mut().map(|o| o.as_mut_slice()).collect();
            dot_const_rows(&mut refs, &rows, &c, &t);
            for (r, o) in outs.iter().enumerate() {
                for k in 0..len {
                    let s: u128 = (0..terms).map(|j| x[j][k] as u128 * c[j * outputs + r].w as u128 % tv).sum();
                    prop_assert_eq!(o[k] as u128, s % tv);
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn kernels_match_u128(bits in 20u32..=50, w in any::<u64>(), xs in proptest::collection::vec(any::<u64>(), 1..40)) {
            let t = Modulus::new(ntt_primes_below(bits, 16, 1, &[]).unwrap()[0]).unwrap();
            let tv = t.value();
            let w = w % tv;
            let c = ShoupConst::new(w, &t);
            // Inputs below 2^52, not necessarily below t.
            let x: Vec<u64> = xs.iter().map(|v| v & ((1u64 << 52) - 1)).collect();
            let want: Vec<u64> = x.iter().map(|&v| ((v as u128 * w as u128) % tv as u128) as u64).collect();
            let mut out = vec![0u64; x.len()];
            mul_const(&mut out, &x, &c, &t);
            prop_assert_eq!(&out, &want);
            let mut dotted = vec![0u64; x.len()];
            let masked: Vec<u64> = x.iter().map(|v| v & ((1u64 << 50) - 1)).collect();
            let c2 = ShoupConst::new((w / 3 + 1) % tv, &t);
            // 37 terms: three chunks of lazy sums.
            let rows: Vec<&[u64]> = (0..37).map(|_| masked.as_slice()).collect();
            let consts: Vec<ShoupConst> = (0..37).map(|i| if i % 2 == 0 { c } else { c2 }).collect();
            dot_const(&mut dotted, &rows, &consts, &t);
            for (k, &v) in masked.iter().enumerate() {
                let want = (19 * v as u128 * w as u128 + 18 * v as u128 * c2.w as u128) % tv as u128;
                prop_assert_eq!(dotted[k] as u128, want);
            }
            let mut inplace = x.clone();
            mul_const_assign(&mut inplace, &c, &t);
            prop_assert_eq!(&inplace, &want);
            // The portable path (what wasm32 runs) agrees too.
            let portable: Vec<u64> = x.iter().map(|&v| scalar_mul(v, &c, tv)).collect();
            prop_assert_eq!(&portable, &want);
            let mut acc: Vec<u64> = xs.iter().map(|v| (v >> 7) % tv).collect();
            let want_acc: Vec<u64> = acc.iter().zip(&want).map(|(a, b)| (a + b) % tv).collect();
            mul_const_acc(&mut acc, &x, &c, &t);
            prop_assert_eq!(&acc, &want_acc);
            let mut y: Vec<u64> = xs.iter().map(|v| v % tv).collect();
            let s: Vec<u64> = xs.iter().map(|v| (v >> 3) % tv).collect();
            let want_y: Vec<u64> = y.iter().zip(&s).map(|(a, b)| (((a + tv - b) as u128 * w as u128) % tv as u128) as u64).collect();
            sub_mul_const(&mut y, &s, &c, &t);
            prop_assert_eq!(&y, &want_y);
        }
    }
}
