//! `beaa bench upload`: input upload throughput of `beaa serve` over loopback, and the server's
//! peak RSS, at several total upload sizes.
//!
//! Starts the real server (this executable, `beaa serve`) on 127.0.0.1 with a temporary data
//! directory and a zoo holding only the chosen model, makes real client keys and a few real
//! seeded ciphertexts at the model's parameters (production parameters unless
//! `--insecure-test-params`), then per size: creates jobs, uploads `PUT
//! /api/jobs/{id}/inputs/{k}` (with `X-Checksum-Sha256`, as `beaa predict` does) over several
//! keep-alive connections, and reads the server's `VmHWM` (reset before each run through
//! `/proc/PID/clear_refs`). Optionally (`--start`) uploads one whole job and times `POST
//! .../start`, where the server makes the inputs durable (fsync).

use anyhow::{bail, ensure, Context, Result};
use beaa_ckks::{Encryptor, KeyGenerator, ParamSpec, Params};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct UploadBenchArgs {
    /// The model whose parameters set the ciphertext size (a shipped name or a directory).
    #[arg(long, default_value = "octdl")]
    pub model: String,
    /// Total upload sizes in MB (10^6 bytes), one run each.
    #[arg(long, value_delimiter = ',', default_value = "256,1024")]
    pub sizes_mb: Vec<u64>,
    /// Concurrent client connections.
    #[arg(long, default_value_t = 4)]
    pub connections: usize,
    /// Distinct ciphertexts encrypted once and uploaded in turn.
    #[arg(long, default_value_t = 8)]
    pub distinct: usize,
    /// Also upload one whole job and time `POST /api/jobs/{id}/start` (the fsync of all its
    /// inputs); the server runs with no workers, so the job never executes.
    #[arg(long)]
    pub start: bool,
    /// Serve the model at the small NOT SECURE test parameters (small ciphertexts).
    #[arg(long)]
    pub insecure_test_params: bool,
    /// The server executable (default: this one), e.g. an older build to compare against.
    #[arg(long, hide = true)]
    pub server_exe: Option<PathBuf>,
    /// Parent of the temporary data directory (default: the system's temporary directory).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

/// The server under test; killed and its work directory removed on drop.
struct Server {
    child: Child,
    url: String,
    work: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.work);
    }
}

fn proc_status_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .unwrap_or(0)
}

fn rss_bytes(pid: u32) -> u64 {
    proc_status_kb(pid, "VmRSS:") * 1024
}

fn hwm_bytes(pid: u32) -> u64 {
    proc_status_kb(pid, "VmHWM:") * 1024
}

/// Resets the peak RSS of `pid` to its current RSS (Linux >= 4.0).
fn reset_hwm(pid: u32) -> Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
        .with_context(|| format!("resetting the peak RSS of process {pid}"))
}

/// CPU seconds (user + system) used so far by process `pid`.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command name in parentheses: state is field 3, utime 14, stime 15.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn load_avg() -> Vec<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect()
}

/// (status, body) of a request, 4xx/5xx included.
fn call(req: ureq::Request, body: Option<&[u8]>) -> Result<(u16, Vec<u8>)> {
    let res = match body {
        Some(b) => req.send_bytes(b),
        None => req.call(),
    };
    let resp = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => bail!("request failed: {e}"),
    };
    let status = resp.status();
    let mut out = Vec::new();
    resp.into_reader().take(1 << 24).read_to_end(&mut out)?;
    Ok((status, out))
}

fn json_ok(status: u16, body: &[u8], what: &str) -> Result<Value> {
    ensure!(
        (200..300).contains(&status),
        "{what}: HTTP {status}: {}",
        String::from_utf8_lossy(body)
    );
    Ok(serde_json::from_slice(body)?)
}

fn start_server(args: &UploadBenchArgs, model_dir: &Path) -> Result<Server> {
    let parent = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    let work = parent.join(format!(
        "beaa-bench-upload-{}",
        crate::serve::util::random_hex(6)?
    ));
    std::fs::create_dir_all(work.join("zoo"))?;
    std::os::unix::fs::symlink(
        std::fs::canonicalize(model_dir)?,
        work.join("zoo").join("bench"),
    )?;
    let log = std::fs::File::create(work.join("serve.log"))?;
    let exe = match &args.server_exe {
        Some(p) => p.clone(),
        None => std::env::current_exe()?,
    };
    let mut cmd = Command::new(exe);
    cmd.args(["serve", "--addr", "127.0.0.1:0", "--max-disk-gb", "1e6"])
        .arg("--zoo")
        .arg(work.join("zoo"))
        .arg("--data-dir")
        .arg(work.join("data"))
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log));
    if args.insecure_test_params {
        cmd.arg("--insecure-test-params");
    }
    if args.start {
        // The whole job is started but must never run.
        cmd.args(["--workers", "0"]);
    }
    let mut child = cmd.spawn().context("starting beaa serve")?;
    let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
    let first = lines.next().transpose()?.unwrap_or_default();
    let Some(url) = first.strip_prefix("listening on ") else {
        let _ = child.kill();
        bail!("the server did not start (see {})", work.display());
    };
    let url = url.to_owned();
    std::thread::spawn(move || for _ in lines {});
    Ok(Server { child, url, work })
}

