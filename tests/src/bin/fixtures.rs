//! `beaa-fixtures OUT_DIR`: fixtures of the page's end-to-end test (`tests/web/e2e.mjs`).
//!
//! Writes
//! - `OUT_DIR/zoo/e2e-tiny/`: a small random-weight model of the BEAA SqueezeNet graph
//!   (`SqueezeNetSpec::tiny(3, 4, 4)`, element-wise polynomial activations);
//! - `OUT_DIR/images/*.png|jpg`: synthetic images drawn from formulas (gradients, stripes,
//!   rings, checkerboards) at sizes other than the model's, so the resize path runs too;
//!   `OUT_DIR/images-bad/broken.png`: bytes that are not an image;
//! - `OUT_DIR/expected.json`: per image its preprocessed features and the plaintext
//!   reference prediction, computed with `beaa_model::preprocess::preprocess` (the code the
//!   browser runs compiled to wasm) and `Model::forward` in f64.
//!
//! Images are chosen so that the reference predictions cover at least two classes and every
//! top-1 logit leads the runner-up by a margin far above the CKKS error, so a correct
//! encrypted run must reproduce them exactly.

use beaa_model::{
    preprocess::preprocess, testing::random_model, Activation, Model, SqueezeNetSpec,
};
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use serde_json::json;
use std::io::Cursor;
use std::path::PathBuf;

const MODEL_NAME: &str = "e2e-tiny";
const WANT_IMAGES: usize = 6;
const MIN_MARGIN: f64 = 1e-3;

fn pattern(i: u32) -> (RgbImage, &'static str) {
    let (w, h) = (13 + (i * 7) % 23, 11 + (i * 5) % 19);
    let kind = i % 4;
    let c0 = [
        (i * 67 % 256) as u8,
        (i * 151 % 256) as u8,
        (i * 29 % 256) as u8,
    ];
    let img = RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
        let t = match kind {
            0 => fx * 0.7 + fy * 0.3,
            1 => ((x / (1 + i % 3)) % 2) as f32,
            2 => {
                let d = ((fx - 0.5).powi(2) + (fy - 0.5).powi(2)).sqrt();
                (d * (6.0 + i as f32)).sin() * 0.5 + 0.5
            }
            _ => (((x / 2) + (y / 2)) % 2) as f32,
        };
        let mix = |c: u8, k: u32| -> u8 {
            let other = (255 - c as u32 + k * 40) % 256;
            (c as f32 * (1.0 - t) + other as f32 * t).round() as u8
        };
        Rgb([mix(c0[0], 1), mix(c0[1], 2), mix(c0[2], 3)])
    });
    let name = ["gradient", "stripes", "rings", "checker"][kind as usize];
    (img, name)
}

fn encode(img: &RgbImage, fmt: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    DynamicImage::ImageRgb8(img.clone())
        .write_to(&mut out, fmt)
        .expect("encode image");
    out.into_inner()
}

type Chosen = (String, Vec<u8>, serde_json::Value);

/// Candidate images with a clear top-1 margin; `None` unless >= 2 classes are covered.
fn choose_images(model: &Model) -> Result<Option<Vec<Chosen>>, Box<dyn std::error::Error>> {
    let spec = &model.manifest.input;
    let classes = model.manifest.classes.len();
    let mut chosen: Vec<Chosen> = Vec::new();
    let mut seen_classes = std::collections::BTreeSet::new();
    for i in 0..300u32 {
        if chosen.len() >= WANT_IMAGES && seen_classes.len() >= 2 {
            break;
        }
        let (img, kind) = pattern(i);
        // Every third image as JPEG (lossy: the reference is computed from the JPEG bytes).
        let (fmt, ext) = if i % 3 == 2 {
            (ImageFormat::Jpeg, "jpg")
        } else {
            (ImageFormat::Png, "png")
        };
        let bytes = encode(&img, fmt);
        let x = preprocess(&bytes, spec)?;
        let logits = model.forward_f32(&x, 1)?;
        let mut order: Vec<usize> = (0..classes).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let margin = logits[order[0]] - logits[order[1]];
        if margin < MIN_MARGIN {
            continue;
        }
        // Once half the set is taken, only a class not seen yet until there are two.
        if chosen.len() >= WANT_IMAGES / 2
            && seen_classes.len() < 2
            && seen_classes.contains(&order[0])
        {
            continue;
        }
        if chosen.len() >= WANT_IMAGES {
            continue;
        }
        seen_classes.insert(order[0]);
        let file = format!("{:02}-{kind}.{ext}", chosen.len());
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = logits.iter().map(|l| (l - m).exp()).collect();
        let s: f64 = e.iter().sum();
        let entry = json!({
            "file": file,
            "class_index": order[0],
            "class": model.manifest.classes[order[0]],
            "margin": margin,
            "logits": logits,
            "probabilities": e.iter().map(|v| v / s).collect::<Vec<_>>(),
            "features": x,
        });
        chosen.push((file, bytes, entry));
    }
    Ok((chosen.len() >= WANT_IMAGES && seen_classes.len() >= 2).then_some(chosen))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out: PathBuf = std::env::args()
        .nth(1)
        .ok_or("usage: beaa-fixtures OUT_DIR")?
        .into();
    // Random models often favour one class for every input: take the first seed whose
    // predictions over the candidate images are varied enough.
    let mut found = None;
    for seed in 0..200u64 {
        let model = random_model(
            seed,
            &SqueezeNetSpec::tiny(3, 4, 4),
            Activation::PolyElement,
        );
        if let Some(chosen) = choose_images(&model)? {
            found = Some((model, chosen));
            break;
        }
    }
    let (mut model, chosen) =
        found.ok_or("no model seed gave clear predictions over >= 2 classes")?;
    // A recorded validation result as `beaa-train export` writes it (fixture values: a random
    // model has no real one), so the page test can check what the page tells its user.
    model.manifest.metrics = json!({
        "validation": {"accuracy": 0.75, "balanced_accuracy": 0.7, "n": 40,
                       "per_class_recall": [0.5, 0.9, 0.6, 0.8], "loss": 1.0},
        "validation_split": "Group",
    });
    let model_dir = out.join("zoo").join(MODEL_NAME);
    model.save(&model_dir)?;
    let images_dir = out.join("images");
    std::fs::create_dir_all(&images_dir)?;
    let bad_dir = out.join("images-bad");
    std::fs::create_dir_all(&bad_dir)?;
    std::fs::write(
        bad_dir.join("broken.png"),
        b"\x89PNG\r\n\x1a\nthis is not an image",
    )?;

    for c in &chosen {
        std::fs::write(images_dir.join(&c.0), &c.1)?;
    }
    let seen_classes: std::collections::BTreeSet<_> =
        chosen.iter().map(|c| c.2["class_index"].as_u64()).collect();
    let chosen: Vec<_> = chosen.into_iter().map(|c| c.2).collect();
    let spec = &model.manifest.input;
    let expected = json!({
        "model": MODEL_NAME,
        "classes": model.manifest.classes,
        "input": spec,
        "validation": model.validation(),
        "images": chosen,
    });
    std::fs::write(
        out.join("expected.json"),
        serde_json::to_vec_pretty(&expected)?,
    )?;
    println!(
        "fixtures in {}: model {MODEL_NAME}, {} images over {} classes",
        out.display(),
        chosen.len(),
        seen_classes.len()
    );
    Ok(())
}
