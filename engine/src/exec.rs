//! Runs a plan on element-wise packed ciphertexts.

use crate::plan::Plan;
use beaa_ckks::{Ciphertext, Error as CkksError, Evaluator, RelinKey};
use beaa_model::{Model, Node, Op};
use rayon::prelude::*;
use std::collections::BTreeMap;

/// Evaluates `model` on `inputs` (one ciphertext per input feature, `[C, H, W]` row-major,
/// at the plan's input level and scale) and returns one ciphertext per logit.
///
/// Every node's output elements are computed in parallel; a node's output is dropped once its
/// last consumer has run.
pub fn run(
    model: &Model,
    plan: &Plan,
    ev: &Evaluator,
    rlk: &RelinKey,
    inputs: Vec<Ciphertext>,
) -> Result<Vec<Ciphertext>, CkksError> {
    let nodes = &model.manifest.nodes;
    if inputs.len() != model.input_len() {
        return Err(CkksError::InvalidArgument(format!(
            "{} input ciphertexts for a model with {} input features",
            inputs.len(),
            model.input_len()
        )));
    }
    for ct in &inputs {
        if ct.level() != plan.input_level || ct.scale() != plan.input_scale {
            return Err(CkksError::InvalidArgument(format!(
                "input at level {} scale 2^{:.3}, plan expects level {} scale 2^{:.3}",
                ct.level(),
                ct.scale().log2(),
                plan.input_level,
                plan.input_scale.log2()
            )));
        }
    }
    // Last consumer of each node, to free outputs early.
    let mut last_use: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, node) in nodes.iter().enumerate() {
        for input in &node.inputs {
            last_use.insert(input.as_str(), i);
        }
    }
    let mut values: BTreeMap<&str, Vec<Ciphertext>> = BTreeMap::new();
    let mut inputs = Some(inputs);
    for (i, node) in nodes.iter().enumerate() {
        let out = match &node.op {
            Op::Input => inputs.take().expect("one input node"),
            _ => {
                let args: Vec<&[Ciphertext]> = node
                    .inputs
                    .iter()
                    .map(|name| values[name.as_str()].as_slice())
                    .collect();
                eval_node(model, node, &args, ev, rlk)?
            }
        };
        values.insert(node.name.as_str(), out);
        for input in &node.inputs {
            if last_use.get(input.as_str()) == Some(&i) && *input != model.manifest.output {
                values.remove(input.as_str());
            }
        }
    }
    values
        .remove(model.manifest.output.as_str())
        .ok_or_else(|| CkksError::InvalidArgument("the output node was never computed".into()))
}

fn tensor<'m>(model: &'m Model, name: &str) -> Result<&'m [f32], CkksError> {
    model
        .tensors
        .get(name)
        .map(|t| t.data.as_slice())
        .ok_or_else(|| CkksError::InvalidArgument(format!("missing tensor {name}")))
}

fn shape_of(model: &Model, name: &str) -> [usize; 3] {
    model
        .manifest
        .nodes
        .iter()
        .find(|n| n.name == name)
        .map(|n| n.shape)
        .unwrap_or([0; 3])
}

/// `sum_k w_k x_k + bias`, rescaled: the constant scale is the top prime so the result comes
/// back to the input scale.
fn linear(
    ev: &Evaluator,
    terms: &[(&Ciphertext, f64)],
    bias: f64,
) -> Result<Ciphertext, CkksError> {
    let cts: Vec<&Ciphertext> = terms.iter().map(|(c, _)| *c).collect();
    let ws: Vec<f64> = terms.iter().map(|(_, w)| *w).collect();
    let level = cts[0].level();
    let q = ev.params().q()[level] as f64;
    let mut y = ev.weighted_sum(&cts, &ws, q)?;
    if bias != 0.0 {
        ev.add_const_assign(&mut y, bias)?;
    }
    ev.rescale_assign(&mut y)?;
    Ok(y)
}

