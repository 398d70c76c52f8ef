//! Factored linear maps: a fast convolution (Winograd's minimal filtering) over ciphertexts.
//!
//! A 3x3 convolution computing a 2x2 block of outputs reads a 4x4 patch per input channel:
//! 36 multiply-adds per (input, output) channel pair directly, 16 in Winograd's F(2x2, 3x3)
//! form - the patch transformed by additions (`B`), 16 products per pair (`U`, the
//! transformed filters), the block recovered by additions (`A`). Over ciphertexts every
//! product is a modular multiply-add per residue, so the form cuts the GEMM's work about 2x
//! where the channels are many. The products are kept at a scale of only `2^u_bits` above
//! the inputs' so that a per-output factor (an element-wise activation's `sqrt|a|`, which
//! differs between the four outputs that share the products) can still be applied before
//! the one rescale: the weights' precision is split between the two.

use crate::arith::kernels::{self, RowConsts};
use crate::arith::ShoupConst;
use crate::error::{Error, Result};
use crate::ring::RnsPoly;
use crate::scheme::evaluator::{encode_weight, same_scale, GEMM_BLOCK_BYTES, PACK_PAD};
use crate::scheme::{Ciphertext, Evaluator};

/// `out[o][j] = f[o][j] * sum_k A[j][k] * sum_c U[k][o][c] * sum_i B[k][i] * x[c][i]`: input
/// channels `c` each give a patch of `p` values `x[c][i]`, transformed to `t` values by the
/// small integers `B`; `t` GEMMs over the channels with the weights `U`; each output channel's
/// `m` outputs are small-integer combinations (`A`) of its `t` products, times a factor `f`.
#[derive(Debug, Clone, Copy)]
pub struct FactoredMap<'a> {
    /// `t x p`, row-major.
    pub b: &'a [i8],
    /// `m x t`, row-major.
    pub a: &'a [i8],
    pub t: usize,
    pub p: usize,
    pub m: usize,
    /// `ci x p`: per input channel and patch entry, the input's index and whether it enters
    /// negated, or `None` for a zero (padding).
    pub patch: &'a [Option<(u32, bool)>],
    /// `t x co x ci` (k-major, then output, then input channel).
    pub u: &'a [f64],
    /// The products are encoded at (inputs' scale) x 2^u_bits: `U` keeps `u_bits` bits of
    /// fraction, `f` the rest of `log2(target_scale / inputs' scale)`.
    pub u_bits: i32,
    /// `co x m`: each output's factor, `None` for an output not wanted (outside the map).
    pub f: &'a [Option<f64>],
    pub level: usize,
    pub target_scale: f64,
}

impl FactoredMap<'_> {
    pub fn channels_in(&self) -> usize {
        self.patch.len() / self.p.max(1)
    }
    pub fn channels_out(&self) -> usize {
        self.f.len() / self.m.max(1)
    }
}

/// Largest integer a product weight may round to: the lazy sums of the kernels need inputs
/// below 2^50 and constants reduced, which any `i64` is.
const MAX_U_INT: f64 = 9.0e18;

/// A map's product weights `U` in the GEMM kernels' form, per prime and transform index.
/// They are the same for every block of a layer; preparing them (a division per weight and
/// prime) once per layer instead of once per block saves that work on every block after the
/// first (conv2 at full CIFAR-10 width: 393,216 weights x 6 primes).
pub struct FactoredWeights {
    t: usize,
    ci: usize,
    co: usize,
    level: usize,
    u_bits: i32,
    /// `[level][k]`.
    consts: Vec<Vec<RowConsts>>,
}

/// Bits of headroom the lazy sums of the transforms need: a row's sum of `|coefficients|`,
/// plus one, is below `2^bits`.
struct TransformBits {
    b: u32,
    a: u32,
}

/// The shape checks both entry points share.
fn check_map(map: &FactoredMap<'_>) -> Result<TransformBits> {
    let bad = |what: String| Err(Error::InvalidArgument(what));
    let (t, p, m) = (map.t, map.p, map.m);
    if t == 0 || p == 0 || m == 0 || map.b.len() != t * p || map.a.len() != m * t {
        return bad(format!(
            "transforms of {t} x {p} and {m} x {t} do not match"
        ));
    }
    if !map.patch.len().is_multiple_of(p) || !map.f.len().is_multiple_of(m) {
        return bad("patch or factor count is not a multiple of the block".into());
    }
    // The lazy sums below hold at most (sum of |coefficients|) x q < 2^64.
    let widest = |mat: &[i8], cols: usize| {
        mat.chunks(cols)
            .map(|r| r.iter().map(|x| x.unsigned_abs() as u32).sum::<u32>())
            .max()
            .unwrap_or(0)
    };
    let (wb, wa) = (widest(map.b, p), widest(map.a, t));
    if wb > 1024 || wa > 1024 {
        return bad("transform coefficients too large".into());
    }
    let (ci, co) = (map.channels_in(), map.channels_out());
    if map.u.len() != t * co * ci {
        return bad(format!("{} weights for {t} x {co} x {ci}", map.u.len()));
    }
    // Sums below (widest + 1) q < 2^bits q.
    Ok(TransformBits {
        b: 32 - wb.leading_zeros(),
        a: 32 - wa.leading_zeros(),
    })
}

