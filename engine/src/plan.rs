//! Planning: the executor's walk on levels and scales only.

use crate::exec::ExecError;
use crate::graph::{Deferred, LayerKind, Meta, ValueGraph};
use crate::schedule::{Schedule, Segment};
use beaa_ckks::{max_log_qp_128, ParamSpec, Params};
use beaa_model::Model;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("node {0} uses ReLU: only polynomial-activation models can be evaluated encrypted")]
    Relu(String),
    #[error(
        "the model needs {needed} levels but the parameter set has {available} \
         (use a longer modulus chain)"
    )]
    TooDeep { needed: usize, available: usize },
    #[error("{0}")]
    Other(String),
}

/// Fewest input channels for which Winograd's form pays: its GEMM rows have `C_in` terms
/// instead of `9 C_in`, and below a few dozen the kernels' per-row reductions and the
/// transforms outweigh the saved multiply-adds (the width/16 CIFAR-10 model, 2 to 24 input
/// channels: 1.82x fewer multiply-adds, 1.5x more GEMM time). At 32 (the fire modules'
/// expand3 layers) whole N = 32768 jobs gained nothing measurable in those stages and held
/// 2.3 GB more; at 64 (conv2 and conv3 of the shipped models) a whole CIFAR-10 job ran 1.46x
/// faster than direct (BENCHMARKS.md, sessions 28-29).
pub const WINOGRAD_MIN_CHANNELS: usize = 64;

/// What a model needs from a parameter set, and how it will be evaluated.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Levels consumed from input to output.
    pub depth: usize,
    pub input_level: usize,
    pub input_scale: f64,
    /// Output level and scale (the lowest output).
    pub output: Meta,
    /// Per activation or sum layer: the ciphertexts it makes and their level.
    pub materialized: BTreeMap<String, (usize, isize)>,
    /// Every value as a linear form over earlier ones, with levels and scales.
    pub graph: ValueGraph,
    /// Which layers are stored between stages and which are recomputed where read.
    pub schedule: Schedule,
    /// The order the executor runs the stages' tiles in: the wavefront, or stage by stage
    /// when that holds fewer bytes (small maps, where dependencies span the whole map).
    pub segments: Vec<Segment>,
    /// The most bytes of intermediate ciphertexts a job holds at once in that order, and
    /// stage by stage (for comparison).
    pub work_dir_peak: (u64, u64),
}

impl Plan {
    /// Plans `model` with inputs at the top level and default scale of `params`; fails with
    /// `TooDeep` (saying how many levels it needs) when the chain is too short. Every
    /// convolution is a direct GEMM (see [`Plan::with_winograd`]).
    pub fn new(model: &Model, params: &Params) -> Result<Self, PlanError> {
        Self::with_winograd(model, params, None)
    }

