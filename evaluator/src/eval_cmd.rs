//! `beaa eval`: accuracy of a model on a labelled image tree (plaintext reference path).

use anyhow::{bail, Result};
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
}

pub fn run(args: &EvalArgs) -> Result<()> {
    let (_, model) = crate::models::load(&args.model)?;
    if !args.data.is_dir() {
        bail!("--data {} is not a directory", args.data.display());
    }
    let t = Instant::now();
    let report = beaa_model::eval::evaluate_dir(&model, &args.data, args.limit)?;
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
        println!(
            "{}",
            serde_json::json!({
                "model": report.model,
                "n": report.images,
                "accuracy": report.accuracy,
                "balanced_accuracy": report.balanced_accuracy,
                "per_class_recall": recall,
                "confusion": report.confusion,
                "skipped": report.skipped,
                "encrypted": false,
                "seconds": seconds,
            })
        );
    }
    Ok(())
}
