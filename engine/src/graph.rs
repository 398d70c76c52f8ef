//! The value graph: which ciphertexts a model needs, each as a linear form over earlier ones,
//! with the level and scale every one of them will have.
//!
//! Linear layers (convolution, pooling, affine, concatenation) only compose *forms*
//! `sum w_k v_k + c` over materialized values `v_k`; they cost no level. Values are made in
//! three ways:
//! - **activation** `a x^2 + b x + c`: `x~ = s x` with `s = sqrt|a|` is materialized (the
//!   weights of the combination absorb `s`; one level), then the single ciphertext
//!   `y = x~^2 + beta x~` with `beta = sign(a) b / s` (the `beta x~` term is an integer
//!   multiple at the scale of `x~`, so it lands at the scale of the square; one level).
//!   Downstream forms use `sign(a) y + c`, so one ciphertext carries the whole activation.
//! - **sum**: average pooling whose window is a sum of equally weighted values of one level
//!   and scale is materialized as the plain sum (additions only, no level) when a convolution
//!   reads it; the `1/k^2` rides along as a weight. A sum of lazy squares stays degree 2.
//! - **output**: the logits, one combination and one rescale, at a smaller scale than the
//!   others ([`LOGIT_WEIGHT_BITS`]) to leave room for outliers. When they reduce over every
//!   tile of a layer (the global average pool), each tile's share is a stored **partial**
//!   sum (combined, not rescaled) and the logits are the rescaled sum of the partials.

use crate::exec::ExecError;
use beaa_ckks::Params;
use beaa_model::{Model, Op};
use std::collections::{BTreeMap, BTreeSet};

/// A value: element `elem` of layer `layer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ValueRef {
    pub layer: u32,
    pub elem: u32,
}

/// `sum w_k v_k + constant`.
#[derive(Debug, Clone, Default)]
pub struct Form {
    pub terms: Vec<(ValueRef, f64)>,
    pub constant: f64,
}

