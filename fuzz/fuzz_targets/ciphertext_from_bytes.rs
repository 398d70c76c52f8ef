//! `Ciphertext::from_bytes` on arbitrary input must return Ok or Err, never panic or allocate
//! beyond the parameter-derived size. Inputs that start with a valid header for the test
//! parameters reach the body checks.
#![no_main]

use beaa_ckks::{serialize::HEADER_LEN, Ciphertext, ParamSpec, Params};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn params() -> &'static Params {
    static P: OnceLock<Params> = OnceLock::new();
    P.get_or_init(|| Params::insecure_for_tests(ParamSpec::chain(11, 3, 40, 2)).unwrap())
}

fuzz_target!(|data: &[u8]| {
    let p = params();
    let _ = Ciphertext::from_bytes(p, data);
    // The same bytes behind a valid header (magic, version, kind, fingerprint).
    let mut framed = Vec::with_capacity(HEADER_LEN + data.len());
    framed.extend_from_slice(b"BEAA");
    framed.extend_from_slice(&[1, 1, data.first().copied().unwrap_or(0) & 1, 0]);
    framed.extend_from_slice(p.fingerprint());
    framed.extend_from_slice(data);
    if let Ok(ct) = Ciphertext::from_bytes(p, &framed) {
        assert_eq!(ct.to_bytes(), framed);
    }
});
