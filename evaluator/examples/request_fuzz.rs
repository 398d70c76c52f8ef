//! Request fuzzer for `beaa serve` (loopback only, bounded in time). Used by
//! `scripts/request_fuzz.sh`. Starts the server itself (test parameters, a short job TTL and a
//! fast expiry sweep, a small disk quota so that `507` and expiry happen during the run), then
//! for `--seconds` sends from several threads a mix of:
//! - valid flows (create a job, upload inputs, list, status, start, wait, result, delete, or
//!   leave it to expire), whose answers are checked;
//! - random and mutated requests over raw TCP: wrong and unknown methods, random paths and ids,
//!   bad indices, bad and foreign tokens, random header names and values, missing, wrong,
//!   huge, negative or duplicated `Content-Length`, broken chunked encoding, bodies cut off
//!   mid-way, mutated ciphertexts and keys (behind valid tokens, so they reach validation),
//!   bad JSON, and plain garbage instead of HTTP.
//!
//! A monitor checks every second that the process is alive and answers `GET /api/health` and
//! `GET /api/models`. Prints one JSON line: requests by kind and status, 5xx (507 is
//! documented), health-check failures, panics in the server log, the server's peak RSS.
//! Exits non-zero on a crash, a failed health check, an undocumented 5xx or a panic.

use beaa_ckks::{Encryptor, KeyGenerator, ParamSpec, Params};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Opts {
    beaa: PathBuf,
    zoo: PathBuf,
    model: String,
    data: PathBuf,
    seconds: u64,
    threads: usize,
    seed: u64,
    max_disk_gb: f64,
}

fn opts() -> Opts {
    let a: Vec<String> = std::env::args().collect();
    let get = |k: &str, d: &str| -> String {
        a.iter()
            .position(|x| x == k)
            .and_then(|i| a.get(i + 1).cloned())
            .unwrap_or_else(|| d.to_owned())
    };
    Opts {
        beaa: get("--beaa", "target/release/beaa").into(),
        zoo: get("--zoo", "").into(),
        model: get("--model", "tiny"),
        data: get("--data-dir", "").into(),
        seconds: get("--seconds", "600").parse().expect("--seconds"),
        threads: get("--threads", "4").parse().expect("--threads"),
        seed: get("--seed", "1").parse().expect("--seed"),
        max_disk_gb: get("--max-disk-gb", "0.3").parse().expect("--max-disk-gb"),
    }
}

/// xorshift64; a `Cell` so that draws nest (`rng.bytes(rng.below(n))`).
struct Rng(std::cell::Cell<u64>);

