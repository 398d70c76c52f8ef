//! The client's data path around the keys: preprocessing, element-wise packing, the job
//! result format and softmax. Everything here runs on the device; nothing is sent anywhere.

use crate::{js_err, parse_input_spec};
use wasm_bindgen::prelude::*;

/// Decodes image bytes (PNG or JPEG, detected from the bytes), resizes and normalizes them
/// with the model's input spec (`input_spec_json`, the `input` of `GET /api/models`): exactly
/// `beaa_model::preprocess::preprocess`, the path training and the native client use.
/// Returns the `[C, H, W]` row-major features as f32.
#[wasm_bindgen(js_name = preprocessImage)]
pub fn preprocess_image(bytes: &[u8], input_spec_json: &str) -> Result<Vec<f32>, JsError> {
    preprocess_image_native(bytes, input_spec_json).map_err(js_err)
}

/// [`preprocess_image`] for Rust callers.
pub fn preprocess_image_native(bytes: &[u8], input_spec_json: &str) -> Result<Vec<f32>, String> {
    let spec = parse_input_spec(input_spec_json)?;
    beaa_model::preprocess::preprocess(bytes, &spec).map_err(|e| e.to_string())
}

/// A batch of preprocessed images, image-major in memory (`n_images x n_features`), packed
/// element-wise on demand: [`Batch::feature`] `k` is feature `k` of every image, image `b` in
/// slot `b` - the values of input ciphertext `k`.
#[wasm_bindgen]
pub struct Batch {
    features: usize,
    data: Vec<f32>,
}

#[wasm_bindgen]
impl Batch {
    /// An empty batch of images with `n_features` features each.
    #[wasm_bindgen(constructor)]
    pub fn new(n_features: usize) -> Result<Batch, JsError> {
        if n_features == 0 {
            return Err(JsError::new("an image needs at least one feature"));
        }
        Ok(Batch {
            features: n_features,
            data: Vec::new(),
        })
    }

    /// A batch from `n_images` images laid out one after another (image-major).
    #[wasm_bindgen(js_name = fromImages)]
    pub fn from_images(data: Vec<f32>, n_features: usize) -> Result<Batch, JsError> {
        Self::from_images_native(data, n_features).map_err(js_err)
    }

    /// Appends one image's features; returns its slot.
    pub fn push(&mut self, features: &[f32]) -> Result<usize, JsError> {
        self.push_native(features).map_err(js_err)
    }

    /// Number of images (slots in use).
    #[allow(clippy::len_without_is_empty)]
    pub fn len(&self) -> usize {
        self.data.len() / self.features
    }

    /// Features per image (= number of input ciphertexts).
    #[wasm_bindgen(getter)]
    pub fn features(&self) -> usize {
        self.features
    }

    /// Feature `k` of every image: the slot values of input ciphertext `k`.
    pub fn feature(&self, k: usize) -> Result<Vec<f64>, JsError> {
        self.feature_native(k).map_err(js_err)
    }
}

impl Batch {
    pub fn from_images_native(data: Vec<f32>, n_features: usize) -> Result<Batch, String> {
        if n_features == 0 || !data.len().is_multiple_of(n_features) {
            return Err(format!(
                "{} values are not a whole number of images of {n_features} features",
                data.len()
            ));
        }
        if data.iter().any(|v| !v.is_finite()) {
            return Err("image features must be finite".into());
        }
        Ok(Batch {
            features: n_features,
            data,
        })
    }

    pub fn push_native(&mut self, features: &[f32]) -> Result<usize, String> {
        if features.len() != self.features {
            return Err(format!(
                "an image has {} features, this batch takes {}",
                features.len(),
                self.features
            ));
        }
        if features.iter().any(|v| !v.is_finite()) {
            return Err("image features must be finite".into());
        }
        self.data.extend_from_slice(features);
        Ok(self.len() - 1)
    }

    pub fn feature_native(&self, k: usize) -> Result<Vec<f64>, String> {
        if k >= self.features {
            return Err(format!(
                "feature {k} out of range (images have {})",
                self.features
            ));
        }
        Ok(beaa_model::packing::feature_slots(
            &self.data,
            self.features,
            k,
        ))
    }

    /// The features of image `b`.
    pub fn image(&self, b: usize) -> &[f32] {
        &self.data[b * self.features..(b + 1) * self.features]
    }
}

