//! The executor: linear forms over materialized values, materialized only where needed.

use beaa_ckks::{Ciphertext, Error as CkksError, Evaluator, RelinKey};
use beaa_model::{Model, Node, Op};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;

/// What the executor computes with: real ciphertexts, or only their level and scale (to plan).
pub trait Backend: Sync {
    type Value: Send + Sync;
    fn level(&self, v: &Self::Value) -> isize;
    fn scale(&self, v: &Self::Value) -> f64;
    /// `sum w_k x_k + constant` at `target` scale, then one rescale.
    fn combine(
        &self,
        terms: &[(&Self::Value, f64)],
        constant: f64,
        target: f64,
    ) -> Result<Self::Value, ExecError>;
    /// `x^2`, relinearized and rescaled in one pass.
    fn square(&self, x: &Self::Value) -> Result<Self::Value, ExecError>;
    /// The top prime at `level`, for choosing constant scales.
    fn prime(&self, level: isize) -> f64;
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExecError {
    #[error("node {0} uses ReLU: only polynomial-activation models can be evaluated encrypted")]
    Relu(String),
    #[error("{0}")]
    Ckks(#[from] CkksError),
    #[error("{0}")]
    Model(String),
    #[error("the job was cancelled")]
    Cancelled,
}

/// One feature element: `sum w_k v_k + constant` over materialized values `v_k`.
struct Lin<V> {
    terms: Vec<(Arc<V>, f64)>,
    constant: f64,
}

impl<V> Clone for Lin<V> {
    fn clone(&self) -> Self {
        Lin {
            terms: self
                .terms
                .iter()
                .map(|(v, w)| (Arc::clone(v), *w))
                .collect(),
            constant: self.constant,
        }
    }
}

impl<V> Lin<V> {
    fn of(v: Arc<V>) -> Self {
        Lin {
            terms: vec![(v, 1.0)],
            constant: 0.0,
        }
    }

    /// `self += w * other`.
    fn add_scaled(&mut self, other: &Lin<V>, w: f64) {
        if w == 0.0 {
            return;
        }
        self.terms
            .extend(other.terms.iter().map(|(v, x)| (Arc::clone(v), x * w)));
        self.constant += other.constant * w;
    }
}

/// A materialized ciphertext for this form: itself if it is one, else a combination.
fn materialize<B: Backend>(b: &B, lin: &Lin<B::Value>) -> Result<Arc<B::Value>, ExecError> {
    if let [(v, w)] = lin.terms.as_slice() {
        if *w == 1.0 && lin.constant == 0.0 {
            return Ok(Arc::clone(v));
        }
    }
    if lin.terms.is_empty() {
        return Err(ExecError::Model(
            "a feature element is a pure constant; the model has a dead layer".into(),
        ));
    }
    // Merge repeated values, then combine at (lowest level's prime) x (smallest scale), so the
    // rescale brings the result back to about the inputs' scale.
    let mut merged: Vec<(&Arc<B::Value>, f64)> = Vec::with_capacity(lin.terms.len());
    let mut index: BTreeMap<usize, usize> = BTreeMap::new();
    for (v, w) in &lin.terms {
        let key = Arc::as_ptr(v) as usize;
        match index.get(&key) {
            Some(&i) => merged[i].1 += w,
            None => {
                index.insert(key, merged.len());
                merged.push((v, *w));
            }
        }
    }
    let level = merged
        .iter()
        .map(|(v, _)| b.level(v))
        .min()
        .expect("non-empty");
    let scale = merged
        .iter()
        .map(|(v, _)| b.scale(v))
        .fold(f64::INFINITY, f64::min);
    let terms: Vec<(&B::Value, f64)> = merged.iter().map(|(v, w)| (v.as_ref(), *w)).collect();
    Ok(Arc::new(b.combine(
        &terms,
        lin.constant,
        scale * b.prime(level),
    )?))
}

fn tensor<'m>(model: &'m Model, name: &str) -> Result<&'m beaa_model::TensorData, ExecError> {
    model
        .tensors
        .get(name)
        .ok_or_else(|| ExecError::Model(format!("missing tensor {name}")))
}

/// Sees each node with the values it materialized (squares).
pub type Observer<'o, V> = &'o mut dyn FnMut(&Node, &[Arc<V>]);

