//! The export / evaluate / table subcommands of `beaa-train`.

use crate::data::{split, Dataset, Fold, SplitKind};
use crate::export::{activation_parameters, chw_inputs, export_run};
use crate::net::ActKind;
use crate::train::{
    load_data, load_run, summarize, TrainConfig, TrainState, CLIP_NORM, KD_ALPHA, KD_TEMPERATURE,
    STUDENT_LR,
};
use anyhow::{bail, Context, Result};
use beaa_model::Model;
use candle_core::Device;
use serde_json::json;
use std::path::{Path, PathBuf};

/// Exports the run's checkpoint to `out`; returns a short summary.
pub fn export(
    run: &Path,
    out: &Path,
    name: Option<String>,
    range_images: usize,
) -> Result<serde_json::Value> {
    let dev = Device::Cpu;
    let (mut cfg, mut net) = load_run(run, &dev)?;
    let state: TrainState = serde_json::from_str(
        &std::fs::read_to_string(run.join("state.json")).context("state.json")?,
    )?;
    // no change for a finished epoch; needed when exporting a mid-epoch checkpoint of a
    // polynomial net
    let (train, last_val) = recalibrate_and_validate(&mut cfg, &mut net, &dev)?;
    let name = name.unwrap_or_else(|| {
        run.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("model")
            .to_string()
    });
    // validation of exactly the exported weights and batch-norm statistics
    let mut state = state;
    state.last_val = Some(last_val);
    let mut model = export_run(&net, &cfg, &state, &train, &name, range_images)?;
    if let Some(m) = model.manifest.metrics.as_object_mut() {
        m.insert("note".into(), json!("validation measured at export by beaa-train (candle, eval mode) on the exported weights"));
        m.insert("split".into(), json!({"kind": cfg.split, "val_per_class": cfg.val_per_class, "val_fraction": cfg.val_fraction, "seed": cfg.seed, "fold": cfg.fold}));
    }
    model.save(out)?;
    Ok(
        json!({"name": name, "epochs": state.epoch, "planned_epochs": cfg.epochs, "validation": state.last_val,
        "activation_parameters": model.manifest.activation_parameters, "activation_evaluations": model.manifest.activation_evaluations}),
    )
}

/// Loads the run's data, re-estimates batch norm as at the end of an epoch and validates:
/// the validation of exactly the weights and statistics that will be written. Returns the
/// training split (for value ranges) and the result.
fn recalibrate_and_validate(
    cfg: &mut TrainConfig,
    net: &mut crate::net::Net,
    dev: &Device,
) -> Result<(Dataset, crate::train::EvalResult)> {
    let (train, val) = load_data(cfg)?;
    crate::train::calibrate(net, &train, &cfg.input, cfg.bn_calibration_images, dev)?;
    let v = crate::train::evaluate(net, &val, &cfg.input, dev)?;
    Ok((train, v))
}

/// The settings two runs must share for their weights to be averaged: the network, its
/// input, the data and the split (a mean of runs validated on different images would be
/// scored on images some of them trained on).
fn averaging_key(cfg: &TrainConfig) -> Result<String> {
    Ok(json!({
        "arch": cfg.arch, "act": cfg.act, "input": cfg.input, "data": cfg.data,
        "split": cfg.split, "val_per_class": cfg.val_per_class, "val_fraction": cfg.val_fraction,
        "seed": cfg.seed, "fold": cfg.fold, "poly_channel_share": cfg.poly_channel_share,
    })
    .to_string())
}

