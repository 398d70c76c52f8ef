//! Training loop: SGD with Nesterov momentum and L2 decay, warmup + cosine learning rate,
//! optional knowledge distillation from a teacher run, checkpoints with exact resume.

use crate::data::{augment_normalize, split, Augment, Dataset, Fold, SplitKind};
use crate::net::{median, poly_shape, ActKind, ConvUnit, Net, SqueezeNetSpec, POLY_COEFS};
use anyhow::{bail, Context, Result};
use beaa_model::{InputSpec, ResizePolicy};
use candle_core::{DType, Device, Tensor, D};
use indicatif::{ProgressBar, ProgressStyle};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Peak learning rate of a polynomial student unless `--lr` says otherwise (the accuracy
/// table names any other rate in the variant).
pub const STUDENT_LR: f64 = 0.01;
/// Gradient-norm clip unless `--clip-norm` says otherwise (the table names any other).
pub const CLIP_NORM: f64 = 5.0;
/// Knowledge-distillation weight and temperature unless `--alpha` / `--temperature` say
/// otherwise (the table names any others).
pub const KD_ALPHA: f64 = 0.9;
pub const KD_TEMPERATURE: f64 = 4.0;

/// Everything that defines a run; stored as `config.json` in the run directory.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub data: PathBuf,
    /// Human-readable data set name for provenance ("cifar10", "octdl-erm-no", ...).
    pub dataset_name: String,
    pub input: InputSpec,
    pub split: SplitKind,
    pub val_per_class: usize,
    pub val_fraction: f64,
    pub arch: SqueezeNetSpec,
    pub act: ActKind,
    pub epochs: usize,
    pub batch: usize,
    pub lr: f64,
    pub lr_min: f64,
    pub warmup_epochs: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Clip the global gradient norm to this (0 = off); guards the quadratic students.
    pub clip_norm: f64,
    pub seed: u64,
    pub augment: Augment,
    /// Weight the cross-entropy by inverse class frequency (imbalanced data).
    pub class_weighted: bool,
    /// Run directory of the teacher for knowledge distillation.
    pub teacher: Option<PathBuf>,
    pub kd_alpha: f64,
    pub kd_temperature: f64,
    /// Initialise weights from this run directory's checkpoint (polynomials refit to ReLU).
    pub init_from: Option<PathBuf>,
    /// Images used to fit the initial polynomials to ReLU.
    pub poly_fit_images: usize,
    pub checkpoint_minutes: f64,
    /// Images for the end-of-epoch batch-norm re-estimation (0 = off; used for polynomials).
    #[serde(default)]
    pub bn_calibration_images: usize,
    /// Weight of the layer-wide inputs in each channel/element least-squares fit (0 = none).
    #[serde(default)]
    pub poly_fit_shrink: f64,
    /// Weight of a uniform distribution over each group's observed input range in the fit
    /// (0 = none; older runs).
    #[serde(default)]
    pub poly_fit_range: f64,
    /// Fit the quadratics layer by layer on the partly polynomial network's own inputs.
    #[serde(default)]
    pub poly_fit_progressive: bool,
    /// Train with batch norm in eval mode (statistics fixed between the end-of-epoch
    /// re-estimations), so training optimizes the function that inference (and encryption) runs.
    #[serde(default)]
    pub freeze_bn: bool,
    /// Weight of the range penalty (0 = off): `sum over units of mean(relu(|x| - B)^2) / B^2`,
    /// `x` a polynomial's input and `B` twice the largest |x| the unit saw on clean training
    /// images when the run started. Stacked quadratics explode on inputs beyond the range they
    /// were fitted on (the shipped CIFAR-10 student: |logits| up to 6e8 on a small picture in
    /// a black frame, against 15 on ordinary images); this pulls such inputs back. Without
    /// `--freeze-bn` it also turns off the fused training kernel (slower).
    #[serde(default)]
    pub range_penalty: f64,
    /// Weight of the off-data range penalty (0 = off). Each step also runs a probe batch of
    /// images that are not scans or photos of the task - uniform noise over 0-255, noise
    /// around the normalization mean, the step's images under heavy affine changes (shrunk
    /// into black, rotated) and shifted by up to a quarter - through the function inference
    /// runs (the quadratics alone, batch norm in eval mode) and adds `W * sum over units of
    /// mean(ln(1 + relu(|x| - B) / B)^2)`, `B` as for `range_penalty`. Why: the OCT students
    /// from CIFAR-pretrained teachers reach |logits| of 1e30 on noise and 1e7 on framed scans,
    /// and one such image garbles its whole encrypted batch. Logarithmic so that values of
    /// 1e30 give a usable gradient rather than an f32 overflow.
    #[serde(default)]
    pub off_data_penalty: f64,
    /// The off-data penalty's bound as a multiple of the range bound `B` (1 when unset):
    /// encryption needs off-data values only well inside what a ciphertext holds, not
    /// inside twice the clean range, and a looser bound asks less of the network.
    #[serde(default = "one")]
    pub off_data_slack: f64,
    /// The kinds of image in the off-data probe, cycled through (all four when unset).
    #[serde(default = "ProbeKind::all")]
    pub off_data_kinds: Vec<ProbeKind>,
    /// Validate on this cross-validation fold of the groups instead of `val_fraction`.
    #[serde(default)]
    pub fold: Option<Fold>,
    /// Leave out of each step the images whose own loss exceeds this (0 = off). Stacked
    /// quadratics send a few augmented images to losses of 1e10 and more; such an image's
    /// gradient, clipped, then sets the whole step's direction. Left out, the step follows the
    /// ordinary images. (The log's training accuracy still counts every image; its loss is
    /// each step's loss over the images kept.)
    #[serde(default)]
    pub outlier_loss: f64,
    /// Students: over this many first epochs each polynomial activation moves linearly from
    /// the teacher's ReLU to the quadratic (`(1-l) relu + l p`, `l` from 0 to 1; 0 = off), so
    /// the network adapts while it still works instead of starting from the fit's function
    /// (CIFAR-10: 52% before training). Validation always runs the quadratics alone.
    #[serde(default)]
    pub relu_blend_epochs: f64,
    /// Element-wise students: each coefficient is a per-channel share plus a per-element
    /// offset (see [`Net::with_channel_share`]), so the common part learns at the channel-wise
    /// rate. Exported models fold the two into one per-element tensor.
    #[serde(default)]
    pub poly_channel_share: bool,
    /// Element-wise students: L2 decay, at this rate, of each coefficient's deviation from
    /// its channel's mean (0 = off). It pulls the 516,096 per-element coefficients toward the
    /// channel-wise function they refine: element-wise when 0, channel-wise in the limit. The
    /// 16-epoch element-wise student fitted its training set ever better (85% -> 92%) while
    /// validation fell after epoch 8; this is the regulariser aimed at exactly that freedom.
    #[serde(default)]
    pub poly_spread_decay: f64,
    /// Start from another task's trained run of the same widths (transfer learning; see
    /// [`Net::load_pretrained`]): its convolutions and batch norms, not its classifier. For
    /// small sets such as OCTDL (366 images), where features learned from scratch are few.
    #[serde(default)]
    pub pretrained: Option<PathBuf>,
    /// Mixup (0 = off): each step trains on `l x + (1-l) x[perm]`, `l ~ Beta(m, m)` and `perm`
    /// a shuffle of the batch, the teacher scoring the same mixed images and the hard-label
    /// term weighted `l` and `1-l` between the two labels. Why: the CIFAR-10 students fit
    /// their training set ever better after epoch 8 while validation falls; mixed images
    /// give the student the teacher's function on inputs it has never seen, and a convex
    /// mixture of two images stays inside the value range the quadratics were fitted on
    /// (unlike cut-outs or black borders).
    #[serde(default)]
    pub mixup: f64,
    /// Feature distillation weight (0 = off; needs a teacher of the same widths): each step
    /// also pulls every activation's input (the convolution output its quadratic sees)
    /// toward the teacher's on the same images ([`feature_kd_loss`]). Why: the students
    /// stop 5 points under their teacher's training accuracy, and KD on the logits says
    /// nothing about where each layer goes wrong; matching each layer's input also keeps the
    /// quadratics on the value range they were fitted on (FitNets-style hints, all layers).
    #[serde(default)]
    pub feature_kd: f64,
    /// Set by `beaa-train average`: this run's weights are the mean of these runs' final
    /// weights (no training of its own; empty for a trained run).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub averaged_from: Vec<PathBuf>,
}

/// A kind of image in the off-data probe ([`off_data_batch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeKind {
    /// Uniform noise over 0-255 in every pixel and channel.
    Noise255,
    /// Uniform noise within 1.5 standard deviations of the normalization mean.
    Noise,
    /// The step's image under a heavy random affine change.
    Affine,
    /// The step's image shifted by up to a quarter with black borders.
    Shift,
}

impl ProbeKind {
    pub fn all() -> Vec<ProbeKind> {
        vec![
            ProbeKind::Noise255,
            ProbeKind::Noise,
            ProbeKind::Affine,
            ProbeKind::Shift,
        ]
    }
}

fn one() -> f64 {
    1.0
}

/// A fresh net for a run's configuration (architecture, activation, channel shares).
pub fn net_for(cfg: &TrainConfig, dev: &Device) -> Result<Net> {
    let net = Net::new(cfg.arch.clone(), cfg.act, cfg.seed, dev)?;
    if cfg.poly_channel_share {
        Ok(net.with_channel_share()?)
    } else {
        Ok(net)
    }
}

/// The ReLU blend at `progress` epochs ([`TrainConfig::relu_blend_epochs`]); `None` once the
/// quadratics stand alone.
pub fn relu_blend_at(cfg: &TrainConfig, progress: f64) -> Option<f32> {
    (cfg.act.is_poly() && progress < cfg.relu_blend_epochs)
        .then(|| (progress / cfg.relu_blend_epochs) as f32)
}

/// A draw from Beta(a, a) by Johnk's method (two uniforms, accepted when their powers sum to
/// at most 1); fine for the small `a` mixup uses (acceptance 50% at `a = 1`).
pub fn beta_symmetric(a: f64, rng: &mut ChaCha8Rng) -> f64 {
    let unit = |rng: &mut ChaCha8Rng| (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
    loop {
        let x = unit(rng).powf(1.0 / a);
        let y = unit(rng).powf(1.0 / a);
        if x + y <= 1.0 && x + y > 0.0 {
            return x / (x + y);
        }
    }
}

/// One step's mixup ([`TrainConfig::mixup`]): the mixed batch, each image's partner label
/// and the weight `l` of the image's own label.
pub fn mixup_batch(
    x: &Tensor,
    y: &[u32],
    m: f64,
    rng: &mut ChaCha8Rng,
) -> Result<(Tensor, Vec<u32>, f64)> {
    let l = beta_symmetric(m, rng);
    let mut perm: Vec<u32> = (0..y.len() as u32).collect();
    crate::data::shuffle(&mut perm, rng);
    let partner = x.index_select(&Tensor::new(perm.as_slice(), x.device())?, 0)?;
    let mixed = ((x * l)? + (partner * (1.0 - l))?)?;
    Ok((mixed, perm.iter().map(|&p| y[p as usize]).collect(), l))
}

/// Steps between batch-norm re-estimations while the ReLU blend moves (its statistics follow
/// the function being trained).
const BLEND_CALIBRATION_STEPS: usize = 25;

/// Progress of a run; stored as `state.json` next to `checkpoint.safetensors`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TrainState {
    /// Epochs fully completed.
    pub epoch: usize,
    /// Steps done inside the current epoch (mid-epoch checkpoints).
    pub step: usize,
    pub last_val: Option<EvalResult>,
    pub seconds: f64,
    /// Per polynomial unit, the bound `B` of the range penalty (fixed when the run starts, so a
    /// resumed run penalizes the same ranges).
    #[serde(default)]
    pub range_bounds: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalResult {
    pub n: usize,
    pub loss: f64,
    pub accuracy: f64,
    pub balanced_accuracy: f64,
    pub per_class_recall: Vec<f64>,
    pub confusion: Vec<Vec<usize>>,
}

/// Sets up the allocator so candle's many short-lived tensors do not each mmap/munmap.
pub fn tune_allocator() {
    #[cfg(target_env = "gnu")]
    unsafe {
        // SAFETY: mallopt only changes glibc allocator thresholds; called before threads start.
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 512 * 1024 * 1024);
    }
}

