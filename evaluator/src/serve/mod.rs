//! `beaa serve`: the evaluator service (contract: `evaluator/API.md`).
//!
//! Job and key metadata live in SQLite (WAL) in the data directory; ciphertexts are files
//! whose names are built only from server-generated ids and parsed integers:
//! `keys/<sha256>.rlk`, `jobs/<job_id>/inputs/<k>.ct`, `jobs/<job_id>/result.bin`. Uploads
//! stream to `tmp/` and are renamed into place once complete and validated: an acknowledged
//! upload survives a crash of the server (kill -9). Keys are fsynced before they are
//! acknowledged; a job's inputs are fsynced together when the job starts, so an acknowledged
//! start survives a power loss too (see `evaluator/API.md`, Durability). A queue
//! runs jobs one at a time (`--workers`) on all cores; a restart puts queued and running jobs
//! back into the queue.

mod api;
mod db;
mod error;
mod openapi;
mod queue;
mod registry;
mod static_files;
pub mod util;
pub mod validate;

use anyhow::{Context, Result};
use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post, put};
use axum::Router;
use error::{ApiError, ApiResult};
use registry::{ReadyModel, Registry};
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Where jobs, keys and the database live.
    #[arg(long, default_value = "beaa-data")]
    pub data_dir: PathBuf,
    /// The model zoo (default: $BEAA_ZOO, ./models/zoo, or models/zoo above the executable).
    #[arg(long)]
    pub zoo: Option<PathBuf>,
    /// The web page's directory (default: ./web or web/ above the executable).
    #[arg(long)]
    pub web_dir: Option<PathBuf>,
    /// Serve small NOT SECURE parameter sets (tests and CI only).
    #[arg(long)]
    pub insecure_test_params: bool,
    /// Run the 3x3 convolutions over at least MIN_CHANNELS input channels (default
    /// `beaa_engine::WINOGRAD_MIN_CHANNELS`: conv2 and conv3 of the shipped models) in
    /// Winograd's F(2x2, 3x3) form, as `eval --encrypted --winograd` does: 1.46x faster whole
    /// CIFAR-10 jobs, ~1 GB more peak memory, larger `work_dir_bytes` (BENCHMARKS.md). Clients
    /// need nothing different. A job resumed after a restart under another setting recomputes
    /// from its inputs (its intermediate tiles belong to the other plan).
    #[arg(long, value_name = "MIN_CHANNELS", num_args = 0..=1)]
    pub winograd: Option<Option<usize>>,
    /// Jobs run at the same time (each on all cores); 0 accepts jobs but runs none
    /// (upload benchmarks).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
    /// Jobs, their files and unused keys are removed this long after creation.
    #[arg(long, default_value_t = 24.0)]
    pub job_ttl_hours: f64,
    /// New uploads are refused (507) when the data directory would exceed this; a running job
    /// counts with the most its intermediate tiles take (`beaa plan`: "work dir"), and a job
    /// is not started (507) while that does not fit.
    #[arg(long, default_value_t = 100.0)]
    pub max_disk_gb: f64,
    /// Seconds between expiry sweeps.
    #[arg(long, default_value_t = 60, hide = true)]
    pub sweep_interval_s: u64,
    /// Milliseconds between progress writes to the database.
    #[arg(long, default_value_t = 1000, hide = true)]
    pub progress_interval_ms: u64,
    /// Milliseconds the planner waits before it plans the zoo: tests of clients that meet a
    /// server still preparing its models (a full-size model takes tens of seconds).
    #[arg(long, default_value_t = 0, hide = true)]
    pub plan_delay_ms: u64,
}