/// Runs the graph on `inputs` (one value per input feature) and returns one materialized value
/// per output element.
pub fn execute<B: Backend>(
    b: &B,
    model: &Model,
    inputs: Vec<B::Value>,
    observe: Observer<'_, B::Value>,
) -> Result<Vec<Arc<B::Value>>, ExecError> {
    let nodes = &model.manifest.nodes;
    if inputs.len() != model.input_len() {
        return Err(ExecError::Model(format!(
            "{} inputs for a model with {} input features",
            inputs.len(),
            model.input_len()
        )));
    }
    let mut last_use: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, node) in nodes.iter().enumerate() {
        for input in &node.inputs {
            last_use.insert(input.as_str(), i);
        }
    }
    let mut values: BTreeMap<&str, Vec<Lin<B::Value>>> = BTreeMap::new();
    let mut inputs = Some(inputs);
    for (i, node) in nodes.iter().enumerate() {
        let (out, made) = match &node.op {
            Op::Input => {
                let v: Vec<Lin<B::Value>> = inputs
                    .take()
                    .ok_or_else(|| ExecError::Model("more than one input node".into()))?
                    .into_iter()
                    .map(|x| Lin::of(Arc::new(x)))
                    .collect();
                (v, Vec::new())
            }
            _ => {
                let args: Vec<&[Lin<B::Value>]> = node
                    .inputs
                    .iter()
                    .map(|name| {
                        values
                            .get(name.as_str())
                            .map(|v| v.as_slice())
                            .ok_or_else(|| ExecError::Model(format!("unknown input {name}")))
                    })
                    .collect::<Result<_, _>>()?;
                eval_node(b, model, node, &args)?
            }
        };
        observe(node, &made);
        values.insert(node.name.as_str(), out);
        for input in &node.inputs {
            if last_use.get(input.as_str()) == Some(&i) && *input != model.manifest.output {
                values.remove(input.as_str());
            }
        }
    }
    let out = values
        .remove(model.manifest.output.as_str())
        .ok_or_else(|| ExecError::Model("the output node was never computed".into()))?;
    out.par_iter().map(|lin| materialize(b, lin)).collect()
}

/// A node's output forms and the values it materialized.
type NodeOutput<V> = (Vec<Lin<V>>, Vec<Arc<V>>);

/// Evaluates one node.
fn eval_node<B: Backend>(
    b: &B,
    model: &Model,
    node: &Node,
    args: &[&[Lin<B::Value>]],
) -> Result<NodeOutput<B::Value>, ExecError> {
    let [c, h, w] = node.shape;
    let x = args.first().copied().unwrap_or(&[]);
    let linear = |out: Vec<Lin<B::Value>>| Ok((out, Vec::new()));
    match &node.op {
        Op::Input => Err(ExecError::Model(
            "input node in the middle of the graph".into(),
        )),
        Op::Conv2d {
            weight,
            bias,
            stride,
            padding,
        } => {
            let [ci, hi, wi] = model.shape_of(&node.inputs[0]);
            let wt = tensor(model, weight)?;
            let (kh, kw) = (wt.shape[2], wt.shape[3]);
            let bias = &tensor(model, bias)?.data;
            let out = (0..c * h * w)
                .into_par_iter()
                .map(|e| {
                    let (o, oy, ox) = (e / (h * w), (e / w) % h, e % w);
                    let mut y = Lin {
                        terms: Vec::new(),
                        constant: bias[o] as f64,
                    };
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
                                y.add_scaled(&x[(i * hi + iy as usize) * wi + ix as usize], wv);
                            }
                        }
                    }
                    y
                })
                .collect();
            linear(out)
        }
        Op::Poly { a, b: bb, c: cc } => {
            let (a, bb, cc) = (
                &tensor(model, a)?.data,
                &tensor(model, bb)?.data,
                &tensor(model, cc)?.data,
            );
            // Materialize x (one level unless it already is a value), square it (one level);
            // a, b and c stay symbolic.
            // (x, x^2) per element.
            type Pair<V> = (Arc<V>, Arc<V>);
            let pairs: Vec<Pair<B::Value>> = x
                .par_iter()
                .map(|lin| {
                    let m = materialize(b, lin)?;
                    let sq = Arc::new(b.square(&m)?);
                    Ok((m, sq))
                })
                .collect::<Result<_, ExecError>>()?;
            let mut made = Vec::with_capacity(2 * pairs.len());
            let out = pairs
                .into_iter()
                .enumerate()
                .map(|(e, (m, sq))| {
                    made.push(Arc::clone(&sq));
                    let mut terms = Vec::with_capacity(2);
                    if a[e] != 0.0 {
                        terms.push((sq, a[e] as f64));
                    }
                    if bb[e] != 0.0 {
                        terms.push((m, bb[e] as f64));
                    }
                    Lin {
                        terms,
                        constant: cc[e] as f64,
                    }
                })
                .collect();
            Ok((out, made))
        }
        Op::Relu => Err(ExecError::Relu(node.name.clone())),
        Op::Affine { scale, shift } => {
            let (s, t) = (&tensor(model, scale)?.data, &tensor(model, shift)?.data);
            let out = x
                .iter()
                .enumerate()
                .map(|(e, xe)| {
                    let ch = e / (h * w);
                    let mut y = Lin {
                        terms: Vec::new(),
                        constant: t[ch] as f64,
                    };
                    y.add_scaled(xe, s[ch] as f64);
                    y
                })
                .collect();
            linear(out)
        }
        Op::AvgPool { kernel, stride } => {
            let [_, hi, wi] = model.shape_of(&node.inputs[0]);
            let inv = 1.0 / (kernel * kernel) as f64;
            let out = (0..c * h * w)
                .map(|e| {
                    let (ch, oy, ox) = (e / (h * w), (e / w) % h, e % w);
                    let mut y = Lin {
                        terms: Vec::new(),
                        constant: 0.0,
                    };
                    for ky in 0..*kernel {
                        for kx in 0..*kernel {
                            y.add_scaled(
                                &x[(ch * hi + oy * stride + ky) * wi + ox * stride + kx],
                                inv,
                            );
                        }
                    }
                    y
                })
                .collect();
            linear(out)
        }
        Op::GlobalAvgPool => {
            let [ci, hi, wi] = model.shape_of(&node.inputs[0]);
            let inv = 1.0 / (hi * wi) as f64;
            let out = (0..ci)
                .map(|ch| {
                    let mut y = Lin {
                        terms: Vec::new(),
                        constant: 0.0,
                    };
                    for xe in &x[ch * hi * wi..(ch + 1) * hi * wi] {
                        y.add_scaled(xe, inv);
                    }
                    y
                })
                .collect();
            linear(out)
        }
        Op::Concat => linear(args.iter().flat_map(|a| a.iter().cloned()).collect()),
    }
}

