//! `beaa predict`: the native client. Preprocesses and encrypts images locally (ciphertext
//! `k` holds feature `k` of every image), uploads the evaluation key and the inputs, waits
//! for the server, downloads and decrypts the logits, prints class and probabilities.
//!
//! With `--keys DIR` the job in flight is remembered in `DIR/jobs/<digest>.json` (mode 0600:
//! its token reads the result and deletes the job), so a client that was killed, lost its connection or
//! hit a full server continues the same job when the same command runs again - uploading only
//! the inputs the server lacks - as the web page does with its IndexedDB.

use crate::keygen::{self, ClientKeys};
use anyhow::{anyhow, bail, Context, Result};
use beaa_ckks::{decrypt, Ciphertext, Encoder, Encryptor, ParamSpec, Params};
use beaa_model::range::{batch_looks_corrupt, outside_calibration};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct PredictArgs {
    /// The server, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    pub server: String,
    /// A model the server lists.
    #[arg(long)]
    pub model: String,
    /// Key directory from `beaa keygen` (fresh keys are made, and saved here, if it has none).
    /// The job in flight is remembered here too: run the same command again to continue it.
    #[arg(long)]
    pub keys: Option<PathBuf>,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Image files (PNG/JPEG), or directories of them.
    #[arg(required = true)]
    pub images: Vec<PathBuf>,
}

/// A model as the server describes it, with the client's copy of its parameters.
pub struct ServerModel {
    pub info: Value,
    pub params: Params,
    pub insecure: bool,
}

fn agent() -> ureq::Agent {
    ureq::AgentBuilder::new()
        .timeout_connect(Duration::from_secs(10))
        .timeout_read(Duration::from_secs(300))
        .build()
}

/// Turns an HTTP error into the server's one-line message.
fn http_err(e: ureq::Error) -> anyhow::Error {
    match e {
        ureq::Error::Status(code, r) => {
            let body = r.into_string().unwrap_or_default();
            let msg = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
                .unwrap_or(body);
            anyhow!("server answered {code}: {msg}")
        }
        other => anyhow!("{other}"),
    }
}

fn read_json(r: ureq::Response) -> Result<Value> {
    let mut s = String::new();
    r.into_reader().take(64 << 20).read_to_string(&mut s)?;
    Ok(serde_json::from_str(&s)?)
}

/// How long a client waits for a model the server is still planning (a freshly started
/// server plans its models one after another, tens of seconds each at full size).
const MODEL_LOADING_WAIT: Duration = Duration::from_secs(600);

/// `GET /api/models`, the named model, its parameters rebuilt and the fingerprint checked;
/// waits while the server lists the model as loading.
pub fn fetch_model(server: &str, name: &str) -> Result<ServerModel> {
    let server = server.trim_end_matches('/');
    let t = Instant::now();
    let mut said = false;
    let info = loop {
        let v = read_json(
            agent()
                .get(&format!("{server}/api/models"))
                .call()
                .map_err(http_err)?,
        )?;
        if let Some(m) = v["models"]
            .as_array()
            .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        {
            break m.clone();
        }
        let loading = v["loading"]
            .as_array()
            .is_some_and(|l| l.iter().any(|m| m == name));
        if !loading {
            bail!("the server does not list a model named {name:?}");
        }
        if t.elapsed() > MODEL_LOADING_WAIT {
            bail!(
                "the server is still preparing {name:?} after {} s; try again later",
                MODEL_LOADING_WAIT.as_secs()
            );
        }
        if !said {
            eprintln!("the server is still preparing {name:?}; waiting");
            said = true;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let spec: ParamSpec = serde_json::from_value(info["params"].clone())?;
    let insecure = info["insecure_test_params"].as_bool().unwrap_or(false);
    let params = Params::from_spec(spec, insecure)?;
    let fp = crate::serve::util::hex(params.fingerprint());
    if info["params_fingerprint"].as_str() != Some(fp.as_str()) {
        bail!("the server's parameter fingerprint does not match its parameter set");
    }
    if insecure {
        eprintln!("warning: the server uses NOT SECURE test parameters");
    }
    Ok(ServerModel {
        info,
        params,
        insecure,
    })
}

fn image_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)?
                .flatten()
                .map(|e| e.path())
                .filter(|f| {
                    f.is_file()
                        && f.extension().and_then(|e| e.to_str()).is_some_and(|e| {
                            matches!(e.to_ascii_lowercase().as_str(), "png" | "jpg" | "jpeg")
                        })
                })
                .collect();
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    if out.is_empty() {
        bail!("no images found");
    }
    Ok(out)
}