    /// [`Plan::new`], computing the 3x3 convolutions over at least `winograd = Some(c)` input
    /// channels that allow it in Winograd's F(2x2, 3x3) form ([`WINOGRAD_MIN_CHANNELS`] is
    /// where it pays): about half their GEMM work, but each weight's 40 bits of precision
    /// are split with the activation's per-element factor (see `graph::Winograd::u_bits`), so
    /// the encrypted results stray further from the plaintext ones. Off by default.
    pub fn with_winograd(
        model: &Model,
        params: &Params,
        winograd: Option<usize>,
    ) -> Result<Self, PlanError> {
        let top = params.max_level();
        let eager = build_graph(model, params, &Deferred::default(), winograd)?;
        let deferred = lazy_layers(&eager, &Schedule::new(&eager));
        let graph = if deferred.lazy.is_empty() {
            eager
        } else {
            // A model whose activations have linear elements (|a| ~ 0) cannot leave them
            // unrescaled: it is planned with every combination rescaled.
            build_graph(model, params, &deferred, winograd).or_else(|_| {
                let rescaled = Deferred {
                    unrescaled: BTreeSet::new(),
                    ..deferred.clone()
                };
                build_graph(model, params, &rescaled, winograd)
            })?
        };
        let lowest = graph.lowest_level().min(top as isize);
        let depth = (top as isize - lowest) as usize;
        if lowest < 0 {
            return Err(PlanError::TooDeep {
                needed: depth,
                available: top,
            });
        }
        graph
            .check_encodings(params)
            .map_err(|e| PlanError::Other(e.to_string()))?;
        let output = graph
            .output()
            .meta
            .iter()
            .copied()
            .min_by_key(|m| m.level)
            .ok_or_else(|| PlanError::Other("model has no outputs".into()))?;
        let materialized = graph
            .layers
            .iter()
            .filter(|l| matches!(l.kind, LayerKind::Activation { .. } | LayerKind::Sum))
            .map(|l| {
                (
                    l.name.clone(),
                    (l.len(), l.meta.first().map_or(0, |m| m.level)),
                )
            })
            .collect();
        let schedule = Schedule::new(&graph);
        let bytes = |l: u32, e: usize| graph.stored_bytes(params, l as usize, e);
        let wavefront = schedule.segments(&graph);
        let sequential = schedule.stage_by_stage(&graph);
        let (wave_peak, seq_peak) = (
            schedule.peak_stored_bytes(&graph, &wavefront, bytes),
            schedule.peak_stored_bytes(&graph, &sequential, bytes),
        );
        let (segments, peak) = if wave_peak <= seq_peak {
            (wavefront, wave_peak)
        } else {
            (sequential, seq_peak)
        };
        Ok(Plan {
            depth,
            input_level: top,
            input_scale: params.default_scale(),
            output,
            materialized,
            graph,
            schedule,
            segments,
            work_dir_peak: (peak, seq_peak),
        })
    }

    /// What the tiles a job keeps in its work directory depend on besides the model and the
    /// parameters: a directory stamped with another identity is emptied before a job runs
    /// (`store::DirStore`), so a job resumed under another plan recomputes rather than reads
    /// values of another form.
    pub fn work_identity(&self) -> String {
        let stored: Vec<String> = self
            .schedule
            .stages
            .iter()
            .map(|s| {
                let l = &self.graph.layers[s.layer as usize];
                let (level, scale) = l.meta.first().map_or((0, 0.0), |m| (m.level, m.scale));
                format!("{}@{level}:{:x}", l.name, scale.to_bits())
            })
            .collect();
        format!(
            "layers {} | stages {} | stored {} | winograd {}",
            self.graph.layers.len(),
            self.schedule.stages.len(),
            stored.join(","),
            self.winograd_layers().join(",")
        )
    }

    /// Activation layers whose convolution is computed in Winograd's form.
    pub fn winograd_layers(&self) -> Vec<&str> {
        self.graph
            .layers
            .iter()
            .filter(|l| l.winograd.is_some())
            .map(|l| l.name.as_str())
            .collect()
    }

    /// Activation layers left unrelinearized (their reader relinearizes its sums).
    pub fn lazy_layers(&self) -> Vec<&str> {
        self.graph
            .layers
            .iter()
            .filter(|l| matches!(l.kind, LayerKind::Activation { lazy: true, .. }))
            .map(|l| l.name.as_str())
            .collect()
    }

    /// Lazy activation layers whose combination is not rescaled at all (their reader's key
    /// switch divides by three primes; `graph::UNRESCALED_WEIGHT_BITS`).
    pub fn unrescaled_layers(&self) -> Vec<&str> {
        self.graph
            .layers
            .iter()
            .filter(|l| matches!(l.kind, LayerKind::Activation { .. }) && l.divides == 0)
            .map(|l| l.name.as_str())
            .collect()
    }

    /// Stored sums over lazy squares that relinearize their own sums (pool2).
    pub fn finishing_sums(&self) -> Vec<&str> {
        self.graph
            .layers
            .iter()
            .filter(|l| l.kind == LayerKind::Sum && l.divides > 0)
            .map(|l| l.name.as_str())
            .collect()
    }