impl Rng {
    fn next(&self) -> u64 {
        let mut x = self.0.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0.set(x);
        x
    }
    fn below(&self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&self, one_in: u64) -> bool {
        self.next().is_multiple_of(one_in)
    }
    fn pick<'a, T>(&self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
    fn bytes(&self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
    fn hex(&self, n: usize) -> String {
        (0..n)
            .map(|_| char::from(b"0123456789abcdef"[self.below(16)]))
            .collect()
    }
}

#[derive(Default)]
struct Stats {
    /// "kind status" -> count.
    by_kind: Mutex<BTreeMap<String, u64>>,
    by_status: Mutex<BTreeMap<String, u64>>,
    requests: AtomicU64,
    unexpected_5xx: AtomicU64,
    examples_5xx: Mutex<Vec<String>>,
    flow_errors: AtomicU64,
    examples_flow: Mutex<Vec<String>>,
    health_checks: AtomicU64,
    health_failures: AtomicU64,
    health_max_ms: AtomicU64,
    jobs_done: AtomicU64,
    peak_rss: AtomicU64,
}

impl Stats {
    fn record(&self, kind: &str, status: &str, what: &dyn Fn() -> String) {
        self.requests.fetch_add(1, Relaxed);
        *self
            .by_kind
            .lock()
            .unwrap()
            .entry(format!("{kind} {status}"))
            .or_default() += 1;
        *self
            .by_status
            .lock()
            .unwrap()
            .entry(status.to_owned())
            .or_default() += 1;
        if status.starts_with('5') && status != "507" {
            self.unexpected_5xx.fetch_add(1, Relaxed);
            let mut ex = self.examples_5xx.lock().unwrap();
            if ex.len() < 10 {
                ex.push(what());
            }
        }
    }
    fn flow_error(&self, what: String) {
        self.flow_errors.fetch_add(1, Relaxed);
        let mut ex = self.examples_flow.lock().unwrap();
        if ex.len() < 10 {
            ex.push(what);
        }
    }
}

/// What the test knows about the server.
struct Ctx {
    addr: String,
    url: String,
    model: String,
    key_id: String,
    rlk: Vec<u8>,
    cts: Vec<Vec<u8>>,
    inputs: usize,
}

/// The first line's status of a raw exchange, "none" when the server closed without one,
/// "timeout" when it did not answer in 10 s, "connect" when it refused the connection.
fn raw(addr: &str, head: &[u8], body: &[u8], cut: Option<usize>) -> String {
    let Ok(mut s) = TcpStream::connect(addr) else {
        return "connect".into();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
    let _ = s.set_nodelay(true);
    if s.write_all(head).is_err() {
        return "none".into();
    }
    let body = match cut {
        Some(n) => &body[..n.min(body.len())],
        None => body,
    };
    // The server may answer (and close) before the body is read: keep going regardless.
    let _ = s.write_all(body);
    if cut.is_some() {
        let _ = s.shutdown(Shutdown::Write);
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.windows(2).any(|w| w == b"\r\n") || buf.len() > 1 << 16 {
                    break;
                }
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return "timeout".into();
            }
            Err(_) => break,
        }
    }
    let line = String::from_utf8_lossy(&buf);
    match line.split_whitespace().nth(1) {
        Some(code) if line.starts_with("HTTP/1.") && code.len() == 3 => code.to_owned(),
        _ => "none".into(),
    }
}

/// A valid request through ureq (keep-alive); (status, body).
fn call(
    agent: &ureq::Agent,
    method: &str,
    url: &str,
    auth: Option<&str>,
    body: Option<&[u8]>,
) -> Result<(u16, Vec<u8>), String> {
    let mut req = agent.request(method, url);
    if let Some(a) = auth {
        req = req.set("Authorization", a);
    }
    let res = match body {
        Some(b) => req.send_bytes(b),
        None => req.call(),
    };
    let r = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => return Err(e.to_string()),
    };
    let status = r.status();
    let mut out = Vec::new();
    let _ = r.into_reader().take(1 << 26).read_to_end(&mut out);
    Ok((status, out))
}

/// A job this thread created: its id and token, reused by the mutated requests.
#[derive(Clone)]
struct Job {
    id: String,
    token: String,
}

fn create_job(ctx: &Ctx, stats: &Stats, agent: &ureq::Agent) -> Option<Job> {
    let body = json!({"model": ctx.model, "key_id": ctx.key_id, "batch": 4}).to_string();
    match call(
        agent,
        "POST",
        &format!("{}/api/jobs", ctx.url),
        None,
        Some(body.as_bytes()),
    ) {
        Ok((s, b)) => {
            stats.record("flow.create", &s.to_string(), &|| "POST /api/jobs".into());
            if s != 201 {
                stats.flow_error(format!("create: {s} {}", String::from_utf8_lossy(&b)));
                return None;
            }
            let v: Value = serde_json::from_slice(&b).ok()?;
            Some(Job {
                id: v["job_id"].as_str()?.to_owned(),
                token: v["token"].as_str()?.to_owned(),
            })
        }
        Err(e) => {
            stats.record("flow.create", "transport", &String::new);
            stats.flow_error(format!("create: {e}"));
            None
        }
    }
}

