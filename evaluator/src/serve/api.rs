//! The `/api/` handlers (contract: `evaluator/API.md`).

use super::db::{self, Db, JobRow};
use super::error::{ApiError, ApiResult};
use super::util::{ct_eq, fsync_dir, hex, is_hex, random_hex, sha256};
use super::validate::{InputValidator, Invalid};
use super::AppState;
use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use beaa_ckks::{Ciphertext, RelinKey};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Largest JSON request body.
pub const JSON_LIMIT: usize = 16 * 1024;
/// A body that sends nothing for this long is cut off (`408`): a client cannot hold a
/// connection, a temporary file and a task forever by declaring more than it sends.
const BODY_IDLE: std::time::Duration = std::time::Duration::from_secs(60);
/// Most missing indices listed by `GET .../inputs`.
const MISSING_LIST: usize = 1000;

type St = State<Arc<AppState>>;

pub async fn health() -> Json<Value> {
    Json(json!({"ok": true}))
}

pub async fn models(State(st): St) -> Json<Value> {
    let list: Vec<Value> = st.registry.list().iter().map(|m| m.info.clone()).collect();
    Json(json!({"models": list, "loading": st.registry.loading()}))
}

/// A temporary upload file, removed on drop unless kept (a client that disconnects mid-body
/// leaves nothing behind).
struct TempFile {
    path: PathBuf,
    keep: bool,
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Reads and discards a rejected body when its declared length is modest, so that a client
/// still sending it reads the error instead of a broken pipe. Bodies declared larger (or
/// slower than 30 s) are cut off with the connection.
async fn drain(headers: &HeaderMap, body: Body, expected: usize) {
    let limit = expected.max(1 << 20) as u64 + (1 << 20);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<u64>().ok());
    if declared.is_none_or(|d| d > limit) {
        return;
    }
    let mut stream = body.into_data_stream();
    let mut seen = 0u64;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while let Some(Ok(chunk)) = stream.next().await {
            seen += chunk.len() as u64;
            if seen > limit {
                break;
            }
        }
    })
    .await;
}

/// The next piece of a body, or `408` after [`BODY_IDLE`] without one.
async fn next_chunk(
    stream: &mut axum::body::BodyDataStream,
) -> ApiResult<Option<Result<axum::body::Bytes, axum::Error>>> {
    tokio::time::timeout(BODY_IDLE, stream.next())
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "body_timeout",
                format!("no body data for {} s", BODY_IDLE.as_secs()),
            )
        })
}

/// Bytes gathered from the body before they are hashed and written in one blocking call.
const WRITE_BATCH: usize = 1 << 20;

/// The blocking half of [`receive`]: the file and the running hash travel together.
struct Sink {
    file: std::fs::File,
    hasher: Sha256,
    validator: Option<InputValidator>,
}

impl Sink {
    fn write(mut self, chunks: Vec<axum::body::Bytes>) -> std::io::Result<Self> {
        use std::io::Write;
        for c in &chunks {
            self.hasher.update(c);
            if let Some(v) = &mut self.validator {
                v.feed(c);
            }
            self.file.write_all(c)?;
        }
        Ok(self)
    }
}

/// What [`receive`] stored: the file, its SHA-256 and, when asked for, the validator's verdict.
struct Received {
    tmp: TempFile,
    digest: [u8; 32],
    verdict: Option<Result<(), Invalid>>,
}