    /// Relinearizations (key switches) per batch.
    pub fn relinearizations(&self) -> usize {
        self.graph
            .layers
            .iter()
            .map(|l| {
                let own = match l.kind {
                    LayerKind::Activation { lazy: false, .. } => l.len(),
                    _ => 0,
                };
                let combines = !matches!(l.kind, LayerKind::Sum) || l.divides > 0;
                own + if l.reads_lazy && combines { l.len() } else { 0 }
            })
            .sum()
    }

    /// Ciphertext squares per batch (one per quadratic activation element).
    pub fn squares(&self) -> usize {
        self.graph
            .layers
            .iter()
            .filter(|l| matches!(l.kind, LayerKind::Activation { .. }))
            .map(|l| l.len())
            .sum()
    }
}

/// Bits to spare between the largest value a layer is expected to hold and what its
/// ciphertexts can represent (Q at its level over 2, at its scale). Expected values come from
/// the manifest's ranges (the largest seen on the calibration images). CKKS packs a whole
/// batch in one ciphertext, so an image that overflows corrupts the values of all the others
/// in the same ciphertexts: this is the margin the batch relies on.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Headroom {
    pub layer: String,
    pub bits: f64,
    /// Bound on |value| the margin is computed for.
    pub bound: f64,
    /// The margin for one image alone beyond the bound (the others within it): a slot's value
    /// reaches each coefficient divided by the number of slots (|m_i| <= sum_j |z_j| / slots),
    /// so one image may exceed the all-images margin by log2(slots) bits.
    pub one_image_bits: f64,
}

impl Plan {
    /// [`Headroom`] of every activation (its scaled input `x~ = sqrt|a| x` and its output
    /// `y = a x^2 + b x` without the constant) and of the logits; layers without a recorded
    /// range are skipped. Lowest margin first.
    pub fn headroom(&self, model: &Model, params: &Params) -> Vec<Headroom> {
        let bits = |bound: f64, level: isize, scale: f64| {
            params.log_q_at(level.max(0) as usize) - 1.0 - (bound * scale).log2()
        };
        let ranges = &model.manifest.ranges;
        let one_image = (params.slots() as f64).log2();
        let mut out = Vec::new();
        for layer in &self.graph.layers {
            match &layer.kind {
                LayerKind::Activation { .. } => {
                    let Some(node) = model.manifest.nodes.iter().find(|n| n.name == layer.name)
                    else {
                        continue;
                    };
                    let (beaa_model::Op::Poly { a, b, .. }, Some(input)) =
                        (&node.op, node.inputs.first())
                    else {
                        continue;
                    };
                    let (Some(r), Some(a), Some(b)) = (
                        ranges.get(input),
                        model.tensors.get(a),
                        model.tensors.get(b),
                    ) else {
                        continue;
                    };
                    let x = r.max_abs;
                    let (mut s_max, mut y_max) = (0.0f64, 0.0f64);
                    for (a, b) in a.data.iter().zip(&b.data) {
                        let (a, b) = (a.abs() as f64, b.abs() as f64);
                        s_max = s_max.max(a.sqrt());
                        y_max = y_max.max(a * x * x + b * x);
                    }
                    let mut worst = Headroom {
                        layer: layer.name.clone(),
                        bits: f64::INFINITY,
                        bound: 0.0,
                        one_image_bits: f64::INFINITY,
                    };
                    for (cm, m) in layer.combine.iter().zip(&layer.meta) {
                        for (bound, level, scale) in
                            [(s_max * x, cm.level, cm.scale), (y_max, m.level, m.scale)]
                        {
                            let h = bits(bound, level, scale);
                            if h < worst.bits {
                                worst.bits = h;
                                worst.bound = bound;
                            }
                        }
                    }
                    worst.one_image_bits = worst.bits + one_image;
                    out.push(worst);
                }
                LayerKind::Output => {
                    let Some(r) = ranges.get(&model.manifest.output) else {
                        continue;
                    };
                    let h = layer
                        .meta
                        .iter()
                        .map(|m| bits(r.max_abs, m.level, m.scale))
                        .fold(f64::INFINITY, f64::min);
                    out.push(Headroom {
                        layer: layer.name.clone(),
                        bits: h,
                        bound: r.max_abs,
                        one_image_bits: h + one_image,
                    });
                }
                _ => {}
            }
        }
        out.sort_by(|a, b| a.bits.total_cmp(&b.bits));
        out
    }
}

