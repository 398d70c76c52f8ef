//! BEAA model format: a directory with `manifest.json` and `weights.safetensors` (f32),
//! the shared image preprocessing path, and a plaintext f64 reference forward pass.
//!
//! No candle here: this crate is used by the evaluator and compiled to wasm32.

pub mod preprocess;

use serde::{Deserialize, Serialize};

/// Errors from loading, validating or running a model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("i/o error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("manifest is not valid JSON for this format: {0}")]
    Manifest(String),
    #[error("weights file is not valid safetensors: {0}")]
    Weights(String),
    #[error("invalid model: {0}")]
    Invalid(String),
    #[error("image error: {0}")]
    Image(String),
}

/// How an image of any size is brought to the model's input size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizePolicy {
    /// Resize the whole image to exactly height x width (aspect ratio not kept).
    Stretch,
    /// Scale so the image covers the target, then take the centre.
    ShorterSideCenterCrop,
}

/// Input shape and normalization, stored with the model so every client preprocesses alike.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InputSpec {
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// Per-channel mean of pixel/255.
    pub mean: Vec<f32>,
    /// Per-channel standard deviation of pixel/255.
    pub std: Vec<f32>,
    pub resize: ResizePolicy,
}

impl InputSpec {
    /// Checks that mean/std match the channel count and std is positive.
    pub fn check(&self) -> Result<(), ModelError> {
        if self.channels != 1 && self.channels != 3 {
            return Err(ModelError::Invalid(format!(
                "input channels must be 1 or 3, got {}",
                self.channels
            )));
        }
        if self.mean.len() != self.channels || self.std.len() != self.channels {
            return Err(ModelError::Invalid(
                "input mean/std length must equal the channel count".into(),
            ));
        }
        if self.std.iter().any(|s| !(s.is_finite() && *s > 0.0))
            || self.mean.iter().any(|m| !m.is_finite())
        {
            return Err(ModelError::Invalid(
                "input std must be positive and finite".into(),
            ));
        }
        if self.height == 0 || self.width == 0 {
            return Err(ModelError::Invalid("input size must be positive".into()));
        }
        Ok(())
    }
}