struct Job {
    id: String,
    auth: String,
}

fn create_job(url: &str, key_id: &str) -> Result<Job> {
    let body = json!({"model": "bench", "key_id": key_id, "batch": 1}).to_string();
    let (s, b) = call(
        ureq::post(&format!("{url}/api/jobs")),
        Some(body.as_bytes()),
    )?;
    let v = json_ok(s, &b, "creating a job")?;
    Ok(Job {
        id: v["job_id"].as_str().unwrap_or_default().to_owned(),
        auth: format!("Bearer {}", v["token"].as_str().unwrap_or_default()),
    })
}

/// Uploads `count` inputs spread over `jobs` (index i goes to job i / per_job, input
/// i % per_job) on `connections` threads; returns (seconds, peak RSS sampled).
fn upload(
    url: &str,
    pid: u32,
    jobs: &[Job],
    per_job: usize,
    count: usize,
    cts: &[(Vec<u8>, String)],
    connections: usize,
) -> Result<f64> {
    let next = AtomicUsize::new(0);
    let failed = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let sampled = AtomicU64::new(0);
    let t = Instant::now();
    let result: Result<()> = std::thread::scope(|s| {
        let sampler = s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                sampled.fetch_max(rss_bytes(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let workers: Vec<_> = (0..connections)
            .map(|_| {
                s.spawn(|| -> Result<()> {
                    let agent = ureq::AgentBuilder::new().build();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count || failed.load(Ordering::Relaxed) {
                            return Ok(());
                        }
                        let job = &jobs[i / per_job];
                        let k = i % per_job;
                        let (ct, sum) = &cts[i % cts.len()];
                        let req = agent
                            .put(&format!("{url}/api/jobs/{}/inputs/{k}", job.id))
                            .set("Authorization", &job.auth)
                            .set("Content-Type", "application/octet-stream")
                            .set("X-Checksum-Sha256", sum);
                        let (st, b) = call(req, Some(ct))?;
                        if st != 200 {
                            failed.store(true, Ordering::Relaxed);
                            bail!("input {k}: HTTP {st}: {}", String::from_utf8_lossy(&b));
                        }
                    }
                })
            })
            .collect();
        let mut out = Ok(());
        for w in workers {
            let r = w.join().expect("upload thread");
            if out.is_ok() {
                out = r;
            }
        }
        done.store(true, Ordering::Relaxed);
        sampler.join().expect("sampler");
        out
    });
    result?;
    Ok(t.elapsed().as_secs_f64())
}

pub fn run(args: &UploadBenchArgs) -> Result<()> {
    ensure!(args.connections >= 1, "--connections must be at least 1");
    ensure!(args.distinct >= 1, "--distinct must be at least 1");
    let model_dir = crate::models::resolve(&args.model)?;
    let server = start_server(args, &model_dir)?;
    let pid = server.child.id();
    let url = server.url.clone();
    eprintln!("server {url} (pid {pid}), planning {}", args.model);
    let t = Instant::now();
    let info = loop {
        let (s, b) = call(ureq::get(&format!("{url}/api/models")), None)?;
        let v = json_ok(s, &b, "listing models")?;
        if let Some(m) = v["models"]
            .as_array()
            .and_then(|a| a.iter().find(|m| m["name"] == "bench"))
        {
            break m.clone();
        }
        ensure!(
            t.elapsed() < Duration::from_secs(900),
            "the model was not ready after 900 s (see {})",
            server.work.join("serve.log").display()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let spec: ParamSpec = serde_json::from_value(info["params"].clone())?;
    let params = Params::from_spec(spec, args.insecure_test_params)?;
    let ct_len = info["input_ciphertext_bytes"].as_u64().unwrap_or(0) as usize;
    let per_job = info["input_ciphertexts"].as_u64().unwrap_or(0) as usize;
    ensure!(ct_len > 0 && per_job > 0, "unexpected model info {info}");

    eprintln!("keys and {} ciphertexts of {ct_len} bytes", args.distinct);
    let mut kg = KeyGenerator::new(&params);
    let sk = kg.secret_key();
    let rlk = kg.relin_key(&sk).to_bytes();
    let (s, b) = call(
        ureq::post(&format!("{url}/api/keys?model=bench")),
        Some(&rlk),
    )?;
    let key_id = json_ok(s, &b, "uploading the key")?["key_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    drop(rlk);
    let mut enc = Encryptor::new(&params);
    let cts: Vec<(Vec<u8>, String)> = (0..args.distinct)
        .map(|i| -> Result<_> {
            let values: Vec<f64> = (0..params.slots())
                .map(|j| ((i * 7919 + j) % 1000) as f64 / 500.0 - 1.0)
                .collect();
            let ct = enc
                .encrypt_values_sk(&sk, &values, params.default_scale(), params.max_level())?
                .to_bytes();
            ensure!(ct.len() == ct_len, "ciphertext of {} bytes", ct.len());
            let sum = crate::serve::util::hex(&Sha256::digest(&ct));
            Ok((ct, sum))
        })
        .collect::<Result<_>>()?;

    let idle_rss = rss_bytes(pid);
    let mut runs = Vec::new();
    for &mb in &args.sizes_mb {
        let count = ((mb * 1_000_000).div_ceil(ct_len as u64) as usize).max(1);
        let jobs: Vec<Job> = (0..count.div_ceil(per_job))
            .map(|_| create_job(&url, &key_id))
            .collect::<Result<_>>()?;
        // Earlier runs' dirty pages are not this run's work.
        // SAFETY: sync(2) has no preconditions.
        unsafe { libc::sync() };
        let rss_before = rss_bytes(pid);
        reset_hwm(pid)?;
        let load_before = load_avg();
        let (server_cpu0, client_cpu0) = (cpu_seconds(pid), cpu_seconds(std::process::id()));
        let seconds = upload(&url, pid, &jobs, per_job, count, &cts, args.connections)?;
        let server_cpu = cpu_seconds(pid) - server_cpu0;
        let client_cpu = cpu_seconds(std::process::id()) - client_cpu0;
        let peak = hwm_bytes(pid);
        let bytes = (count * ct_len) as u64;
        let mb_s = bytes as f64 / 1e6 / seconds;
        eprintln!(
            "{count} ciphertexts, {:.1} MB in {seconds:.2} s: {mb_s:.0} MB/s, server peak RSS {:.1} MB, server CPU {server_cpu:.2} s, client CPU {client_cpu:.2} s",
            bytes as f64 / 1e6,
            peak as f64 / 1e6
        );
        runs.push(json!({
            "ciphertexts": count,
            "total_bytes": bytes,
            "seconds": seconds,
            "mb_per_s": mb_s,
            "server_rss_before_bytes": rss_before,
            "server_peak_rss_bytes": peak,
            "server_peak_rss_above_before_bytes": peak.saturating_sub(rss_before),
            "server_cpu_seconds": server_cpu,
            "mb_per_server_cpu_second": bytes as f64 / 1e6 / server_cpu.max(1e-9),
            "client_cpu_seconds": client_cpu,
            "load_avg_before": load_before,
        }));
        for job in &jobs {
            let (s, b) = call(
                ureq::delete(&format!("{url}/api/jobs/{}", job.id)).set("Authorization", &job.auth),
                None,
            )?;
            json_ok(s, &b, "deleting a job")?;
        }
    }

    let mut start = Value::Null;
    if args.start {
        let job = create_job(&url, &key_id)?;
        unsafe { libc::sync() };
        let seconds = upload(
            &url,
            pid,
            std::slice::from_ref(&job),
            per_job,
            per_job,
            &cts,
            args.connections,
        )?;
        let t = Instant::now();
        let (s, b) = call(
            ureq::post(&format!("{url}/api/jobs/{}/start", job.id)).set("Authorization", &job.auth),
            Some(b""),
        )?;
        json_ok(s, &b, "starting the job")?;
        let start_s = t.elapsed().as_secs_f64();
        let bytes = (per_job * ct_len) as u64;
        eprintln!(
            "whole job: {per_job} inputs, {:.1} MB uploaded in {seconds:.2} s, start (fsync) {start_s:.2} s",
            bytes as f64 / 1e6
        );
        start = json!({
            "inputs": per_job,
            "total_bytes": bytes,
            "upload_seconds": seconds,
            "upload_mb_per_s": bytes as f64 / 1e6 / seconds,
            "start_seconds": start_s,
            "upload_and_start_mb_per_s": bytes as f64 / 1e6 / (seconds + start_s),
        });
    }

    let report = json!({
        "model": args.model,
        "insecure_test_params": args.insecure_test_params,
        "log_n": info["params"]["log_n"],
        "ciphertext_bytes": ct_len,
        "connections": args.connections,
        "distinct_ciphertexts": args.distinct,
        "checksum_header": true,
        "server_idle_rss_bytes": idle_rss,
        "runs": runs,
        "whole_job_start": start,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "load_avg_end": load_avg(),
    });
    if args.json {
        println!("{report}");
    } else {
        println!("{}", serde_json::to_string_pretty(&report)?);
    }
    Ok(())
}
