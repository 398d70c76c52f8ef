//! `beaa eval`: accuracy of a model on a labelled image tree, on the plaintext f64 reference
//! path or (`--encrypted`) the real encrypted path: client keys, packing, encryption, the
//! engine, decryption - all in this process.

use crate::local_job::{argmax, run_encrypted, WorkDir};
use anyhow::{bail, Context, Result};
use beaa_ckks::KeyGenerator;
use beaa_engine::Plan;
use std::path::PathBuf;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// A shipped model (cifar10, octdl) or a model directory.
    #[arg(long)]
    pub model: String,
    /// A class-per-folder image tree, or the official CIFAR-10 binary batches.
    #[arg(long)]
    pub data: PathBuf,
    /// Evaluate at most K images, spread evenly over the data (0: all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Run the encrypted path (keys, encryption, encrypted network, decryption) and compare
    /// its predictions with the plaintext path.
    #[arg(long)]
    pub encrypted: bool,
    /// With --encrypted: small NOT SECURE parameters (N = 2048) for tests and CI.
    #[arg(long, requires = "encrypted")]
    pub insecure_test_params: bool,
    /// With --encrypted: where inputs and intermediate tiles go (default: a temp directory).
    #[arg(long, requires = "encrypted")]
    pub work_dir: Option<PathBuf>,
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let (_, model) = crate::models::load(&args.model)?;
    if !args.data.is_dir() {
        bail!("--data {} is not a directory", args.data.display());
    }
    let t = Instant::now();
    let (labels, images, skipped) =
        beaa_model::eval::load_labelled(&model, &args.data, args.limit)?;
    let n = labels.len();
    let per = model.input_len();
    let mut plain = Vec::with_capacity(n);
    for x in images.chunks(per) {
        plain.push(model.predict(x, 1)?[0]);
    }
    let mut encrypted = None;
    let predicted = if args.encrypted {
        let (params, plan) = if args.insecure_test_params {
            Plan::choose_insecure_for_tests(&model)
        } else {
            Plan::choose(&model)
        }
        .context("planning")?;
        eprintln!(
            "encrypted: N = {}, {} primes, {}; {n} images in {} job(s)",
            params.n(),
            params.q().len(),
            if params.is_secure() {
                "128-bit"
            } else {
                "NOT SECURE test parameters"
            },
            n.div_ceil(params.slots())
        );
        let mut kg = KeyGenerator::new(&params);
        let sk = kg.secret_key();
        let rlk = kg.relin_key(&sk);
        let work = WorkDir::new(args.work_dir.as_deref(), "eval");
        let run = run_encrypted(&model, &params, &plan, &sk, &rlk, &images, n, &work.path)?;
        let want = model.forward(&images, n)?;
        let k = model.manifest.classes.len();
        let max_err = run
            .logits
            .iter()
            .enumerate()
            .flat_map(|(b, got)| {
                got.iter()
                    .zip(&want[b * k..(b + 1) * k])
                    .map(|(g, w)| (g - w).abs())
            })
            .fold(0.0f64, f64::max);
        let pred: Vec<usize> = run.logits.iter().map(|l| argmax(l)).collect();
        let agree = pred.iter().zip(&plain).filter(|(a, b)| a == b).count();
        eprintln!(
            "encrypted: {agree}/{n} predictions equal the plaintext ones; max |logit error| {max_err:.2e}; encrypt {:.1} s, evaluate {:.1} s",
            run.encrypt_s, run.eval_s
        );
        encrypted = Some((agree as f64 / n.max(1) as f64, max_err, params.is_secure()));
        pred
    } else {
        plain.clone()
    };
    let report = beaa_model::eval::report(&model, &labels, &predicted, skipped);
    let seconds = t.elapsed().as_secs_f64();
    eprintln!(
        "{}: {} images, accuracy {:.4}, balanced accuracy {:.4} ({:.1} s)",
        report.model, report.images, report.accuracy, report.balanced_accuracy, seconds
    );
    for (class, recall) in &report.per_class_recall {
        match recall {
            Some(r) => eprintln!("  {class:<16} recall {r:.4}"),
            None => eprintln!("  {class:<16} (absent from the data)"),
        }
    }
    if args.json {
        let recall: serde_json::Map<String, serde_json::Value> = report
            .per_class_recall
            .iter()
            .map(|(c, r)| (c.clone(), serde_json::json!(r)))
            .collect();
        let mut out = serde_json::json!({
                "model": report.model,
                "n": report.images,
                "accuracy": report.accuracy,
                "balanced_accuracy": report.balanced_accuracy,
                "per_class_recall": recall,
                "confusion": report.confusion,
                "skipped": report.skipped,
                "encrypted": args.encrypted,
                "seconds": seconds,
        });
        if let Some((agreement, max_err, secure)) = encrypted {
            out["agreement_with_plaintext"] = serde_json::json!(agreement);
            out["max_abs_logit_error"] = serde_json::json!(max_err);
            out["params_128_bit"] = serde_json::json!(secure);
        }
        println!("{out}");
    }
    Ok(())
}
