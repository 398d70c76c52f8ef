//! Data sets: class-per-folder image trees and the official CIFAR-10 binary batches, decoded
//! through beaa-model's shared preprocessing into u8 HWC pixels at the model input size.

use anyhow::{bail, Context, Result};
use beaa_model::{preprocess::decode_to_input_u8, InputSpec};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use std::path::{Path, PathBuf};

/// Decoded images, all at one size, with labels and an optional group (patient) per image.
#[derive(Debug, Clone)]
pub struct Dataset {
    pub h: usize,
    pub w: usize,
    pub c: usize,
    /// N * h * w * c pixels, HWC per image.
    pub pixels: Vec<u8>,
    pub labels: Vec<u32>,
    /// Group key per image (e.g. patient id); images of one group never straddle a split.
    pub groups: Vec<String>,
    pub classes: Vec<String>,
}

pub use beaa_model::eval::CIFAR10_CLASSES;

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn image(&self, i: usize) -> &[u8] {
        let s = self.h * self.w * self.c;
        &self.pixels[i * s..(i + 1) * s]
    }

    /// Loads a directory: official CIFAR-10 binary batches if `data_batch_1.bin` or
    /// `test_batch.bin` is present (in it or in `cifar-10-batches-bin/`), otherwise a
    /// class-per-folder tree (sub-directory names are the classes, sorted).
    pub fn load(dir: &Path, spec: &InputSpec) -> Result<Self> {
        for d in [dir.to_path_buf(), dir.join("cifar-10-batches-bin")] {
            if d.join("data_batch_1.bin").exists() || d.join("test_batch.bin").exists() {
                return load_cifar_binary(&d, spec);
            }
        }
        load_folder_tree(dir, spec)
    }

    /// Subset by indices.
    pub fn subset(&self, idx: &[usize]) -> Dataset {
        let mut pixels = Vec::with_capacity(idx.len() * self.h * self.w * self.c);
        for &i in idx {
            pixels.extend_from_slice(self.image(i));
        }
        Dataset {
            h: self.h,
            w: self.w,
            c: self.c,
            pixels,
            labels: idx.iter().map(|&i| self.labels[i]).collect(),
            groups: idx.iter().map(|&i| self.groups[i].clone()).collect(),
            classes: self.classes.clone(),
        }
    }

    /// Per-channel mean and std of pixel/255 (for the model's normalization).
    pub fn channel_stats(&self) -> (Vec<f32>, Vec<f32>) {
        let c = self.c;
        let mut s = vec![0f64; c];
        let mut s2 = vec![0f64; c];
        for (i, &p) in self.pixels.iter().enumerate() {
            let v = p as f64 / 255.0;
            s[i % c] += v;
            s2[i % c] += v * v;
        }
        let n = (self.pixels.len() / c).max(1) as f64;
        let mean: Vec<f32> = s.iter().map(|v| (v / n) as f32).collect();
        let std: Vec<f32> = (0..c)
            .map(|k| ((s2[k] / n - (s[k] / n).powi(2)).max(1e-8).sqrt()) as f32)
            .collect();
        (mean, std)
    }

    /// Images per class.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut v = vec![0; self.classes.len()];
        for &l in &self.labels {
            v[l as usize] += 1;
        }
        v
    }
}

/// How a validation split is carved out.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "snake_case")]
pub enum SplitKind {
    /// The last `val_per_class` images of each class (in file order).
    LastPerClass,
    /// Whole groups (patients), a seeded fraction of the groups of each class.
    Group,
}

/// Fold `index` of a `count`-fold cross-validation over groups (patients): each class's
/// groups, shuffled by the seed, are dealt round-robin to the folds, and fold `index` is the
/// validation set. Small medical sets give one split too few validation images to compare
/// settings (OCT: 26 ERM images); pooling the folds' predictions scores every image once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fold {
    pub index: usize,
    pub count: usize,
}