pub fn run(args: &PredictArgs) -> Result<()> {
    let server = args.server.trim_end_matches('/');
    let m = fetch_model(server, &args.model)?;
    let params = &m.params;
    let spec: beaa_model::InputSpec = serde_json::from_value(m.info["input"].clone())?;
    let classes: Vec<String> = serde_json::from_value(m.info["classes"].clone())?;
    let n_inputs = m.info["input_ciphertexts"].as_u64().unwrap_or(0) as usize;
    let files = image_files(&args.images)?;
    if files.len() > params.slots() {
        bail!(
            "{} images, but one job holds at most {}",
            files.len(),
            params.slots()
        );
    }
    let images: Vec<Vec<f32>> = files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
            beaa_model::preprocess::preprocess(&bytes, &spec)
                .with_context(|| format!("preprocessing {}", f.display()))
        })
        .collect::<Result<_>>()?;
    if images.iter().any(|i| i.len() != n_inputs) {
        bail!("preprocessed images do not have the model's {n_inputs} features");
    }

    let keys = match &args.keys {
        Some(dir) => match keygen::load(dir, params)? {
            Some(k) => k,
            None => {
                let k = keygen::generate(params);
                keygen::save(dir, &args.model, params, m.insecure, &k)?;
                k
            }
        },
        None => keygen::generate(params),
    };
    let fingerprint = crate::serve::util::hex(params.fingerprint());
    let image_names: Vec<String> = files
        .iter()
        .map(|f| {
            std::fs::canonicalize(f)
                .unwrap_or_else(|_| f.clone())
                .display()
                .to_string()
        })
        .collect();
    let t0 = Instant::now();
    let flat: Vec<f32> = images.concat();
    // A remembered job is found by what it computes - the model, its parameters and the
    // preprocessed pixels - so a changed file under the same name is a new job, and clients
    // with other images can share the key directory at once.
    let inputs_sha256 = {
        // Streamed: a full batch's pixels are hundreds of MB, not worth a second copy.
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(format!("{}\n{fingerprint}\n", args.model));
        let mut buf = Vec::with_capacity(4 * 4096);
        for chunk in flat.chunks(4096) {
            buf.clear();
            buf.extend(chunk.iter().flat_map(|x| x.to_le_bytes()));
            h.update(&buf);
        }
        crate::serve::util::hex(&h.finalize())
    };
    let pending_path = args.keys.as_ref().map(|d| {
        d.join(PENDING_DIR)
            .join(format!("{}.json", &inputs_sha256[..32]))
    });
    // Everything that talks to the server; when it fails with a job remembered, say how to
    // continue it.
    let remote = || -> Result<(String, String, f64, f64, Vec<u8>)> {
        let job = match pending_path
            .as_deref()
            .map(PendingJob::load)
            .transpose()?
            .flatten()
            .filter(|p| p.inputs_sha256 == inputs_sha256)
        {
            Some(p) => resume(server, params, &keys, &flat, &p, pending_path.as_deref())?,
            None => None,
        };
        let job = match job {
            Some(job) => job,
            None => {
                let job = create_job(server, &args.model, &keys, images.len())?;
                if let Some(path) = &pending_path {
                    std::fs::create_dir_all(path.parent().unwrap_or(Path::new(".")))?;
                    PendingJob {
                        server: server.to_owned(),
                        model: args.model.clone(),
                        job_id: job.id.clone(),
                        token: job.token.clone(),
                        images: image_names.clone(),
                        inputs_sha256: inputs_sha256.clone(),
                        params_fingerprint: fingerprint.clone(),
                    }
                    .save(path)?;
                }
                let all: Vec<usize> = (0..job.inputs).collect();
                upload(server, params, &keys, &flat, &job, &all)?;
                start(server, &job)?;
                job
            }
        };
        let (job_id, token) = (job.id.clone(), job.token.clone());
        let upload_s = t0.elapsed().as_secs_f64();
        let auth = format!("Bearer {token}");
        let a = agent();
        let job_url = format!("{server}/api/jobs/{job_id}");
        let t1 = Instant::now();
        wait(&job_url, &auth, pending_path.as_deref())?;
        let server_s = t1.elapsed().as_secs_f64();
        let mut result = Vec::new();
        a.get(&format!("{job_url}/result"))
            .set("Authorization", &auth)
            .call()
            .map_err(http_err)?
            .into_reader()
            .take(1 << 34)
            .read_to_end(&mut result)?;
        Ok((job_id, auth, upload_s, server_s, result))
    };
    let (job_id, auth, upload_s, server_s, result) = match remote() {
        Ok(x) => x,
        Err(e) => {
            if let Some(path) = pending_path.as_deref().filter(|p| p.exists()) {
                eprintln!(
                    "the job is remembered in {}: run the same command again to continue it",
                    path.display()
                );
            }
            return Err(e);
        }
    };
    let a = agent();
    let job_url = format!("{server}/api/jobs/{job_id}");
    let logits = decrypt_result(params, &keys, &result, classes.len(), images.len())?;
    // The server keeps nothing it no longer needs, nor do we.
    let _ = a.delete(&job_url).set("Authorization", &auth).call();
    if let Some(path) = &pending_path {
        std::fs::remove_file(path).ok();
    }

    // Servers before the field existed: no flags rather than a guess.
    let calibrated = m.info["logits_calibration_max_abs"].as_f64();
    let outside: Vec<bool> = logits
        .iter()
        .map(|l| calibrated.is_some_and(|c| outside_calibration(l, c)))
        .collect();
    let corrupt = batch_looks_corrupt(&outside);
    let predictions: Vec<Value> = files
        .iter()
        .zip(&logits)
        .zip(&outside)
        .map(|((f, l), &outside)| {
            let p = beaa_model::scores::softmax(l);
            // the same rule as the page: the first most probable class
            let best = beaa_model::scores::argmax(&p);
            json!({
                "image": f.display().to_string(),
                "class": classes.get(best).cloned().unwrap_or_default(),
                "class_index": best,
                "probabilities": p,
                "logits": l,
                "outside_calibrated_range": outside,
            })
        })
        .collect();
    if args.json {
        println!(
            "{}",
            json!({
                "model": args.model,
                "classes": classes,
                "job_id": job_id,
                "insecure_test_params": m.insecure,
                "upload_s": upload_s,
                "server_s": server_s,
                "predictions": predictions,
                "batch_looks_corrupt": corrupt,
            })
        );
    } else {
        for p in &predictions {
            let probs = p["probabilities"]
                .as_array()
                .map(|ps| {
                    classes
                        .iter()
                        .zip(ps)
                        .map(|(k, v)| format!("{k} {:.3}", v.as_f64().unwrap_or(0.0)))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default();
            let warn = if p["outside_calibrated_range"] == true {
                " [UNRELIABLE: logits far outside the model's calibrated range]"
            } else {
                ""
            };
            println!(
                "{}: {} ({probs}){warn}",
                p["image"].as_str().unwrap_or(""),
                p["class"].as_str().unwrap_or("")
            );
        }
    }
    let flagged = outside.iter().filter(|&&f| f).count();
    if corrupt {
        eprintln!(
            "WARNING: {flagged} of {} images have logits far outside the model's range: the batch most likely overflowed (one extreme image garbles all). Resubmit the images in smaller batches to find it.",
            outside.len()
        );
    } else if flagged > 0 {
        eprintln!(
            "WARNING: {flagged} image(s) have logits far outside the model's calibrated range; their classes are not reliable (unusual images, e.g. black borders)."
        );
    }
    Ok(())
}

/// The directory in a `--keys` directory that remembers the jobs in flight, one file each
/// (named by a digest of the model, its parameters and the preprocessed images).
pub const PENDING_DIR: &str = "jobs";

/// A job this client created and has not collected yet.
#[derive(Debug, Serialize, Deserialize)]
struct PendingJob {
    /// Where it was created (for the reader; the job is looked for on `--server`).
    server: String,
    model: String,
    job_id: String,
    token: String,
    /// The images, as canonical paths, in job order.
    images: Vec<String>,
    /// SHA-256 of the model name, parameter fingerprint and preprocessed images (f32
    /// little-endian, job order).
    inputs_sha256: String,
    params_fingerprint: String,
}

impl PendingJob {
    fn load(path: &Path) -> Result<Option<PendingJob>> {
        crate::files::read_json_if_exists(path)
    }

    fn save(&self, path: &Path) -> Result<()> {
        crate::files::write_private(path, &serde_json::to_vec_pretty(self)?)
    }
}

/// A job on the server: its id, bearer token and number of input ciphertexts.
struct JobRef {
    id: String,
    token: String,
    inputs: usize,
}

impl JobRef {
    fn auth(&self) -> String {
        format!("Bearer {}", self.token)
    }
}

/// Uploads the evaluation key and creates the job.
fn create_job(server: &str, model: &str, keys: &ClientKeys, batch: usize) -> Result<JobRef> {
    let a = agent();
    let key = read_json(
        a.post(&format!("{server}/api/keys?model={model}"))
            .set("Content-Type", "application/octet-stream")
            .send_bytes(&keys.rlk_bytes)
            .map_err(http_err)?,
    )?;
    let key_id = key["key_id"].as_str().ok_or_else(|| anyhow!("no key_id"))?;
    let job = read_json(
        a.post(&format!("{server}/api/jobs"))
            .send_json(json!({"model": model, "key_id": key_id, "batch": batch}))
            .map_err(http_err)?,
    )?;
    let field = |k: &str| {
        job[k]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| anyhow!("no {k}"))
    };
    Ok(JobRef {
        id: field("job_id")?,
        token: field("token")?,
        inputs: job["inputs"].as_u64().unwrap_or(0) as usize,
    })
}

