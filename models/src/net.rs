//! The optimized SqueezeNet in candle, NHWC layout, with selectable activation.
//!
//! Conv1 3x3 -> avgpool 2 -> Fire1 -> Fire2 -> avgpool 2 -> Conv2 3x3 -> Conv3 3x3 ->
//! Conv4 1x1 (to classes) -> global average pool. Every conv except Conv4 is a "unit":
//! conv, activation, batch norm (in that order). Fire = squeeze 1x1 unit, then expand 1x1 and
//! expand 3x3 units on the squeeze output, concatenated along channels (expand1 first).

use crate::im2col::conv2d_nhwc;
use candle_core::{DType, Device, Result, Tensor, Var, D};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The architecture is the model format's: training and inference share one definition.
pub use beaa_model::{ConvUnit, SqueezeNetSpec};

/// Activation granularity. Polynomials are a*x^2 + b*x + c.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ActKind {
    Relu,
    /// One (a, b, c) per activation layer.
    Layer,
    /// One (a, b, c) per channel.
    Channel,
    /// One (a, b, c) per feature-map element [C, H, W].
    Element,
}

impl ActKind {
    pub fn is_poly(self) -> bool {
        self != ActKind::Relu
    }
    pub fn label(self) -> &'static str {
        match self {
            ActKind::Relu => "relu",
            ActKind::Layer => "poly_layer",
            ActKind::Channel => "poly_channel",
            ActKind::Element => "poly_element",
        }
    }
}

/// Shape of a unit's polynomial coefficient tensors for a granularity (NHWC broadcastable).
pub fn poly_shape(u: &ConvUnit, kind: ActKind) -> Vec<usize> {
    match kind {
        ActKind::Relu => vec![],
        ActKind::Layer => vec![1],
        ActKind::Channel => vec![u.cout],
        ActKind::Element => vec![u.h, u.w, u.cout],
    }
}

/// Sees each activation's input (NHWC) by unit name during a forward pass.
pub type Observer<'a> = &'a mut dyn FnMut(&str, &Tensor) -> Result<()>;

pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

/// The coefficients of an activation's quadratic a*x^2 + b*x + c, as parameter names spell them.
pub const POLY_COEFS: [&str; 3] = ["a", "b", "c"];

/// The stored tensor of coefficient `k` of `unit`'s quadratic.
fn poly_name(unit: &str, k: &str) -> String {
    format!("{unit}.poly_{k}")
}

/// The per-channel share of an element-wise coefficient (see [`Net::with_channel_share`]).
fn channel_share_name(unit: &str, k: &str) -> String {
    format!("{unit}.poly_{k}.channel")
}

/// Trainable parameters (vars) and batch-norm running statistics (buffers), by name.
pub struct Net {
    pub arch: SqueezeNetSpec,
    pub act: ActKind,
    pub vars: BTreeMap<String, Var>,
    pub buffers: BTreeMap<String, Tensor>,
    /// While set, eval-mode forward passes replace each batch norm's running statistics by
    /// the statistics of the current batch, layer by layer ("precise BN"); see
    /// [`Net::recalibrate_bn`].
    pub calibrating: bool,
    /// Activations evaluated as ReLU whatever `act` is (progressive polynomial fitting).
    pub relu_units: std::collections::BTreeSet<String>,
    /// While `Some(l)` with `l < 1`, every polynomial activation is `(1-l) relu(x) + l p(x)`:
    /// a student eases from its teacher's ReLU to the quadratics (`--relu-blend-epochs`).
    /// `None` (inference, export, validation) is the quadratics alone.
    pub relu_blend: Option<f32>,
    /// Per unit, a bound on the activation's input: after `observe` has seen it, the input
    /// is clamped to `[-c, c]`. Only the off-data probe sets it (`--off-data-penalty`): on
    /// noise the stacked quadratics reach 1e70, past f32, and the clamp keeps every layer
    /// finite while each unit's own excess still gets its gradient. Empty otherwise.
    pub input_clamp: BTreeMap<String, f64>,
}

/// Seeded standard normal samples (candle's CPU RNG cannot be seeded).
pub fn normal_vec(rng: &mut ChaCha8Rng, n: usize, std: f64) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let u1 = (rng.next_u32() as f64 + 1.0) / (u32::MAX as f64 + 2.0);
        let u2 = rng.next_u32() as f64 / (u32::MAX as f64 + 1.0);
        let r = (-2.0 * u1.ln()).sqrt();
        out.push((r * (std::f64::consts::TAU * u2).cos() * std) as f32);
        out.push((r * (std::f64::consts::TAU * u2).sin() * std) as f32);
    }
    out.truncate(n);
    out
}

