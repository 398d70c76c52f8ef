//! `beaa eval`: accuracy of a model on a labelled image tree, on the plaintext f64 reference
//! path or (`--encrypted`) the real encrypted path: client keys, packing, encryption, the
//! engine, decryption - all in this process.

use crate::local_job::{run_encrypted, WorkDir};
use anyhow::{bail, Context, Result};
use beaa_ckks::KeyGenerator;
use beaa_engine::Plan;
use beaa_model::range::{outside_calibration, BEYOND_CALIBRATION};
use beaa_model::scores::argmax;
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
    /// With --encrypted: compute the 3x3 convolutions over at least MIN_CHANNELS input channels
    /// (default `beaa_engine::WINOGRAD_MIN_CHANNELS`) in Winograd's F(2x2, 3x3) form (about
    /// half their GEMM work; each weight's precision shared with the activation's factor).
    #[arg(long, requires = "encrypted", value_name = "MIN_CHANNELS", num_args = 0..=1)]
    pub winograd: Option<Option<usize>>,
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
    let k = model.manifest.classes.len();
    let mut plain = Vec::with_capacity(n);
    let mut observed = RangeReport::default();
    let calibrated = model.logit_calibration();
    let mut outside = 0usize;
    for x in images.chunks(per) {
        let logits = model.forward_observe(x, 1, &mut |node, y| observed.see(&node.name, y))?;
        let logits = &logits[..k];
        plain.push(argmax(logits));
        observed.image(logits);
        outside += calibrated.is_some_and(|c| outside_calibration(logits, c)) as usize;
    }
    let ranges = observed.against(&model);
    let mut encrypted = None;
    let predicted = if args.encrypted {
        let (params, plan) = if args.insecure_test_params {
            Plan::choose_insecure_for_tests_with(
                &model,
                crate::plan_cmd::winograd_min_channels(args.winograd),
            )
        } else {
            Plan::choose_with(
                &model,
                crate::plan_cmd::winograd_min_channels(args.winograd),
            )
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
        let run = run_encrypted(
            &model, &params, &plan, &sk, &rlk, &images, n, &work.path, None,
        )?;
        let want = model.forward(&images, n)?;
        // Per image: the largest absolute error, and that error relative to the image's own
        // largest |logit| (at least 1), so one exploded outlier image does not mask how
        // precise the ordinary images are.
        let (max_err, max_rel_err) =
            run.logits
                .iter()
                .enumerate()
                .fold((0.0f64, 0.0f64), |(abs, rel), (b, got)| {
                    let want = &want[b * k..(b + 1) * k];
                    let e = got
                        .iter()
                        .zip(want)
                        .map(|(g, w)| (g - w).abs())
                        .fold(0.0f64, f64::max);
                    let size = want.iter().fold(1.0f64, |m, w| m.max(w.abs()));
                    (abs.max(e), rel.max(e / size))
                });
        let pred: Vec<usize> = run.logits.iter().map(|l| argmax(l)).collect();
        let agree = pred.iter().zip(&plain).filter(|(a, b)| a == b).count();
        eprintln!(
            "encrypted: {agree}/{n} predictions equal the plaintext ones; max |logit error| {max_err:.2e} (relative to the image's largest |logit|: {max_rel_err:.2e}); encrypt {:.1} s, evaluate {:.1} s",
            run.encrypt_s, run.eval_s
        );
        // Where the encrypted time went, so a side-by-side of two plans (e.g. `--winograd`)
        // can be read per stage and per kind of operation, as `bench inference` reports it.
        let timing = serde_json::json!({
            "encrypt_s": run.encrypt_s,
            "eval_s": run.eval_s,
            "per_stage_s": run.per_stage_s,
            "thread_s_by_op": run.op_thread_s,
            "work_dir_peak_bytes": run.work_dir_peak_bytes,
            "peak_rss_bytes": crate::local_job::peak_rss_bytes(),
            "poly_bytes_peak_by_stage": run.poly_bytes_peak_by_stage,
        });
        // Added to the report as they are: how the encrypted predictions and logits compare
        // with the plaintext ones, and where the time went.
        encrypted = Some(serde_json::json!({
            "agreement_with_plaintext": agree as f64 / n.max(1) as f64,
            "max_abs_logit_error": max_err,
            "max_rel_logit_error": max_rel_err,
            "params_128_bit": params.is_secure(),
            "timing": timing,
        }));
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
    eprintln!(
        "largest |logit| {:.4} (per image: median {:.3}, 99th percentile {:.3}); largest value relative to the calibration ranges the plan is built on: {:.2}x at {} (log2 {:.1})",
        ranges.max_abs_logit,
        ranges.logit_quantiles[0],
        ranges.logit_quantiles[1],
        ranges.worst_ratio,
        ranges.worst_node,
        ranges.worst_ratio.log2()
    );
    eprintln!(
        "smallest gap between an image's two largest logits {:.3e}; images with a gap under 1e-4 / 1e-3 / 1e-2 (a logit error that large could change their prediction): {} / {} / {}",
        ranges.min_margin, ranges.margins_below[0], ranges.margins_below[1], ranges.margins_below[2]
    );
    if outside > 0 {
        eprintln!(
            "{outside} image(s) have logits beyond {}x the calibrated range (their predictions are unreliable; in an encrypted batch they can corrupt the others, see `beaa plan` headroom)",
            BEYOND_CALIBRATION
        );
    }
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
                "max_abs_logit": ranges.max_abs_logit,
                "outside_calibrated_range": outside,
                "max_abs_logit_quantiles": {
                    "p50": ranges.logit_quantiles[0],
                    "p99": ranges.logit_quantiles[1],
                    "p99.9": ranges.logit_quantiles[2],
                },
                "range_excess": {
                    "node": ranges.worst_node,
                    "ratio": ranges.worst_ratio,
                    "log2": ranges.worst_ratio.log2(),
                },
                "top2_margin": {
                    "min": ranges.min_margin,
                    "below_1e-4": ranges.margins_below[0],
                    "below_1e-3": ranges.margins_below[1],
                    "below_1e-2": ranges.margins_below[2],
                },
        });
        if let Some(serde_json::Value::Object(fields)) = encrypted {
            for (key, value) in fields {
                out[key] = value;
            }
        }
        println!("{out}");
    }
    Ok(())
}

