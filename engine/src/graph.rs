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
//!   A *lazy* activation leaves `y` degree 2 and unrescaled for its reader, which sums it;
//!   an *unrescaled* one also skips `x~`'s rescale ([`UNRESCALED_WEIGHT_BITS`]).
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
    /// Plain sum of the form's values with weights +-1 (no rescale). Over lazy squares it
    /// is degree 2, unless it finishes them itself (`divides > 0`: a stored sum, pool2, one
    /// key switch per sum instead of one per square).
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
/// `e % (H W)`. Its *tiles* are computed together: all channels of one position, or of a
/// `block x block` square of positions (layers computed in Winograd's form, which makes a 2x2
/// block at once, and the pointwise layers reading them). A stored layer is kept *per
/// position* whatever its tile (`position_elems`): a 3x3 window then loads just the
/// positions it reads, where 2x2-block tiles offset by the padding would load 36 positions
/// to use 16.
#[derive(Debug, Clone)]
pub struct Layer {
    pub name: String,
    pub kind: LayerKind,
    pub shape: [usize; 3],
    /// Side of a tile in positions (1 or [`winograd::BLOCK`]).
    pub block: usize,
    /// For an activation: its combination computed in Winograd's F(2x2, 3x3) form instead of
    /// from `forms` (which still list what it reads and what it equals).
    pub winograd: Option<Box<Winograd>>,
    /// Per element: what is combined (empty for the input).
    pub forms: Vec<Form>,
    /// Per element: the level the combination is computed at and its target scale (for
    /// activations and outputs; unused for inputs and sums).
    pub combine: Vec<Meta>,
    /// The combination reads lazy (degree-2) values: one key switch that also divides by the
    /// primes of its rescales (`relinearize_rescale_by_assign`). For a
    /// sum: its terms are lazy, so it is degree 2 itself (relinearized by its reader) unless
    /// it finishes them (`divides` 1).
    pub reads_lazy: bool,
    /// Primes the combination's rescale divides by: 1; 2 over lazy squares (their own
    /// rescale, deferred); 3 over lazy squares of an unrescaled combination; 0 for such an
    /// unrescaled activation itself, and for inputs, partial sums and sums (1 for a sum that
    /// finishes lazy squares, in the key switch of each of its values).
    pub divides: usize,
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
    /// Tiles per row and per column.
    fn tile_grid(&self) -> (usize, usize) {
        (
            self.shape[1].div_ceil(self.block),
            self.shape[2].div_ceil(self.block),
        )
    }
    pub fn tiles(&self) -> usize {
        let (rows, cols) = self.tile_grid();
        rows * cols
    }
    pub fn tile_of(&self, elem: usize) -> usize {
        let w = self.shape[2];
        let pos = elem % (self.shape[1] * w);
        let (y, x) = (pos / w, pos % w);
        (y / self.block) * self.tile_grid().1 + x / self.block
    }
    /// The positions of tile `t`, row-major (fewer at the right and bottom edges of a map
    /// whose side is not a multiple of the block).
    pub fn tile_positions(&self, t: usize) -> impl Iterator<Item = usize> + '_ {
        let (h, w, b) = (self.shape[1], self.shape[2], self.block);
        let cols = self.tile_grid().1;
        let (y0, x0) = ((t / cols) * b, (t % cols) * b);
        (y0..(y0 + b).min(h)).flat_map(move |y| (x0..(x0 + b).min(w)).map(move |x| y * w + x))
    }
    /// Elements of tile `t`: channel by channel, each channel's positions row-major.
    pub fn tile_elems(&self, t: usize) -> impl Iterator<Item = usize> + '_ {
        let hw = self.shape[1] * self.shape[2];
        (0..self.shape[0]).flat_map(move |c| self.tile_positions(t).map(move |p| c * hw + p))
    }
    /// Number of elements of tile `t`.
    pub fn tile_len(&self, t: usize) -> usize {
        self.shape[0] * self.tile_positions(t).count()
    }
    /// Positions of the map: the unit a stored layer is kept and read in.
    pub fn positions(&self) -> usize {
        self.shape[1] * self.shape[2]
    }
    pub fn position_of(&self, elem: usize) -> usize {
        elem % self.positions()
    }
    /// Elements at position `p`, channel by channel.
    pub fn position_elems(&self, p: usize) -> impl Iterator<Item = usize> {
        let hw = self.positions();
        (0..self.shape[0]).map(move |c| c * hw + p)
    }
}