/// Weight averaging (as in stochastic weight averaging): the mean of the final weights of
/// runs that trained the same network on the same split, e.g. snapshots at the ends of
/// learning-rate cycles from one model, which sit close together in weight space; such a
/// mean often generalizes better than its members (it did not for our CIFAR-10 fine-tunings:
/// models/README.md, "One more cosine cycle, and weight averaging"). Batch norm is re-estimated as at an epoch's end, the result is
/// validated, and `out` becomes a finished run directory (config of the last run with
/// `averaged_from`, state, weights; no momentum) that `export`, `table`, `compare` (once
/// exported) and `--init-from` read like any other. Returns a summary.
pub fn average(runs: &[PathBuf], out: &Path) -> Result<serde_json::Value> {
    if runs.len() < 2 {
        bail!("averaging needs at least two runs, got {}", runs.len());
    }
    if out.join("checkpoint.safetensors").exists() {
        bail!(
            "{} already holds a checkpoint; choose a new directory",
            out.display()
        );
    }
    let dev = Device::Cpu;
    let mut sum: std::collections::BTreeMap<String, candle_core::Tensor> = Default::default();
    let mut first_key: Option<String> = None;
    let mut last: Option<(TrainConfig, crate::net::Net)> = None;
    for r in runs {
        let (cfg, net) = load_run(r, &dev)?;
        let key = averaging_key(&cfg)?;
        match &first_key {
            None => first_key = Some(key),
            Some(k) if *k != key => bail!(
                "{} trained another network, input, data or split than {}",
                r.display(),
                runs[0].display()
            ),
            _ => {}
        }
        let tensors = net.tensors();
        if !sum.is_empty() && !tensors.keys().eq(sum.keys()) {
            bail!(
                "{} holds other tensors than {}",
                r.display(),
                runs[0].display()
            );
        }
        for (k, t) in tensors {
            let t = t.to_dtype(candle_core::DType::F64)?;
            let acc = match sum.remove(&k) {
                Some(a) => (a + t)?,
                None => t,
            };
            sum.insert(k, acc);
        }
        last = Some((cfg, net));
    }
    let (mut cfg, mut net) = last.expect("at least two runs");
    let last_run = &runs[runs.len() - 1];
    let last_state: TrainState = serde_json::from_str(
        &std::fs::read_to_string(last_run.join("state.json"))
            .with_context(|| format!("{}/state.json", last_run.display()))?,
    )?;
    let n = runs.len() as f64;
    let mean: std::collections::HashMap<String, candle_core::Tensor> = sum
        .into_iter()
        .map(|(k, t)| Ok((k, (t / n)?.to_dtype(candle_core::DType::F32)?)))
        .collect::<Result<_>>()?;
    net.load_from(&mean)?;
    let (_, v) = recalibrate_and_validate(&mut cfg, &mut net, &dev)?;
    cfg.averaged_from = runs.to_vec();
    let state = TrainState {
        epoch: cfg.epochs,
        step: 0,
        last_val: Some(v.clone()),
        seconds: 0.0,
        range_bounds: last_state.range_bounds,
    };
    std::fs::create_dir_all(out)?;
    std::fs::write(out.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    let weights: std::collections::HashMap<String, candle_core::Tensor> =
        net.tensors().into_iter().collect();
    candle_core::safetensors::save(&weights, out.join("checkpoint.safetensors"))?;
    std::fs::write(
        out.join("state.json"),
        serde_json::to_string_pretty(&state)?,
    )?;
    let summary = json!({"event": "average", "runs": runs, "val": v});
    std::fs::write(out.join("log.jsonl"), format!("{summary}\n"))?;
    Ok(summary)
}

/// The validation split a model's manifest records, decoded with the defaults of manifests
/// that predate a field (`fold` absent or `null`: no fold). Two models validate on the same
/// images exactly when these are equal.
#[derive(Debug, PartialEq)]
struct RecordedSplit {
    kind: SplitKind,
    val_per_class: usize,
    val_fraction: f64,
    seed: u64,
    fold: Option<Fold>,
}

impl RecordedSplit {
    fn of(model: &Model) -> Result<Self> {
        Self::from_json(&model.manifest.metrics["split"])
    }

    fn from_json(s: &serde_json::Value) -> Result<Self> {
        Ok(RecordedSplit {
            kind: serde_json::from_value(s["kind"].clone())
                .context("manifest has no recorded split")?,
            val_per_class: s["val_per_class"].as_u64().unwrap_or(500) as usize,
            val_fraction: s["val_fraction"].as_f64().unwrap_or(0.25),
            seed: s["seed"].as_u64().unwrap_or(0),
            fold: serde_json::from_value(s["fold"].clone()).unwrap_or(None),
        })
    }

    /// Indices of the validation images of `ds`.
    fn validation(&self, ds: &Dataset) -> Vec<usize> {
        let s = self;
        split(ds, s.kind, s.val_per_class, s.val_fraction, s.seed, s.fold).1
    }
}

/// Each image's (true class, predicted class), as indices into the model's classes, with the
/// plaintext f64 forward pass: every image of `data` (`which` = "all") or the validation split
/// recorded in the model's manifest ("val"), at most `limit` of them spread over the set.
fn labelled_predictions(
    model: &Model,
    data: &Path,
    which: &str,
    limit: usize,
) -> Result<Vec<(usize, usize)>> {
    let spec = model.manifest.input.clone();
    let ds = Dataset::load(data, &spec)?;
    // map the data's class folders onto the model's classes by name
    let map: Vec<usize> = ds
        .classes
        .iter()
        .map(|c| {
            model
                .manifest
                .classes
                .iter()
                .position(|m| m == c)
                .with_context(|| {
                    format!(
                        "class {c} of the data is not a class of the model {:?}",
                        model.manifest.classes
                    )
                })
        })
        .collect::<Result<_>>()?;
    let mut idx: Vec<usize> = match which {
        "all" => (0..ds.len()).collect(),
        "val" => RecordedSplit::of(model)?.validation(&ds),
        other => bail!("--split must be all or val, got {other}"),
    };
    if limit > 0 && idx.len() > limit {
        // spread over the set so every class is represented
        let n = idx.len();
        idx = (0..limit).map(|i| idx[i * n / limit]).collect();
    }
    let mut out = Vec::with_capacity(idx.len());
    for chunk in idx.chunks(64) {
        let x = chw_inputs(&ds, chunk, &spec)?;
        let pred = model.predict(&x, chunk.len())?;
        for (&i, p) in chunk.iter().zip(pred) {
            out.push((map[ds.labels[i] as usize], p));
        }
    }
    Ok(out)
}

/// Plaintext f64 evaluation of a model directory on a data directory.
pub fn evaluate(
    model_dir: &Path,
    data: &Path,
    which: &str,
    limit: usize,
) -> Result<serde_json::Value> {
    let model = Model::load(model_dir)?;
    let k = model.manifest.classes.len();
    let t = std::time::Instant::now();
    let mut conf = vec![vec![0usize; k]; k];
    for (label, pred) in labelled_predictions(&model, data, which, limit)? {
        conf[label][pred] += 1;
    }
    let r = summarize(conf, f64::NAN);
    Ok(
        json!({"model": model.manifest.name, "data": data.display().to_string(), "split": which, "images": r.n,
        "accuracy": r.accuracy, "balanced_accuracy": r.balanced_accuracy,
        "per_class_recall": model.manifest.classes.iter().zip(&r.per_class_recall).map(|(c, v)| json!({"class": c, "recall": if v.is_nan() { None } else { Some(*v) }})).collect::<Vec<_>>(),
        "confusion": r.confusion, "seconds": t.elapsed().as_secs_f64(), "path": "plaintext f64 (beaa-model)"}),
    )
}

/// Two models on the same images, paired: how many each gets right that the other gets
/// wrong, and McNemar's exact test of "equally accurate". Why: on 5,000 validation images
/// one accuracy's standard error is ~0.5 points, but two models of one recipe agree on most
/// images, so the paired test separates much smaller differences than two error bars can.
/// With `which` = "val" both models must record the same validation split.
pub fn compare(
    a_dir: &Path,
    b_dir: &Path,
    data: &Path,
    which: &str,
    limit: usize,
) -> Result<serde_json::Value> {
    let a = Model::load(a_dir)?;
    let b = Model::load(b_dir)?;
    if a.manifest.classes != b.manifest.classes {
        bail!(
            "the models have different classes: {:?} and {:?}",
            a.manifest.classes,
            b.manifest.classes
        );
    }
    if which == "val" && RecordedSplit::of(&a)? != RecordedSplit::of(&b)? {
        bail!(
            "the models recorded different validation splits ({} and {}): one's validation \
             images may be the other's training images",
            a.manifest.metrics["split"],
            b.manifest.metrics["split"]
        );
    }
    let pa = labelled_predictions(&a, data, which, limit)?;
    let pb = labelled_predictions(&b, data, which, limit)?;
    let c = PairedCounts::of(&pa, &pb)?;
    let n = pa.len() as f64;
    Ok(json!({
        "a": a.manifest.name, "b": b.manifest.name, "data": data.display().to_string(),
        "split": which, "images": pa.len(),
        "accuracy_a": (c.both + c.only_a) as f64 / n, "accuracy_b": (c.both + c.only_b) as f64 / n,
        "both_right": c.both, "only_a_right": c.only_a, "only_b_right": c.only_b, "neither_right": c.neither,
        "mcnemar_exact_p": mcnemar_exact_p(c.only_a, c.only_b),
    }))
}

/// Per image: both models right, only A, only B, neither.
#[derive(Debug, PartialEq)]
struct PairedCounts {
    both: usize,
    only_a: usize,
    only_b: usize,
    neither: usize,
}

impl PairedCounts {
    fn of(a: &[(usize, usize)], b: &[(usize, usize)]) -> Result<Self> {
        if a.len() != b.len() {
            bail!("{} predictions against {}", a.len(), b.len());
        }
        let mut c = PairedCounts {
            both: 0,
            only_a: 0,
            only_b: 0,
            neither: 0,
        };
        for (&(la, pa), &(lb, pb)) in a.iter().zip(b) {
            if la != lb {
                bail!("the models saw the images in different orders (labels {la} and {lb})");
            }
            match (pa == la, pb == lb) {
                (true, true) => c.both += 1,
                (true, false) => c.only_a += 1,
                (false, true) => c.only_b += 1,
                (false, false) => c.neither += 1,
            }
        }
        Ok(c)
    }
}

/// Two-sided exact McNemar p-value: the chance, if both models were equally accurate, that
/// the `only_a + only_b` images they disagree on would split at least this unevenly
/// (binomial, p = 1/2). Summed in log space, so thousands of discordant images do not
/// underflow.
fn mcnemar_exact_p(only_a: usize, only_b: usize) -> f64 {
    let n = only_a + only_b;
    let k = only_a.min(only_b);
    // ln C(n, i) 2^-n for i = 0..=k, by the ratio of consecutive terms.
    let mut terms = Vec::with_capacity(k + 1);
    let mut l = -(n as f64) * std::f64::consts::LN_2;
    terms.push(l);
    for i in 1..=k {
        l += ((n - i + 1) as f64 / i as f64).ln();
        terms.push(l);
    }
    let max = terms.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let tail = max.exp() * terms.iter().map(|t| (t - max).exp()).sum::<f64>();
    (2.0 * tail).min(1.0)
}

fn variant(cfg: &TrainConfig) -> String {
    let base = match cfg.act {
        ActKind::Relu => "ReLU",
        ActKind::Layer => "layer-wise",
        ActKind::Channel => "channel-wise",
        ActKind::Element => "element-wise",
    };
    let kd = if cfg.teacher.is_some() { " + KD" } else { "" };
    // How the quadratics started and trained (students only): it moves accuracy by points.
    let poly = cfg.act != ActKind::Relu;
    let mut how = Vec::new();
    if poly && cfg.poly_fit_progressive {
        how.push("progressive fit".to_string());
    }
    if poly && cfg.freeze_bn {
        how.push("frozen BN".to_string());
    }
    if poly && cfg.relu_blend_epochs > 0.0 {
        how.push(format!(
            "ReLU blended out over {} epochs",
            cfg.relu_blend_epochs
        ));
    }
    // an average's runs may have trained at different rates: its config is only the last one's
    if poly && cfg.lr != STUDENT_LR && cfg.averaged_from.is_empty() {
        how.push(format!("peak rate {}", cfg.lr));
    }
    if cfg.clip_norm != CLIP_NORM {
        how.push(format!("gradient clip {}", cfg.clip_norm));
    }
    if cfg.teacher.is_some() && (cfg.kd_alpha != KD_ALPHA || cfg.kd_temperature != KD_TEMPERATURE) {
        how.push(format!(
            "KD alpha {} T {}",
            cfg.kd_alpha, cfg.kd_temperature
        ));
    }
    if poly && cfg.range_penalty > 0.0 {
        how.push(format!("range penalty {}", cfg.range_penalty));
    }
    if poly && cfg.off_data_penalty > 0.0 {
        let mut what = format!("off-data penalty {}", cfg.off_data_penalty);
        if cfg.off_data_slack != 1.0 {
            what += &format!(" at {}x the bound", cfg.off_data_slack);
        }
        if cfg.off_data_kinds != crate::train::ProbeKind::all() {
            let kinds: Vec<String> = cfg
                .off_data_kinds
                .iter()
                .map(|k| format!("{k:?}").to_lowercase())
                .collect();
            what += &format!(" on {}", kinds.join("+"));
        }
        how.push(what);
    }
    if cfg.mixup > 0.0 {
        how.push(format!("mixup {}", cfg.mixup));
    }
    if cfg.feature_kd > 0.0 {
        how.push(format!("feature KD {}", cfg.feature_kd));
    }
    if poly && cfg.outlier_loss > 0.0 {
        how.push(format!("images over loss {} left out", cfg.outlier_loss));
    }
    if cfg.act == ActKind::Element && cfg.poly_channel_share {
        how.push("channel shares".to_string());
    }
    if cfg.act == ActKind::Element && cfg.poly_spread_decay > 0.0 {
        how.push(format!("spread decay {}", cfg.poly_spread_decay));
    }
    if !cfg.averaged_from.is_empty() {
        how.push(format!(
            "weights of {} runs averaged",
            cfg.averaged_from.len()
        ));
    }
    if how.is_empty() {
        format!("{base}{kd}")
    } else {
        format!("{base}{kd} ({})", how.join(", "))
    }
}

/// A run directory's name (its last path component), as the table shows it.
fn run_name(run: &Path) -> String {
    run.file_name().map_or_else(
        || run.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

/// What a run started from: `scratch`, or the run directory name of its starting weights (a
/// student's teacher, or another task's run marked `(pretrained)`); for folds the fold suffix `f<i>` becomes `f*` (each fold starts from
/// its own fold's teacher).
fn starts_from(cfg: &TrainConfig) -> String {
    if !cfg.averaged_from.is_empty() {
        let names: Vec<String> = cfg.averaged_from.iter().map(|r| run_name(r)).collect();
        return format!("mean of {}", names.join(" + "));
    }
    let Some(init) = cfg.init_from.as_ref().or(cfg.pretrained.as_ref()) else {
        return "scratch".into();
    };
    let pretrained = if cfg.init_from.is_none() {
        " (pretrained)"
    } else {
        ""
    };
    let name = run_name(init);
    let name = match cfg.fold {
        Some(f) => name
            .strip_suffix(&format!("f{}", f.index))
            .map_or(name.clone(), |stem| format!("{stem}f*")),
        None => name,
    };
    format!("{name}{pretrained}")
}

/// The settings that make runs folds of one cross-validated experiment: everything but the
/// fold index, the per-fold paths (data, teacher, starting weights) and the input
/// normalization (measured on each fold's own training images).
fn experiment_key(cfg: &TrainConfig) -> Result<String> {
    let mut v = serde_json::to_value(cfg)?;
    if let Some(m) = v.as_object_mut() {
        for k in ["fold", "data", "teacher", "init_from", "checkpoint_minutes"] {
            m.remove(k);
        }
        if let Some(input) = m.get_mut("input").and_then(|i| i.as_object_mut()) {
            input.remove("mean");
            input.remove("std");
        }
        m.insert("folds".into(), json!(cfg.fold.map(|f| f.count)));
    }
    Ok(v.to_string())
}

/// One table row before formatting: a run, or the pooled folds of one cross-validated
/// experiment (`folds` holds the fold indices seen; empty for a run without folds).
struct PooledRun {
    run: PathBuf,
    cfg: TrainConfig,
    state: TrainState,
    key: Option<String>,
    folds: std::collections::BTreeSet<usize>,
}

/// Pools the folds of cross-validated runs (same experiment key) into one result: their
/// confusion matrices summed, so every image is scored once by the run that never saw it.
/// Returns runs in first-seen order.
fn pool_folds(runs: &[PathBuf]) -> Result<Vec<PooledRun>> {
    let mut out: Vec<PooledRun> = Vec::new();
    for r in runs {
        let cfg: TrainConfig = serde_json::from_str(
            &std::fs::read_to_string(r.join("config.json"))
                .with_context(|| format!("{}/config.json", r.display()))?,
        )?;
        let state: TrainState = match std::fs::read_to_string(r.join("state.json")) {
            Ok(s) => serde_json::from_str(&s)?,
            Err(_) => TrainState::default(),
        };
        let key = cfg.fold.map(|_| experiment_key(&cfg)).transpose()?;
        let slot = key
            .as_ref()
            .and_then(|k| out.iter_mut().find(|p| p.key.as_ref() == Some(k)));
        let (Some(pooled), Some(fold)) = (slot, cfg.fold) else {
            out.push(PooledRun {
                run: r.clone(),
                folds: cfg.fold.map(|f| f.index).into_iter().collect(),
                cfg,
                state,
                key,
            });
            continue;
        };
        if !pooled.folds.insert(fold.index) {
            bail!(
                "{}: fold {} of this experiment given twice",
                r.display(),
                fold.index
            );
        }
        // a partly trained fold makes the whole row partly trained
        pooled.state.epoch = pooled.state.epoch.min(state.epoch);
        pooled.state.last_val = match (pooled.state.last_val.take(), state.last_val) {
            (Some(a), Some(b)) if a.confusion.len() == b.confusion.len() => {
                let conf = a
                    .confusion
                    .iter()
                    .zip(&b.confusion)
                    .map(|(x, y)| x.iter().zip(y).map(|(p, q)| p + q).collect())
                    .collect();
                Some(summarize(conf, a.loss * a.n as f64 + b.loss * b.n as f64))
            }
            _ => None,
        };
    }
    Ok(out)
}

/// Writes `<out>.md` and `<out>.json`; returns the markdown. Runs that are folds of one
/// cross-validated experiment (`--folds`) become one row with their pooled predictions.
/// `keep`: the rows of an earlier table's JSON, kept (run directories do not outlive a
/// machine) unless a run given here has the same path; rows stay grouped by data set.
pub fn table(runs: &[PathBuf], out: &Path, keep: Option<&Path>) -> Result<String> {
    let mut rows: Vec<serde_json::Value> = match keep {
        Some(p) => serde_json::from_str(
            &std::fs::read_to_string(p).with_context(|| format!("{}", p.display()))?,
        )
        .with_context(|| format!("{}: not a table's JSON rows", p.display()))?,
        None => Vec::new(),
    };
    for PooledRun {
        run: r,
        cfg,
        state,
        folds,
        ..
    } in pool_folds(runs)?
    {
        let pooled = folds.len().max(1);
        let evals: usize = cfg
            .arch
            .units()
            .iter()
            .filter(|u| u.act)
            .map(|u| u.cout * u.h * u.w)
            .sum();
        let v = state.last_val.as_ref();
        let mut name = variant(&cfg);
        let usual = crate::train::Preset::of_dataset(&cfg.dataset_name).default_input();
        if (cfg.input.height, cfg.input.width) != (usual.height, usual.width) {
            name.push_str(&format!(", {}x{} input", cfg.input.height, cfg.input.width));
        }
        if let Some(f) = cfg.fold {
            name.push_str(&format!(", {}-fold CV", f.count));
            if pooled != f.count {
                name.push_str(&format!(" ({pooled} of {} folds)", f.count));
            }
        }
        let run = r.display().to_string();
        rows.retain(|row| row["run"] != run.as_str());
        rows.push(json!({
            "run": run, "dataset": cfg.dataset_name, "variant": name, "folds_pooled": pooled,
            "starts_from": starts_from(&cfg),
            "epochs": state.epoch, "planned_epochs": cfg.epochs,
            "accuracy": v.map(|v| v.accuracy), "balanced_accuracy": v.map(|v| v.balanced_accuracy),
            "per_class_recall": v.map(|v| v.per_class_recall.clone()), "validation_images": v.map(|v| v.n),
            "activation_parameters": activation_parameters(&cfg.arch, cfg.act), "activation_evaluations": evals,
        }));
    }
    let mut datasets: Vec<serde_json::Value> = Vec::new();
    for r in &rows {
        if !datasets.contains(&r["dataset"]) {
            datasets.push(r["dataset"].clone());
        }
    }
    rows.sort_by_key(|r| datasets.iter().position(|d| *d == r["dataset"]));
    let pct = |v: &serde_json::Value| {
        v.as_f64()
            .map_or("-".to_string(), |x| format!("{:.2}", 100.0 * x))
    };
    let mut md = String::from("| data | variant | starts from | epochs | accuracy % | balanced acc. % | per-class recall % | activation params | activation evals / image |\n|---|---|---|---|---|---|---|---|---|\n");
    for r in &rows {
        let rec = r["per_class_recall"].as_array().map_or("-".into(), |a| {
            a.iter().map(&pct).collect::<Vec<_>>().join(" / ")
        });
        md.push_str(&format!(
            "| {} | {} | {} | {}/{} | {} | {} | {} | {} | {} |\n",
            r["dataset"].as_str().unwrap_or(""),
            r["variant"].as_str().unwrap_or(""),
            r["starts_from"].as_str().unwrap_or("-"),
            r["epochs"],
            r["planned_epochs"],
            pct(&r["accuracy"]),
            pct(&r["balanced_accuracy"]),
            rec,
            r["activation_parameters"],
            r["activation_evaluations"]
        ));
    }
    md.push_str(
        "\nValidation splits: CIFAR-10 = the last 500 training images of each class (5,000, never trained on); \
         OCT = all images of 25% of the patients of each class (seeded), unseen in training; \
         OCT rows marked K-fold CV pool K runs, each validated on its own fold of the patients, so every image is scored once. \
         Per-class recall in class order (CIFAR-10: airplane ... truck; OCT: ERM / NO). \
         Starts from: the run whose weights a run started from (a student's teacher; `f*`: each fold its own fold's), or scratch. \
         Activation parameters count the trainable (a, b, c) triples: 3 per layer, channel or element. \
         Epochs done / planned: fewer done = partially trained (an average of runs: the last run's). Regenerate with `beaa-train table RUN_DIR... --out PREFIX` (`--keep PREFIX.json` keeps earlier rows whose runs are not on this machine).\n",
    );
    std::fs::write(out.with_extension("md"), &md)?;
    std::fs::write(
        out.with_extension("json"),
        serde_json::to_string_pretty(&rows)?,
    )?;
    Ok(md)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::{
        summarize,
        tests::{fresh_tiny_data, tiny_config},
    };

    fn write_run(dir: &Path, cfg: &TrainConfig, epoch: usize, conf: Vec<Vec<usize>>) -> Result<()> {
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("config.json"), serde_json::to_string(cfg)?)?;
        let state = TrainState {
            epoch,
            last_val: Some(summarize(conf, 0.0)),
            ..TrainState::default()
        };
        std::fs::write(dir.join("state.json"), serde_json::to_string(&state)?)?;
        Ok(())
    }

    #[test]
    fn mcnemar_exact_p_matches_the_binomial_tail() {
        // n = 10 discordant images split 3 / 7: 2 * (1 + 10 + 45 + 120) / 1024.
        assert!((mcnemar_exact_p(3, 7) - 0.34375).abs() < 1e-12);
        assert!((mcnemar_exact_p(10, 0) - 2.0 / 1024.0).abs() < 1e-12);
        assert_eq!(mcnemar_exact_p(5, 5), 1.0);
        assert_eq!(mcnemar_exact_p(0, 0), 1.0);
        // Thousands of discordant images: no underflow, symmetric, tiny for a lopsided split.
        let p = mcnemar_exact_p(1200, 1000);
        assert!(p > 1e-6 && p < 1e-4, "{p}");
        assert_eq!(p, mcnemar_exact_p(1000, 1200));
        assert!(mcnemar_exact_p(3000, 1000) < 1e-200);
    }

    #[test]
    fn paired_counts_need_the_same_images_in_the_same_order() -> Result<()> {
        let a = [(0, 0), (1, 1), (1, 0), (0, 1)];
        let b = [(0, 0), (1, 0), (1, 1), (0, 1)];
        let c = PairedCounts::of(&a, &b)?;
        assert_eq!(
            c,
            PairedCounts {
                both: 1,
                only_a: 1,
                only_b: 1,
                neither: 1
            }
        );
        assert!(PairedCounts::of(&a, &b[..3]).is_err());
        assert!(PairedCounts::of(&a, &[(1, 0), (1, 1), (1, 0), (0, 1)]).is_err());
        Ok(())
    }

    #[test]
    fn a_null_field_of_a_split_equals_an_absent_one() -> Result<()> {
        let old = json!({"kind": "group", "seed": 1, "val_fraction": 0.25});
        let new = json!({"kind": "group", "seed": 1, "val_fraction": 0.25, "fold": null});
        let same = |a: &serde_json::Value, b: &serde_json::Value| -> Result<bool> {
            Ok(RecordedSplit::from_json(a)? == RecordedSplit::from_json(b)?)
        };
        assert!(same(&old, &new)?);
        let fold = json!({"kind": "group", "seed": 1, "val_fraction": 0.25, "fold": {"index": 0, "count": 5}});
        assert!(!same(&old, &fold)?);
        assert!(!same(
            &new,
            &json!({"kind": "group", "seed": 2, "val_fraction": 0.25})
        )?);
        Ok(())
    }

    /// The shipped model against itself on images the test makes: all agreement, p = 1.
    #[test]
    fn average_is_the_mean_of_the_runs_weights_and_a_finished_run() -> Result<()> {
        let (root, data) = fresh_tiny_data("beaa-average")?;
        let cfg = TrainConfig {
            epochs: 1,
            ..tiny_config(data)
        };
        crate::train::run(&root.join("a"), cfg.clone())?;
        // same network and split, another rate: other weights
        crate::train::run(
            &root.join("b"),
            TrainConfig {
                lr: 0.01,
                ..cfg.clone()
            },
        )?;
        let runs = [root.join("a"), root.join("b")];
        let r = average(&runs, &root.join("mean"))?;
        assert!(r["val"]["accuracy"].as_f64().is_some());
        let dev = Device::Cpu;
        let (_, a) = load_run(&runs[0], &dev)?;
        let (_, b) = load_run(&runs[1], &dev)?;
        let (mean_cfg, m) = load_run(&root.join("mean"), &dev)?;
        let (ta, tb, tm) = (a.tensors(), b.tensors(), m.tensors());
        let mut differed = 0;
        for (k, t) in &tm {
            if k.ends_with(".bn.mean") || k.ends_with(".bn.var") {
                continue; // batch-norm statistics: re-estimated, not averaged
            }
            let want = ((&ta[k] + &tb[k])? * 0.5)?;
            let err = (t - &want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(err < 1e-6, "{k}: {err}");
            let gap = (&ta[k] - &tb[k])?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            differed += usize::from(gap > 1e-4);
        }
        assert!(differed > 0, "the two runs should differ");
        assert_eq!(mean_cfg.averaged_from, runs.to_vec());
        let state: TrainState =
            serde_json::from_str(&std::fs::read_to_string(root.join("mean/state.json"))?)?;
        assert_eq!(state.epoch, 1);
        let md = table(&[root.join("mean")], &root.join("t"), None)?;
        assert!(md.contains("weights of 2 runs averaged"), "{md}");
        assert!(md.contains("| mean of a + b |"), "{md}");
        // never over an existing run, never across networks
        assert!(average(&runs, &root.join("mean")).is_err());
        crate::train::run(
            &root.join("c"),
            TrainConfig {
                act: ActKind::Channel,
                ..cfg
            },
        )?;
        let e = average(&[root.join("a"), root.join("c")], &root.join("m2"))
            .expect_err("element-wise and channel-wise runs must not average");
        assert!(e.to_string().contains("another network"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
        Ok(())
    }

    #[test]
    fn compare_a_model_with_itself() -> Result<()> {
        let root = std::env::temp_dir().join(format!("beaa-compare-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (c, shade) in [("cat", 60u8), ("ship", 190u8)] {
            std::fs::create_dir_all(root.join(c))?;
            for k in 0..3u32 {
                image::RgbImage::from_fn(32, 32, |x, y| {
                    image::Rgb([shade, (x * 7 + k * 30) as u8, (y * 7) as u8])
                })
                .save(root.join(c).join(format!("{k}.png")))?;
            }
        }
        let zoo = Path::new(env!("CARGO_MANIFEST_DIR")).join("zoo/cifar10");
        let r = compare(&zoo, &zoo, &root, "all", 0)?;
        assert_eq!(r["images"], 6);
        assert_eq!(r["only_a_right"], 0);
        assert_eq!(r["only_b_right"], 0);
        assert_eq!(r["mcnemar_exact_p"], 1.0);
        assert_eq!(r["accuracy_a"], r["accuracy_b"]);
        std::fs::remove_dir_all(&root).unwrap();
        Ok(())
    }

    #[test]
    fn table_pools_the_folds_of_one_experiment() -> Result<()> {
        let root = std::env::temp_dir().join(format!("beaa-table-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let fold = |index, teacher: &str| {
            let mut cfg = TrainConfig {
                fold: Some(Fold { index, count: 2 }),
                teacher: Some(root.join(teacher)),
                init_from: Some(root.join(format!("relu-f{index}"))),
                ..tiny_config(root.join("data"))
            };
            // each fold normalizes by its own training images
            cfg.input.mean = vec![0.1 * index as f32; 3];
            cfg
        };
        // fold 0: class 0 3/4 right, class 1 1/1; fold 1: class 0 1/2, class 1 2/4
        write_run(
            &root.join("f0"),
            &fold(0, "t0"),
            2,
            vec![vec![3, 1], vec![0, 1]],
        )?;
        write_run(
            &root.join("f1"),
            &fold(1, "t1"),
            1,
            vec![vec![1, 1], vec![2, 2]],
        )?;
        // same folds of another experiment (other learning rate) stay a row of their own
        let other = TrainConfig {
            lr: 0.5,
            ..fold(0, "t0")
        };
        write_run(&root.join("g0"), &other, 2, vec![vec![1, 0], vec![0, 1]])?;
        // and so are another clip, other distillation settings and an off-data penalty
        let looser = TrainConfig {
            clip_norm: 20.0,
            kd_alpha: 0.5,
            off_data_penalty: 0.1,
            off_data_slack: 8.0,
            ..fold(0, "t0")
        };
        write_run(&root.join("h0"), &looser, 2, vec![vec![1, 0], vec![0, 1]])?;
        let runs = ["f0", "g0", "h0", "f1"].map(|r| root.join(r));
        let md = table(&runs, &root.join("t"), None)?;
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(root.join("t.json"))?)?;
        assert_eq!(rows.len(), 3, "{md}");
        assert!(
            md.contains(
                "(peak rate 0.05, gradient clip 20, KD alpha 0.5 T 4, off-data penalty 0.1 at 8x the bound), 8x8 input"
            ),
            "{md}"
        );
        assert_eq!(rows[0]["folds_pooled"], 2);
        assert_eq!(rows[0]["validation_images"], 11);
        // pooled: class 0 4/6, class 1 3/5; partly trained fold -> epochs 1
        let b = rows[0]["balanced_accuracy"].as_f64().unwrap_or(0.0);
        assert!((b - (4.0 / 6.0 + 3.0 / 5.0) / 2.0).abs() < 1e-12, "{b}");
        assert_eq!(rows[0]["epochs"], 1);
        assert!(
            md.contains("element-wise + KD (peak rate 0.05), 8x8 input, 2-fold CV |"),
            "{md}"
        );
        // the other experiment's rate is in its variant's name
        assert!(
            md.contains("(peak rate 0.5), 8x8 input, 2-fold CV (1 of 2 folds)"),
            "{md}"
        );
        assert!(md.contains("2-fold CV (1 of 2 folds)"), "{md}");
        // each fold started from its own fold's teacher
        assert_eq!(rows[0]["starts_from"], "relu-f*");
        // the same fold twice is an error, not a silently doubled count
        assert!(table(&[root.join("f0"), root.join("f0")], &root.join("u"), None).is_err());
        // an earlier table's rows are kept, a rerun run replaces its own row
        let md = table(
            &[root.join("g0")],
            &root.join("v"),
            Some(&root.join("t.json")),
        )?;
        let rows: Vec<serde_json::Value> =
            serde_json::from_str(&std::fs::read_to_string(root.join("v.json"))?)?;
        assert_eq!(rows.len(), 3, "{md}");
        assert_eq!(rows[0]["folds_pooled"], 2);
        std::fs::remove_dir_all(&root)?;
        Ok(())
    }
}