impl Evaluator {
    /// `map`'s product weights prepared for [`Evaluator::factored_combinations_prepared`]:
    /// once per layer, for all its blocks.
    pub fn prepare_factored(&self, map: &FactoredMap<'_>) -> Result<FactoredWeights> {
        check_map(map)?;
        let params = self.params();
        if map.level > params.max_level() {
            return Err(Error::LevelMismatch(map.level, params.max_level()));
        }
        let (t, ci, co) = (map.t, map.channels_in(), map.channels_out());
        let u_unit = 2f64.powi(map.u_bits);
        let u_int: Vec<i64> = map
            .u
            .iter()
            .map(|&w| encode_weight(w, u_unit, MAX_U_INT).map(|v| v as i64))
            .collect::<Result<_>>()?;
        let ring = params.ring();
        let mut c: Vec<ShoupConst> = Vec::with_capacity(ci * co);
        let consts = (0..=map.level)
            .map(|level| {
                let q = ring.modulus(level);
                // Per transform index, term-major (input channel, then output).
                (0..t)
                    .map(|k| {
                        c.clear();
                        for ch in 0..ci {
                            for o in 0..co {
                                let w = u_int[(k * co + o) * ci + ch];
                                c.push(ShoupConst::new(q.reduce_i64(w), q));
                            }
                        }
                        RowConsts::new(&c, co, q)
                    })
                    .collect()
            })
            .collect();
        Ok(FactoredWeights {
            t,
            ci,
            co,
            level: map.level,
            u_bits: map.u_bits,
            consts,
        })
    }

    /// The outputs of `map` over `inputs` (degree 1, one scale, at `map.level` or above), at
    /// `map.level` and `map.target_scale`; `None` where `map.f` is `None`. Equal, residue for
    /// residue, to [`Evaluator::linear_combination`] with the integer weights
    /// `round(f * target / (scale 2^u_bits)) * sum_k A[j][k] round(U[k][o][c] 2^u_bits) B[k][i]`.
    /// Prepares the weights on every call: for many blocks of one map, prepare them once
    /// ([`Evaluator::prepare_factored`]) and call [`Evaluator::factored_combinations_prepared`].
    pub fn factored_combinations(
        &self,
        inputs: &[&Ciphertext],
        map: &FactoredMap<'_>,
    ) -> Result<Vec<Option<Ciphertext>>> {
        let weights = self.prepare_factored(map)?;
        self.factored_combinations_prepared(inputs, map, &weights)
    }