/// A valid flow: create, upload `upto` inputs (all: start, wait, fetch, delete).
fn valid_flow(
    ctx: &Ctx,
    stats: &Stats,
    agent: &ureq::Agent,
    rng: &mut Rng,
    full: bool,
) -> Option<Job> {
    let job = create_job(ctx, stats, agent)?;
    let auth = format!("Bearer {}", job.token);
    let upto = if full { ctx.inputs } else { rng.below(8) };
    for k in 0..upto {
        let ct = rng.pick(&ctx.cts);
        let url = format!("{}/api/jobs/{}/inputs/{k}", ctx.url, job.id);
        match call(agent, "PUT", &url, Some(&auth), Some(ct)) {
            Ok((s, b)) => {
                stats.record("flow.put", &s.to_string(), &|| format!("PUT {url}"));
                if s == 507 {
                    // The quota: expected now and then; the sweeper frees space.
                    return Some(job);
                }
                if s != 200 {
                    // The job may have expired meanwhile (short TTL): 404.
                    if s != 404 {
                        stats.flow_error(format!("put: {s} {}", String::from_utf8_lossy(&b)));
                    }
                    return None;
                }
            }
            Err(e) => {
                stats.record("flow.put", "transport", &String::new);
                stats.flow_error(format!("put: {e}"));
                return None;
            }
        }
    }
    let base = format!("{}/api/jobs/{}", ctx.url, job.id);
    for path in ["/inputs", ""] {
        if let Ok((s, _)) = call(agent, "GET", &format!("{base}{path}"), Some(&auth), None) {
            stats.record("flow.get", &s.to_string(), &|| format!("GET {base}{path}"));
        }
    }
    if !full {
        return Some(job);
    }
    match call(
        agent,
        "POST",
        &format!("{base}/start"),
        Some(&auth),
        Some(b""),
    ) {
        Ok((s, b)) => {
            stats.record("flow.start", &s.to_string(), &|| {
                format!("POST {base}/start")
            });
            if s != 202 {
                if s != 404 {
                    stats.flow_error(format!("start: {s} {}", String::from_utf8_lossy(&b)));
                }
                return None;
            }
        }
        Err(e) => {
            stats.flow_error(format!("start: {e}"));
            return None;
        }
    }
    let t = Instant::now();
    loop {
        let Ok((s, b)) = call(agent, "GET", &base, Some(&auth), None) else {
            return None;
        };
        stats.record("flow.status", &s.to_string(), &|| format!("GET {base}"));
        if s != 200 {
            return None;
        }
        let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
        match v["state"].as_str() {
            Some("done") => break,
            Some("failed") | Some("cancelled") => {
                stats.flow_error(format!("job ended: {v}"));
                return None;
            }
            _ => {}
        }
        if t.elapsed() > Duration::from_secs(120) {
            stats.flow_error(format!("job not done in 120 s: {v}"));
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if let Ok((s, b)) = call(agent, "GET", &format!("{base}/result"), Some(&auth), None) {
        stats.record("flow.result", &s.to_string(), &|| {
            format!("GET {base}/result")
        });
        if s == 200 && b.len() >= 4 {
            stats.jobs_done.fetch_add(1, Relaxed);
        } else if s != 404 {
            stats.flow_error(format!("result: {s}, {} bytes", b.len()));
        }
    }
    if let Ok((s, _)) = call(agent, "DELETE", &base, Some(&auth), None) {
        stats.record("flow.delete", &s.to_string(), &|| format!("DELETE {base}"));
    }
    None
}

fn mutate(rng: &mut Rng, src: &[u8]) -> Vec<u8> {
    let mut b = src.to_vec();
    match rng.below(6) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                if !b.is_empty() {
                    let at = rng.below(b.len().min(if rng.chance(2) { 96 } else { usize::MAX }));
                    b[at] ^= 1 << rng.below(8);
                }
            }
        }
        1 => b.truncate(rng.below(b.len() + 1)),
        2 => {
            let extra = rng.bytes(1 + rng.below(64));
            b.extend_from_slice(&extra);
        }
        3 => {
            if !b.is_empty() {
                let at = rng.below(b.len());
                let end = (at + 1 + rng.below(4096)).min(b.len());
                let r = rng.bytes(end - at);
                b[at..end].copy_from_slice(&r);
            }
        }
        4 => {
            // Another object's header on this body.
            if b.len() >= 8 {
                b[5] = rng.below(7) as u8;
                b[6] = rng.below(4) as u8;
            }
        }
        _ => {
            if b.len() > 50 {
                let s = f64::from_bits(rng.next());
                b[42..50].copy_from_slice(&s.to_le_bytes());
            }
        }
    }
    b
}

