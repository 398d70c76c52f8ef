//! Writes a random-weight model directory of the BEAA SqueezeNet, for trying `beaa plan`,
//! `beaa eval` and the benchmarks before trained models exist:
//! `cargo run --release -p beaa-engine --example random_model -- OUT_DIR [tiny|cifar10|cifar10/K[@S]]`
//! (`cifar10/K`: the CIFAR-10 graph at 32x32 with every width divided by K; `@S`: on an SxS
//! input instead, e.g. `cifar10/1@8` is full width on 1/16 of the positions, for quick
//! side-by-side timings of full-width layers).

use beaa_model::testing::random_model;
use beaa_model::{Activation, SqueezeNetSpec};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = args
        .get(1)
        .expect("usage: random_model OUT_DIR [tiny|cifar10|cifar10/K[@S]]");
    let arg = args.get(2).map(String::as_str).unwrap_or("tiny");
    let (size, side) = match arg.split_once('@') {
        Some((s, side)) => (s, side.parse().expect("@S takes a number")),
        None => (arg, 32),
    };
    let divisor: usize = match size.strip_prefix("cifar10/") {
        Some(k) => k.parse().expect("cifar10/K takes a number"),
        None => 1,
    };
    let spec = match size {
        "tiny" => SqueezeNetSpec::tiny(3, 8, 4),
        s if s == "cifar10" || s.starts_with("cifar10/") => {
            SqueezeNetSpec::cifar10_divided(divisor, side)
        }
        other => panic!("unknown size {other}"),
    };
    let model = random_model(1, &spec, Activation::PolyElement);
    model.save(std::path::Path::new(out)).expect("save");
    eprintln!(
        "wrote {out}: {} input features, {} classes",
        model.input_len(),
        spec.classes
    );
}