    /// [`Evaluator::factored_combinations`] with the weights prepared from this `map`'s `u`
    /// (same shape, level and `u_bits`, checked; the values themselves are the caller's
    /// promise).
    pub fn factored_combinations_prepared(
        &self,
        inputs: &[&Ciphertext],
        map: &FactoredMap<'_>,
        weights: &FactoredWeights,
    ) -> Result<Vec<Option<Ciphertext>>> {
        let bad = |what: String| Err(Error::InvalidArgument(what));
        let bits = check_map(map)?;
        let (t, p, m) = (map.t, map.p, map.m);
        let (ci, co) = (map.channels_in(), map.channels_out());
        let w = weights;
        if (w.t, w.ci, w.co, w.level, w.u_bits) != (t, ci, co, map.level, map.u_bits) {
            return bad(format!(
                "weights prepared for {} x {} x {} at level {} with {} bits, the map is {t} x {co} x {ci} at level {} with {}",
                w.t, w.co, w.ci, w.level, w.u_bits, map.level, map.u_bits
            ));
        }
        let mut scale = None;
        for &(i, _) in map.patch.iter().flatten() {
            let ct = inputs.get(i as usize).ok_or_else(|| {
                Error::InvalidArgument(format!("patch refers to input {i} of {}", inputs.len()))
            })?;
            self.check(ct)?;
            if ct.degree() != 1 {
                return Err(Error::WrongDegree(ct.degree(), 1));
            }
            if ct.level < map.level {
                return Err(Error::LevelMismatch(ct.level, map.level));
            }
            match scale {
                None => scale = Some(ct.scale),
                Some(s) if !same_scale(s, ct.scale) => {
                    return bad("factored map over inputs of different scales".into())
                }
                _ => {}
            }
        }
        let Some(in_scale) = scale else {
            return bad("factored map over no inputs".into());
        };
        let params = self.params();
        let f_unit = map.target_scale / (in_scale * 2f64.powi(map.u_bits));
        let limit = self.weight_limit(map.level);
        let f_int: Vec<Option<i128>> = map
            .f
            .iter()
            .map(|f| f.map(|f| encode_weight(f, f_unit, limit)).transpose())
            .collect::<Result<_>>()?;

        let n = params.n();
        let ring = params.ring();
        let mut out: Vec<Option<[RnsPoly; 2]>> = f_int
            .iter()
            .map(|f| {
                f.map(|_| {
                    [
                        RnsPoly::for_overwrite(n, map.level + 1),
                        RnsPoly::for_overwrite(n, map.level + 1),
                    ]
                })
            })
            .collect();
        // Coefficient blocks small enough that one transform index's inputs (ci rows) and
        // products (co rows) stay in L2 while the GEMM runs over them. (Transforming each
        // index just before its GEMM instead of all 16 first measured 0.8% slower.)
        let block = (GEMM_BLOCK_BYTES / 2 / (8 * ci.max(co))).clamp(16, n) / 16 * 16;
        let stride = block + PACK_PAD;
        let mut v = vec![0u64; t * ci * stride];
        let mut prod = vec![0u64; co * stride];
        let mut acc = vec![0u64; co * m * stride];
        for level in 0..=map.level {
            let q = ring.modulus(level);
            let qv = q.value();
            let f_const: Vec<Option<ShoupConst>> = f_int
                .iter()
                .map(|f| f.map(|f| ShoupConst::new(q.reduce_i128(f), q)))
                .collect();
            let mut start = 0;
            while start < n {
                let end = (start + block).min(n);
                let len = end - start;
                for poly in 0..2 {
                    // The patches transformed: v[k][c] = sum_i B[k][i] x[c][i] mod q, summed
                    // lazily (each term below |B| q, far below 2^64) and reduced once.
                    for ch in 0..ci {
                        let patch = &map.patch[ch * p..(ch + 1) * p];
                        for k in 0..t {
                            let dst = &mut v[(k * ci + ch) * stride..][..len];
                            dst.fill(0);
                            for (i, entry) in patch.iter().enumerate() {
                                let coef = map.b[k * p + i];
                                let Some((idx, neg)) = *entry else { continue };
                                if coef == 0 {
                                    continue;
                                }
                                let coef = if neg { -(coef as i64) } else { coef as i64 };
                                let src = &inputs[idx as usize].polys[poly].limb(level)[start..end];
                                add_small_multiple(dst, src, coef, qv);
                            }
                            reduce_below(dst, qv, bits.b);
                        }
                    }
                    acc[..co * m * stride].fill(0);
                    for k in 0..t {
                        let xs: Vec<&[u64]> = (0..ci)
                            .map(|ch| &v[(k * ci + ch) * stride..][..len])
                            .collect();
                        let mut outs: Vec<&mut [u64]> = prod
                            .chunks_exact_mut(stride)
                            .map(|r| &mut r[..len])
                            .collect();
                        kernels::dot_const_rows_prepared(&mut outs, &xs, &w.consts[level][k], q);
                        for j in 0..m {
                            let coef = map.a[j * t + k] as i64;
                            if coef == 0 {
                                continue;
                            }
                            for o in 0..co {
                                if out[o * m + j].is_none() {
                                    continue;
                                }
                                let dst = &mut acc[(o * m + j) * stride..][..len];
                                add_small_multiple(dst, &prod[o * stride..][..len], coef, qv);
                            }
                        }
                    }
                    for (e, (polys, f)) in out.iter_mut().zip(&f_const).enumerate() {
                        let (Some(polys), Some(f)) = (polys.as_mut(), f) else {
                            continue;
                        };
                        let sum = &mut acc[e * stride..][..len];
                        reduce_below(sum, qv, bits.a);
                        kernels::mul_const(&mut polys[poly].limb_mut(level)[start..end], sum, f, q);
                    }
                }
                start = end;
            }
        }
        Ok(out
            .into_iter()
            .map(|polys| {
                polys.map(|polys| Ciphertext {
                    params: params.clone(),
                    polys: polys.into(),
                    level: map.level,
                    scale: map.target_scale,
                    seed: None,
                })
            })
            .collect())
    }
}