/// Returns (train indices, validation indices). `fold` applies to group splits only; it
/// replaces `val_fraction`.
pub fn split(
    ds: &Dataset,
    kind: SplitKind,
    val_per_class: usize,
    val_fraction: f64,
    seed: u64,
    fold: Option<Fold>,
) -> (Vec<usize>, Vec<usize>) {
    match kind {
        SplitKind::LastPerClass => {
            let mut train = Vec::new();
            let mut val = Vec::new();
            for c in 0..ds.classes.len() as u32 {
                let idx: Vec<usize> = (0..ds.len()).filter(|&i| ds.labels[i] == c).collect();
                let cut = idx.len().saturating_sub(val_per_class);
                train.extend_from_slice(&idx[..cut]);
                val.extend_from_slice(&idx[cut..]);
            }
            train.sort();
            val.sort();
            (train, val)
        }
        SplitKind::Group => {
            // Assign each group to its majority class, then pick a seeded fraction of the
            // groups of each class, so both splits see every class.
            let mut groups: Vec<String> = ds.groups.clone();
            groups.sort();
            groups.dedup();
            let mut val_groups = std::collections::BTreeSet::new();
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x0005_b117);
            for c in 0..ds.classes.len() as u32 {
                let mut gs: Vec<&String> = groups
                    .iter()
                    .filter(|g| {
                        let mut counts = vec![0usize; ds.classes.len()];
                        for i in 0..ds.len() {
                            if &&ds.groups[i] == g {
                                counts[ds.labels[i] as usize] += 1;
                            }
                        }
                        counts
                            .iter()
                            .enumerate()
                            .max_by_key(|(k, n)| (**n, usize::MAX - k))
                            .map(|(k, _)| k as u32)
                            == Some(c)
                    })
                    .collect();
                shuffle(&mut gs, &mut rng);
                match fold {
                    Some(f) => {
                        for (j, g) in gs.into_iter().enumerate() {
                            if j % f.count.max(1) == f.index {
                                val_groups.insert(g.clone());
                            }
                        }
                    }
                    None => {
                        let k = ((gs.len() as f64 * val_fraction).round() as usize)
                            .max(1)
                            .min(gs.len().saturating_sub(1));
                        for g in gs.into_iter().take(k) {
                            val_groups.insert(g.clone());
                        }
                    }
                }
            }
            let (val, train): (Vec<usize>, Vec<usize>) =
                (0..ds.len()).partition(|&i| val_groups.contains(&ds.groups[i]));
            (train, val)
        }
    }
}

pub fn shuffle<T>(v: &mut [T], rng: &mut ChaCha8Rng) {
    for i in (1..v.len()).rev() {
        let j = (rng.next_u64() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// Group key from a file name: the stem without its trailing `_<number>`
/// (`erm_123_4.jpg` -> `erm_123`); files without such a suffix are their own group.
/// The class prefix is stripped when followed by `_` so one patient in two classes is one group.
pub fn group_key(file_name: &str, class: &str) -> String {
    let stem = Path::new(file_name)
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or(file_name);
    let base = match stem.rsplit_once('_') {
        Some((b, n)) if !b.is_empty() && n.chars().all(|c| c.is_ascii_digit()) && !n.is_empty() => {
            b
        }
        _ => stem,
    };
    let lower = base.to_ascii_lowercase();
    let prefix = format!("{}_", class.to_ascii_lowercase());
    match lower.strip_prefix(&prefix) {
        Some(rest) if !rest.is_empty() => rest.to_string(),
        _ => lower,
    }
}

fn load_folder_tree(dir: &Path, spec: &InputSpec) -> Result<Dataset> {
    let mut classes: Vec<String> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter(|n| !n.starts_with('.'))
        .collect();
    classes.sort();
    if classes.is_empty() {
        bail!(
            "{}: no class sub-directories and no CIFAR-10 binary batches",
            dir.display()
        );
    }
    let mut files: Vec<(PathBuf, u32, String)> = Vec::new();
    for (ci, c) in classes.iter().enumerate() {
        let mut fs: Vec<PathBuf> = std::fs::read_dir(dir.join(c))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.is_file()
                    && !p
                        .file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with('.'))
            })
            .collect();
        fs.sort();
        for f in fs {
            let name = f
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("")
                .to_string();
            files.push((f, ci as u32, group_key(&name, c)));
        }
    }
    let per = spec.height * spec.width * spec.channels;
    let mut pixels = Vec::with_capacity(files.len() * per);
    let mut labels = Vec::new();
    let mut groups = Vec::new();
    let mut skipped = 0usize;
    for (f, l, g) in files {
        let bytes = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
        match decode_to_input_u8(&bytes, spec) {
            Ok(p) => {
                pixels.extend_from_slice(&p);
                labels.push(l);
                groups.push(g);
            }
            Err(_) => skipped += 1, // non-image files (e.g. a CSV) are ignored
        }
    }
    if skipped > 0 {
        eprintln!("note: skipped {skipped} files that are not decodable images");
    }
    if labels.is_empty() {
        bail!("{}: no decodable images", dir.display());
    }
    Ok(Dataset {
        h: spec.height,
        w: spec.width,
        c: spec.channels,
        pixels,
        labels,
        groups,
        classes,
    })
}