/// Splits the body of `GET /api/jobs/{id}/result` (u32 LE count, then per logit a u64 LE
/// length and the ciphertext bytes) into the ciphertexts; strict about lengths.
pub fn split_result(bytes: &[u8]) -> Result<Vec<&[u8]>, String> {
    let bad = |why: &str| Err(format!("malformed job result: {why}"));
    if bytes.len() < 4 {
        return bad("shorter than its count");
    }
    let count = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
    let mut rest = &bytes[4..];
    let mut out = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        if rest.len() < 8 {
            return bad("truncated length");
        }
        let len = u64::from_le_bytes(rest[..8].try_into().unwrap());
        rest = &rest[8..];
        if len > rest.len() as u64 {
            return bad("truncated ciphertext");
        }
        let (ct, tail) = rest.split_at(len as usize);
        out.push(ct);
        rest = tail;
    }
    if !rest.is_empty() {
        return bad("trailing bytes");
    }
    Ok(out)
}

/// Builds a job result body from ciphertexts (the inverse of [`split_result`]; for tests and
/// local tools).
pub fn join_result(cts: &[Vec<u8>]) -> Vec<u8> {
    let mut out = (cts.len() as u32).to_le_bytes().to_vec();
    for ct in cts {
        out.extend_from_slice(&(ct.len() as u64).to_le_bytes());
        out.extend_from_slice(ct);
    }
    out
}

pub use beaa_model::scores::{argmax_rows, softmax_rows};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ClientKeys;

    #[test]
    fn packing_is_element_wise() {
        let mut b = Batch::from_images_native(vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 3).unwrap();
        assert_eq!(b.len(), 2);
        assert_eq!(b.feature_native(0).unwrap(), vec![1.0, 4.0]);
        assert_eq!(b.feature_native(2).unwrap(), vec![3.0, 6.0]);
        assert!(b.feature_native(3).is_err());
        assert_eq!(b.push_native(&[7.0, 8.0, 9.0]).unwrap(), 2);
        assert_eq!(b.feature_native(1).unwrap(), vec![2.0, 5.0, 8.0]);
        assert_eq!(b.image(1), &[4.0, 5.0, 6.0]);
        assert!(b.push_native(&[1.0]).is_err());
        assert!(b.push_native(&[1.0, f32::NAN, 0.0]).is_err());
        assert!(Batch::from_images_native(vec![1.0; 5], 3).is_err());
    }

    #[test]
    fn result_format_round_trip_and_strictness() {
        let cts = vec![vec![1u8, 2, 3], vec![], vec![9u8; 10]];
        let body = join_result(&cts);
        let back = split_result(&body).unwrap();
        assert_eq!(back.len(), 3);
        assert_eq!(back[2], &cts[2][..]);
        assert!(split_result(&body[..body.len() - 1]).is_err());
        let mut extra = body.clone();
        extra.push(0);
        assert!(split_result(&extra).is_err());
        assert!(split_result(&[1, 0]).is_err());
    }

    #[test]
    fn spec_keys_encrypt_a_batch_and_decrypt_a_result() {
        let spec = beaa_ckks::presets::insecure_test_n1024();
        let json = serde_json::to_string(&spec).unwrap();
        assert!(ClientKeys::generate_for_spec(&spec, false).is_err());
        let keys = ClientKeys::generate_for_spec(&crate::parse_spec(&json).unwrap(), true).unwrap();
        assert!(!keys.params().is_secure());
        keys.check_fingerprint_native(&keys.params_fingerprint())
            .unwrap();
        assert!(keys.check_fingerprint_native("00").is_err());
        let imgs: Vec<f32> = (0..5 * 4).map(|i| (i as f32 * 0.3).sin()).collect();
        let batch = Batch::from_images_native(imgs.clone(), 4).unwrap();
        // Encrypt features 0 and 1 and treat them as a 2-class "result".
        let cts: Vec<Vec<u8>> = (0..2)
            .map(|k| keys.encrypt_feature_native(&batch, k).unwrap())
            .collect();
        let logits = keys
            .decrypt_logits_native(&join_result(&cts), 5, 2)
            .unwrap();
        for b in 0..5 {
            for c in 0..2 {
                assert!((logits[b * 2 + c] - imgs[b * 4 + c] as f64).abs() < 1e-5);
            }
        }
        assert!(keys
            .decrypt_logits_native(&join_result(&cts), 5, 3)
            .is_err());
        // A worker restores the same key from the exported bytes.
        let secret = keys.export_secret_local();
        let params = crate::params_from_spec(&spec, true).unwrap();
        let worker = ClientKeys::from_local_secret_params(params, &secret).unwrap();
        assert_eq!(
            worker.decrypt_native(&cts[0]).unwrap(),
            keys.decrypt_native(&cts[0]).unwrap()
        );
    }
}