/// Picks up a remembered job: `Some` when the server still has it and it is uploading (the
/// missing inputs are uploaded and the job started), queued, running or done; `None` when it
/// is gone (expired, deleted, another server) and a new job must be made. A failed or
/// cancelled job is an error, and forgotten.
fn resume(
    server: &str,
    params: &Params,
    keys: &ClientKeys,
    flat: &[f32],
    p: &PendingJob,
    pending_path: Option<&Path>,
) -> Result<Option<JobRef>> {
    let forget = || {
        if let Some(path) = pending_path {
            std::fs::remove_file(path).ok();
        }
    };
    let a = agent();
    let url = format!("{server}/api/jobs/{}", p.job_id);
    let auth = format!("Bearer {}", p.token);
    let st = match a.get(&url).set("Authorization", &auth).call() {
        Ok(r) => read_json(r)?,
        Err(ureq::Error::Status(404, _)) => {
            eprintln!(
                "the server no longer has job {} (expired, deleted, or another server): starting a new one",
                p.job_id
            );
            forget();
            return Ok(None);
        }
        Err(e) => return Err(http_err(e)),
    };
    let job = JobRef {
        id: p.job_id.clone(),
        token: p.token.clone(),
        inputs: st["inputs_total"].as_u64().unwrap_or(0) as usize,
    };
    let state = st["state"].as_str().unwrap_or("?");
    eprintln!("resuming job {} ({state})", job.id);
    match state {
        "uploading" => {
            // The server lists at most 1000 missing inputs at a time.
            loop {
                let have = read_json(
                    a.get(&format!("{url}/inputs"))
                        .set("Authorization", &auth)
                        .call()
                        .map_err(http_err)?,
                )?;
                let missing: Vec<usize> = have["missing"]
                    .as_array()
                    .map(|m| {
                        m.iter()
                            .filter_map(|k| k.as_u64().map(|k| k as usize))
                            .collect()
                    })
                    .unwrap_or_default();
                if missing.is_empty() {
                    break;
                }
                eprintln!(
                    "{} of {} inputs missing on the server",
                    have["total"].as_u64().unwrap_or(0) - have["present"].as_u64().unwrap_or(0),
                    job.inputs
                );
                upload(server, params, keys, flat, &job, &missing)?;
            }
            start(server, &job)?;
        }
        "failed" | "cancelled" => {
            forget();
            bail!(
                "the job {state}: {}",
                st["error"].as_str().unwrap_or("no reason given")
            );
        }
        _ => {}
    }
    Ok(Some(job))
}

