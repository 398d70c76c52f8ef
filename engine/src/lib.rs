//! Encrypted inference for BEAA models.
//!
//! Element-wise packing: ciphertext `k` holds feature `k` (channel, row, column, row-major)
//! of every image of the batch, image `b` in slot `b`. Linear layers are then weighted sums
//! of ciphertexts with public real weights, and each feature element has its own quadratic
//! activation - no rotations, no Galois keys.
//!
//! - [`plan`]: walks a model graph and assigns every node its level and exact scale, so the
//!   whole network fits the modulus chain; refuses what cannot be evaluated (ReLU).
//! - [`exec`]: runs the plan on ciphertexts with rayon.

pub mod exec;
pub mod plan;

pub use exec::run;
pub use plan::{NodePlan, Plan, PlanError};