/// Streams a body of exactly `expected` bytes to a temporary file under `tmp/`, hashing it
/// (and validating it when given a validator) on the way. The declared length is checked before anything is read. Nothing is fsynced here: a file
/// that is complete when renamed into place survives a crash of the server process (the
/// page cache belongs to the kernel); durability against power loss is the caller's choice
/// (a key is synced at once, a job's inputs when the job starts).
async fn receive(
    st: &AppState,
    headers: &HeaderMap,
    body: Body,
    expected: usize,
    validator: Option<InputValidator>,
) -> ApiResult<Received> {
    if let Some(v) = headers.get(header::CONTENT_LENGTH) {
        let declared: u64 = v
            .to_str()
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| ApiError::bad_request("bad_length", "unreadable Content-Length"))?;
        if declared != expected as u64 {
            drain(headers, body, expected).await;
            let message = format!("the body must be exactly {expected} bytes, {declared} declared");
            return Err(if declared > expected as u64 {
                ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
            } else {
                ApiError::bad_request("wrong_size", message)
            });
        }
    }
    if let Err(e) = st.check_quota(expected as u64) {
        drain(headers, body, expected).await;
        return Err(e);
    }
    let tmp = TempFile {
        path: st.data_dir.join("tmp").join(format!(
            "{}.part",
            random_hex(12).map_err(|e| ApiError::internal("random", e))?
        )),
        keep: false,
    };
    let write_error = |e: std::io::Error| ApiError::internal("writing an upload", e);
    let joined = |e: tokio::task::JoinError| ApiError::internal("writing an upload", e);
    let file = std::fs::File::create(&tmp.path).map_err(write_error)?;
    let mut sink = Some(Sink {
        file,
        hasher: Sha256::new(),
        validator,
    });
    let mut batch: Vec<axum::body::Bytes> = Vec::new();
    let mut batch_len = 0usize;
    let mut count = 0usize;
    let mut stream = body.into_data_stream();
    loop {
        let next = next_chunk(&mut stream).await?;
        if let Some(chunk) = next.as_ref() {
            let chunk = chunk
                .as_ref()
                .map_err(|_| ApiError::bad_request("body_error", "the body was cut off"))?;
            count += chunk.len();
            if count > expected {
                return Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "too_large",
                    format!("the body must be exactly {expected} bytes"),
                ));
            }
            batch_len += chunk.len();
            batch.push(chunk.clone());
        }
        if batch_len >= WRITE_BATCH || (next.is_none() && batch_len > 0) {
            let s = sink.take().expect("the sink comes back after every batch");
            let chunks = std::mem::take(&mut batch);
            batch_len = 0;
            sink = Some(
                tokio::task::spawn_blocking(move || s.write(chunks))
                    .await
                    .map_err(joined)?
                    .map_err(write_error)?,
            );
        }
        if next.is_none() {
            break;
        }
    }
    if count != expected {
        return Err(ApiError::bad_request(
            "wrong_size",
            format!("the body is {count} bytes, expected exactly {expected}"),
        ));
    }
    let sink = sink.expect("the sink comes back after every batch");
    Ok(Received {
        tmp,
        digest: sink.hasher.finalize().into(),
        verdict: sink.validator.map(InputValidator::finish),
    })
}

/// Reads a JSON body of at most [`JSON_LIMIT`] bytes.
async fn read_json<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
) -> ApiResult<T> {
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("JSON bodies are limited to {JSON_LIMIT} bytes"),
        )
    };
    if let Some(v) = headers.get(header::CONTENT_LENGTH) {
        match v.to_str().ok().and_then(|s| s.parse::<u64>().ok()) {
            Some(n) if n <= JSON_LIMIT as u64 => {}
            Some(_) => {
                drain(headers, body, 0).await;
                return Err(too_large());
            }
            None => {
                return Err(ApiError::bad_request(
                    "bad_length",
                    "unreadable Content-Length",
                ))
            }
        }
    }
    let mut buf = Vec::new();
    let mut stream = body.into_data_stream();
    while let Some(chunk) = next_chunk(&mut stream).await? {
        let chunk =
            chunk.map_err(|_| ApiError::bad_request("body_error", "the body was cut off"))?;
        if buf.len() + chunk.len() > JSON_LIMIT {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&buf).map_err(|e| ApiError::bad_request("bad_json", e.to_string()))
}

fn validation_error(what: &str, e: beaa_ckks::Error) -> ApiError {
    match e {
        beaa_ckks::Error::ParamsMismatch => ApiError::bad_request(
            "params_mismatch",
            format!("the {what} was made for another parameter set"),
        ),
        other => ApiError::bad_request("invalid_object", format!("invalid {what}: {other}")),
    }
}

pub async fn upload_key(
    State(st): St,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let mut body = Some(body);
    let r = upload_key_inner(&st, query, &headers, &mut body).await;
    if r.is_err() {
        if let Some(b) = body.take() {
            drain(&headers, b, 0).await;
        }
    }
    r
}

