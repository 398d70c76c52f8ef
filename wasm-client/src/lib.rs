//! The browser side of BEAA: key generation, encryption and decryption in wasm.
//!
//! The secret key is created here and stays here: [`ClientKeys`] exposes the evaluation key
//! (relinearization key) and ciphertexts as bytes for upload, and decrypts results; the only
//! way to get the secret out is [`ClientKeys::export_secret_local`], meant for the page's own
//! IndexedDB, or for the page's own Web Workers (same origin, same device). The same byte
//! format is read and written by the native CKKS crate.
//!
//! Besides keys, the crate holds the rest of the client's data path so that the browser, the
//! native client and the tests share one implementation: image preprocessing
//! ([`preprocess_image`], which is `beaa_model::preprocess::preprocess`), element-wise packing
//! ([`Batch`]: image `b` in slot `b`, input ciphertext `k` = feature `k` of every image), the
//! result format of `GET /api/jobs/{id}/result` ([`split_result`]) and the softmax that turns
//! decrypted logits into class probabilities.

use beaa_ckks::{
    decrypt, presets, Ciphertext, Encoder, Encryptor, KeyGenerator, ParamSpec, Params, RelinKey,
    SecretKey,
};
use beaa_model::InputSpec;
use wasm_bindgen::prelude::*;

mod client;
pub use client::*;

fn js_err(e: impl std::fmt::Display) -> JsError {
    JsError::new(&e.to_string())
}

/// Looks up a parameter preset (`n8192`, `n16384`, `n32768`, or the insecure
/// `insecure-test-n1024` used by tests).
pub fn params_by_name(name: &str) -> Result<Params, String> {
    match presets::by_name(name) {
        Some(Ok(p)) => Ok(p),
        Some(Err(e)) => Err(e.to_string()),
        None => Err(format!(
            "unknown parameter preset {name:?} (known: {})",
            presets::NAMES.join(", ")
        )),
    }
}

/// A user's keys for one parameter set.
#[wasm_bindgen]
pub struct ClientKeys {
    params: Params,
    sk: SecretKey,
}

/// The JavaScript surface: thin wrappers that turn errors into JS exceptions.
#[wasm_bindgen]
impl ClientKeys {
    /// Generates a fresh secret key from the browser's CSPRNG (`crypto.getRandomValues`).
    #[wasm_bindgen(constructor)]
    pub fn new(preset: &str) -> Result<ClientKeys, JsError> {
        Self::generate(preset).map_err(js_err)
    }

    /// Generates a fresh secret key for the parameter set a server announces: `spec_json` is
    /// `beaa_ckks::ParamSpec` as JSON (the `params` of `GET /api/models`). Insecure test
    /// parameters are accepted only when `allow_insecure` (the model's `insecure_test_params`).
    #[wasm_bindgen(js_name = fromSpec)]
    pub fn from_spec_js(spec_json: &str, allow_insecure: bool) -> Result<ClientKeys, JsError> {
        Self::generate_for_spec(&parse_spec(spec_json).map_err(js_err)?, allow_insecure)
            .map_err(js_err)
    }

    /// Restores keys saved with `exportSecretLocal`.
    #[wasm_bindgen(js_name = importSecretLocal)]
    pub fn import_secret_local(preset: &str, bytes: &[u8]) -> Result<ClientKeys, JsError> {
        Self::from_local_secret(preset, bytes).map_err(js_err)
    }

    /// Restores keys exported with `exportSecretLocal` for a parameter spec (how the page hands
    /// its key to its own Web Workers; the bytes never go to the network).
    #[wasm_bindgen(js_name = importSecretForSpec)]
    pub fn import_secret_for_spec(
        spec_json: &str,
        allow_insecure: bool,
        bytes: &[u8],
    ) -> Result<ClientKeys, JsError> {
        let params = params_from_spec(&parse_spec(spec_json).map_err(js_err)?, allow_insecure)
            .map_err(js_err)?;
        Self::from_local_secret_params(params, bytes).map_err(js_err)
    }