/// Official CIFAR-10 binary format: records of 1 label byte + 3072 bytes (R, G, B planes of
/// 32x32). Loads data_batch_1..5 (or test_batch alone when no training batch is there).
fn load_cifar_binary(dir: &Path, spec: &InputSpec) -> Result<Dataset> {
    let mut names: Vec<PathBuf> = (1..=5)
        .map(|i| dir.join(format!("data_batch_{i}.bin")))
        .filter(|p| p.exists())
        .collect();
    if names.is_empty() {
        names.push(dir.join("test_batch.bin"));
    }
    let classes: Vec<String> = match std::fs::read_to_string(dir.join("batches.meta.txt")) {
        Ok(s) => s
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect(),
        Err(_) => CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
    };
    let per = spec.height * spec.width * spec.channels;
    let mut pixels = Vec::new();
    let mut labels = Vec::new();
    let mut groups = Vec::new();
    for f in names {
        let bytes = std::fs::read(&f).with_context(|| format!("reading {}", f.display()))?;
        if bytes.len() % 3073 != 0 {
            bail!(
                "{}: size {} is not a multiple of 3073",
                f.display(),
                bytes.len()
            );
        }
        for (k, rec) in bytes.chunks_exact(3073).enumerate() {
            let label = rec[0] as u32;
            if label as usize >= classes.len() {
                bail!("{}: label {label} out of range", f.display());
            }
            let rgb = image::RgbImage::from_fn(32, 32, |x, y| {
                let o = 1 + (y * 32 + x) as usize;
                image::Rgb([rec[o], rec[o + 1024], rec[o + 2048]])
            });
            let p = beaa_model::preprocess::image_to_input_u8(
                &image::DynamicImage::ImageRgb8(rgb),
                spec,
            )?;
            debug_assert_eq!(p.len(), per);
            pixels.extend_from_slice(&p);
            labels.push(label);
            groups.push(format!("{}#{k}", f.display()));
        }
    }
    Ok(Dataset {
        h: spec.height,
        w: spec.width,
        c: spec.channels,
        pixels,
        labels,
        groups,
        classes,
    })
}

/// Augmentation applied to u8 HWC images before normalization.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Augment {
    /// Random crop after zero-padding by this many pixels (CIFAR style); 0 = none.
    pub pad_crop: usize,
    pub hflip: bool,
    /// Max rotation in degrees and max relative scale change (OCT style); 0 = none.
    pub rotate_deg: f32,
    pub scale: f32,
    /// Max translation in pixels for the affine path.
    pub translate: f32,
}

impl Augment {
    pub fn none() -> Self {
        Augment {
            pad_crop: 0,
            hflip: false,
            rotate_deg: 0.0,
            scale: 0.0,
            translate: 0.0,
        }
    }
}

fn unit(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32
}

