//! `beaa serve` over real HTTP on loopback: the real binary, a temporary data directory, real
//! SQLite and files, and a small random model at the (insecure) test parameters.

use beaa_ckks::{
    decrypt, Ciphertext, Encoder, Encryptor, KeyGenerator, ParamSpec, Params, SecretKey,
};
use beaa_model::{Activation, Model, SqueezeNetSpec};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const MODEL: &str = "tiny";

/// A model directory `tiny` inside a fresh zoo.
fn make_zoo(root: &Path) -> (PathBuf, Model) {
    let zoo = root.join("zoo");
    let model = beaa_model::testing::random_model(
        11,
        &SqueezeNetSpec::tiny(3, 8, 3),
        Activation::PolyElement,
    );
    model.save(&zoo.join(MODEL)).unwrap();
    (zoo, model)
}

struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(zoo: &Path, data: &Path, insecure: bool, extra: &[&str]) -> Server {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(data.with_extension("log"))
            .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_beaa"));
        cmd.arg("serve")
            .args(["--addr", "127.0.0.1:0", "--zoo"])
            .arg(zoo)
            .arg("--data-dir")
            .arg(data)
            .args(["--progress-interval-ms", "20"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log));
        if insecure {
            cmd.arg("--insecure-test-params");
        }
        let mut child = cmd.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = lines.next().expect("server exited").unwrap();
        let url = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        // Keep draining stdout so the server never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Server { child, url }
    }

    fn kill9(&mut self) {
        self.child.kill().unwrap(); // SIGKILL
        self.child.wait().unwrap();
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// (status, body) of a request, 4xx/5xx included.
fn call(req: ureq::Request, body: Option<&[u8]>) -> (u16, Vec<u8>) {
    let res = match body {
        Some(b) => req.send_bytes(b),
        None => req.call(),
    };
    let resp = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("transport error: {e}"),
    };
    let status = resp.status();
    let mut out = Vec::new();
    resp.into_reader()
        .take(1 << 30)
        .read_to_end(&mut out)
        .unwrap();
    (status, out)
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(bytes)))
}

fn get(url: &str) -> (u16, Value) {
    let (s, b) = call(ureq::get(url), None);
    (s, json_of(&b))
}

