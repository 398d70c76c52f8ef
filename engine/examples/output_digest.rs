//! Checks that a change meant to be exact (a faster kernel, buffer reuse) leaves every bit of
//! the encrypted network's output as it was: runs a random model of the CIFAR-10 graph at a
//! reduced width and input (so that tiles hold several positions and the GEMM groups rows
//! four at a time), with keys and encryptions from fixed seeds, at insecure test
//! parameters, directly and with conv2/conv3 in Winograd's form, and prints a digest of the
//! output ciphertexts' bytes for each. Two builds that print the same digests computed the
//! same ciphertexts. `cargo run --release -p beaa-engine --example output_digest [LOG_N
//! [WIDTH_DIVISOR [SIDE]]]` (defaults 11, 4, 16; `15 1 8` is the full-width graph on an 8x8
//! input at N = 32768: production sizes of polynomials and tiles, about 3 minutes here).
//!
//! The digests depend on the seeds, the plan and the serialized format, so they are compared
//! between two builds on one machine, not against a stored value.

use beaa_ckks::{Encryptor, Evaluator, KeyGenerator, ParamSpec, Params};
use beaa_engine::{run_job, Plan, RunControl};
use beaa_model::testing::{random_model, random_pixels};
use beaa_model::{Activation, SqueezeNetSpec};
use rand_chacha::ChaCha20Rng;
use rand_core::SeedableRng;

/// FNV-1a, 64 bits: enough to tell two byte streams apart here.
fn fnv1a(bytes: impl IntoIterator<Item = u8>, mut h: u64) -> u64 {
    for b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

fn main() {
    let arg = |i: usize, default: usize| {
        std::env::args()
            .nth(i)
            .map_or(default, |a| a.parse().expect("a number"))
    };
    let (log_n, k, side) = (arg(1, 11), arg(2, 4), arg(3, 16));
    let spec = SqueezeNetSpec::cifar10_divided(k, side);
    let model = random_model(3, &spec, Activation::PolyElement);
    let probe =
        Params::insecure_for_tests(ParamSpec::chain(log_n as u32, 40, 40, 8)).expect("probe");
    let depth = Plan::new(&model, &probe).expect("plan").depth;
    let params = Params::insecure_for_tests(ParamSpec::chain(log_n as u32, depth + 1, 40, 4))
        .expect("params");
    let mut kg = KeyGenerator::with_rng(&params, ChaCha20Rng::seed_from_u64(1));
    let sk = kg.secret_key();
    let rlk = kg.relin_key(&sk);
    let mut enc = Encryptor::with_rng(&params, ChaCha20Rng::seed_from_u64(2));
    let batch = params.n() / 2;
    let pixels = random_pixels(model.input_len() * batch, 7);
    let inputs: Vec<_> = (0..model.input_len())
        .map(|k| {
            let column = &pixels[k * batch..(k + 1) * batch];
            enc.encrypt_values_sk(&sk, column, params.default_scale(), params.max_level())
                .expect("encrypt")
        })
        .collect();
    let ev = Evaluator::new(&params);
    let input_digest = inputs
        .iter()
        .fold(0xcbf2_9ce4_8422_2325, |h, ct| fnv1a(ct.to_bytes(), h));
    println!(
        "inputs {input_digest:016x} ({} ciphertexts, N = {})",
        inputs.len(),
        params.n()
    );
    for (name, plan) in [
        ("direct", Plan::new(&model, &params).expect("plan")),
        (
            "winograd",
            Plan::with_winograd(&model, &params, Some(32)).expect("plan"),
        ),
    ] {
        let out = run_job(&model, &plan, &ev, &rlk, &inputs[..], RunControl::new()).expect("run");
        let digest = out
            .iter()
            .fold(0xcbf2_9ce4_8422_2325, |h, ct| fnv1a(ct.to_bytes(), h));
        println!(
            "{name:8} {digest:016x} (winograd layers {:?})",
            plan.winograd_layers()
        );
    }
}