/// Encrypts and uploads the input ciphertexts `which` of the job.
fn upload(
    server: &str,
    params: &Params,
    keys: &ClientKeys,
    flat: &[f32],
    job: &JobRef,
    which: &[usize],
) -> Result<()> {
    let n = job.inputs;
    if n == 0 || !flat.len().is_multiple_of(n) || which.iter().any(|&k| k >= n) {
        bail!(
            "the server expects {n} inputs per job; the images have {} values",
            flat.len()
        );
    }
    let a = agent();
    let auth = job.auth();
    let (scale, level) = (params.default_scale(), params.max_level());
    let t = Instant::now();
    let mut sent = 0u64;
    let mut done = 0usize;
    // Element-wise packing (beaa_model::packing): image-major features, one column per input.
    for chunk in which.chunks(rayon::current_num_threads() * 4) {
        let cts: Vec<Vec<u8>> = chunk
            .par_iter()
            .map_init(
                || Encryptor::new(params),
                |enc, &k| -> Result<Vec<u8>> {
                    let column = beaa_model::packing::feature_slots(flat, n, k);
                    Ok(enc
                        .encrypt_values_sk(&keys.sk, &column, scale, level)?
                        .to_bytes())
                },
            )
            .collect::<Result<_>>()?;
        for (&k, ct) in chunk.iter().zip(&cts) {
            let sum = crate::serve::util::hex(&crate::serve::util::sha256(ct));
            a.put(&format!("{server}/api/jobs/{}/inputs/{k}", job.id))
                .set("Authorization", &auth)
                .set("Content-Type", "application/octet-stream")
                .set("X-Checksum-Sha256", &sum)
                .send_bytes(ct)
                .map_err(http_err)?;
            sent += ct.len() as u64;
        }
        done += chunk.len();
        eprint!(
            "\rencrypt+upload {done}/{} ciphertexts, {:.1} MB, {:.1} MB/s   ",
            which.len(),
            sent as f64 / 1e6,
            sent as f64 / 1e6 / t.elapsed().as_secs_f64().max(1e-9)
        );
    }
    eprintln!();
    Ok(())
}

