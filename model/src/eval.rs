//! Plaintext evaluation of a model on a labelled data directory (what `beaa eval` runs):
//! a class-per-folder image tree, or the official CIFAR-10 binary batches.

use crate::{preprocess, Model, ModelError};
use serde::Serialize;
use std::path::{Path, PathBuf};

/// The official CIFAR-10 label order (used when `batches.meta.txt` is absent).
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

/// Accuracy report; classes are the model's, in logit order.
#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub images: usize,
    pub accuracy: f64,
    pub balanced_accuracy: f64,
    /// Recall per model class; None for classes absent from the data.
    pub per_class_recall: Vec<(String, Option<f64>)>,
    /// confusion[true][predicted]
    pub confusion: Vec<Vec<usize>>,
    /// Files that could not be decoded as images (skipped).
    pub skipped: usize,
}

fn io(p: &Path) -> impl Fn(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io {
        path: p.display().to_string(),
        source,
    }
}

/// Labelled items of a directory: (class name, image source).
enum Item {
    File(PathBuf),
    /// CIFAR binary record: 3072 channel-major bytes.
    Record(Vec<u8>),
}

fn list(dir: &Path) -> Result<Vec<(String, Item)>, ModelError> {
    for d in [dir.to_path_buf(), dir.join("cifar-10-batches-bin")] {
        let mut batches: Vec<PathBuf> = (1..=5)
            .map(|i| d.join(format!("data_batch_{i}.bin")))
            .filter(|p| p.exists())
            .collect();
        if d.join("test_batch.bin").exists() {
            // a user evaluating brings the test batch: prefer it alone
            batches = vec![d.join("test_batch.bin")];
        }
        if batches.is_empty() {
            continue;
        }
        let names: Vec<String> = match std::fs::read_to_string(d.join("batches.meta.txt")) {
            Ok(s) => s
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(String::from)
                .collect(),
            Err(_) => CIFAR10_CLASSES.map(String::from).to_vec(),
        };
        let mut out = Vec::new();
        for b in batches {
            let bytes = std::fs::read(&b).map_err(io(&b))?;
            if bytes.len() % 3073 != 0 {
                return Err(ModelError::Invalid(format!(
                    "{}: not CIFAR-10 binary records",
                    b.display()
                )));
            }
            for rec in bytes.chunks_exact(3073) {
                let name = names
                    .get(rec[0] as usize)
                    .cloned()
                    .ok_or_else(|| ModelError::Invalid(format!("label {} out of range", rec[0])))?;
                out.push((name, Item::Record(rec[1..].to_vec())));
            }
        }
        return Ok(out);
    }
    let mut classes: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    let mut out = Vec::new();
    for c in classes {
        let name = c
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if name.starts_with('.') {
            continue;
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(&c)
            .map_err(io(&c))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        out.extend(files.into_iter().map(|f| (name.clone(), Item::File(f))));
    }
    if out.is_empty() {
        return Err(ModelError::Invalid(format!(
            "{}: no class folders with files and no CIFAR-10 batches",
            dir.display()
        )));
    }
    Ok(out)
}

/// Preprocessed labelled images of `dir` (at most `limit`, spread evenly, if non-zero):
/// `(labels as model class indices, images [n, C, H, W] flattened, unreadable files skipped)`.
/// Data classes are matched to the model's classes by name; an unknown class is an error.
pub fn load_labelled(
    model: &Model,
    dir: &Path,
    limit: usize,
) -> Result<(Vec<usize>, Vec<f64>, usize), ModelError> {
    let mut items = list(dir)?;
    if limit > 0 && items.len() > limit {
        let n = items.len();
        let keep: std::collections::BTreeSet<usize> = (0..limit).map(|i| i * n / limit).collect();
        items = items
            .into_iter()
            .enumerate()
            .filter(|(i, _)| keep.contains(i))
            .map(|(_, x)| x)
            .collect();
    }
    let classes = &model.manifest.classes;
    let spec = &model.manifest.input;
    let (mut labels, mut images, mut skipped) = (Vec::new(), Vec::new(), 0);
    for (name, item) in items {
        let t = classes.iter().position(|c| *c == name).ok_or_else(|| {
            ModelError::Invalid(format!(
                "data class {name} is not a model class {classes:?}"
            ))
        })?;
        let x = match item {
            Item::File(p) => {
                let bytes = std::fs::read(&p).map_err(io(&p))?;
                match preprocess::preprocess(&bytes, spec) {
                    Ok(x) => x,
                    Err(ModelError::Image(_)) => {
                        skipped += 1;
                        continue;
                    }
                    Err(e) => return Err(e),
                }
            }
            Item::Record(r) => {
                let img = image::RgbImage::from_fn(32, 32, |x, y| {
                    let o = (y * 32 + x) as usize;
                    image::Rgb([r[o], r[o + 1024], r[o + 2048]])
                });
                let px = preprocess::image_to_input_u8(&image::DynamicImage::ImageRgb8(img), spec)?;
                preprocess::normalize_chw(&px, spec)?
            }
        };
        labels.push(t);
        images.extend(x.iter().map(|&v| v as f64));
    }
    Ok((labels, images, skipped))
}

/// The report for predicted class indices against true ones.
pub fn report(model: &Model, labels: &[usize], predicted: &[usize], skipped: usize) -> EvalReport {
    let classes = &model.manifest.classes;
    let k = classes.len();
    let mut conf = vec![vec![0usize; k]; k];
    for (&t, &p) in labels.iter().zip(predicted) {
        conf[t][p] += 1;
    }
    let n: usize = conf.iter().flatten().sum();
    let recall: Vec<Option<f64>> = conf
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let s: usize = r.iter().sum();
            (s > 0).then(|| r[i] as f64 / s as f64)
        })
        .collect();
    let present: Vec<f64> = recall.iter().flatten().copied().collect();
    EvalReport {
        model: model.manifest.name.clone(),
        images: n,
        accuracy: (0..k).map(|i| conf[i][i]).sum::<usize>() as f64 / n.max(1) as f64,
        balanced_accuracy: present.iter().sum::<f64>() / present.len().max(1) as f64,
        per_class_recall: classes.iter().cloned().zip(recall).collect(),
        confusion: conf,
        skipped,
    }
}