fn eval_node(
    model: &Model,
    node: &Node,
    args: &[&[Ciphertext]],
    ev: &Evaluator,
    rlk: &RelinKey,
) -> Result<Vec<Ciphertext>, CkksError> {
    let [c, h, w] = node.shape;
    let x = args.first().copied().unwrap_or(&[]);
    match &node.op {
        Op::Input => unreachable!("handled by run"),
        Op::Conv2d {
            weight,
            bias,
            stride,
            padding,
        } => {
            let [ci, hi, wi] = shape_of(model, &node.inputs[0]);
            let wt = model
                .tensors
                .get(weight)
                .ok_or_else(|| CkksError::InvalidArgument(format!("missing tensor {weight}")))?;
            let (kh, kw) = (wt.shape[2], wt.shape[3]);
            let b = tensor(model, bias)?;
            (0..c * h * w)
                .into_par_iter()
                .map(|e| {
                    let (o, oy, ox) = (e / (h * w), (e / w) % h, e % w);
                    let mut terms = Vec::with_capacity(ci * kh * kw);
                    for i in 0..ci {
                        for ky in 0..kh {
                            let iy = (oy * stride + ky) as isize - *padding as isize;
                            if iy < 0 || iy >= hi as isize {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix = (ox * stride + kx) as isize - *padding as isize;
                                if ix < 0 || ix >= wi as isize {
                                    continue;
                                }
                                let wv = wt.data[((o * ci + i) * kh + ky) * kw + kx] as f64;
                                if wv != 0.0 {
                                    let idx = (i * hi + iy as usize) * wi + ix as usize;
                                    terms.push((&x[idx], wv));
                                }
                            }
                        }
                    }
                    if terms.is_empty() {
                        // An all-zero receptive field still needs a ciphertext of the right
                        // level and scale: 0 * any input.
                        terms.push((&x[0], 0.0));
                    }
                    linear(ev, &terms, b[o] as f64)
                })
                .collect()
        }
        Op::Poly { a, b, c: cc } => {
            let (a, b, cc) = (tensor(model, a)?, tensor(model, b)?, tensor(model, cc)?);
            x.par_iter()
                .enumerate()
                .map(|(e, xe)| {
                    // t = a x + b (one level), then x * t (one level), then + c.
                    let mut t = linear(ev, &[(xe, a[e] as f64)], b[e] as f64)?;
                    let mut x_low = xe.clone();
                    ev.drop_to_level(&mut x_low, t.level())?;
                    t = ev.mul(&x_low, &t)?;
                    ev.relinearize_rescale_assign(&mut t, rlk)?;
                    ev.add_const_assign(&mut t, cc[e] as f64)?;
                    Ok(t)
                })
                .collect()
        }
        Op::Relu => Err(CkksError::InvalidArgument(format!(
            "node {}: ReLU cannot be evaluated on ciphertexts",
            node.name
        ))),
        Op::Affine { scale, shift } => {
            let (s, t) = (tensor(model, scale)?, tensor(model, shift)?);
            x.par_iter()
                .enumerate()
                .map(|(e, xe)| linear(ev, &[(xe, s[e / (h * w)] as f64)], t[e / (h * w)] as f64))
                .collect()
        }
        Op::AvgPool { kernel, stride } => {
            let [_, hi, wi] = shape_of(model, &node.inputs[0]);
            let inv = 1.0 / (kernel * kernel) as f64;
            (0..c * h * w)
                .into_par_iter()
                .map(|e| {
                    let (ch, oy, ox) = (e / (h * w), (e / w) % h, e % w);
                    let mut terms = Vec::with_capacity(kernel * kernel);
                    for ky in 0..*kernel {
                        for kx in 0..*kernel {
                            terms.push((
                                &x[(ch * hi + oy * stride + ky) * wi + ox * stride + kx],
                                inv,
                            ));
                        }
                    }
                    linear(ev, &terms, 0.0)
                })
                .collect()
        }
        Op::GlobalAvgPool => {
            let [ci, hi, wi] = shape_of(model, &node.inputs[0]);
            let inv = 1.0 / (hi * wi) as f64;
            (0..ci)
                .into_par_iter()
                .map(|ch| {
                    let terms: Vec<(&Ciphertext, f64)> = x[ch * hi * wi..(ch + 1) * hi * wi]
                        .iter()
                        .map(|ct| (ct, inv))
                        .collect();
                    linear(ev, &terms, 0.0)
                })
                .collect()
        }
        Op::Concat => Ok(args.iter().flat_map(|a| a.iter().cloned()).collect()),
    }
}
