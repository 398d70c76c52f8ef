//! Writes a random-weight model directory of the BEAA SqueezeNet, for trying `beaa plan`,
//! `beaa eval` and the benchmarks before trained models exist:
//! `cargo run --release -p beaa-engine --example random_model -- OUT_DIR [tiny|cifar10]`.

use beaa_model::testing::random_model;
use beaa_model::{Activation, SqueezeNetSpec};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let out = args
        .get(1)
        .expect("usage: random_model OUT_DIR [tiny|cifar10]");
    let spec = match args.get(2).map(String::as_str).unwrap_or("tiny") {
        "tiny" => SqueezeNetSpec::tiny(3, 8, 4),
        "cifar10" => SqueezeNetSpec {
            in_channels: 3,
            height: 32,
            width: 32,
            classes: 10,
            conv1: 64,
            fire1: (32, 64, 64),
            fire2: (32, 64, 64),
            conv2: 192,
            conv3: 192,
        },
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