fn build_graph(
    model: &Model,
    params: &Params,
    deferred: &Deferred,
    winograd: Option<usize>,
) -> Result<ValueGraph, PlanError> {
    ValueGraph::build(model, params, deferred, winograd).map_err(|e| match e {
        ExecError::Relu(n) => PlanError::Relu(n),
        other => PlanError::Other(other.to_string()),
    })
}

/// Activation layers to leave unrelinearized: those recomputed inside a single reader (an
/// activation, the output or a stored sum) that sums them into fewer ciphertexts than they
/// are - conv1 into fire1.squeeze through pool1's inlined sum (65,536 -> 8,192
/// relinearizations at CIFAR-10 width), the expand layers into the next squeeze (fire1) or
/// into pool2, which finishes its sums itself (fire2), conv3 into the logits. Same levels;
/// far fewer key switches.
///
/// Second, the lazy layers to leave *unrescaled*: those whose reader reads only lazy layers
/// that themselves read no lazy values and are not in Winograd's form (whose weights need a
/// prime's precision): conv1 and the fire1 expand layers. Each saves
/// one rescale per value for one more prime in its reader's key switch and one more level
/// in its reader's GEMM (conv1: 65,536 rescales at 16 primes against 1/15 more of
/// fire1.squeeze's multiply-adds). Not under a stored sum, which has no weights to absorb
/// the unrescaled squares' extra scale, nor under the logits: conv3 in the direct form,
/// unrescaled, gave the shipped CIFAR-10 model a logit error of 4.9e-4 at N = 2048 (4.3e-6
/// rescaled; 24-bit weights right before the output).
fn lazy_layers(g: &ValueGraph, schedule: &Schedule) -> Deferred {
    // Per reader: the layers it sums lazily.
    let mut groups: Vec<(u32, BTreeSet<u32>)> = Vec::new();
    for (r, reader) in g.layers.iter().enumerate() {
        let stored_sum = reader.kind == LayerKind::Sum && !schedule.inlined[r];
        if !stored_sum
            && !matches!(
                reader.kind,
                LayerKind::Activation { .. } | LayerKind::Partial | LayerKind::Output
            )
        {
            continue;
        }
        // Inlined sums (a pool read by a convolution) are seen through: a sum of squares is
        // as good a place to relinearize once as the reader itself.
        let (mut read, mut sums) = (BTreeSet::new(), BTreeSet::new());
        let mut todo: Vec<u32> = reader
            .forms
            .iter()
            .flat_map(|f| f.terms.iter().map(|(v, _)| v.layer))
            .collect();
        while let Some(l) = todo.pop() {
            let layer = &g.layers[l as usize];
            if layer.kind != LayerKind::Sum || !schedule.inlined[l as usize] {
                read.insert(l);
            } else if sums.insert(l) {
                todo.extend(
                    layer
                        .forms
                        .iter()
                        .flat_map(|f| f.terms.iter().map(|(v, _)| v.layer)),
                );
            }
        }
        let all_inlined_activations = !read.is_empty()
            && read.iter().all(|&l| {
                schedule.inlined[l as usize]
                    && matches!(g.layers[l as usize].kind, LayerKind::Activation { .. })
            });
        let fewer = read
            .iter()
            .map(|&l| g.layers[l as usize].len())
            .sum::<usize>()
            > reader.len();
        if all_inlined_activations && fewer {
            groups.push((r as u32, read));
        }
    }
    let lazy: BTreeSet<u32> = groups.iter().flat_map(|(_, g)| g).copied().collect();
    // A lazy layer reads lazy values exactly when it is itself a reader of lazy layers.
    let readers: BTreeSet<u32> = groups.iter().map(|(r, _)| *r).collect();
    let name = |l: &u32| g.layers[*l as usize].name.clone();
    let unrescaled = groups
        .iter()
        .filter(|(r, group)| {
            // Activation readers only: a stored sum has no weights to absorb the extra scale,
            // and the logits (or their partial sums) need their inputs' precision (above).
            matches!(g.layers[*r as usize].kind, LayerKind::Activation { .. })
                && group
                    .iter()
                    .all(|l| g.layers[*l as usize].winograd.is_none() && !readers.contains(l))
        })
        .flat_map(|(_, group)| group)
        .map(name)
        .collect();
    Deferred {
        lazy: lazy.iter().map(name).collect(),
        unrescaled,
        finishing_sums: groups
            .iter()
            .map(|(r, _)| r)
            .filter(|&&r| g.layers[r as usize].kind == LayerKind::Sum)
            .map(name)
            .collect(),
    }
}

