//! Word-sized modular arithmetic: moduli with Barrett/Shoup reduction and prime generation.

mod modulus;
mod primes;

pub use modulus::{Modulus, MAX_MODULUS_BITS};
pub use primes::{is_ntt_prime, is_prime, ntt_primes_below};