fn error_code(body: &[u8]) -> String {
    json_of(body)["error"]["code"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

/// Waits until the model is listed; returns its ModelInfo.
fn model_info(server: &Server) -> Value {
    let t = Instant::now();
    loop {
        let (s, v) = get(&format!("{}/api/models", server.url));
        assert_eq!(s, 200);
        if let Some(m) = v["models"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == MODEL)
        {
            return m.clone();
        }
        assert!(t.elapsed() < Duration::from_secs(60), "model never listed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

struct ClientKeys {
    params: Params,
    sk: SecretKey,
    rlk_bytes: Vec<u8>,
}

fn client_keys(info: &Value) -> ClientKeys {
    let spec: ParamSpec = serde_json::from_value(info["params"].clone()).unwrap();
    let params = Params::from_spec(spec, info["insecure_test_params"].as_bool().unwrap()).unwrap();
    let fp: String = params
        .fingerprint()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(info["params_fingerprint"], fp.as_str());
    let mut kg = KeyGenerator::new(&params);
    let sk = kg.secret_key();
    let rlk_bytes = kg.relin_key(&sk).to_bytes();
    assert_eq!(
        rlk_bytes.len() as u64,
        info["relin_key_bytes"].as_u64().unwrap()
    );
    ClientKeys {
        params,
        sk,
        rlk_bytes,
    }
}

fn upload_key(server: &Server, keys: &ClientKeys) -> String {
    let (s, b) = call(
        ureq::post(&format!("{}/api/keys?model={MODEL}", server.url))
            .set("Content-Type", "application/octet-stream"),
        Some(&keys.rlk_bytes),
    );
    assert!(
        s == 201 || s == 200,
        "key upload: {s} {}",
        String::from_utf8_lossy(&b)
    );
    json_of(&b)["key_id"].as_str().unwrap().to_owned()
}

struct Job {
    id: String,
    token: String,
    n: usize,
}

fn create_job(server: &Server, key_id: &str, batch: usize) -> Job {
    let (s, b) = call(
        ureq::post(&format!("{}/api/jobs", server.url)),
        Some(
            json!({"model": MODEL, "key_id": key_id, "batch": batch})
                .to_string()
                .as_bytes(),
        ),
    );
    assert_eq!(s, 201, "{}", String::from_utf8_lossy(&b));
    let v = json_of(&b);
    Job {
        id: v["job_id"].as_str().unwrap().to_owned(),
        token: v["token"].as_str().unwrap().to_owned(),
        n: v["inputs"].as_u64().unwrap() as usize,
    }
}

fn authed(req: ureq::Request, token: &str) -> ureq::Request {
    req.set("Authorization", &format!("Bearer {token}"))
}

/// Deterministic pseudo-random images in [-1.5, 1.5] (normalized inputs), [b][k].
fn images(batch: usize, len: usize, seed: u64) -> Vec<Vec<f64>> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..batch)
        .map(|_| {
            (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    ((x >> 11) as f64 / (1u64 << 53) as f64) * 3.0 - 1.5
                })
                .collect()
        })
        .collect()
}

/// Element-wise packing: ciphertext k holds feature k of every image.
fn encrypt_inputs(keys: &ClientKeys, imgs: &[Vec<f64>]) -> Vec<Vec<u8>> {
    let mut enc = Encryptor::new(&keys.params);
    (0..imgs[0].len())
        .map(|k| {
            let column: Vec<f64> = imgs.iter().map(|img| img[k]).collect();
            enc.encrypt_values_sk(
                &keys.sk,
                &column,
                keys.params.default_scale(),
                keys.params.max_level(),
            )
            .unwrap()
            .to_bytes()
        })
        .collect()
}

fn sha_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn upload_inputs(server: &Server, job: &Job, cts: &[Vec<u8>], first: usize) {
    for (i, ct) in cts.iter().enumerate() {
        let k = first + i;
        let (s, b) = call(
            authed(
                ureq::put(&format!("{}/api/jobs/{}/inputs/{k}", server.url, job.id)),
                &job.token,
            )
            .set("X-Checksum-Sha256", &sha_hex(ct)),
            Some(ct),
        );
        assert_eq!(s, 200, "input {k}: {}", String::from_utf8_lossy(&b));
    }
}

fn status(server: &Server, job: &Job) -> Value {
    let (s, b) = call(
        authed(
            ureq::get(&format!("{}/api/jobs/{}", server.url, job.id)),
            &job.token,
        ),
        None,
    );
    assert_eq!(s, 200, "{}", String::from_utf8_lossy(&b));
    json_of(&b)
}

fn start(server: &Server, job: &Job) {
    let (s, b) = call(
        authed(
            ureq::post(&format!("{}/api/jobs/{}/start", server.url, job.id)),
            &job.token,
        ),
        Some(b""),
    );
    assert_eq!(s, 202, "{}", String::from_utf8_lossy(&b));
}

fn wait_done(server: &Server, job: &Job, limit: Duration) -> Value {
    let t = Instant::now();
    loop {
        let st = status(server, job);
        match st["state"].as_str().unwrap() {
            "done" => return st,
            "failed" | "cancelled" => panic!("job ended: {st}"),
            _ => {}
        }
        assert!(t.elapsed() < limit, "job not done in time: {st}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the job runs (and, with `past = Some(f)`, has reported progress beyond `f`:
/// its first tiles are on disk); fails if it finishes first.
fn wait_running(server: &Server, job: &Job, past: Option<f64>) {
    let t = Instant::now();
    loop {
        let st = status(server, job);
        let progress = st["progress"].as_f64().unwrap_or(0.0);
        if st["state"] == "running" && past.is_none_or(|f| progress > f) {
            return;
        }
        assert_ne!(
            st["state"], "done",
            "the job finished before it could be killed"
        );
        assert!(t.elapsed() < Duration::from_secs(30), "job never ran: {st}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Downloads and decrypts the result: logits[b][c].
fn result(server: &Server, job: &Job, keys: &ClientKeys, batch: usize) -> Vec<Vec<f64>> {
    let (s, b) = call(
        authed(
            ureq::get(&format!("{}/api/jobs/{}/result", server.url, job.id)),
            &job.token,
        ),
        None,
    );
    assert_eq!(s, 200);
    let count = u32::from_le_bytes(b[..4].try_into().unwrap()) as usize;
    let mut pos = 4;
    let enc = Encoder::new(&keys.params);
    let mut per_class = Vec::new();
    for _ in 0..count {
        let len = u64::from_le_bytes(b[pos..pos + 8].try_into().unwrap()) as usize;
        pos += 8;
        let ct = Ciphertext::from_bytes(&keys.params, &b[pos..pos + len]).unwrap();
        pos += len;
        per_class.push(enc.decode(&decrypt(&keys.sk, &ct).unwrap()));
    }
    assert_eq!(pos, b.len(), "trailing bytes in the result");
    (0..batch)
        .map(|i| per_class.iter().map(|v| v[i]).collect())
        .collect()
}

fn argmax(v: &[f64]) -> usize {
    (0..v.len()).max_by(|&a, &b| v[a].total_cmp(&v[b])).unwrap()
}

/// The decrypted logits match the plaintext model: small error, same class.
fn check_against_plaintext(model: &Model, imgs: &[Vec<f64>], got: &[Vec<f64>]) {
    let flat: Vec<f64> = imgs.iter().flatten().copied().collect();
    let want = model.forward(&flat, imgs.len()).unwrap();
    let classes = model.manifest.classes.len();
    let mut max_err = 0.0f64;
    for (b, row) in got.iter().enumerate() {
        let w = &want[b * classes..(b + 1) * classes];
        for (x, y) in row.iter().zip(w) {
            max_err = max_err.max((x - y).abs());
        }
        assert_eq!(
            argmax(row),
            argmax(w),
            "image {b}: encrypted {row:?} vs plaintext {w:?}"
        );
    }
    assert!(max_err < 1e-3, "max |encrypted - plaintext| = {max_err}");
}

#[test]
fn full_job_matches_plaintext_and_survives_kill9() {
    let tmp = tempfile::tempdir().unwrap();
    let (zoo, model) = make_zoo(tmp.path());
    let data = tmp.path().join("data");
    let mut server = Server::start(&zoo, &data, true, &[]);
    let (s, v) = get(&format!("{}/api/health", server.url));
    assert_eq!((s, v), (200, json!({"ok": true})));
    let info = model_info(&server);
    assert_eq!(info["insecure_test_params"], true);
    assert_eq!(
        info["input_ciphertexts"].as_u64().unwrap() as usize,
        model.input_len()
    );
    let keys = client_keys(&info);
    let key_id = upload_key(&server, &keys);
    assert_eq!(key_id, sha_hex(&keys.rlk_bytes));
    // The same key again: known, 200.
    let (s, _) = call(
        ureq::post(&format!("{}/api/keys?model={MODEL}", server.url)),
        Some(&keys.rlk_bytes),
    );
    assert_eq!(s, 200);

    // (a) A whole job.
    let batch = 8;
    let imgs = images(batch, model.input_len(), 1);
    let cts = encrypt_inputs(&keys, &imgs);
    assert_eq!(
        cts[0].len() as u64,
        info["input_ciphertext_bytes"].as_u64().unwrap()
    );
    let job = create_job(&server, &key_id, batch);
    assert_eq!(job.n, model.input_len());
    // Start before the inputs are there: 409.
    let (s, _) = call(
        authed(
            ureq::post(&format!("{}/api/jobs/{}/start", server.url, job.id)),
            &job.token,
        ),
        Some(b""),
    );
    assert_eq!(s, 409);
    upload_inputs(&server, &job, &cts[..cts.len() - 1], 0);
    let (s, b) = call(
        authed(
            ureq::get(&format!("{}/api/jobs/{}/inputs", server.url, job.id)),
            &job.token,
        ),
        None,
    );
    assert_eq!(s, 200);
    let listing = json_of(&b);
    assert_eq!(listing["present"].as_u64().unwrap() as usize, job.n - 1);
    assert_eq!(listing["missing"], json!([job.n - 1]));
    upload_inputs(&server, &job, &cts[cts.len() - 1..], cts.len() - 1);
    // Idempotent re-upload of input 0.
    upload_inputs(&server, &job, &cts[..1], 0);
    let st = status(&server, &job);
    assert_eq!(st["state"], "uploading");
    assert_eq!(st["inputs_present"].as_u64().unwrap() as usize, job.n);
    let (s, _) = call(
        authed(
            ureq::get(&format!("{}/api/jobs/{}/result", server.url, job.id)),
            &job.token,
        ),
        None,
    );
    assert_eq!(s, 409, "no result before the job is done");
    let t = Instant::now();
    start(&server, &job);
    let st = wait_done(&server, &job, Duration::from_secs(120));
    let job_seconds = t.elapsed().as_secs_f64();
    assert_eq!(st["progress"], 1.0);
    let got = result(&server, &job, &keys, batch);
    check_against_plaintext(&model, &imgs, &got);
    eprintln!("full job: {job_seconds:.2} s");
    // Inputs can no longer change.
    let (s, _) = call(
        authed(
            ureq::put(&format!("{}/api/jobs/{}/inputs/0", server.url, job.id)),
            &job.token,
        ),
        Some(&cts[0]),
    );
    assert_eq!(s, 409);

    // (b) kill -9 while running, restart on the same data directory.
    let imgs2 = images(batch, model.input_len(), 2);
    let cts2 = encrypt_inputs(&keys, &imgs2);
    let job2 = create_job(&server, &key_id, batch);
    upload_inputs(&server, &job2, &cts2, 0);
    start(&server, &job2);
    wait_running(&server, &job2, None);
    server.kill9();
    let server = Server::start(&zoo, &data, true, &[]);
    // The finished job and its result survive too.
    assert_eq!(status(&server, &job)["state"], "done");
    assert_eq!(result(&server, &job, &keys, batch), got);
    let st = status(&server, &job2);
    assert!(
        st["state"] == "queued" || st["state"] == "running" || st["state"] == "done",
        "{st}"
    );
    wait_done(&server, &job2, Duration::from_secs(120));
    let got2 = result(&server, &job2, &keys, batch);
    check_against_plaintext(&model, &imgs2, &got2);

    // DELETE removes the job and its files.
    let (s, b) = call(
        authed(
            ureq::delete(&format!("{}/api/jobs/{}", server.url, job.id)),
            &job.token,
        ),
        None,
    );
    assert_eq!((s, json_of(&b)), (200, json!({"deleted": true})));
    let (s, _) = call(
        authed(
            ureq::get(&format!("{}/api/jobs/{}", server.url, job.id)),
            &job.token,
        ),
        None,
    );
    assert_eq!(s, 404);
    assert!(!data.join("jobs").join(&job.id).exists());

    // The operator's log says where each computed job's time went.
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    let computed: Vec<&str> = log.lines().filter(|l| l.contains("job computed")).collect();
    assert!(!computed.is_empty(), "no \"job computed\" line in:\n{log}");
    assert!(
        computed
            .iter()
            .all(|l| l.contains("gemm ") && l.contains("key_switch ")),
        "{computed:?}"
    );
}

/// Sends raw bytes and returns the status line's code (None if the server closed).
fn raw_request(url: &str, request: &[u8]) -> Option<u16> {
    let addr = url.strip_prefix("http://").unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(request);
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf[..n]);
    text.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn malformed_requests_get_4xx_and_tokens_are_per_job() {
    let tmp = tempfile::tempdir().unwrap();
    let (zoo, model) = make_zoo(tmp.path());
    let data = tmp.path().join("data");
    let mut server = Server::start(&zoo, &data, true, &[]);
    let info = model_info(&server);
    let keys = client_keys(&info);
    let url = server.url.clone();
    let key_url = format!("{url}/api/keys?model={MODEL}");
    let rlk = &keys.rlk_bytes;

    // Keys: wrong sizes, wrong parameters, random bytes, unknown model, huge declared length.
    let (s, b) = call(ureq::post(&key_url), Some(&rlk[..rlk.len() - 1]));
    assert_eq!((s, error_code(&b).as_str()), (400, "wrong_size"));
    let mut longer = rlk.clone();
    longer.push(0);
    assert_eq!(call(ureq::post(&key_url), Some(&longer)).0, 413);
    let mut other_params = rlk.clone();
    other_params[20] ^= 1; // inside the parameter fingerprint
    let (s, b) = call(ureq::post(&key_url), Some(&other_params));
    assert_eq!((s, error_code(&b).as_str()), (400, "params_mismatch"));
    let mut random = vec![0u8; rlk.len()];
    getrandom::getrandom(&mut random).unwrap();
    assert_eq!(call(ureq::post(&key_url), Some(&random)).0, 400);
    let mut bad_residue = rlk.clone();
    for b in &mut bad_residue[80..200] {
        *b = 0xff;
    }
    assert_eq!(call(ureq::post(&key_url), Some(&bad_residue)).0, 400);
    assert_eq!(
        call(ureq::post(&format!("{url}/api/keys?model=nope")), Some(rlk)).0,
        404
    );
    assert_eq!(
        call(
            ureq::post(&format!("{url}/api/keys?model=../../etc")),
            Some(rlk)
        )
        .0,
        404
    );
    assert_eq!(
        call(ureq::post(&format!("{url}/api/keys")), Some(rlk)).0,
        400
    );
    let huge = format!(
        "POST /api/keys?model={MODEL} HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999\r\n\r\nBEAA"
    );
    assert_eq!(raw_request(&url, huge.as_bytes()), Some(413));
    // A body longer than it should be, sent chunked (no declared length).
    let (s, _) = {
        let r = ureq::post(&key_url).send(std::io::Cursor::new(longer.clone()));
        match r {
            Ok(r) => (r.status(), ()),
            Err(ureq::Error::Status(c, _)) => (c, ()),
            Err(_) => (0, ()), // the server may close mid-body
        }
    };
    assert!(s == 413 || s == 0, "{s}");
    let key_id = upload_key(&server, &keys);

    // Jobs: bad JSON, oversized JSON, unknown model/key, batch out of range.
    let jobs = format!("{url}/api/jobs");
    for (body, code) in [
        (b"{not json".to_vec(), 400),
        (b"[]".to_vec(), 400),
        (json!({"model": MODEL, "key_id": key_id}).to_string().into_bytes(), 400),
        (json!({"model": "nope", "key_id": key_id, "batch": 1}).to_string().into_bytes(), 404),
        (json!({"model": MODEL, "key_id": "ab".repeat(32), "batch": 1}).to_string().into_bytes(), 404),
        (json!({"model": MODEL, "key_id": "../x", "batch": 1}).to_string().into_bytes(), 400),
        (json!({"model": MODEL, "key_id": key_id, "batch": 0}).to_string().into_bytes(), 400),
        (json!({"model": MODEL, "key_id": key_id, "batch": info["max_batch"].as_u64().unwrap() + 1}).to_string().into_bytes(), 400),
        (json!({"model": MODEL, "key_id": key_id, "batch": -1}).to_string().into_bytes(), 400),
        (vec![b' '; 100_000], 413),
    ] {
        let (s, b) = call(ureq::post(&jobs), Some(&body));
        assert_eq!(s, code, "{}: {}", String::from_utf8_lossy(&body[..body.len().min(80)]), String::from_utf8_lossy(&b));
        assert!(!error_code(&b).is_empty());
    }

    // Inputs: out of range, wrong sizes, truncated, random bytes, wrong parameters, bad checksum.
    let job = create_job(&server, &key_id, 4);
    let other = create_job(&server, &key_id, 4);
    let imgs = images(4, model.input_len(), 3);
    let cts = encrypt_inputs(&keys, &imgs);
    let ct = &cts[0];
    let put = |k: &str, token: &str| {
        authed(
            ureq::put(&format!("{url}/api/jobs/{}/inputs/{k}", job.id)),
            token,
        )
    };
    for k in [
        job.n.to_string(),
        "-1".into(),
        "abc".into(),
        "99999999999999999999999".into(),
    ] {
        let (s, b) = call(put(&k, &job.token), Some(ct));
        assert_eq!((s, error_code(&b).as_str()), (400, "bad_index"), "k = {k}");
    }
    assert_eq!(call(put("0", &job.token), Some(&ct[..ct.len() - 1])).0, 400);
    assert_eq!(call(put("0", &job.token), Some(&ct[..10])).0, 400);
    assert_eq!(call(put("0", &job.token), Some(b"")).0, 400);
    let mut longer = ct.clone();
    longer.extend_from_slice(&[0; 7]);
    assert_eq!(call(put("0", &job.token), Some(&longer)).0, 413);
    let mut random = vec![0u8; ct.len()];
    getrandom::getrandom(&mut random).unwrap();
    assert_eq!(call(put("0", &job.token), Some(&random)).0, 400);
    let mut wrong_params = ct.clone();
    wrong_params[9] ^= 0x40;
    let (s, b) = call(put("0", &job.token), Some(&wrong_params));
    assert_eq!((s, error_code(&b).as_str()), (400, "params_mismatch"));
    let mut bad_scale = ct.clone();
    bad_scale[42..50].copy_from_slice(&1.0f64.to_le_bytes());
    assert_eq!(call(put("0", &job.token), Some(&bad_scale)).0, 400);
    let mut bad_level = ct.clone();
    bad_level[40] = 0;
    assert_eq!(call(put("0", &job.token), Some(&bad_level)).0, 400);
    let (s, b) = call(
        put("0", &job.token).set("X-Checksum-Sha256", &"0".repeat(64)),
        Some(ct),
    );
    assert_eq!((s, error_code(&b).as_str()), (400, "checksum_mismatch"));
    assert_eq!(
        call(
            put("0", &job.token).set("X-Checksum-Sha256", "xyz"),
            Some(ct)
        )
        .0,
        400
    );
    let huge = format!(
        "PUT /api/jobs/{}/inputs/0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\nContent-Length: 999999999999\r\n\r\n",
        job.id, job.token
    );
    assert_eq!(raw_request(&url, huge.as_bytes()), Some(413));
    let overflow = huge.replace("999999999999", "18446744073709551616");
    let s = raw_request(&url, overflow.as_bytes()).unwrap_or(400);
    assert!((400..500).contains(&s), "{s}");
    // Garbage instead of HTTP.
    let _ = raw_request(&url, b"\x00\xff\x13GARBAGE\r\n\r\n");
    let _ = raw_request(
        &url,
        b"GET /api/health HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
    );
    // Nothing was stored by the bad uploads.
    let (s, b) = call(
        authed(
            ureq::get(&format!("{url}/api/jobs/{}/inputs", job.id)),
            &job.token,
        ),
        None,
    );
    assert_eq!(s, 200);
    assert_eq!(json_of(&b)["present"], 0);
    assert_eq!(call(put("0", &job.token), Some(ct)).0, 200);

    // (d) One job's token cannot read or change another job.
    let ou = |p: &str| format!("{url}/api/jobs/{}{p}", other.id);
    assert_eq!(call(authed(ureq::get(&ou("")), &job.token), None).0, 404);
    assert_eq!(
        call(authed(ureq::get(&ou("/inputs")), &job.token), None).0,
        404
    );
    assert_eq!(
        call(authed(ureq::put(&ou("/inputs/0")), &job.token), Some(ct)).0,
        404
    );
    assert_eq!(
        call(authed(ureq::post(&ou("/start")), &job.token), Some(b"")).0,
        404
    );
    assert_eq!(
        call(authed(ureq::get(&ou("/result")), &job.token), None).0,
        404
    );
    assert_eq!(call(authed(ureq::delete(&ou("")), &job.token), None).0, 404);
    assert_eq!(call(ureq::get(&ou("")), None).0, 401);
    assert_eq!(call(authed(ureq::get(&ou("")), "not-a-token"), None).0, 404);
    assert_eq!(
        call(
            authed(
                ureq::get(&format!("{url}/api/jobs/{}", "0".repeat(32))),
                &job.token
            ),
            None
        )
        .0,
        404
    );
    assert_eq!(
        call(
            authed(
                ureq::get(&format!("{url}/api/jobs/..%2F..%2Fetc")),
                &job.token
            ),
            None
        )
        .0,
        404
    );
    // The other job is untouched and its own token works.
    let st = status(&server, &other);
    assert_eq!(
        (st["state"].as_str(), st["inputs_present"].as_u64()),
        (Some("uploading"), Some(0))
    );
    assert_eq!(status(&server, &job)["inputs_present"], 1);

    // Static files cannot leave the web directory; unknown API paths are JSON 404s.
    assert_eq!(
        raw_request(&url, b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n"),
        Some(404)
    );
    let (s, b) = call(ureq::get(&format!("{url}/api/nope")), None);
    assert_eq!((s, error_code(&b).as_str()), (404, "not_found"));

    // Still serving.
    assert!(server.alive());
    assert_eq!(get(&format!("{url}/api/health")).0, 200);
    let (s, v) = get(&format!("{url}/api/openapi.json"));
    assert_eq!(s, 200);
    assert!(v["paths"]["/api/jobs/{id}/inputs/{k}"]["put"].is_object());
}

#[test]
fn without_the_flag_test_parameters_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (zoo, _model) = make_zoo(tmp.path());
    // Keys made at the test parameters.
    let insecure = Server::start(&zoo, &tmp.path().join("data1"), true, &[]);
    let test_info = model_info(&insecure);
    let test_keys = client_keys(&test_info);
    drop(insecure);

    let mut server = Server::start(&zoo, &tmp.path().join("data2"), false, &[]);
    let info = model_info(&server);
    assert_eq!(info["insecure_test_params"], false);
    assert_ne!(info["params_fingerprint"], test_info["params_fingerprint"]);
    let spec: ParamSpec = serde_json::from_value(info["params"].clone()).unwrap();
    assert!(Params::from_spec(spec, false).unwrap().is_secure());
    let (s, _) = call(
        ureq::post(&format!("{}/api/keys?model={MODEL}", server.url)),
        Some(&test_keys.rlk_bytes),
    );
    assert!((400..500).contains(&s), "{s}");
    // A test-parameter key padded to the secure key's size is still refused.
    let mut padded = test_keys.rlk_bytes.clone();
    padded.resize(info["relin_key_bytes"].as_u64().unwrap() as usize, 0);
    let (s, b) = call(
        ureq::post(&format!("{}/api/keys?model={MODEL}", server.url)),
        Some(&padded),
    );
    assert_eq!((s, error_code(&b).as_str()), (400, "params_mismatch"));
    assert!(server.alive());
}

/// Random RGB PNGs of `size` x `size`.
fn write_pngs(dir: &Path, count: usize, size: u32, seed: u64) -> Vec<PathBuf> {
    std::fs::create_dir_all(dir).unwrap();
    let mut x = seed | 1;
    (0..count)
        .map(|i| {
            let img = image::RgbImage::from_fn(size, size, |_, _| {
                let mut px = [0u8; 3];
                for p in &mut px {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *p = (x >> 56) as u8;
                }
                image::Rgb(px)
            });
            let path = dir.join(format!("img{i}.png"));
            img.save(&path).unwrap();
            path
        })
        .collect()
}

/// `beaa keygen` + `beaa predict` against the running server, two clients at once.
#[test]
fn cli_predict_matches_plaintext_with_concurrent_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let (zoo, model) = make_zoo(tmp.path());
    let server = Server::start(&zoo, &tmp.path().join("data"), true, &[]);
    let info = model_info(&server);
    let keys_dir = tmp.path().join("keys");
    let out = Command::new(env!("CARGO_BIN_EXE_beaa"))
        .args(["keygen", "--model", MODEL, "--server", &server.url, "--out"])
        .arg(&keys_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(keys_dir.join("secret.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let meta = json_of(&std::fs::read(keys_dir.join("keys.json")).unwrap());
    assert_eq!(meta["params_fingerprint"], info["params_fingerprint"]);

    let spec = model.manifest.input.clone();
    let dirs = [tmp.path().join("a"), tmp.path().join("b")];
    let files: Vec<Vec<PathBuf>> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| write_pngs(d, 3 + i, 12, 7 + i as u64))
        .collect();
    let children: Vec<_> = dirs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_beaa"));
            cmd.args([
                "predict",
                "--server",
                &server.url,
                "--model",
                MODEL,
                "--json",
            ]);
            if i == 0 {
                cmd.arg("--keys").arg(&keys_dir);
            }
            cmd.arg(d)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (child, files) in children.into_iter().zip(&files) {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = json_of(&out.stdout);
        let preds = v["predictions"].as_array().unwrap();
        assert_eq!(preds.len(), files.len());
        for (p, f) in preds.iter().zip(files) {
            let x = beaa_model::preprocess::preprocess(&std::fs::read(f).unwrap(), &spec).unwrap();
            let want = model.forward_f32(&x, 1).unwrap();
            let got: Vec<f64> = p["logits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| l.as_f64().unwrap())
                .collect();
            assert_eq!(
                p["class_index"].as_u64().unwrap() as usize,
                argmax(&want),
                "{p} vs {want:?}"
            );
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-3, "{got:?} vs {want:?}");
            }
            let probs: f64 = p["probabilities"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap())
                .sum();
            assert!((probs - 1.0).abs() < 1e-9);
        }
    }
}

/// The model's sizes as an unlimited server reports them: (input ciphertext, relinearization
/// key, work directory) bytes.
fn probe_sizes(zoo: &Path, tmp: &Path) -> (u64, u64, u64) {
    let probe = Server::start(zoo, &tmp.join("probe"), true, &[]);
    let info = model_info(&probe);
    let size = |k: &str| info[k].as_u64().unwrap();
    (
        size("input_ciphertext_bytes"),
        size("relin_key_bytes"),
        size("work_dir_bytes"),
    )
}

/// Uploads past `--max-disk-gb` get `507 disk_quota` and store nothing; deleting a job gives
/// the space back.
#[test]
fn disk_quota_refuses_uploads_with_507_until_space_is_freed() {
    let tmp = tempfile::tempdir().unwrap();
    let (zoo, model) = make_zoo(tmp.path());
    // Measure the sizes first, then size the quota for the key and about three inputs.
    let (ct_len, rlk_len, _) = probe_sizes(&zoo, tmp.path());
    let quota = rlk_len + 3 * ct_len + ct_len / 2;
    let quota_gb = format!("{}", quota as f64 / 1e9);
    let data = tmp.path().join("data");
    let server = Server::start(&zoo, &data, true, &["--max-disk-gb", &quota_gb]);
    let info = model_info(&server);
    let keys = client_keys(&info);
    let key_id = upload_key(&server, &keys);
    let imgs = images(2, model.input_len(), 5);
    let cts = encrypt_inputs(&keys, &imgs);
    let job = create_job(&server, &key_id, 2);
    let put = |job: &Job, k: usize| {
        call(
            authed(
                ureq::put(&format!("{}/api/jobs/{}/inputs/{k}", server.url, job.id)),
                &job.token,
            ),
            Some(&cts[k]),
        )
    };
    let mut stored = 0;
    let refused = loop {
        let (s, b) = put(&job, stored);
        if s != 200 {
            break (s, error_code(&b));
        }
        stored += 1;
        assert!(stored < 10, "the quota of {quota} bytes was never enforced");
    };
    assert_eq!(refused, (507, "disk_quota".to_owned()));
    // Within the quota (the database files count too), and at least two inputs fit.
    assert!((2..=3).contains(&stored), "{stored} inputs stored");
    let st = status(&server, &job);
    assert_eq!(st["inputs_present"].as_u64().unwrap() as usize, stored);
    let files = std::fs::read_dir(data.join("jobs").join(&job.id).join("inputs"))
        .unwrap()
        .count();
    assert_eq!(files, stored, "a refused upload left a file behind");
    assert_eq!(std::fs::read_dir(data.join("tmp")).unwrap().count(), 0);
    // Deleting the job frees its inputs: another job can upload again.
    let (s, _) = call(
        authed(
            ureq::delete(&format!("{}/api/jobs/{}", server.url, job.id)),
            &job.token,
        ),
        None,
    );
    assert_eq!(s, 200);
    let job2 = create_job(&server, &key_id, 2);
    assert_eq!(put(&job2, 0).0, 200);
}

/// A job whose intermediate tiles (the plan's `work_dir_bytes`) would not fit beside what is
/// stored is not started: `507 disk_quota`, its inputs kept. With the room, the same inputs
/// start and the job finishes.
#[test]
fn jobs_whose_working_space_exceeds_the_quota_are_not_started() {
    let tmp = tempfile::tempdir().unwrap();
    let (zoo, model) = make_zoo(tmp.path());
    let (ct_len, rlk_len, work) = probe_sizes(&zoo, tmp.path());
    let n = model.input_len() as u64;
    // Room for the key, the inputs, the database and half the working space.
    let slack = 1_000_000;
    assert!(
        work / 2 > slack,
        "work dir {work} bytes: too small to test with"
    );
    let quota = rlk_len + n * ct_len + slack + work / 2;
    let data = tmp.path().join("data");
    let server = Server::start(
        &zoo,
        &data,
        true,
        &["--max-disk-gb", &format!("{}", quota as f64 / 1e9)],
    );
    let keys = client_keys(&model_info(&server));
    let key_id = upload_key(&server, &keys);
    let imgs = images(2, model.input_len(), 8);
    let cts = encrypt_inputs(&keys, &imgs);
    let job = create_job(&server, &key_id, 2);
    upload_inputs(&server, &job, &cts, 0);
    let (s, b) = call(
        authed(
            ureq::post(&format!("{}/api/jobs/{}/start", server.url, job.id)),
            &job.token,
        ),
        Some(b""),
    );
    assert_eq!((s, error_code(&b)), (507, "disk_quota".to_owned()));
    let st = status(&server, &job);
    assert_eq!(st["state"], "uploading");
    assert_eq!(st["inputs_present"].as_u64().unwrap(), n);
    drop(server);
    // The same data directory under a quota with room: the job starts and completes.
    let server = Server::start(
        &zoo,
        &data,
        true,
        &["--max-disk-gb", &format!("{}", (quota + work) as f64 / 1e9)],
    );
    model_info(&server); // planned and ready
    start(&server, &job);
    let done = wait_done(&server, &job, Duration::from_secs(300));
    assert_eq!(done["state"], "done", "{done}");
    check_against_plaintext(&model, &imgs, &result(&server, &job, &keys, 2));
}

/// Jobs and then their unused key disappear after `--job-ttl-hours`: files, status and all.
#[test]
fn expired_jobs_and_keys_are_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let (zoo, model) = make_zoo(tmp.path());
    let data = tmp.path().join("data");
    // 0.002 h = 7.2 s; a sweep every second.
    let server = Server::start(
        &zoo,
        &data,
        true,
        &["--job-ttl-hours", "0.002", "--sweep-interval-s", "1"],
    );
    let info = model_info(&server);
    let keys = client_keys(&info);
    let key_id = upload_key(&server, &keys);
    let job = create_job(&server, &key_id, 2);
    let cts = encrypt_inputs(&keys, &images(2, model.input_len(), 6));
    upload_inputs(&server, &job, &cts[..2], 0);
    assert_eq!(status(&server, &job)["inputs_present"], 2);
    let job_dir = data.join("jobs").join(&job.id);
    assert!(job_dir.join("inputs").join("1.ct").is_file());
    let t = Instant::now();
    loop {
        let (s, b) = call(
            authed(
                ureq::get(&format!("{}/api/jobs/{}", server.url, job.id)),
                &job.token,
            ),
            None,
        );
        if s == 404 {
            assert_eq!(error_code(&b), "job_not_found");
            break;
        }
        assert_eq!(s, 200);
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the job never expired"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        t.elapsed() > Duration::from_secs(2),
        "expired long before its TTL"
    );
    assert!(!job_dir.exists(), "the expired job's files are still there");
    // The key, unused and referred to by no job, goes too; a new job then needs it again.
    let key_file = data.join("keys").join(format!("{key_id}.rlk"));
    while key_file.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the key never expired"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let (s, b) = call(
        ureq::post(&format!("{}/api/jobs", server.url)),
        Some(
            json!({"model": MODEL, "key_id": key_id, "batch": 2})
                .to_string()
                .as_bytes(),
        ),
    );
    assert_eq!((s, error_code(&b).as_str()), (404, "key_not_found"));
}

/// Inputs are fsynced at the start, not at upload: inputs lost before the start (here
/// truncated and removed on disk, as a power loss may leave them) are reported as missing,
/// and the job starts once they are uploaded again.
#[test]
fn start_reports_inputs_lost_since_upload() {
    let tmp = tempfile::tempdir().unwrap();
    let (zoo, model) = make_zoo(tmp.path());
    let data = tmp.path().join("data");
    let server = Server::start(&zoo, &data, true, &[]);
    let info = model_info(&server);
    let keys = client_keys(&info);
    let key_id = upload_key(&server, &keys);
    let batch = 2;
    let imgs = images(batch, model.input_len(), 8);
    let cts = encrypt_inputs(&keys, &imgs);
    let job = create_job(&server, &key_id, batch);
    upload_inputs(&server, &job, &cts, 0);
    let inputs = data.join("jobs").join(&job.id).join("inputs");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(inputs.join("3.ct"))
        .unwrap();
    f.set_len(cts[3].len() as u64 / 2).unwrap();
    drop(f);
    std::fs::remove_file(inputs.join("5.ct")).unwrap();
    let start_url = format!("{}/api/jobs/{}/start", server.url, job.id);
    let (s, b) = call(authed(ureq::post(&start_url), &job.token), Some(b""));
    assert_eq!(
        (s, error_code(&b).as_str()),
        (409, "inputs_missing"),
        "{}",
        String::from_utf8_lossy(&b)
    );
    let (s, b) = call(
        authed(
            ureq::get(&format!("{}/api/jobs/{}/inputs", server.url, job.id)),
            &job.token,
        ),
        None,
    );
    assert_eq!(s, 200);
    assert_eq!(json_of(&b)["missing"], json!([3, 5]));
    assert_eq!(status(&server, &job)["state"], "uploading");
    upload_inputs(&server, &job, &cts[3..4], 3);
    upload_inputs(&server, &job, &cts[5..6], 5);
    start(&server, &job);
    wait_done(&server, &job, Duration::from_secs(120));
    check_against_plaintext(&model, &imgs, &result(&server, &job, &keys, batch));
}

/// `beaa predict --keys DIR` remembers its job: a client stopped mid-upload (here by the
/// server's disk quota) leaves `DIR/jobs/<digest>.json` (mode 0600); other pixels are another
/// job; the same command - after a server restart, at its new address - uploads only the
/// missing inputs, finishes the same job with the plaintext's predictions and forgets it.
/// Each `predict` starts right after its server: it waits for the model to be planned.
#[test]
fn cli_predict_resumes_its_job_after_an_interruption() {
    let tmp = tempfile::tempdir().unwrap();
    let (zoo, model) = make_zoo(tmp.path());
    let (ct_len, rlk_len, _) = probe_sizes(&zoo, tmp.path());
    let n_inputs = model.input_len();
    // Room for the key and about half the inputs.
    let quota = rlk_len + (n_inputs as u64 / 2) * ct_len;
    let quota_gb = format!("{}", quota as f64 / 1e9);
    let data = tmp.path().join("data");
    // The planner held back: the server lists the model as loading, and the client waits for
    // it (before `loading` existed, it was told there is no such model).
    let mut server = Server::start(
        &zoo,
        &data,
        true,
        &["--max-disk-gb", &quota_gb, "--plan-delay-ms", "1500"],
    );
    let (s, v) = get(&format!("{}/api/models", server.url));
    assert_eq!(s, 200);
    assert_eq!(v["models"], json!([]), "{v}");
    assert_eq!(v["loading"], json!([MODEL]), "{v}");
    let keys_dir = tmp.path().join("keys");
    let files = write_pngs(&tmp.path().join("imgs"), 3, 12, 21);
    let predict = |url: &str, images: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_beaa"))
            .args(["predict", "--server", url, "--model", MODEL, "--json"])
            .arg("--keys")
            .arg(&keys_dir)
            .arg(images)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, stderr) = predict(&server.url, &tmp.path().join("imgs"));
    assert!(!ok && stderr.contains("507"), "{stderr}");
    assert!(stderr.contains("still preparing"), "{stderr}");
    assert!(stderr.contains("run the same command again"), "{stderr}");
    let pending_dir = keys_dir.join("jobs");
    let remembered: Vec<PathBuf> = std::fs::read_dir(&pending_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(remembered.len(), 1, "{remembered:?}");
    let pending = remembered[0].clone();
    let job = json_of(&std::fs::read(&pending).unwrap());
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&pending).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let job = Job {
        id: job["job_id"].as_str().unwrap().to_owned(),
        token: job["token"].as_str().unwrap().to_owned(),
        n: n_inputs,
    };
    let present = status(&server, &job)["inputs_present"].as_u64().unwrap() as usize;
    assert!(0 < present && present < n_inputs, "{present} inputs stored");

    // The same file name with other pixels is another job (which the full server refuses
    // to create), not a continuation of the first; the first stays remembered.
    let original = std::fs::read(&files[0]).unwrap();
    write_pngs(&tmp.path().join("other"), 1, 12, 5);
    std::fs::copy(tmp.path().join("other").join("img0.png"), &files[0]).unwrap();
    let (ok, _, stderr) = predict(&server.url, &tmp.path().join("imgs"));
    assert!(!ok && !stderr.contains("resuming"), "{stderr}");
    assert!(pending.exists());
    std::fs::write(&files[0], original).unwrap();

    // The server restarts without the quota; the client continues the same job.
    server.kill9();
    let server = Server::start(&zoo, &data, true, &[]);
    let (ok, stdout, stderr) = predict(&server.url, &tmp.path().join("imgs"));
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains(&format!("resuming job {}", job.id)),
        "{stderr}"
    );
    let missing = n_inputs - present;
    assert!(
        stderr.contains(&format!("{missing} of {n_inputs} inputs missing")),
        "{stderr}"
    );
    let v = json_of(stdout.as_bytes());
    assert_eq!(v["job_id"].as_str(), Some(job.id.as_str()));
    let spec = model.manifest.input.clone();
    let preds = v["predictions"].as_array().unwrap();
    assert_eq!(preds.len(), files.len());
    for (p, f) in preds.iter().zip(&files) {
        let x = beaa_model::preprocess::preprocess(&std::fs::read(f).unwrap(), &spec).unwrap();
        let want = model.forward_f32(&x, 1).unwrap();
        assert_eq!(p["class_index"].as_u64().unwrap() as usize, argmax(&want));
    }
    assert!(!pending.exists(), "the finished job is still remembered");
}

/// `--winograd`: the server plans the 3x3 convolutions in Winograd's form, says so in the
/// model's info, and its jobs match the plaintext model. A job killed mid-run and resumed by a
/// server started without the flag recomputes under the direct plan (the operator's log says
/// why) and still matches: tiles of one plan are never read by another.
#[test]
fn winograd_jobs_match_plaintext_and_survive_a_restart_under_the_other_plan() {
    let tmp = tempfile::tempdir().unwrap();
    let (zoo, model) = make_zoo(tmp.path());
    let data = tmp.path().join("data");
    // Every 3x3 layer of the tiny model (3 to 8 input channels).
    let mut server = Server::start(&zoo, &data, true, &["--winograd", "1"]);
    let info = model_info(&server);
    let layers = info["winograd"].as_array().unwrap().clone();
    assert!(
        layers.iter().any(|l| l == "conv1.act"),
        "conv1 in Winograd's form: {layers:?}"
    );
    let keys = client_keys(&info);
    let key_id = upload_key(&server, &keys);
    let batch = 5;
    let imgs = images(batch, model.input_len(), 7);
    let job = create_job(&server, &key_id, batch);
    upload_inputs(&server, &job, &encrypt_inputs(&keys, &imgs), 0);
    start(&server, &job);
    wait_done(&server, &job, Duration::from_secs(120));
    check_against_plaintext(&model, &imgs, &result(&server, &job, &keys, batch));

    // Killed once its first tiles are on disk ...
    let imgs2 = images(batch, model.input_len(), 8);
    let job2 = create_job(&server, &key_id, batch);
    upload_inputs(&server, &job2, &encrypt_inputs(&keys, &imgs2), 0);
    start(&server, &job2);
    wait_running(&server, &job2, Some(0.0));
    server.kill9();
    // ... and resumed by a server planning every convolution directly.
    let server = Server::start(&zoo, &data, true, &[]);
    let info = model_info(&server);
    assert_eq!(info["winograd"], json!([]));
    assert_eq!(info["params_fingerprint"], keys_fingerprint(&keys));
    wait_done(&server, &job2, Duration::from_secs(120));
    check_against_plaintext(&model, &imgs2, &result(&server, &job2, &keys, batch));
    let log = std::fs::read_to_string(data.with_extension("log")).unwrap();
    assert!(
        log.contains("belong to another plan"),
        "no line about the discarded tiles in:\n{log}"
    );
}

fn keys_fingerprint(keys: &ClientKeys) -> String {
    keys.params
        .fingerprint()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
