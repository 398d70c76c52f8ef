//! Running a whole encrypted job: inputs from wherever they live, progress with an ETA,
//! cancellation. This is the entry point the service and the command line use.

use crate::exec::ExecError;
use crate::optime::OpTimes;
use crate::plan::Plan;
use crate::store::{DirStore, MemStore, Store};
use crate::stream::Runner;
use beaa_ckks::{Ciphertext, Evaluator, Params, RelinKey};
use beaa_model::Model;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Where the input ciphertexts come from (memory, files of a job directory, ...), one per
/// input feature in `[C, H, W]` row-major order.
pub trait InputSource: Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Input ciphertext `k`; errors become the job's error.
    fn load(&self, k: usize) -> Result<Ciphertext, ExecError>;
}

impl InputSource for [Ciphertext] {
    fn len(&self) -> usize {
        <[Ciphertext]>::len(self)
    }
    fn load(&self, k: usize) -> Result<Ciphertext, ExecError> {
        self.get(k)
            .cloned()
            .ok_or_else(|| ExecError::Model(format!("no input ciphertext {k}")))
    }
}

/// Input ciphertexts as files (one `beaa-ckks` ciphertext each, e.g. seeded uploads), read
/// and validated when the executor first needs them.
pub struct FileInputs {
    params: beaa_ckks::Params,
    paths: Vec<PathBuf>,
}

impl FileInputs {
    pub fn new(params: &beaa_ckks::Params, paths: Vec<PathBuf>) -> Self {
        FileInputs {
            params: params.clone(),
            paths,
        }
    }
}

impl InputSource for FileInputs {
    fn len(&self) -> usize {
        self.paths.len()
    }
    fn load(&self, k: usize) -> Result<Ciphertext, ExecError> {
        let path = self
            .paths
            .get(k)
            .ok_or_else(|| ExecError::Model(format!("no input ciphertext {k}")))?;
        let bytes =
            std::fs::read(path).map_err(|e| ExecError::Io(format!("{}: {e}", path.display())))?;
        Ciphertext::from_bytes(&self.params, &bytes)
            .map_err(|e| ExecError::Model(format!("input ciphertext {k}: {e}")))
    }
}

/// How far a job is.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Fraction of the work done, 0..=1 (weighted by ciphertext multiplications).
    pub fraction: f64,
    /// The layer whose tiles were just computed (stages overlap: a layer is consumed by the
    /// next while it is still being made).
    pub stage: String,
    pub elapsed_s: f64,
    /// Estimated seconds left, once something has been done.
    pub eta_s: Option<f64>,
    /// Bytes of intermediate ciphertexts held in the store (the work directory) right now.
    pub stored_bytes: u64,
}

type ProgressFn<'a> = Box<dyn FnMut(&Progress) + Send + 'a>;

/// Progress reporting, cancellation and the work directory for [`run_job`]; all optional.
#[derive(Default)]
pub struct RunControl<'a> {
    cancel: Option<Arc<AtomicBool>>,
    on_progress: Option<ProgressFn<'a>>,
    work_dir: Option<PathBuf>,
    times: Option<Arc<OpTimes>>,
}

impl<'a> RunControl<'a> {
    pub fn new() -> Self {
        Self::default()
    }
    /// The job stops with [`ExecError::Cancelled`] soon after `flag` becomes true.
    pub fn cancel_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }
    /// Called after every batch of tiles (a few per second at most on big models).
    pub fn on_progress(mut self, f: impl FnMut(&Progress) + Send + 'a) -> Self {
        self.on_progress = Some(Box::new(f));
        self
    }
    /// Keep intermediate tiles as files here instead of in memory. They are the job's
    /// checkpoints: running again with the same directory skips finished tiles.
    pub fn work_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.work_dir = Some(dir.into());
        self
    }
    /// Add the job's thread-seconds per kind of operation to `times`.
    pub fn op_times(mut self, times: Arc<OpTimes>) -> Self {
        self.times = Some(times);
        self
    }
}

/// Evaluates `model` on the element-wise packed `inputs` with the client's relinearization key
/// and returns one ciphertext per logit. `plan` must come from `model` and the parameters of
/// `ev`. Resident memory is bounded by the stored tiles a few raster rows of one layer need,
/// plus one tile's working set per thread; stored bytes by a few segments of each stored
/// layer, except the last one before the logits, which is kept whole.
pub fn run_job(
    model: &Model,
    plan: &Plan,
    ev: &Evaluator,
    rlk: &RelinKey,
    inputs: &(impl InputSource + ?Sized),
    mut control: RunControl<'_>,
) -> Result<Vec<Ciphertext>, ExecError> {
    if inputs.len() != model.input_len() || inputs.len() != plan.graph.layers[0].len() {
        return Err(ExecError::Model(format!(
            "{} input ciphertexts for a model with {} input features",
            inputs.len(),
            model.input_len()
        )));
    }
    if plan.input_level != ev.params().max_level() {
        return Err(ExecError::Model(
            "the plan was made for another parameter set".into(),
        ));
    }
    let cancel = control.cancel.clone();
    if cancel.as_ref().is_some_and(|c| c.load(Ordering::Relaxed)) {
        return Err(ExecError::Cancelled);
    }
    let mem;
    let dir;
    let store: &dyn Store = match &control.work_dir {
        Some(path) => {
            let identity = work_dir_identity(model, plan, ev.params());
            dir = DirStore::open(path, ev.params(), &identity)?;
            &dir
        }
        None => {
            mem = MemStore::default();
            &mem
        }
    };
    let times = control.times.clone().unwrap_or_default();
    let runner = Runner {
        g: &plan.graph,
        schedule: &plan.schedule,
        segments: &plan.segments,
        ev,
        rlk,
        inputs,
        store,
        cancel: cancel.as_deref(),
        times: &times,
        winograd_weights: plan
            .graph
            .layers
            .iter()
            .map(|_| Default::default())
            .collect(),
    };
    let total: u64 = plan
        .schedule
        .stages
        .iter()
        .map(|s| s.work.iter().sum::<u64>())
        .sum::<u64>()
        .max(1);
    let start = Instant::now();
    let mut report = control.on_progress.take();
    // The first report anchors the rate (a resumed job starts part-way).
    let mut anchor: Option<(f64, f64)> = None;
    runner.run(&mut |si, done| {
        let Some(f) = report.as_mut() else { return };
        let fraction = (done as f64 / total as f64).min(1.0);
        let elapsed_s = start.elapsed().as_secs_f64();
        let (f0, e0) = *anchor.get_or_insert((fraction, elapsed_s));
        let rate = (fraction - f0) / (elapsed_s - e0).max(1e-9);
        let layer = &plan.graph.layers[plan.schedule.stages[si].layer as usize];
        f(&Progress {
            fraction,
            stage: layer.name.clone(),
            elapsed_s,
            eta_s: (rate > 0.0).then(|| (1.0 - fraction) / rate),
            stored_bytes: store.bytes_held(),
        });
    })
}

/// The stamp of a job's work directory: tiles made under another model, parameter set or
/// plan are discarded, not read (a server restarted with another `--winograd` recomputes its
/// running job). "by position": stored layers are kept per position (before, a Winograd
/// plan's were kept per 2x2 block under the same file names), so older tiles are dropped.
pub fn work_dir_identity(model: &Model, plan: &Plan, params: &Params) -> String {
    format!(
        "model {} | params {} | {} | by position",
        model.manifest.name,
        hex(params.fingerprint()),
        plan.work_identity()
    )
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