async fn upload_key_inner(
    st: &Arc<AppState>,
    query: Option<String>,
    headers: &HeaderMap,
    body: &mut Option<Body>,
) -> ApiResult<Response> {
    let name = query
        .as_deref()
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("model="))
        .ok_or_else(|| ApiError::bad_request("missing_model", "?model=NAME is required"))?;
    let m = st.model(name)?;
    let body = body
        .take()
        .ok_or_else(|| ApiError::internal("upload", "no body"))?;
    let Received {
        mut tmp, digest, ..
    } = receive(st, headers, body, m.rlk_len, None).await?;
    let key_id = hex(&digest);
    let dest = st.data_dir.join("keys").join(format!("{key_id}.rlk"));
    {
        let _permit = st
            .key_permits
            .acquire()
            .await
            .map_err(|e| ApiError::internal("semaphore", e))?;
        let path = tmp.path.clone();
        let params = m.params.clone();
        tokio::task::spawn_blocking(move || -> ApiResult<()> {
            let bytes = std::fs::read(&path).map_err(|e| ApiError::internal("reading a key", e))?;
            RelinKey::from_bytes(&params, &bytes)
                .map_err(|e| validation_error("relinearization key", e))?;
            // Keys are durable as soon as they are acknowledged (one per client session).
            std::fs::File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| ApiError::internal("syncing a key", e))?;
            Ok(())
        })
        .await
        .map_err(|e| ApiError::internal("key validation", e))??;
    }
    let created = {
        // The lock orders the rename against the expiry sweep.
        let _c = st.db.lock();
        if !dest.exists() {
            std::fs::rename(&tmp.path, &dest)
                .map_err(|e| ApiError::internal("storing a key", e))?;
            tmp.keep = true;
            fsync_dir(dest.parent().unwrap_or(&st.data_dir))
                .map_err(|e| ApiError::internal("storing a key", e))?;
            st.disk_used.fetch_add(m.rlk_len as u64, Ordering::Relaxed);
        }
        drop(_c);
        st.db
            .upsert_key(&key_id, &m.fingerprint, m.rlk_len as u64)?
    };
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(json!({"key_id": key_id}))).into_response())
}

#[derive(Deserialize)]
pub struct CreateJob {
    model: String,
    key_id: String,
    batch: i64,
}

pub async fn create_job(State(st): St, headers: HeaderMap, body: Body) -> ApiResult<Response> {
    let req: CreateJob = read_json(&headers, body).await?;
    let m = st.model(&req.model)?;
    if !is_hex(&req.key_id, 64) {
        return Err(ApiError::bad_request(
            "bad_key_id",
            "key_id is 64 lowercase hex digits",
        ));
    }
    let fingerprint = st
        .db
        .key_fingerprint(&req.key_id)?
        .ok_or_else(|| ApiError::not_found("key_not_found", "no such key: upload it first"))?;
    if fingerprint != m.fingerprint {
        return Err(ApiError::bad_request(
            "params_mismatch",
            "the key was made for another parameter set than the model's",
        ));
    }
    if !st
        .data_dir
        .join("keys")
        .join(format!("{}.rlk", req.key_id))
        .is_file()
    {
        return Err(ApiError::not_found(
            "key_not_found",
            "the key has expired: upload it again",
        ));
    }
    let slots = m.params.slots() as i64;
    if !(1..=slots).contains(&req.batch) {
        return Err(ApiError::bad_request(
            "bad_batch",
            format!("batch must be in 1..={slots}"),
        ));
    }
    let job_id = random_hex(16).map_err(|e| ApiError::internal("random", e))?;
    let token = random_hex(32).map_err(|e| ApiError::internal("random", e))?;
    let n = m.model.input_len();
    std::fs::create_dir_all(st.job_dir(&job_id).join("inputs"))
        .map_err(|e| ApiError::internal("creating a job directory", e))?;
    st.db.create_job(
        &job_id,
        &sha256(token.as_bytes()),
        &m.name,
        &m.fingerprint,
        &req.key_id,
        req.batch,
        n as i64,
    )?;
    tracing::info!(job_id = %job_id, model = %m.name, batch = req.batch, "job created");
    Ok((
        StatusCode::CREATED,
        Json(json!({"job_id": job_id, "token": token, "inputs": n})),
    )
        .into_response())
}