const METHODS: &[&str] = &[
    "GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "TRACE", "FOO", "get", "CONNECT",
];

fn random_id(rng: &mut Rng, job: Option<&Job>) -> String {
    match rng.below(10) {
        0..=3 => job.map_or_else(|| rng.hex(32), |j| j.id.clone()),
        4 => rng.hex(32),
        5 => rng.hex(32).to_uppercase(),
        6 => rng.hex(rng.below(70)),
        7 => "..%2F..%2Fetc".into(),
        8 => "%ff%00%c3%a9".into(),
        _ => "x".repeat(rng.below(9000)),
    }
}

fn random_k(rng: &mut Rng, n: usize) -> String {
    match rng.below(10) {
        0..=4 => rng.below(n).to_string(),
        5 => n.to_string(),
        6 => "-1".into(),
        7 => "99999999999999999999999999".into(),
        8 => "0x1f".into(),
        _ => "%E2%82%AC".into(),
    }
}

fn random_path(rng: &mut Rng, ctx: &Ctx, job: Option<&Job>) -> String {
    let id = random_id(rng, job);
    let k = random_k(rng, ctx.inputs);
    let model = if rng.chance(2) {
        ctx.model.clone()
    } else {
        rng.hex(rng.below(80))
    };
    match rng.below(20) {
        0 => "/api/health".into(),
        1 => "/api/models".into(),
        2 => "/api/openapi.json".into(),
        3 => format!("/api/keys?model={model}"),
        4 => "/api/keys".into(),
        5 => "/api/jobs".into(),
        6 => format!("/api/jobs/{id}"),
        7 => format!("/api/jobs/{id}/inputs"),
        8 | 9 => format!("/api/jobs/{id}/inputs/{k}"),
        10 => format!("/api/jobs/{id}/start"),
        11 => format!("/api/jobs/{id}/result"),
        12 => "/".into(),
        13 => "/../../etc/passwd".into(),
        14 => "/pkg/%2e%2e/%2e%2e/Cargo.toml".into(),
        15 => format!("/api/jobs/{id}/inputs/{k}/extra?x=1&x=2#frag"),
        16 => "*".into(),
        17 => format!("/{}", "a/".repeat(rng.below(3000))),
        18 => {
            // Printable noise.
            let n = rng.below(200);
            let noise: String = (0..n)
                .map(|_| char::from(0x21 + rng.below(0x5e) as u8))
                .collect();
            format!("/{noise}")
        }
        _ => format!("/api/jobs/{id}/inputs/{k}?model={model}"),
    }
}

