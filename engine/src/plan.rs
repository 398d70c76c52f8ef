//! Levels and scales for every node of a model graph.
//!
//! This first planner keeps things simple and exact: every linear node (convolution, pooling,
//! affine) multiplies by integer-encoded weights at a constant scale equal to the current top
//! prime and rescales once, so it returns to its input scale and costs one level; a quadratic
//! activation `a x^2 + b x + c` is evaluated as `x (a x + b) + c` and costs two levels.

use beaa_ckks::Params;
use beaa_model::{Model, Op};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    #[error("node {0} uses ReLU: only polynomial-activation models can be evaluated encrypted")]
    Relu(String),
    #[error(
        "the model needs {needed} levels but the parameter set has {available} \
         (use a longer modulus chain)"
    )]
    TooDeep { needed: usize, available: usize },
    #[error("node {node}: inputs disagree on level or scale ({detail})")]
    Mismatch { node: String, detail: String },
    #[error("node {0}: unknown input {1}")]
    UnknownInput(String, String),
}

/// Where a node's output lives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NodePlan {
    pub level: usize,
    pub scale: f64,
    /// Levels this node consumes.
    pub depth: usize,
}

/// The plan for one model on one parameter set.
#[derive(Debug, Clone)]
pub struct Plan {
    pub nodes: BTreeMap<String, NodePlan>,
    /// Levels consumed from input to output.
    pub depth: usize,
    pub input_level: usize,
    pub input_scale: f64,
    pub output: NodePlan,
}

impl Plan {
    /// Plans `model` on `params`, with inputs encrypted at the top level and default scale.
    pub fn new(model: &Model, params: &Params) -> Result<Self, PlanError> {
        let q = params.q();
        let input_level = params.max_level();
        let input_scale = params.default_scale();
        let mut nodes: BTreeMap<String, NodePlan> = BTreeMap::new();
        let mut deepest = 0usize;
        for node in &model.manifest.nodes {
            let inputs: Vec<NodePlan> = node
                .inputs
                .iter()
                .map(|i| {
                    nodes
                        .get(i)
                        .copied()
                        .ok_or_else(|| PlanError::UnknownInput(node.name.clone(), i.clone()))
                })
                .collect::<Result<_, _>>()?;
            let need = |levels: usize, at: &NodePlan| -> Result<(), PlanError> {
                if at.level < levels {
                    Err(PlanError::TooDeep {
                        needed: input_level - at.level + levels,
                        available: input_level,
                    })
                } else {
                    Ok(())
                }
            };
            let plan = match &node.op {
                Op::Input => NodePlan {
                    level: input_level,
                    scale: input_scale,
                    depth: 0,
                },
                Op::Conv2d { .. } | Op::AvgPool { .. } | Op::GlobalAvgPool | Op::Affine { .. } => {
                    let x = inputs[0];
                    need(1, &x)?;
                    // weighted_sum at const scale q_l, then rescale by q_l.
                    NodePlan {
                        level: x.level - 1,
                        scale: x.scale * q[x.level] as f64 / q[x.level] as f64,
                        depth: 1,
                    }
                }
                Op::Poly { .. } => {
                    let x = inputs[0];
                    need(2, &x)?;
                    // t = a x + b at scale s (one rescale), then x * t, relinearized and
                    // rescaled by q_(l-1).
                    let t_scale = x.scale * q[x.level] as f64 / q[x.level] as f64;
                    NodePlan {
                        level: x.level - 2,
                        scale: x.scale * t_scale / q[x.level - 1] as f64,
                        depth: 2,
                    }
                }
                Op::Relu => return Err(PlanError::Relu(node.name.clone())),
                Op::Concat => {
                    let first = inputs[0];
                    for other in &inputs[1..] {
                        if other.level != first.level || other.scale != first.scale {
                            return Err(PlanError::Mismatch {
                                node: node.name.clone(),
                                detail: format!(
                                    "level {} vs {}, scale {} vs {}",
                                    first.level, other.level, first.scale, other.scale
                                ),
                            });
                        }
                    }
                    NodePlan { depth: 0, ..first }
                }
            };
            deepest = deepest.max(input_level - plan.level);
            nodes.insert(node.name.clone(), plan);
        }
        let output = *nodes.get(&model.manifest.output).ok_or_else(|| {
            PlanError::UnknownInput("output".into(), model.manifest.output.clone())
        })?;
        Ok(Plan {
            nodes,
            depth: deepest,
            input_level,
            input_scale,
            output,
        })
    }
}
