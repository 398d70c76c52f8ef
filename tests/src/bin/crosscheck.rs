//! `beaa-crosscheck`: the native peer of the browser's byte-format test.
//!
//! Serves on 127.0.0.1 (an ephemeral port unless `--port` is given) and prints
//! `BEAA_CROSSCHECK_URL=http://127.0.0.1:PORT` on stdout. Both sides derive the same public
//! *test* key from `wasm_client::CROSSCHECK_SEED`.
//! - `GET /ciphertext`: a fresh native encryption of `crosscheck_values`;
//! - `POST /decrypt`: decrypts the body natively, answers the slot values as f64 LE, or 400;
//! - exits after `--seconds` (default 600), so a forgotten process cannot linger.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use wasm_client::{crosscheck_values, ClientKeys, CROSSCHECK_SEED};

const PRESET: &str = "insecure-test-n1024";
const MAX_BODY: usize = 64 << 20;

fn respond(stream: &mut TcpStream, status: &str, body: &[u8]) -> std::io::Result<()> {
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\
         Access-Control-Allow-Origin: *\r\nAccess-Control-Allow-Methods: GET, POST, OPTIONS\r\n\
         Access-Control-Allow-Headers: content-type\r\nConnection: close\r\n\r\n",
        body.len()
    )?;
    stream.write_all(body)
}

fn handle(mut stream: TcpStream, keys: &ClientKeys) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut length = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                length = v.trim().parse().unwrap_or(usize::MAX);
            }
        }
    }
    match (method, path) {
        ("OPTIONS", _) => respond(&mut stream, "204 No Content", b""),
        ("GET", "/ciphertext") => {
            let ct = keys
                .encrypt_native(&crosscheck_values(keys.slots()))
                .expect("encrypt");
            respond(&mut stream, "200 OK", &ct)
        }
        ("POST", "/decrypt") => {
            if length > MAX_BODY {
                return respond(&mut stream, "413 Payload Too Large", b"too large");
            }
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body)?;
            match keys.decrypt_native(&body) {
                Ok(v) => {
                    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
                    respond(&mut stream, "200 OK", &bytes)
                }
                Err(e) => respond(&mut stream, "400 Bad Request", e.as_bytes()),
            }
        }
        _ => respond(&mut stream, "404 Not Found", b"not found"),
    }
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    let port = arg("--port").unwrap_or(0);
    let lifetime = Duration::from_secs(arg("--seconds").unwrap_or(600));
    let keys = ClientKeys::from_seed_for_tests(PRESET, CROSSCHECK_SEED).expect("test keys");
    let listener = TcpListener::bind(("127.0.0.1", port as u16))?;
    listener.set_nonblocking(true)?;
    println!("BEAA_CROSSCHECK_URL=http://{}", listener.local_addr()?);
    std::io::stdout().flush()?;
    let start = Instant::now();
    while start.elapsed() < lifetime {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                if let Err(e) = handle(stream, &keys) {
                    eprintln!("beaa-crosscheck: {e}");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}
