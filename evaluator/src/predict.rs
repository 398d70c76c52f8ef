//! `beaa predict`: the native client. Preprocesses and encrypts images locally (ciphertext
//! `k` holds feature `k` of every image), uploads the evaluation key and the inputs, waits
//! for the server, downloads and decrypts the logits, prints class and probabilities.

use crate::keygen::{self, ClientKeys};
use anyhow::{anyhow, bail, Context, Result};
use beaa_ckks::{decrypt, Ciphertext, Encoder, Encryptor, ParamSpec, Params};
use beaa_model::range::{batch_looks_corrupt, outside_calibration};
use rayon::prelude::*;
use serde_json::{json, Value};
use std::io::Read;
use std::path::PathBuf;
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

/// `GET /api/models`, the named model, its parameters rebuilt and the fingerprint checked.
pub fn fetch_model(server: &str, name: &str) -> Result<ServerModel> {
    let server = server.trim_end_matches('/');
    let v = read_json(
        agent()
            .get(&format!("{server}/api/models"))
            .call()
            .map_err(http_err)?,
    )?;
    let info = v["models"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["name"] == name))
        .cloned()
        .ok_or_else(|| anyhow!("the server does not list a model named {name:?}"))?;
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
    let t0 = Instant::now();
    let (job_id, token) = submit(server, &args.model, params, &keys, &images)?;
    let upload_s = t0.elapsed().as_secs_f64();
    let auth = format!("Bearer {token}");
    let a = agent();
    let job_url = format!("{server}/api/jobs/{job_id}");
    let t1 = Instant::now();
    loop {
        let st = read_json(
            a.get(&job_url)
                .set("Authorization", &auth)
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
                bail!(
                    "the job {state}: {}",
                    st["error"].as_str().unwrap_or("no reason given")
                );
            }
            _ => std::thread::sleep(Duration::from_millis(250)),
        }
    }
    eprintln!();
    let server_s = t1.elapsed().as_secs_f64();
    let mut result = Vec::new();
    a.get(&format!("{job_url}/result"))
        .set("Authorization", &auth)
        .call()
        .map_err(http_err)?
        .into_reader()
        .take(1 << 34)
        .read_to_end(&mut result)?;
    let logits = decrypt_result(params, &keys, &result, classes.len(), images.len())?;
    // The server keeps nothing it no longer needs.
    let _ = a.delete(&job_url).set("Authorization", &auth).call();

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

/// Uploads the key, creates the job, encrypts and uploads every input, starts the job.
fn submit(
    server: &str,
    model: &str,
    params: &Params,
    keys: &ClientKeys,
    images: &[Vec<f32>],
) -> Result<(String, String)> {
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
            .send_json(json!({"model": model, "key_id": key_id, "batch": images.len()}))
            .map_err(http_err)?,
    )?;
    let job_id = job["job_id"]
        .as_str()
        .ok_or_else(|| anyhow!("no job_id"))?
        .to_owned();
    let token = job["token"]
        .as_str()
        .ok_or_else(|| anyhow!("no token"))?
        .to_owned();
    let n = job["inputs"].as_u64().unwrap_or(0) as usize;
    let auth = format!("Bearer {token}");
    let (scale, level) = (params.default_scale(), params.max_level());
    // Element-wise packing (beaa_model::packing): image-major features, one column per input.
    let flat: Vec<f32> = images.concat();
    if n == 0 || flat.len() != n * images.len() {
        bail!(
            "the server expects {n} inputs per job; the images have {} features",
            flat.len() / images.len().max(1)
        );
    }
    let t = Instant::now();
    let mut sent = 0u64;
    for chunk in (0..n)
        .collect::<Vec<_>>()
        .chunks(rayon::current_num_threads() * 4)
    {
        let cts: Vec<Vec<u8>> = chunk
            .par_iter()
            .map_init(
                || Encryptor::new(params),
                |enc, &k| -> Result<Vec<u8>> {
                    let column = beaa_model::packing::feature_slots(&flat, n, k);
                    Ok(enc
                        .encrypt_values_sk(&keys.sk, &column, scale, level)?
                        .to_bytes())
                },
            )
            .collect::<Result<_>>()?;
        for (&k, ct) in chunk.iter().zip(&cts) {
            let sum = crate::serve::util::hex(&crate::serve::util::sha256(ct));
            a.put(&format!("{server}/api/jobs/{job_id}/inputs/{k}"))
                .set("Authorization", &auth)
                .set("Content-Type", "application/octet-stream")
                .set("X-Checksum-Sha256", &sum)
                .send_bytes(ct)
                .map_err(http_err)?;
            sent += ct.len() as u64;
        }
        let done = chunk.last().map_or(0, |k| k + 1);
        eprint!(
            "\rencrypt+upload {done}/{n} ciphertexts, {:.1} MB, {:.1} MB/s   ",
            sent as f64 / 1e6,
            sent as f64 / 1e6 / t.elapsed().as_secs_f64().max(1e-9)
        );
    }
    eprintln!();
    a.post(&format!("{server}/api/jobs/{job_id}/start"))
        .set("Authorization", &auth)
        .send_bytes(b"")
        .map_err(http_err)?;
    Ok((job_id, token))
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
