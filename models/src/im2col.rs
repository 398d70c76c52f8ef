//! Convolution as im2col + matmul on NHWC tensors, so the backward pass is matmuls too.
//!
//! candle's CPU conv2d backward is several times slower than PyTorch; with the patches laid
//! out as rows of a matrix, forward and both gradients are single large gemm calls.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

/// Extracts k x k patches (stride 1, zero padding `pad`) from an NHWC tensor.
/// Output: [N, Ho, Wo, k*k*C] with the last axis ordered (ky, kx, c).
#[derive(Debug, Clone, Copy)]
pub struct Im2Col {
    pub k: usize,
    pub pad: usize,
}

/// The adjoint of [`Im2Col`]: scatters patch gradients back into an NHWC tensor.
#[derive(Debug, Clone, Copy)]
struct Col2Im {
    k: usize,
    pad: usize,
    h: usize,
    w: usize,
    c: usize,
}

impl Im2Col {
    fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        (h + 2 * self.pad + 1 - self.k, w + 2 * self.pad + 1 - self.k)
    }
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("im2col: only f32 is supported"),
    };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("im2col: input must be contiguous"),
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "im2col"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h, w, c) = layout.shape().dims4()?;
        let x = contiguous_f32(storage, layout)?;
        let (ho, wo) = self.out_hw(h, w);
        let k = self.k;
        let row = k * k * c;
        let mut out = vec![0f32; n * ho * wo * row];
        for b in 0..n {
            let xb = &x[b * h * w * c..(b + 1) * h * w * c];
            for oy in 0..ho {
                for ox in 0..wo {
                    let o = ((b * ho + oy) * wo + ox) * row;
                    for ky in 0..k {
                        let iy = (oy + ky) as isize - self.pad as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        for kx in 0..k {
                            let ix = (ox + kx) as isize - self.pad as isize;
                            if ix < 0 || ix >= w as isize {
                                continue;
                            }
                            let src = (iy as usize * w + ix as usize) * c;
                            let dst = o + (ky * k + kx) * c;
                            out[dst..dst + c].copy_from_slice(&xb[src..src + c]);
                        }
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, ho, wo, row))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (_, h, w, c) = arg.dims4()?;
        let g = grad_res.contiguous()?;
        let op = Col2Im {
            k: self.k,
            pad: self.pad,
            h,
            w,
            c,
        };
        Ok(Some(g.apply_op1_no_bwd(&op)?))
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "col2im"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, ho, wo, row) = layout.shape().dims4()?;
        let g = contiguous_f32(storage, layout)?;
        let (h, w, c, k) = (self.h, self.w, self.c, self.k);
        if row != k * k * c {
            candle_core::bail!("col2im: row length {row} != k*k*c");
        }
        let mut out = vec![0f32; n * h * w * c];
        for b in 0..n {
            let ob = &mut out[b * h * w * c..(b + 1) * h * w * c];
            for oy in 0..ho {
                for ox in 0..wo {
                    let o = ((b * ho + oy) * wo + ox) * row;
                    for ky in 0..k {
                        let iy = (oy + ky) as isize - self.pad as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        for kx in 0..k {
                            let ix = (ox + kx) as isize - self.pad as isize;
                            if ix < 0 || ix >= w as isize {
                                continue;
                            }
                            let dst = (iy as usize * w + ix as usize) * c;
                            let src = o + (ky * k + kx) * c;
                            for (d, s) in ob[dst..dst + c].iter_mut().zip(&g[src..src + c]) {
                                *d += *s;
                            }
                        }
                    }
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n, h, w, c))))
    }
}

/// Stride-1 convolution of an NHWC tensor with weights `w` of shape [O, k*k*C] (rows ordered
/// (ky, kx, c)) and bias [O]. Returns NHWC [N, Ho, Wo, O].
pub fn conv2d_nhwc(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    k: usize,
    pad: usize,
) -> Result<Tensor> {
    let (n, h, wd, c) = x.dims4()?;
    let o = w.dim(0)?;
    let (cols, ho, wo) = if k == 1 && pad == 0 {
        (x.reshape((n * h * wd, c))?, h, wd)
    } else {
        let op = Im2Col { k, pad };
        let (ho, wo) = op.out_hw(h, wd);
        let cols = x.contiguous()?.apply_op1(op)?;
        (cols.reshape((n * ho * wo, k * k * c))?, ho, wo)
    };
    let mut y = cols.matmul(&w.t()?)?;
    if let Some(b) = bias {
        y = y.broadcast_add(b)?;
    }
    y.reshape((n, ho, wo, o))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Direct NCHW convolution as the reference, via candle's own conv2d.
    #[test]
    fn matches_candle_conv2d_forward_and_backward() -> Result<()> {
        let dev = Device::Cpu;
        let (n, c, h, w, o, k, pad) = (2, 3, 5, 6, 4, 3, 1);
        let xs: Vec<f32> = (0..n * c * h * w)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let ws: Vec<f32> = (0..o * c * k * k)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) / 9.0)
            .collect();
        let x_nchw = Var::from_tensor(&Tensor::from_vec(xs, (n, c, h, w), &dev)?)?;
        let w_ockk = Var::from_tensor(&Tensor::from_vec(ws, (o, c, k, k), &dev)?)?;
        let bias = Tensor::new(&[0.1f32, -0.2, 0.3, 0.0], &dev)?;
        let reference = x_nchw
            .conv2d(&w_ockk, pad, 1, 1, 1)?
            .broadcast_add(&bias.reshape((1, o, 1, 1))?)?;
        // ours: NHWC input, weight rows ordered (ky, kx, c)
        let x_nhwc = Var::from_tensor(&x_nchw.permute((0, 2, 3, 1))?.contiguous()?)?;
        let w_rows = Var::from_tensor(&w_ockk.permute((0, 2, 3, 1))?.reshape((o, k * k * c))?)?;
        let ours = conv2d_nhwc(&x_nhwc, &w_rows, Some(&bias), k, pad)?.permute((0, 3, 1, 2))?;
        let diff = (&ours - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-4, "forward diff {diff}");
        // gradients of a weighted sum
        let wt =
            (Tensor::arange(0f32, (n * o * h * w) as f32, &dev)?.reshape((n, o, h, w))? / 100.0)?;
        let g_ref = (reference * &wt)?.sum_all()?.backward()?;
        let g_ours = (ours * &wt)?.sum_all()?.backward()?;
        let gx_ref = g_ref.get(&x_nchw).unwrap().permute((0, 2, 3, 1))?;
        let gx = g_ours.get(&x_nhwc).unwrap();
        let d = (gx - gx_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-2, "input grad diff {d}");
        let gw_ref = g_ref
            .get(&w_ockk)
            .unwrap()
            .permute((0, 2, 3, 1))?
            .reshape((o, k * k * c))?;
        let gw = g_ours.get(&w_rows).unwrap();
        let d = (gw - gw_ref)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(d < 1e-2, "weight grad diff {d}");
        Ok(())
    }
}