/// Real ciphertexts.
pub struct Encrypted<'a> {
    pub ev: &'a Evaluator,
    pub rlk: &'a RelinKey,
}

impl Backend for Encrypted<'_> {
    type Value = Ciphertext;
    fn level(&self, v: &Ciphertext) -> isize {
        v.level() as isize
    }
    fn scale(&self, v: &Ciphertext) -> f64 {
        v.scale()
    }
    fn combine(
        &self,
        terms: &[(&Ciphertext, f64)],
        constant: f64,
        target: f64,
    ) -> Result<Ciphertext, ExecError> {
        let mut y = self.ev.linear_combination(terms, target)?;
        if constant != 0.0 {
            self.ev.add_const_assign(&mut y, constant)?;
        }
        self.ev.rescale_assign(&mut y)?;
        Ok(y)
    }
    fn square(&self, x: &Ciphertext) -> Result<Ciphertext, ExecError> {
        let mut y = self.ev.square(x)?;
        self.ev.relinearize_rescale_assign(&mut y, self.rlk)?;
        Ok(y)
    }
    fn prime(&self, level: isize) -> f64 {
        self.ev.params().q()[level.max(0) as usize] as f64
    }
}

/// Evaluates `model` on element-wise packed `inputs` (one ciphertext per input feature,
/// `[C, H, W]` row-major) and returns one ciphertext per logit.
pub fn run(
    model: &Model,
    ev: &Evaluator,
    rlk: &RelinKey,
    inputs: Vec<Ciphertext>,
) -> Result<Vec<Ciphertext>, ExecError> {
    run_observed(model, ev, rlk, inputs, &mut |_, _| {})
}

/// [`run`], showing each finished node and the ciphertexts it materialized to `observe`
/// (for progress and per-layer timing).
pub fn run_observed(
    model: &Model,
    ev: &Evaluator,
    rlk: &RelinKey,
    inputs: Vec<Ciphertext>,
    observe: Observer<'_, Ciphertext>,
) -> Result<Vec<Ciphertext>, ExecError> {
    let backend = Encrypted { ev, rlk };
    let out = execute(&backend, model, inputs, observe)?;
    Ok(out
        .into_iter()
        .map(|v| Arc::try_unwrap(v).unwrap_or_else(|shared| (*shared).clone()))
        .collect())
}