/// The data sets we train on. The input, the split and the augmentation follow from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Preset {
    /// 32x32 RGB, the last 500 images of each class validate.
    #[value(name = "cifar10", alias = "cifar")]
    Cifar10,
    /// 64x64 grey retinal OCT (ERM vs NO), split by patient.
    #[value(name = "octdl", alias = "oct")]
    Octdl,
}

impl Preset {
    /// The data set name a run's config records (`TrainConfig::dataset_name`).
    pub fn dataset_name(self) -> &'static str {
        match self {
            Preset::Cifar10 => "cifar10",
            Preset::Octdl => "octdl-erm-no",
        }
    }

    /// The preset of a recorded run, from its data set name.
    pub fn of_dataset(dataset_name: &str) -> Preset {
        if dataset_name == Preset::Octdl.dataset_name() {
            Preset::Octdl
        } else {
            Preset::Cifar10
        }
    }

    /// The model input a run of this preset uses unless `--size` says otherwise.
    pub fn default_input(self) -> InputSpec {
        match self {
            Preset::Octdl => InputSpec {
                channels: 1,
                height: 64,
                width: 64,
                mean: vec![0.0],
                std: vec![1.0],
                resize: ResizePolicy::Stretch,
            },
            Preset::Cifar10 => InputSpec {
                channels: 3,
                height: 32,
                width: 32,
                mean: vec![0.0; 3],
                std: vec![1.0; 3],
                resize: ResizePolicy::ShorterSideCenterCrop,
            },
        }
    }
}

/// Loads and splits the data, filling the normalization from the training split when unset.
pub fn load_data(cfg: &mut TrainConfig) -> Result<(Dataset, Dataset)> {
    let t = Instant::now();
    let all = Dataset::load(&cfg.data, &cfg.input)?;
    let (tr, va) = split(
        &all,
        cfg.split,
        cfg.val_per_class,
        cfg.val_fraction,
        cfg.seed,
        cfg.fold,
    );
    let train = all.subset(&tr);
    let val = all.subset(&va);
    if cfg.input.std.iter().all(|&s| s == 1.0) && cfg.input.mean.iter().all(|&m| m == 0.0) {
        let (m, s) = train.channel_stats();
        cfg.input.mean = m;
        cfg.input.std = s;
    }
    cfg.arch.classes = all.classes.len();
    eprintln!(
        "data: {} train / {} val images, classes {:?}, train counts {:?}, val counts {:?} ({:.1}s)",
        train.len(),
        val.len(),
        all.classes,
        train.class_counts(),
        val.class_counts(),
        t.elapsed().as_secs_f64()
    );
    Ok((train, val))
}

/// Builds an NHWC batch tensor with augmentation.
pub fn make_batch(
    ds: &Dataset,
    idx: &[usize],
    aug: &Augment,
    spec: &InputSpec,
    rng: &mut ChaCha8Rng,
    dev: &Device,
) -> Result<(Tensor, Vec<u32>)> {
    let per = ds.h * ds.w * ds.c;
    let mut buf = vec![0f32; idx.len() * per];
    for (k, &i) in idx.iter().enumerate() {
        augment_normalize(
            ds.image(i),
            (ds.h, ds.w, ds.c),
            aug,
            &spec.mean,
            &spec.std,
            rng,
            &mut buf[k * per..(k + 1) * per],
        );
    }
    let x = Tensor::from_vec(buf, (idx.len(), ds.h, ds.w, ds.c), dev)?;
    Ok((x, idx.iter().map(|&i| ds.labels[i]).collect()))
}

fn lr_at(cfg: &TrainConfig, progress_epochs: f64) -> f64 {
    if progress_epochs < cfg.warmup_epochs {
        let f = progress_epochs / cfg.warmup_epochs.max(1e-9);
        return cfg.lr * (0.1 + 0.9 * f);
    }
    let span = (cfg.epochs as f64 - cfg.warmup_epochs).max(1e-9);
    let f = ((progress_epochs - cfg.warmup_epochs) / span).clamp(0.0, 1.0);
    cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1.0 + (std::f64::consts::PI * f).cos())
}

/// Cross-entropy with optional per-class weights (mean over the weighted batch).
pub fn cross_entropy(logits: &Tensor, labels: &[u32], class_w: Option<&[f32]>) -> Result<Tensor> {
    let (n, k) = logits.dims2()?;
    let mut onehot = vec![0f32; n * k];
    let mut total = 0f32;
    for (i, &l) in labels.iter().enumerate() {
        let w = class_w.map_or(1.0, |c| c[l as usize]);
        onehot[i * k + l as usize] = w;
        total += w;
    }
    let oh = Tensor::from_vec(onehot, (n, k), logits.device())?;
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok(((logp * oh)?.sum_all()?.neg()? / total as f64)?)
}

/// alpha*T^2*KL(softmax(t/T) || softmax(s/T)) + (1-alpha)*CE(s, labels).
pub fn kd_loss(
    student: &Tensor,
    teacher: &Tensor,
    labels: &[u32],
    alpha: f64,
    temp: f64,
    class_w: Option<&[f32]>,
) -> Result<Tensor> {
    let n = student.dim(0)? as f64;
    let lpt = candle_nn::ops::log_softmax(&(teacher.detach() / temp)?, D::Minus1)?;
    let lps = candle_nn::ops::log_softmax(&(student / temp)?, D::Minus1)?;
    let kl = (lpt.exp()? * (lpt - lps)?)?.sum_all()? / n;
    let ce = cross_entropy(student, labels, class_w)?;
    Ok(((kl? * (alpha * temp * temp))? + (ce * (1.0 - alpha))?)?)
}

/// Feature distillation ([`TrainConfig::feature_kd`]): the mean over activation units of each
/// unit's squared error to the teacher's input to the same unit, channel by channel relative
/// to the teacher's variance of that channel over the batch, so every channel and unit
/// weighs alike whatever its scale (each variance floored at 1% of the unit's mean variance:
/// a channel the teacher keeps nearly constant must not dominate). `student` and `teacher`
/// are `(unit, NHWC input)` in forward order; the teacher's side gets no gradient.
pub fn feature_kd_loss(
    student: &[(String, Tensor)],
    teacher: &[(String, Tensor)],
) -> Result<Tensor> {
    if student.is_empty() || student.len() != teacher.len() {
        bail!(
            "feature distillation needs the same activation units in student ({}) and teacher ({})",
            student.len(),
            teacher.len()
        );
    }
    let mut terms = Vec::with_capacity(student.len());
    for ((sn, s), (tn, t)) in student.iter().zip(teacher) {
        if sn != tn || s.dims() != t.dims() {
            bail!(
                "feature distillation: student unit {sn} {:?} against teacher unit {tn} {:?}",
                s.dims(),
                t.dims()
            );
        }
        let c = t.dim(D::Minus1)?;
        let t = t.detach().reshape(((), c))?;
        let s = s.reshape(((), c))?;
        let var = t
            .broadcast_sub(&t.mean_keepdim(0)?)?
            .sqr()?
            .mean_keepdim(0)?;
        let floor = (var.mean_all()? * 0.01)?;
        let var = var.broadcast_maximum(&floor)?;
        let err = (s - &t)?.sqr()?.mean_keepdim(0)?;
        terms.push((err / var)?.mean_all()?);
    }
    Ok((Tensor::stack(&terms, 0)?.sum_all()? / terms.len() as f64)?)
}

/// One image's training loss from its logits, in f64 and without class weights: KD's
/// `alpha*T^2*KL + (1-alpha)*CE` when teacher logits are given, else cross-entropy. Infinite
/// when a logit is not finite. Decides which images `--outlier-loss` leaves out of a step.
pub fn per_image_loss(
    student: &[f32],
    teacher: Option<&[f32]>,
    label: u32,
    alpha: f64,
    temp: f64,
) -> f64 {
    fn log_softmax(z: &[f32], t: f64) -> Vec<f64> {
        let m = z
            .iter()
            .fold(f64::NEG_INFINITY, |m, &v| m.max(v as f64 / t));
        let lse = m + z
            .iter()
            .map(|&v| (v as f64 / t - m).exp())
            .sum::<f64>()
            .ln();
        z.iter().map(|&v| v as f64 / t - lse).collect()
    }
    if student.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let ce = -log_softmax(student, 1.0)[label as usize];
    match teacher {
        None => ce,
        Some(t) => {
            let (lpt, lps) = (log_softmax(t, temp), log_softmax(student, temp));
            let kl: f64 = lpt.iter().zip(&lps).map(|(a, b)| a.exp() * (a - b)).sum();
            alpha * temp * temp * kl + (1.0 - alpha) * ce
        }
    }
}

/// The rows of a batch whose own loss is at most `limit` (never none: if every image is over,
/// the one with the smallest loss is kept).
pub fn rows_within_loss(
    student: &Tensor,
    teacher: Option<&Tensor>,
    labels: &[u32],
    alpha: f64,
    temp: f64,
    limit: f64,
) -> Result<Vec<u32>> {
    let s = student.to_vec2::<f32>()?;
    let t = teacher.map(|t| t.to_vec2::<f32>()).transpose()?;
    let losses: Vec<f64> = s
        .iter()
        .enumerate()
        .map(|(i, row)| per_image_loss(row, t.as_ref().map(|t| &t[i][..]), labels[i], alpha, temp))
        .collect();
    let mut keep: Vec<u32> = (0..losses.len() as u32)
        .filter(|&i| losses[i as usize] <= limit)
        .collect();
    if keep.is_empty() {
        let best = (0..losses.len())
            .min_by(|&a, &b| losses[a].total_cmp(&losses[b]))
            .unwrap_or(0);
        keep.push(best as u32);
    }
    Ok(keep)
}

/// Accuracy, balanced accuracy and per-class recall of a net (eval mode) on a data set.
pub fn evaluate(net: &mut Net, ds: &Dataset, spec: &InputSpec, dev: &Device) -> Result<EvalResult> {
    let k = ds.classes.len();
    let mut conf = vec![vec![0usize; k]; k];
    let mut loss_sum = 0.0;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let idx: Vec<usize> = (0..ds.len()).collect();
    for chunk in idx.chunks(250) {
        let (x, y) = make_batch(ds, chunk, &Augment::none(), spec, &mut rng, dev)?;
        let logits = net.forward(&x, false, None)?;
        loss_sum +=
            cross_entropy(&logits, &y, None)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        for (p, t) in pred.iter().zip(&y) {
            conf[*t as usize][*p as usize] += 1;
        }
    }
    Ok(summarize(conf, loss_sum))
}

pub fn summarize(conf: Vec<Vec<usize>>, loss_sum: f64) -> EvalResult {
    let n: usize = conf.iter().flatten().sum();
    let correct: usize = (0..conf.len()).map(|i| conf[i][i]).sum();
    let recall: Vec<f64> = conf
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let t: usize = r.iter().sum();
            if t == 0 {
                f64::NAN
            } else {
                r[i] as f64 / t as f64
            }
        })
        .collect();
    let present: Vec<f64> = recall.iter().copied().filter(|r| !r.is_nan()).collect();
    EvalResult {
        n,
        loss: loss_sum / n.max(1) as f64,
        accuracy: correct as f64 / n.max(1) as f64,
        balanced_accuracy: present.iter().sum::<f64>() / present.len().max(1) as f64,
        per_class_recall: recall,
        confusion: conf,
    }
}

