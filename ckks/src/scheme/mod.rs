//! The CKKS scheme: parameters, encoder, keys, encryption, evaluation.

pub(crate) mod ciphertext;
pub(crate) mod encoder;
pub(crate) mod encryptor;
pub(crate) mod evaluator;
pub(crate) mod factored;
pub(crate) mod keys;
pub(crate) mod params;

pub use ciphertext::{Ciphertext, Plaintext};
pub use encoder::Encoder;
pub use encryptor::{decrypt, Encryptor};
pub use evaluator::{Evaluator, LinearRow, SCALE_TOLERANCE};
pub use factored::{winograd, FactoredMap, FactoredWeights};
pub use keys::{
    galois_element, GaloisKeys, KeyGenerator, KeySwitchingKey, PublicKey, RelinKey, SecretKey,
};
pub use params::{
    max_log_qp_128, presets, ParamSpec, Params, Security, HE_STANDARD_128_MAX_LOG_QP,
};

#[cfg(test)]
mod tests;