/// One random or mutated request over raw TCP; returns (kind, status).
fn fuzz_request(ctx: &Ctx, rng: &mut Rng, job: Option<&Job>) -> (String, String, String) {
    let kind = rng.below(10);
    if kind == 0 {
        // Garbage instead of HTTP, or a truncated request line.
        let mut b = match rng.below(3) {
            0 => rng.bytes(1 + rng.below(2048)),
            1 => b"GET /api/health HTTP/1.1\r\nHost".to_vec(),
            _ => format!("{} /api/jobs HTTP/9.9\r\n\r\n", rng.hex(5)).into_bytes(),
        };
        if rng.chance(2) {
            b.extend_from_slice(b"\r\n\r\n");
        }
        let s = raw(&ctx.addr, &b, &[], Some(0));
        return ("garbage".into(), s, "garbage".into());
    }
    let path = random_path(rng, ctx, job);
    let method = if kind <= 6 {
        // Mostly the route's own method, to get past routing into the handlers.
        let route = path.split('?').next().unwrap_or("");
        if route.ends_with("/start") || route.ends_with("/api/keys") || route.ends_with("/api/jobs")
        {
            "POST"
        } else if route.contains("/inputs/") {
            "PUT"
        } else if route.starts_with("/api/jobs/") && !route.ends_with("/inputs") && rng.chance(4) {
            "DELETE"
        } else {
            "GET"
        }
    } else {
        *rng.pick(METHODS)
    };
    // Body: a valid or mutated ciphertext or key, JSON, random bytes, or nothing.
    let body: Vec<u8> = match rng.below(9) {
        0 => Vec::new(),
        1 => rng.pick(&ctx.cts).clone(),
        2 | 3 => {
            let ct = rng.pick(&ctx.cts).clone();
            mutate(rng, &ct)
        }
        4 => {
            if rng.chance(3) {
                ctx.rlk.clone()
            } else {
                mutate(rng, &ctx.rlk)
            }
        }
        5 => json!({"model": ctx.model, "key_id": ctx.key_id, "batch": rng.next() as i64 % 20})
            .to_string()
            .into_bytes(),
        6 => {
            let pieces = [
                "{",
                "}",
                "[",
                "]",
                "\"model\"",
                ":",
                ",",
                "\"key_id\"",
                "\"batch\"",
                "1e999",
                "-0",
                "null",
                "\"\\u0000\"",
                "\"\\ud800\"",
                "true",
                "\"tiny\"",
                "9999999999999999999999",
            ];
            let n = rng.below(60);
            (0..n)
                .map(|_| *rng.pick(&pieces))
                .collect::<String>()
                .into_bytes()
        }
        7 => "[".repeat(rng.below(100_000)).into_bytes(),
        _ => {
            let n = rng.below(70_000);
            rng.bytes(n)
        }
    };
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n");
    match rng.below(8) {
        0 => {}
        1..=4 => {
            if let Some(j) = job {
                head.push_str(&format!("Authorization: Bearer {}\r\n", j.token));
            }
        }
        5 => head.push_str(&format!("Authorization: Bearer {}\r\n", rng.hex(64))),
        6 => head.push_str("Authorization: Basic Zm9vOmJhcg==\r\n"),
        _ => head.push_str("Authorization: Bearer\r\n"),
    }
    if rng.chance(4) {
        let sum = match rng.below(3) {
            0 => rng.hex(64),
            1 => "zz".into(),
            _ => {
                use sha2::Digest;
                sha2::Sha256::digest(&body)
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect()
            }
        };
        head.push_str(&format!("X-Checksum-Sha256: {sum}\r\n"));
    }
    if rng.chance(5) {
        // Random header names and values (printable, possibly odd).
        for _ in 0..1 + rng.below(20) {
            let name = rng.hex(1 + rng.below(30));
            let value: String = (0..rng.below(300))
                .map(|_| char::from(0x20 + rng.below(0x5f) as u8))
                .collect();
            head.push_str(&format!("X-{name}: {value}\r\n"));
        }
    }
    let mut cut = None;
    let mut chunked_body = None;
    match rng.below(10) {
        0..=4 => head.push_str(&format!("Content-Length: {}\r\n", body.len())),
        5 => {
            // Declared in full, cut off mid-way.
            head.push_str(&format!("Content-Length: {}\r\n", body.len()));
            cut = Some(rng.below(body.len() + 1));
        }
        6 => {
            // A bad or wrong declared length; then the client stops sending.
            cut = Some(body.len());
            head.push_str(&format!(
                "Content-Length: {}\r\n",
                match rng.below(5) {
                    0 => "18446744073709551616".to_string(),
                    1 => "-5".into(),
                    2 => "abc".into(),
                    3 => (rng.next() >> rng.below(64)).to_string(),
                    _ => format!("{}, {}", body.len(), body.len() + 1),
                }
            ));
        }
        7 => {
            head.push_str("Transfer-Encoding: chunked\r\n");
            let mut c = Vec::new();
            let mut rest = &body[..];
            while !rest.is_empty() {
                let n = (1 + rng.below(100_000)).min(rest.len());
                c.extend_from_slice(format!("{n:x}\r\n").as_bytes());
                c.extend_from_slice(&rest[..n]);
                c.extend_from_slice(b"\r\n");
                rest = &rest[n..];
            }
            match rng.below(3) {
                0 => c.extend_from_slice(b"0\r\n\r\n"),
                1 => c.extend_from_slice(b"zz\r\n"),
                _ => cut = Some(rng.below(c.len() + 1)),
            }
            chunked_body = Some(c);
        }
        8 => {
            // Claims more than it sends, then closes.
            head.push_str(&format!(
                "Content-Length: {}\r\n",
                body.len() + 1 + rng.below(1000)
            ));
            cut = Some(body.len());
        }
        _ => {}
    }
    head.push_str("\r\n");
    let body = chunked_body.unwrap_or(body);
    let s = raw(&ctx.addr, head.as_bytes(), &body, cut);
    let route = path.split('?').next().unwrap_or("");
    let what = format!(
        "{method} {} ({} body bytes)",
        &route[..route.len().min(120)],
        body.len()
    );
    (format!("fuzz.{method}"), s, what)
}