impl Net {
    /// Fresh network: He-normal conv weights, zero biases, identity batch norms, and
    /// polynomials initialised to a generic ReLU-like quadratic (refit from a teacher later).
    pub fn new(arch: SqueezeNetSpec, act: ActKind, seed: u64, dev: &Device) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut vars = BTreeMap::new();
        let mut buffers = BTreeMap::new();
        for u in arch.units() {
            let fan_in = u.cin * u.k * u.k;
            let std = (2.0 / fan_in as f64).sqrt();
            let w = normal_vec(&mut rng, u.cout * fan_in, std);
            vars.insert(
                format!("{}.weight", u.name),
                Var::from_vec(w, (u.cout, fan_in), dev)?,
            );
            vars.insert(
                format!("{}.bias", u.name),
                Var::zeros(u.cout, DType::F32, dev)?,
            );
            if u.act {
                vars.insert(
                    format!("{}.bn.gamma", u.name),
                    Var::ones(u.cout, DType::F32, dev)?,
                );
                vars.insert(
                    format!("{}.bn.beta", u.name),
                    Var::zeros(u.cout, DType::F32, dev)?,
                );
                buffers.insert(
                    format!("{}.bn.mean", u.name),
                    Tensor::zeros(u.cout, DType::F32, dev)?,
                );
                buffers.insert(
                    format!("{}.bn.var", u.name),
                    Tensor::ones(u.cout, DType::F32, dev)?,
                );
                if act.is_poly() {
                    let shape = poly_shape(&u, act);
                    // ReLU least-squares quadratic on a symmetric range [-2, 2].
                    for (p, v) in POLY_COEFS.into_iter().zip([0.1875f32, 0.5, 0.375]) {
                        vars.insert(
                            poly_name(&u.name, p),
                            Var::from_tensor(&Tensor::full(v, shape.clone(), dev)?)?,
                        );
                    }
                }
            }
        }
        Ok(Net {
            arch,
            act,
            vars,
            buffers,
            calibrating: false,
            relu_units: Default::default(),
            relu_blend: None,
            input_clamp: BTreeMap::new(),
        })
    }

    /// Splits each element-wise coefficient into a per-channel share plus a per-element
    /// offset (`{unit}.poly_{a,b,c}.channel`, shape `[C]`, zero at first; the effective
    /// coefficient is their sum, so the function is unchanged). Why: under SGD a per-element
    /// coefficient gets only its own element's gradient, while a channel-wise one gets the sum
    /// over the channel's H*W positions, so at one learning rate element-wise polynomials move
    /// up to H*W (64-1024) times slower than channel-wise ones. With the share their common
    /// part moves at the channel-wise rate and the offsets refine it. A no-op for other kinds.
    pub fn with_channel_share(mut self) -> Result<Self> {
        if self.act != ActKind::Element {
            return Ok(self);
        }
        for (u, k) in self.poly_coefs() {
            let dev = self.var_handle(&poly_name(&u.name, k))?.device().clone();
            self.vars.insert(
                channel_share_name(&u.name, k),
                Var::zeros(u.cout, DType::F32, &dev)?,
            );
        }
        Ok(self)
    }

    /// Every (activation unit, coefficient name) pair of a polynomial network, in unit order;
    /// empty for ReLU.
    pub fn poly_coefs(&self) -> Vec<(ConvUnit, &'static str)> {
        if !self.act.is_poly() {
            return Vec::new();
        }
        let units = self.arch.units().into_iter().filter(|u| u.act);
        units
            .flat_map(|u| POLY_COEFS.map(|k| (u.clone(), k)))
            .collect()
    }

    /// The stored per-element coefficient tensors (`[H, W, C]`) of an element-wise network;
    /// empty for the other kinds.
    pub fn element_poly_names(&self) -> Vec<String> {
        if self.act != ActKind::Element {
            return Vec::new();
        }
        let coefs = self.poly_coefs().into_iter();
        coefs.map(|(u, k)| poly_name(&u.name, k)).collect()
    }

    /// The effective coefficient `k` (a, b or c) of a unit's quadratic, shaped as
    /// [`poly_shape`]: the stored tensor plus its channel share if there is one.
    pub fn poly_coef(&self, unit: &str, k: &str) -> Result<Tensor> {
        let t = self.var(&poly_name(unit, k))?;
        match self.vars.get(&channel_share_name(unit, k)) {
            Some(share) => t.broadcast_add(share.as_tensor()),
            None => Ok(t.clone()),
        }
    }

    /// Sets the effective coefficient `k` of a unit's quadratic: the stored tensor takes
    /// `value` (shaped as [`poly_shape`]) and the channel share, if any, is zeroed.
    pub fn set_poly_coef(&self, unit: &str, k: &str, value: &Tensor) -> Result<()> {
        self.var_handle(&poly_name(unit, k))?.set(value)?;
        if let Some(share) = self.vars.get(&channel_share_name(unit, k)) {
            share.set(&share.as_tensor().zeros_like()?)?;
        }
        Ok(())
    }

    fn var_handle(&self, name: &str) -> Result<&Var> {
        self.vars
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("missing parameter {name}")))
    }

    fn var(&self, name: &str) -> Result<&Tensor> {
        self.var_handle(name).map(|v| v.as_tensor())
    }

    /// Forward pass on NHWC input. In training mode batch norm uses batch statistics and
    /// updates the running ones. `observe` sees each activation's input (NHWC), by unit name.
    pub fn forward(
        &mut self,
        x: &Tensor,
        train: bool,
        mut observe: Option<Observer<'_>>,
    ) -> Result<Tensor> {
        let units = self.arch.units();
        let mut run = |net: &mut Net, name: &str, x: &Tensor| -> Result<Tensor> {
            let u = units.iter().find(|u| u.name == name).expect("unit");
            let w = net.var(&format!("{name}.weight"))?.clone();
            let b = net.var(&format!("{name}.bias"))?.clone();
            // The fused kernel has no ReLU blend.
            if train && u.act && observe.is_none() && net.relu_blend.is_none() {
                return net.fused_unit(name, u, x, &w, &b);
            }
            let y = conv2d_nhwc(x, &w, Some(&b), u.k, u.k / 2)?;
            if !u.act {
                return Ok(y);
            }
            if let Some(f) = observe.as_mut() {
                f(name, &y)?;
            }
            let y = match net.input_clamp.get(name) {
                Some(&c) => y.clamp(-c, c)?,
                None => y,
            };
            let y = net.activation(name, &y)?;
            net.batch_norm(name, &y, train)
        };
        let x = run(self, "conv1", x)?;
        let x = avg_pool2(&x)?;
        let x = self.fire(&mut run, "fire1", &x)?;
        let x = self.fire(&mut run, "fire2", &x)?;
        let x = avg_pool2(&x)?;
        let x = run(self, "conv2", &x)?;
        let x = run(self, "conv3", &x)?;
        let x = run(self, "conv4", &x)?;
        // global average pool over H, W
        x.mean(1)?.mean(1)
    }

    fn fire(
        &mut self,
        run: &mut dyn FnMut(&mut Net, &str, &Tensor) -> Result<Tensor>,
        name: &str,
        x: &Tensor,
    ) -> Result<Tensor> {
        let s = run(self, &format!("{name}.squeeze"), x)?;
        let e1 = run(self, &format!("{name}.expand1"), &s)?;
        let e3 = run(self, &format!("{name}.expand3"), &s)?;
        Tensor::cat(&[&e1, &e3], D::Minus1)
    }

    /// Training-mode conv + bias + activation + batch norm through the fused kernel.
    fn fused_unit(
        &mut self,
        name: &str,
        u: &ConvUnit,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
    ) -> Result<Tensor> {
        let y = conv2d_nhwc(x, w, None, u.k, u.k / 2)?;
        let (n, h, wd, c) = y.dims4()?;
        let p = h * wd;
        let mut rows = vec![b.reshape((1, c))?];
        if self.act.is_poly() {
            for k in POLY_COEFS {
                let t = self.poly_coef(name, k)?;
                let t = match self.act {
                    ActKind::Element => t.reshape((p, c))?,
                    _ => t.reshape((1, t.elem_count()))?.broadcast_as((p, c))?,
                };
                rows.push(t);
            }
        }
        rows.push(self.var(&format!("{name}.bn.gamma"))?.reshape((1, c))?);
        rows.push(self.var(&format!("{name}.bn.beta"))?.reshape((1, c))?);
        let params = Tensor::cat(&rows, 0)?;
        let stats = crate::fused::BnStats::default();
        let op = crate::fused::BiasActBn {
            positions: p,
            poly: self.act.is_poly(),
            eps: BN_EPS,
            stats: stats.clone(),
        };
        let out = y.reshape((n * p, c))?.apply_op2(&params, op)?;
        let (mean, var) = stats.lock().expect("stats").take().expect("forward ran");
        let m = (n * p) as f64;
        let dev = x.device();
        let (mk, vk) = (format!("{name}.bn.mean"), format!("{name}.bn.var"));
        let mean = Tensor::from_vec(mean, c, dev)?;
        let var = (Tensor::from_vec(var, c, dev)? * (m / (m - 1.0).max(1.0)))?;
        let rm = ((&self.buffers[&mk] * (1.0 - BN_MOMENTUM))? + (mean * BN_MOMENTUM)?)?;
        let rv = ((&self.buffers[&vk] * (1.0 - BN_MOMENTUM))? + (var * BN_MOMENTUM)?)?;
        self.buffers.insert(mk, rm);
        self.buffers.insert(vk, rv);
        out.reshape((n, h, wd, c))
    }

    fn activation(&self, name: &str, x: &Tensor) -> Result<Tensor> {
        if !self.act.is_poly() || self.relu_units.contains(name) {
            return x.relu();
        }
        let a = self.poly_coef(name, "a")?;
        let b = self.poly_coef(name, "b")?;
        let c = self.poly_coef(name, "c")?;
        let p = x
            .broadcast_mul(&a)?
            .broadcast_add(&b)?
            .mul(x)?
            .broadcast_add(&c)?;
        match self.relu_blend {
            Some(l) if l < 1.0 => (x.relu()? * (1.0 - l as f64))? + (p * l as f64)?,
            _ => Ok(p),
        }
    }

    fn batch_norm(&mut self, name: &str, x: &Tensor, train: bool) -> Result<Tensor> {
        let c = x.dim(D::Minus1)?;
        let gamma = self.var(&format!("{name}.bn.gamma"))?.clone();
        let beta = self.var(&format!("{name}.bn.beta"))?.clone();
        let (mk, vk) = (format!("{name}.bn.mean"), format!("{name}.bn.var"));
        let shape = x.shape().clone();
        let flat = x.reshape(((), c))?;
        if self.calibrating && !train {
            let (mean, var) = robust_batch_stats(x, CALIBRATION_GROUP)?;
            self.buffers.insert(mk.clone(), mean);
            self.buffers.insert(vk.clone(), var);
        }
        let (mean, var) = if train {
            let mean = flat.mean_keepdim(0)?;
            let centered = flat.broadcast_sub(&mean)?;
            let var = centered.sqr()?.mean_keepdim(0)?;
            let count = flat.dim(0)? as f64;
            let unbiased = (var.detach() * (count / (count - 1.0).max(1.0)))?.flatten_all()?;
            let m = BN_MOMENTUM;
            let rm = ((&self.buffers[&mk] * (1.0 - m))? + (mean.detach().flatten_all()? * m)?)?;
            let rv = ((&self.buffers[&vk] * (1.0 - m))? + (unbiased * m)?)?;
            self.buffers.insert(mk, rm);
            self.buffers.insert(vk, rv);
            (mean, var)
        } else {
            (
                self.buffers[&mk].reshape((1, c))?,
                self.buffers[&vk].reshape((1, c))?,
            )
        };
        let inv = (var + BN_EPS)?.sqrt()?.recip()?;
        let y = flat
            .broadcast_sub(&mean)?
            .broadcast_mul(&inv)?
            .broadcast_mul(&gamma)?
            .broadcast_add(&beta)?;
        y.reshape(shape)
    }

    /// Re-estimates every batch norm's statistics in eval mode on one large batch (NHWC),
    /// each layer seeing the outputs of the already re-estimated layers before it. Training
    /// normalizes with batch statistics, and stacked quadratics amplify the difference to
    /// running averages; after this, eval mode matches the data it was calibrated on.
    pub fn recalibrate_bn(&mut self, x: &Tensor) -> Result<()> {
        self.calibrating = true;
        let r = self.forward(x, false, None);
        self.calibrating = false;
        r.map(|_| ())
    }

    /// All named tensors (vars and buffers), for checkpoints and export.
    pub fn tensors(&self) -> BTreeMap<String, Tensor> {
        let mut m: BTreeMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        m.extend(self.buffers.iter().map(|(k, v)| (k.clone(), v.clone())));
        m
    }

    /// Starts this network from another task's trained weights (transfer learning, e.g. an
    /// OCT teacher from a CIFAR-10 one of the same widths): tensors of the same name and shape
    /// are copied; a first convolution trained on colour, loaded into a grey one, is summed
    /// over its input channels (the response to a grey image repeated in R, G and B, up to
    /// the normalisation); the rest keeps its fresh initialisation - the classifier, whose
    /// class count differs, and anything the source lacks. Errors if no convolution weight
    /// could be taken (different widths), so a mismatch cannot pass for a transfer.
    pub fn load_pretrained(&mut self, src: &BTreeMap<String, Tensor>) -> Result<Transferred> {
        let mut t = Transferred::default();
        let first = self.arch.units().into_iter().next();
        for (k, v) in self.vars.iter() {
            let Some(s) = src.get(k) else {
                t.fresh.push(k.clone());
                continue;
            };
            if s.dims() == v.dims() {
                v.set(s)?;
                t.copied.push(k.clone());
                continue;
            }
            let grey_first = first
                .as_ref()
                .filter(|u| *k == format!("{}.weight", u.name) && u.cin == 1);
            match (grey_first, s.dims()) {
                (Some(u), &[cout, cols]) if cout == u.cout && cols % (u.k * u.k) == 0 => {
                    let summed = s.reshape((cout, u.k * u.k, cols / (u.k * u.k)))?.sum(2)?;
                    v.set(&summed)?;
                    t.adapted.push(k.clone());
                }
                _ => t.fresh.push(k.clone()),
            }
        }
        for (k, v) in self.buffers.iter_mut() {
            match src.get(k) {
                Some(s) if s.dims() == v.dims() => {
                    *v = s.clone();
                    t.copied.push(k.clone());
                }
                _ => t.fresh.push(k.clone()),
            }
        }
        let conv_weights =
            |names: &[String]| names.iter().filter(|n| n.ends_with(".weight")).count();
        if conv_weights(&t.copied) + conv_weights(&t.adapted) == 0 {
            candle_core::bail!(
                "no convolution weight of the pretrained run fits this network (other widths?)"
            );
        }
        Ok(t)
    }

    /// Overwrites every tensor present in `src` (matching names and shapes); returns the names
    /// it set. Missing names keep their current values (e.g. polynomials loaded from a ReLU net).
    pub fn load_from(
        &mut self,
        src: &std::collections::HashMap<String, Tensor>,
    ) -> Result<Vec<String>> {
        let mut set = Vec::new();
        for (k, v) in self.vars.iter() {
            if let Some(t) = src.get(k) {
                if t.dims() != v.dims() {
                    candle_core::bail!("shape mismatch for {k}: {:?} vs {:?}", t.dims(), v.dims());
                }
                v.set(t)?;
                set.push(k.clone());
            }
        }
        for (k, v) in self.buffers.iter_mut() {
            if let Some(t) = src.get(k) {
                if t.dims() != v.dims() {
                    candle_core::bail!("shape mismatch for {k}");
                }
                *v = t.clone();
                set.push(k.clone());
            }
        }
        Ok(set)
    }
}