/// Largest |value| per node over the evaluated images (plaintext path).
#[derive(Default)]
struct RangeReport {
    max_abs: std::collections::BTreeMap<String, f64>,
    /// Per image: its largest |logit|.
    per_image: Vec<f64>,
    /// Per image: its largest logit minus its second largest, the logit error that could
    /// change its prediction (how much encryption noise or weight rounding it tolerates).
    margins: Vec<f64>,
}

/// How far the evaluated images went beyond the calibration ranges in the manifest, which
/// the encryption plan's headroom is computed from (`beaa plan`, "headroom").
struct RangeSummary {
    max_abs_logit: f64,
    /// Median, 99th and 99.9th percentile of the images' largest |logit|.
    logit_quantiles: [f64; 3],
    /// Node whose observed max |value| is largest relative to its calibrated max |value|.
    worst_node: String,
    worst_ratio: f64,
    /// The smallest top-two margin, and how many images have one below 1e-4, 1e-3, 1e-2.
    min_margin: f64,
    margins_below: [usize; 3],
}

/// Thresholds of `RangeSummary::margins_below`.
const MARGIN_THRESHOLDS: [f64; 3] = [1e-4, 1e-3, 1e-2];

/// Largest minus second largest logit (infinite with fewer than two classes).
fn top2_margin(logits: &[f64]) -> f64 {
    let (mut first, mut second) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    for &v in logits {
        if v > first {
            second = first;
            first = v;
        } else if v > second {
            second = v;
        }
    }
    first - second
}

impl RangeReport {
    fn see(&mut self, node: &str, y: &[f64]) {
        let m = y.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let e = self.max_abs.entry(node.to_string()).or_insert(0.0);
        *e = e.max(m);
    }

    fn image(&mut self, logits: &[f64]) {
        self.per_image
            .push(logits.iter().fold(0.0f64, |m, v| m.max(v.abs())));
        self.margins.push(top2_margin(logits));
    }

    fn against(&self, model: &beaa_model::Model) -> RangeSummary {
        let mut sorted = self.per_image.clone();
        sorted.sort_by(f64::total_cmp);
        let q = |p: f64| {
            sorted
                .get(((sorted.len() as f64 - 1.0) * p).round() as usize)
                .copied()
                .unwrap_or(0.0)
        };
        let mut out = RangeSummary {
            logit_quantiles: [q(0.5), q(0.99), q(0.999)],
            max_abs_logit: sorted.last().copied().unwrap_or(0.0),
            worst_node: String::new(),
            worst_ratio: 0.0,
            min_margin: self.margins.iter().copied().fold(f64::INFINITY, f64::min),
            margins_below: MARGIN_THRESHOLDS
                .map(|t| self.margins.iter().filter(|&&m| m < t).count()),
        };
        for (node, &seen) in &self.max_abs {
            let Some(r) = model.manifest.ranges.get(node) else {
                continue;
            };
            let ratio = seen / r.max_abs.max(f64::MIN_POSITIVE);
            if ratio > out.worst_ratio {
                out.worst_ratio = ratio;
                out.worst_node = node.clone();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::top2_margin;

    #[test]
    fn top2_margin_is_the_gap_between_the_two_largest() {
        assert_eq!(top2_margin(&[0.5, 3.0, -1.0, 2.75]), 0.25);
        assert_eq!(top2_margin(&[3.0, 0.5, 2.0]), 1.0);
        // a tie leaves no margin at all
        assert_eq!(top2_margin(&[1.0, 4.0, 4.0]), 0.0);
        assert_eq!(top2_margin(&[7.0]), f64::INFINITY);
    }
}