/// `dst += coef * src` lazily (no reduction): `src` below `q`, a negative `coef` added as
/// `|coef| (q - src)`. The caller reduces before the sum nears 2^64.
fn add_small_multiple(dst: &mut [u64], src: &[u64], coef: i64, q: u64) {
    let c = coef.unsigned_abs();
    match coef {
        1 => dst.iter_mut().zip(src).for_each(|(d, &s)| *d += s),
        -1 => dst.iter_mut().zip(src).for_each(|(d, &s)| *d += q - s),
        _ if coef >= 0 => dst.iter_mut().zip(src).for_each(|(d, &s)| *d += c * s),
        _ => dst
            .iter_mut()
            .zip(src)
            .for_each(|(d, &s)| *d += c * (q - s)),
    }
}

/// `x mod q` in place for every `x < 2^bits q`: conditional subtractions of `2^j q`,
/// branch-free (vectorizes), instead of a division-free but multiply-heavy general reduction.
fn reduce_below(xs: &mut [u64], q: u64, bits: u32) {
    for j in (0..bits).rev() {
        let m = q << j;
        for x in xs.iter_mut() {
            let y = x.wrapping_sub(m);
            // y's top bit is set exactly when x < m (both below 2^63).
            *x = if (y as i64) < 0 { *x } else { y };
        }
    }
}

/// Winograd's F(2x2, 3x3) in the form [`FactoredMap`] takes (cross-correlation, as
/// convolution layers compute it): a 4x4 input patch (row-major), 16 products, a 2x2 output
/// block (row-major). `y = A^T [(G g G^T) . (B^T d B)] A` with the 1-D matrices
/// `B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]`, `G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1]`,
/// `A^T = [1 1 1 0; 0 1 -1 -1]`; the 2-D ones are their Kronecker squares.
pub mod winograd {
    use super::FactoredMap;
    use std::sync::OnceLock;

    const BT: [[i8; 4]; 4] = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]];
    const G: [[f64; 3]; 4] = [
        [1.0, 0.0, 0.0],
        [0.5, 0.5, 0.5],
        [0.5, -0.5, 0.5],
        [0.0, 0.0, 1.0],
    ];
    const AT: [[i8; 4]; 2] = [[1, 1, 1, 0], [0, 1, -1, -1]];

    /// Transformed values per patch.
    pub const T: usize = 16;
    /// Patch entries (4x4).
    pub const P: usize = 16;
    /// Outputs per block (2x2).
    pub const M: usize = 4;

    /// The Kronecker square of a `rows x 4` matrix: entry `(r1 rows_count + r2, c1 4 + c2)`
    /// is `m[r1][c1] m[r2][c2]`, row-major.
    fn kron_square<const R: usize>(m: &[[i8; 4]; R]) -> Vec<i8> {
        let mut out = Vec::with_capacity(R * R * 16);
        for r1 in m {
            for r2 in m {
                for c1 in r1 {
                    out.extend(r2.iter().map(|c2| c1 * c2));
                }
            }
        }
        out
    }

    /// `B` of [`super::FactoredMap`]: `T x P`.
    pub fn input_transform() -> &'static [i8] {
        static B: OnceLock<Vec<i8>> = OnceLock::new();
        B.get_or_init(|| kron_square(&BT))
    }

    /// `A` of [`super::FactoredMap`]: `M x T`.
    pub fn output_transform() -> &'static [i8] {
        static A: OnceLock<Vec<i8>> = OnceLock::new();
        A.get_or_init(|| kron_square(&AT))
    }

    /// The [`FactoredMap`] of F(2x2, 3x3) blocks: `patch` is `ci x 16` (4x4 patches), `u`
    /// `16 x co x ci` (from [`filter`]), `f` `co x 4` (2x2 blocks); the rest as in
    /// [`FactoredMap`].
    pub fn map<'a>(
        patch: &'a [Option<(u32, bool)>],
        u: &'a [f64],
        u_bits: i32,
        f: &'a [Option<f64>],
        level: usize,
        target_scale: f64,
    ) -> FactoredMap<'a> {
        FactoredMap {
            b: input_transform(),
            a: output_transform(),
            t: T,
            p: P,
            m: M,
            patch,
            u,
            u_bits,
            f,
            level,
            target_scale,
        }
    }

    /// The 16 transformed weights `G g G^T` of a 3x3 filter `g` (row-major).
    pub fn filter(g: &[f64; 9]) -> [f64; T] {
        let mut u = [0.0; T];
        for (k, uk) in u.iter_mut().enumerate() {
            let (gy, gx) = (&G[k / 4], &G[k % 4]);
            *uk = (0..9).map(|ab| gy[ab / 3] * gx[ab % 3] * g[ab]).sum();
        }
        u
    }
}
