//! Fused training-mode kernels with hand-written backward passes.
//!
//! candle reduces over a non-last axis (batch-norm statistics, the gradient of a broadcast
//! bias) with a slow strided loop; these kernels do bias + activation + batch norm, and 2x2
//! average pooling, in single passes over NHWC data, so a training step is dominated by gemm.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// Batch statistics (mean, biased variance) of the activation output, per channel.
pub type BnStats = Arc<Mutex<Option<(Vec<f32>, Vec<f32>)>>>;

/// Training-mode `BN(act(x + bias))` on x viewed as [N*P, C] (P = H*W positions).
/// params rows: bias (1), then for the polynomial a (P), b (P), c (P), then gamma (1), beta (1).
#[derive(Clone)]
pub struct BiasActBn {
    pub positions: usize,
    pub poly: bool,
    pub eps: f64,
    pub stats: BnStats,
}

struct BiasActBnGrad {
    op: BiasActBn,
    x: Tensor,
    params: Tensor,
}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let d = match s {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("fused ops: only f32"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&d[a..b]),
        None => candle_core::bail!("fused ops: inputs must be contiguous"),
    }
}

impl BiasActBn {
    fn rows(&self) -> usize {
        if self.poly {
            3 + 3 * self.positions
        } else {
            3
        }
    }

    /// Computes u = act(x + bias) for every element, and the per-channel mean / inverse std.
    fn act_and_stats(
        &self,
        x: &[f32],
        p: &[f32],
        c: usize,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>) {
        let m = x.len() / c;
        let pos = self.positions;
        let mut u = vec![0f32; x.len()];
        let mut s = vec![0f64; c];
        let mut s2 = vec![0f64; c];
        let bias = &p[..c];
        for r in 0..m {
            let row = &x[r * c..(r + 1) * c];
            let out = &mut u[r * c..(r + 1) * c];
            if self.poly {
                let q = r % pos;
                let a = &p[(1 + q) * c..(2 + q) * c];
                let b = &p[(1 + pos + q) * c..(2 + pos + q) * c];
                let cc = &p[(1 + 2 * pos + q) * c..(2 + 2 * pos + q) * c];
                for k in 0..c {
                    let z = row[k] + bias[k];
                    out[k] = (a[k] * z + b[k]) * z + cc[k];
                }
            } else {
                for k in 0..c {
                    out[k] = (row[k] + bias[k]).max(0.0);
                }
            }
            for k in 0..c {
                s[k] += out[k] as f64;
                s2[k] += (out[k] as f64) * (out[k] as f64);
            }
        }
        let mean: Vec<f32> = s.iter().map(|v| (v / m as f64) as f32).collect();
        let var: Vec<f32> = (0..c)
            .map(|k| ((s2[k] / m as f64) - (s[k] / m as f64).powi(2)).max(0.0) as f32)
            .collect();
        let inv: Vec<f32> = var
            .iter()
            .map(|v| 1.0 / ((*v as f64 + self.eps).sqrt() as f32))
            .collect();
        (u, mean, var, inv)
    }
}

impl CustomOp2 for BiasActBn {
    fn name(&self) -> &'static str {
        "bias_act_bn"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, c) = l1.shape().dims2()?;
        let (r, c2) = l2.shape().dims2()?;
        if c != c2 || r != self.rows() || m % self.positions != 0 {
            candle_core::bail!(
                "bias_act_bn: bad shapes x {:?} params {:?}",
                l1.shape(),
                l2.shape()
            );
        }
        let x = slice(s1, l1)?;
        let p = slice(s2, l2)?;
        let (mut u, mean, var, inv) = self.act_and_stats(x, p, c);
        let gamma = &p[(r - 2) * c..(r - 1) * c];
        let beta = &p[(r - 1) * c..r * c];
        for row in u.chunks_exact_mut(c) {
            for k in 0..c {
                row[k] = (row[k] - mean[k]) * inv[k] * gamma[k] + beta[k];
            }
        }
        *self.stats.lock().expect("stats lock") = Some((mean, var));
        Ok((CpuStorage::F32(u), Shape::from((m, c))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (m, _) = x.dims2()?;
        let g = BiasActBnGrad {
            op: self.clone(),
            x: x.contiguous()?,
            params: params.contiguous()?,
        };
        let all = grad.contiguous()?.apply_op1_no_bwd(&g)?;
        let r = params.dim(0)?;
        Ok((Some(all.narrow(0, 0, m)?), Some(all.narrow(0, m, r)?)))
    }
}