    /// Fails unless this key's parameter fingerprint is `expected_hex` (the server's
    /// `params_fingerprint`): both sides must have built the same parameter set.
    #[wasm_bindgen(js_name = checkFingerprint)]
    pub fn check_fingerprint(&self, expected_hex: &str) -> Result<(), JsError> {
        self.check_fingerprint_native(expected_hex).map_err(js_err)
    }

    /// True when the parameters are the insecure test set (never for real data).
    #[wasm_bindgen(js_name = isInsecure)]
    pub fn is_insecure(&self) -> bool {
        !self.params.is_secure()
    }

    /// Encrypts input ciphertext `k` of a batch: feature `k` of every image, image `b` in
    /// slot `b`. The result is a seeded ciphertext at the top level and default scale.
    #[wasm_bindgen(js_name = encryptFeature)]
    pub fn encrypt_feature(&self, batch: &Batch, k: usize) -> Result<Vec<u8>, JsError> {
        self.encrypt_feature_native(batch, k).map_err(js_err)
    }

    /// Decrypts a job result (the body of `GET /api/jobs/{id}/result`) into per-image class
    /// probabilities, image-major: `n_images * classes` values, softmax of the logits.
    #[wasm_bindgen(js_name = decryptProbabilities)]
    pub fn decrypt_probabilities(
        &self,
        result: &[u8],
        n_images: usize,
        classes: usize,
    ) -> Result<Vec<f64>, JsError> {
        let logits = self
            .decrypt_logits_native(result, n_images, classes)
            .map_err(js_err)?;
        Ok(softmax_rows(&logits, classes))
    }

    /// Decrypts a job result into logits, image-major (`n_images * classes`).
    #[wasm_bindgen(js_name = decryptLogits)]
    pub fn decrypt_logits(
        &self,
        result: &[u8],
        n_images: usize,
        classes: usize,
    ) -> Result<Vec<f64>, JsError> {
        self.decrypt_logits_native(result, n_images, classes)
            .map_err(js_err)
    }

    /// The secret key as bytes, for the page's own storage. Never upload this.
    #[wasm_bindgen(js_name = exportSecretLocal)]
    pub fn export_secret_local(&self) -> Vec<u8> {
        self.sk.to_local_bytes().to_vec()
    }

    /// The relinearization (evaluation) key for the server, freshly generated.
    #[wasm_bindgen(js_name = relinKey)]
    pub fn relin_key(&self) -> Vec<u8> {
        self.relin_key_native().to_bytes()
    }

    /// Number of slots (images per ciphertext).
    pub fn slots(&self) -> usize {
        self.params.slots()
    }

    /// Hex fingerprint of the parameter set (identifies it to the server).
    #[wasm_bindgen(js_name = paramsFingerprint)]
    pub fn params_fingerprint(&self) -> String {
        hex(self.params.fingerprint())
    }

    /// Encrypts up to `slots()` values at the top level with the default scale; the result
    /// is a seeded ciphertext (one polynomial plus a 32-byte seed).
    pub fn encrypt(&self, values: &[f64]) -> Result<Vec<u8>, JsError> {
        self.encrypt_native(values).map_err(js_err)
    }

    /// Decrypts a ciphertext (validated first) into its slot values.
    pub fn decrypt(&self, ciphertext: &[u8]) -> Result<Vec<f64>, JsError> {
        self.decrypt_native(ciphertext).map_err(js_err)
    }
}

/// The Rust surface, shared by the wasm exports, the native client and tests.
impl ClientKeys {
    pub fn generate(preset: &str) -> Result<Self, String> {
        let params = params_by_name(preset)?;
        let sk = KeyGenerator::new(&params).secret_key();
        Ok(Self { params, sk })
    }

    pub fn from_local_secret(preset: &str, bytes: &[u8]) -> Result<Self, String> {
        Self::from_local_secret_params(params_by_name(preset)?, bytes)
    }

    pub fn generate_for_spec(spec: &ParamSpec, allow_insecure: bool) -> Result<Self, String> {
        let params = params_from_spec(spec, allow_insecure)?;
        let sk = KeyGenerator::new(&params).secret_key();
        Ok(Self { params, sk })
    }

    pub fn from_local_secret_params(params: Params, bytes: &[u8]) -> Result<Self, String> {
        let sk = SecretKey::from_local_bytes(&params, bytes).map_err(|e| e.to_string())?;
        Ok(Self { params, sk })
    }

