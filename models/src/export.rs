//! Export a trained candle net to the beaa-model directory format, folding batch norm.

use crate::data::Dataset;
use crate::net::{ActKind, Net, SqueezeNetSpec, BN_EPS, POLY_COEFS};
use crate::train::{TrainConfig, TrainState};
use anyhow::{Context, Result};
use beaa_model::{Activation, InputSpec, Manifest, Model, Provenance, TensorData, FORMAT_VERSION};
use std::collections::BTreeMap;

pub fn activation_of(act: ActKind) -> Activation {
    match act {
        ActKind::Relu => Activation::Relu,
        ActKind::Layer => Activation::PolyLayer,
        ActKind::Channel => Activation::PolyChannel,
        ActKind::Element => Activation::PolyElement,
    }
}

/// Trainable activation parameters of a net (Table 3): 3 per layer, channel or element.
pub fn activation_parameters(arch: &SqueezeNetSpec, act: ActKind) -> usize {
    arch.units()
        .iter()
        .filter(|u| u.act)
        .map(|u| match act {
            ActKind::Relu => 0,
            ActKind::Layer => 3,
            ActKind::Channel => 3 * u.cout,
            ActKind::Element => 3 * u.cout * u.h * u.w,
        })
        .sum()
}

fn vec_of(net: &Net, name: &str) -> Result<Vec<f32>> {
    let t = match net.vars.get(name) {
        Some(v) => v.as_tensor().clone(),
        None => net
            .buffers
            .get(name)
            .cloned()
            .with_context(|| format!("missing {name}"))?,
    };
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// Converts the net's weights to the format's tensors with batch norm folded (eval mode).
pub fn folded_tensors(net: &Net) -> Result<BTreeMap<String, TensorData>> {
    let mut out = BTreeMap::new();
    for u in net.arch.units() {
        let (o, c, k) = (u.cout, u.cin, u.k);
        let w = vec_of(net, &format!("{}.weight", u.name))?;
        // candle rows are ordered (ky, kx, c); the format is [out, in, kh, kw]
        let mut wt = vec![0f32; o * c * k * k];
        for oo in 0..o {
            for ky in 0..k {
                for kx in 0..k {
                    for cc in 0..c {
                        wt[((oo * c + cc) * k + ky) * k + kx] =
                            w[oo * k * k * c + (ky * k + kx) * c + cc];
                    }
                }
            }
        }
        out.insert(
            format!("{}.weight", u.name),
            TensorData {
                shape: vec![o, c, k, k],
                data: wt,
            },
        );
        out.insert(
            format!("{}.bias", u.name),
            TensorData {
                shape: vec![o],
                data: vec_of(net, &format!("{}.bias", u.name))?,
            },
        );
        if !u.act {
            continue;
        }
        let gamma = vec_of(net, &format!("{}.bn.gamma", u.name))?;
        let beta = vec_of(net, &format!("{}.bn.beta", u.name))?;
        let mean = vec_of(net, &format!("{}.bn.mean", u.name))?;
        let var = vec_of(net, &format!("{}.bn.var", u.name))?;
        let scale: Vec<f64> = (0..o)
            .map(|i| gamma[i] as f64 / (var[i] as f64 + BN_EPS).sqrt())
            .collect();
        let shift: Vec<f64> = (0..o)
            .map(|i| beta[i] as f64 - mean[i] as f64 * scale[i])
            .collect();
        if net.act == ActKind::Relu {
            out.insert(
                format!("{}.bn.scale", u.name),
                TensorData {
                    shape: vec![o],
                    data: scale.iter().map(|&v| v as f32).collect(),
                },
            );
            out.insert(
                format!("{}.bn.shift", u.name),
                TensorData {
                    shape: vec![o],
                    data: shift.iter().map(|&v| v as f32).collect(),
                },
            );
            continue;
        }
        // BN(a x^2 + b x + c) = (s a) x^2 + (s b) x + (s c + t), broadcast to [C, H, W]
        let (h, w) = (u.h, u.w);
        let coef: Vec<Vec<f32>> = POLY_COEFS
            .iter()
            .map(|p| {
                net.poly_coef(&u.name, p)?
                    .flatten_all()?
                    .to_vec1::<f32>()
                    .map_err(Into::into)
            })
            .collect::<Result<_>>()?;
        let mut folded = [
            vec![0f32; o * h * w],
            vec![0f32; o * h * w],
            vec![0f32; o * h * w],
        ];
        for ch in 0..o {
            for y in 0..h {
                for x in 0..w {
                    let src = match net.act {
                        ActKind::Layer => 0,
                        ActKind::Channel => ch,
                        _ => (y * w + x) * o + ch,
                    };
                    let dst = (ch * h + y) * w + x;
                    folded[0][dst] = (scale[ch] * coef[0][src] as f64) as f32;
                    folded[1][dst] = (scale[ch] * coef[1][src] as f64) as f32;
                    folded[2][dst] = (scale[ch] * coef[2][src] as f64 + shift[ch]) as f32;
                }
            }
        }
        for (p, v) in POLY_COEFS.iter().zip(folded) {
            out.insert(
                format!("{}.poly_{p}", u.name),
                TensorData {
                    shape: vec![o, h, w],
                    data: v,
                },
            );
        }
    }
    Ok(out)
}

/// Builds the model (without ranges or metrics) from a net.
pub fn to_model(net: &Net, input: &InputSpec, classes: &[String], name: &str) -> Result<Model> {
    let spec = net.arch.clone();
    let nodes = spec.graph(net.act == ActKind::Relu);
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        name: name.into(),
        architecture: "beaa-squeezenet".into(),
        squeezenet: Some(spec),
        activation: activation_of(net.act),
        input: input.clone(),
        classes: classes.to_vec(),
        output: "gap".into(),
        ranges: BTreeMap::new(),
        activation_parameters: activation_parameters(&net.arch, net.act),
        activation_evaluations: nodes
            .iter()
            .filter(|n| matches!(n.op, beaa_model::Op::Poly { .. } | beaa_model::Op::Relu))
            .map(|n| n.shape.iter().product::<usize>())
            .sum(),
        nodes,
        provenance: Provenance::default(),
        metrics: serde_json::Value::Null,
    };
    Ok(Model::new(manifest, folded_tensors(net)?)?)
}