/// Starts a job whose inputs are all on the server.
fn start(server: &str, job: &JobRef) -> Result<()> {
    agent()
        .post(&format!("{server}/api/jobs/{}/start", job.id))
        .set("Authorization", &job.auth())
        .send_bytes(b"")
        .map_err(http_err)?;
    Ok(())
}

/// Polls the job until it is done, showing its progress; an error if it failed (and the
/// remembered job is forgotten: running the command again makes a new one).
fn wait(job_url: &str, auth: &str, pending_path: Option<&Path>) -> Result<()> {
    let a = agent();
    loop {
        let st = read_json(
            a.get(job_url)
                .set("Authorization", auth)
                .call()
                .map_err(http_err)?,
        )?;
        let state = st["state"].as_str().unwrap_or("?").to_owned();
        eprint!(
            "\r{state:>9} {:5.1}% {:<28} eta {:>6}   ",
            st["progress"].as_f64().unwrap_or(0.0) * 100.0,
            st["stage"].as_str().unwrap_or(""),
            st["eta_s"]
                .as_f64()
                .map(|e| format!("{e:.0} s"))
                .unwrap_or_else(|| "-".into())
        );
        match state.as_str() {
            "done" => break,
            "failed" | "cancelled" => {
                eprintln!();
                if let Some(path) = pending_path {
                    std::fs::remove_file(path).ok();
                }
                bail!(
                    "the job {state}: {}",
                    st["error"].as_str().unwrap_or("no reason given")
                );
            }
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    }
    eprintln!();
    Ok(())
}

/// Parses `u32 count, then (u64 length, ciphertext)*` and decrypts: logits[image][class].
pub fn decrypt_result(
    params: &Params,
    keys: &ClientKeys,
    bytes: &[u8],
    classes: usize,
    batch: usize,
) -> Result<Vec<Vec<f64>>> {
    let count = u32::from_le_bytes(
        bytes
            .get(..4)
            .ok_or_else(|| anyhow!("short result"))?
            .try_into()?,
    ) as usize;
    if count != classes {
        bail!("the result has {count} ciphertexts for {classes} classes");
    }
    let enc = Encoder::new(params);
    let mut pos = 4usize;
    let mut per_class = Vec::with_capacity(count);
    for _ in 0..count {
        let len = u64::from_le_bytes(
            bytes
                .get(pos..pos + 8)
                .ok_or_else(|| anyhow!("short result"))?
                .try_into()?,
        ) as usize;
        pos += 8;
        let end = pos
            .checked_add(len)
            .filter(|&e| e <= bytes.len())
            .ok_or_else(|| anyhow!("short result"))?;
        let ct = Ciphertext::from_bytes(params, &bytes[pos..end])?;
        pos = end;
        per_class.push(enc.decode(&decrypt(&keys.sk, &ct)?));
    }
    if pos != bytes.len() {
        bail!("trailing bytes after the result");
    }
    Ok((0..batch)
        .map(|b| per_class.iter().map(|v| v[b]).collect())
        .collect())
}
