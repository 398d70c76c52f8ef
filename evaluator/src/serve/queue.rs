//! The job queue: workers that run one job each at a time on all cores, and the expiry sweep.

use super::api::check_input;
use super::db::{self, Db};
use super::registry::ReadyModel;
use super::util::{now_ms, write_atomic};
use super::AppState;
use beaa_ckks::{Ciphertext, RelinKey};
use beaa_engine::{run_job, ExecError, InputSource, RunControl};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The input ciphertexts of a job directory, read and validated when the engine needs them.
struct JobInputs {
    params: beaa_ckks::Params,
    dir: PathBuf,
    n: usize,
}

impl InputSource for JobInputs {
    fn len(&self) -> usize {
        self.n
    }
    fn load(&self, k: usize) -> Result<Ciphertext, ExecError> {
        if k >= self.n {
            return Err(ExecError::Model(format!("no input ciphertext {k}")));
        }
        // The name comes from a parsed integer only.
        let bytes = std::fs::read(self.dir.join(format!("{k}.ct")))
            .map_err(|e| ExecError::Model(format!("input ciphertext {k}: {e}")))?;
        check_input(&self.params, &bytes)
            .map_err(|e| ExecError::Model(format!("input ciphertext {k}: {}", e.message)))
    }
}

/// Takes the oldest queued job whose model is ready; fails jobs whose model is gone.
fn claim(st: &AppState) -> Option<(String, Arc<ReadyModel>)> {
    let queued = match st.db.queued() {
        Ok(q) => q,
        Err(e) => {
            tracing::error!("reading the queue: {e}");
            return None;
        }
    };
    for (job_id, model) in queued {
        let Some(m) = st.registry.get(&model) else {
            if !st.registry.is_pending(&model) {
                let c = st.db.lock();
                if Db::set_state(&c, &job_id, db::QUEUED, db::RUNNING).unwrap_or(false) {
                    drop(c);
                    let _ =
                        st.db
                            .finish(&job_id, db::FAILED, Some("the model is no longer served"));
                }
            }
            continue;
        };
        let c = st.db.lock();
        if Db::set_state(&c, &job_id, db::QUEUED, db::RUNNING).unwrap_or(false) {
            return Some((job_id, m));
        }
    }
    None
}

pub async fn worker(st: Arc<AppState>, index: usize) {
    loop {
        // Register interest before looking, so a notification in between is not lost.
        let notified = st.queue.notified();
        match claim(&st) {
            Some((job_id, m)) => {
                tracing::info!(job_id = %job_id, worker = index, "job running");
                let st2 = st.clone();
                let id2 = job_id.clone();
                // Its intermediate tiles count against the disk quota while it runs.
                let reserved = m.work_peak;
                st.work_reserved.fetch_add(reserved, Ordering::Relaxed);
                let outcome = tokio::task::spawn_blocking(move || execute(&st2, &id2, &m)).await;
                st.work_reserved.fetch_sub(reserved, Ordering::Relaxed);
                // An idle server should not hold a finished job's peak memory.
                crate::release_freed_memory();
                let (state, error) = match outcome {
                    Ok(Ok(())) => (db::DONE, None),
                    Ok(Err(ExecError::Cancelled)) => (db::CANCELLED, None),
                    Ok(Err(e)) => (db::FAILED, Some(e.to_string())),
                    Err(e) => {
                        tracing::error!(job_id = %job_id, "job panicked: {e}");
                        (db::FAILED, Some("internal error".to_string()))
                    }
                };
                st.cancels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&job_id);
                match st.db.finish(&job_id, state, error.as_deref()) {
                    Ok(true) => {
                        tracing::info!(job_id = %job_id, state, error = error.as_deref(), "job finished");
                        if state == db::DONE {
                            // The inputs and checkpoints are no longer needed.
                            let _ = st.db.delete_inputs(&job_id);
                            let dir = st.job_dir(&job_id).join("inputs");
                            let freed = super::util::dir_size(&dir);
                            if std::fs::remove_dir_all(&dir).is_ok() {
                                st.sub_disk(freed);
                            }
                            // Not counted: the reservation above stood for it.
                            let _ = std::fs::remove_dir_all(
                                st.job_dir(&job_id).join(super::util::WORK_DIR),
                            );
                        }
                    }
                    Ok(false) => {
                        // Deleted while running: drop whatever it left.
                        let st2 = st.clone();
                        let _ = tokio::task::spawn_blocking(move || st2.remove_job_files(&job_id))
                            .await;
                    }
                    Err(e) => tracing::error!(job_id = %job_id, "recording a job's end: {e}"),
                }
            }
            None => {
                let _ = tokio::time::timeout(Duration::from_secs(2), notified).await;
            }
        }
    }
}

