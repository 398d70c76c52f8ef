//! The `beaa` command surface, run as a user would.

use beaa_model::testing::random_model;
use beaa_model::{Activation, SqueezeNetSpec};
use std::process::Command;

fn beaa(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_beaa"))
        .args(args)
        .output()
        .expect("run beaa");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn plan_of_a_random_squeezenet_fits_n32768_at_128_bits() {
    let dir = tempfile::tempdir().unwrap();
    random_model(3, &SqueezeNetSpec::tiny(3, 8, 4), Activation::PolyElement)
        .save(dir.path())
        .unwrap();
    let (ok, stdout, stderr) = beaa(&["plan", "--model", dir.path().to_str().unwrap(), "--json"]);
    assert!(ok, "{stderr}");
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(v["n"], 32768);
    assert_eq!(v["depth"], 15);
    assert_eq!(v["security_bits"], 128);
    assert!(v["log2_qp"].as_f64().unwrap() <= 881.0);
    assert_eq!(v["input_ciphertexts"], 192);
    assert_eq!(v["squares"].as_array().unwrap().len(), 9);
}

#[test]
fn relu_models_unknown_names_and_bad_paths_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    random_model(3, &SqueezeNetSpec::tiny(3, 8, 4), Activation::Relu)
        .save(dir.path())
        .unwrap();
    let (ok, _, stderr) = beaa(&["plan", "--model", dir.path().to_str().unwrap()]);
    assert!(!ok);
    assert!(stderr.contains("ReLU"), "{stderr}");
    for name in ["no-such-model", "../../etc"] {
        let (ok, _, stderr) = beaa(&["plan", "--model", name]);
        assert!(!ok);
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    }
}

#[test]
fn bench_ckks_refuses_insecure_chains() {
    let (ok, _, stderr) = beaa(&["bench", "ckks", "--n", "8192", "--limbs", "8"]);
    assert!(!ok);
    assert!(
        stderr.contains("budget") || stderr.contains("secure"),
        "{stderr}"
    );
}

#[test]
fn demo_runs_and_reports_agreement() {
    let (ok, stdout, stderr) = beaa(&["demo", "--batch", "64", "--inputs", "4", "--outputs", "2"]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("max |encrypted - plaintext|"), "{stdout}");
}
