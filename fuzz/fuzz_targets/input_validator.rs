//! The server's streaming input validator (`evaluator/src/serve/validate.rs`) against
//! `Ciphertext::from_bytes` plus the input checks: the same verdict category on every
//! mutation of a valid input, fed in pieces of fuzzer-chosen sizes, and never a panic.
//!
//! Input: pairs of (little-endian u32 offset, xor byte) applied to a fixed valid seeded
//! ciphertext; the first byte, if any, also seeds the piece sizes.
#![no_main]

#[allow(dead_code)]
#[path = "../../evaluator/src/serve/validate.rs"]
mod validate;

use beaa_ckks::sampling::test_rng;
use beaa_ckks::{Ciphertext, Encryptor, KeyGenerator, ParamSpec, Params};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
use validate::{InputValidator, Invalid};

fn setup() -> &'static (Params, Vec<u8>) {
    static S: OnceLock<(Params, Vec<u8>)> = OnceLock::new();
    S.get_or_init(|| {
        let p = Params::insecure_for_tests(ParamSpec::chain(11, 3, 40, 2)).unwrap();
        let mut kg = KeyGenerator::with_rng(&p, test_rng([3; 32]));
        let sk = kg.secret_key();
        let values: Vec<f64> = (0..p.slots()).map(|i| (i % 5) as f64 - 2.0).collect();
        let ct = Encryptor::with_rng(&p, test_rng([4; 32]))
            .encrypt_values_sk(&sk, &values, p.default_scale(), p.max_level())
            .unwrap()
            .to_bytes();
        (p, ct)
    })
}

fn reference(p: &Params, bytes: &[u8]) -> Result<(), Invalid> {
    match Ciphertext::from_bytes(p, bytes) {
        Err(beaa_ckks::Error::ParamsMismatch) => Err(Invalid::ParamsMismatch),
        Err(e) => Err(Invalid::Malformed(e.to_string())),
        Ok(ct) if ct.level() == p.max_level()
            && ct.degree() == 1
            && ct.is_seeded()
            && ct.scale() == p.default_scale() =>
        {
            Ok(())
        }
        Ok(_) => Err(Invalid::Malformed("not an input".into())),
    }
}

fuzz_target!(|data: &[u8]| {
    let (p, valid) = setup();
    let mut m = valid.clone();
    for pair in data.chunks_exact(5) {
        let at = u32::from_le_bytes(pair[..4].try_into().unwrap()) as usize;
        // Offsets in the prefix and seed are as likely as the rest.
        let at = if at & 1 == 0 { (at >> 1) % 96 } else { (at >> 1) % m.len() };
        m[at] ^= pair[4];
    }
    let want = reference(p, &m);
    let mut v = InputValidator::new(p);
    let mut x = u64::from(data.first().copied().unwrap_or(1)) | 1;
    let mut rest = &m[..];
    while !rest.is_empty() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let take = ((x % 5000) as usize + 1).min(rest.len());
        v.feed(&rest[..take]);
        rest = &rest[take..];
    }
    let got = v.finish();
    let same = matches!(
        (&want, &got),
        (Ok(()), Ok(()))
            | (Err(Invalid::ParamsMismatch), Err(Invalid::ParamsMismatch))
            | (Err(Invalid::Malformed(_)), Err(Invalid::Malformed(_)))
    );
    assert!(same, "from_bytes {want:?}, validator {got:?}");
});