pub struct AppState {
    pub db: db::Db,
    pub data_dir: PathBuf,
    pub registry: Registry,
    pub web_dir: Option<PathBuf>,
    pub cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// Jobs between `POST .../start` and the queue (their inputs are being synced).
    pub starting: Mutex<HashSet<String>>,
    pub queue: tokio::sync::Notify,
    /// Bytes of keys, inputs and results (not the running jobs' intermediate tiles).
    pub disk_used: AtomicU64,
    /// Working space reserved by running jobs: their plans' peak of intermediate tiles.
    pub work_reserved: AtomicU64,
    pub max_disk: u64,
    pub ttl_ms: i64,
    pub progress_interval_ms: u64,
    /// Bounds the memory of concurrent key validations (inputs are validated as they stream).
    pub key_permits: tokio::sync::Semaphore,
}

impl AppState {
    /// A served model, 503 while it is still being planned, 404 otherwise.
    pub fn model(&self, name: &str) -> ApiResult<Arc<ReadyModel>> {
        if let Some(m) = self.registry.get(name) {
            return Ok(m);
        }
        if registry::valid_name(name) && self.registry.is_pending(name) {
            return Err(ApiError::new(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "model_loading",
                "the model is still being prepared; retry shortly",
            ));
        }
        Err(ApiError::not_found("model_not_found", "no such model"))
    }

    /// The directory of a job; `job_id` is always a server-generated hex id here.
    pub fn job_dir(&self, job_id: &str) -> PathBuf {
        debug_assert!(util::is_hex(job_id, 32));
        self.data_dir.join("jobs").join(job_id)
    }

    /// Marks a job as starting; None when it already is. The mark goes with the guard.
    pub fn begin_start(&self, job_id: &str) -> Option<StartGuard<'_>> {
        let mut set = self.starting.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(job_id.to_owned()).then(|| StartGuard {
            st: self,
            job_id: job_id.to_owned(),
        })
    }

    pub fn is_starting(&self, job_id: &str) -> bool {
        self.starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(job_id)
    }

    /// Bytes counted against the quota: stored files and running jobs' working space.
    pub fn disk_committed(&self) -> u64 {
        self.disk_used
            .load(Ordering::Relaxed)
            .saturating_add(self.work_reserved.load(Ordering::Relaxed))
    }

    pub fn check_quota(&self, extra: u64) -> ApiResult<()> {
        if self.disk_committed().saturating_add(extra) > self.max_disk {
            return Err(ApiError::new(
                axum::http::StatusCode::INSUFFICIENT_STORAGE,
                "disk_quota",
                "the server's disk quota is exhausted; retry later",
            ));
        }
        Ok(())
    }

    pub fn sub_disk(&self, n: u64) {
        let _ = self
            .disk_used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
    }

    /// Removes a job's directory (blocking).
    pub fn remove_job_files(&self, job_id: &str) {
        if !util::is_hex(job_id, 32) {
            return;
        }
        let dir = self.job_dir(job_id);
        let size = util::counted_size(&dir);
        if std::fs::remove_dir_all(&dir).is_ok() {
            self.sub_disk(size);
        }
    }
}

/// Removes a job from [`AppState::starting`] when dropped.
pub struct StartGuard<'a> {
    st: &'a AppState,
    job_id: String,
}

impl Drop for StartGuard<'_> {
    fn drop(&mut self) {
        self.st
            .starting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.job_id);
    }
}

/// Logs method, route template, status, job id and time; never tokens, bodies or queries.
async fn log_request(req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "(static)".to_owned());
    let job_id = req
        .uri()
        .path()
        .strip_prefix("/api/jobs/")
        .and_then(|rest| rest.split('/').next())
        .filter(|id| util::is_hex(id, 32))
        .map(str::to_owned);
    let t = std::time::Instant::now();
    let resp = next.run(req).await;
    tracing::info!(
        method = %method,
        route = %route,
        status = resp.status().as_u16(),
        job_id = job_id.as_deref().unwrap_or("-"),
        ms = (t.elapsed().as_secs_f64() * 1e3) as u64,
        "request"
    );
    resp
}