/// What [`Net::load_pretrained`] did with each of the network's tensors.
#[derive(Debug, Default)]
pub struct Transferred {
    /// Same name and shape in the source: copied.
    pub copied: Vec<String>,
    /// The first convolution, colour to grey: summed over the input channels.
    pub adapted: Vec<String>,
    /// Not in the source or of another shape: left as initialised.
    pub fresh: Vec<String>,
}

/// Images per group in batch-norm re-estimation: the training batch size.
pub const CALIBRATION_GROUP: usize = 128;

/// Per-channel mean and (biased) variance for batch-norm re-estimation: the median over groups
/// of `group` images of each group's statistics. Quadratic activations give heavy tails; a plain
/// variance over many images is dominated by a few extreme ones and then squashes every typical
/// image to nearly the same value, whereas training normalized each batch of `group` images by
/// its own statistics. The median over groups reproduces the typical training batch.
pub fn robust_batch_stats(x: &Tensor, group: usize) -> Result<(Tensor, Tensor)> {
    let (n, h, w, c) = x.dims4()?;
    let flat = x.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let per = h * w * c;
    let groups: Vec<(usize, usize)> = (0..n.div_ceil(group))
        .map(|g| (g * group, ((g + 1) * group).min(n)))
        .collect();
    let mut means = vec![Vec::with_capacity(groups.len()); c];
    let mut vars = vec![Vec::with_capacity(groups.len()); c];
    for &(a, b) in &groups {
        let mut s = vec![0f64; c];
        let mut s2 = vec![0f64; c];
        for (i, v) in flat[a * per..b * per].iter().enumerate() {
            s[i % c] += v;
            s2[i % c] += v * v;
        }
        let m = ((b - a) * h * w) as f64;
        for k in 0..c {
            let mu = s[k] / m;
            means[k].push(mu);
            vars[k].push((s2[k] / m - mu * mu).max(0.0));
        }
    }
    let mean: Vec<f32> = means.iter().map(|v| median(v) as f32).collect();
    let var: Vec<f32> = vars.iter().map(|v| median(v) as f32).collect();
    Ok((
        Tensor::from_vec(mean, c, x.device())?,
        Tensor::from_vec(var, c, x.device())?,
    ))
}

