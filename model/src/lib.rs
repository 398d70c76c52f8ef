//! BEAA model format: a directory with `manifest.json` and `weights.safetensors` (f32),
//! the shared image preprocessing path, and a plaintext f64 reference forward pass.
//!
//! No candle here: this crate is used by the evaluator and compiled to wasm32.

pub mod preprocess;

use serde::{Deserialize, Serialize};

/// Errors from loading, validating or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("manifest is not valid JSON for this format: {0}")]
    Manifest(String),
    #[error("weights file is not valid safetensors: {0}")]
    Weights(String),
    #[error("invalid model: {0}")]
    Invalid(String),
    #[error("image error: {0}")]
    Image(String),
}

/// How an image of any size is brought to the model's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizePolicy {
    /// Resize the whole image to exactly height x width (aspect ratio not kept).
    Stretch,
    /// Scale so the image covers the target, then take the centre.
    ShorterSideCenterCrop,
}

/// Input shape and normalization, stored with the model so every client preprocesses alike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Per-channel mean of pixel/255.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation of pixel/255.
    pub std: Vec<f32>,
    pub resize: ResizePolicy,
}

impl InputSpec {
    /// Checks that mean/std match the channel count and std is positive.
    pub fn check(&self) -> Result<(), ModelError> {
        if self.channels != 1 && self.channels != 3 {
            return Err(ModelError::Invalid(format!(
                "input channels must be 1 or 3, got {}",
                self.channels
            )));
        }
        if self.mean.len() != self.channels || self.std.len() != self.channels {
            return Err(ModelError::Invalid(
                "input mean/std length must equal the channel count".into(),
            ));
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
            || self.mean.iter().any(|m| !m.is_finite())
        {
            return Err(ModelError::Invalid(
                "input std must be positive and finite".into(),
            ));
        }
        if self.height == 0 || self.width == 0 {
            return Err(ModelError::Invalid("input size must be positive".into()));
        }
        Ok(())
    }
}

pub mod eval;
pub mod graph;
pub mod packing;
pub mod range;
pub mod scores;
pub mod testing;
pub mod validation;
pub use testing::measure_ranges;

pub use graph::{Activation, ConvUnit, Node, Op, SqueezeNetSpec};
use std::collections::BTreeMap;
use std::path::Path;

/// Version of the directory format; bumped on incompatible changes.
pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_FILE: &str = "manifest.json";
pub const WEIGHTS_FILE: &str = "weights.safetensors";

/// Observed values of one node's output on training data (inputs to the encryption planner).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValueRange {
    pub min: f64,
    pub max: f64,
    pub max_abs: f64,
    /// 99.9th percentile of |x| (from a subsample when the node is large).
    pub p999_abs: f64,
    pub mean: f64,
    pub std: f64,
    /// Number of images the range was measured on.
    pub images: usize,
}

/// Where a model came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Provenance {
    pub data: String,
    pub epochs: usize,
    /// Epochs the schedule was planned for (more than `epochs` = partially trained).
    pub planned_epochs: usize,
    pub seed: u64,
    pub git_commit: String,
    /// Teacher used for knowledge distillation, if any.
    pub teacher: Option<String>,
    /// Free-form training settings (optimizer, schedule, ...).
    #[serde(default)]
    pub training: serde_json::Value,
}

/// `manifest.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub name: String,
    /// "beaa-squeezenet" for models built by [`SqueezeNetSpec::graph`].
    pub architecture: String,
    /// The widths, when the architecture is the SqueezeNet.
    pub squeezenet: Option<SqueezeNetSpec>,
    pub activation: Activation,
    pub input: InputSpec,
    pub classes: Vec<String>,
    /// Nodes in topological order; the first is the Input.
    pub nodes: Vec<Node>,
    /// Name of the node whose output (flattened) is the logits.
    pub output: String,
    /// Observed output values per node name; an activation's input range is the range of its
    /// input node.
    #[serde(default)]
    pub ranges: BTreeMap<String, ValueRange>,
    /// Trainable activation parameters (Table 3: 3 per layer / channel / element).
    pub activation_parameters: usize,
    /// Activation evaluations per image (elements passing through an activation).
    pub activation_evaluations: usize,
    pub provenance: Provenance,
    /// Validation results at export (accuracy, balanced accuracy, per-class recall, split).
    #[serde(default)]
    pub metrics: serde_json::Value,
}

