//! Load and fault driver for `beaa serve` (loopback only; bounded in jobs, requests and time).
//! Used by `scripts/load_fault.sh`. Starts the server itself, runs concurrent clients through
//! whole jobs (results decrypted and checked against the plaintext model), fires malformed
//! requests, kills the server with SIGKILL mid-run and restarts it on the same data directory,
//! then prints one JSON line: requests served, errors, jobs completed, bytes lost, peak RSS.

use beaa_ckks::{decrypt, Ciphertext, Encoder, Encryptor, KeyGenerator, ParamSpec, Params};
use beaa_model::Model;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
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
    jobs: usize,
    clients: usize,
    fuzz: usize,
    seconds: u64,
    batch: usize,
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
        jobs: get("--jobs", "6").parse().unwrap(),
        clients: get("--clients", "3").parse().unwrap(),
        fuzz: get("--fuzz-requests", "400").parse().unwrap(),
        seconds: get("--time-limit", "240").parse().unwrap(),
        batch: get("--batch", "16").parse().unwrap(),
    }
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    server_errors: AtomicU64,
    transport_errors: AtomicU64,
    jobs_completed: AtomicU64,
    jobs_wrong: AtomicU64,
    bytes_uploaded: AtomicU64,
    bytes_lost: AtomicU64,
    peak_rss: AtomicU64,
}

struct Server {
    child: Mutex<Child>,
}