/// Normalized CHW f64 inputs for images of a data set (the shared preprocessing path).
pub fn chw_inputs(ds: &Dataset, idx: &[usize], spec: &InputSpec) -> Result<Vec<f64>> {
    let mut v = Vec::new();
    for &i in idx {
        v.extend(
            beaa_model::preprocess::normalize_chw(ds.image(i), spec)?
                .into_iter()
                .map(|x| x as f64),
        );
    }
    Ok(v)
}

pub fn git_commit() -> String {
    std::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// Full export of a run: folded weights, ranges on `range_images` training images,
/// provenance and the run's last validation result.
pub fn export_run(
    net: &Net,
    cfg: &TrainConfig,
    state: &TrainState,
    train: &Dataset,
    name: &str,
    range_images: usize,
) -> Result<Model> {
    let mut model = to_model(net, &cfg.input, &train.classes, name)?;
    // spread the range images over the whole training split (every class)
    let n = range_images.min(train.len()).max(1);
    let idx: Vec<usize> = (0..n).map(|i| i * train.len() / n).collect();
    let x = chw_inputs(train, &idx, &cfg.input)?;
    model.manifest.ranges = beaa_model::measure_ranges(&model, &x, n)?;
    model.manifest.provenance = Provenance {
        data: format!(
            "{} ({}), split {:?}",
            cfg.dataset_name,
            cfg.data.display(),
            cfg.split
        ),
        epochs: state.epoch,
        planned_epochs: cfg.epochs,
        seed: cfg.seed,
        git_commit: git_commit(),
        teacher: cfg.teacher.as_ref().map(|t| t.display().to_string()),
        training: serde_json::json!({
            "optimizer": "SGD, Nesterov momentum", "momentum": cfg.momentum, "weight_decay": cfg.weight_decay,
            "lr": cfg.lr, "lr_min": cfg.lr_min, "warmup_epochs": cfg.warmup_epochs, "schedule": "linear warmup then cosine",
            "batch": cfg.batch, "clip_norm": cfg.clip_norm, "augment": cfg.augment, "class_weighted": cfg.class_weighted,
            "kd_alpha": cfg.teacher.as_ref().map(|_| cfg.kd_alpha), "kd_temperature": cfg.teacher.as_ref().map(|_| cfg.kd_temperature),
            "init_from": cfg.init_from, "arch": cfg.arch, "act": cfg.act, "freeze_bn": cfg.freeze_bn, "range_penalty": cfg.range_penalty, "off_data_penalty": cfg.off_data_penalty, "off_data_slack": cfg.off_data_slack, "off_data_kinds": cfg.off_data_kinds, "outlier_loss": cfg.outlier_loss, "relu_blend_epochs": cfg.relu_blend_epochs, "poly_channel_share": cfg.poly_channel_share, "poly_spread_decay": cfg.poly_spread_decay, "pretrained": cfg.pretrained, "mixup": cfg.mixup, "feature_kd": cfg.feature_kd,
            "poly_fit": cfg.init_from.as_ref().map(|_| serde_json::json!({
                "progressive": cfg.poly_fit_progressive, "images": cfg.poly_fit_images,
                "shrink": cfg.poly_fit_shrink, "range": cfg.poly_fit_range,
            })),
            "partially_trained": state.epoch < cfg.epochs,
        }),
    };
    model.manifest.metrics = serde_json::json!({
        "validation": state.last_val,
        "validation_split": format!("{:?}", cfg.split),
        "note": "validation measured by beaa-train with candle in eval mode at the end of the last completed epoch",
    });
    Ok(model)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use rand_chacha::ChaCha8Rng;
    use rand_core::SeedableRng;

    /// The exported model's f64 forward agrees with candle's eval-mode forward to 1e-4.
    #[test]
    fn f64_forward_matches_candle_eval_forward() -> Result<()> {
        let dev = Device::Cpu;
        let arch = SqueezeNetSpec {
            in_channels: 3,
            height: 8,
            width: 8,
            classes: 4,
            conv1: 6,
            fire1: (4, 5, 3),
            fire2: (4, 3, 5),
            conv2: 6,
            conv3: 5,
        };
        // (element-wise twice: plain, and with channel shares, which export must fold in)
        for (act, share) in [
            (ActKind::Relu, false),
            (ActKind::Layer, false),
            (ActKind::Channel, false),
            (ActKind::Element, false),
            (ActKind::Element, true),
        ] {
            let mut net = Net::new(arch.clone(), act, 5, &dev)?;
            if share {
                net = net.with_channel_share()?;
            }
            // non-trivial BN statistics and polynomials (and shares)
            let mut rng = ChaCha8Rng::seed_from_u64(17);
            let mut share_rng = ChaCha8Rng::seed_from_u64(18);
            for (k, v) in net.vars.iter() {
                if k.ends_with(".channel") {
                    // shares: their own draws, so the other tensors match the plain case
                    let noise = crate::net::normal_vec(&mut share_rng, v.elem_count(), 0.002);
                    v.set(&(v.as_tensor() + Tensor::from_vec(noise, v.shape(), &dev)?)?)?;
                } else if !k.ends_with("weight") {
                    let noise = crate::net::normal_vec(&mut rng, v.elem_count(), 0.2);
                    v.set(&(v.as_tensor() + Tensor::from_vec(noise, v.shape(), &dev)?)?)?;
                }
            }
            for (k, b) in net.buffers.iter_mut() {
                let noise = Tensor::from_vec(
                    crate::net::normal_vec(&mut rng, b.elem_count(), 0.2),
                    b.shape(),
                    &dev,
                )?;
                *b = if k.ends_with("var") {
                    (b.clone() + noise.abs()?)?
                } else {
                    (b.clone() + noise)?
                };
            }
            let input = InputSpec {
                channels: 3,
                height: 8,
                width: 8,
                mean: vec![0.0; 3],
                std: vec![1.0; 3],
                resize: beaa_model::ResizePolicy::Stretch,
            };
            let classes: Vec<String> = (0..4).map(|i| i.to_string()).collect();
            let model = to_model(&net, &input, &classes, "t")?;
            let n = 3;
            let x = crate::net::normal_vec(&mut rng, n * 8 * 8 * 3, 1.0);
            let xt = Tensor::from_vec(x.clone(), (n, 8, 8, 3), &dev)?;
            let candle_logits = net
                .forward(&xt, false, None)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            // NHWC -> NCHW for the f64 path
            let mut chw = vec![0f64; x.len()];
            for b in 0..n {
                for y in 0..8 {
                    for xx in 0..8 {
                        for c in 0..3 {
                            chw[((b * 3 + c) * 8 + y) * 8 + xx] =
                                x[((b * 8 + y) * 8 + xx) * 3 + c] as f64;
                        }
                    }
                }
            }
            let ours = model.forward(&chw, n)?;
            let diff = ours
                .iter()
                .zip(&candle_logits)
                .map(|(a, b)| (a - *b as f64).abs())
                .fold(0.0, f64::max);
            let mag = ours.iter().map(|v| v.abs()).fold(0.0, f64::max);
            assert!(mag > 1e-3, "{act:?}: logits should not be trivially zero");
            assert!(
                diff < 1e-4,
                "{act:?}: f64 vs candle max diff {diff} (logit magnitude {mag})"
            );
            assert_eq!(
                model.manifest.activation_evaluations,
                model.count_activation_evaluations()
            );
        }
        Ok(())
    }
}
