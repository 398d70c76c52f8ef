//! `beaa-train`: fit a ReLU teacher, distill polynomial students, evaluate, export, tabulate.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use models::data::{Augment, SplitKind};
use models::net::{ActKind, SqueezeNetSpec};
use models::train::{self, Preset, TrainConfig};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "beaa-train",
    about = "Train and export the BEAA SqueezeNet family (candle, CPU)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train a network from scratch (the ReLU teacher, or a student without KD).
    Fit(TrainArgs),
    /// Train a polynomial student from a teacher run with knowledge distillation.
    Distill(TrainArgs),
    /// Export a run's latest checkpoint as a model directory (BN folded, ranges measured).
    Export {
        #[arg(long)]
        run: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// Model name in the manifest (default: the run directory's name).
        #[arg(long)]
        name: Option<String>,
        /// Training images used to measure per-node value ranges.
        #[arg(long, default_value_t = 512)]
        range_images: usize,
        #[arg(long)]
        json: bool,
    },
    /// Evaluate a model directory with the plaintext f64 forward pass on a data directory.
    Evaluate {
        #[arg(long)]
        model: PathBuf,
        #[command(flatten)]
        images: Images,
        #[arg(long)]
        json: bool,
    },
    /// Two model directories on the same images, paired: images only one gets right, and
    /// McNemar's exact test (a difference too small for two error bars can still be real).
    Compare {
        #[arg(long)]
        a: PathBuf,
        #[arg(long)]
        b: PathBuf,
        #[command(flatten)]
        images: Images,
    },
    /// Average the final weights of runs of one network and split (weight averaging), into
    /// a new run directory; batch norm re-estimated, validated.
    Average {
        /// Run directories to average (at least two).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// The new run directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Regenerate the accuracy table (markdown + JSON) from run directories.
    Table {
        /// Run directories (each with config.json and state.json).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Output path prefix: writes PREFIX.md and PREFIX.json.
        #[arg(long)]
        out: PathBuf,
        /// Keep the rows of this earlier table JSON (their run directories may be gone); a
        /// run given here replaces the row of the same path.
        #[arg(long)]
        keep: Option<PathBuf>,
    },
    /// Time training steps of the network (for BENCHMARKS.md).
    Bench {
        #[arg(long, default_value_t = 128)]
        batch: usize,
        #[arg(long, default_value_t = 10)]
        steps: usize,
        #[arg(long, value_enum, default_value_t = ActKind::Relu)]
        act: ActKind,
        #[arg(long)]
        json: bool,
    },
}

/// The images `evaluate` and `compare` run a model on.
#[derive(Args)]
struct Images {
    #[arg(long)]
    data: PathBuf,
    /// all = every image in --data; val = the validation split recorded in the manifest(s).
    #[arg(long, default_value = "all")]
    split: String,
    /// At most this many images, spread over the set (0 = all).
    #[arg(long, default_value_t = 0)]
    limit: usize,
}