pub fn router(st: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/api/health", get(api::health))
        .route("/api/models", get(api::models))
        .route("/api/openapi.json", get(openapi::document))
        .route("/api/keys", post(api::upload_key))
        .route("/api/jobs", post(api::create_job))
        .route(
            "/api/jobs/{id}",
            get(api::job_status).delete(api::delete_job),
        )
        .route("/api/jobs/{id}/inputs", get(api::list_inputs))
        .route("/api/jobs/{id}/inputs/{k}", put(api::put_input))
        .route("/api/jobs/{id}/start", post(api::start_job))
        .route("/api/jobs/{id}/result", get(api::job_result));
    api.fallback(static_files::serve)
        .layer(axum::middleware::from_fn(log_request))
        // Upload routes read their bodies as streams with their own exact limits; this caps
        // everything else.
        .layer(axum::extract::DefaultBodyLimit::max(api::JSON_LIMIT))
        .with_state(st)
}

fn prepare_data_dir(dir: &Path) -> Result<()> {
    for sub in ["jobs", "keys", "tmp"] {
        std::fs::create_dir_all(dir.join(sub))
            .with_context(|| format!("creating {}", dir.join(sub).display()))?;
    }
    // Uploads cut off by a crash.
    if let Ok(rd) = std::fs::read_dir(dir.join("tmp")) {
        for e in rd.flatten() {
            let _ = std::fs::remove_file(e.path());
        }
    }
    Ok(())
}

pub fn run(args: &ServeArgs) -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    prepare_data_dir(&args.data_dir)?;
    let db = db::Db::open(&args.data_dir.join("beaa.sqlite")).context("opening the database")?;
    let requeued = db.requeue_running()?;
    let web_dir = registry::find_web(args.web_dir.as_deref());
    let zoo = registry::find_zoo(args.zoo.as_deref());
    let winograd = crate::plan_cmd::winograd_min_channels(args.winograd);
    tracing::info!(
        data_dir = %args.data_dir.display(),
        zoo = ?zoo,
        web_dir = ?web_dir,
        insecure_test_params = args.insecure_test_params,
        winograd_min_channels = ?winograd,
        requeued,
        kernels = beaa_ckks::arith::kernels::kernel_path(),
        "starting"
    );
    if args.insecure_test_params {
        tracing::warn!("--insecure-test-params: serving NOT SECURE parameter sets");
    }
    let st = Arc::new(AppState {
        db,
        data_dir: args.data_dir.clone(),
        registry: Registry::default(),
        web_dir,
        cancels: Mutex::new(HashMap::new()),
        starting: Mutex::new(HashSet::new()),
        queue: tokio::sync::Notify::new(),
        disk_used: AtomicU64::new(util::counted_size(&args.data_dir)),
        work_reserved: AtomicU64::new(0),
        max_disk: (args.max_disk_gb.max(0.0) * 1e9) as u64,
        ttl_ms: (args.job_ttl_hours.max(0.0) * 3.6e6) as i64,
        progress_interval_ms: args.progress_interval_ms,
        key_permits: tokio::sync::Semaphore::new(2),
    });

    st.registry.discover(zoo.as_deref());
    // Plans in a thread of its own: the listener is up long before a large model is ready.
    {
        let st = st.clone();
        let insecure = args.insecure_test_params;
        let delay = std::time::Duration::from_millis(args.plan_delay_ms);
        std::thread::Builder::new()
            .name("planner".into())
            .spawn(move || {
                std::thread::sleep(delay);
                let notify = || st.queue.notify_waiters();
                st.registry.plan_all(insecure, winograd, &notify)
            })?;
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        for i in 0..args.workers {
            tokio::spawn(queue::worker(st.clone(), i));
        }
        tokio::spawn(queue::sweeper(
            st.clone(),
            Duration::from_secs(args.sweep_interval_s.max(1)),
        ));
        let listener = tokio::net::TcpListener::bind(args.addr)
            .await
            .with_context(|| format!("listening on {}", args.addr))?;
        let local = listener.local_addr()?;
        tracing::info!(addr = %local, "listening");
        // A line on stdout for scripts and tests that started us with port 0.
        println!("listening on http://{local}");
        axum::serve(listener, router(st))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await?;
        anyhow::Ok(())
    })
}