/// How many bits P may fall short of the largest key-switching digit.
const SHORTFALL_BITS: usize = 8;

/// The smallest 128-bit-secure parameter set for a network of `depth` levels: the smallest N
/// whose HE Standard bound holds a chain of `depth + 1` primes (50 + 40-bit) plus special
/// primes at least as large as a key-switching digit, with the fewest digits that fit.
pub fn choose_spec(depth: usize) -> Option<ParamSpec> {
    let limbs = depth + 1;
    for log_n in 13..=16u32 {
        let bound = max_log_qp_128(log_n)? as usize;
        let log_q = 50 + 40 * depth;
        for digits in 1..=limbs {
            let alpha = limbs.div_ceil(digits);
            let Some(budget) = bound.checked_sub(log_q) else {
                break;
            };
            let p_bits = (budget / alpha).min(50);
            // P should cover the largest digit (the one holding the 50-bit q_0); falling short
            // by a few bits only multiplies the key-switching noise by 2^(shortfall), far
            // below the 2^40 scale.
            if p_bits >= 17 && alpha * p_bits + SHORTFALL_BITS >= 50 + 40 * (alpha - 1) {
                let mut spec = ParamSpec::chain(log_n, limbs, 40, digits);
                spec.p_bits = vec![p_bits as u32; alpha];
                return Some(spec);
            }
        }
    }
    None
}

/// A small, fast, NOT SECURE parameter set for a network of `depth` levels, for tests and CI:
/// N = 2048 (1024 slots), `depth + 1` primes of 50 + 40 bits, four key-switching digits. Only
/// [`Params::insecure_for_tests`] accepts it; the server refuses it unless started with
/// `--insecure-test-params`.
pub fn insecure_test_spec(depth: usize) -> ParamSpec {
    ParamSpec::chain(11, depth + 1, 40, 4)
}

impl Plan {
    /// Depth of `model` regardless of parameters (planned on a long test chain).
    pub fn depth_of(model: &Model) -> Result<usize, PlanError> {
        let probe = Params::insecure_for_tests(ParamSpec::chain(10, 64, 40, 16))
            .map_err(|e| PlanError::Other(e.to_string()))?;
        // Lazy relinearization keeps every level, so the plain graph gives the depth; no
        // schedule or second graph is needed just to choose parameters.
        let graph = build_graph(model, &probe, &Deferred::default(), None)?;
        let top = probe.max_level() as isize;
        Ok((top - graph.lowest_level().min(top)) as usize)
    }