impl Form {
    fn of(v: ValueRef, w: f64, constant: f64) -> Self {
        Form {
            terms: vec![(v, w)],
            constant,
        }
    }
    fn add_scaled(&mut self, other: &Form, w: f64) {
        if w == 0.0 {
            return;
        }
        self.terms
            .extend(other.terms.iter().map(|(v, x)| (*v, x * w)));
        self.constant += other.constant * w;
    }
    /// Repeated values merged (first occurrence order kept).
    fn merged(mut self) -> Self {
        let mut index: BTreeMap<ValueRef, usize> = BTreeMap::new();
        let mut out: Vec<(ValueRef, f64)> = Vec::with_capacity(self.terms.len());
        for (v, w) in self.terms.drain(..) {
            match index.get(&v) {
                Some(&i) => out[i].1 += w,
                None => {
                    index.insert(v, out.len());
                    out.push((v, w));
                }
            }
        }
        out.retain(|(_, w)| *w != 0.0);
        Form {
            terms: out,
            constant: self.constant,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum LayerKind {
    /// The client's ciphertexts.
    Input,
    /// `y = x~^2 + beta x~`, `x~` the rescaled form; `beta` per element. A `lazy` layer
    /// leaves `y` unrelinearized and unrescaled (degree 2): its only reader sums many of them
    /// and relinearizes once per sum, where fewer ciphertexts exist.
    Activation { beta: Vec<f64>, lazy: bool },
    /// Plain sum of the form's values with weights +-1 (no rescale).
    Sum,
    /// One tile's share of a reduction over every tile (the logits read the global average
    /// pool): the combination at the reader's level and target scale, neither rescaled nor
    /// relinearized. Stored, so the layer it reads is consumed tile by tile instead of being
    /// kept whole until the last tile exists.
    Partial,
    /// The logits: the rescaled form (over partial sums: their plain sum, rescaled).
    Output,
}

/// Level and scale of one materialized value (levels may go below 0 in a plan that needs a
/// longer chain).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Meta {
    pub level: isize,
    pub scale: f64,
}

/// A layer of values of shape `[C, H, W]`; element `e` is channel `e / (H W)` at position
/// `e % (H W)` (its *tile*: all channels of one position are computed and stored together).
#[derive(Debug, Clone)]
pub struct Layer {
    pub name: String,
    pub kind: LayerKind,
    pub shape: [usize; 3],
    /// Per element: what is combined (empty for the input).
    pub forms: Vec<Form>,
    /// Per element: the level the combination is computed at and its target scale (for
    /// activations and outputs; unused for inputs and sums).
    pub combine: Vec<Meta>,
    /// The combination reads lazy (degree-2) values: rescale twice, then relinearize. For a
    /// sum: its terms are lazy, so it is degree 2 itself (relinearized by its reader).
    pub reads_lazy: bool,
    /// Per element: level and scale of the value itself.
    pub meta: Vec<Meta>,
}

impl Layer {
    pub fn len(&self) -> usize {
        self.meta.len()
    }
    pub fn is_empty(&self) -> bool {
        self.meta.is_empty()
    }
    pub fn tiles(&self) -> usize {
        self.shape[1] * self.shape[2]
    }
    pub fn tile_of(&self, elem: usize) -> usize {
        elem % self.tiles()
    }
    /// Elements of tile `t`, channel by channel.
    pub fn tile_elems(&self, t: usize) -> impl Iterator<Item = usize> + '_ {
        let hw = self.tiles();
        (0..self.shape[0]).map(move |c| c * hw + t)
    }
}

/// Activations with |a| below this are treated as linear (`b x + c`).
const MIN_QUADRATIC: f64 = 1e-12;

/// Precision of the logits' weights: they are combined at (inputs' scale) x 2^this, not at
/// (inputs' scale) x prime, so the logits end at a scale of about 2^this instead of 2^40.
/// Weight precision and the logits' room to grow share one budget (log2 Q - log2 scale at
/// the combination's level): 28 bits of weight precision (rounding ~4e-9 relative, far below
/// the encrypted logits' error of ~1e-4) leave 12 bits more room than a full prime's weights.
/// That room is what keeps one outlier image (the shipped CIFAR-10 model gives |logits| of up
/// to 6e8 for some images with black borders, `beaa eval` "max_abs_logit") from wrapping the
/// modulus and corrupting every other image of its batch.
pub const LOGIT_WEIGHT_BITS: i32 = 28;

/// Whether a layer's values are degree 2 (unrelinearized, unrescaled squares): a lazy
/// activation, or a sum over lazy activations.
fn holds_lazy(layer: &Layer) -> bool {
    match layer.kind {
        LayerKind::Activation { lazy, .. } => lazy,
        LayerKind::Sum => layer.reads_lazy,
        _ => false,
    }
}

/// All values of a model under a parameter set.
#[derive(Debug, Clone)]
pub struct ValueGraph {
    /// In dependency order; layer 0 is the input, the last is the output.
    pub layers: Vec<Layer>,
    pub input_level: usize,
    pub input_scale: f64,
}

impl ValueGraph {
    /// Builds the graph of `model` with inputs at the top level and default scale of `params`;
    /// the activation layers named in `lazy` stay unrelinearized (see [`LayerKind`]).
    pub fn build(
        model: &Model,
        params: &Params,
        lazy: &BTreeSet<String>,
    ) -> Result<Self, ExecError> {
        Builder {
            model,
            q: params.q(),
            layers: Vec::new(),
            lazy,
        }
        .run(params.max_level(), params.default_scale())
    }

    pub fn output(&self) -> &Layer {
        self.layers.last().expect("a graph has an output layer")
    }

    pub fn meta(&self, v: ValueRef) -> Meta {
        self.layers[v.layer as usize].meta[v.elem as usize]
    }

