//! Planning: the executor's walk on levels and scales only.

use crate::exec::{execute, Backend, ExecError};
use beaa_ckks::Params;
use beaa_model::Model;
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
    #[error("{0}")]
    Other(String),
}

/// Level and scale of a value, with levels allowed below zero so a plan can say how many
/// levels it would need.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Meta {
    pub level: isize,
    pub scale: f64,
}

struct Metadata<'a> {
    q: &'a [u64],
}

impl Metadata<'_> {
    fn prime_at(&self, level: isize) -> f64 {
        self.q[level.clamp(0, self.q.len() as isize - 1) as usize] as f64
    }
}

impl Backend for Metadata<'_> {
    type Value = Meta;
    fn level(&self, v: &Meta) -> isize {
        v.level
    }
    fn scale(&self, v: &Meta) -> f64 {
        v.scale
    }
    // Mirrors Evaluator::linear_combination + rescale exactly (same f64 operations).
    fn combine(
        &self,
        terms: &[(&Meta, f64)],
        _constant: f64,
        target: f64,
    ) -> Result<Meta, ExecError> {
        let level = terms.iter().map(|(m, _)| m.level).min().unwrap_or(0);
        Ok(Meta {
            level: level - 1,
            scale: target / self.prime_at(level),
        })
    }
    // Mirrors Evaluator::square + relinearize_rescale_assign.
    fn square(&self, x: &Meta) -> Result<Meta, ExecError> {
        Ok(Meta {
            level: x.level - 1,
            scale: x.scale * x.scale / self.prime_at(x.level),
        })
    }
    fn prime(&self, level: isize) -> f64 {
        self.prime_at(level)
    }
}

/// What a model needs from a parameter set.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Levels consumed from input to output.
    pub depth: usize,
    pub input_level: usize,
    pub input_scale: f64,
    /// Output level and scale.
    pub output: Meta,
    /// Per node: the ciphertexts it materializes (squares) and their level.
    pub materialized: BTreeMap<String, (usize, isize)>,
}

impl Plan {
    /// Plans `model` with inputs at the top level and default scale of `params`; fails with
    /// `TooDeep` (saying how many levels it needs) when the chain is too short.
    pub fn new(model: &Model, params: &Params) -> Result<Self, PlanError> {
        let top = params.max_level();
        let meta = Metadata { q: params.q() };
        let input = Meta {
            level: top as isize,
            scale: params.default_scale(),
        };
        let mut materialized = BTreeMap::new();
        let mut lowest = top as isize;
        let out = execute(
            &meta,
            model,
            vec![input; model.input_len()],
            &mut |node, made| {
                if let Some(first) = made.first() {
                    lowest = lowest.min(first.level);
                    materialized.insert(node.name.clone(), (made.len(), first.level));
                }
            },
        )
        .map_err(|e| match e {
            ExecError::Relu(n) => PlanError::Relu(n),
            other => PlanError::Other(other.to_string()),
        })?;
        let output = out
            .iter()
            .map(|m| **m)
            .min_by_key(|m| m.level)
            .ok_or_else(|| PlanError::Other("model has no outputs".into()))?;
        lowest = lowest.min(output.level);
        let depth = (top as isize - lowest) as usize;
        if lowest < 0 {
            return Err(PlanError::TooDeep {
                needed: depth,
                available: top,
            });
        }
        Ok(Plan {
            depth,
            input_level: top,
            input_scale: params.default_scale(),
            output,
            materialized,
        })
    }
}