impl CustomOp1 for BiasActBnGrad {
    fn name(&self) -> &'static str {
        "bias_act_bn_grad"
    }

    /// Output rows: dx (M rows) then d(params) (R rows).
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, c) = l.shape().dims2()?;
        let dy = slice(s, l)?;
        let (xs, xl) = self.x.storage_and_layout();
        let (ps, pl) = self.params.storage_and_layout();
        let x = match &*xs {
            candle_core::Storage::Cpu(cs) => slice(cs, xl)?.to_vec(),
            _ => candle_core::bail!("cpu only"),
        };
        let p = match &*ps {
            candle_core::Storage::Cpu(cs) => slice(cs, pl)?.to_vec(),
            _ => candle_core::bail!("cpu only"),
        };
        let op = &self.op;
        let r = op.rows();
        let pos = op.positions;
        let (u, mean, _var, inv) = op.act_and_stats(&x, &p, c);
        let gamma = &p[(r - 2) * c..(r - 1) * c];
        // dgamma = sum dy*uhat, dbeta = sum dy
        let mut dgamma = vec![0f64; c];
        let mut dbeta = vec![0f64; c];
        for i in 0..m {
            for k in 0..c {
                let e = i * c + k;
                let uh = (u[e] - mean[k]) * inv[k];
                dgamma[k] += (dy[e] * uh) as f64;
                dbeta[k] += dy[e] as f64;
            }
        }
        let mut out = vec![0f32; (m + r) * c];
        let (dx, dp) = out.split_at_mut(m * c);
        let bias = &p[..c];
        for i in 0..m {
            let q = i % pos;
            for k in 0..c {
                let e = i * c + k;
                let uh = (u[e] - mean[k]) * inv[k];
                let du = gamma[k]
                    * inv[k]
                    * (dy[e] - (dbeta[k] / m as f64) as f32 - uh * (dgamma[k] / m as f64) as f32);
                let z = x[e] + bias[k];
                let dz = if op.poly {
                    let a = p[(1 + q) * c + k];
                    let b = p[(1 + pos + q) * c + k];
                    dp[(1 + q) * c + k] += du * z * z;
                    dp[(1 + pos + q) * c + k] += du * z;
                    dp[(1 + 2 * pos + q) * c + k] += du;
                    du * (2.0 * a * z + b)
                } else if z > 0.0 {
                    du
                } else {
                    0.0
                };
                dx[e] = dz;
                dp[k] += dz;
            }
        }
        for k in 0..c {
            dp[(r - 2) * c + k] = dgamma[k] as f32;
            dp[(r - 1) * c + k] = dbeta[k] as f32;
        }
        Ok((CpuStorage::F32(out), Shape::from((m + r, c))))
    }
}

/// 2x2 stride-2 average pooling on NHWC (even H and W).
#[derive(Clone, Copy)]
pub struct AvgPool2;
struct AvgPool2Grad;

impl CustomOp1 for AvgPool2 {
    fn name(&self) -> &'static str {
        "avg_pool2_nhwc"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, c) = l.shape().dims4()?;
        if h % 2 != 0 || w % 2 != 0 {
            candle_core::bail!("avg_pool2: H and W must be even, got {h}x{w}");
        }
        let x = slice(s, l)?;
        let (ho, wo) = (h / 2, w / 2);
        let mut out = vec![0f32; n * ho * wo * c];
        for b in 0..n {
            for y in 0..ho {
                for xx in 0..wo {
                    let o = ((b * ho + y) * wo + xx) * c;
                    for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                        let i = ((b * h + 2 * y + dy) * w + 2 * xx + dx) * c;
                        for k in 0..c {
                            out[o + k] += 0.25 * x[i + k];
                        }
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, ho, wo, c))))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&AvgPool2Grad)?))
    }
}

impl CustomOp1 for AvgPool2Grad {
    fn name(&self) -> &'static str {
        "avg_pool2_nhwc_grad"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, ho, wo, c) = l.shape().dims4()?;
        let g = slice(s, l)?;
        let (h, w) = (2 * ho, 2 * wo);
        let mut out = vec![0f32; n * h * w * c];
        for b in 0..n {
            for y in 0..ho {
                for xx in 0..wo {
                    let o = ((b * ho + y) * wo + xx) * c;
                    for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                        let i = ((b * h + 2 * y + dy) * w + 2 * xx + dx) * c;
                        for k in 0..c {
                            out[i + k] = 0.25 * g[o + k];
                        }
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, h, w, c))))
    }
}