fn spawn_server(o: &Opts, addr: &str) -> Child {
    let mut child = Command::new(&o.beaa)
        .args(["serve", "--insecure-test-params", "--addr", addr, "--zoo"])
        .arg(&o.zoo)
        .arg("--data-dir")
        .arg(&o.data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
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

/// One request with retries across a server restart; (status, body).
fn call(stats: &Stats, make: &dyn Fn() -> ureq::Request, body: Option<&[u8]>) -> (u16, Vec<u8>) {
    let t = Instant::now();
    loop {
        stats.requests.fetch_add(1, Relaxed);
        let res = match body {
            Some(b) => make().send_bytes(b),
            None => make().call(),
        };
        let r = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(_) => {
                stats.transport_errors.fetch_add(1, Relaxed);
                assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "server gone for 60 s"
                );
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
        };
        let status = r.status();
        if status >= 500 {
            stats.server_errors.fetch_add(1, Relaxed);
        }
        let mut out = Vec::new();
        let _ = r.into_reader().take(1 << 30).read_to_end(&mut out);
        return (status, out);
    }
}

fn rand_u64(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

fn main() {
    let o = opts();
    let t0 = Instant::now();
    let model = Model::load(&o.zoo.join(&o.model)).expect("loading the model");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let url = format!("http://{addr}");
    let server = Arc::new(Server {
        child: Mutex::new(spawn_server(&o, &addr)),
    });
    let stats = Arc::new(Stats::default());
    let stop = Arc::new(AtomicBool::new(false));

    // Model info (waits for planning), keys.
    let info = loop {
        let (s, b) = call(&stats, &|| ureq::get(&format!("{url}/api/models")), None);
        let v: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
        if s == 200 {
            if let Some(m) = v["models"]
                .as_array()
                .and_then(|a| a.iter().find(|m| m["name"] == o.model.as_str()))
            {
                break m.clone();
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let spec: ParamSpec = serde_json::from_value(info["params"].clone()).unwrap();
    let params = Params::from_spec(spec, true).unwrap();
    let mut kg = KeyGenerator::new(&params);
    let sk = Arc::new(kg.secret_key());
    let rlk = kg.relin_key(&sk).to_bytes();
    let (s, b) = call(
        &stats,
        &|| ureq::post(&format!("{url}/api/keys?model={}", o.model)),
        Some(&rlk),
    );
    assert!(s == 200 || s == 201, "{s}");
    let key_id = serde_json::from_slice::<Value>(&b).unwrap()["key_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // RSS sampler (the peak of every server process).
    let sampler = {
        let (server, stats, stop) = (server.clone(), stats.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(Relaxed) {
                let pid = server.child.lock().unwrap().id();
                stats.peak_rss.fetch_max(vm_hwm(pid), Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        })
    };

    // Clients: whole jobs, results checked.
    let next_job = Arc::new(AtomicU64::new(0));
    let kill_now = Arc::new(AtomicBool::new(false));
    let o = Arc::new(o);
    let model = Arc::new(model);
    let clients: Vec<_> = (0..o.clients)
        .map(|c| {
            let (o, stats, next_job, url, key_id, params, sk, model, kill_now, stop) = (
                o.clone(),
                stats.clone(),
                next_job.clone(),
                url.clone(),
                key_id.clone(),
                params.clone(),
                sk.clone(),
                model.clone(),
                kill_now.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let mut seed = 0x1234_5678 + c as u64;
                let mut enc = Encryptor::new(&params);
                let encoder = Encoder::new(&params);
                loop {
                    let j = next_job.fetch_add(1, Relaxed);
                    if j >= o.jobs as u64 || stop.load(Relaxed) {
                        return;
                    }
                    let n = model.input_len();
                    let imgs: Vec<f64> = (0..o.batch * n)
                        .map(|_| {
                            (rand_u64(&mut seed) >> 11) as f64 / (1u64 << 53) as f64 * 3.0 - 1.5
                        })
                        .collect();
                    let (s, b) = call(
                        &stats,
                        &|| ureq::post(&format!("{url}/api/jobs")),
                        Some(
                            json!({"model": o.model, "key_id": key_id, "batch": o.batch})
                                .to_string()
                                .as_bytes(),
                        ),
                    );
                    assert_eq!(s, 201, "{}", String::from_utf8_lossy(&b));
                    let v: Value = serde_json::from_slice(&b).unwrap();
                    let (id, token) = (
                        v["job_id"].as_str().unwrap().to_owned(),
                        v["token"].as_str().unwrap().to_owned(),
                    );
                    let auth = format!("Bearer {token}");
                    let mut sizes = 0u64;
                    for k in 0..n {
                        let col: Vec<f64> = (0..o.batch).map(|b| imgs[b * n + k]).collect();
                        let ct = enc
                            .encrypt_values_sk(
                                &sk,
                                &col,
                                params.default_scale(),
                                params.max_level(),
                            )
                            .unwrap()
                            .to_bytes();
                        let (s, _) = call(
                            &stats,
                            &|| {
                                ureq::put(&format!("{url}/api/jobs/{id}/inputs/{k}"))
                                    .set("Authorization", &auth)
                            },
                            Some(&ct),
                        );
                        assert_eq!(s, 200);
                        stats.bytes_uploaded.fetch_add(ct.len() as u64, Relaxed);
                        sizes = ct.len() as u64;
                    }
                    // Everything acknowledged must still be there (across restarts too).
                    let (_, b) = call(
                        &stats,
                        &|| {
                            ureq::get(&format!("{url}/api/jobs/{id}/inputs"))
                                .set("Authorization", &auth)
                        },
                        None,
                    );
                    let listing: Value = serde_json::from_slice(&b).unwrap();
                    let present = listing["present"].as_u64().unwrap_or(0);
                    stats
                        .bytes_lost
                        .fetch_add((n as u64 - present) * sizes, Relaxed);
                    let (s, _) = call(
                        &stats,
                        &|| {
                            ureq::post(&format!("{url}/api/jobs/{id}/start"))
                                .set("Authorization", &auth)
                        },
                        Some(b""),
                    );
                    assert_eq!(s, 202);
                    loop {
                        let (_, b) = call(
                            &stats,
                            &|| {
                                ureq::get(&format!("{url}/api/jobs/{id}"))
                                    .set("Authorization", &auth)
                            },
                            None,
                        );
                        let st: Value = serde_json::from_slice(&b).unwrap_or(Value::Null);
                        match st["state"].as_str() {
                            Some("done") => break,
                            Some("failed") | Some("cancelled") => panic!("job ended: {st}"),
                            Some("running") if j == 1 => kill_now.store(true, Relaxed),
                            _ => {}
                        }
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let (s, b) = call(
                        &stats,
                        &|| {
                            ureq::get(&format!("{url}/api/jobs/{id}/result"))
                                .set("Authorization", &auth)
                        },
                        None,
                    );
                    assert_eq!(s, 200);
                    let want = model.forward(&imgs, o.batch).unwrap();
                    let classes = model.manifest.classes.len();
                    let mut pos = 4usize;
                    let mut ok = u32::from_le_bytes(b[..4].try_into().unwrap()) as usize == classes;
                    for c in 0..classes {
                        let len = u64::from_le_bytes(b[pos..pos + 8].try_into().unwrap()) as usize;
                        pos += 8;
                        let ct = Ciphertext::from_bytes(&params, &b[pos..pos + len]).unwrap();
                        pos += len;
                        let got = encoder.decode(&decrypt(&sk, &ct).unwrap());
                        for i in 0..o.batch {
                            ok &= (got[i] - want[i * classes + c]).abs() < 1e-3;
                        }
                    }
                    if ok {
                        stats.jobs_completed.fetch_add(1, Relaxed);
                    } else {
                        stats.jobs_wrong.fetch_add(1, Relaxed);
                    }
                    call(
                        &stats,
                        &|| {
                            ureq::delete(&format!("{url}/api/jobs/{id}"))
                                .set("Authorization", &auth)
                        },
                        None,
                    );
                }
            })
        })
        .collect();

    // Malformed requests (4xx expected, never 5xx, never a crash).
    let fuzzer = {
        let (o, stats, url, stop) = (o.clone(), stats.clone(), url.clone(), stop.clone());
        let input_len = info["input_ciphertext_bytes"].as_u64().unwrap() as usize;
        std::thread::spawn(move || {
            let mut x = 0xdead_beef_u64;
            for i in 0..o.fuzz {
                if stop.load(Relaxed) {
                    return;
                }
                let len = match i % 4 {
                    0 => input_len,
                    1 => (rand_u64(&mut x) % 4096) as usize,
                    2 => input_len - 1,
                    _ => 40,
                };
                let mut body: Vec<u8> = (0..len).map(|_| rand_u64(&mut x) as u8).collect();
                if body.len() >= 8 {
                    body[..4].copy_from_slice(b"BEAA");
                    body[4] = 1;
                    body[5] = (i % 6) as u8;
                }
                let id: String = (0..32)
                    .map(|_| format!("{:x}", rand_u64(&mut x) % 16))
                    .collect();
                let (s, _) = match i % 5 {
                    0 => call(
                        &stats,
                        &|| ureq::post(&format!("{url}/api/keys?model={}", o.model)),
                        Some(&body),
                    ),
                    1 => call(
                        &stats,
                        &|| {
                            ureq::put(&format!("{url}/api/jobs/{id}/inputs/{}", i))
                                .set("Authorization", "Bearer x")
                        },
                        Some(&body),
                    ),
                    2 => call(
                        &stats,
                        &|| ureq::post(&format!("{url}/api/jobs")),
                        Some(&body[..body.len().min(200)]),
                    ),
                    3 => call(
                        &stats,
                        &|| {
                            ureq::get(&format!("{url}/api/jobs/{id}/result"))
                                .set("Authorization", "Bearer y")
                        },
                        None,
                    ),
                    _ => {
                        // Raw bytes and huge declared lengths.
                        stats.requests.fetch_add(1, Relaxed);
                        if let Ok(mut s) =
                            std::net::TcpStream::connect(url.trim_start_matches("http://"))
                        {
                            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                            let req = format!("POST /api/keys?model={} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n", o.model, rand_u64(&mut x));
                            let _ = s.write_all(req.as_bytes());
                            let _ = s.write_all(&body[..body.len().min(64)]);
                            let mut buf = [0u8; 64];
                            let _ = s.read(&mut buf);
                        }
                        (400, vec![])
                    }
                };
                assert!(s < 500 || s == 503, "{s}");
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };

    // The fault: SIGKILL once the second job runs, then restart on the same data directory.
    let mut kills = 0;
    while clients.iter().any(|c| !c.is_finished()) {
        if t0.elapsed() > Duration::from_secs(o.seconds) {
            stop.store(true, Relaxed);
            eprintln!("time limit reached");
            break;
        }
        if kill_now.swap(false, Relaxed) && kills == 0 {
            let mut child = server.child.lock().unwrap();
            stats.peak_rss.fetch_max(vm_hwm(child.id()), Relaxed);
            let _ = child.kill();
            let _ = child.wait();
            *child = spawn_server(&o, &addr);
            kills += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in clients {
        let _ = c.join();
    }
    let _ = fuzzer.join();
    stop.store(true, Relaxed);
    let _ = sampler.join();
    let alive = {
        let mut child = server.child.lock().unwrap();
        let alive = child.try_wait().unwrap().is_none();
        stats.peak_rss.fetch_max(vm_hwm(child.id()), Relaxed);
        let _ = child.kill();
        let _ = child.wait();
        alive
    };
    let s = &*stats;
    println!(
        "{}",
        json!({
            "requests": s.requests.load(Relaxed),
            "server_errors_5xx": s.server_errors.load(Relaxed),
            "transport_errors_retried": s.transport_errors.load(Relaxed),
            "jobs_planned": o.jobs,
            "jobs_completed": s.jobs_completed.load(Relaxed),
            "jobs_wrong": s.jobs_wrong.load(Relaxed),
            "bytes_uploaded": s.bytes_uploaded.load(Relaxed),
            "bytes_lost": s.bytes_lost.load(Relaxed),
            "kills": kills,
            "server_alive_at_end": alive,
            "server_peak_rss_bytes": s.peak_rss.load(Relaxed),
            "seconds": t0.elapsed().as_secs_f64(),
        })
    );
}