/// The job `id` if the request carries its token; 404 for an unknown id or another token.
fn authorize(st: &AppState, headers: &HeaderMap, id: &str) -> ApiResult<JobRow> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Authorization: Bearer TOKEN is required",
            )
        })?;
    if !is_hex(id, 32) {
        return Err(ApiError::job_not_found());
    }
    let row = st.db.job(id)?.ok_or_else(ApiError::job_not_found)?;
    if !ct_eq(&sha256(token.trim().as_bytes()), &row.token_hash) {
        return Err(ApiError::job_not_found());
    }
    Ok(row)
}

pub async fn put_input(
    State(st): St,
    Path((id, k)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<Value>> {
    let mut body = Some(body);
    let r = put_input_inner(&st, &id, &k, &headers, &mut body).await;
    if r.is_err() {
        if let Some(b) = body.take() {
            drain(&headers, b, 0).await;
        }
    }
    r
}

async fn put_input_inner(
    st: &Arc<AppState>,
    id: &str,
    k: &str,
    headers: &HeaderMap,
    body: &mut Option<Body>,
) -> ApiResult<Json<Value>> {
    let row = authorize(st, headers, id)?;
    let k: i64 = k
        .parse()
        .ok()
        .filter(|k| (0..row.inputs_total).contains(k))
        .ok_or_else(|| {
            ApiError::bad_request("bad_index", format!("k must be in 0..{}", row.inputs_total))
        })?;
    if row.state != db::UPLOADING || st.is_starting(&row.job_id) {
        return Err(ApiError::conflict(
            "job_started",
            "inputs cannot change once the job has started",
        ));
    }
    let want_sum = match headers.get("x-checksum-sha256") {
        None => None,
        Some(v) => {
            let s = v.to_str().unwrap_or("").trim().to_ascii_lowercase();
            if !is_hex(&s, 64) {
                return Err(ApiError::bad_request(
                    "bad_checksum",
                    "X-Checksum-Sha256 is 64 hex digits",
                ));
            }
            Some(s)
        }
    };
    let m = st.model(&row.model)?;
    let body = body
        .take()
        .ok_or_else(|| ApiError::internal("upload", "no body"))?;
    let validator = InputValidator::new(&m.params);
    debug_assert_eq!(validator.len(), m.input_ct_len);
    let Received {
        mut tmp,
        digest,
        verdict,
    } = receive(st, headers, body, m.input_ct_len, Some(validator)).await?;
    let sum = hex(&digest);
    if want_sum.is_some_and(|w| w != sum) {
        return Err(ApiError::bad_request(
            "checksum_mismatch",
            "the body does not match X-Checksum-Sha256",
        ));
    }
    match verdict {
        Some(Ok(())) => {}
        Some(Err(Invalid::ParamsMismatch)) => {
            return Err(validation_error(
                "ciphertext",
                beaa_ckks::Error::ParamsMismatch,
            ))
        }
        Some(Err(Invalid::Malformed(why))) => {
            return Err(ApiError::bad_request(
                "invalid_object",
                format!("invalid ciphertext: {why}"),
            ))
        }
        None => return Err(ApiError::internal("input validation", "no verdict")),
    }
    let inputs = st.job_dir(&row.job_id).join("inputs");
    let dest = inputs.join(format!("{k}.ct"));
    // Under the database lock: the job is still uploading (start and delete take the lock).
    let c = st.db.lock();
    match Db::job_in(&c, &row.job_id)? {
        Some(r) if r.state == db::UPLOADING => {}
        Some(_) => {
            return Err(ApiError::conflict(
                "job_started",
                "inputs cannot change once the job has started",
            ))
        }
        None => return Err(ApiError::job_not_found()),
    }
    if st.is_starting(&row.job_id) {
        return Err(ApiError::conflict(
            "job_started",
            "inputs cannot change once the job has started",
        ));
    }
    // No fsync: the rename of a complete file survives a crash of this process, and
    // `start` makes every input durable before the job is queued.
    let existed = dest.exists();
    std::fs::rename(&tmp.path, &dest).map_err(|e| ApiError::internal("storing an input", e))?;
    tmp.keep = true;
    Db::record_input(&c, &row.job_id, k, &sum)?;
    if !existed {
        st.disk_used
            .fetch_add(m.input_ct_len as u64, Ordering::Relaxed);
    }
    Ok(Json(json!({"k": k, "stored": true})))
}

/// An input must be a seeded ciphertext at the top level, degree 1, default scale.
pub fn check_input(params: &beaa_ckks::Params, bytes: &[u8]) -> ApiResult<Ciphertext> {
    let ct =
        Ciphertext::from_bytes(params, bytes).map_err(|e| validation_error("ciphertext", e))?;
    if ct.level() != params.max_level() || ct.degree() != 1 || !ct.is_seeded() {
        return Err(ApiError::bad_request(
            "invalid_object",
            "inputs are fresh seeded ciphertexts at the top level",
        ));
    }
    if ct.scale() != params.default_scale() {
        return Err(ApiError::bad_request(
            "invalid_object",
            "inputs are at the default scale",
        ));
    }
    Ok(ct)
}

pub async fn list_inputs(
    State(st): St,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let row = authorize(&st, &headers, &id)?;
    let present = Db::inputs_present(&st.db.lock(), &row.job_id)?;
    let missing = st
        .db
        .missing_inputs(&row.job_id, row.inputs_total, MISSING_LIST)?;
    Ok(Json(
        json!({"total": row.inputs_total, "present": present, "missing": missing}),
    ))
}

pub async fn start_job(
    State(st): St,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let row = authorize(&st, &headers, &id)?;
    let queued = || (StatusCode::ACCEPTED, Json(json!({"state": "queued"}))).into_response();
    // 1. Under the lock: every input is there, and no upload may replace one from now on.
    let (guard, len) = {
        let c = st.db.lock();
        let row = Db::job_in(&c, &row.job_id)?.ok_or_else(ApiError::job_not_found)?;
        match row.state.as_str() {
            db::UPLOADING => {
                let present = Db::inputs_present(&c, &row.job_id)?;
                if present != row.inputs_total {
                    return Err(inputs_missing(row.inputs_total - present, row.inputs_total));
                }
                let m = st.model(&row.model)?;
                // The job's intermediate tiles must fit beside what is stored (other jobs'
                // working space is theirs only while they run, so it is not counted here).
                let stored = st.disk_used.load(Ordering::Relaxed);
                if stored.saturating_add(m.work_peak) > st.max_disk {
                    return Err(ApiError::new(
                        StatusCode::INSUFFICIENT_STORAGE,
                        "disk_quota",
                        format!(
                            "running this job needs {:.1} GB of working space beside the \
                             {:.1} GB stored, over the server's {:.1} GB quota; retry later",
                            m.work_peak as f64 / 1e9,
                            stored as f64 / 1e9,
                            st.max_disk as f64 / 1e9
                        ),
                    ));
                }
                let guard = st.begin_start(&row.job_id).ok_or_else(|| {
                    ApiError::conflict("job_starting", "the job is being started; retry shortly")
                })?;
                (guard, m.input_ct_len as u64)
            }
            db::QUEUED | db::RUNNING => return Ok(queued()),
            other => {
                return Err(ApiError::conflict(
                    "job_finished",
                    format!("the job is {other}"),
                ));
            }
        }
    };
    // 2. Without the lock: make every input durable (uploads were not fsynced). A file that
    // is missing or short (lost in a power failure before this point) is forgotten, and the
    // client is told to upload it again.
    let dir = st.job_dir(&row.job_id);
    let n = row.inputs_total;
    let t = std::time::Instant::now();
    let lost = tokio::task::spawn_blocking(move || sync_inputs(&dir, n, len))
        .await
        .map_err(|e| ApiError::internal("syncing inputs", e))?
        .map_err(|e| ApiError::internal("syncing inputs", e))?;
    // 3. Under the lock: queue the job (a synchronous commit, which also makes the earlier
    // input records durable).
    {
        let c = st.db.lock();
        if Db::job_in(&c, &row.job_id)?.is_none() {
            return Err(ApiError::job_not_found());
        }
        if !lost.is_empty() {
            for &k in &lost {
                Db::forget_input(&c, &row.job_id, k)?;
            }
            tracing::warn!(job_id = %row.job_id, lost = lost.len(), "inputs lost before start");
            return Err(inputs_missing(lost.len() as i64, n));
        }
        if !Db::set_state(&c, &row.job_id, db::UPLOADING, db::QUEUED)? {
            return Err(ApiError::conflict(
                "job_started",
                "the job changed meanwhile",
            ));
        }
    }
    drop(guard);
    tracing::info!(
        job_id = %row.job_id,
        sync_ms = (t.elapsed().as_secs_f64() * 1e3) as u64,
        "job queued"
    );
    st.queue.notify_one();
    Ok(queued())
}

fn inputs_missing(missing: i64, total: i64) -> ApiError {
    ApiError::conflict(
        "inputs_missing",
        format!("{missing} of {total} inputs are missing"),
    )
}

/// fsyncs the inputs `0..n` of a job directory (several at a time, so that the device can
/// merge the flushes) and the directories above them; returns the indices whose file is
/// missing or not `len` bytes long.
fn sync_inputs(job_dir: &std::path::Path, n: i64, len: u64) -> std::io::Result<Vec<i64>> {
    const THREADS: i64 = 8;
    let inputs = job_dir.join("inputs");
    let results: Vec<std::io::Result<Vec<i64>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let inputs = &inputs;
                s.spawn(move || -> std::io::Result<Vec<i64>> {
                    let mut lost = Vec::new();
                    for k in (t..n).step_by(THREADS as usize) {
                        // The name comes from a parsed integer only.
                        match std::fs::File::open(inputs.join(format!("{k}.ct"))) {
                            Ok(f) if f.metadata()?.len() == len => f.sync_data()?,
                            Ok(_) => lost.push(k),
                            Err(e) if e.kind() == std::io::ErrorKind::NotFound => lost.push(k),
                            Err(e) => return Err(e),
                        }
                    }
                    Ok(lost)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("panic")))
            })
            .collect()
    });
    let mut lost = Vec::new();
    for r in results {
        lost.extend(r?);
    }
    lost.sort_unstable();
    fsync_dir(&inputs)?;
    fsync_dir(job_dir)?;
    if let Some(jobs) = job_dir.parent() {
        fsync_dir(jobs)?;
    }
    Ok(lost)
}

