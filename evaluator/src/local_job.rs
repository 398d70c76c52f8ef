//! The encrypted path in one process, as client and server would run it: pack and encrypt a
//! batch into files (seeded ciphertexts, as uploaded), evaluate with the engine streaming
//! tiles through a work directory, decrypt the logits. `beaa eval --encrypted` and
//! `beaa bench inference` use it.

use anyhow::{ensure, Context, Result};
use beaa_ckks::ring::take_poly_bytes_peak;
use beaa_ckks::{decrypt, Encoder, Encryptor, Evaluator, Params, RelinKey, SecretKey};
use beaa_engine::{run_job, FileInputs, OpTimes, Plan, RunControl};
use beaa_model::packing::{feature_slots, image_logits};
use beaa_model::Model;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
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
    /// The most bytes of polynomials (ciphertexts, keys, temporaries) alive at once while each
    /// stage ran (the peak between two progress reports goes to the stage reporting), the
    /// largest over jobs: which stage sets the peak, exactly, and the part of memory that
    /// grows with N. (RSS also holds a process's fixed costs and the allocator's retained
    /// pages, which at the test parameters hide what a schedule changes.)
    pub poly_bytes_peak_by_stage: Vec<(String, u64)>,
}

/// The accounting of a resumable run ([`run_encrypted`] with a journal), summed over the
/// process runs it took: a full-width job on a slow machine can outlast a process, and the
/// engine resumes from the tiles already stored. Saved as JSON beside the tiles every
/// [`JOURNAL_EVERY_S`] seconds and at the end; work lost when a process died (tiles in flight)
/// is done again and counted again.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Journal {
    /// What the job is (model, options, parameter fingerprint): a run with other settings
    /// must not continue it.
    pub job: String,
    /// Process runs that worked on the job (this one included, once it has started).
    pub runs: u32,
    /// Every input ciphertext is on disk (written before the first run's evaluation).
    pub inputs_written: bool,
    pub encrypt_s: f64,
    pub eval_s: f64,
    pub per_stage_s: Vec<(String, f64)>,
    pub op_thread_s: Vec<(String, f64)>,
    pub work_dir_peak_bytes: u64,
    /// The largest peak RSS of the runs (each process's own `ru_maxrss`).
    pub peak_rss_bytes: u64,
    /// [`LocalRun::poly_bytes_peak_by_stage`], the largest over the runs.
    #[serde(default)]
    pub poly_bytes_peak_by_stage: Vec<(String, u64)>,
}

/// Peak resident set size of this process (Linux `ru_maxrss`), 0 elsewhere.
pub fn peak_rss_bytes() -> u64 {
    #[cfg(target_os = "linux")]
    // SAFETY: getrusage writes into the zeroed struct we pass.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut u) == 0 {
            return u.ru_maxrss as u64 * 1024;
        }
    }
    0
}

/// Seconds between saves of a [`Journal`].
pub const JOURNAL_EVERY_S: f64 = 30.0;

impl Journal {
    pub fn load(path: &Path) -> Result<Option<Journal>> {
        crate::files::read_json_if_exists(path)
    }

    /// Written whole or not at all (a temporary file renamed over the old one).
    pub fn save(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
    }

    /// This journal with a run's figures so far added.
    fn plus(&self, run: &LocalRun, stages: &[(String, f64)]) -> Journal {
        let mut out = self.clone();
        out.encrypt_s += run.encrypt_s;
        out.eval_s += run.eval_s;
        out.work_dir_peak_bytes = out.work_dir_peak_bytes.max(run.work_dir_peak_bytes);
        out.peak_rss_bytes = out.peak_rss_bytes.max(peak_rss_bytes());
        add_named(&mut out.per_stage_s, stages.iter().cloned());
        max_named(
            &mut out.poly_bytes_peak_by_stage,
            run.poly_bytes_peak_by_stage.iter().cloned(),
        );
        add_named(
            &mut out.op_thread_s,
            run.op_thread_s.iter().map(|(k, s)| (k.to_string(), *s)),
        );
        out
    }
}

/// Merges `(name, value)` pairs into `into` by name with `combine`, keeping first-seen order.
fn merge_named<V>(
    into: &mut Vec<(String, V)>,
    from: impl IntoIterator<Item = (String, V)>,
    combine: impl Fn(&mut V, V),
) {
    for (name, v) in from {
        match into.iter_mut().find(|(n, _)| *n == name) {
            Some(entry) => combine(&mut entry.1, v),
            None => into.push((name, v)),
        }
    }
}

/// Adds `(name, seconds)` pairs into `into`, by name.
fn add_named(into: &mut Vec<(String, f64)>, from: impl IntoIterator<Item = (String, f64)>) {
    merge_named(into, from, |a, b| *a += b);
}