/// A dense f32 tensor from the weights file.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorData {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A loaded, validated model.
#[derive(Debug, Clone)]
pub struct Model {
    pub manifest: Manifest,
    pub tensors: BTreeMap<String, TensorData>,
}

fn invalid<T>(msg: impl Into<String>) -> Result<T, ModelError> {
    Err(ModelError::Invalid(msg.into()))
}

impl Model {
    /// Builds and validates a model.
    pub fn new(
        manifest: Manifest,
        tensors: BTreeMap<String, TensorData>,
    ) -> Result<Self, ModelError> {
        let m = Model { manifest, tensors };
        m.validate()?;
        Ok(m)
    }

    /// Loads `manifest.json` + `weights.safetensors` from a directory.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let read = |f: &str| {
            let p = dir.join(f);
            std::fs::read(&p).map_err(|source| ModelError::Io {
                path: p.display().to_string(),
                source,
            })
        };
        Self::from_bytes(&read(MANIFEST_FILE)?, &read(WEIGHTS_FILE)?)
    }

    /// Parses a model from the two files' bytes (for the browser, which has no file system).
    pub fn from_bytes(manifest_json: &[u8], weights: &[u8]) -> Result<Self, ModelError> {
        let manifest: Manifest = serde_json::from_slice(manifest_json)
            .map_err(|e| ModelError::Manifest(e.to_string()))?;
        if manifest.format_version != FORMAT_VERSION {
            return invalid(format!(
                "format_version {} is not supported (expected {FORMAT_VERSION})",
                manifest.format_version
            ));
        }
        let st = safetensors::SafeTensors::deserialize(weights)
            .map_err(|e| ModelError::Weights(e.to_string()))?;
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            if view.dtype() != safetensors::Dtype::F32 {
                return Err(ModelError::Weights(format!(
                    "tensor {name} is {:?}, expected F32",
                    view.dtype()
                )));
            }
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            tensors.insert(
                name,
                TensorData {
                    shape: view.shape().to_vec(),
                    data,
                },
            );
        }
        Self::new(manifest, tensors)
    }

    /// Writes the directory (created if missing).
    pub fn save(&self, dir: &Path) -> Result<(), ModelError> {
        let io = |p: &Path| {
            let path = p.display().to_string();
            move |source| ModelError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let json = serde_json::to_vec_pretty(&self.manifest)
            .map_err(|e| ModelError::Manifest(e.to_string()))?;
        let mp = dir.join(MANIFEST_FILE);
        std::fs::write(&mp, json).map_err(io(&mp))?;
        let wp = dir.join(WEIGHTS_FILE);
        std::fs::write(&wp, self.weights_bytes()?).map_err(io(&wp))?;
        Ok(())
    }

    /// The safetensors file contents.
    pub fn weights_bytes(&self) -> Result<Vec<u8>, ModelError> {
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = self
            .tensors
            .iter()
            .map(|(k, t)| {
                (
                    k.clone(),
                    t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    t.shape.clone(),
                )
            })
            .collect();
        let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
            .iter()
            .map(|(k, b, s)| {
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| ModelError::Weights(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        safetensors::serialize(views, None).map_err(|e| ModelError::Weights(e.to_string()))
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<&TensorData, ModelError> {
        let t = match self.tensors.get(name) {
            Some(t) => t,
            None => return invalid(format!("tensor {name} is missing from the weights")),
        };
        if t.shape != shape {
            return invalid(format!(
                "tensor {name} has shape {:?}, expected {shape:?}",
                t.shape
            ));
        }
        Ok(t)
    }

    /// Checks the graph (topological, shapes consistent), tensors (present, shaped, finite),
    /// input spec and classes.
    pub fn validate(&self) -> Result<(), ModelError> {
        let m = &self.manifest;
        m.input.check()?;
        let mut shapes: BTreeMap<&str, [usize; 3]> = BTreeMap::new();
        for (i, n) in m.nodes.iter().enumerate() {
            if shapes.contains_key(n.name.as_str()) {
                return invalid(format!("duplicate node name {}", n.name));
            }
            let ins: Vec<[usize; 3]> = n
                .inputs
                .iter()
                .map(|s| {
                    shapes.get(s.as_str()).copied().ok_or_else(|| {
                        ModelError::Invalid(format!(
                            "node {} uses {s}, which is not an earlier node",
                            n.name
                        ))
                    })
                })
                .collect::<Result<_, _>>()?;
            let arity = match n.op {
                Op::Input => 0,
                Op::Concat => ins.len().max(1),
                _ => 1,
            };
            if ins.len() != arity {
                return invalid(format!(
                    "node {} has {} inputs, expected {arity}",
                    n.name,
                    ins.len()
                ));
            }
            let [c, h, w] = n.shape;
            let expect: [usize; 3] = match &n.op {
                Op::Input => {
                    if i != 0 {
                        return invalid("the Input node must be first");
                    }
                    [m.input.channels, m.input.height, m.input.width]
                }
                Op::Conv2d {
                    weight,
                    bias,
                    stride,
                    padding,
                } => {
                    let [ci, hi, wi] = ins[0];
                    let wt = self.tensors.get(weight).ok_or_else(|| {
                        ModelError::Invalid(format!("tensor {weight} is missing"))
                    })?;
                    if wt.shape.len() != 4 || wt.shape[1] != ci || wt.shape[0] != c {
                        return invalid(format!(
                            "{weight} has shape {:?}, expected [{c}, {ci}, kh, kw]",
                            wt.shape
                        ));
                    }
                    self.tensor(bias, &[c])?;
                    let (kh, kw) = (wt.shape[2], wt.shape[3]);
                    if *stride == 0 || hi + 2 * padding < kh || wi + 2 * padding < kw {
                        return invalid(format!("conv {} has a bad stride or kernel", n.name));
                    }
                    [
                        c,
                        (hi + 2 * padding - kh) / stride + 1,
                        (wi + 2 * padding - kw) / stride + 1,
                    ]
                }
                Op::Poly { a, b, c: cc } => {
                    for t in [a, b, cc] {
                        self.tensor(t, &ins[0])?;
                    }
                    ins[0]
                }
                Op::Relu => ins[0],
                Op::Affine { scale, shift } => {
                    self.tensor(scale, &[ins[0][0]])?;
                    self.tensor(shift, &[ins[0][0]])?;
                    ins[0]
                }
                Op::AvgPool { kernel, stride } => {
                    let [ci, hi, wi] = ins[0];
                    if *kernel == 0 || *stride == 0 || hi < *kernel || wi < *kernel {
                        return invalid(format!("avg pool {} has a bad kernel or stride", n.name));
                    }
                    [ci, (hi - kernel) / stride + 1, (wi - kernel) / stride + 1]
                }
                Op::GlobalAvgPool => [ins[0][0], 1, 1],
                Op::Concat => {
                    let (h0, w0) = (ins[0][1], ins[0][2]);
                    if ins.iter().any(|s| s[1] != h0 || s[2] != w0) {
                        return invalid(format!("concat {} joins maps of different sizes", n.name));
                    }
                    [ins.iter().map(|s| s[0]).sum(), h0, w0]
                }
            };
            if expect != [c, h, w] {
                return invalid(format!(
                    "node {} declares shape {:?}, computed {:?}",
                    n.name, n.shape, expect
                ));
            }
            shapes.insert(&n.name, expect);
        }
        match m.nodes.first() {
            Some(n) if n.op == Op::Input => {}
            _ => return invalid("the graph must start with an Input node"),
        }
        let out = match shapes.get(m.output.as_str()) {
            Some(s) => s,
            None => return invalid(format!("output node {} does not exist", m.output)),
        };
        if out[0] * out[1] * out[2] != m.classes.len() {
            return invalid(format!(
                "output has {} values but there are {} classes",
                out[0] * out[1] * out[2],
                m.classes.len()
            ));
        }
        for (k, t) in &self.tensors {
            if t.shape.iter().product::<usize>() != t.data.len() {
                return invalid(format!("tensor {k} data length does not match its shape"));
            }
            if t.data.iter().any(|v| !v.is_finite()) {
                return invalid(format!("tensor {k} has non-finite values"));
            }
        }
        Ok(())
    }

    pub fn input_len(&self) -> usize {
        let i = &self.manifest.input;
        i.channels * i.height * i.width
    }

    /// Plaintext f64 forward pass. `batch` is `n` images, each normalized [C, H, W];
    /// returns `n * classes` logits.
    pub fn forward(&self, batch: &[f64], n: usize) -> Result<Vec<f64>, ModelError> {
        self.forward_observe(batch, n, &mut |_, _| {})
    }

    /// [`Model::forward`] for f32 input.
    pub fn forward_f32(&self, batch: &[f32], n: usize) -> Result<Vec<f64>, ModelError> {
        let b: Vec<f64> = batch.iter().map(|&v| v as f64).collect();
        self.forward(&b, n)
    }

    /// Forward pass that shows every node's output (per image) to `observe`.
    pub fn forward_observe(
        &self,
        batch: &[f64],
        n: usize,
        observe: &mut dyn FnMut(&Node, &[f64]),
    ) -> Result<Vec<f64>, ModelError> {
        let per = self.input_len();
        if batch.len() != n * per {
            return invalid(format!(
                "batch has {} values, expected {n} x {per}",
                batch.len()
            ));
        }
        let k = self.manifest.classes.len();
        let mut out = Vec::with_capacity(n * k);
        for img in batch.chunks_exact(per.max(1)).take(n) {
            let mut vals: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
            for node in &self.manifest.nodes {
                let y = self.eval_node(node, img, &vals);
                observe(node, &y);
                vals.insert(&node.name, y);
            }
            out.extend_from_slice(&vals[self.manifest.output.as_str()]);
        }
        Ok(out)
    }

    fn t(&self, name: &str) -> &[f32] {
        // validated at construction
        &self.tensors[name].data
    }

    /// Output shape [C, H, W] of the node called `name` ([0, 0, 0] if there is none).
    pub fn shape_of(&self, name: &str) -> [usize; 3] {
        self.manifest
            .nodes
            .iter()
            .find(|n| n.name == name)
            .map(|n| n.shape)
            .unwrap_or([0; 3])
    }

    fn eval_node(&self, node: &Node, img: &[f64], vals: &BTreeMap<&str, Vec<f64>>) -> Vec<f64> {
        let input = |i: usize| &vals[node.inputs[i].as_str()];
        let [c, h, w] = node.shape;
        match &node.op {
            Op::Input => img.to_vec(),
            Op::Conv2d {
                weight,
                bias,
                stride,
                padding,
            } => {
                let x = input(0);
                let [ci, hi, wi] = self.shape_of(&node.inputs[0]);
                let wt = &self.tensors[weight];
                let (kh, kw) = (wt.shape[2], wt.shape[3]);
                let b = self.t(bias);
                let mut y = vec![0f64; c * h * w];
                for o in 0..c {
                    let yo = &mut y[o * h * w..(o + 1) * h * w];
                    yo.iter_mut().for_each(|v| *v = b[o] as f64);
                    for i in 0..ci {
                        let xi = &x[i * hi * wi..(i + 1) * hi * wi];
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let wv = wt.data[((o * ci + i) * kh + ky) * kw + kx] as f64;
                                for oy in 0..h {
                                    let iy = (oy * stride + ky) as isize - *padding as isize;
                                    if iy < 0 || iy >= hi as isize {
                                        continue;
                                    }
                                    let row = &xi[iy as usize * wi..(iy as usize + 1) * wi];
                                    let yrow = &mut yo[oy * w..(oy + 1) * w];
                                    for (ox, yv) in yrow.iter_mut().enumerate() {
                                        let ix = (ox * stride + kx) as isize - *padding as isize;
                                        if ix >= 0 && ix < wi as isize {
                                            *yv += wv * row[ix as usize];
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
                y
            }
            Op::Poly { a, b, c: cc } => {
                let (a, b, cc) = (self.t(a), self.t(b), self.t(cc));
                input(0)
                    .iter()
                    .enumerate()
                    .map(|(e, &x)| (a[e] as f64 * x + b[e] as f64) * x + cc[e] as f64)
                    .collect()
            }
            Op::Relu => input(0).iter().map(|&x| x.max(0.0)).collect(),
            Op::Affine { scale, shift } => {
                let (s, t) = (self.t(scale), self.t(shift));
                input(0)
                    .iter()
                    .enumerate()
                    .map(|(e, &x)| s[e / (h * w)] as f64 * x + t[e / (h * w)] as f64)
                    .collect()
            }
            Op::AvgPool { kernel, stride } => {
                let x = input(0);
                let [_, hi, wi] = self.shape_of(&node.inputs[0]);
                let inv = 1.0 / (kernel * kernel) as f64;
                let mut y = vec![0f64; c * h * w];
                for ch in 0..c {
                    for oy in 0..h {
                        for ox in 0..w {
                            let mut s = 0.0;
                            for ky in 0..*kernel {
                                for kx in 0..*kernel {
                                    s += x[(ch * hi + oy * stride + ky) * wi + ox * stride + kx];
                                }
                            }
                            y[(ch * h + oy) * w + ox] = s * inv;
                        }
                    }
                }
                y
            }
            Op::GlobalAvgPool => {
                let x = input(0);
                let [ci, hi, wi] = self.shape_of(&node.inputs[0]);
                (0..ci)
                    .map(|ch| {
                        x[ch * hi * wi..(ch + 1) * hi * wi].iter().sum::<f64>() / (hi * wi) as f64
                    })
                    .collect()
            }
            Op::Concat => (0..node.inputs.len())
                .flat_map(|i| input(i).iter().copied())
                .collect(),
        }
    }

    /// The largest |logit| seen on the calibration images (manifest `ranges`), the yardstick
    /// of [`range::outside_calibration`].
    pub fn logit_calibration(&self) -> Option<f64> {
        self.manifest
            .ranges
            .get(&self.manifest.output)
            .map(|r| r.max_abs)
            .filter(|m| m.is_finite() && *m > 0.0)
    }

    /// The validation result recorded at export, when the manifest has a well-formed one.
    pub fn validation(&self) -> Option<validation::ValidationSummary> {
        validation::ValidationSummary::of(&self.manifest)
    }

    /// Predicted class per image.
    pub fn predict(&self, batch: &[f64], n: usize) -> Result<Vec<usize>, ModelError> {
        let k = self.manifest.classes.len();
        let logits = self.forward(batch, n)?;
        Ok(logits.chunks_exact(k).map(scores::argmax).collect())
    }

    /// Activation evaluations per image, counted from the graph (elements through Poly/Relu).
    pub fn count_activation_evaluations(&self) -> usize {
        self.manifest
            .nodes
            .iter()
            .filter(|n| matches!(n.op, Op::Poly { .. } | Op::Relu))
            .map(|n| n.shape.iter().product::<usize>())
            .sum()
    }
}