/// Loads a run directory's config and latest weights into a net.
pub fn load_run(dir: &Path, dev: &Device) -> Result<(TrainConfig, Net)> {
    let cfg: TrainConfig = serde_json::from_str(
        &std::fs::read_to_string(dir.join("config.json"))
            .with_context(|| format!("reading {}/config.json", dir.display()))?,
    )?;
    let mut net = net_for(&cfg, dev)?;
    let ck = candle_core::safetensors::load(dir.join("checkpoint.safetensors"), dev)
        .with_context(|| format!("reading {}/checkpoint.safetensors", dir.display()))?;
    let weights: HashMap<String, Tensor> = ck
        .into_iter()
        .filter(|(k, _)| !k.starts_with("momentum."))
        .collect();
    net.load_from(&weights)?;
    Ok((cfg, net))
}

fn save_checkpoint(
    dir: &Path,
    net: &Net,
    mom: &HashMap<String, Tensor>,
    state: &TrainState,
) -> Result<()> {
    let mut all: HashMap<String, Tensor> = net.tensors().into_iter().collect();
    for (k, v) in mom {
        all.insert(format!("momentum.{k}"), v.clone());
    }
    let tmp = dir.join("checkpoint.safetensors.tmp");
    candle_core::safetensors::save(&all, &tmp)?;
    std::fs::rename(&tmp, dir.join("checkpoint.safetensors"))?;
    let tmp = dir.join("state.json.tmp");
    std::fs::write(&tmp, serde_json::to_string_pretty(state)?)?;
    std::fs::rename(&tmp, dir.join("state.json"))?;
    Ok(())
}

/// How the students' initial quadratics are fitted to ReLU.
#[derive(Debug, Clone, Copy)]
pub struct PolyFit {
    /// Training images whose activation inputs are fitted.
    pub images: usize,
    /// Weight of the layer-wide inputs in each channel/element fit (0 = none).
    pub shrink: f64,
    /// Weight of a uniform distribution over each group's observed input range (0 = none).
    pub range: f64,
    /// Fit layer by layer on the inputs of the polynomial network built so far (batch norm
    /// re-estimated after each layer) instead of all layers on the ReLU teacher's inputs.
    pub progressive: bool,
    /// Images for those batch-norm re-estimations.
    pub calibration_images: usize,
}

/// Per-element input statistics of one activation: sums of x^0..x^4 and relu(x) * x^0..x^2,
/// minimum and maximum, each shaped like the feature map `[H, W, C]`.
struct Moments {
    sums: Vec<Tensor>,
    min: Tensor,
    max: Tensor,
}

/// Accumulates [`Moments`] of the activation inputs the network sees on `images` training
/// images (augmented; cycling through small splits), for the units named in `only` (all if
/// `None`).
fn observe_moments(
    net: &mut Net,
    ds: &Dataset,
    spec: &InputSpec,
    images: usize,
    aug: &Augment,
    only: Option<&str>,
    dev: &Device,
) -> Result<HashMap<String, Moments>> {
    let mut acc: HashMap<String, Moments> = HashMap::new();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let idx: Vec<usize> = (0..images).map(|i| i % ds.len()).collect();
    for chunk in idx.chunks(50) {
        let (x, _) = make_batch(ds, chunk, aug, spec, &mut rng, dev)?;
        let mut obs = |name: &str, y: &Tensor| -> candle_core::Result<()> {
            if only.is_some_and(|o| o != name) {
                return Ok(());
            }
            // moments per chunk in f32 (small chunks), accumulated across chunks in f64
            let y = y.detach();
            let r = y.relu()?;
            let y2 = y.sqr()?;
            let parts = [
                y.ones_like()?,
                y.clone(),
                y2.clone(),
                (&y2 * &y)?,
                y2.sqr()?,
                r.clone(),
                (&r * &y)?,
                (&r * &y2)?,
            ];
            let s: Vec<Tensor> = parts
                .iter()
                .map(|p| p.sum(0)?.to_dtype(DType::F64))
                .collect::<candle_core::Result<_>>()?;
            let (lo, hi) = (y.min(0)?, y.max(0)?);
            match acc.get_mut(name) {
                Some(m) => {
                    for (a, b) in m.sums.iter_mut().zip(s) {
                        *a = (&*a + b)?;
                    }
                    m.min = m.min.minimum(&lo)?;
                    m.max = m.max.maximum(&hi)?;
                }
                None => {
                    acc.insert(
                        name.to_string(),
                        Moments {
                            sums: s,
                            min: lo,
                            max: hi,
                        },
                    );
                }
            }
            Ok(())
        };
        net.forward(&x, false, Some(&mut obs))?;
    }
    Ok(acc)
}

/// Moment sums `[n, Sx..Sx4, Sr, Srx, Srx2]` of `mass` points spread uniformly over [lo, hi].
fn uniform_moments(lo: f64, hi: f64, mass: f64) -> [f64; 8] {
    if hi <= lo || hi.is_nan() || lo.is_nan() {
        let r = lo.max(0.0);
        return [
            mass,
            mass * lo,
            mass * lo * lo,
            mass * lo.powi(3),
            mass * lo.powi(4),
            mass * r,
            mass * r * lo,
            mass * r * lo * lo,
        ];
    }
    let w = hi - lo;
    let pow = |k: i32| (hi.powi(k) - lo.powi(k)) / (k as f64 * w);
    let (l, h) = (lo.max(0.0), hi.max(0.0));
    let rpow = |k: i32| (h.powi(k) - l.powi(k)) / (k as f64 * w);
    [
        mass,
        mass * pow(2),
        mass * pow(3),
        mass * pow(4),
        mass * pow(5),
        mass * rpow(2),
        mass * rpow(3),
        mass * rpow(4),
    ]
}

/// Solves and sets the quadratics of unit `u` from its input moments.
fn solve_unit(net: &mut Net, u: &ConvUnit, m: &Moments, fit: &PolyFit, dev: &Device) -> Result<()> {
    let act = net.act;
    let (h, w, c) = (u.h, u.w, u.cout);
    let vals: Vec<Vec<f64>> = m
        .sums
        .iter()
        .map(|t| t.flatten_all()?.to_vec1::<f64>())
        .collect::<candle_core::Result<_>>()?;
    let lo_e = m
        .min
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let hi_e = m
        .max
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    // group index of each element (NHWC order: (y, x, ch))
    let groups = match act {
        ActKind::Layer => 1,
        ActKind::Channel => c,
        _ => h * w * c,
    };
    let group_of = |e: usize| match act {
        ActKind::Layer => 0,
        ActKind::Channel => e % c,
        _ => e,
    };
    let mut g = vec![[0f64; 8]; groups];
    let mut range = vec![(f64::INFINITY, f64::NEG_INFINITY); groups];
    for (k, vk) in vals.iter().enumerate() {
        for (e, v) in vk.iter().enumerate() {
            g[group_of(e)][k] += v;
        }
    }
    for e in 0..lo_e.len() {
        let r = &mut range[group_of(e)];
        r.0 = r.0.min(lo_e[e]);
        r.1 = r.1.max(hi_e[e]);
    }
    let add = |to: &mut [f64; 8], from: &[f64; 8], w: f64| {
        for k in 0..8 {
            to[k] += w * from[k];
        }
    };
    // A uniform component over the observed range keeps the quadratic near ReLU out to the
    // extremes instead of only where most inputs are: stacked quadratics square the tails,
    // and an extreme input far outside the fitted range is what makes a student explode.
    let with_range = |s: &[f64; 8], r: (f64, f64)| {
        let mut out = *s;
        if fit.range > 0.0 {
            add(&mut out, &uniform_moments(r.0, r.1, s[0]), fit.range);
        }
        out
    };
    let mut layer = [0f64; 8];
    let mut layer_range = (f64::INFINITY, f64::NEG_INFINITY);
    for (s, r) in g.iter().zip(&range) {
        add(&mut layer, s, 1.0);
        layer_range = (layer_range.0.min(r.0), layer_range.1.max(r.1));
    }
    let layer = with_range(&layer, layer_range);
    let mut coef = [vec![0f32; groups], vec![0f32; groups], vec![0f32; groups]];
    for (gi, s) in g.iter().enumerate() {
        let mut mixed = with_range(s, range[gi]);
        if groups > 1 {
            // Shrink each group's fit toward the layer's: a group with a narrow input
            // distribution (e.g. a border element that is nearly constant) otherwise gets a
            // steep quadratic that explodes on the first unusual input.
            let w = fit.shrink * s[0] / layer[0].max(1e-300);
            add(&mut mixed, &layer, w);
        }
        let (a, b, cc) = solve_quadratic_fit(&mixed);
        coef[0][gi] = a as f32;
        coef[1][gi] = b as f32;
        coef[2][gi] = cc as f32;
    }
    let shape = poly_shape(u, act);
    for (p, v) in POLY_COEFS.iter().zip(coef) {
        net.set_poly_coef(&u.name, p, &Tensor::from_vec(v, shape.clone(), dev)?)?;
    }
    Ok(())
}

/// Fits each activation's quadratic to ReLU by least squares on the inputs it sees on training
/// images: all at once on the ReLU network's inputs (the teacher's weights), or progressively,
/// layer by layer on the inputs of the partly polynomial network (see [`PolyFit`]).
pub fn fit_polys_to_relu(
    net: &mut Net,
    ds: &Dataset,
    spec: &InputSpec,
    aug: &Augment,
    fit: &PolyFit,
    dev: &Device,
) -> Result<()> {
    if !net.act.is_poly() {
        return Ok(());
    }
    let units: Vec<ConvUnit> = net.arch.units().into_iter().filter(|u| u.act).collect();
    let all: std::collections::BTreeSet<String> = units.iter().map(|u| u.name.clone()).collect();
    if !fit.progressive {
        net.relu_units = all;
        let m = observe_moments(net, ds, spec, fit.images, aug, None, dev);
        net.relu_units.clear();
        let m = m?;
        for u in &units {
            solve_unit(net, u, &m[&u.name], fit, dev)?;
        }
        return Ok(());
    }
    let result = (|| -> Result<()> {
        for (i, u) in units.iter().enumerate() {
            // units from i on still run ReLU; batch norms re-estimated for the current mix
            net.relu_units = units[i..].iter().map(|u| u.name.clone()).collect();
            calibrate(net, ds, spec, fit.calibration_images, dev)?;
            let m = observe_moments(net, ds, spec, fit.images, aug, Some(&u.name), dev)?;
            solve_unit(net, u, &m[&u.name], fit, dev)?;
        }
        Ok(())
    })();
    net.relu_units.clear();
    result
}

/// Least squares a*x^2+b*x+c ~ relu(x) from moment sums [n, Sx, Sx2, Sx3, Sx4, Sr, Srx, Srx2],
/// with a small ridge so constant inputs (e.g. padded borders) stay well-posed.
pub fn solve_quadratic_fit(s: &[f64; 8]) -> (f64, f64, f64) {
    let m = [[s[4], s[3], s[2]], [s[3], s[2], s[1]], [s[2], s[1], s[0]]];
    let rhs = [s[7], s[6], s[5]];
    let ridge = 1e-6 * (s[4] + s[2] + s[0]).max(1e-12);
    let mut a = m;
    for (i, row) in a.iter_mut().enumerate() {
        row[i] += ridge;
    }
    // Cramer's rule on a 3x3 system
    let det = |m: &[[f64; 3]; 3]| {
        m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
            - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
            + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0])
    };
    let d = det(&a);
    if d.abs() < 1e-300 {
        return (0.0, 0.5, 0.0);
    }
    let mut out = [0.0; 3];
    for (k, o) in out.iter_mut().enumerate() {
        let mut mk = a;
        for r in 0..3 {
            mk[r][k] = rhs[r];
        }
        *o = det(&mk) / d;
    }
    (out[0], out[1], out[2])
}