    pub fn check_fingerprint_native(&self, expected_hex: &str) -> Result<(), String> {
        let ours = self.params_fingerprint();
        if ours.eq_ignore_ascii_case(expected_hex.trim()) {
            Ok(())
        } else {
            Err(format!(
                "parameter fingerprint mismatch: the server announced {expected_hex}, \
                 the parameters built here have {ours}"
            ))
        }
    }

    /// [`ClientKeys::encrypt_feature`] for Rust callers.
    pub fn encrypt_feature_native(&self, batch: &Batch, k: usize) -> Result<Vec<u8>, String> {
        if batch.len() > self.slots() {
            return Err(format!(
                "batch of {} images does not fit in {} slots",
                batch.len(),
                self.slots()
            ));
        }
        self.encrypt_native(&batch.feature_native(k)?)
    }

    /// Decrypts the logit ciphertexts of a job result; image-major `n_images * classes`.
    pub fn decrypt_logits_native(
        &self,
        result: &[u8],
        n_images: usize,
        classes: usize,
    ) -> Result<Vec<f64>, String> {
        let cts = split_result(result)?;
        if cts.len() != classes {
            return Err(format!(
                "the result holds {} logit ciphertexts, the model has {classes} classes",
                cts.len()
            ));
        }
        if n_images > self.slots() {
            return Err(format!(
                "{n_images} images do not fit in {} slots",
                self.slots()
            ));
        }
        let mut out = vec![0.0; n_images * classes];
        for (c, ct) in cts.iter().enumerate() {
            let v = self.decrypt_native(ct)?;
            for b in 0..n_images {
                out[b * classes + c] = v[b];
            }
        }
        Ok(out)
    }

