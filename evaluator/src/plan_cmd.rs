//! `beaa plan`: the encryption plan of a model - parameters, levels, sizes, security.

use anyhow::{Context, Result};
use beaa_ckks::serialize::ciphertext_len;
use beaa_ckks::RelinKey;
use beaa_engine::Plan;
use serde::Serialize;

#[derive(clap::Args, Debug)]
pub struct PlanArgs {
    /// A shipped model (cifar10, octdl) or a model directory.
    #[arg(long)]
    pub model: String,
    /// Images per job (at most N/2; default N/2).
    #[arg(long)]
    pub batch: Option<usize>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Plan the 3x3 convolutions over at least MIN_CHANNELS input channels (default
    /// `beaa_engine::WINOGRAD_MIN_CHANNELS`) in Winograd's F(2x2, 3x3) form (as `eval
    /// --encrypted --winograd` and `bench inference --winograd` run them).
    #[arg(long, value_name = "MIN_CHANNELS", num_args = 0..=1)]
    pub winograd: Option<Option<usize>>,
}

/// The `--winograd [MIN_CHANNELS]` option as the planner takes it: absent, none; bare, the
/// default threshold.
pub fn winograd_min_channels(arg: Option<Option<usize>>) -> Option<usize> {
    arg.map(|m| m.unwrap_or(beaa_engine::WINOGRAD_MIN_CHANNELS))
}

#[derive(Serialize)]
struct StageReport {
    layer: String,
    tiles: usize,
    ciphertexts: usize,
    level: isize,
    stored_bytes: usize,
}

#[derive(Serialize)]
struct Report {
    model: String,
    n: usize,
    slots: usize,
    batch: usize,
    q_bits: Vec<u32>,
    p_bits: Vec<u32>,
    key_switching_digits: usize,
    log2_qp: f64,
    max_log2_qp_128: u32,
    security_bits: u32,
    depth: usize,
    levels_available: usize,
    /// Per activation or pooling sum: ciphertexts it makes and the level they land on.
    squares: Vec<(String, usize, isize)>,
    /// Layers computed in their own stage and kept (in the job's work directory) while
    /// later tiles read them, with their size; every other layer is recomputed where read.
    stages: Vec<StageReport>,
    inlined: Vec<String>,
    /// The most bytes of intermediate ciphertexts a job keeps in its work directory at once
    /// (in the executor's order: the wavefront unless one stage after the other holds less),
    /// and what running them one after the other needs.
    work_dir_peak_bytes: u64,
    work_dir_peak_bytes_stage_by_stage: u64,
    /// Activation layers whose squares are summed before one relinearization per sum.
    lazy: Vec<String>,
    /// Lazy layers whose combination is not rescaled (their reader divides by three primes).
    unrescaled: Vec<String>,
    /// Stored sums of lazy squares that relinearize their own sums (pool2).
    finishing_sums: Vec<String>,
    /// Layers whose 3x3 convolution is computed in Winograd's form (`--winograd`).
    winograd: Vec<String>,
    squares_per_job: usize,
    /// Per layer that combines terms: modular multiply-adds per job (terms x limbs x
    /// polynomials x N), the GEMM's work; and their total.
    multiply_adds: Vec<(String, u64)>,
    multiply_adds_per_job: u64,
    relinearizations_per_job: usize,
    input_ciphertexts: usize,
    output_ciphertexts: usize,
    relin_key_bytes: usize,
    upload_bytes: usize,
    download_bytes: usize,
    /// Margin (bits) between each layer's largest calibration value and what its ciphertexts
    /// hold; lowest first.
    headroom: Vec<beaa_engine::Headroom>,
}

pub fn run(args: &PlanArgs) -> Result<()> {
    let (dir, model) = crate::models::load(&args.model)?;
    let (params, plan) = Plan::choose_with(
        &model,
        crate::plan_cmd::winograd_min_channels(args.winograd),
    )
    .context("planning")?;
    let slots = params.slots();
    let batch = args.batch.unwrap_or(slots).clamp(1, slots);
    let top = params.max_level();
    let inputs = model.input_len();
    let outputs = model.manifest.classes.len();
    let mut squares: Vec<(String, usize, isize)> = plan
        .materialized
        .iter()
        .map(|(k, (n, l))| (k.clone(), *n, *l))
        .collect();
    squares.sort_by_key(|(_, _, l)| std::cmp::Reverse(*l));
    let g = &plan.graph;
    let stages: Vec<StageReport> = plan
        .schedule
        .stages
        .iter()
        .map(|s| {
            let l = &g.layers[s.layer as usize];
            let level = l.meta.first().map_or(0, |m| m.level);
            StageReport {
                layer: l.name.clone(),
                tiles: l.tiles(),
                ciphertexts: l.len(),
                level,
                stored_bytes: (0..l.len())
                    .map(|e| g.stored_bytes(&params, s.layer as usize, e) as usize)
                    .sum(),
            }
        })
        .collect();
    let inlined = g
        .layers
        .iter()
        .zip(&plan.schedule.inlined)
        .filter(|(_, &i)| i)
        .map(|(l, _)| l.name.clone())
        .collect();
    let (peak, peak_sequential) = plan.work_dir_peak;
    let multiply_adds: Vec<(String, u64)> = (0..g.layers.len())
        .map(|l| {
            (
                g.layers[l].name.clone(),
                g.multiply_adds(l) * params.n() as u64,
            )
        })
        .filter(|(_, m)| *m > 0)
        .collect();
    let report = Report {
        model: dir.display().to_string(),
        n: params.n(),
        slots,
        batch,
        q_bits: params.spec().q_bits.clone(),
        p_bits: params.spec().p_bits.clone(),
        key_switching_digits: params.digits(top),
        log2_qp: params.log_qp(),
        max_log2_qp_128: beaa_ckks::max_log_qp_128(params.spec().log_n).unwrap_or(0),
        security_bits: if params.is_secure() { 128 } else { 0 },
        depth: plan.depth,
        levels_available: top,
        squares,
        stages,
        inlined,
        work_dir_peak_bytes: peak,
        work_dir_peak_bytes_stage_by_stage: peak_sequential,
        lazy: plan.lazy_layers().iter().map(|s| s.to_string()).collect(),
        unrescaled: plan
            .unrescaled_layers()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        finishing_sums: plan
            .finishing_sums()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        winograd: plan
            .winograd_layers()
            .iter()
            .map(|s| s.to_string())
            .collect(),
        squares_per_job: plan.squares(),
        multiply_adds_per_job: multiply_adds.iter().map(|(_, m)| m).sum(),
        multiply_adds,
        relinearizations_per_job: plan.relinearizations(),
        input_ciphertexts: inputs,
        output_ciphertexts: outputs,
        relin_key_bytes: RelinKey::serialized_len(&params),
        upload_bytes: inputs * ciphertext_len(&params, top, 1, true),
        download_bytes: outputs
            * ciphertext_len(&params, plan.output.level.max(0) as usize, 1, false),
        headroom: plan.headroom(&model, &params),
    };
    eprintln!("model      {}", report.model);
    eprintln!(
        "params     N = {}, {} primes {:?} + special {:?} ({} digits), log2(QP) = {:.1} <= {} (128-bit)",
        report.n, report.q_bits.len(), report.q_bits, report.p_bits, report.key_switching_digits,
        report.log2_qp, report.max_log2_qp_128
    );
    eprintln!(
        "levels     {} of {} used; batch {} of {} slots",
        report.depth, report.levels_available, report.batch, report.slots
    );
    for (node, n, level) in &report.squares {
        eprintln!("  square   {node:<24} {n:>7} ciphertexts -> level {level}");
    }
    for (layer, m) in &report.multiply_adds {
        eprintln!(
            "  gemm     {layer:<24} {:>9.1}e9 multiply-adds ({:.1}%)",
            *m as f64 / 1e9,
            100.0 * *m as f64 / report.multiply_adds_per_job as f64
        );
    }
    eprintln!(
        "  gemm     total {:.1}e9 modular multiply-adds per job",
        report.multiply_adds_per_job as f64 / 1e9
    );
    for s in &report.stages {
        eprintln!(
            "  stage    {:<24} {:>5} tiles {:>7} ciphertexts at level {:>2}, {:.1} GB stored",
            s.layer,
            s.tiles,
            s.ciphertexts,
            s.level,
            s.stored_bytes as f64 / 1e9
        );
    }
    eprintln!("  inlined  {}", report.inlined.join(", "));
    let gb = |b: u64| b as f64 / 1e9;
    if plan.segments.len() > plan.schedule.stages.len() {
        eprintln!(
            "  work dir {:.1} GB at most (stages as a wavefront; {:.1} GB one after the other)",
            gb(report.work_dir_peak_bytes),
            gb(report.work_dir_peak_bytes_stage_by_stage)
        );
    } else {
        eprintln!(
            "  work dir {:.1} GB at most (stages one after the other: on maps this small a wavefront holds more)",
            gb(report.work_dir_peak_bytes)
        );
    }
    eprintln!(
        "  lazy     {} ({} squares, {} relinearizations per job)",
        report.lazy.join(", "),
        report.squares_per_job,
        report.relinearizations_per_job
    );
    if !report.finishing_sums.is_empty() {
        eprintln!(
            "  finishing {} (stored sums that relinearize their lazy squares)",
            report.finishing_sums.join(", ")
        );
    }
    if !report.unrescaled.is_empty() {
        eprintln!(
            "  unrescaled {} (combined without a rescale; their readers divide by 3 primes)",
            report.unrescaled.join(", ")
        );
    }
    if !report.winograd.is_empty() {
        eprintln!(
            "  winograd {} (F(2x2, 3x3): 2x2 output blocks as tiles)",
            report.winograd.join(", ")
        );
    }
    eprintln!(
        "sizes      relin key {:.1} MB, upload {} x {:.2} MB = {:.1} MB, download {:.2} MB",
        report.relin_key_bytes as f64 / 1e6,
        inputs,
        ciphertext_len(&params, top, 1, true) as f64 / 1e6,
        report.upload_bytes as f64 / 1e6,
        report.download_bytes as f64 / 1e6
    );
    if let Some(h) = report.headroom.first() {
        let images = model
            .manifest
            .ranges
            .values()
            .map(|r| r.images)
            .max()
            .unwrap_or(0);
        eprintln!(
            "headroom   {:.1} bits at the tightest layer, {} (values up to {:.3}, the largest on {} calibration images): every image of a batch may reach |{:.3e}|, one image among ordinary ones |{:.3e}|{}",
            h.bits,
            h.layer,
            h.bound,
            images,
            h.bound * h.bits.exp2(),
            h.bound * h.one_image_bits.exp2(),
            if h.bits < 2.0 { "; WARNING: an unusual image may overflow and corrupt its batch" } else { "" }
        );
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}
