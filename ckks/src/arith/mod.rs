//! Word-sized modular arithmetic: moduli with Barrett/Shoup reduction, vectorized row
//! kernels, and prime generation.

pub mod kernels;
mod modulus;
mod primes;

pub use kernels::ShoupConst;
pub use modulus::{Modulus, MAX_MODULUS_BITS};
pub use primes::{is_ntt_prime, is_prime, ntt_primes_below};
