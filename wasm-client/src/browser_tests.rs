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

/// A PNG of `w x h` RGB pixels from a formula (a synthetic test image).
fn synthetic_png(w: u32, h: u32, seed: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        image::Rgb([
            ((x * 37 + y * 11 + seed * 53) % 256) as u8,
            ((x * 5 + y * 71 + seed * 19) % 256) as u8,
            ((x * y + seed * 101) % 256) as u8,
        ])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

const INPUT_SPEC: &str = r#"{"channels":3,"height":4,"width":4,"mean":[0.5,0.4,0.3],"std":[0.25,0.2,0.3],"resize":"stretch"}"#;

#[wasm_bindgen_test]
fn preprocess_pack_encrypt_decrypt_at_a_spec() {
    // Preprocessing in the browser: same size -> no resize, so every value is known exactly.
    let png = synthetic_png(4, 4, 1);
    let x = preprocess_image(&png, INPUT_SPEC).unwrap();
    assert_eq!(x.len(), 48);
    let spec = parse_input_spec(INPUT_SPEC).unwrap();
    let img = image::load_from_memory(&png).unwrap().to_rgb8();
    for (i, px) in img.pixels().enumerate() {
        for c in 0..3 {
            let want = (px[c] as f32 / 255.0 - spec.mean[c]) / spec.std[c];
            assert!((x[c * 16 + i] - want).abs() < 1e-6, "feature {c},{i}");
        }
    }
    // A larger image is resized to the input size; garbage is an error, not a panic.
    assert_eq!(
        preprocess_image(&synthetic_png(9, 13, 2), INPUT_SPEC)
            .unwrap()
            .len(),
        48
    );
    assert!(preprocess_image_native(b"definitely not an image", INPUT_SPEC).is_err());

    // Pack five images element-wise, encrypt every feature at an insecure spec, and decrypt
    // the ciphertexts as if they were a 48-class result.
    let spec_json = serde_json::to_string(&beaa_ckks::presets::insecure_test_n1024()).unwrap();
    assert!(ClientKeys::generate_for_spec(&parse_spec(&spec_json).unwrap(), false).is_err());
    let keys = ClientKeys::from_spec_js(&spec_json, true).unwrap();
    assert!(keys.is_insecure());
    keys.check_fingerprint_native(&keys.params_fingerprint())
        .unwrap();
    let mut batch = Batch::new(48).unwrap();
    let mut images = Vec::new();
    for s in 0..5 {
        let f = preprocess_image(&synthetic_png(6 + s, 5, s), INPUT_SPEC).unwrap();
        assert_eq!(batch.push(&f).unwrap(), s as usize);
        images.push(f);
    }
    assert_eq!(batch.len(), 5);
    // Workers encrypt with keys restored from the exported secret.
    let worker =
        ClientKeys::import_secret_for_spec(&spec_json, true, &keys.export_secret_local()).unwrap();
    let cts: Vec<Vec<u8>> = (0..48)
        .map(|k| worker.encrypt_feature(&batch, k).unwrap())
        .collect();
    let logits = keys
        .decrypt_logits_native(&join_result(&cts), 5, 48)
        .unwrap();
    let mut err = 0f64;
    for (b, img) in images.iter().enumerate() {
        for k in 0..48 {
            err = err.max((logits[b * 48 + k] - img[k] as f64).abs());
        }
    }
    assert!(err < 1e-5, "max error {err}");
    let p = softmax_rows(&logits, 48);
    assert!((p[..48].iter().sum::<f64>() - 1.0).abs() < 1e-9);
    assert_eq!(
        argmax_rows(&p, 48),
        argmax_rows(
            &images
                .iter()
                .flatten()
                .map(|&v| v as f64)
                .collect::<Vec<_>>(),
            48
        )
    );
}

#[wasm_bindgen_test]
fn argmax_rows_picks_the_first_largest_and_never_nan() {
    // Rows of two: [NaN, 1] -> 1, [3, 3] -> 0 (the first), [-inf, -5] -> 1.
    let logits = [f64::NAN, 1.0, 3.0, 3.0, f64::NEG_INFINITY, -5.0];
    assert_eq!(argmax_rows_js(&logits, 2), vec![1, 0, 1]);
}
