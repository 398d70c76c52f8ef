//! The browser side of BEAA: key generation, encryption and decryption in wasm.
//!
//! The secret key is created here and stays here: [`ClientKeys`] exposes the evaluation key
//! (relinearization key) and ciphertexts as bytes for upload, and decrypts results; the only
//! way to get the secret out is [`ClientKeys::export_secret_local`], meant for the page's own
//! IndexedDB. The same byte format is read and written by the native CKKS crate.

use beaa_ckks::{
    decrypt, presets, Ciphertext, Encoder, Encryptor, KeyGenerator, Params, RelinKey, SecretKey,
};
use wasm_bindgen::prelude::*;

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

    /// Restores keys saved with `exportSecretLocal`.
    #[wasm_bindgen(js_name = importSecretLocal)]
    pub fn import_secret_local(preset: &str, bytes: &[u8]) -> Result<ClientKeys, JsError> {
        Self::from_local_secret(preset, bytes).map_err(js_err)
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
        self.params
            .fingerprint()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
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
        let params = params_by_name(preset)?;
        let sk = SecretKey::from_local_bytes(&params, bytes).map_err(|e| e.to_string())?;
        Ok(Self { params, sk })
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
