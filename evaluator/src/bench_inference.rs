//! `beaa bench inference`: encrypted inference on random inputs (or the images of `--data`)
//! at the planned 128-bit parameters, with per-layer seconds and peak memory.

use crate::keygen::{self, ClientKeys};
use crate::local_job::{peak_rss_bytes, run_encrypted, Journal, WorkDir};
use anyhow::{bail, Context, Result};
use beaa_ckks::RelinKey;
use beaa_engine::Plan;
use beaa_model::range::outside_calibration;
use beaa_model::scores::argmax;
use rayon::prelude::*;
use serde::Serialize;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct InferenceBenchArgs {
    /// A shipped model (cifar10, octdl) or a model directory.
    #[arg(long)]
    pub model: String,
    /// Images in the batch: a number or `full` (N/2).
    #[arg(long, default_value = "full")]
    pub batch: String,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Where input ciphertexts and intermediate tiles go (tens of GB for a full-width model);
    /// default: a fresh directory under the system temp dir, removed afterwards.
    #[arg(long)]
    pub work_dir: Option<std::path::PathBuf>,
    /// Fill the batch with the images of this class-per-folder tree (repeated as needed)
    /// instead of random ones: a model may blow up on noise that no real image resembles
    /// (the time does not depend on the values; the agreement check does).
    #[arg(long)]
    pub data: Option<std::path::PathBuf>,
    /// Compute the 3x3 convolutions over at least MIN_CHANNELS input channels (default
    /// `beaa_engine::WINOGRAD_MIN_CHANNELS`) in Winograd's F(2x2, 3x3) form
    /// (`beaa_engine::Plan::with_winograd`).
    #[arg(long, value_name = "MIN_CHANNELS", num_args = 0..=1)]
    pub winograd: Option<Option<usize>>,
    /// Keep the job resumable in --work-dir: its keys (the secret key mode 0600, removed when
    /// the job ends), inputs, finished tiles and a journal of the time spent stay there, and
    /// the same command run again continues the job instead of starting over. For jobs that
    /// outlast a process (a full-width job on a slow machine); the report sums the runs.
    #[arg(long, requires = "work_dir")]
    pub resume: bool,
}

/// The journal of a resumable bench, in its work directory.
const JOURNAL_FILE: &str = "bench-journal.json";
/// The keys of a resumable bench, in its work directory.
const KEYS_DIR: &str = "keys";

#[derive(Serialize)]
struct Report {
    model: String,
    n: usize,
    batch: usize,
    threads: usize,
    /// Process runs the job took (`--resume`; 1 otherwise). Times are sums over the runs;
    /// `peak_rss_bytes` is the largest of them.
    runs: u32,
    /// The row kernels' path on this CPU: "avx512-ifma", "avx2-fma" or "scalar".
    kernels: &'static str,
    /// Layers whose 3x3 convolution ran in Winograd's form (`--winograd`).
    winograd_layers: Vec<String>,
    /// The GEMM's modular multiply-adds per job under this plan.
    gemm_multiply_adds: u64,
    keygen_s: f64,
    encrypt_s: f64,
    total_s: f64,
    amortized_ms: f64,
    peak_rss_bytes: u64,
    /// The most bytes of polynomials (ciphertexts, keys, temporaries) alive at once per stage:
    /// exact, and what grows with N (RSS also holds fixed costs and the allocator's free pages).
    poly_bytes_peak_by_stage: Vec<(String, u64)>,
    /// The most bytes of intermediate ciphertexts the work directory held at once.
    work_dir_peak_bytes: u64,
    /// Seconds per stage (a stored layer with the layers computed inside it).
    per_layer_s: Vec<(String, f64)>,
    /// Thread-seconds per kind of operation, summed over the threads (`beaa_engine::Op`): where
    /// the time goes. What `threads x total_s` has beyond their sum is waiting and bookkeeping.
    thread_s_by_op: Vec<(String, f64)>,
    /// What the batch held: random normalized pixels, or the images of a directory.
    inputs: String,
    /// Images whose reference logits lie beyond the model's calibrated range (`beaa eval`'s
    /// check): they can overflow the ciphertexts and garble the batch, so disagreements
    /// there say nothing about the engine.
    inputs_outside_calibrated_range: usize,
    squares: usize,
    relinearizations: usize,
    plan_s: f64,
    max_abs_error_vs_plaintext: f64,
    predictions_agree: usize,
    /// Over the images whose predictions differ: the largest gap, in the reference's logits,
    /// between its top class and the encrypted prediction's class (0 when all agree). A gap
    /// below twice the max error is a near-tie that error can flip, not a wrong computation.
    largest_reference_gap_of_a_disagreement: f64,
}

