//! Errors, and the one-call in-memory evaluation used by tests and small models.

use crate::job::{run_job, RunControl};
use crate::plan::Plan;
use beaa_ckks::{Ciphertext, Error as CkksError, Evaluator, RelinKey};
use beaa_model::Model;

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ExecError {
    #[error("node {0} uses ReLU: only polynomial-activation models can be evaluated encrypted")]
    Relu(String),
    #[error("{0}")]
    Ckks(#[from] CkksError),
    #[error("{0}")]
    Model(String),
    #[error("work directory: {0}")]
    Io(String),
    #[error("the job was cancelled")]
    Cancelled,
}

/// Evaluates `model` on element-wise packed `inputs` (one ciphertext per input feature,
/// `[C, H, W]` row-major, at the top level and default scale) and returns one ciphertext per
/// logit. Intermediate values stay in memory: for small models; see [`run_job`] for the rest.
pub fn run(
    model: &Model,
    ev: &Evaluator,
    rlk: &RelinKey,
    inputs: &[Ciphertext],
) -> Result<Vec<Ciphertext>, ExecError> {
    let plan = Plan::new(model, ev.params()).map_err(|e| ExecError::Model(e.to_string()))?;
    run_job(model, &plan, ev, rlk, inputs, RunControl::new())
}
