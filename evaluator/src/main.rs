//! `beaa`: the encrypted-inference service, the native client and the benchmarks.

mod bench_ckks;
mod bench_inference;
mod bench_upload;
mod demo;
mod eval_cmd;
mod files;
mod keygen;
mod local_job;
mod models;
mod plan_cmd;
mod predict;
mod serve;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "beaa",
    version,
    about = "Encrypted medical-image diagnosis with RNS-CKKS (BEAA)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Benchmarks: `beaa bench ckks`.
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// The whole client/server flow in one process (keys, encryption, evaluation, decryption).
    Demo(demo::DemoArgs),
    /// The encryption plan of a model: N, modulus chain, levels, key and upload sizes, security.
    Plan(plan_cmd::PlanArgs),
    /// Accuracy on a class-per-folder tree (plaintext reference path).
    Eval(eval_cmd::EvalArgs),
    /// The evaluator service: web page at `/`, API under `/api/` (see evaluator/API.md).
    Serve(serve::ServeArgs),
    /// Client keys for a model; the secret key file is mode 0600 and never uploaded.
    Keygen(keygen::KeygenArgs),
    /// Encrypt images locally, have a server classify them, decrypt the answer.
    Predict(predict::PredictArgs),
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Per-operation medians (ms), single-threaded, and object sizes.
    Ckks(bench_ckks::CkksBenchArgs),
    /// Encrypted inference on random inputs: total and amortized time, peak RSS, per layer.
    Inference(bench_inference::InferenceBenchArgs),
    /// Upload throughput of `beaa serve` on loopback and the server's peak RSS.
    Upload(bench_upload::UploadBenchArgs),
}

/// Keeps freed memory in the process instead of returning it to the kernel after every
/// multi-megabyte polynomial: without this, glibc maps and unmaps each large buffer and
/// every use pays page faults (measured here: ~15% of a relinearization). Trimming is off
/// altogether: with a 1 GiB threshold a job's heap still shrank and regrew all the time
/// (20.8 million page faults in a full-width job on an 8x8 input; 1.0 million without, and
/// 12-22% less time at the same peak RSS: BENCHMARKS.md). A finished job gives its memory
/// back with [`release_freed_memory`]. One arena for all threads: with a heap that never
/// shrinks, each thread's arena kept its own high-water mark (width/4 model, full batch, two
/// threads, same window: peak RSS 3.90 GB with glibc's default arenas, 2.30 GB with one, and
/// 429 s against 415 s; BENCHMARKS.md, "One malloc arena").
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator thresholds; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, -1);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Returns the heap's free memory to the kernel (trimming is off while jobs run).
pub(crate) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

fn main() {
    tune_allocator();
    let cli = Cli::parse();
    let result: Result<()> = match &cli.command {
        Command::Bench {
            what: BenchCommand::Ckks(args),
        } => bench_ckks::run(args),
        Command::Bench {
            what: BenchCommand::Inference(args),
        } => bench_inference::run(args),
        Command::Bench {
            what: BenchCommand::Upload(args),
        } => bench_upload::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Plan(args) => plan_cmd::run(args),
        Command::Eval(args) => eval_cmd::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Keygen(args) => keygen::run(args),
        Command::Predict(args) => predict::run(args),
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