/// A 3x3 convolution (stride 1, padding 1) whose activation is computed in Winograd's
/// F(2x2, 3x3) form: per 2x2 block of outputs, the 4x4 input patches transformed by
/// additions, 16 products per channel pair instead of 36, the block recovered by additions
/// (`beaa_ckks::Evaluator::factored_combinations`). Every input element must be one value
/// (times a weight of one magnitude per channel, and a constant, which the forms carry).
#[derive(Debug, Clone)]
pub struct Winograd {
    /// The layer every input value belongs to.
    pub input_layer: u32,
    /// `[C_in, H, W]` of the convolution's input (the output has the same `H, W`).
    pub input_shape: [usize; 3],
    /// Per input element: its value's element in `input_layer` and whether it enters negated.
    pub inputs: Vec<(u32, bool)>,
    /// The transformed filters times each input channel's weight magnitude, `16 x C_out x C_in`.
    pub u: Vec<f64>,
    /// Per output element: the activation's `sqrt|a|`, applied after the products.
    pub factor: Vec<f64>,
    /// Bits of fraction of the transformed weights: the products carry the inputs' scale
    /// times 2^u_bits and the factors the rest of the combining prime. Chosen so that the
    /// largest weight and the largest factor get equally many bits (about 18 each for a
    /// 40-bit prime): the per-element factor, which differs between the four outputs sharing
    /// the products, must be applied before the one rescale, so the prime's precision is
    /// split between the two (a direct combination gives each weight all of it).
    pub u_bits: i32,
}

pub mod winograd {
    /// Side of the output block of F(2x2, 3x3).
    pub const BLOCK: usize = 2;
}

/// Bits of the weights of an *unrescaled* activation's combination: a lazy activation over
/// degree-1 inputs (conv1, the expand layers) combined at (inputs' scale) x 2^this and not
/// rescaled at all. Its squares then carry (scale x 2^this)^2 and its reader's key switch
/// divides by three primes instead of two: the same levels, and each of its values saves a
/// rescale (65,536 of conv1's at 16 primes per CIFAR-10 job). The reader's weights get
/// `2 x 40 - 2 x this` = 32 bits instead of 40; 24 bits here round conv1's weights to
/// 6e-8 of the largest input, far below the encrypted logits' error of ~1e-4.
pub const UNRESCALED_WEIGHT_BITS: i32 = 24;

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
/// activation, or a sum over lazy activations that does not relinearize them itself.
fn holds_lazy(layer: &Layer) -> bool {
    match layer.kind {
        LayerKind::Activation { lazy, .. } => lazy,
        LayerKind::Sum => layer.reads_lazy && layer.divides == 0,
        _ => false,
    }
}

/// What a plan leaves for the readers of values to finish (chosen by `plan::lazy_layers`).
#[derive(Debug, Clone, Default)]
pub struct Deferred {
    /// Activations left degree 2 and unrescaled: their reader relinearizes its sums.
    pub lazy: BTreeSet<String>,
    /// Lazy activations whose combination is not rescaled either
    /// ([`UNRESCALED_WEIGHT_BITS`]).
    pub unrescaled: BTreeSet<String>,
    /// Sums over lazy activations that relinearize and rescale their own values (a stored
    /// pool read by a convolution in Winograd's form, which needs degree-1 inputs).
    pub finishing_sums: BTreeSet<String>,
}

