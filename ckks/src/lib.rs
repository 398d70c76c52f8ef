//! Pure-Rust RNS-CKKS for BEAA, built on Zama's `tfhe-ntt`.
//!
//! Layers, bottom up:
//! - [`arith`]: word-sized moduli (all primes < 2^50, for tfhe-ntt's IFMA path), Barrett and
//!   Shoup reduction, NTT-friendly prime generation;
//! - [`ring`]: RNS polynomials in 64-byte-aligned buffers, NTT tables, slot-wise operations,
//!   fast base conversion;
//! - [`scheme`]: parameters with the 128-bit security check, the canonical-embedding encoder,
//!   keys, encryption and decryption, the evaluator;
//! - [`serialize`]: the versioned, validated byte format shared by the browser and the server.
//!
//! Compiles for x86_64 and wasm32-unknown-unknown; randomness comes from the OS (`getrandom`)
//! through ChaCha20.

pub mod arith;
pub mod error;
pub mod ring;
pub mod sampling;
pub mod scheme;
pub mod serialize;

pub use error::{Error, Result};
pub use scheme::*;
