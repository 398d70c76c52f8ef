//! The encrypted path in one process, as client and server would run it: pack and encrypt a
//! batch into files (seeded ciphertexts, as uploaded), evaluate with the engine streaming
//! tiles through a work directory, decrypt the logits. `beaa eval --encrypted` and
//! `beaa bench inference` use it.

use anyhow::{ensure, Context, Result};
use beaa_ckks::{decrypt, Encoder, Encryptor, Evaluator, Params, RelinKey, SecretKey};
use beaa_engine::{run_job, FileInputs, OpTimes, Plan, RunControl};
use beaa_model::packing::{feature_slots, image_logits};
use beaa_model::Model;
use rayon::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

pub struct LocalRun {
    /// Logits per image, in class order.
    pub logits: Vec<Vec<f64>>,
    pub encrypt_s: f64,
    pub eval_s: f64,
    /// Seconds per stage (a stored layer with the layers computed inside it), summed over jobs.
    pub per_stage_s: Vec<(String, f64)>,
    /// The most bytes of intermediate tiles the work directory held (seen at progress reports).
    pub work_dir_peak_bytes: u64,
    /// Thread-seconds per kind of operation ([`beaa_engine::Op`]), summed over jobs.
    pub op_thread_s: Vec<(&'static str, f64)>,
}

/// Runs `images` (`n` preprocessed images, `[C, H, W]` each, flattened) through the encrypted
/// network, in jobs of at most N/2 images. `work` receives inputs and tiles (removed after).
#[allow(clippy::too_many_arguments)]
pub fn run_encrypted(
    model: &Model,
    params: &Params,
    plan: &Plan,
    sk: &SecretKey,
    rlk: &RelinKey,
    images: &[f64],
    n: usize,
    work: &Path,
) -> Result<LocalRun> {
    let per = model.input_len();
    ensure!(
        images.len() == n * per,
        "{n} images need {} values",
        n * per
    );
    let ev = Evaluator::new(params);
    let encoder = Encoder::new(params);
    let classes = model.manifest.classes.len();
    let mut out = LocalRun {
        logits: Vec::with_capacity(n),
        encrypt_s: 0.0,
        eval_s: 0.0,
        per_stage_s: Vec::new(),
        work_dir_peak_bytes: 0,
        op_thread_s: Vec::new(),
    };
    let times = Arc::new(OpTimes::default());
    let slots = params.slots();
    let mut first = 0;
    while first < n {
        let batch = (n - first).min(slots);
        let input_dir = work.join("inputs");
        std::fs::create_dir_all(&input_dir)
            .with_context(|| format!("creating {}", input_dir.display()))?;
        // Element-wise packing: ciphertext k holds feature k of every image, image b in slot b.
        let t = Instant::now();
        let paths: Vec<PathBuf> = (0..per)
            .map(|k| input_dir.join(format!("{k}.ct")))
            .collect();
        paths
            .par_iter()
            .enumerate()
            .try_for_each(|(k, path)| -> Result<()> {
                let column = feature_slots(&images[first * per..(first + batch) * per], per, k);
                let ct = Encryptor::new(params).encrypt_values_sk(
                    sk,
                    &column,
                    params.default_scale(),
                    params.max_level(),
                )?;
                std::fs::write(path, ct.to_bytes())
                    .with_context(|| format!("writing {}", path.display()))
            })?;
        out.encrypt_s += t.elapsed().as_secs_f64();

        let t = Instant::now();
        let (mut stage_start, mut last_report) = (0.0, 0.0);
        let mut current: Option<String> = None;
        let mut stages: Vec<(String, f64)> = Vec::new();
        let logits = run_job(
            model,
            plan,
            &ev,
            rlk,
            &FileInputs::new(params, paths),
            RunControl::new()
                .work_dir(work.join("tiles"))
                .op_times(Arc::clone(&times))
                .on_progress(|p| {
                    if current.as_deref() != Some(p.stage.as_str()) {
                        // The new stage began right after the previous report.
                        if let Some(prev) = current.take() {
                            stages.push((prev, last_report - stage_start));
                        }
                        stage_start = last_report;
                        current = Some(p.stage.clone());
                    }
                    last_report = p.elapsed_s;
                    out.work_dir_peak_bytes = out.work_dir_peak_bytes.max(p.stored_bytes);
                    eprint!(
                        "\r  {:5.1}%  {:<20} {:>8.0} s elapsed, ETA {:>8.0} s   ",
                        p.fraction * 100.0,
                        p.stage,
                        p.elapsed_s,
                        p.eta_s.unwrap_or(f64::NAN)
                    );
                }),
        )?;
        eprintln!();
        let eval_s = t.elapsed().as_secs_f64();
        if let Some(prev) = current.take() {
            stages.push((prev, eval_s - stage_start));
        }
        out.eval_s += eval_s;
        for (name, s) in stages {
            match out.per_stage_s.iter_mut().find(|(n, _)| *n == name) {
                Some(entry) => entry.1 += s,
                None => out.per_stage_s.push((name, s)),
            }
        }
        ensure!(
            logits.len() == classes,
            "{} logits for {classes} classes",
            logits.len()
        );
        let decoded: Vec<Vec<f64>> = logits
            .iter()
            .map(|ct| Ok(encoder.decode(&decrypt(sk, ct)?)))
            .collect::<Result<_, beaa_ckks::Error>>()?;
        out.logits.extend(image_logits(&decoded, batch));
        std::fs::remove_dir_all(work.join("tiles")).ok();
        std::fs::remove_dir_all(&input_dir).ok();
        first += batch;
    }
    out.op_thread_s = times.all_seconds();
    Ok(out)
}

/// A fresh work directory under the system temp dir (or `dir`), removed on drop when fresh.
pub struct WorkDir {
    pub path: PathBuf,
    remove: bool,
}

impl WorkDir {
    pub fn new(dir: Option<&Path>, what: &str) -> Self {
        match dir {
            Some(d) => WorkDir {
                path: d.to_path_buf(),
                remove: false,
            },
            None => WorkDir {
                path: std::env::temp_dir().join(format!("beaa-{what}-{}", std::process::id())),
                remove: true,
            },
        }
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if self.remove {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}