/// Primes a reader of layer `l`'s values must divide by besides its own rescale: 1 for lazy
/// squares (their rescale deferred to the reader), 2 for lazy squares of an unrescaled
/// combination, the same for a sum over either, 0 otherwise.
fn pending_primes(layers: &[Layer], l: usize) -> usize {
    let layer = &layers[l];
    match layer.kind {
        LayerKind::Activation { lazy: true, .. } => {
            if layer.divides == 0 {
                2
            } else {
                1
            }
        }
        LayerKind::Sum if layer.reads_lazy && layer.divides == 0 => layer
            .forms
            .first()
            .and_then(|f| f.terms.first())
            .map_or(0, |(v, _)| pending_primes(layers, v.layer as usize)),
        _ => 0,
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
    /// the activation layers named in `deferred.lazy` stay unrelinearized (see [`LayerKind`]),
    /// and the sums in `deferred.finishing_sums` relinearize those they add up; with
    /// `winograd = Some(c)`, the 3x3 convolutions over at least `c` input channels that allow it
    /// are computed in Winograd's form. The lazy layers also named in `deferred.unrescaled`
    /// combine without a rescale ([`UNRESCALED_WEIGHT_BITS`]); each must read degree-1 values
    /// only, have every element quadratic and not be in Winograd's form, and every reader
    /// must read such layers only, or none; their readers may not be sums.
    pub fn build(
        model: &Model,
        params: &Params,
        deferred: &Deferred,
        winograd: Option<usize>,
    ) -> Result<Self, ExecError> {
        Builder {
            model,
            q: params.q(),
            layers: Vec::new(),
            lazy: &deferred.lazy,
            unrescaled: &deferred.unrescaled,
            finishing_sums: &deferred.finishing_sums,
            winograd_min_channels: winograd,
            winograd: BTreeMap::new(),
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
            if let (Some(wg), Some(cm)) = (&layer.winograd, layer.combine.first()) {
                // Mirrors `Evaluator::factored_combinations`.
                let unit = 2f64.powi(wg.u_bits);
                if let Some(u) = wg.u.iter().find(|u| (*u * unit).abs() >= 9.0e18) {
                    return fail(&layer.name, 0, format!("transformed weight {u}"));
                }
                let in_scale = self.layers[wg.input_layer as usize].meta[0].scale;
                let f_unit = cm.scale / (in_scale * unit);
                let bits = log_q(cm.level) - 2.0;
                if let Some(f) = wg
                    .factor
                    .iter()
                    .find(|f| (*f * f_unit).abs().log2() >= bits)
                {
                    return fail(&layer.name, 0, format!("factor {f} at scale {f_unit:e}"));
                }
            }
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
                    // the x~ the coefficient multiplies: the combination divided by its primes
                    let (mut level, mut scale) = (cm.level, cm.scale);
                    for _ in 0..layer.divides {
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
        if let Some(wg) = &layer.winograd {
            // Per block: 16 products per channel pair, then one factor per output.
            let limbs = layer
                .combine
                .first()
                .map_or(0, |m| m.level.max(0) as u64 + 1);
            let (ci, co) = (wg.input_shape[0] as u64, layer.shape[0] as u64);
            let per_block = 16 * ci * co + layer.tile_len(0) as u64;
            return layer.tiles() as u64 * per_block * limbs * 2;
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
    unrescaled: &'m BTreeSet<String>,
    finishing_sums: &'m BTreeSet<String>,
    /// Fewest input channels of a 3x3 convolution computed in Winograd's form (`None`: none).
    winograd_min_channels: Option<usize>,
    /// Per convolution node: its Winograd form, for the activation that reads it.
    winograd: BTreeMap<String, Winograd>,
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
    /// prime) x (smallest scale), so the rescale returns to about the inputs' scale. Over
    /// squares of an unrescaled combination, `(s 2^u)^2` for inputs at `s`, the target is
    /// `s^2` times the two top primes, so that dividing by three primes returns to about
    /// `s` (see [`UNRESCALED_WEIGHT_BITS`]). Mirrors `Evaluator::linear_combination` +
    /// `rescale_assign`. Also returns the form's [`pending_primes`].
    fn combine_meta(&self, form: &Form) -> Result<(Meta, usize), ExecError> {
        let Meta { level, scale } = self.lowest(form)?;
        let pending = self.pending(form)?;
        let scale = match pending {
            2 => {
                scale * self.prime(level) * self.prime(level - 1)
                    / 2f64.powi(2 * UNRESCALED_WEIGHT_BITS)
            }
            _ => scale * self.prime(level),
        };
        Ok((Meta { level, scale }, pending))
    }

    /// The lowest level and the smallest scale among the values `form` reads.
    fn lowest(&self, form: &Form) -> Result<Meta, ExecError> {
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
        Ok(Meta { level, scale })
    }

    /// [`pending_primes`] of the values `form` reads; one count for all of them.
    fn pending(&self, form: &Form) -> Result<usize, ExecError> {
        let mut counts = form
            .terms
            .iter()
            .map(|(v, _)| pending_primes(&self.layers, v.layer as usize));
        let first = counts.next().unwrap_or(0);
        if counts.any(|c| c != first) {
            return Err(ExecError::Model(
                "a combination reads squares of unrescaled and of rescaled combinations".into(),
            ));
        }
        Ok(first)
    }

    /// Whether a form reads lazy (degree-2) values.
    fn reads_lazy(&self, form: &Form) -> bool {
        form.terms
            .iter()
            .any(|(v, _)| holds_lazy(&self.layers[v.layer as usize]))
    }

    /// Level and scale after dividing a combination by its top `divides` primes; mirrors
    /// `rescale_assign` / `relinearize_rescale_by_assign`.
    fn after_combine(&self, cm: Meta, divides: usize) -> Meta {
        let mut m = cm;
        for _ in 0..divides {
            m = Meta {
                level: m.level - 1,
                scale: m.scale / self.prime(m.level),
            };
        }
        m
    }

    /// Adds a layer, choosing its tile: a 2x2 block when it is computed in Winograd's form,
    /// or when it reads such a layer of its own map size (a pointwise layer after it: with
    /// single-position tiles, each block would be read by four of its tiles and could no
    /// longer be computed inside its reader).
    fn push(&mut self, mut layer: Layer) -> u32 {
        let [_, h, w] = layer.shape;
        let reads_block = || {
            layer.forms.iter().flat_map(|f| &f.terms).any(|(v, _)| {
                let src = &self.layers[v.layer as usize];
                src.block > 1 && src.shape[1] == h && src.shape[2] == w
            })
        };
        if layer.winograd.is_some() || (h * w > 1 && reads_block()) {
            layer.block = winograd::BLOCK;
        }
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
                        block: 1,
                        winograd: None,
                        forms: Vec::new(),
                        combine: Vec::new(),
                        reads_lazy: false,
                        divides: 0,
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
                    let square_3x3 = (kh, kw, *stride, *padding, hi, wi) == (3, 3, 1, 1, h, w);
                    if square_3x3 && self.winograd_min_channels.is_some_and(|m| ci >= m) {
                        if let Some(wg) = self.winograd_form(x, [ci, hi, wi], c, &wt.data) {
                            self.winograd.insert(node.name.clone(), wg);
                        }
                    }
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
                    let wg = node.inputs.first().and_then(|n| self.winograd.remove(n));
                    self.activation(&node.name, node.shape, x, (a, b, cc), wg)?
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
                        self.sum_layer(&node.name, node.shape, pooled)?
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
        let mut divides = 1;
        for f in &out {
            let (mut m, pending) = self.combine_meta(f)?;
            m.scale = m.scale / self.prime(m.level) * 2f64.powi(LOGIT_WEIGHT_BITS);
            divides = 1 + pending;
            combine.push(m);
            meta.push(self.after_combine(m, divides));
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
            block: 1,
            winograd: None,
            forms: out,
            combine,
            reads_lazy,
            divides,
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
        (a, b, c): (&[f32], &[f32], &[f32]),
        winograd: Option<Winograd>,
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
        let unrescaled = self.unrescaled.contains(name);
        if unrescaled
            && (!lazy
                || reads_lazy
                || winograd.is_some()
                || a.iter().any(|ae| (*ae as f64).abs() < MIN_QUADRATIC))
        {
            return Err(ExecError::Model(format!(
                "activation {name} cannot skip its rescale: it must be lazy, read degree-1 \
                 values, have every element quadratic and not be in Winograd's form"
            )));
        }
        let mut divides = if unrescaled { 0 } else { 1 };
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
            let cm = if unrescaled {
                let m = self.lowest(&xs)?;
                Meta {
                    scale: m.scale * 2f64.powi(UNRESCALED_WEIGHT_BITS),
                    ..m
                }
            } else {
                let (cm, pending) = self.combine_meta(&xs)?;
                if forms.is_empty() {
                    divides = 1 + pending;
                } else if divides != 1 + pending {
                    return Err(ExecError::Model(format!(
                        "activation {name}: elements read squares of unrescaled and of \
                         rescaled combinations"
                    )));
                }
                cm
            };
            let xt = self.after_combine(cm, divides);
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
        // Winograd's form needs every element quadratic (one value each, in map order).
        let winograd = winograd.filter(|_| forms.len() == n).map(|mut wg| {
            wg.factor = a.iter().map(|&ae| (ae as f64).abs().sqrt()).collect();
            let max = |v: &[f64]| v.iter().fold(f64::MIN_POSITIVE, |m, x| m.max(x.abs()));
            let ratio = combine[0].scale / self.meta(forms[0].terms[0].0).scale;
            wg.u_bits =
                ((ratio.log2() + max(&wg.factor).log2() - max(&wg.u).log2()) / 2.0).round() as i32;
            Box::new(wg)
        });
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
            block: 1,
            winograd,
            forms,
            combine,
            reads_lazy,
            divides,
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
            // One element per logit and source tile: the tiles in raster order.
            shape: [out.len(), 1, tiles],
            block: 1,
            winograd: None,
            forms,
            combine: metas.clone(),
            reads_lazy: false,
            divides: 0,
            meta: metas,
        })
    }

    /// The Winograd form of a 3x3 convolution over the input forms `x` (`[ci, h, w]`) with
    /// weights `[co, ci, 3, 3]`, if its inputs allow it: each one value of one layer (degree 1,
    /// one level and scale) with a weight of one magnitude per channel (folded into the
    /// transformed filters; signs go to the additions, constants stay in the forms).
    fn winograd_form(
        &self,
        x: &[Form],
        [ci, h, w]: [usize; 3],
        co: usize,
        weights: &[f32],
    ) -> Option<Winograd> {
        let first = x.first()?.terms.first()?.0;
        let src = &self.layers[first.layer as usize];
        if holds_lazy(src) || x.len() != ci * h * w || weights.len() != co * ci * 9 {
            return None;
        }
        let m0 = self.meta(first);
        let mut inputs = Vec::with_capacity(x.len());
        let mut mu = vec![0.0f64; ci];
        for (e, f) in x.iter().enumerate() {
            let [(v, wv)] = f.terms[..] else {
                return None;
            };
            let m = self.meta(v);
            let ch = e / (h * w);
            if v.layer != first.layer || m.level != m0.level || m.scale != m0.scale || wv == 0.0 {
                return None;
            }
            if e % (h * w) == 0 {
                mu[ch] = wv.abs();
            } else if (wv.abs() - mu[ch]).abs() > 1e-12 * mu[ch] {
                return None;
            }
            inputs.push((v.elem, wv < 0.0));
        }
        let mut u = vec![0.0; 16 * co * ci];
        for o in 0..co {
            for (c, &m) in mu.iter().enumerate() {
                let g: [f64; 9] = std::array::from_fn(|k| weights[(o * ci + c) * 9 + k] as f64 * m);
                for (k, uk) in beaa_ckks::winograd::filter(&g).into_iter().enumerate() {
                    u[(k * co + o) * ci + c] = uk;
                }
            }
        }
        Some(Winograd {
            input_layer: first.layer,
            input_shape: [ci, h, w],
            inputs,
            u,
            factor: Vec::new(),
            u_bits: 0,
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

    fn sum_layer(
        &mut self,
        name: &str,
        shape: [usize; 3],
        pooled: Vec<Form>,
    ) -> Result<Vec<Form>, ExecError> {
        let id = self.layers.len() as u32;
        let mut forms = Vec::with_capacity(pooled.len());
        let mut meta = Vec::with_capacity(pooled.len());
        let mut out = Vec::with_capacity(pooled.len());
        let mut divides = 0;
        if self.finishing_sums.contains(name) {
            divides = pooled.first().map_or(Ok(0), |f| self.pending(f))?;
            if divides != 1 {
                return Err(ExecError::Model(format!(
                    "{name}: only a sum of squares of rescaled combinations can finish them"
                )));
            }
        }
        for (e, f) in pooled.into_iter().enumerate() {
            let w = f.terms[0].1.abs();
            meta.push(self.after_combine(self.meta(f.terms[0].0), divides));
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
            block: 1,
            winograd: None,
            combine: Vec::new(),
            reads_lazy,
            divides,
            forms,
            meta,
        });
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tiles of single positions and of 2x2 blocks (maps of odd sides included): every element
    /// in exactly one tile, `tile_of` the inverse of `tile_elems`, `tile_len` their count; the
    /// same for positions.
    #[test]
    fn block_tiles_cover_every_element_once() {
        for (c, h, w, block) in [(2, 5, 3, 2), (3, 4, 4, 2), (2, 3, 3, 1), (1, 1, 1, 2)] {
            let n = c * h * w;
            let layer = Layer {
                name: "x".into(),
                kind: LayerKind::Sum,
                shape: [c, h, w],
                block,
                winograd: None,
                forms: Vec::new(),
                combine: Vec::new(),
                reads_lazy: false,
                divides: 0,
                meta: vec![
                    Meta {
                        level: 0,
                        scale: 1.0
                    };
                    n
                ],
            };
            assert_eq!(layer.tiles(), h.div_ceil(block) * w.div_ceil(block));
            let mut seen = vec![0; n];
            for t in 0..layer.tiles() {
                assert_eq!(layer.tile_elems(t).count(), layer.tile_len(t));
                for e in layer.tile_elems(t) {
                    assert_eq!(
                        layer.tile_of(e),
                        t,
                        "{c}x{h}x{w} block {block}: element {e}"
                    );
                    seen[e] += 1;
                }
            }
            assert!(seen.iter().all(|&k| k == 1), "{c}x{h}x{w} block {block}");
            let mut seen = vec![0; n];
            for p in 0..layer.positions() {
                for e in layer.position_elems(p) {
                    assert_eq!(layer.position_of(e), p);
                    seen[e] += 1;
                }
            }
            assert!(seen.iter().all(|&k| k == 1), "{c}x{h}x{w} positions");
        }
    }
}
