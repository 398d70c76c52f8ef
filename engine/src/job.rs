//! Running a whole encrypted job: inputs from wherever they live, progress with an ETA,
//! cancellation. This is the entry point the service and the command line use.

use crate::exec::{execute, Encrypted, ExecError};
use crate::plan::Plan;
use beaa_ckks::{Ciphertext, Evaluator, RelinKey};
use beaa_model::Model;
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

/// How far a job is.
#[derive(Debug, Clone, PartialEq)]
pub struct Progress {
    /// Fraction of the work done, 0..=1 (weighted by ciphertext multiplications).
    pub fraction: f64,
    /// The layer that just finished.
    pub stage: String,
    pub elapsed_s: f64,
    /// Estimated seconds left, once something has been done.
    pub eta_s: Option<f64>,
}

type ProgressFn<'a> = Box<dyn FnMut(&Progress) + Send + 'a>;

/// Progress reporting and cancellation for [`run_job`]; everything optional.
#[derive(Default)]
pub struct RunControl<'a> {
    cancel: Option<Arc<AtomicBool>>,
    on_progress: Option<ProgressFn<'a>>,
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
    /// Called after every layer.
    pub fn on_progress(mut self, f: impl FnMut(&Progress) + Send + 'a) -> Self {
        self.on_progress = Some(Box::new(f));
        self
    }
    fn cancelled(&self) -> bool {
        self.cancel
            .as_ref()
            .is_some_and(|c| c.load(Ordering::Relaxed))
    }
}

/// The encrypted backend, checking the cancel flag before each expensive step.
struct Cancellable<'a> {
    inner: Encrypted<'a>,
    cancel: Option<&'a AtomicBool>,
}

impl crate::exec::Backend for Cancellable<'_> {
    type Value = Ciphertext;
    fn level(&self, v: &Ciphertext) -> isize {
        self.inner.level(v)
    }
    fn scale(&self, v: &Ciphertext) -> f64 {
        self.inner.scale(v)
    }
    fn combine(
        &self,
        terms: &[(&Ciphertext, f64)],
        constant: f64,
        target: f64,
    ) -> Result<Ciphertext, ExecError> {
        self.check()?;
        self.inner.combine(terms, constant, target)
    }
    fn square(&self, x: &Ciphertext) -> Result<Ciphertext, ExecError> {
        self.check()?;
        self.inner.square(x)
    }
    fn prime(&self, level: isize) -> f64 {
        self.inner.prime(level)
    }
}

impl Cancellable<'_> {
    fn check(&self) -> Result<(), ExecError> {
        match self.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(ExecError::Cancelled),
            _ => Ok(()),
        }
    }
}

/// Evaluates `model` on the element-wise packed `inputs` with the client's relinearization key
/// and returns one ciphertext per logit. `plan` must come from the same model and the
/// parameters of `ev` (it gives the progress weights).
pub fn run_job(
    model: &Model,
    plan: &Plan,
    ev: &Evaluator,
    rlk: &RelinKey,
    inputs: &(impl InputSource + ?Sized),
    mut control: RunControl<'_>,
) -> Result<Vec<Ciphertext>, ExecError> {
    if inputs.len() != model.input_len() {
        return Err(ExecError::Model(format!(
            "{} input ciphertexts for a model with {} input features",
            inputs.len(),
            model.input_len()
        )));
    }
    if control.cancelled() {
        return Err(ExecError::Cancelled);
    }
    let values = (0..inputs.len())
        .map(|k| inputs.load(k))
        .collect::<Result<Vec<_>, _>>()?;
    let total: usize = plan
        .materialized
        .values()
        .map(|(n, _)| n)
        .sum::<usize>()
        .max(1);
    let start = Instant::now();
    let mut done = 0usize;
    let backend = Cancellable {
        inner: Encrypted { ev, rlk },
        cancel: control.cancel.as_deref(),
    };
    let mut report = control.on_progress.take();
    let out = execute(&backend, model, values, &mut |node, made| {
        done += made.len();
        if let Some(f) = report.as_mut() {
            let fraction = (done as f64 / total as f64).min(1.0);
            let elapsed_s = start.elapsed().as_secs_f64();
            f(&Progress {
                fraction,
                stage: node.name.clone(),
                elapsed_s,
                eta_s: (fraction > 0.0).then(|| elapsed_s * (1.0 - fraction) / fraction),
            });
        }
    })?;
    Ok(out
        .into_iter()
        .map(|v| Arc::try_unwrap(v).unwrap_or_else(|shared| (*shared).clone()))
        .collect())
}