    /// Chooses a 128-bit parameter set for `model` (see [`choose_spec`]) and plans on it.
    pub fn choose(model: &Model) -> Result<(Params, Plan), PlanError> {
        Self::choose_with(model, None)
    }

    /// [`Plan::choose`], optionally with Winograd's form ([`Plan::with_winograd`]).
    pub fn choose_with(
        model: &Model,
        winograd: Option<usize>,
    ) -> Result<(Params, Plan), PlanError> {
        let depth = Self::depth_of(model)?;
        let spec = choose_spec(depth).ok_or(PlanError::TooDeep {
            needed: depth,
            available: 0,
        })?;
        let params = Params::new(spec).map_err(|e| PlanError::Other(e.to_string()))?;
        let plan = Plan::with_winograd(model, &params, winograd)?;
        Ok((params, plan))
    }

    /// Plans `model` on [`insecure_test_spec`] (tests and `--insecure-test-params` only).
    pub fn choose_insecure_for_tests(model: &Model) -> Result<(Params, Plan), PlanError> {
        Self::choose_insecure_for_tests_with(model, None)
    }

    /// [`Plan::choose_insecure_for_tests`], optionally with Winograd's form.
    pub fn choose_insecure_for_tests_with(
        model: &Model,
        winograd: Option<usize>,
    ) -> Result<(Params, Plan), PlanError> {
        let depth = Self::depth_of(model)?;
        let params = Params::insecure_for_tests(insecure_test_spec(depth))
            .map_err(|e| PlanError::Other(e.to_string()))?;
        let plan = Plan::with_winograd(model, &params, winograd)?;
        Ok((params, plan))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pool after conv1 is read by a 1x1 convolution (fire1.squeeze): it is materialized
    /// as a sum of the lazy squares (degree 2, inlined), so each squeeze output multiplies
    /// one value per channel instead of four, and conv1 still relinearizes only once per
    /// squeeze output.
    #[test]
    fn a_pool_read_by_a_pointwise_convolution_is_summed_first() {
        use beaa_model::testing::random_model;
        use beaa_model::{Activation, SqueezeNetSpec};
        let spec = SqueezeNetSpec::tiny(3, 8, 4);
        let model = random_model(3, &spec, Activation::PolyElement);
        let params = Params::insecure_for_tests(ParamSpec::chain(10, 16, 40, 8)).unwrap();
        let plan = Plan::new(&model, &params).unwrap();
        let g = &plan.graph;
        let find = |name: &str| g.layers.iter().position(|l| l.name == name).unwrap();
        let (conv1, pool1, squeeze) = (find("conv1.act"), find("pool1"), find("fire1.squeeze.act"));
        assert_eq!(g.layers[pool1].kind, LayerKind::Sum);
        assert!(plan.schedule.inlined[pool1] && plan.schedule.inlined[conv1]);
        assert_eq!(g.degree(pool1), 2);
        assert!(plan.lazy_layers().contains(&"conv1.act"));
        assert!(g.layers[squeeze].reads_lazy);
        for f in &g.layers[squeeze].forms {
            assert_eq!(f.terms.len(), spec.conv1);
            assert!(f.terms.iter().all(|(v, _)| v.layer as usize == pool1));
        }
        // Relinearizations: one per squeeze output (its sums), none for the pool's sums.
        let squeeze_len = g.layers[squeeze].len();
        let conv1_len = g.layers[conv1].len();
        assert!(plan.relinearizations() < plan.squares() - conv1_len + squeeze_len + 1);
        assert_eq!(g.multiply_adds(pool1), 0);
    }

    /// conv1 and the expand layers read degree-1 values and are summed lazily by their
    /// readers: they combine without a rescale, their readers divide by three primes, and
    /// every other value keeps the level and (to rounding) the scale it has when all
    /// combinations are rescaled.
    #[test]
    fn lazy_layers_over_degree_one_values_skip_their_rescale_at_no_level() {
        use beaa_model::testing::random_model;
        use beaa_model::{Activation, SqueezeNetSpec};
        let spec = SqueezeNetSpec::tiny(3, 8, 4);
        let model = random_model(5, &spec, Activation::PolyElement);
        let params = Params::insecure_for_tests(ParamSpec::chain(10, 16, 40, 8)).unwrap();
        let plan = Plan::new(&model, &params).unwrap();
        let unrescaled = plan.unrescaled_layers();
        for name in ["conv1.act", "fire1.expand1.act", "fire1.expand3.act"] {
            assert!(unrescaled.contains(&name), "{name} in {unrescaled:?}");
        }
        let g = &plan.graph;
        let layer = |name: &str| g.layers.iter().find(|l| l.name == name).unwrap();
        let conv1 = layer("conv1.act");
        assert_eq!(conv1.divides, 0);
        assert!(conv1.meta.iter().all(|m| m.level == g.input_level as isize));
        assert_eq!(layer("fire1.squeeze.act").divides, 3);
        assert_eq!(layer("fire2.squeeze.act").divides, 3);
        // pool2 is stored: it finishes the fire2 expand layers' lazy squares itself, one key
        // switch per sum, and they keep their rescale (a sum has no weights to absorb more).
        assert_eq!(plan.finishing_sums(), ["pool2"]);
        assert_eq!(layer("pool2").divides, 1);
        assert_eq!(
            g.degree(g.layers.iter().position(|l| l.name == "pool2").unwrap()),
            1
        );
        for name in ["fire2.expand1.act", "fire2.expand3.act"] {
            assert!(plan.lazy_layers().contains(&name) && !unrescaled.contains(&name));
        }
        let deferred = Deferred {
            lazy: plan.lazy_layers().iter().map(|s| s.to_string()).collect(),
            finishing_sums: plan
                .finishing_sums()
                .iter()
                .map(|s| s.to_string())
                .collect(),
            unrescaled: BTreeSet::new(),
        };
        let rescaled = build_graph(&model, &params, &deferred, None).unwrap();
        assert_eq!(rescaled.layers.len(), g.layers.len());
        for (a, b) in g.layers.iter().zip(&rescaled.layers) {
            // Their values, and sums of them (pool1), are one level higher.
            let source = |l: &crate::graph::Layer| match l.kind {
                LayerKind::Sum => g.layers[l.forms[0].terms[0].0.layer as usize].name.clone(),
                _ => l.name.clone(),
            };
            if unrescaled.contains(&source(a).as_str()) {
                assert_eq!(a.meta[0].level, b.meta[0].level + 1, "{}", a.name);
                continue;
            }
            for (ma, mb) in a.meta.iter().zip(&b.meta) {
                assert_eq!(ma.level, mb.level, "{}", a.name);
                assert!((ma.scale / mb.scale - 1.0).abs() < 1e-9, "{}", a.name);
            }
        }
        assert_eq!(
            plan.depth,
            (g.input_level as isize - rescaled.lowest_level()) as usize
        );
    }

    #[test]
    fn chosen_specs_are_secure_and_deep_enough() {
        for depth in 1..=16 {
            let spec = choose_spec(depth).unwrap();
            assert_eq!(spec.q_bits.len(), depth + 1);
            let params = Params::new(spec.clone()).unwrap();
            assert!(params.is_secure());
            // Special primes cover every digit.
            let alpha = spec.p_bits.len();
            let p: u32 = spec.p_bits.iter().sum();
            assert!(
                p as usize + SHORTFALL_BITS >= 50 + 40 * (alpha - 1),
                "depth {depth}: {spec:?}"
            );
        }
        // 15 levels (the SqueezeNet) need N = 32768; 3 levels fit N = 8192.
        assert_eq!(choose_spec(15).unwrap().log_n, 15);
        assert_eq!(choose_spec(3).unwrap().log_n, 13);
        assert_eq!(choose_spec(40).unwrap().log_n, 16);
        assert!(choose_spec(50).is_none());
    }
}
