//! Errors of the CKKS crate.

/// Everything that can go wrong with parameters, keys, encoding, evaluation or bytes.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("invalid parameters: {0}")]
    InvalidParams(String),
    #[error(
        "parameters are not 128-bit secure: log2(QP) = {log_qp:.1} > {max} allowed for N = {n} \
         (use a smaller modulus or a larger N; insecure sets are for tests only)"
    )]
    Insecure { n: usize, log_qp: f64, max: u32 },
    #[error("parameter mismatch: the object belongs to a different parameter set")]
    ParamsMismatch,
    #[error("level mismatch: {0} vs {1}")]
    LevelMismatch(usize, usize),
    #[error("scale mismatch: {0} vs {1} (rescale or adjust the scale first)")]
    ScaleMismatch(f64, f64),
    #[error("level {needed} needed but the ciphertext is at level {have}")]
    LevelTooLow { needed: usize, have: usize },
    #[error("too many values: {given} given, {slots} slots")]
    TooManyValues { given: usize, slots: usize },
    #[error("value {value} times scale {scale} does not fit the modulus")]
    ValueOutOfRange { value: f64, scale: f64 },
    #[error("ciphertext has degree {0}; this operation needs degree {1}")]
    WrongDegree(usize, usize),
    #[error("no Galois key for element {0}")]
    MissingGaloisKey(u64),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("malformed bytes: {0}")]
    Malformed(String),
}

pub type Result<T> = std::result::Result<T, Error>;