/// 2x2 average pooling, stride 2, on NHWC.
pub fn avg_pool2(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(crate::fused::AvgPool2)
}

/// The median (the mean of the middle two for an even count; NaN when empty): what a typical
/// batch or group did, unmoved by the few that explode.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let l = v.len();
    match l {
        0 => f64::NAN,
        _ if l % 2 == 1 => v[l / 2],
        _ => 0.5 * (v[l / 2 - 1] + v[l / 2]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_is_the_middle_value_and_ignores_outliers() {
        assert_eq!(median(&[3.0, 1e12, 2.0]), 3.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 1e30]), 3.0);
        assert!(median(&[]).is_nan());
    }

    fn small_arch() -> SqueezeNetSpec {
        SqueezeNetSpec {
            in_channels: 3,
            height: 8,
            width: 8,
            classes: 3,
            conv1: 6,
            fire1: (4, 5, 3),
            fire2: (4, 3, 5),
            conv2: 6,
            conv3: 5,
        }
    }

    /// A colour 3-class net into a grey 2-class one of other input size: the first conv is
    /// summed over colour, the middle copied, the classifier fresh; other widths are refused.
    #[test]
    fn pretrained_weights_transfer_to_a_grey_task() -> Result<()> {
        let dev = Device::Cpu;
        let colour = Net::new(small_arch(), ActKind::Relu, 1, &dev)?;
        let src = colour.tensors();
        let grey_arch = SqueezeNetSpec {
            in_channels: 1,
            height: 16,
            width: 16,
            classes: 2,
            ..small_arch()
        };
        let mut grey = Net::new(grey_arch.clone(), ActKind::Relu, 2, &dev)?;
        let before = grey.tensors();
        let t = grey.load_pretrained(&src)?;
        assert_eq!(t.adapted, vec!["conv1.weight".to_string()]);
        assert!(t.fresh.contains(&"conv4.weight".to_string()));
        assert!(t.fresh.contains(&"conv4.bias".to_string()));
        assert!(t.copied.contains(&"conv2.weight".to_string()));
        assert!(t.copied.contains(&"conv1.bn.mean".to_string()));
        let after = grey.tensors();
        let same = |a: &Tensor, b: &Tensor| -> Result<bool> {
            Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? == 0.0)
        };
        assert!(same(&after["conv2.weight"], &src["conv2.weight"])?);
        assert!(same(&after["conv4.weight"], &before["conv4.weight"])?);
        // conv1: [6, 3*3*3] ordered (ky, kx, c) -> [6, 3*3], each tap the sum of its colours.
        let w = src["conv1.weight"].to_vec2::<f32>()?;
        let g = after["conv1.weight"].to_vec2::<f32>()?;
        for (o, row) in g.iter().enumerate() {
            for (tap, v) in row.iter().enumerate() {
                let sum: f32 = (0..3).map(|c| w[o][tap * 3 + c]).sum();
                assert!((v - sum).abs() < 1e-6);
            }
        }
        let narrow = SqueezeNetSpec {
            conv1: 4,
            fire1: (3, 3, 3),
            fire2: (3, 3, 3),
            conv2: 4,
            conv3: 4,
            ..grey_arch
        };
        let mut other = Net::new(narrow, ActKind::Relu, 3, &dev)?;
        assert!(
            other.load_pretrained(&src).is_err(),
            "no weight fits: refused"
        );
        Ok(())
    }

    /// Blend 0 is the ReLU network, 1 the quadratics alone, and in between the mix of both.
    #[test]
    fn relu_blend_moves_from_relu_to_the_quadratics() -> Result<()> {
        let dev = Device::Cpu;
        let mut net = Net::new(small_arch(), ActKind::Element, 4, &dev)?;
        let x = Tensor::from_vec(
            normal_vec(&mut ChaCha8Rng::seed_from_u64(3), 2 * 8 * 8 * 3, 1.0),
            (2, 8, 8, 3),
            &dev,
        )?;
        let poly = net.forward(&x, false, None)?;
        net.relu_units = net.arch.units().into_iter().map(|u| u.name).collect();
        let relu = net.forward(&x, false, None)?;
        net.relu_units.clear();
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        assert!(
            max_diff(&poly, &relu)? > 1e-3,
            "the test needs the two to differ"
        );
        net.relu_blend = Some(0.0);
        assert!(max_diff(&net.forward(&x, false, None)?, &relu)? < 1e-5);
        net.relu_blend = Some(1.0);
        assert!(max_diff(&net.forward(&x, false, None)?, &poly)? < 1e-5);
        net.relu_blend = Some(0.5);
        let half = net.forward(&x, false, None)?;
        assert!(max_diff(&half, &relu)? > 1e-4 && max_diff(&half, &poly)? > 1e-4);
        Ok(())
    }

    /// A channel share changes nothing at first, adds to every element of its channel, gets
    /// the sum of its elements' gradients, and `set_poly_coef` folds it away.
    #[test]
    fn channel_share_is_a_per_channel_offset_with_the_summed_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let max_diff = |a: &Tensor, b: &Tensor| -> Result<f32> {
            (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
        };
        let x = Tensor::from_vec(
            normal_vec(&mut ChaCha8Rng::seed_from_u64(7), 4 * 8 * 8 * 3, 1.0),
            (4, 8, 8, 3),
            &dev,
        )?;
        let mut plain = Net::new(small_arch(), ActKind::Element, 4, &dev)?;
        let mut shared = Net::new(small_arch(), ActKind::Element, 4, &dev)?.with_channel_share()?;
        let act_units = small_arch().units().iter().filter(|u| u.act).count();
        assert_eq!(shared.vars.len(), plain.vars.len() + 3 * act_units);
        let y0 = plain.forward(&x, false, None)?;
        assert!(max_diff(&shared.forward(&x, false, None)?, &y0)? < 1e-6);
        // a nonzero share: the same function as the plain net with the share added per element
        let share = Tensor::from_vec(vec![0.05f32, -0.1, 0.2, 0.0, 0.3, -0.02], 6, &dev)?;
        shared.vars["conv1.poly_b.channel"].set(&share)?;
        let eff = plain.vars["conv1.poly_b"]
            .as_tensor()
            .broadcast_add(&share)?;
        plain.set_poly_coef("conv1", "b", &eff)?;
        let y1 = plain.forward(&x, false, None)?;
        assert!(max_diff(&y1, &y0)? > 1e-3, "the share must matter");
        assert!(max_diff(&shared.forward(&x, false, None)?, &y1)? < 1e-5);
        // folding: set_poly_coef stores the effective value and zeroes the share
        let mut folded = Net::new(small_arch(), ActKind::Element, 4, &dev)?.with_channel_share()?;
        folded.vars["conv1.poly_b.channel"].set(&share)?;
        folded.set_poly_coef("conv1", "b", &eff)?;
        assert_eq!(
            folded.vars["conv1.poly_b.channel"]
                .as_tensor()
                .abs()?
                .sum_all()?
                .to_scalar::<f32>()?,
            0.0
        );
        assert!(max_diff(&folded.forward(&x, false, None)?, &y1)? < 1e-5);
        // training mode (the fused kernel): the share's gradient is the sum over positions
        let loss = shared.forward(&x, true, None)?.sqr()?.sum_all()?;
        let grads = loss.backward()?;
        let g_elem = grads
            .get(shared.vars["conv1.poly_b"].as_tensor())
            .expect("element gradient");
        let g_share = grads
            .get(shared.vars["conv1.poly_b.channel"].as_tensor())
            .expect("share gradient");
        let summed = g_elem.sum((0, 1))?;
        assert!(
            max_diff(&summed, g_share)?
                < 1e-3 * (1.0 + g_share.abs()?.max_all()?.to_scalar::<f32>()?)
        );
        Ok(())
    }

    /// One extreme image moves the plain variance by orders of magnitude but not the median
    /// of per-group statistics.
    #[test]
    fn robust_stats_ignore_a_heavy_tail() -> Result<()> {
        let dev = Device::Cpu;
        // 6 images of 1x2x1 (H, W, C), groups of 2: values +-1 except one image at +-1000
        let mut v = vec![
            1f32, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0, 1.0, -1.0,
        ];
        v[0] = 1000.0;
        v[1] = -1000.0;
        let x = Tensor::from_vec(v, (6, 1, 2, 1), &dev)?;
        let (m, var) = robust_batch_stats(&x, 2)?;
        assert_eq!(m.to_vec1::<f32>()?, vec![0.0]);
        assert_eq!(var.to_vec1::<f32>()?, vec![1.0]);
        let plain = x.sqr()?.mean_all()?.to_scalar::<f32>()?;
        assert!(plain > 1e5);
        Ok(())
    }

    /// After re-estimation on a batch, eval mode on that batch equals train mode on it.
    #[test]
    fn recalibrated_eval_mode_matches_batch_statistics() -> Result<()> {
        let dev = Device::Cpu;
        let mut net = Net::new(small_arch(), ActKind::Element, 4, &dev)?;
        let x = Tensor::from_vec(
            normal_vec(&mut ChaCha8Rng::seed_from_u64(2), 6 * 8 * 8 * 3, 1.0),
            (6, 8, 8, 3),
            &dev,
        )?;
        let train_out = net.forward(&x, true, None)?;
        let before = net.forward(&x, false, None)?;
        net.recalibrate_bn(&x)?;
        let after = net.forward(&x, false, None)?;
        let d_after = (&after - &train_out)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        let d_before = (&before - &train_out)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d_after < 1e-3, "after calibration {d_after}");
        assert!(
            d_before > 1e-2,
            "the test needs a visible mismatch first ({d_before})"
        );
        Ok(())
    }

    /// The fused training kernels must match the plain candle-op path, values and gradients.
    #[test]
    fn fused_training_path_matches_reference_ops() -> Result<()> {
        let dev = Device::Cpu;
        for act in [
            ActKind::Relu,
            ActKind::Layer,
            ActKind::Channel,
            ActKind::Element,
        ] {
            let mut net = Net::new(small_arch(), act, 3, &dev)?;
            // perturb polynomials and BN so every parameter matters
            for (k, v) in net.vars.iter() {
                if k.contains("poly") || k.contains("bn.") || k.ends_with("bias") {
                    let noise = normal_vec(
                        &mut ChaCha8Rng::seed_from_u64(k.len() as u64),
                        v.elem_count(),
                        0.1,
                    );
                    v.set(&(v.as_tensor() + Tensor::from_vec(noise, v.shape(), &dev)?)?)?;
                }
            }
            let x = Tensor::from_vec(
                normal_vec(&mut ChaCha8Rng::seed_from_u64(9), 4 * 8 * 8 * 3, 1.0),
                (4, 8, 8, 3),
                &dev,
            )?;
            let wts = Tensor::from_vec(
                normal_vec(&mut ChaCha8Rng::seed_from_u64(5), 4 * 3, 1.0),
                (4, 3),
                &dev,
            )?;
            let fused = net.forward(&x, true, None)?;
            let mut noop = |_: &str, _: &Tensor| -> Result<()> { Ok(()) };
            let buffers_after_fused = net.buffers.clone();
            let reference = net.forward(&x, true, Some(&mut noop))?;
            let d = (&fused - &reference)?
                .abs()?
                .max_all()?
                .to_scalar::<f32>()?;
            assert!(d < 1e-4, "{act:?} forward diff {d}");
            let gf = (fused * &wts)?.sum_all()?.backward()?;
            let gr = (reference * &wts)?.sum_all()?.backward()?;
            for (k, v) in &net.vars {
                let a = gf.get(v).expect("fused grad");
                let b = gr.get(v).expect("reference grad");
                let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(0.05);
                let d = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
                assert!(d < 1e-3, "{act:?} grad of {k}: rel diff {d}");
            }
            // running statistics: both paths update them from the same batch statistics
            for (k, v) in &buffers_after_fused {
                let _ = (k, v);
            }
        }
        Ok(())
    }
}