/// Applies `aug` to one image (h x w x c, u8) and writes normalized NHWC f32 into `out`.
pub fn augment_normalize(
    img: &[u8],
    (h, w, c): (usize, usize, usize),
    aug: &Augment,
    mean: &[f32],
    std: &[f32],
    rng: &mut ChaCha8Rng,
    out: &mut [f32],
) {
    let flip = aug.hflip && rng.next_u32() & 1 == 1;
    let affine = aug.rotate_deg > 0.0 || aug.scale > 0.0 || aug.translate > 0.0;
    let norm = |p: f32, ch: usize| (p / 255.0 - mean[ch]) / std[ch];
    if affine {
        // Inverse-map each output pixel through rotation/scale about the centre (bilinear).
        let ang = (unit(rng) * 2.0 - 1.0) * aug.rotate_deg.to_radians();
        let s = 1.0 + (unit(rng) * 2.0 - 1.0) * aug.scale;
        let tx = (unit(rng) * 2.0 - 1.0) * aug.translate;
        let ty = (unit(rng) * 2.0 - 1.0) * aug.translate;
        let (cs, sn) = (ang.cos() / s, ang.sin() / s);
        let (cx, cy) = ((w as f32 - 1.0) / 2.0, (h as f32 - 1.0) / 2.0);
        for y in 0..h {
            for x in 0..w {
                let xo = if flip { w - 1 - x } else { x } as f32 - cx - tx;
                let yo = y as f32 - cy - ty;
                let xs = cs * xo + sn * yo + cx;
                let ys = -sn * xo + cs * yo + cy;
                let (x0, y0) = (xs.floor(), ys.floor());
                let (fx, fy) = (xs - x0, ys - y0);
                for ch in 0..c {
                    let mut acc = 0.0;
                    for (dy, wy) in [(0, 1.0 - fy), (1, fy)] {
                        for (dx, wx) in [(0, 1.0 - fx), (1, fx)] {
                            let (xi, yi) = (x0 as isize + dx, y0 as isize + dy);
                            if xi >= 0 && yi >= 0 && (xi as usize) < w && (yi as usize) < h {
                                acc +=
                                    wx * wy * img[(yi as usize * w + xi as usize) * c + ch] as f32;
                            }
                        }
                    }
                    out[(y * w + x) * c + ch] = norm(acc, ch);
                }
            }
        }
        return;
    }
    let p = aug.pad_crop as isize;
    let (dx, dy) = if p > 0 {
        (
            (rng.next_u32() % (2 * p as u32 + 1)) as isize - p,
            (rng.next_u32() % (2 * p as u32 + 1)) as isize - p,
        )
    } else {
        (0, 0)
    };
    for y in 0..h {
        for x in 0..w {
            let xs = if flip { w - 1 - x } else { x } as isize + dx;
            let ys = y as isize + dy;
            let inside = xs >= 0 && ys >= 0 && (xs as usize) < w && (ys as usize) < h;
            for ch in 0..c {
                let v = if inside {
                    img[(ys as usize * w + xs as usize) * c + ch] as f32
                } else {
                    0.0
                };
                // zero padding means black pixels, as in the common CIFAR recipe
                out[(y * w + x) * c + ch] = norm(v, ch);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use beaa_model::ResizePolicy;

    fn spec(c: usize, s: usize) -> InputSpec {
        InputSpec {
            channels: c,
            height: s,
            width: s,
            mean: vec![0.5; c],
            std: vec![0.5; c],
            resize: ResizePolicy::Stretch,
        }
    }

    #[test]
    fn group_key_strips_class_and_index() {
        assert_eq!(group_key("erm_1234_5.jpg", "ERM"), "1234");
        assert_eq!(group_key("no_77_12.jpg", "NO"), "77");
        assert_eq!(group_key("0001.jpg", "cat"), "0001");
    }

    #[test]
    fn folder_tree_with_mixed_formats_sizes_and_png_named_jpg() {
        let dir = std::env::temp_dir().join(format!("beaa-data-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for (class, shade) in [("ERM", 30u8), ("NO", 220u8)] {
            std::fs::create_dir_all(dir.join(class)).unwrap();
            for k in 0..3u32 {
                let img = image::GrayImage::from_pixel(50 + k * 7, 20 + k, image::Luma([shade]));
                let mut buf = std::io::Cursor::new(Vec::new());
                let fmt = if k == 1 {
                    image::ImageFormat::Png
                } else {
                    image::ImageFormat::Jpeg
                };
                image::DynamicImage::ImageLuma8(img)
                    .write_to(&mut buf, fmt)
                    .unwrap();
                // always named .jpg: format must come from the bytes
                std::fs::write(
                    dir.join(class).join(format!(
                        "{}_{}_{}.jpg",
                        class.to_lowercase(),
                        10 + k % 2,
                        k
                    )),
                    buf.into_inner(),
                )
                .unwrap();
            }
        }
        std::fs::write(dir.join("labels.csv"), "x").unwrap();
        let ds = Dataset::load(&dir, &spec(1, 8)).unwrap();
        assert_eq!(ds.classes, vec!["ERM", "NO"]);
        assert_eq!(ds.len(), 6);
        assert_eq!(ds.class_counts(), vec![3, 3]);
        assert!(ds.image(0).iter().all(|&p| (p as i32 - 30).abs() < 4));
        assert!(ds.image(5).iter().all(|&p| (p as i32 - 220).abs() < 4));
        // RGB model input from grey images works too
        let rgb = Dataset::load(&dir, &spec(3, 4)).unwrap();
        assert_eq!(rgb.pixels.len(), 6 * 4 * 4 * 3);
        // group split never splits a patient
        let (tr, va) = split(&ds, SplitKind::Group, 0, 0.5, 1, None);
        assert!(!va.is_empty() && !tr.is_empty());
        for &v in &va {
            assert!(tr.iter().all(|&t| ds.groups[t] != ds.groups[v]));
        }
        // folds: every image validated exactly once, never beside its own patient
        let mut seen = vec![0usize; ds.len()];
        for index in 0..3 {
            let f = Fold { index, count: 3 };
            let (tr, va) = split(&ds, SplitKind::Group, 0, 0.5, 1, Some(f));
            assert_eq!(tr.len() + va.len(), ds.len());
            for &v in &va {
                seen[v] += 1;
                assert!(tr.iter().all(|&t| ds.groups[t] != ds.groups[v]));
            }
        }
        assert!(seen.iter().all(|&n| n == 1), "{seen:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn cifar_binary_batches_are_channel_major() {
        let dir = std::env::temp_dir().join(format!("beaa-cifar-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut rec = vec![7u8];
        rec.extend(std::iter::repeat_n(10u8, 1024));
        rec.extend(std::iter::repeat_n(20u8, 1024));
        rec.extend(std::iter::repeat_n(30u8, 1024));
        let mut bytes = rec.clone();
        bytes.extend(&rec);
        std::fs::write(dir.join("data_batch_1.bin"), &bytes).unwrap();
        let ds = Dataset::load(&dir, &spec(3, 32)).unwrap();
        assert_eq!(ds.len(), 2);
        assert_eq!(ds.labels, vec![7, 7]);
        assert_eq!(ds.classes[7], "horse");
        assert_eq!(&ds.image(1)[..6], &[10, 20, 30, 10, 20, 30]);
        std::fs::write(dir.join("data_batch_2.bin"), [1u8; 5]).unwrap();
        assert!(Dataset::load(&dir, &spec(3, 32)).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn last_per_class_split_and_flip_augmentation() {
        let ds = Dataset {
            h: 1,
            w: 2,
            c: 1,
            pixels: vec![0, 255, 1, 2, 3, 4, 5, 6],
            labels: vec![0, 0, 1, 1],
            groups: vec!["a".into(), "b".into(), "c".into(), "d".into()],
            classes: vec!["x".into(), "y".into()],
        };
        let (tr, va) = split(&ds, SplitKind::LastPerClass, 1, 0.0, 0, None);
        assert_eq!((tr, va), (vec![0, 2], vec![1, 3]));
        let aug = Augment {
            hflip: true,
            ..Augment::none()
        };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..20 {
            let mut out = [0f32; 2];
            augment_normalize(
                ds.image(0),
                (1, 2, 1),
                &aug,
                &[0.0],
                &[1.0],
                &mut rng,
                &mut out,
            );
            seen.insert((out[0] as i32, out[1] as i32));
        }
        assert_eq!(seen.into_iter().collect::<Vec<_>>(), vec![(0, 1), (1, 0)]);
    }
}