pub fn run(args: &InferenceBenchArgs) -> Result<()> {
    let (dir, model) = crate::models::load(&args.model)?;
    if let Some(data) = args.data.as_ref().filter(|d| !d.is_dir()) {
        anyhow::bail!("--data {} is not a directory", data.display());
    }
    let t = Instant::now();
    let (params, plan) = Plan::choose_with(
        &model,
        crate::plan_cmd::winograd_min_channels(args.winograd),
    )
    .context("planning")?;
    let plan_s = t.elapsed().as_secs_f64();
    let batch = match args.batch.as_str() {
        "full" => params.slots(),
        b => b
            .parse::<usize>()
            .context("--batch takes a number or `full`")?
            .clamp(1, params.slots()),
    };
    eprintln!(
        "{}: N = {}, depth {}, batch {batch}, {} threads, {} kernels",
        dir.display(),
        params.n(),
        plan.depth,
        rayon::current_num_threads(),
        beaa_ckks::arith::kernels::kernel_path()
    );
    let work = WorkDir::new(args.work_dir.as_deref(), "bench");
    let journal_path = work.path.join(JOURNAL_FILE);
    let keys_dir = work.path.join(KEYS_DIR);
    let job = format!(
        "model {}, winograd {:?}, batch {batch}, data {:?}, params {}",
        dir.display(),
        crate::plan_cmd::winograd_min_channels(args.winograd),
        args.data,
        crate::serve::util::hex(params.fingerprint())
    );
    let previous = if args.resume {
        Journal::load(&journal_path)?
    } else {
        if journal_path.exists() {
            bail!(
                "{} holds a resumable bench: pass --resume to continue it, or remove it",
                work.path.display()
            );
        }
        None
    };
    if let Some(j) = &previous {
        if j.job != job {
            bail!(
                "{} holds another bench ({}); this one is {job}",
                work.path.display(),
                j.job
            );
        }
    }
    let t = Instant::now();
    let keys = match &previous {
        Some(_) => keygen::load(&keys_dir, &params)?
            .with_context(|| format!("the bench's keys are missing from {}", keys_dir.display()))?,
        None => {
            let keys = keygen::generate(&params);
            if args.resume {
                // A new resumable job: whatever tiles or inputs the directory holds were
                // made under other keys.
                for sub in ["inputs", "tiles"] {
                    match std::fs::remove_dir_all(work.path.join(sub)) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(e).context("clearing the work directory")
                        }
                        _ => {}
                    }
                }
                keygen::save(&keys_dir, &args.model, &params, false, &keys)?;
            }
            keys
        }
    };
    let ClientKeys { sk, rlk_bytes } = keys;
    let rlk = RelinKey::from_bytes(&params, &rlk_bytes)?;
    let keygen_s = t.elapsed().as_secs_f64();

    let per = model.input_len();
    let (images, inputs) = match &args.data {
        // Real images, repeated to fill the batch.
        Some(data) => {
            let (labels, real, _) = beaa_model::eval::load_labelled(&model, data, 0)
                .with_context(|| format!("loading --data {}", data.display()))?;
            if labels.is_empty() {
                anyhow::bail!("--data {}: no images", data.display());
            }
            let images: Vec<f64> = real
                .chunks(per)
                .cycle()
                .take(batch)
                .flatten()
                .copied()
                .collect();
            let what = format!("{} ({} images, repeated)", data.display(), labels.len());
            (images, what)
        }
        // Random normalized images (public test data, not keys).
        None => {
            let images = beaa_model::testing::random_pixels(batch * per, 0x9e3779b97f4a7c15);
            (
                images,
                "random normalized pixels, uniform in [-1.5, 1.5]".to_string(),
            )
        }
    };
    let start = previous.unwrap_or(Journal {
        job: job.clone(),
        ..Journal::default()
    });
    if args.resume && start.runs > 0 {
        eprintln!(
            "resuming the bench in {} (run {}; {:.0} s of evaluation so far)",
            work.path.display(),
            start.runs + 1,
            start.eval_s
        );
    }
    let run = run_encrypted(
        &model,
        &params,
        &plan,
        &sk,
        &rlk,
        &images,
        batch,
        &work.path,
        args.resume.then_some((journal_path.as_path(), &start)),
    )?;
    // Over every run of the job: the journal's sums, or this run alone.
    let done = match args.resume {
        true => Journal::load(&journal_path)?.context("the journal vanished")?,
        false => Journal {
            job,
            runs: 1,
            inputs_written: true,
            encrypt_s: run.encrypt_s,
            eval_s: run.eval_s,
            per_stage_s: run.per_stage_s.clone(),
            op_thread_s: run
                .op_thread_s
                .iter()
                .map(|(k, s)| (k.to_string(), *s))
                .collect(),
            work_dir_peak_bytes: run.work_dir_peak_bytes,
            peak_rss_bytes: peak_rss_bytes(),
            poly_bytes_peak_by_stage: run.poly_bytes_peak_by_stage.clone(),
        },
    };
    if args.resume {
        // The job is over: its inputs, tiles, secret key and journal go.
        for sub in ["inputs", "tiles", KEYS_DIR] {
            std::fs::remove_dir_all(work.path.join(sub)).ok();
        }
        std::fs::remove_file(&journal_path).ok();
    }
    let (encrypt_s, total_s) = (done.encrypt_s, done.eval_s);
    for (name, secs) in &done.per_stage_s {
        let poly = done
            .poly_bytes_peak_by_stage
            .iter()
            .find(|(n, _)| n == name)
            .map_or(String::new(), |(_, b)| {
                format!(", polynomials alive at most {:.2} GB", *b as f64 / 1e9)
            });
        eprintln!("  {name:<24} {secs:>9.2} s{poly}");
    }
    let per_layer = done.per_stage_s.clone();
    let busy: f64 = done.op_thread_s.iter().map(|(_, s)| s).sum();
    for (op, secs) in &done.op_thread_s {
        eprintln!(
            "  {op:<24} {secs:>9.2} thread-s ({:.1}%)",
            100.0 * secs / busy.max(1e-9)
        );
    }

    // Check against the plaintext reference on the same images (in parallel: at full width
    // this single-threaded f64 pass took longer than a stage).
    const CHUNK: usize = 256;
    let want: Vec<f64> = images
        .par_chunks(CHUNK * per)
        .map(|chunk| model.forward(chunk, chunk.len() / per))
        .collect::<Result<Vec<_>, _>>()?
        .concat();
    let classes = model.manifest.classes.len();
    let calibrated = model.logit_calibration();
    let outside = want
        .chunks(classes)
        .filter(|row| calibrated.is_some_and(|c| outside_calibration(row, c)))
        .count();
    let (mut max_err, mut agree, mut worst_gap) = (0.0f64, 0usize, 0.0f64);
    for (b, got) in run.logits.iter().enumerate() {
        let row = &want[b * classes..(b + 1) * classes];
        for (g, w) in got.iter().zip(row) {
            max_err = max_err.max((g - w).abs());
        }
        let (enc, plain) = (argmax(got), argmax(row));
        if enc == plain {
            agree += 1;
        } else {
            worst_gap = worst_gap.max(row[plain] - row[enc]);
        }
    }
    let report = Report {
        model: dir.display().to_string(),
        n: params.n(),
        batch,
        threads: rayon::current_num_threads(),
        runs: done.runs,
        kernels: beaa_ckks::arith::kernels::kernel_path(),
        winograd_layers: plan
            .winograd_layers()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        gemm_multiply_adds: (0..plan.graph.layers.len())
            .map(|l| plan.graph.multiply_adds(l))
            .sum::<u64>()
            * params.n() as u64,
        keygen_s,
        encrypt_s,
        total_s,
        amortized_ms: total_s * 1e3 / batch as f64,
        peak_rss_bytes: done.peak_rss_bytes.max(peak_rss_bytes()),
        work_dir_peak_bytes: done.work_dir_peak_bytes,
        poly_bytes_peak_by_stage: done.poly_bytes_peak_by_stage.clone(),
        per_layer_s: per_layer,
        thread_s_by_op: done.op_thread_s.clone(),
        inputs,
        inputs_outside_calibrated_range: outside,
        squares: plan.squares(),
        relinearizations: plan.relinearizations(),
        plan_s,
        max_abs_error_vs_plaintext: max_err,
        predictions_agree: agree,
        largest_reference_gap_of_a_disagreement: worst_gap,
    };
    eprintln!(
        "total {:.2} s for {batch} images: {:.3} ms/image; peak RSS {:.2} GB; work dir {:.2} GB at most; max |enc - plain| {:.2e}; {agree}/{batch} predictions agree (largest reference gap of a disagreement {worst_gap:.2e})",
        report.total_s,
        report.amortized_ms,
        report.peak_rss_bytes as f64 / 1e9,
        report.work_dir_peak_bytes as f64 / 1e9,
        max_err
    );
    if outside > 0 {
        eprintln!(
            "{outside} of {batch} inputs have reference logits beyond the calibrated range: they can overflow and garble the batch (try --data with real images)"
        );
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}