/// Evaluates `model` on every image of `dir` (at most `limit`, spread evenly, if non-zero)
/// with the plaintext f64 path.
pub fn evaluate_dir(model: &Model, dir: &Path, limit: usize) -> Result<EvalReport, ModelError> {
    let (labels, images, skipped) = load_labelled(model, dir, limit)?;
    let per = model.input_len();
    let mut predicted = Vec::with_capacity(labels.len());
    for x in images.chunks(per) {
        predicted.push(model.predict(x, 1)?[0]);
    }
    Ok(report(model, &labels, &predicted, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{testing::random_model, Activation, SqueezeNetSpec};

    #[test]
    fn evaluates_a_folder_tree_and_cifar_batches_consistently() {
        let m = random_model(5, &SqueezeNetSpec::tiny(3, 32, 10), Activation::PolyChannel);
        let root = std::env::temp_dir().join(format!("beaa-eval-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let (tree, bin) = (root.join("tree"), root.join("bin"));
        std::fs::create_dir_all(&bin).unwrap();
        let mut batch = Vec::new();
        for (label, shade) in [(0u8, 10u8), (0, 40), (3, 200), (3, 250)] {
            let cls = &m.manifest.classes[label as usize];
            std::fs::create_dir_all(tree.join(cls)).unwrap();
            let img = image::RgbImage::from_fn(32, 32, |x, y| {
                image::Rgb([shade, (x * 8) as u8, (y * 8) as u8])
            });
            img.save_with_format(
                tree.join(cls).join(format!("{shade}.png")),
                image::ImageFormat::Png,
            )
            .unwrap();
            batch.push(label);
            for ch in 0..3 {
                for y in 0..32u32 {
                    for x in 0..32u32 {
                        batch.push([shade, (x * 8) as u8, (y * 8) as u8][ch]);
                    }
                }
            }
        }
        std::fs::write(bin.join("test_batch.bin"), &batch).unwrap();
        std::fs::write(
            tree.join(&m.manifest.classes[0]).join("notes.txt"),
            "not an image",
        )
        .unwrap();
        // the binary format has no class names: use the model's
        std::fs::write(bin.join("batches.meta.txt"), m.manifest.classes.join("\n")).unwrap();
        let a = evaluate_dir(&m, &tree, 0).unwrap();
        let b = evaluate_dir(&m, &bin, 0).unwrap();
        assert_eq!(a.images, 4);
        assert_eq!(a.skipped, 1);
        assert_eq!(a.confusion, b.confusion);
        assert_eq!(a.confusion[0].iter().sum::<usize>(), 2);
        assert_eq!(a.per_class_recall[1].1, None);
        std::fs::create_dir_all(root.join("bad").join("zebra")).unwrap();
        std::fs::write(root.join("bad").join("zebra").join("z.png"), b"x").unwrap();
        assert!(evaluate_dir(&m, &root.join("bad"), 0).is_err());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