#[derive(Args, Clone)]
struct TrainArgs {
    /// Run directory (created; resumed if it holds a checkpoint).
    #[arg(long)]
    run: PathBuf,
    /// Data directory: class-per-folder tree or CIFAR-10 binary batches.
    #[arg(long)]
    data: PathBuf,
    /// Preset for input size, split and augmentation.
    #[arg(long, value_enum, default_value_t = Preset::Cifar10)]
    preset: Preset,
    #[arg(long, value_enum, default_value_t = ActKind::Relu)]
    act: ActKind,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long, default_value_t = 128)]
    batch: usize,
    #[arg(long)]
    lr: Option<f64>,
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    #[arg(long, default_value_t = 5e-4)]
    weight_decay: f64,
    #[arg(long)]
    warmup_epochs: Option<f64>,
    #[arg(long, default_value_t = train::CLIP_NORM)]
    clip_norm: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Width multiplier on the default channel widths.
    #[arg(long, default_value_t = 1.0)]
    width: f64,
    /// Input side length (square), overriding the preset.
    #[arg(long)]
    size: Option<usize>,
    /// Teacher run directory (distill) / weights to start from.
    #[arg(long)]
    teacher: Option<PathBuf>,
    /// Start from these weights (default for distill: the teacher).
    #[arg(long)]
    init_from: Option<PathBuf>,
    /// Start from another task's run of the same widths (transfer learning): convolutions
    /// and batch norms copied, a colour first convolution summed to grey, a fresh classifier.
    #[arg(long)]
    pretrained: Option<PathBuf>,
    #[arg(long, default_value_t = train::KD_ALPHA)]
    alpha: f64,
    #[arg(long, default_value_t = train::KD_TEMPERATURE)]
    temperature: f64,
    #[arg(long, default_value_t = 5.0)]
    checkpoint_minutes: f64,
    /// Batch norm in eval mode while training (fixed statistics, re-estimated each epoch).
    #[arg(long)]
    freeze_bn: bool,
    /// Weight of the penalty on polynomial inputs beyond twice the largest |input| seen on
    /// clean training images at the start (0 = off); keeps unusual images from exploding.
    #[arg(long, default_value_t = 0.0)]
    range_penalty: f64,
    /// Weight of the same penalty, logarithmic, on a probe batch of off-data images (noise,
    /// heavily shifted, scaled and rotated images) run as inference runs them (0 = off);
    /// keeps non-scans from exploding the encrypted batch (see models/README.md).
    #[arg(long, default_value_t = 0.0)]
    off_data_penalty: f64,
    /// The off-data penalty's bound as a multiple of the range penalty's (twice the largest
    /// clean |input|); looser asks less of the network.
    #[arg(long, default_value_t = 1.0)]
    off_data_slack: f64,
    /// The kinds of image in the off-data probe (comma-separated; all four by default).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = train::ProbeKind::all())]
    off_data_kinds: Vec<train::ProbeKind>,
    /// Leave out of each step the images whose own loss exceeds this (0 = off): exploded
    /// augmented images otherwise set the clipped step's direction.
    #[arg(long, default_value_t = 0.0)]
    outlier_loss: f64,
    /// Students: move each activation from ReLU to its quadratic over this many first
    /// epochs (0 = start from the quadratics).
    #[arg(long, default_value_t = 0.0)]
    relu_blend_epochs: f64,
    /// Element-wise students: each coefficient a per-channel share plus a per-element offset,
    /// so the common part learns at the channel-wise rate (see models/README.md).
    #[arg(long)]
    poly_channel_share: bool,
    /// Element-wise students: L2 decay of each coefficient's deviation from its channel's
    /// mean (0 = off; pulls element-wise toward channel-wise, see models/README.md).
    #[arg(long, default_value_t = 0.0)]
    poly_spread_decay: f64,
    /// Mixup strength m (0 = off): train on pairs of images mixed with a Beta(m, m) weight,
    /// the teacher scoring the same mixed images (see models/README.md).
    #[arg(long, default_value_t = 0.0)]
    mixup: f64,
    /// Feature distillation weight (distill only; 0 = off): also pull each activation's
    /// input toward the teacher's, per channel relative to its variance (models/README.md).
    #[arg(long, default_value_t = 0.0)]
    feature_kd: f64,
    /// Stop (after a checkpoint) once this invocation has run this many steps; rerun to resume.
    #[arg(long)]
    max_steps: Option<usize>,
    /// Images for end-of-epoch batch-norm re-estimation of polynomial nets (0 = off).
    #[arg(long, default_value_t = 500)]
    bn_calibration_images: usize,
    /// Weight of the layer-wide inputs in each channel/element ReLU fit (0 = pure per-group fit).
    #[arg(long, default_value_t = 1.0)]
    poly_fit_shrink: f64,
    /// Weight of a uniform distribution over each group's observed input range in the ReLU
    /// fit (0 = fit the observed inputs only).
    #[arg(long, default_value_t = 0.0)]
    poly_fit_range: f64,
    /// Fit the quadratics layer by layer on the partly polynomial network's own inputs.
    #[arg(long)]
    poly_fit_progressive: bool,
    /// Cross-validation: split the groups (patients) into this many folds (needs --fold).
    #[arg(long, requires = "fold")]
    folds: Option<usize>,
    /// Cross-validation: validate on this fold (0-based; needs --folds).
    #[arg(long, requires = "folds")]
    fold: Option<usize>,
}