fn spawn_server(o: &Opts, addr: &str, log: &std::path::Path) -> Child {
    let log = std::fs::File::create(log).expect("server log");
    let mut child = Command::new(&o.beaa)
        .args(["serve", "--insecure-test-params", "--addr", addr, "--zoo"])
        .arg(&o.zoo)
        .arg("--data-dir")
        .arg(&o.data)
        .args(["--job-ttl-hours", "0.01", "--sweep-interval-s", "5"])
        .args(["--max-disk-gb", &o.max_disk_gb.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log))
        .spawn()
        .expect("starting beaa serve");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().expect("server exited").unwrap();
    assert!(first.starts_with("listening on"), "{first}");
    std::thread::spawn(move || for _ in lines {});
    child
}

fn vm_hwm(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

fn main() {
    let o = opts();
    let t0 = Instant::now();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // Loopback only.
    let addr = format!("127.0.0.1:{port}");
    let url = format!("http://{addr}");
    let log = o.data.with_extension("log");
    let child = Arc::new(Mutex::new(spawn_server(&o, &addr, &log)));
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(60))
        .build();
    let info = loop {
        if let Ok((200, b)) = call(&agent, "GET", &format!("{url}/api/models"), None, None) {
            let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
            if let Some(m) = v["models"]
                .as_array()
                .and_then(|a| a.iter().find(|m| m["name"] == o.model.as_str()))
            {
                break m.clone();
            }
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "model never ready");
        std::thread::sleep(Duration::from_millis(100));
    };
    let spec: ParamSpec = serde_json::from_value(info["params"].clone()).unwrap();
    let params = Params::from_spec(spec, true).unwrap();
    let mut kg = KeyGenerator::new(&params);
    let sk = kg.secret_key();
    let rlk = kg.relin_key(&sk).to_bytes();
    let (s, b) = call(
        &agent,
        "POST",
        &format!("{url}/api/keys?model={}", o.model),
        None,
        Some(&rlk),
    )
    .unwrap();
    assert!(s == 200 || s == 201, "{s}");
    let key_id = serde_json::from_slice::<Value>(&b).unwrap()["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut enc = Encryptor::new(&params);
    let cts: Vec<Vec<u8>> = (0..4)
        .map(|i| {
            let v: Vec<f64> = (0..4).map(|j| (i * 4 + j) as f64 / 16.0 - 0.5).collect();
            enc.encrypt_values_sk(&sk, &v, params.default_scale(), params.max_level())
                .unwrap()
                .to_bytes()
        })
        .collect();
    let ctx = Arc::new(Ctx {
        addr: addr.clone(),
        url: url.clone(),
        model: o.model.clone(),
        key_id,
        rlk,
        cts,
        inputs: info["input_ciphertexts"].as_u64().unwrap() as usize,
    });
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));
    let deadline = Instant::now() + Duration::from_secs(o.seconds);

    // The monitor: alive, healthy and listing models, every second.
    let monitor = {
        let (stats, stop, child, url) = (stats.clone(), stop.clone(), child.clone(), url.clone());
        std::thread::spawn(move || {
            let agent = ureq::AgentBuilder::new()
                .timeout(Duration::from_secs(10))
                .build();
            let mut crashed = false;
            while !stop.load(Relaxed) {
                let mut c = child.lock().unwrap();
                if c.try_wait().unwrap().is_some() {
                    crashed = true;
                    stats.health_failures.fetch_add(1, Relaxed);
                    break;
                }
                stats.peak_rss.fetch_max(vm_hwm(c.id()), Relaxed);
                drop(c);
                for path in ["/api/health", "/api/models"] {
                    let t = Instant::now();
                    let ok = matches!(
                        call(&agent, "GET", &format!("{url}{path}"), None, None),
                        Ok((200, _))
                    );
                    stats.health_checks.fetch_add(1, Relaxed);
                    stats
                        .health_max_ms
                        .fetch_max(t.elapsed().as_millis() as u64, Relaxed);
                    if !ok {
                        stats.health_failures.fetch_add(1, Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_secs(1));
            }
            crashed
        })
    };

    let workers: Vec<_> = (0..o.threads)
        .map(|t| {
            let (ctx, stats) = (ctx.clone(), stats.clone());
            let seed = o.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((t as u64 + 1) * 0x2545_F491);
            std::thread::spawn(move || {
                let mut rng = Rng(std::cell::Cell::new(seed | 1));
                let agent = ureq::AgentBuilder::new()
                    .timeout(Duration::from_secs(60))
                    .build();
                let mut job: Option<Job> = None;
                while Instant::now() < deadline {
                    match rng.below(100) {
                        // A whole job now and then (thread 0 only: jobs run one at a time).
                        0 if t == 0 => {
                            valid_flow(&ctx, &stats, &agent, &mut rng, true);
                        }
                        0..=4 => {
                            if let Some(j) = valid_flow(&ctx, &stats, &agent, &mut rng, false) {
                                job = Some(j);
                            }
                        }
                        _ => {
                            let (kind, status, what) = fuzz_request(&ctx, &mut rng, job.as_ref());
                            stats.record(&kind, &status, &|| what.clone());
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    stop.store(true, Relaxed);
    let crashed = monitor.join().expect("monitor");
    let alive = {
        let mut c = child.lock().unwrap();
        let alive = c.try_wait().unwrap().is_none();
        stats.peak_rss.fetch_max(vm_hwm(c.id()), Relaxed);
        let _ = c.kill();
        let _ = c.wait();
        alive
    };
    let log_text = std::fs::read_to_string(&log).unwrap_or_default();
    let panics = log_text.matches("panicked").count();
    let internal_errors = log_text.lines().filter(|l| l.contains("ERROR")).count();
    let s = &*stats;
    let ok = alive
        && !crashed
        && panics == 0
        && s.health_failures.load(Relaxed) == 0
        && s.unexpected_5xx.load(Relaxed) == 0;
    println!(
        "{}",
        json!({
            "seconds": t0.elapsed().as_secs_f64(),
            "fuzz_seconds": o.seconds,
            "threads": o.threads,
            "seed": o.seed,
            "requests": s.requests.load(Relaxed),
            "by_status": *s.by_status.lock().unwrap(),
            "by_kind_status": *s.by_kind.lock().unwrap(),
            "unexpected_5xx": s.unexpected_5xx.load(Relaxed),
            "examples_5xx": *s.examples_5xx.lock().unwrap(),
            "flow_errors": s.flow_errors.load(Relaxed),
            "examples_flow_errors": *s.examples_flow.lock().unwrap(),
            "jobs_done": s.jobs_done.load(Relaxed),
            "health_checks": s.health_checks.load(Relaxed),
            "health_failures": s.health_failures.load(Relaxed),
            "health_max_ms": s.health_max_ms.load(Relaxed),
            "server_alive_at_end": alive,
            "server_panics_in_log": panics,
            "server_error_lines_in_log": internal_errors,
            "server_peak_rss_bytes": s.peak_rss.load(Relaxed),
            "ok": ok,
        })
    );
    if !ok {
        std::process::exit(1);
    }
}