pub async fn job_status(
    State(st): St,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let row = authorize(&st, &headers, &id)?;
    let present = Db::inputs_present(&st.db.lock(), &row.job_id)?;
    let present = if row.state == db::DONE {
        row.inputs_total
    } else {
        present
    };
    Ok(Json(row.status_json(present)))
}

pub async fn job_result(
    State(st): St,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let row = authorize(&st, &headers, &id)?;
    if row.state != db::DONE {
        return Err(ApiError::conflict(
            "not_done",
            format!("the job is {}", row.state),
        ));
    }
    let path = st.job_dir(&row.job_id).join("result.bin");
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::internal("opening a result", e))?;
    let len = file
        .metadata()
        .await
        .map_err(|e| ApiError::internal("opening a result", e))?
        .len();
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(file, 1 << 16));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, len.to_string()),
        ],
        body,
    )
        .into_response())
}

pub async fn delete_job(
    State(st): St,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Json<Value>> {
    let row = authorize(&st, &headers, &id)?;
    if let Some(flag) = st
        .cancels
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(&row.job_id)
    {
        flag.store(true, Ordering::Relaxed);
    }
    st.db.delete_job(&row.job_id)?;
    let st2 = st.clone();
    let job_id = row.job_id.clone();
    tokio::task::spawn_blocking(move || st2.remove_job_files(&job_id))
        .await
        .map_err(|e| ApiError::internal("deleting a job", e))?;
    tracing::info!(job_id = %row.job_id, "job deleted");
    Ok(Json(json!({"deleted": true})))
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("not_found", "no such endpoint")
}