/// Runs one job to its result file.
fn execute(st: &AppState, job_id: &str, m: &ReadyModel) -> Result<(), ExecError> {
    let row = st
        .db
        .job(job_id)
        .map_err(|e| ExecError::Model(format!("database: {e}")))?
        .ok_or(ExecError::Cancelled)?;
    if row.fingerprint != m.fingerprint {
        return Err(ExecError::Model(
            "the model's parameters changed since the job was created".into(),
        ));
    }
    let flag = Arc::new(AtomicBool::new(false));
    st.cancels
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(job_id.to_owned(), flag.clone());
    let key_path = st.data_dir.join("keys").join(format!("{}.rlk", row.key_id));
    let key_bytes = std::fs::read(&key_path)
        .map_err(|_| ExecError::Model("the relinearization key is missing (expired?)".into()))?;
    let rlk = RelinKey::from_bytes(&m.params, &key_bytes)
        .map_err(|e| ExecError::Model(format!("relinearization key: {e}")))?;
    drop(key_bytes);
    let inputs = JobInputs {
        params: m.params.clone(),
        dir: st.job_dir(job_id).join("inputs"),
        n: m.model.input_len(),
    };
    let work_dir = st.job_dir(job_id).join(super::util::WORK_DIR);
    let identity = beaa_engine::work_dir_identity(&m.model, &m.plan, &m.params);
    if beaa_engine::store::work_dir_stamp(&work_dir).is_some_and(|stamp| stamp != identity) {
        // The engine empties the directory: say why this resumed job starts over.
        tracing::warn!(
            job_id = %job_id,
            "the job's intermediate tiles belong to another plan (was the server restarted \
             with another --winograd?): computing again from its inputs"
        );
    }
    let mut last: Option<Instant> = None;
    let db = &st.db;
    let times = Arc::new(beaa_engine::OpTimes::default());
    let control =
        // Finished tiles are checkpoints: a restarted job skips them.
        RunControl::new()
            .work_dir(work_dir)
            .cancel_flag(flag)
            .op_times(Arc::clone(&times))
            .on_progress(move |p: &beaa_engine::Progress| {
                if last
                    .is_none_or(|t| t.elapsed() >= Duration::from_millis(st.progress_interval_ms))
                {
                    last = Some(Instant::now());
                    db.set_progress(job_id, p.fraction, &p.stage, p.eta_s);
                }
            });
    let logits = run_job(&m.model, &m.plan, &m.ev, &rlk, &inputs, control)?;
    // For operators: where this run's time went (a resumed job counts only this run).
    let split: Vec<String> = times
        .all_seconds()
        .iter()
        .map(|(op, s)| format!("{op} {s:.1}"))
        .collect();
    tracing::info!(job_id = %job_id, thread_seconds = %split.join(", "), "job computed");
    let mut out = Vec::new();
    out.extend_from_slice(&(logits.len() as u32).to_le_bytes());
    for ct in &logits {
        let bytes = ct.to_bytes();
        out.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        out.extend_from_slice(&bytes);
    }
    let path = st.job_dir(job_id).join("result.bin");
    write_atomic(&path, &out).map_err(|e| ExecError::Model(format!("writing the result: {e}")))?;
    st.disk_used.fetch_add(out.len() as u64, Ordering::Relaxed);
    Ok(())
}

/// Removes expired jobs and keys every `interval`.
pub async fn sweeper(st: Arc<AppState>, interval: Duration) {
    loop {
        tokio::time::sleep(interval).await;
        let st2 = st.clone();
        let _ = tokio::task::spawn_blocking(move || sweep(&st2)).await;
    }
}

fn sweep(st: &AppState) {
    let cutoff = now_ms() - st.ttl_ms;
    match st.db.expired_jobs(cutoff) {
        Ok(jobs) => {
            for job_id in jobs {
                if let Some(flag) = st
                    .cancels
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&job_id)
                {
                    flag.store(true, Ordering::Relaxed);
                }
                if st.db.delete_job(&job_id).is_ok() {
                    st.remove_job_files(&job_id);
                    tracing::info!(job_id = %job_id, "job expired");
                }
            }
        }
        Err(e) => tracing::error!("expiry sweep: {e}"),
    }
    match st.db.take_expired_keys(cutoff) {
        Ok(keys) => {
            for key_id in keys {
                if super::util::is_hex(&key_id, 64) {
                    let path = st.data_dir.join("keys").join(format!("{key_id}.rlk"));
                    let size = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
                    if std::fs::remove_file(&path).is_ok() {
                        st.sub_disk(size);
                    }
                }
            }
        }
        Err(e) => tracing::error!("expiry sweep (keys): {e}"),
    }
}
