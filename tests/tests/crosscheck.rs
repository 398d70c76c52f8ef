//! The cross-check server itself, over real loopback HTTP: what the browser test relies on.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use wasm_client::{crosscheck_values, ClientKeys, CROSSCHECK_SEED};

fn request(addr: &str, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text_end = out.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let status: u16 = String::from_utf8_lossy(&out[9..12]).parse().unwrap();
    (status, out[text_end + 4..].to_vec())
}

#[test]
fn native_peer_encrypts_and_decrypts_for_the_browser() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_beaa-crosscheck"))
        .args(["--seconds", "60"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .trim_start_matches("BEAA_CROSSCHECK_URL=http://")
        .to_string();

    let keys = ClientKeys::from_seed_for_tests("insecure-test-n1024", CROSSCHECK_SEED).unwrap();
    let want = crosscheck_values(keys.slots());
    let (status, ct) = request(&addr, "GET", "/ciphertext", b"");
    assert_eq!(status, 200);
    let got = keys.decrypt_native(&ct).unwrap();
    assert!(want.iter().zip(&got).all(|(a, b)| (a - b).abs() < 1e-6));

    let mine = keys.encrypt_native(&want).unwrap();
    let (status, reply) = request(&addr, "POST", "/decrypt", &mine);
    assert_eq!(status, 200);
    assert_eq!(reply.len(), 8 * keys.slots());
    let (status, _) = request(&addr, "POST", "/decrypt", &mine[..100]);
    assert_eq!(status, 400);
    let (status, _) = request(&addr, "GET", "/nope", b"");
    assert_eq!(status, 404);
    child.kill().unwrap();
    child.wait().unwrap();
}
