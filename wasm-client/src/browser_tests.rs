//! Tests that run in headless Chromium (`wasm-pack test --headless --chrome`).
//!
//! The cross-platform test talks to `beaa-crosscheck` (crate `beaa-tests`), a native process
//! on loopback that `scripts/test.sh` starts and whose address it passes at compile time in
//! `BEAA_CROSSCHECK_URL`. Both sides derive the same *test* secret from a public seed, so no
//! secret crosses the wire: the native side encrypts and the browser decrypts, then the
//! browser encrypts and the native side decrypts.

use super::*;
use wasm_bindgen::JsCast;
use wasm_bindgen_futures::JsFuture;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

const PRESET: &str = "insecure-test-n1024";

#[wasm_bindgen_test]
fn keygen_encrypt_decrypt_in_the_browser() {
    let keys = ClientKeys::generate(PRESET).unwrap();
    let rlk = keys.relin_key();
    assert!(beaa_ckks::RelinKey::from_bytes(keys.params(), &rlk).is_ok());
    let v = crosscheck_values(keys.slots());
    let ct = keys.encrypt_native(&v).unwrap();
    let back = keys.decrypt_native(&ct).unwrap();
    let err = v
        .iter()
        .zip(&back)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-6, "max error {err}");
    // Two encryptions of the same values differ: fresh randomness from the browser.
    assert_ne!(ct, keys.encrypt_native(&v).unwrap());
}

async fn fetch(url: &str, body: Option<&[u8]>) -> Vec<u8> {
    let opts = web_sys::RequestInit::new();
    opts.set_method(if body.is_some() { "POST" } else { "GET" });
    opts.set_mode(web_sys::RequestMode::Cors);
    if let Some(b) = body {
        opts.set_body(&js_sys::Uint8Array::from(b).into());
    }
    let req = web_sys::Request::new_with_str_and_init(url, &opts).unwrap();
    let window = web_sys::window().unwrap();
    let resp: web_sys::Response = JsFuture::from(window.fetch_with_request(&req))
        .await
        .unwrap_or_else(|e| panic!("fetch {url} failed: {e:?} (is beaa-crosscheck running?)"))
        .dyn_into()
        .unwrap();
    assert!(resp.ok(), "{url}: HTTP {}", resp.status());
    let buf = JsFuture::from(resp.array_buffer().unwrap()).await.unwrap();
    js_sys::Uint8Array::new(&buf).to_vec()
}

#[wasm_bindgen_test]
async fn one_byte_format_across_native_and_wasm() {
    let base = option_env!("BEAA_CROSSCHECK_URL").expect(
        "BEAA_CROSSCHECK_URL was not set at build time: run the browser tests through scripts/test.sh",
    );
    let keys = ClientKeys::from_seed_for_tests(PRESET, CROSSCHECK_SEED).unwrap();
    let want = crosscheck_values(keys.slots());

    // Native encrypted, browser decrypts.
    let ct = fetch(&format!("{base}/ciphertext"), None).await;
    let got = keys.decrypt_native(&ct).unwrap();
    let err = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-6, "native -> wasm: max error {err}");

    // Browser encrypts, native decrypts (and returns the slot values as f64 LE).
    let ct = keys.encrypt_native(&want).unwrap();
    let reply = fetch(&format!("{base}/decrypt"), Some(&ct)).await;
    assert_eq!(reply.len(), 8 * keys.slots());
    let got: Vec<f64> = reply
        .chunks_exact(8)
        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let err = want
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(err < 1e-6, "wasm -> native: max error {err}");

    // The native side rejects a corrupted ciphertext instead of decrypting garbage.
    let mut bad = ct.clone();
    bad[4] ^= 0xff;
    let opts = web_sys::RequestInit::new();
    opts.set_method("POST");
    opts.set_body(&js_sys::Uint8Array::from(&bad[..]).into());
    let req = web_sys::Request::new_with_str_and_init(&format!("{base}/decrypt"), &opts).unwrap();
    let resp: web_sys::Response =
        JsFuture::from(web_sys::window().unwrap().fetch_with_request(&req))
            .await
            .unwrap()
            .dyn_into()
            .unwrap();
    assert_eq!(resp.status(), 400);
}