fn config(a: &TrainArgs, distill: bool) -> Result<TrainConfig> {
    let oct = a.preset == Preset::Octdl;
    let fold = match (a.fold, a.folds) {
        (Some(index), Some(count)) => {
            anyhow::ensure!(oct, "--folds needs a patient split (--preset octdl)");
            anyhow::ensure!(
                count >= 2 && index < count,
                "--fold {index} --folds {count}: need 2 or more folds and fold < folds"
            );
            Some(models::data::Fold { index, count })
        }
        _ => None,
    };
    let mut input = a.preset.default_input();
    if let Some(s) = a.size {
        input.height = s;
        input.width = s;
    }
    let base = SqueezeNetSpec::cifar(10);
    let arch = SqueezeNetSpec {
        in_channels: input.channels,
        height: input.height,
        width: input.width,
        ..base
    }
    .scaled(a.width);
    let student = distill || a.init_from.is_some();
    Ok(TrainConfig {
        data: a.data.clone(),
        dataset_name: a.preset.dataset_name().into(),
        input,
        split: if oct {
            SplitKind::Group
        } else {
            SplitKind::LastPerClass
        },
        val_per_class: 500,
        val_fraction: 0.25,
        arch,
        act: a.act,
        epochs: a.epochs.unwrap_or(if student {
            10
        } else if oct {
            60
        } else {
            30
        }),
        batch: a.batch,
        lr: a
            .lr
            .unwrap_or(if student { train::STUDENT_LR } else { 0.1 }),
        lr_min: 0.0,
        warmup_epochs: a.warmup_epochs.unwrap_or(if student { 0.5 } else { 2.0 }),
        momentum: a.momentum,
        weight_decay: a.weight_decay,
        clip_norm: a.clip_norm,
        seed: a.seed,
        augment: if oct {
            Augment {
                pad_crop: 0,
                hflip: true,
                rotate_deg: 10.0,
                scale: 0.1,
                translate: 4.0,
            }
        } else {
            Augment {
                pad_crop: 4,
                hflip: true,
                rotate_deg: 0.0,
                scale: 0.0,
                translate: 0.0,
            }
        },
        class_weighted: oct,
        teacher: if distill { a.teacher.clone() } else { None },
        kd_alpha: a.alpha,
        kd_temperature: a.temperature,
        init_from: a
            .init_from
            .clone()
            .or_else(|| if distill { a.teacher.clone() } else { None }),
        poly_fit_images: 2000,
        checkpoint_minutes: a.checkpoint_minutes,
        poly_fit_shrink: a.poly_fit_shrink,
        poly_fit_range: a.poly_fit_range,
        poly_fit_progressive: a.poly_fit_progressive,
        freeze_bn: a.freeze_bn,
        range_penalty: a.range_penalty,
        off_data_penalty: a.off_data_penalty,
        off_data_slack: a.off_data_slack,
        off_data_kinds: a.off_data_kinds.clone(),
        outlier_loss: a.outlier_loss,
        relu_blend_epochs: a.relu_blend_epochs,
        poly_channel_share: a.poly_channel_share,
        poly_spread_decay: a.poly_spread_decay,
        pretrained: a.pretrained.clone(),
        mixup: a.mixup,
        feature_kd: a.feature_kd,
        bn_calibration_images: if a.act == ActKind::Relu {
            0
        } else {
            a.bn_calibration_images
        },
        fold,
        averaged_from: Vec::new(),
    })
}

fn main() -> Result<()> {
    train::tune_allocator();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Fit(a) => {
            let cfg = config(&a, false)?;
            let s = train::run_limited(&a.run, cfg, a.max_steps)?;
            println!("{}", serde_json::to_string(&s)?);
        }
        Cmd::Distill(a) => {
            anyhow::ensure!(a.teacher.is_some(), "distill needs --teacher RUN_DIR");
            let cfg = config(&a, true)?;
            let s = train::run_limited(&a.run, cfg, a.max_steps)?;
            println!("{}", serde_json::to_string(&s)?);
        }
        Cmd::Export {
            run,
            out,
            name,
            range_images,
            json,
        } => {
            let m = models::cli::export(&run, &out, name, range_images)?;
            if json {
                println!("{}", serde_json::to_string(&m)?);
            } else {
                println!("exported {} to {}", m["name"], out.display());
            }
        }
        Cmd::Evaluate {
            model,
            images,
            json,
        } => {
            let r = models::cli::evaluate(&model, &images.data, &images.split, images.limit)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{}", serde_json::to_string_pretty(&r)?);
            }
        }
        Cmd::Compare { a, b, images } => {
            let r = models::cli::compare(&a, &b, &images.data, &images.split, images.limit)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        Cmd::Average { runs, out } => {
            let r = models::cli::average(&runs, &out)?;
            println!("{}", serde_json::to_string_pretty(&r)?);
        }
        Cmd::Table { runs, out, keep } => {
            let md = models::cli::table(&runs, &out, keep.as_deref())?;
            println!("{md}");
        }
        Cmd::Bench {
            batch,
            steps,
            act,
            json,
        } => {
            let r = models::bench::bench_train_step(batch, steps, act)?;
            if json {
                println!("{}", serde_json::to_string(&r)?);
            } else {
                println!("{r:?}");
            }
        }
    }
    Ok(())
}
