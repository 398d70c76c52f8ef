//! Encrypted inference for BEAA models.
//!
//! Element-wise packing: ciphertext `k` holds feature `k` (channel, row, column, row-major)
//! of every image of the batch, image `b` in slot `b`. Linear layers are then linear
//! combinations of ciphertexts with public real weights, and each feature element has its own
//! quadratic activation - no rotations, no Galois keys.
//!
//! Levels are the scarce resource (16 at N = 32768). The executor keeps every feature element
//! as a *linear form* over materialized ciphertexts and composes linear layers (convolution,
//! pooling, affine, concatenation) symbolically; a ciphertext is only materialized - one
//! linear combination and one rescale, one level - where a square needs it or at the output.
//! An activation `a x^2 + b x + c` costs one level (the square); `a`, `b` and `c` ride along
//! as weights into the next linear combination. The optimized SqueezeNet needs 15 levels.
//!
//! - [`exec`]: the executor, generic over real ciphertexts and level/scale metadata;
//! - [`job`]: a whole job with progress and cancellation (what the service runs);
//! - [`optime`]: where a job's time goes (thread-seconds per kind of operation);
//! - [`plan`]: the same walk on metadata only: depth, levels, scales, before any encryption.

pub mod exec;
pub mod graph;
pub mod job;
pub mod optime;
pub mod plan;
pub mod schedule;
pub mod store;
pub mod stream;

pub use exec::{run, ExecError};
pub use job::{run_job, work_dir_identity, FileInputs, InputSource, Progress, RunControl};
pub use optime::{Op, OpTimes};
pub use plan::{Headroom, Plan, PlanError, WINOGRAD_MIN_CHANNELS};