    /// Checks that every integer the executor will encode fits where it goes, so that a job
    /// cannot fail half-way on an encoding: term weights `round(w * target / scale)` (below
    /// 2^120 and Q_level / 4), constants `round(c * target)` and activation coefficients
    /// `round(beta * scale)` (below Q_level / 4). Mirrors `Evaluator::linear_combinations`,
    /// `add_const_assign` and `mul_const_assign`.
    pub fn check_encodings(&self, params: &Params) -> Result<(), ExecError> {
        let q = params.q();
        let log_q = |level: isize| params.log_q_at(level.max(0) as usize);
        let fail = |layer: &str, e: usize, what: String| {
            Err(ExecError::Model(format!(
                "{layer} element {e}: {what}; the parameter set cannot encode this model"
            )))
        };
        for layer in &self.layers {
            let beta = match &layer.kind {
                LayerKind::Activation { beta, .. } => Some(beta),
                LayerKind::Output | LayerKind::Partial => None,
                _ => continue,
            };
            for (e, (form, cm)) in layer.forms.iter().zip(&layer.combine).enumerate() {
                let bits = log_q(cm.level) - 2.0;
                for (v, w) in &form.terms {
                    let r = (w * cm.scale / self.meta(*v).scale).abs().log2();
                    if r >= bits.min(120.0) {
                        return fail(&layer.name, e, format!("weight {w} needs 2^{r:.1}"));
                    }
                }
                let c = form.constant;
                if c != 0.0 && (c * cm.scale).abs().log2() >= bits {
                    return fail(
                        &layer.name,
                        e,
                        format!("constant {c} at scale 2^{:.1}", cm.scale.log2()),
                    );
                }
                if let Some(beta) = beta {
                    // the rescaled x~ the coefficient multiplies (twice rescaled over squares)
                    let mut level = cm.level - 1;
                    let mut scale = cm.scale / q[cm.level.max(0) as usize] as f64;
                    if layer.reads_lazy {
                        scale /= q[level.max(0) as usize] as f64;
                        level -= 1;
                    }
                    let b = beta[e];
                    if b != 0.0 && (b * scale).abs().log2() >= log_q(level) - 2.0 {
                        return fail(
                            &layer.name,
                            e,
                            format!("coefficient {b} at scale {scale:e}"),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// Polynomials - 1 of the ciphertexts of layer `l` as stored: 2 for lazy activations and
    /// for partial sums over them, 1 otherwise.
    pub fn degree(&self, l: usize) -> usize {
        let layer = &self.layers[l];
        let partial_of_lazy = layer.kind == LayerKind::Partial
            && layer
                .forms
                .iter()
                .flat_map(|f| &f.terms)
                .any(|(v, _)| holds_lazy(&self.layers[v.layer as usize]));
        if holds_lazy(layer) || partial_of_lazy {
            2
        } else {
            1
        }
    }

    /// Serialized bytes of value `e` of layer `l` as the store keeps it.
    pub fn stored_bytes(&self, params: &Params, l: usize, e: usize) -> u64 {
        let level = self.layers[l].meta[e].level.max(0) as usize;
        beaa_ckks::serialize::ciphertext_len(params, level, self.degree(l), false) as u64
    }

    /// Modular multiply-adds per coefficient slot to combine layer `l`'s forms: terms x limbs
    /// at the combining level x polynomials of the term's ciphertext. This is the GEMM's work,
    /// most of a job's time at full width; sums (additions only) count 0.
    pub fn multiply_adds(&self, l: usize) -> u64 {
        let layer = &self.layers[l];
        if matches!(layer.kind, LayerKind::Input | LayerKind::Sum) {
            return 0;
        }
        layer
            .forms
            .iter()
            .zip(&layer.combine)
            .map(|(f, cm)| {
                let limbs = cm.level.max(0) as u64 + 1;
                f.terms
                    .iter()
                    .map(|(v, _)| limbs * (self.degree(v.layer as usize) as u64 + 1))
                    .sum::<u64>()
            })
            .sum()
    }

    /// The lowest level any value reaches.
    pub fn lowest_level(&self) -> isize {
        self.layers
            .iter()
            .flat_map(|l| l.meta.iter().chain(&l.combine).map(|m| m.level))
            .min()
            .unwrap_or(0)
    }
}

struct Builder<'m> {
    model: &'m Model,
    q: &'m [u64],
    layers: Vec<Layer>,
    lazy: &'m BTreeSet<String>,
}

fn tensor<'m>(model: &'m Model, name: &str) -> Result<&'m [f32], ExecError> {
    model
        .tensors
        .get(name)
        .map(|t| t.data.as_slice())
        .ok_or_else(|| ExecError::Model(format!("missing tensor {name}")))
}

impl Builder<'_> {
    fn prime(&self, level: isize) -> f64 {
        self.q[level.clamp(0, self.q.len() as isize - 1) as usize] as f64
    }

    fn meta(&self, v: ValueRef) -> Meta {
        self.layers[v.layer as usize].meta[v.elem as usize]
    }

    /// Level and target scale of combining `form`: at its lowest level, at (that level's
    /// prime) x (smallest scale), so the rescale returns to about the inputs' scale.
    /// Mirrors `Evaluator::linear_combination` + `rescale_assign`.
    fn combine_meta(&self, form: &Form) -> Result<Meta, ExecError> {
        if form.terms.is_empty() {
            return Err(ExecError::Model(
                "a feature element is a pure constant; the model has a dead layer".into(),
            ));
        }
        let level = form
            .terms
            .iter()
            .map(|(v, _)| self.meta(*v).level)
            .min()
            .expect("non-empty");
        let scale = form
            .terms
            .iter()
            .map(|(v, _)| self.meta(*v).scale)
            .fold(f64::INFINITY, f64::min);
        Ok(Meta {
            level,
            scale: scale * self.prime(level),
        })
    }

    /// Whether a form reads lazy (degree-2) values.
    fn reads_lazy(&self, form: &Form) -> bool {
        form.terms
            .iter()
            .any(|(v, _)| holds_lazy(&self.layers[v.layer as usize]))
    }

    /// Level and scale after the rescale(s) following a combination; mirrors
    /// `rescale_assign` (twice over lazy inputs).
    fn after_combine(&self, cm: Meta, lazy: bool) -> Meta {
        let mut m = Meta {
            level: cm.level - 1,
            scale: cm.scale / self.prime(cm.level),
        };
        if lazy {
            m = Meta {
                level: m.level - 1,
                scale: m.scale / self.prime(m.level),
            };
        }
        m
    }

    fn push(&mut self, layer: Layer) -> u32 {
        self.layers.push(layer);
        (self.layers.len() - 1) as u32
    }

    fn run(mut self, top: usize, scale: f64) -> Result<ValueGraph, ExecError> {
        let model = self.model;
        let nodes = &model.manifest.nodes;
        let mut consumers: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
        let mut last_use: BTreeMap<&str, usize> = BTreeMap::new();
        for (i, node) in nodes.iter().enumerate() {
            for input in &node.inputs {
                consumers.entry(input.as_str()).or_default().push(&node.op);
                last_use.insert(input.as_str(), i);
            }
        }
        let mut values: BTreeMap<&str, Vec<Form>> = BTreeMap::new();
        let mut seen_input = false;
        for (i, node) in nodes.iter().enumerate() {
            let [c, h, w] = node.shape;
            let x: &[Form] = node
                .inputs
                .first()
                .map(|n| {
                    values
                        .get(n.as_str())
                        .map(|v| v.as_slice())
                        .ok_or_else(|| ExecError::Model(format!("unknown input {n}")))
                })
                .transpose()?
                .unwrap_or(&[]);
            let out: Vec<Form> = match &node.op {
                Op::Input => {
                    if seen_input || i != 0 {
                        return Err(ExecError::Model("the input must be the first node".into()));
                    }
                    seen_input = true;
                    let n = c * h * w;
                    let id = self.push(Layer {
                        name: node.name.clone(),
                        kind: LayerKind::Input,
                        shape: node.shape,
                        forms: Vec::new(),
                        combine: Vec::new(),
                        reads_lazy: false,
                        meta: vec![
                            Meta {
                                level: top as isize,
                                scale
                            };
                            n
                        ],
                    });
                    (0..n)
                        .map(|e| {
                            Form::of(
                                ValueRef {
                                    layer: id,
                                    elem: e as u32,
                                },
                                1.0,
                                0.0,
                            )
                        })
                        .collect()
                }
                Op::Conv2d {
                    weight,
                    bias,
                    stride,
                    padding,
                } => {
                    let [ci, hi, wi] = model.shape_of(&node.inputs[0]);
                    let wt = model
                        .tensors
                        .get(weight)
                        .ok_or_else(|| ExecError::Model(format!("missing tensor {weight}")))?;
                    let (kh, kw) = (wt.shape[2], wt.shape[3]);
                    let bias = tensor(model, bias)?;
                    (0..c * h * w)
                        .map(|e| {
                            let (o, oy, ox) = (e / (h * w), (e / w) % h, e % w);
                            let mut y = Form {
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
                                        y.add_scaled(
                                            &x[(i * hi + iy as usize) * wi + ix as usize],
                                            wv,
                                        );
                                    }
                                }
                            }
                            y.merged()
                        })
                        .collect()
                }
                Op::Poly { a, b, c: cc } => {
                    let (a, b, cc) = (tensor(model, a)?, tensor(model, b)?, tensor(model, cc)?);
                    self.activation(&node.name, node.shape, x, a, b, cc)?
                }
                Op::Relu => return Err(ExecError::Relu(node.name.clone())),
                Op::Affine { scale, shift } => {
                    let (s, t) = (tensor(model, scale)?, tensor(model, shift)?);
                    x.iter()
                        .enumerate()
                        .map(|(e, xe)| {
                            let ch = e / (h * w);
                            let mut y = Form {
                                terms: Vec::new(),
                                constant: t[ch] as f64,
                            };
                            y.add_scaled(xe, s[ch] as f64);
                            y
                        })
                        .collect()
                }
                Op::AvgPool { kernel, stride } => {
                    let [_, hi, wi] = model.shape_of(&node.inputs[0]);
                    let inv = 1.0 / (kernel * kernel) as f64;
                    let pooled: Vec<Form> = (0..c * h * w)
                        .map(|e| {
                            let (ch, oy, ox) = (e / (h * w), (e / w) % h, e % w);
                            let mut y = Form::default();
                            for ky in 0..*kernel {
                                for kx in 0..*kernel {
                                    y.add_scaled(
                                        &x[(ch * hi + oy * stride + ky) * wi + ox * stride + kx],
                                        inv,
                                    );
                                }
                            }
                            y.merged()
                        })
                        .collect();
                    // Materialize as a free sum when a convolution reads the pool: its
                    // C_out outputs per position then multiply C_in sums instead of
                    // C_in k^2 values each (C_in (k^2 - 1) additions against
                    // C_out C_in (k^2 - 1) multiply-adds; fire1.squeeze: 4x fewer).
                    let conv_reads = consumers
                        .get(node.name.as_str())
                        .is_some_and(|ops| ops.iter().any(|op| matches!(op, Op::Conv2d { .. })));
                    if conv_reads && pooled.iter().all(|f| self.summable(f)) {
                        self.sum_layer(&node.name, node.shape, pooled)
                    } else {
                        pooled
                    }
                }
                Op::GlobalAvgPool => {
                    let [ci, hi, wi] = model.shape_of(&node.inputs[0]);
                    let inv = 1.0 / (hi * wi) as f64;
                    (0..ci)
                        .map(|ch| {
                            let mut y = Form::default();
                            for xe in &x[ch * hi * wi..(ch + 1) * hi * wi] {
                                y.add_scaled(xe, inv);
                            }
                            y.merged()
                        })
                        .collect()
                }
                Op::Concat => {
                    let mut out = Vec::with_capacity(c * h * w);
                    for name in &node.inputs {
                        let part = values
                            .get(name.as_str())
                            .ok_or_else(|| ExecError::Model(format!("unknown input {name}")))?;
                        out.extend(part.iter().cloned());
                    }
                    out
                }
            };
            if out.len() != c * h * w {
                return Err(ExecError::Model(format!(
                    "node {} produced {} elements for shape {:?}",
                    node.name,
                    out.len(),
                    node.shape
                )));
            }
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
        let output_shape = [out.len(), 1, 1];
        let mut combine = Vec::with_capacity(out.len());
        let mut meta = Vec::with_capacity(out.len());
        let reads_lazy = out.iter().any(|f| self.reads_lazy(f));
        for f in &out {
            let mut m = self.combine_meta(f)?;
            m.scale = m.scale / self.prime(m.level) * 2f64.powi(LOGIT_WEIGHT_BITS);
            combine.push(m);
            meta.push(self.after_combine(m, reads_lazy));
        }
        let out = match self.partial_sums(&out, &combine) {
            Some(partial) => {
                let id = self.push(partial);
                let layer = &self.layers[id as usize];
                let tiles = layer.tiles();
                (0..out.len())
                    .map(|k| Form {
                        terms: (0..tiles)
                            .map(|t| {
                                let elem = (k * tiles + t) as u32;
                                (ValueRef { layer: id, elem }, 1.0)
                            })
                            .collect(),
                        constant: out[k].constant,
                    })
                    .collect()
            }
            None => out,
        };
        self.push(Layer {
            name: "logits".into(),
            kind: LayerKind::Output,
            shape: output_shape,
            forms: out,
            combine,
            reads_lazy,
            meta,
        });
        Ok(ValueGraph {
            layers: self.layers,
            input_level: top,
            input_scale: scale,
        })
    }

    /// An activation layer: `x~ = s x` materialized, `y = x~^2 + beta x~`; forms
    /// `sign(a) y + c` downstream. Near-zero `a` stays linear.
    fn activation(
        &mut self,
        name: &str,
        shape: [usize; 3],
        x: &[Form],
        a: &[f32],
        b: &[f32],
        c: &[f32],
    ) -> Result<Vec<Form>, ExecError> {
        let n = x.len();
        if a.len() != n || b.len() != n || c.len() != n {
            return Err(ExecError::Model(format!(
                "activation {name}: coefficient count differs from {n} elements"
            )));
        }
        let id = self.layers.len() as u32;
        let lazy = self.lazy.contains(name);
        let reads_lazy = x.iter().any(|f| self.reads_lazy(f));
        let mut forms = Vec::new();
        let mut combine = Vec::new();
        let mut meta = Vec::new();
        let mut beta = Vec::new();
        let mut out = Vec::with_capacity(n);
        for e in 0..n {
            let (ae, be, ce) = (a[e] as f64, b[e] as f64, c[e] as f64);
            if ae.abs() < MIN_QUADRATIC {
                let mut y = Form {
                    terms: Vec::new(),
                    constant: ce,
                };
                y.add_scaled(&x[e], be);
                out.push(y);
                continue;
            }
            let s = ae.abs().sqrt();
            let mut xs = Form::default();
            xs.add_scaled(&x[e], s);
            let cm = self.combine_meta(&xs)?;
            let xt = self.after_combine(cm, reads_lazy);
            let y = if lazy {
                Meta {
                    level: xt.level,
                    scale: xt.scale * xt.scale,
                }
            } else {
                Meta {
                    level: xt.level - 1,
                    scale: xt.scale * xt.scale / self.prime(xt.level),
                }
            };
            let elem = forms.len() as u32;
            forms.push(xs);
            combine.push(cm);
            meta.push(y);
            beta.push(ae.signum() * be / s);
            out.push(Form::of(ValueRef { layer: id, elem }, ae.signum(), ce));
        }
        if forms.is_empty() {
            return Ok(out);
        }
        // Values are numbered densely; when every element is quadratic (the usual case)
        // value e is element e and tiles follow the feature map.
        let shape = if forms.len() == n {
            shape
        } else {
            [forms.len(), 1, 1]
        };
        self.push(Layer {
            name: name.to_string(),
            kind: LayerKind::Activation { beta, lazy },
            shape,
            forms,
            combine,
            reads_lazy,
            meta,
        });
        Ok(out)
    }

    /// The logits' forms split by the tile of the values they read, when they all read one
    /// layer of several tiles and every tile contributes to every logit: element
    /// `k * tiles + t` is logit `k`'s terms in tile `t`, combined at logit `k`'s level and
    /// target scale (`combine`), so the partial sums add up to the combination.
    fn partial_sums(&self, out: &[Form], combine: &[Meta]) -> Option<Layer> {
        let source = out.first()?.terms.first()?.0.layer;
        let src = &self.layers[source as usize];
        let tiles = src.tiles();
        if tiles < 2
            || out
                .iter()
                .flat_map(|f| &f.terms)
                .any(|(v, _)| v.layer != source)
        {
            return None;
        }
        let mut forms = vec![Form::default(); out.len() * tiles];
        for (k, f) in out.iter().enumerate() {
            for &(v, w) in &f.terms {
                forms[k * tiles + src.tile_of(v.elem as usize)]
                    .terms
                    .push((v, w));
            }
        }
        if forms.iter().any(|f| f.terms.is_empty()) {
            return None;
        }
        let metas: Vec<Meta> = (0..forms.len()).map(|e| combine[e / tiles]).collect();
        Some(Layer {
            name: "logits.partial".into(),
            kind: LayerKind::Partial,
            shape: [out.len(), src.shape[1], src.shape[2]],
            forms,
            combine: metas.clone(),
            reads_lazy: false,
            meta: metas,
        })
    }

    /// A pooled form is a free sum when all its weights have one magnitude and all its values
    /// share level and scale.
    fn summable(&self, f: &Form) -> bool {
        let Some(((v0, w0), rest)) = f.terms.split_first() else {
            return false;
        };
        let m0 = self.meta(*v0);
        rest.iter().all(|(v, w)| {
            let m = self.meta(*v);
            w.abs() == w0.abs() && m.level == m0.level && m.scale == m0.scale
        })
    }

    fn sum_layer(&mut self, name: &str, shape: [usize; 3], pooled: Vec<Form>) -> Vec<Form> {
        let id = self.layers.len() as u32;
        let mut forms = Vec::with_capacity(pooled.len());
        let mut meta = Vec::with_capacity(pooled.len());
        let mut out = Vec::with_capacity(pooled.len());
        for (e, f) in pooled.into_iter().enumerate() {
            let w = f.terms[0].1.abs();
            meta.push(self.meta(f.terms[0].0));
            out.push(Form::of(
                ValueRef {
                    layer: id,
                    elem: e as u32,
                },
                w,
                f.constant,
            ));
            forms.push(Form {
                terms: f.terms.iter().map(|(v, x)| (*v, x.signum())).collect(),
                constant: 0.0,
            });
        }
        let reads_lazy = forms.iter().any(|f| self.reads_lazy(f));
        self.push(Layer {
            name: name.to_string(),
            kind: LayerKind::Sum,
            shape,
            combine: Vec::new(),
            reads_lazy,
            forms,
            meta,
        });
        out
    }
}
