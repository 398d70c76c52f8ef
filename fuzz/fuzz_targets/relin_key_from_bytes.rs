//! `RelinKey::from_bytes` on arbitrary input: Ok or Err, never a panic.
#![no_main]

use beaa_ckks::{serialize::HEADER_LEN, ParamSpec, Params, RelinKey};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn params() -> &'static Params {
    static P: OnceLock<Params> = OnceLock::new();
    P.get_or_init(|| Params::insecure_for_tests(ParamSpec::chain(10, 2, 40, 2)).unwrap())
}

fuzz_target!(|data: &[u8]| {
    let p = params();
    let _ = RelinKey::from_bytes(p, data);
    let mut framed = Vec::with_capacity(HEADER_LEN + data.len());
    framed.extend_from_slice(b"BEAA");
    framed.extend_from_slice(&[1, 3, 0, 0]);
    framed.extend_from_slice(p.fingerprint());
    framed.extend_from_slice(data);
    if let Ok(k) = RelinKey::from_bytes(p, &framed) {
        assert_eq!(k.to_bytes(), framed);
    }
});