/// Trains (or resumes) the run in `dir`.
pub fn run(dir: &Path, cfg: TrainConfig) -> Result<TrainState> {
    run_limited(dir, cfg, None)
}

/// [`run`], stopping (after a checkpoint) once this invocation has done `max_steps` steps;
/// a later call resumes. Used to time-box runs and to test resuming.
pub fn run_limited(
    dir: &Path,
    mut cfg: TrainConfig,
    max_steps: Option<usize>,
) -> Result<TrainState> {
    let mut steps_done = 0usize;
    let dev = Device::Cpu;
    std::fs::create_dir_all(dir)?;
    let resuming = dir.join("state.json").exists() && dir.join("config.json").exists();
    if resuming {
        cfg = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json"))?)?;
        eprintln!(
            "resuming {} from its own config.json (command-line settings ignored)",
            dir.display()
        );
    }
    if cfg.feature_kd > 0.0 && cfg.teacher.is_none() {
        bail!("feature distillation (--feature-kd) needs a teacher (beaa-train distill --teacher RUN)");
    }
    let (train, val) = load_data(&mut cfg)?;
    let spec = cfg.input.clone();
    let mut net = net_for(&cfg, &dev)?;
    let mut mom: HashMap<String, Tensor> = HashMap::new();
    let mut state = TrainState::default();
    if resuming {
        state = serde_json::from_str(&std::fs::read_to_string(dir.join("state.json"))?)?;
        let ck = candle_core::safetensors::load(dir.join("checkpoint.safetensors"), &dev)?;
        for (k, v) in &ck {
            if let Some(name) = k.strip_prefix("momentum.") {
                mom.insert(name.to_string(), v.clone());
            }
        }
        net.load_from(&ck)?;
    } else {
        if let Some(src) = &cfg.init_from {
            let (src_cfg, teacher) = load_run(src, &dev)?;
            let set = net.load_from(&teacher.tensors().into_iter().collect())?;
            eprintln!("initialised {} tensors from {}", set.len(), src.display());
            // A run with the same polynomials is fine-tuned as it is (e.g. with the range
            // penalty); polynomials are fitted to ReLU only when starting from another kind.
            let same_polys = src_cfg.act == cfg.act && cfg.act.is_poly();
            if same_polys {
                // Effective coefficients, so channel shares on either side carry over.
                for (u, k) in net.poly_coefs() {
                    net.set_poly_coef(&u.name, k, &teacher.poly_coef(&u.name, k)?)?;
                }
                eprintln!(
                    "{} has {} polynomials: kept, not refitted",
                    src.display(),
                    cfg.act.label()
                );
            }
            if !same_polys {
                let fit = PolyFit {
                    images: cfg.poly_fit_images,
                    shrink: cfg.poly_fit_shrink,
                    range: cfg.poly_fit_range,
                    progressive: cfg.poly_fit_progressive,
                    calibration_images: cfg.bn_calibration_images,
                };
                fit_polys_to_relu(&mut net, &train, &spec, &cfg.augment, &fit, &dev)?;
                calibrate(&mut net, &train, &spec, cfg.bn_calibration_images, &dev)?;
            }
        }
        if let Some(src) = &cfg.pretrained {
            if cfg.init_from.is_some() {
                bail!("--pretrained and --init-from both choose the starting weights: give one");
            }
            let (_, other) = load_run(src, &dev)?;
            let t = net.load_pretrained(&other.tensors())?;
            eprintln!(
                "pretrained from {}: {} tensors copied, {} adapted (colour to grey), {} fresh ({})",
                src.display(),
                t.copied.len(),
                t.adapted.len(),
                t.fresh.len(),
                t.fresh.join(", ")
            );
        }
        std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    }
    let mut teacher = match &cfg.teacher {
        Some(t) => Some(load_run(t, &dev)?.1),
        None => None,
    };
    let class_w: Option<Vec<f32>> = cfg.class_weighted.then(|| {
        let counts = train.class_counts();
        let k = counts.len() as f32;
        let n: usize = counts.iter().sum();
        counts
            .iter()
            .map(|&c| n as f32 / (k * c.max(1) as f32))
            .collect()
    });
    if !resuming {
        let v = evaluate(&mut net, &val, &spec, &dev)?;
        eprintln!(
            "initial validation: acc {:.4} balanced {:.4}",
            v.accuracy, v.balanced_accuracy
        );
        log_line(dir, &serde_json::json!({"event": "init", "val": v}))?;
        net.relu_blend = relu_blend_at(&cfg, 0.0);
        if net.relu_blend.is_some() {
            calibrate(&mut net, &train, &spec, cfg.bn_calibration_images, &dev)?;
        }
    }
    if (cfg.range_penalty > 0.0 || cfg.off_data_penalty > 0.0) && state.range_bounds.is_empty() {
        let images = cfg.poly_fit_images.max(cfg.batch);
        let seen = observe_moments(
            &mut net,
            &train,
            &spec,
            images,
            &Augment::none(),
            None,
            &dev,
        )?;
        for (name, m) in seen {
            let lo = m.min.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
            let hi = m.max.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
            state.range_bounds.insert(name, 2.0 * lo.max(hi).max(1e-6));
        }
        eprintln!(
            "range penalty bounds (2x the largest clean |input|): {:?}",
            state.range_bounds
        );
    }
    // The off-data penalty's bounds: fixed for the run, like the range bounds they scale.
    let off_data_bounds: BTreeMap<String, f64> = state
        .range_bounds
        .iter()
        .map(|(k, &b)| (k.clone(), b * cfg.off_data_slack))
        .collect();
    let steps_per_epoch = train.len().div_ceil(cfg.batch);
    let start = Instant::now();
    let base_seconds = state.seconds;
    let mut last_ckpt = Instant::now();
    while state.epoch < cfg.epochs {
        let epoch = state.epoch;
        let mut order: Vec<usize> = (0..train.len()).collect();
        crate::data::shuffle(
            &mut order,
            &mut ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_mul(1000).wrapping_add(epoch as u64)),
        );
        let pb = ProgressBar::new(steps_per_epoch as u64);
        pb.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        pb.set_style(
            ProgressStyle::with_template(
                "epoch {prefix} [{bar:30}] {pos}/{len} {elapsed}<{eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        pb.set_prefix(format!("{}/{}", epoch + 1, cfg.epochs));
        pb.set_position(state.step as u64);
        let (mut loss_acc, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
        // Sum of the range penalty's unweighted term (0 when the penalty is off).
        let mut excess_acc = 0.0f64;
        // The same for the off-data probe.
        let mut off_data_acc = 0.0f64;
        let mut gnorm_max = 0.0f64;
        // Images left out of their step by --outlier-loss.
        let mut dropped_acc = 0usize;
        // The feature-distillation term, unweighted (0 when it is off).
        let mut feature_acc = 0.0f64;
        // Each step's loss and feature term: after the ReLU blend a few batches explode (losses
        // of 1e10 and more) and swamp the means, so the logs carry the medians too.
        let (mut step_losses, mut step_features) = (Vec::new(), Vec::new());
        while state.step < steps_per_epoch {
            let s = state.step;
            let idx = &order[s * cfg.batch..((s + 1) * cfg.batch).min(order.len())];
            let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed ^ ((epoch as u64) << 32) ^ s as u64);
            let (x, y) = make_batch(&train, idx, &cfg.augment, &spec, &mut rng, &dev)?;
            // With mixup: the partner labels and the weight of each image's own label.
            let (x, mix) = if cfg.mixup > 0.0 {
                let (xm, y2, l) = mixup_batch(&x, &y, cfg.mixup, &mut rng)?;
                (xm, Some((y2, l)))
            } else {
                (x, None)
            };
            net.relu_blend = relu_blend_at(&cfg, epoch as f64 + s as f64 / steps_per_epoch as f64);
            if net.relu_blend.is_some() && s > 0 && s % BLEND_CALIBRATION_STEPS == 0 {
                calibrate(&mut net, &train, &spec, cfg.bn_calibration_images, &dev)?;
            }
            let mut excess: Vec<Tensor> = Vec::new();
            // Each activation's input, student and teacher, for feature distillation.
            let want_features = cfg.feature_kd > 0.0;
            let mut features: Vec<(String, Tensor)> = Vec::new();
            let mut teacher_features: Vec<(String, Tensor)> = Vec::new();
            let logits = if cfg.range_penalty > 0.0 || want_features {
                let bounds = &state.range_bounds;
                let mut obs = |name: &str, y: &Tensor| -> candle_core::Result<()> {
                    if cfg.range_penalty > 0.0 {
                        if let Some(&b) = bounds.get(name) {
                            excess.push(range_excess(y, b)?);
                        }
                    }
                    if want_features {
                        features.push((name.to_string(), y.clone()));
                    }
                    Ok(())
                };
                net.forward(&x, !cfg.freeze_bn, Some(&mut obs))?
            } else {
                net.forward(&x, !cfg.freeze_bn, None)?
            };
            let teacher_logits = match teacher.as_mut() {
                Some(t) if want_features => {
                    let mut obs = |name: &str, y: &Tensor| -> candle_core::Result<()> {
                        teacher_features.push((name.to_string(), y.detach()));
                        Ok(())
                    };
                    Some(t.forward(&x, false, Some(&mut obs))?.detach())
                }
                Some(t) => Some(t.forward(&x, false, None)?.detach()),
                None => None,
            };
            // The images this step learns from (all, unless --outlier-loss leaves some out).
            let kept = if cfg.outlier_loss > 0.0 {
                let rows = rows_within_loss(
                    &logits,
                    teacher_logits.as_ref(),
                    &y,
                    cfg.kd_alpha,
                    cfg.kd_temperature,
                    cfg.outlier_loss,
                )?;
                dropped_acc += y.len() - rows.len();
                (rows.len() < y.len()).then_some(rows)
            } else {
                None
            };
            // The same rows as a tensor, for the logits and the feature maps alike.
            let kept_ix = kept
                .as_ref()
                .map(|rows| Tensor::new(rows.as_slice(), &dev))
                .transpose()?;
            let keep = |labels: &[u32]| -> Vec<u32> {
                match &kept {
                    Some(rows) => rows.iter().map(|&r| labels[r as usize]).collect(),
                    None => labels.to_vec(),
                }
            };
            let (step_logits, step_teacher) = match &kept_ix {
                Some(ix) => (
                    logits.index_select(ix, 0)?,
                    teacher_logits
                        .as_ref()
                        .map(|t| t.index_select(ix, 0))
                        .transpose()?,
                ),
                None => (logits.clone(), teacher_logits),
            };
            let loss_for = |labels: &[u32]| -> Result<Tensor> {
                Ok(match &step_teacher {
                    Some(tl) => kd_loss(
                        &step_logits,
                        tl,
                        labels,
                        cfg.kd_alpha,
                        cfg.kd_temperature,
                        class_w.as_deref(),
                    )?,
                    None => cross_entropy(&step_logits, labels, class_w.as_deref())?,
                })
            };
            // Mixup: the loss is linear in the hard-label term, so the mixed loss is the two
            // labels' losses weighted l and 1-l (the KD term is the same in both).
            let loss = match &mix {
                Some((y2, l)) => {
                    ((loss_for(&keep(&y))? * *l)? + (loss_for(&keep(y2))? * (1.0 - l))?)?
                }
                None => loss_for(&keep(&y))?,
            };
            let loss = if want_features {
                // The same images as the logit terms (--outlier-loss may leave some out).
                let rows = |f: Vec<(String, Tensor)>| -> Result<Vec<(String, Tensor)>> {
                    match &kept_ix {
                        Some(ix) => f
                            .into_iter()
                            .map(|(n, t)| Ok((n, t.index_select(ix, 0)?)))
                            .collect(),
                        None => Ok(f),
                    }
                };
                let f = feature_kd_loss(&rows(features)?, &rows(teacher_features)?)?;
                let fv = f.to_scalar::<f32>()? as f64;
                feature_acc += fv * idx.len() as f64;
                step_features.push(fv);
                (loss + (f * cfg.feature_kd)?)?
            } else {
                loss
            };
            let loss = if excess.is_empty() {
                loss
            } else {
                let e = Tensor::stack(&excess, 0)?.sum_all()?;
                excess_acc += e.to_scalar::<f32>()? as f64 * idx.len() as f64;
                (loss + (e * cfg.range_penalty)?)?
            };
            let loss = if cfg.off_data_penalty > 0.0 {
                let probe =
                    off_data_batch(&train, idx, &cfg.off_data_kinds, &spec, &mut rng, &dev)?;
                let e = off_data_excess(&mut net, &probe, &off_data_bounds)?;
                off_data_acc += e.to_scalar::<f32>()? as f64 * idx.len() as f64;
                (loss + (e * cfg.off_data_penalty)?)?
            } else {
                loss
            };
            let lv = loss.to_scalar::<f32>()? as f64;
            if !lv.is_finite() {
                bail!(
                    "loss became {lv} at epoch {epoch} step {s}; lower --lr or raise --clip-norm"
                );
            }
            let grads = loss.backward()?;
            let lr = lr_at(&cfg, epoch as f64 + s as f64 / steps_per_epoch as f64);
            let gnorm = sgd_nesterov_step(&net, &grads, &mut mom, lr, &cfg)?;
            gnorm_max = gnorm_max.max(gnorm);
            let pred = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
            // Under mixup an image counts as right when it predicts its larger share's label.
            let truth = match &mix {
                Some((y2, l)) if *l < 0.5 => y2,
                _ => &y,
            };
            correct += pred.iter().zip(truth).filter(|(p, t)| p == t).count();
            seen += y.len();
            loss_acc += lv * y.len() as f64;
            step_losses.push(lv);
            state.step += 1;
            pb.inc(1);
            pb.set_message(format!(
                "loss (median) {:.4} acc {:.4} lr {:.4}",
                median(&step_losses),
                correct as f64 / seen as f64,
                lr
            ));
            if state.step % 50 == 0 {
                log_line(
                    dir,
                    &serde_json::json!({"event": "step", "epoch": epoch, "step": state.step, "lr": lr,
                    "loss": loss_acc / seen as f64, "loss_median": median(&step_losses),
                    "train_acc": correct as f64 / seen as f64,
                    "range_excess": excess_acc / seen as f64, "off_data_excess": off_data_acc / seen as f64,
                    "feature_kd": feature_acc / seen as f64, "feature_kd_median": median(&step_features),
                    "outliers_left_out": dropped_acc}),
                )?;
            }
            steps_done += 1;
            let limit_hit =
                max_steps.is_some_and(|m| steps_done >= m) && state.step < steps_per_epoch;
            if limit_hit
                || (cfg.checkpoint_minutes > 0.0
                    && last_ckpt.elapsed().as_secs_f64() > cfg.checkpoint_minutes * 60.0)
            {
                state.seconds = base_seconds + start.elapsed().as_secs_f64();
                save_checkpoint(dir, &net, &mom, &state)?;
                last_ckpt = Instant::now();
            }
            if limit_hit {
                pb.finish_and_clear();
                return Ok(state);
            }
        }
        pb.finish_and_clear();
        net.relu_blend = None;
        calibrate(&mut net, &train, &spec, cfg.bn_calibration_images, &dev)?;
        let v = evaluate(&mut net, &val, &spec, &dev)?;
        // Statistics for the function the next epoch starts training.
        net.relu_blend = relu_blend_at(&cfg, (epoch + 1) as f64);
        if net.relu_blend.is_some() {
            calibrate(&mut net, &train, &spec, cfg.bn_calibration_images, &dev)?;
        }
        state.epoch += 1;
        state.step = 0;
        state.seconds = base_seconds + start.elapsed().as_secs_f64();
        let train_loss = if seen > 0 {
            loss_acc / seen as f64
        } else {
            f64::NAN
        };
        let train_acc = if seen > 0 {
            correct as f64 / seen as f64
        } else {
            f64::NAN
        };
        eprintln!(
            "epoch {}/{}: train loss {:.4} (median {:.4}) acc {:.4} | val acc {:.4} balanced {:.4} loss {:.4} | {:.0}s",
            state.epoch, cfg.epochs, train_loss, median(&step_losses), train_acc, v.accuracy, v.balanced_accuracy, v.loss, state.seconds
        );
        log_line(
            dir,
            &serde_json::json!({"event": "epoch", "epoch": state.epoch, "train_loss": train_loss,
            "train_loss_median": median(&step_losses),
            "train_acc": train_acc, "val": v, "seconds": state.seconds, "outliers_left_out": dropped_acc,
            "off_data_excess": if seen > 0 { off_data_acc / seen as f64 } else { f64::NAN },
            "feature_kd": if seen > 0 { feature_acc / seen as f64 } else { f64::NAN },
            "feature_kd_median": median(&step_features)}),
        )?;
        state.last_val = Some(v);
        save_checkpoint(dir, &net, &mom, &state)?;
        last_ckpt = Instant::now();
    }
    Ok(state)
}

/// `mean(relu(|y| - bound)^2) / bound^2`: zero while a unit's inputs stay within `bound`.
pub fn range_excess(y: &Tensor, bound: f64) -> candle_core::Result<Tensor> {
    let over = (y.abs()? - bound)?.relu()?;
    over.sqr()?.mean_all()? / (bound * bound)
}

/// `mean(ln(1 + relu(|y| - B) / B)^2)`: like [`range_excess`] for small excesses (both
/// ~ `(excess / B)^2`), but growing only as the squared log of huge ones, so an input of 1e30
/// still gives a finite loss and a gradient pointing back into range.
pub fn log_range_excess(y: &Tensor, bound: f64) -> candle_core::Result<Tensor> {
    let over = ((y.abs()? - bound)?.relu()? / bound)?;
    (over + 1.0)?.log()?.sqr()?.mean_all()
}

/// How far past its clean range a unit's input may go in the off-data probe before it is
/// clamped (a multiple of the bound): far enough that the log penalty still grows, near
/// enough that the stacked quadratics after it stay finite in f32.
const OFF_DATA_CLAMP: f64 = 1e3;

/// The off-data probe: `idx.len()` images that are not from the task, cycling through
/// `kinds` - uniform noise over 0-255 (any upload), noise within 1.5 standard deviations of
/// the normalization mean (what `beaa bench inference` feeds), and the step's own images
/// under a heavy random affine change (scale 0.4-1.6, so often shrunk into a black frame,
/// rotation up to 30 degrees, translation up to a quarter) or shifted by up to a quarter
/// with black borders, half of them flipped.
pub fn off_data_batch(
    ds: &Dataset,
    idx: &[usize],
    kinds: &[ProbeKind],
    spec: &InputSpec,
    rng: &mut ChaCha8Rng,
    dev: &Device,
) -> Result<Tensor> {
    if kinds.is_empty() {
        bail!("the off-data probe needs at least one kind of image");
    }
    let (h, w, c) = (ds.h, ds.w, ds.c);
    let per = h * w * c;
    let affine = Augment {
        pad_crop: 0,
        hflip: true,
        rotate_deg: 30.0,
        scale: 0.6,
        translate: w as f32 / 4.0,
    };
    let shift = Augment {
        pad_crop: w / 4,
        hflip: true,
        ..Augment::none()
    };
    let mut buf = vec![0f32; idx.len() * per];
    let mut pixels = vec![0u8; per];
    for (k, (&i, out)) in idx.iter().zip(buf.chunks_exact_mut(per)).enumerate() {
        match kinds[k % kinds.len()] {
            ProbeKind::Noise255 => {
                rand_core::RngCore::fill_bytes(rng, &mut pixels);
                augment_normalize(
                    &pixels,
                    (h, w, c),
                    &Augment::none(),
                    &spec.mean,
                    &spec.std,
                    rng,
                    out,
                );
            }
            ProbeKind::Noise => {
                for v in out.iter_mut() {
                    *v = (rand_core::RngCore::next_u32(rng) as f64 / u32::MAX as f64 * 3.0 - 1.5)
                        as f32;
                }
            }
            kind @ (ProbeKind::Affine | ProbeKind::Shift) => {
                let aug = if kind == ProbeKind::Affine {
                    &affine
                } else {
                    &shift
                };
                augment_normalize(ds.image(i), (h, w, c), aug, &spec.mean, &spec.std, rng, out)
            }
        }
    }
    Ok(Tensor::from_vec(buf, (idx.len(), h, w, c), dev)?)
}

/// The off-data penalty's unweighted term on `probe`: the inference function (quadratics
/// alone, batch norm in eval mode), each unit's [`log_range_excess`] against its bound,
/// summed over units; inputs clamped at [`OFF_DATA_CLAMP`] bounds so that deeper layers stay
/// finite. The net's blend and clamps are restored afterwards.
pub fn off_data_excess(
    net: &mut Net,
    probe: &Tensor,
    bounds: &BTreeMap<String, f64>,
) -> Result<Tensor> {
    let blend = net.relu_blend.take();
    net.input_clamp = bounds
        .iter()
        .map(|(k, &b)| (k.clone(), b * OFF_DATA_CLAMP))
        .collect();
    let mut excess: Vec<Tensor> = Vec::new();
    let mut obs = |name: &str, y: &Tensor| -> candle_core::Result<()> {
        if let Some(&b) = bounds.get(name) {
            excess.push(log_range_excess(y, b)?);
        }
        Ok(())
    };
    let out = net.forward(probe, false, Some(&mut obs));
    net.relu_blend = blend;
    net.input_clamp.clear();
    out?;
    if excess.is_empty() {
        bail!("the off-data penalty needs polynomial units with range bounds");
    }
    Ok(Tensor::stack(&excess, 0)?.sum_all()?)
}

/// Batch-norm re-estimation on `images` training images spread over the split (no augmentation).
pub fn calibrate(
    net: &mut Net,
    train: &Dataset,
    spec: &InputSpec,
    images: usize,
    dev: &Device,
) -> Result<()> {
    if images == 0 {
        return Ok(());
    }
    let n = images.min(train.len());
    let idx: Vec<usize> = (0..n).map(|i| i * train.len() / n).collect();
    let (x, _) = make_batch(
        train,
        &idx,
        &Augment::none(),
        spec,
        &mut ChaCha8Rng::seed_from_u64(2),
        dev,
    )?;
    net.recalibrate_bn(&x)?;
    Ok(())
}

/// The deviation of an element-wise coefficient tensor (`[H, W, C]`) from its per-channel
/// mean: the gradient of `0.5 * sum (p - mean_c p)^2` (the mean's own terms sum to zero).
fn channel_spread(p: &Tensor) -> Result<Tensor> {
    Ok(p.broadcast_sub(&p.mean_keepdim((0, 1))?)?)
}

fn sgd_nesterov_step(
    net: &Net,
    grads: &candle_core::backprop::GradStore,
    mom: &mut HashMap<String, Tensor>,
    lr: f64,
    cfg: &TrainConfig,
) -> Result<f64> {
    let mut scale = 1.0;
    let mut norm = f64::NAN;
    if cfg.clip_norm > 0.0 {
        let mut sq = 0.0f64;
        for v in net.vars.values() {
            if let Some(g) = grads.get(v) {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        norm = sq.sqrt();
        if norm > cfg.clip_norm {
            scale = cfg.clip_norm / norm;
        }
    }
    let spread_decayed: HashSet<String> = if cfg.poly_spread_decay > 0.0 {
        net.element_poly_names().into_iter().collect()
    } else {
        HashSet::new()
    };
    for (name, v) in &net.vars {
        let Some(g) = grads.get(v) else { continue };
        // PyTorch-style: g += wd*p; buf = mu*buf + g; p -= lr*(g + mu*buf)
        let mut g = ((g * scale)? + (v.as_tensor() * cfg.weight_decay)?)?;
        if spread_decayed.contains(name) {
            g = (g + (channel_spread(v.as_tensor())? * cfg.poly_spread_decay)?)?;
        }
        let buf = match mom.get(name) {
            Some(b) => ((b * cfg.momentum)? + &g)?,
            None => g.clone(),
        }
        .detach();
        let upd = (&g + (&buf * cfg.momentum)?)?;
        v.set(&(v.as_tensor() - (upd * lr)?)?.detach())?;
        mom.insert(name.clone(), buf);
    }
    Ok(norm)
}

fn log_line(dir: &Path, v: &serde_json::Value) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("log.jsonl"))?;
    let mut v = v.clone();
    if let Some(o) = v.as_object_mut() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        o.insert("time".into(), serde_json::json!(t));
    }
    writeln!(f, "{v}")?;
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn quadratic_fit_recovers_relu_on_symmetric_range() {
        // samples uniform on [-1, 1]
        let mut s = [0f64; 8];
        let n = 2001;
        for i in 0..n {
            let x = -1.0 + 2.0 * i as f64 / (n - 1) as f64;
            let r = x.max(0.0);
            for (k, v) in [1.0, x, x * x, x * x * x, x.powi(4), r, r * x, r * x * x]
                .iter()
                .enumerate()
            {
                s[k] += v;
            }
        }
        let (a, b, c) = solve_quadratic_fit(&s);
        // continuous LS fit of relu on [-1,1]: a = 15/32, b = 1/2, c = 3/32
        assert!((a - 15.0 / 32.0).abs() < 1e-2, "{a}");
        assert!((b - 0.5).abs() < 1e-3, "{b}");
        assert!((c - 3.0 / 32.0).abs() < 1e-2, "{c}");
    }

    /// A fresh temporary directory for one test (`tag` and the process id) with ten tiny
    /// images per class under `data`: returns (root, data).
    pub(crate) fn fresh_tiny_data(tag: &str) -> Result<(PathBuf, PathBuf)> {
        let root = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let data = root.join("data");
        write_two_class_images(&data, 10)?;
        Ok((root, data))
    }

    /// Two classes ("dark", "light") of `per_class` 8x8 PNG images under `dir`.
    fn write_two_class_images(dir: &Path, per_class: u32) -> Result<()> {
        for (c, shade) in [("dark", 40u8), ("light", 200u8)] {
            std::fs::create_dir_all(dir.join(c))?;
            for k in 0..per_class {
                image::RgbImage::from_fn(8, 8, |x, y| {
                    image::Rgb([shade, (x * 20 + k) as u8, (y * 20) as u8])
                })
                .save_with_format(
                    dir.join(c).join(format!("{k}.png")),
                    image::ImageFormat::Png,
                )?;
            }
        }
        Ok(())
    }

    /// The SqueezeNet graph at 8x8 input, two classes and 2-4 channels per layer.
    fn tiny_arch() -> SqueezeNetSpec {
        SqueezeNetSpec {
            in_channels: 3,
            height: 8,
            width: 8,
            classes: 2,
            conv1: 4,
            fire1: (2, 3, 3),
            fire2: (2, 3, 3),
            conv2: 4,
            conv3: 4,
        }
    }

    /// Progressive fitting changes nothing for the first activation (its inputs do not depend
    /// on any polynomial) and refits the later ones on the polynomial network's own inputs;
    /// it leaves no layer on ReLU and every coefficient finite.
    #[test]
    fn progressive_fit_refits_later_layers_only() -> Result<()> {
        let root = std::env::temp_dir().join(format!("beaa-progfit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        write_two_class_images(&root, 12)?;
        let spec = InputSpec {
            channels: 3,
            height: 8,
            width: 8,
            mean: vec![0.5; 3],
            std: vec![0.25; 3],
            resize: ResizePolicy::Stretch,
        };
        let ds = Dataset::load(&root, &spec)?;
        let arch = tiny_arch();
        let dev = Device::Cpu;
        let coefs = |progressive: bool| -> Result<BTreeMap<String, Vec<f32>>> {
            let mut net = Net::new(arch.clone(), ActKind::Element, 5, &dev)?;
            let fit = PolyFit {
                images: 24,
                shrink: 1.0,
                range: 0.0,
                progressive,
                calibration_images: 24,
            };
            fit_polys_to_relu(&mut net, &ds, &spec, &Augment::none(), &fit, &dev)?;
            assert!(net.relu_units.is_empty());
            let mut out = BTreeMap::new();
            for (k, v) in &net.vars {
                if k.contains(".poly_") {
                    let v = v.as_tensor().flatten_all()?.to_vec1::<f32>()?;
                    assert!(v.iter().all(|x| x.is_finite()), "{k}");
                    out.insert(k.clone(), v);
                }
            }
            Ok(out)
        };
        let (all, prog) = (coefs(false)?, coefs(true)?);
        for p in ["a", "b", "c"] {
            let k = format!("conv1.poly_{p}");
            assert_eq!(all[&k], prog[&k], "{k}");
        }
        assert_ne!(all["conv3.poly_a"], prog["conv3.poly_a"]);
        let _ = std::fs::remove_dir_all(&root);
        Ok(())
    }

    #[test]
    fn uniform_moments_match_dense_samples() {
        for (lo, hi) in [(-1.0, 1.0), (-3.0, 0.5), (0.25, 4.0), (-2.0, -0.5)] {
            let n = 200_001;
            let mut s = [0f64; 8];
            for i in 0..n {
                let x: f64 = lo + (hi - lo) * (i as f64 + 0.5) / n as f64;
                let r = x.max(0.0);
                for (k, v) in [1.0, x, x * x, x.powi(3), x.powi(4), r, r * x, r * x * x]
                    .iter()
                    .enumerate()
                {
                    s[k] += v / n as f64;
                }
            }
            let u = uniform_moments(lo, hi, 1.0);
            for k in 0..8 {
                assert!(
                    (u[k] - s[k]).abs() < 1e-6 * (1.0 + s[k].abs()),
                    "{lo} {hi} k={k}: {} vs {}",
                    u[k],
                    s[k]
                );
            }
        }
        // a point mass when the range is empty
        assert_eq!(uniform_moments(2.0, 2.0, 3.0)[6], 3.0 * 4.0);
    }

    #[test]
    fn kd_loss_is_ce_when_alpha_zero_and_zero_kl_for_identical_logits() -> Result<()> {
        let dev = Device::Cpu;
        let s = Tensor::new(&[[1.0f32, 2.0, 0.5], [0.0, -1.0, 3.0]], &dev)?;
        let y = [1u32, 2];
        let ce = cross_entropy(&s, &y, None)?.to_scalar::<f32>()?;
        let kd0 = kd_loss(&s, &s, &y, 0.0, 4.0, None)?.to_scalar::<f32>()?;
        assert!((ce - kd0).abs() < 1e-6);
        let kd1 = kd_loss(&s, &s, &y, 1.0, 4.0, None)?.to_scalar::<f32>()?;
        assert!(kd1.abs() < 1e-6);
        let other = Tensor::new(&[[3.0f32, 0.0, 0.5], [2.0, -1.0, 0.0]], &dev)?;
        assert!(kd_loss(&s, &other, &y, 1.0, 4.0, None)?.to_scalar::<f32>()? > 1e-3);
        // hand-computed CE of the first row
        let lse = (1f32.exp() + 2f32.exp() + 0.5f32.exp()).ln();
        let ce1 = cross_entropy(&s.narrow(0, 0, 1)?, &y[..1], None)?.to_scalar::<f32>()?;
        assert!((ce1 - (lse - 2.0)).abs() < 1e-5);
        Ok(())
    }

    /// Interrupting a run mid-epoch and resuming gives bit-identical weights to an
    /// uninterrupted run (seeded order and augmentation, saved momentum and BN statistics).
    #[test]
    fn a_preset_is_recovered_from_the_data_set_name_it_records() {
        for p in [Preset::Cifar10, Preset::Octdl] {
            assert_eq!(Preset::of_dataset(p.dataset_name()), p);
        }
        assert_eq!(Preset::Octdl.default_input().channels, 1);
        assert_eq!(Preset::Cifar10.default_input().height, 32);
    }

    #[test]
    fn per_image_loss_agrees_with_the_batch_losses() -> Result<()> {
        let dev = Device::Cpu;
        let s = [1.5f32, -0.5, 3.0, 0.25];
        let t = [0.5f32, 2.0, -1.0, 0.0];
        let st = Tensor::new(&[s], &dev)?;
        let tt = Tensor::new(&[t], &dev)?;
        for label in 0..4u32 {
            let ce = cross_entropy(&st, &[label], None)?.to_scalar::<f32>()? as f64;
            assert!((per_image_loss(&s, None, label, 0.9, 4.0) - ce).abs() < 1e-5);
            let kd = kd_loss(&st, &tt, &[label], 0.9, 4.0, None)?.to_scalar::<f32>()? as f64;
            assert!((per_image_loss(&s, Some(&t), label, 0.9, 4.0) - kd).abs() < 1e-4);
        }
        assert_eq!(
            per_image_loss(&[f32::NAN, 0.0], None, 0, 0.9, 4.0),
            f64::INFINITY
        );
        Ok(())
    }

    #[test]
    fn rows_within_loss_leave_out_exploded_images_but_never_all() -> Result<()> {
        let dev = Device::Cpu;
        // Row 1 has exploded (loss ~1e6 for its label); rows 0 and 2 are ordinary.
        let s = Tensor::new(&[[2.0f32, 0.0], [-1e6, 1e6], [0.0, 1.0]], &dev)?;
        let t = Tensor::new(&[[1.0f32, 0.0], [1.0, 0.0], [0.0, 1.0]], &dev)?;
        assert_eq!(
            rows_within_loss(&s, Some(&t), &[0, 0, 1], 0.9, 4.0, 100.0)?,
            vec![0, 2]
        );
        assert_eq!(
            rows_within_loss(&s, None, &[0, 0, 1], 0.9, 4.0, 100.0)?,
            vec![0, 2]
        );
        // Every image over the limit: the smallest loss stays.
        assert_eq!(
            rows_within_loss(&s, None, &[1, 0, 0], 0.9, 4.0, 1e-3)?,
            vec![2]
        );
        Ok(())
    }

    /// The "epoch" lines of a run's `log.jsonl`.
    fn epoch_lines(run_dir: &Path) -> Result<Vec<serde_json::Value>> {
        let log = std::fs::read_to_string(run_dir.join("log.jsonl"))?;
        Ok(log
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["event"] == "epoch")
            .collect())
    }

    #[test]
    fn outlier_loss_limit_leaves_images_out_of_their_steps() -> Result<()> {
        let (root, data) = fresh_tiny_data("beaa-outlier")?;
        // A limit below any loss: each step keeps exactly its best image.
        let cfg = TrainConfig {
            outlier_loss: 1e-9,
            ..tiny_config(data)
        };
        let state = run(&root.join("run"), cfg)?;
        assert_eq!(state.epoch, 2);
        let epochs = epoch_lines(&root.join("run"))?;
        let left_out: Vec<u64> = epochs
            .iter()
            .map(|v| v["outliers_left_out"].as_u64().unwrap_or(0))
            .collect();
        // 16 training images in batches of 4: 4 steps, each leaving out 3.
        assert_eq!(left_out, vec![12, 12]);
        // The epoch lines carry the median step loss; no feature term ran, so no median of it.
        for v in &epochs {
            assert!(v["train_loss_median"]
                .as_f64()
                .is_some_and(|m| m.is_finite() && m > 0.0));
            assert!(v["feature_kd_median"].is_null());
        }
        let _ = std::fs::remove_dir_all(&root);
        Ok(())
    }

    #[test]
    fn resume_mid_epoch_is_exact() -> Result<()> {
        resume_mid_epoch_is_exact_with(0.0, 0.0, false, 0.0)
    }

    /// Stopped inside the ReLU blend: the blend follows from the step, so resuming is exact.
    #[test]
    fn resume_inside_the_relu_blend_is_exact() -> Result<()> {
        resume_mid_epoch_is_exact_with(0.0, 1.5, false, 0.0)
    }

    /// With the range penalty: the bounds are fixed at the start and kept in state.json, so a
    /// resumed run trains exactly as an uninterrupted one.
    #[test]
    fn resume_with_range_penalty_is_exact() -> Result<()> {
        resume_mid_epoch_is_exact_with(0.5, 0.0, false, 0.0)
    }

    /// With channel shares: they are trained, checkpointed and resumed like any parameter.
    #[test]
    fn resume_with_channel_shares_is_exact() -> Result<()> {
        resume_mid_epoch_is_exact_with(0.0, 0.0, true, 0.0)
    }

    /// With mixup: each step's mixing weight and partners come from the step's own seed.
    #[test]
    fn resume_with_mixup_is_exact() -> Result<()> {
        resume_mid_epoch_is_exact_with(0.0, 0.0, false, 0.4)
    }

    #[test]
    fn mixup_reaches_the_training_steps() -> Result<()> {
        let (root, data) = fresh_tiny_data("beaa-mixup-steps")?;
        let with = |mixup: f64| TrainConfig {
            mixup,
            epochs: 1,
            ..tiny_config(data.clone())
        };
        run(&root.join("plain"), with(0.0))?;
        run(&root.join("mixed"), with(0.4))?;
        // Same seeds, same batches: only mixing the images can make the weights differ.
        let dev = Device::Cpu;
        let a = candle_core::safetensors::load(root.join("plain/checkpoint.safetensors"), &dev)?;
        let b = candle_core::safetensors::load(root.join("mixed/checkpoint.safetensors"), &dev)?;
        let w = |m: &HashMap<String, Tensor>| m["conv1.weight"].flatten_all()?.to_vec1::<f32>();
        assert_ne!(w(&a)?, w(&b)?, "mixup left the training steps unchanged");
        std::fs::remove_dir_all(&root).unwrap();
        Ok(())
    }

    #[test]
    fn beta_draws_are_symmetric_and_spread_by_their_parameter() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for (a, var) in [
            (0.2, 1.0 / (4.0 * 1.4)),
            (1.0, 1.0 / 12.0),
            (4.0, 1.0 / 36.0),
        ] {
            let draws: Vec<f64> = (0..20_000).map(|_| beta_symmetric(a, &mut rng)).collect();
            assert!(draws.iter().all(|&d| (0.0..=1.0).contains(&d)));
            let mean = draws.iter().sum::<f64>() / draws.len() as f64;
            let v = draws.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / draws.len() as f64;
            // Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
            assert!((mean - 0.5).abs() < 0.01, "a {a}: mean {mean}");
            assert!(
                (v - var).abs() < 0.05 * var,
                "a {a}: variance {v} against {var}"
            );
        }
    }

    #[test]
    fn feature_kd_loss_is_relative_to_each_channels_spread() -> Result<()> {
        let dev = Device::Cpu;
        // 16 positions, two channels: +-1 (variance 1) and +-5 (variance 25).
        let sign: Vec<f32> = (0..16)
            .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let vals: Vec<f32> = sign.iter().flat_map(|&v| [v, 5.0 * v]).collect();
        let t = Tensor::from_vec(vals, (4, 2, 2, 2), &dev)?;
        let unit = |n: &str, x: &Tensor| vec![(n.to_string(), x.clone())];
        let same = feature_kd_loss(&unit("u", &t), &unit("u", &t))?.to_scalar::<f32>()?;
        assert_eq!(same, 0.0);
        // Half a standard deviation off in each channel: 0.25 whatever the channel's scale.
        let s = t.broadcast_add(&Tensor::new(&[0.5f32, 2.5], &dev)?)?;
        let off = feature_kd_loss(&unit("u", &s), &unit("u", &t))?.to_scalar::<f32>()?;
        assert!((off - 0.25).abs() < 1e-6, "{off}");
        // Averaged over units: one exact unit and one off by half a deviation.
        let two_s = [unit("u", &t), unit("v", &s)].concat();
        let two_t = [unit("u", &t), unit("v", &t)].concat();
        let avg = feature_kd_loss(&two_s, &two_t)?.to_scalar::<f32>()?;
        assert!((avg - 0.125).abs() < 1e-6, "{avg}");
        // A constant teacher channel is measured against 1% of the unit's mean variance.
        let flat = Tensor::cat(&[&t.narrow(3, 0, 1)?, &t.narrow(3, 0, 1)?.zeros_like()?], 3)?;
        let s = flat.broadcast_add(&Tensor::new(&[0.0f32, 0.1], &dev)?)?;
        let floored = feature_kd_loss(&unit("u", &s), &unit("u", &flat))?.to_scalar::<f32>()?;
        // floor = 0.01 * (1 + 0) / 2; error 0.01 / floor = 2, averaged with channel 0's 0.
        assert!((floored - 1.0).abs() < 1e-5, "{floored}");
        assert!(feature_kd_loss(&unit("u", &t), &unit("w", &t)).is_err());
        assert!(feature_kd_loss(&[], &[]).is_err());
        Ok(())
    }

    /// Every activation unit's input on the images `x`, from a saved run's network.
    fn unit_inputs(run_dir: &Path, x: &Tensor) -> Result<Vec<(String, Tensor)>> {
        let (_, mut net) = load_run(run_dir, &Device::Cpu)?;
        let mut out = Vec::new();
        let mut obs = |name: &str, y: &Tensor| -> candle_core::Result<()> {
            out.push((name.to_string(), y.clone()));
            Ok(())
        };
        net.forward(x, false, Some(&mut obs))?;
        Ok(out)
    }

    #[test]
    fn feature_kd_pulls_the_students_layers_toward_the_teacher_and_resumes_exactly() -> Result<()> {
        let (root, data) = fresh_tiny_data("beaa-feature-kd")?;
        let teacher_dir = root.join("teacher");
        let teacher_cfg = TrainConfig {
            act: ActKind::Relu,
            bn_calibration_images: 0,
            ..tiny_config(data.clone())
        };
        run(&teacher_dir, teacher_cfg.clone())?;
        let student = |feature_kd: f64| TrainConfig {
            teacher: Some(teacher_dir.clone()),
            init_from: Some(teacher_dir.clone()),
            freeze_bn: true,
            feature_kd,
            ..tiny_config(data.clone())
        };
        // Without a teacher the flag is refused, not ignored.
        let lone = TrainConfig {
            feature_kd: 1.0,
            ..tiny_config(data.clone())
        };
        assert!(run(&root.join("lone"), lone).is_err());
        run(&root.join("with"), student(5.0))?;
        run(&root.join("without"), student(0.0))?;
        // Together with --outlier-loss (all but each step's best image left out): the step
        // cuts the feature maps by the same row index as the logits and logs both terms.
        let cut = TrainConfig {
            outlier_loss: 1e-9,
            ..student(5.0)
        };
        run(&root.join("cut"), cut)?;
        let epochs = epoch_lines(&root.join("cut"))?;
        assert_eq!(epochs.len(), 2);
        for v in &epochs {
            assert_eq!(v["outliers_left_out"].as_u64(), Some(12));
            assert!(v["feature_kd_median"].as_f64().is_some_and(f64::is_finite));
        }
        // Stopped after 3 steps and resumed: bit-identical to the uninterrupted run.
        run_limited(&root.join("resumed"), student(5.0), Some(3))?;
        run(&root.join("resumed"), student(5.0))?;
        assert_same_checkpoints(&root.join("with"), &root.join("resumed"))?;
        let dev = Device::Cpu;
        // The term pulls: the student trained with it ends nearer the teacher's layers.
        let mut cfg = teacher_cfg;
        let (train, _) = load_data(&mut cfg)?;
        let idx: Vec<usize> = (0..train.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let (x, _) = make_batch(&train, &idx, &Augment::none(), &cfg.input, &mut rng, &dev)?;
        let t = unit_inputs(&teacher_dir, &x)?;
        let dist = |run_dir: &str| -> Result<f32> {
            let s = unit_inputs(&root.join(run_dir), &x)?;
            Ok(feature_kd_loss(&s, &t)?.to_scalar::<f32>()?)
        };
        let (with, without) = (dist("with")?, dist("without")?);
        assert!(with < 0.8 * without, "with {with} without {without}");
        std::fs::remove_dir_all(&root).unwrap();
        Ok(())
    }

    #[test]
    fn mixup_mixes_each_image_with_the_partner_whose_label_it_returns() -> Result<()> {
        let dev = Device::Cpu;
        // Image k is the constant k, so a mixed image tells its partner.
        let x = Tensor::from_vec(
            (0..6).flat_map(|k| vec![k as f32; 4]).collect::<Vec<_>>(),
            (6, 1, 2, 2),
            &dev,
        )?;
        let y = [10u32, 11, 12, 13, 14, 15];
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (m, partner, l) = mixup_batch(&x, &y, 0.4, &mut rng)?;
        assert!((0.0..=1.0).contains(&l));
        let m = m.flatten_from(1)?.to_vec2::<f32>()?;
        let mut partners: Vec<u32> = partner.clone();
        partners.sort();
        assert_eq!(
            partners,
            y.to_vec(),
            "partners are a permutation of the batch"
        );
        for (k, row) in m.iter().enumerate() {
            let p = (partner[k] - 10) as f64;
            let want = l * k as f64 + (1.0 - l) * p;
            assert!(
                row.iter().all(|&v| (v as f64 - want).abs() < 1e-5),
                "{row:?} {want}"
            );
        }
        Ok(())
    }

    #[test]
    fn channel_spread_is_the_deviation_from_each_channel_mean() -> Result<()> {
        // [H=1, W=2, C=2]: channel 0 holds 1 and 3, channel 1 holds 5 and 5.
        let p = Tensor::from_vec(vec![1f32, 5.0, 3.0, 5.0], (1, 2, 2), &Device::Cpu)?;
        let d = channel_spread(&p)?.flatten_all()?.to_vec1::<f32>()?;
        assert_eq!(d, vec![-1.0, 0.0, 1.0, 0.0]);
        Ok(())
    }

    /// The same tiny run with and without spread decay: with it, each element-wise
    /// coefficient ends much closer to its channel's mean.
    #[test]
    fn spread_decay_pulls_element_coefficients_toward_their_channel_mean() -> Result<()> {
        let (root, data) = fresh_tiny_data("beaa-spread")?;
        let spread_after = |decay: f64| -> Result<f32> {
            let dir = root.join(format!("run-{decay}"));
            let cfg = TrainConfig {
                poly_spread_decay: decay,
                ..tiny_config(data.clone())
            };
            run(&dir, cfg)?;
            let ck =
                candle_core::safetensors::load(dir.join("checkpoint.safetensors"), &Device::Cpu)?;
            let mut sq = 0f32;
            for k in POLY_COEFS {
                let p = &ck[&format!("conv1.poly_{k}")];
                sq += channel_spread(p)?.sqr()?.sum_all()?.to_scalar::<f32>()?;
            }
            Ok(sq)
        };
        let free = spread_after(0.0)?;
        let pulled = spread_after(5.0)?;
        assert!(free > 0.0, "training spreads the coefficients");
        assert!(
            pulled < free / 4.0,
            "spread {pulled} with decay, {free} without"
        );
        std::fs::remove_dir_all(&root).unwrap();
        Ok(())
    }

    #[test]
    fn range_excess_is_zero_inside_and_pulls_outliers_in() -> Result<()> {
        let dev = Device::Cpu;
        let y = candle_core::Var::from_vec(vec![0.5f32, -1.0, 3.0, -0.9], 4, &dev)?;
        let e = range_excess(y.as_tensor(), 1.0)?;
        assert!((e.to_scalar::<f32>()? - 1.0).abs() < 1e-6); // (3 - 1)^2 / 4
        let g = e.backward()?;
        let g = g.get(y.as_tensor()).expect("gradient").to_vec1::<f32>()?;
        assert_eq!(&g[..2], &[0.0, 0.0]);
        assert!((g[2] - 1.0).abs() < 1e-6 && g[3] == 0.0, "{g:?}"); // 2 (3 - 1) / 4
        assert_eq!(
            range_excess(&Tensor::new(&[0.3f32, -2.0], &dev)?, 2.0)?.to_scalar::<f32>()?,
            0.0
        );
        Ok(())
    }

    #[test]
    fn log_range_excess_matches_the_square_near_the_range_and_stays_finite_far_out() -> Result<()> {
        let dev = Device::Cpu;
        let inside = Tensor::new(&[0.3f32, -2.0], &dev)?;
        assert_eq!(log_range_excess(&inside, 2.0)?.to_scalar::<f32>()?, 0.0);
        // A small excess: ln(1 + r)^2 ~ r^2, as range_excess.
        let near = Tensor::new(&[2.02f32], &dev)?;
        let (l, q) = (
            log_range_excess(&near, 2.0)?.to_scalar::<f32>()?,
            range_excess(&near, 2.0)?.to_scalar::<f32>()?,
        );
        assert!((l - q).abs() < 0.02 * q, "{l} vs {q}");
        // 1e30 (past f32's square): finite loss, finite gradient pointing back into range.
        let y = candle_core::Var::from_vec(vec![1e30f32, -1e30, 1.0], 3, &dev)?;
        let e = log_range_excess(y.as_tensor(), 1.0)?;
        let v = e.to_scalar::<f32>()?;
        assert!(v.is_finite() && v > 1000.0, "{v}");
        let g = e.backward()?;
        let g = g.get(y.as_tensor()).expect("gradient").to_vec1::<f32>()?;
        assert!(g[0] > 0.0 && g[1] < 0.0 && g[2] == 0.0, "{g:?}");
        assert!(g.iter().all(|v| v.is_finite()));
        Ok(())
    }

    #[test]
    fn off_data_probe_cycles_through_its_four_kinds_reproducibly() -> Result<()> {
        let (root, data) = fresh_tiny_data("beaa-probe")?;
        let mut cfg = tiny_config(data.clone());
        let (train, _) = load_data(&mut cfg)?;
        // Identity normalization, so that the noise kinds' spans are known.
        let spec = tiny_config(data).input;
        let dev = Device::Cpu;
        let idx: Vec<usize> = (0..8).collect();
        let probe = |seed| -> Result<Vec<Vec<f32>>> {
            let t = off_data_batch(
                &train,
                &idx,
                &ProbeKind::all(),
                &spec,
                &mut ChaCha8Rng::seed_from_u64(seed),
                &dev,
            )?;
            assert_eq!(t.dims4()?, (8, 8, 8, 3));
            Ok(t.flatten_from(1)?.to_vec2::<f32>()?)
        };
        let a = probe(1)?;
        assert_eq!(
            a,
            probe(1)?,
            "the same step gives the same probe (exact resume)"
        );
        assert_ne!(a, probe(2)?);
        // One kind alone: every image of that kind.
        let noise = off_data_batch(
            &train,
            &idx,
            &[ProbeKind::Noise],
            &spec,
            &mut ChaCha8Rng::seed_from_u64(1),
            &dev,
        )?;
        let noise = noise.flatten_all()?.to_vec1::<f32>()?;
        assert!(noise.iter().all(|v| (-1.5..=1.5).contains(v)));
        assert!(off_data_batch(
            &train,
            &idx,
            &[],
            &spec,
            &mut ChaCha8Rng::seed_from_u64(1),
            &dev
        )
        .is_err());
        let span = |v: &[f32]| {
            let (lo, hi) = v
                .iter()
                .fold((f32::MAX, f32::MIN), |(l, h), &x| (l.min(x), h.max(x)));
            (lo, hi)
        };
        // Mean 0, std 1 here: 0-255 noise spans [0, 1], in-range noise [-1.5, 1.5].
        for k in [0, 4] {
            let (lo, hi) = span(&a[k]);
            assert!(
                (0.0..0.05).contains(&lo) && hi <= 1.0 && hi > 0.95,
                "{lo} {hi}"
            );
        }
        for k in [1, 5] {
            let (lo, hi) = span(&a[k]);
            assert!(
                (-1.5..-1.3).contains(&lo) && hi <= 1.5 && hi > 1.3,
                "{lo} {hi}"
            );
        }
        std::fs::remove_dir_all(&root).unwrap();
        Ok(())
    }

    /// The same tiny run with and without the off-data penalty, then measured on a probe of
    /// its own: with it, the units' inputs on off-data images end much closer to their range.
    #[test]
    fn off_data_penalty_pulls_probe_inputs_toward_the_clean_range() -> Result<()> {
        let (root, data) = fresh_tiny_data("beaa-offdata")?;
        let excess_after = |w: f64| -> Result<f32> {
            let dir = root.join(format!("run-{w}"));
            let cfg = TrainConfig {
                off_data_penalty: w,
                range_penalty: 1e-9,
                epochs: 4,
                ..tiny_config(data.clone())
            };
            let state = run(&dir, cfg)?;
            let dev = Device::Cpu;
            let (mut cfg, mut net) = load_run(&dir, &dev)?;
            let (train, _) = load_data(&mut cfg)?;
            let idx: Vec<usize> = (0..train.len()).collect();
            let probe = off_data_batch(
                &train,
                &idx,
                &ProbeKind::all(),
                &cfg.input,
                &mut ChaCha8Rng::seed_from_u64(99),
                &dev,
            )?;
            Ok(off_data_excess(&mut net, &probe, &state.range_bounds)?.to_scalar::<f32>()?)
        };
        let free = excess_after(0.0)?;
        let pulled = excess_after(10.0)?;
        assert!(
            free > 0.0,
            "off-data images leave the clean range without the penalty"
        );
        assert!(
            pulled < free / 4.0,
            "excess {pulled} with the penalty, {free} without"
        );
        std::fs::remove_dir_all(&root).unwrap();
        Ok(())
    }

    /// A tiny element-wise run on `data` (8x8 images, two classes, two epochs).
    pub(crate) fn tiny_config(data: PathBuf) -> TrainConfig {
        TrainConfig {
            data,
            dataset_name: "synthetic".into(),
            input: InputSpec {
                channels: 3,
                height: 8,
                width: 8,
                mean: vec![0.0; 3],
                std: vec![1.0; 3],
                resize: ResizePolicy::Stretch,
            },
            split: SplitKind::LastPerClass,
            val_per_class: 2,
            val_fraction: 0.0,
            arch: tiny_arch(),
            act: ActKind::Element,
            epochs: 2,
            batch: 4,
            lr: 0.05,
            lr_min: 0.0,
            warmup_epochs: 0.5,
            momentum: 0.9,
            weight_decay: 5e-4,
            clip_norm: 5.0,
            seed: 3,
            augment: Augment {
                pad_crop: 1,
                hflip: true,
                rotate_deg: 0.0,
                scale: 0.0,
                translate: 0.0,
            },
            class_weighted: true,
            teacher: None,
            kd_alpha: 0.9,
            kd_temperature: 4.0,
            init_from: None,
            poly_fit_images: 16,
            checkpoint_minutes: 0.0,
            bn_calibration_images: 8,
            poly_fit_shrink: 1.0,
            poly_fit_range: 0.0,
            poly_fit_progressive: false,
            freeze_bn: false,
            range_penalty: 0.0,
            off_data_penalty: 0.0,
            off_data_slack: 1.0,
            off_data_kinds: ProbeKind::all(),
            outlier_loss: 0.0,
            relu_blend_epochs: 0.0,
            poly_channel_share: false,
            poly_spread_decay: 0.0,
            pretrained: None,
            fold: None,
            mixup: 0.0,
            feature_kd: 0.0,
            averaged_from: Vec::new(),
        }
    }

    /// Two runs' checkpoints hold the same tensors, bit for bit (exact resume).
    fn assert_same_checkpoints(a: &Path, b: &Path) -> Result<()> {
        let dev = Device::Cpu;
        let a = candle_core::safetensors::load(a.join("checkpoint.safetensors"), &dev)?;
        let b = candle_core::safetensors::load(b.join("checkpoint.safetensors"), &dev)?;
        assert_eq!(a.len(), b.len());
        for (k, t) in &a {
            let d = (t - &b[k])?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{k} differs after resume");
        }
        Ok(())
    }

    fn resume_mid_epoch_is_exact_with(
        range_penalty: f64,
        relu_blend_epochs: f64,
        poly_channel_share: bool,
        mixup: f64,
    ) -> Result<()> {
        let root = std::env::temp_dir().join(format!(
            "beaa-resume-{}-{range_penalty}-{relu_blend_epochs}-{poly_channel_share}-{mixup}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&root);
        let data = root.join("data");
        write_two_class_images(&data, 10)?;
        let cfg = TrainConfig {
            range_penalty,
            relu_blend_epochs,
            poly_channel_share,
            mixup,
            ..tiny_config(data.clone())
        };
        let whole = run(&root.join("a"), cfg.clone())?;
        let part = run_limited(&root.join("b"), cfg.clone(), Some(3))?;
        assert_eq!((part.epoch, part.step), (0, 3));
        let resumed = run(&root.join("b"), cfg)?;
        assert_eq!(resumed.epoch, 2);
        assert_eq!(resumed.range_bounds.is_empty(), range_penalty == 0.0);
        assert_eq!(whole.range_bounds, resumed.range_bounds);
        assert_eq!(
            whole.last_val.as_ref().map(|v| v.loss),
            resumed.last_val.as_ref().map(|v| v.loss)
        );
        let dev = Device::Cpu;
        let a = candle_core::safetensors::load(root.join("a/checkpoint.safetensors"), &dev)?;
        if poly_channel_share {
            let share = &a["conv1.poly_a.channel"];
            assert!(
                share.abs()?.max_all()?.to_scalar::<f32>()? > 0.0,
                "shares trained"
            );
        }
        assert_same_checkpoints(&root.join("a"), &root.join("b"))?;
        std::fs::remove_dir_all(&root).unwrap();
        Ok(())
    }

    #[test]
    fn balanced_accuracy_from_confusion() {
        let r = summarize(vec![vec![9, 1], vec![1, 1]], 0.0);
        assert!((r.accuracy - 10.0 / 12.0).abs() < 1e-12);
        assert!((r.balanced_accuracy - 0.7).abs() < 1e-12);
    }
}