    /// Keys whose secret comes from a fixed seed. For cross-platform tests only.
    #[doc(hidden)]
    pub fn from_seed_for_tests(preset: &str, seed: [u8; 32]) -> Result<Self, String> {
        let params = params_by_name(preset)?;
        let sk = KeyGenerator::with_rng(&params, beaa_ckks::sampling::test_rng(seed)).secret_key();
        Ok(Self { params, sk })
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn encrypt_native(&self, values: &[f64]) -> Result<Vec<u8>, String> {
        let ct = Encryptor::new(&self.params)
            .encrypt_values_sk(
                &self.sk,
                values,
                self.params.default_scale(),
                self.params.max_level(),
            )
            .map_err(|e| e.to_string())?;
        Ok(ct.to_bytes())
    }

    pub fn decrypt_native(&self, ciphertext: &[u8]) -> Result<Vec<f64>, String> {
        let ct = Ciphertext::from_bytes(&self.params, ciphertext).map_err(|e| e.to_string())?;
        let pt = decrypt(&self.sk, &ct).map_err(|e| e.to_string())?;
        Ok(Encoder::new(&self.params).decode(&pt))
    }

    pub fn relin_key_native(&self) -> RelinKey {
        KeyGenerator::new(&self.params).relin_key(&self.sk)
    }
}

/// Row-wise softmax of image-major logits (`classes` per row): class probabilities.
#[wasm_bindgen(js_name = softmaxRows)]
pub fn softmax_rows_js(logits: &[f64], classes: usize) -> Vec<f64> {
    softmax_rows(logits, classes)
}

/// Per image the index of its class: the first largest logit of each row of `classes`
/// ([`beaa_model::scores::argmax`], NaN never wins), the same rule as `beaa predict`.
#[wasm_bindgen(js_name = argmaxRows)]
pub fn argmax_rows_js(logits: &[f64], classes: usize) -> Vec<u32> {
    argmax_rows(logits, classes)
        .into_iter()
        .map(|c| c as u32)
        .collect()
}

/// Per image 1 when its decrypted logits leave the model's calibrated range (more than
/// `beaa_model::range::BEYOND_CALIBRATION` x `calibrated_max_abs`, the `GET /api/models`
/// field `logits_calibration_max_abs`), else 0: its class is not reliable, and when most of
/// a batch is flagged the batch overflowed.
#[wasm_bindgen(js_name = outsideCalibration)]
pub fn outside_calibration_rows(
    logits: &[f64],
    classes: usize,
    calibrated_max_abs: f64,
) -> Vec<u8> {
    logits
        .chunks(classes.max(1))
        .map(|row| beaa_model::range::outside_calibration(row, calibrated_max_abs) as u8)
        .collect()
}

/// Whether most images of a batch are flagged by [`outside_calibration_rows`] (`flags`: its
/// output): what a modulus wrap looks like, as opposed to a few unusual images.
#[wasm_bindgen(js_name = batchLooksCorrupt)]
pub fn batch_looks_corrupt_js(flags: &[u8]) -> bool {
    let flags: Vec<bool> = flags.iter().map(|&f| f != 0).collect();
    beaa_model::range::batch_looks_corrupt(&flags)
}

/// The `ParamSpec` of a named preset as JSON (what `GET /api/models` reports as `params`);
/// for benchmarks and tests.
#[wasm_bindgen(js_name = presetSpec)]
pub fn preset_spec(name: &str) -> Result<String, JsError> {
    let params = params_by_name(name).map_err(js_err)?;
    serde_json::to_string(params.spec()).map_err(js_err)
}

/// Hex fingerprint of the parameters built from a spec (as `params_fingerprint` reports it).
#[wasm_bindgen(js_name = specFingerprint)]
pub fn spec_fingerprint(spec_json: &str, allow_insecure: bool) -> Result<String, JsError> {
    let params = params_from_spec(&parse_spec(spec_json).map_err(js_err)?, allow_insecure)
        .map_err(js_err)?;
    Ok(hex(params.fingerprint()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses `beaa_ckks::ParamSpec` from JSON.
pub fn parse_spec(spec_json: &str) -> Result<ParamSpec, String> {
    serde_json::from_str(spec_json).map_err(|e| format!("invalid parameter spec: {e}"))
}

/// Builds parameters from a spec; insecure test sets only when `allow_insecure`.
pub fn params_from_spec(spec: &ParamSpec, allow_insecure: bool) -> Result<Params, String> {
    Params::from_spec(spec.clone(), allow_insecure).map_err(|e| e.to_string())
}

/// Parses the model's `InputSpec` (the `input` of `GET /api/models`) from JSON and checks it.
pub fn parse_input_spec(json: &str) -> Result<InputSpec, String> {
    let spec: InputSpec =
        serde_json::from_str(json).map_err(|e| format!("invalid input spec: {e}"))?;
    spec.check().map_err(|e| e.to_string())?;
    Ok(spec)
}

/// The values both sides of the cross-platform test encrypt.
pub fn crosscheck_values(n: usize) -> Vec<f64> {
    (0..n)
        .map(|i| ((i as f64) * 0.37).sin() * 4.0 - 0.5)
        .collect()
}

/// Seed of the cross-platform test key (public on purpose: a test fixture, not a secret).
pub const CROSSCHECK_SEED: [u8; 32] = *b"beaa crosscheck test key seed!!!";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn native_round_trip_and_secret_import() {
        let keys = ClientKeys::generate("insecure-test-n1024").unwrap();
        let v = crosscheck_values(keys.slots());
        let ct = keys.encrypt_native(&v).unwrap();
        let back = keys.decrypt_native(&ct).unwrap();
        assert!(v.iter().zip(&back).all(|(a, b)| (a - b).abs() < 1e-6));
        let restored =
            ClientKeys::from_local_secret("insecure-test-n1024", &keys.export_secret_local())
                .unwrap();
        assert_eq!(restored.decrypt_native(&ct).unwrap(), back);
        assert!(ClientKeys::generate("no-such-preset").is_err());
        assert!(keys.decrypt_native(&ct[..ct.len() - 1]).is_err());
    }

    #[test]
    fn seeded_test_keys_are_deterministic() {
        let a = ClientKeys::from_seed_for_tests("insecure-test-n1024", CROSSCHECK_SEED).unwrap();
        let b = ClientKeys::from_seed_for_tests("insecure-test-n1024", CROSSCHECK_SEED).unwrap();
        assert_eq!(a.export_secret_local(), b.export_secret_local());
    }
}

#[cfg(all(test, target_arch = "wasm32"))]
mod browser_tests;