/// Keeps the larger value per name of `(name, value)` pairs.
fn max_named(into: &mut Vec<(String, u64)>, from: impl IntoIterator<Item = (String, u64)>) {
    merge_named(into, from, |a, b| *a = (*a).max(b));
}

/// Runs `images` (`n` preprocessed images, `[C, H, W]` each, flattened) through the encrypted
/// network, in jobs of at most N/2 images. `work` receives inputs and tiles (removed after).
///
/// Resumable with `journal` (its file, and what it held when this process started): one job
/// of at most N/2 images whose inputs and finished tiles in `work` are kept across process
/// runs - the inputs are written once, the engine skips stored tiles - and whose accounting
/// is saved to the journal file as it goes. The caller must run it with the same keys, plan
/// and images every time, and removes the work directory's `inputs` and `tiles` once it has
/// what it needs (a run that ends finds the finished job again). The returned [`LocalRun`]
/// is this process's part; the journal holds the sums.
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
    journal: Option<(&Path, &Journal)>,
) -> Result<LocalRun> {
    let per = model.input_len();
    ensure!(
        images.len() == n * per,
        "{n} images need {} values",
        n * per
    );
    ensure!(
        journal.is_none() || n <= params.slots(),
        "a resumable run holds one job of at most {} images",
        params.slots()
    );
    let mut prior = journal.map(|(_, j)| Journal {
        runs: j.runs + 1,
        ..j.clone()
    });
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
        poly_bytes_peak_by_stage: Vec::new(),
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
        if !prior.as_ref().is_some_and(|j| j.inputs_written) {
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
            if let (Some(j), Some((file, _))) = (prior.as_mut(), journal) {
                // From now on a restart finds every input (a crash before this line encrypts
                // them all again; the engine reads them only after it).
                j.inputs_written = true;
                j.plus(&out, &[]).save(file)?;
            }
        }

        if journal.is_none() {
            // Tiles a killed earlier run left in a given work directory belong to other keys:
            // the store keeps tiles of the same plan, so they must go.
            match std::fs::remove_dir_all(work.join("tiles")) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).context("clearing the work directory's tiles")
                }
                _ => {}
            }
        }
        let t = Instant::now();
        let (mut stage_start, mut last_report, mut last_save) = (0.0, 0.0, 0.0);
        let mut current: Option<String> = None;
        let mut stages: Vec<(String, f64)> = Vec::new();
        let mut save_error: Option<anyhow::Error> = None;
        // The peak so far (keys, encryption) belongs to no stage.
        take_poly_bytes_peak();
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
                    max_named(
                        &mut out.poly_bytes_peak_by_stage,
                        [(p.stage.clone(), take_poly_bytes_peak())],
                    );
                    out.work_dir_peak_bytes = out.work_dir_peak_bytes.max(p.stored_bytes);
                    if let (Some(j), Some((file, _))) = (prior.as_ref(), journal) {
                        if p.elapsed_s - last_save >= JOURNAL_EVERY_S && save_error.is_none() {
                            last_save = p.elapsed_s;
                            // This run so far: finished stages, the current one up to now.
                            let mut so_far = stages.clone();
                            if let Some(cur) = &current {
                                so_far.push((cur.clone(), last_report - stage_start));
                            }
                            let run = LocalRun {
                                logits: Vec::new(),
                                encrypt_s: out.encrypt_s,
                                eval_s: p.elapsed_s,
                                per_stage_s: Vec::new(),
                                work_dir_peak_bytes: out.work_dir_peak_bytes,
                                op_thread_s: times.all_seconds(),
                                poly_bytes_peak_by_stage: out.poly_bytes_peak_by_stage.clone(),
                            };
                            save_error = j.plus(&run, &so_far).save(file).err();
                        }
                    }
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
        if let Some(e) = save_error {
            return Err(e.context("saving the run's journal"));
        }
        let eval_s = t.elapsed().as_secs_f64();
        if let Some(prev) = current.take() {
            stages.push((prev.clone(), eval_s - stage_start));
            max_named(
                &mut out.poly_bytes_peak_by_stage,
                [(prev, take_poly_bytes_peak())],
            );
        }
        out.eval_s += eval_s;
        add_named(&mut out.per_stage_s, stages);
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
        if journal.is_none() {
            std::fs::remove_dir_all(work.join("tiles")).ok();
            std::fs::remove_dir_all(&input_dir).ok();
        }
        first += batch;
    }
    out.op_thread_s = times.all_seconds();
    if let (Some(j), Some((file, _))) = (prior.as_ref(), journal) {
        j.plus(&out, &out.per_stage_s).save(file)?;
    }
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
