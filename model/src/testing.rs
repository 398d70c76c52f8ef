//! Random-weight models of the real architecture, for other crates' tests and benchmarks.
//!
//! ```
//! let spec = beaa_model::SqueezeNetSpec::tiny(3, 8, 4);
//! let model = beaa_model::testing::random_model(7, &spec, beaa_model::Activation::PolyElement);
//! let dir = std::env::temp_dir().join("beaa-doc-random-model");
//! model.save(&dir).unwrap();
//! let back = beaa_model::Model::load(&dir).unwrap();
//! assert_eq!(back.manifest, model.manifest);
//! ```

use crate::graph::{Activation, Op, SqueezeNetSpec};
use crate::{
    InputSpec, Manifest, Model, Provenance, ResizePolicy, TensorData, ValueRange, FORMAT_VERSION,
};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use std::collections::BTreeMap;

impl SqueezeNetSpec {
    /// A small network with every layer kind, for tests: input `channels` x `size` x `size`
    /// (size divisible by 4).
    pub fn tiny(channels: usize, size: usize, classes: usize) -> Self {
        SqueezeNetSpec {
            in_channels: channels,
            height: size,
            width: size,
            classes,
            conv1: 4,
            fire1: (2, 3, 3),
            fire2: (3, 2, 4),
            conv2: 5,
            conv3: 4,
        }
    }

    /// The CIFAR-10 network (3 x `side` x `side` input, 10 classes) with every width divided
    /// by `divisor`: `cifar10_divided(1, 32)` is the shipped model's graph.
    pub fn cifar10_divided(divisor: usize, side: usize) -> Self {
        SqueezeNetSpec {
            in_channels: 3,
            height: side,
            width: side,
            classes: 10,
            conv1: 64 / divisor,
            fire1: (32 / divisor, 64 / divisor, 64 / divisor),
            fire2: (32 / divisor, 64 / divisor, 64 / divisor),
            conv2: 192 / divisor,
            conv3: 192 / divisor,
        }
    }
}

/// `len` pseudo-random normalized pixels, uniform in [-1.5, 1.5], from a fixed sequence
/// (public test data, not keys): the same images on every machine for a given `seed`.
pub fn random_pixels(len: usize, seed: u64) -> Vec<f64> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) * 3.0 - 1.5
        })
        .collect()
}

fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f32 {
    (lo + (hi - lo) * (rng.next_u32() as f64 / u32::MAX as f64)) as f32
}

/// A model with the SqueezeNet graph of `spec` and seeded random weights, scaled so values
/// stay O(1) through the network. Polynomial coefficients are random ReLU-like quadratics
/// (a in [0.05, 0.2], b in [0.4, 0.6], c in [0, 0.2]); ranges are filled by running the model
/// on a few random inputs. Deterministic in `seed`.
pub fn random_model(seed: u64, spec: &SqueezeNetSpec, activation: Activation) -> Model {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let relu = activation == Activation::Relu;
    let nodes = spec.graph(relu);
    let mut tensors = BTreeMap::new();
    let mut put = |name: String, shape: Vec<usize>, data: Vec<f32>| {
        tensors.insert(name, TensorData { shape, data });
    };
    let mut act_params = 0;
    for u in spec.units() {
        let fan_in = u.cin * u.k * u.k;
        let bound = (1.0 / fan_in as f64).sqrt() * 1.7;
        let n = u.cout * fan_in;
        put(
            format!("{}.weight", u.name),
            vec![u.cout, u.cin, u.k, u.k],
            (0..n).map(|_| uniform(&mut rng, -bound, bound)).collect(),
        );
        put(
            format!("{}.bias", u.name),
            vec![u.cout],
            (0..u.cout).map(|_| uniform(&mut rng, -0.1, 0.1)).collect(),
        );
        if !u.act {
            continue;
        }
        let elems = u.cout * u.h * u.w;
        if relu {
            put(
                format!("{}.bn.scale", u.name),
                vec![u.cout],
                (0..u.cout).map(|_| uniform(&mut rng, 0.8, 1.2)).collect(),
            );
            put(
                format!("{}.bn.shift", u.name),
                vec![u.cout],
                (0..u.cout).map(|_| uniform(&mut rng, -0.1, 0.1)).collect(),
            );
        } else {
            let shape = vec![u.cout, u.h, u.w];
            for (p, lo, hi) in [("a", 0.05, 0.2), ("b", 0.4, 0.6), ("c", 0.0, 0.2)] {
                put(
                    format!("{}.poly_{p}", u.name),
                    shape.clone(),
                    (0..elems).map(|_| uniform(&mut rng, lo, hi)).collect(),
                );
            }
            act_params += 3 * match activation {
                Activation::PolyLayer => 1,
                Activation::PolyChannel => u.cout,
                _ => elems,
            };
        }
    }
    let input = InputSpec {
        channels: spec.in_channels,
        height: spec.height,
        width: spec.width,
        mean: vec![0.5; spec.in_channels],
        std: vec![0.25; spec.in_channels],
        resize: ResizePolicy::Stretch,
    };
    let evals = nodes
        .iter()
        .filter(|n| matches!(n.op, Op::Poly { .. } | Op::Relu))
        .map(|n| n.shape.iter().product::<usize>())
        .sum();
    let manifest = Manifest {
        format_version: FORMAT_VERSION,
        name: format!("random-{seed}"),
        architecture: "beaa-squeezenet".into(),
        squeezenet: Some(spec.clone()),
        activation,
        input,
        classes: (0..spec.classes).map(|i| format!("class{i}")).collect(),
        nodes,
        output: "gap".into(),
        ranges: BTreeMap::new(),
        activation_parameters: act_params,
        activation_evaluations: evals,
        provenance: Provenance {
            data: "random weights (beaa_model::testing)".into(),
            seed,
            ..Default::default()
        },
        metrics: serde_json::Value::Null,
    };
    let mut model = Model::new(manifest, tensors).expect("random model is valid by construction");
    let n = 4;
    let x: Vec<f64> = (0..n * model.input_len())
        .map(|_| uniform(&mut rng, -2.0, 2.0) as f64)
        .collect();
    model.manifest.ranges = measure_ranges(&model, &x, n).expect("input sized correctly");
    model
}

/// Observed output ranges of every node over `n` normalized images.
pub fn measure_ranges(
    model: &Model,
    batch: &[f64],
    n: usize,
) -> Result<BTreeMap<String, ValueRange>, crate::ModelError> {
    #[derive(Default)]
    struct Acc {
        min: f64,
        max: f64,
        sum: f64,
        sum2: f64,
        count: usize,
        sample: Vec<f64>,
    }
    let mut acc: BTreeMap<String, Acc> = BTreeMap::new();
    model.forward_observe(batch, n, &mut |node, y| {
        let a = acc.entry(node.name.clone()).or_insert(Acc {
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            ..Default::default()
        });
        // keep at most ~20k |x| samples per image for the percentile
        let step = (y.len() / 20_000).max(1);
        for (i, &v) in y.iter().enumerate() {
            a.min = a.min.min(v);
            a.max = a.max.max(v);
            a.sum += v;
            a.sum2 += v * v;
            if i % step == 0 {
                a.sample.push(v.abs());
            }
        }
        a.count += y.len();
    })?;
    Ok(acc
        .into_iter()
        .map(|(k, mut a)| {
            a.sample.sort_by(|x, y| x.total_cmp(y));
            let p = a
                .sample
                .get(
                    ((a.sample.len() as f64 * 0.999) as usize)
                        .min(a.sample.len().saturating_sub(1)),
                )
                .copied()
                .unwrap_or(0.0);
            let mean = a.sum / a.count.max(1) as f64;
            let var = (a.sum2 / a.count.max(1) as f64 - mean * mean).max(0.0);
            (
                k,
                ValueRange {
                    min: a.min,
                    max: a.max,
                    max_abs: a.min.abs().max(a.max.abs()),
                    p999_abs: p,
                    mean,
                    std: var.sqrt(),
                    images: n,
                },
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ModelError, MANIFEST_FILE, WEIGHTS_FILE};

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("beaa-model-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn random_model_round_trips_through_files_bit_exactly() {
        for act in [
            Activation::Relu,
            Activation::PolyLayer,
            Activation::PolyElement,
        ] {
            let m = random_model(11, &SqueezeNetSpec::tiny(3, 8, 5), act);
            let dir = tmp("roundtrip");
            m.save(&dir).unwrap();
            let back = Model::load(&dir).unwrap();
            assert_eq!(back.manifest, m.manifest);
            assert_eq!(back.tensors, m.tensors);
            let x: Vec<f64> = (0..2 * m.input_len())
                .map(|i| ((i * 7 % 11) as f64 - 5.0) / 3.0)
                .collect();
            assert_eq!(back.forward(&x, 2).unwrap(), m.forward(&x, 2).unwrap());
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn different_seeds_give_different_models_and_outputs_depend_on_input() {
        let spec = SqueezeNetSpec::tiny(1, 8, 3);
        let a = random_model(1, &spec, Activation::PolyChannel);
        let b = random_model(2, &spec, Activation::PolyChannel);
        assert_ne!(a.tensors, b.tensors);
        let x0 = vec![0.0; a.input_len()];
        let x1: Vec<f64> = (0..a.input_len()).map(|i| (i % 5) as f64 - 2.0).collect();
        assert_ne!(a.forward(&x0, 1).unwrap(), a.forward(&x1, 1).unwrap());
        assert_eq!(
            a.manifest.activation_evaluations,
            a.count_activation_evaluations()
        );
    }

    #[test]
    fn bad_files_give_typed_errors() {
        let m = random_model(3, &SqueezeNetSpec::tiny(3, 8, 2), Activation::PolyElement);
        let dir = tmp("bad");
        m.save(&dir).unwrap();
        let manifest = std::fs::read(dir.join(MANIFEST_FILE)).unwrap();
        let weights = std::fs::read(dir.join(WEIGHTS_FILE)).unwrap();
        assert!(matches!(
            Model::from_bytes(b"{", &weights),
            Err(ModelError::Manifest(_))
        ));
        assert!(matches!(
            Model::from_bytes(&manifest, b"garbage"),
            Err(ModelError::Weights(_))
        ));
        assert!(matches!(
            Model::from_bytes(&manifest, &weights[..weights.len() / 2]),
            Err(ModelError::Weights(_))
        ));
        // missing tensor
        let mut t = m.tensors.clone();
        t.remove("conv2.poly_b");
        assert!(
            matches!(Model::new(m.manifest.clone(), t), Err(ModelError::Invalid(e)) if e.contains("conv2.poly_b"))
        );
        // wrong declared shape
        let mut man = m.manifest.clone();
        man.nodes[3].shape[1] += 1;
        assert!(matches!(
            Model::new(man, m.tensors.clone()),
            Err(ModelError::Invalid(_))
        ));
        // unknown input, wrong version, wrong class count, non-finite weight
        let mut man = m.manifest.clone();
        man.nodes[2].inputs = vec!["nowhere".into()];
        assert!(Model::new(man, m.tensors.clone()).is_err());
        let mut man = m.manifest.clone();
        man.format_version = 99;
        let j = serde_json::to_vec(&man).unwrap();
        assert!(matches!(
            Model::from_bytes(&j, &weights),
            Err(ModelError::Invalid(_))
        ));
        let mut man = m.manifest.clone();
        man.classes.push("extra".into());
        assert!(Model::new(man, m.tensors.clone()).is_err());
        let mut t = m.tensors.clone();
        t.get_mut("conv1.weight").unwrap().data[0] = f32::NAN;
        assert!(Model::new(m.manifest.clone(), t).is_err());
        assert!(matches!(
            Model::load(&dir.join("nope")),
            Err(ModelError::Io { .. })
        ));
        // wrong batch length
        assert!(m.forward(&[0.0; 3], 1).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A hand-computed graph: checks conv padding/orientation, poly, affine, pooling, concat.
    #[test]
    fn forward_matches_hand_computation() {
        use crate::graph::Node;
        let node = |name: &str, op: Op, inputs: &[&str], shape: [usize; 3]| Node {
            name: name.into(),
            op,
            inputs: inputs.iter().map(|s| s.to_string()).collect(),
            shape,
        };
        let nodes = vec![
            node("input", Op::Input, &[], [1, 2, 2]),
            node(
                "conv",
                Op::Conv2d {
                    weight: "w".into(),
                    bias: "b".into(),
                    stride: 1,
                    padding: 1,
                },
                &["input"],
                [1, 2, 2],
            ),
            node(
                "poly",
                Op::Poly {
                    a: "pa".into(),
                    b: "pb".into(),
                    c: "pc".into(),
                },
                &["conv"],
                [1, 2, 2],
            ),
            node("relu", Op::Relu, &["input"], [1, 2, 2]),
            node(
                "aff",
                Op::Affine {
                    scale: "s".into(),
                    shift: "t".into(),
                },
                &["relu"],
                [1, 2, 2],
            ),
            node("cat", Op::Concat, &["poly", "aff"], [2, 2, 2]),
            node(
                "pool",
                Op::AvgPool {
                    kernel: 2,
                    stride: 2,
                },
                &["cat"],
                [2, 1, 1],
            ),
            node("gap", Op::GlobalAvgPool, &["pool"], [2, 1, 1]),
        ];
        let mut tensors = BTreeMap::new();
        let mut put = |n: &str, shape: Vec<usize>, data: Vec<f32>| {
            tensors.insert(n.to_string(), TensorData { shape, data });
        };
        // 3x3 kernel with only the "right neighbour" tap (ky=1, kx=2) set to 2
        let mut w = vec![0f32; 9];
        w[5] = 2.0;
        put("w", vec![1, 1, 3, 3], w);
        put("b", vec![1], vec![1.0]);
        put("pa", vec![1, 2, 2], vec![1.0, 0.0, 0.0, 0.0]);
        put("pb", vec![1, 2, 2], vec![0.0, 1.0, 1.0, 1.0]);
        put("pc", vec![1, 2, 2], vec![0.0, 0.0, 0.0, 0.5]);
        put("s", vec![1], vec![3.0]);
        put("t", vec![1], vec![-1.0]);
        let mut m = random_model(0, &SqueezeNetSpec::tiny(1, 4, 2), Activation::Relu).manifest;
        m.input = InputSpec {
            channels: 1,
            height: 2,
            width: 2,
            mean: vec![0.0],
            std: vec![1.0],
            resize: ResizePolicy::Stretch,
        };
        m.nodes = nodes;
        m.output = "gap".into();
        let model = Model::new(m, tensors).unwrap();
        // input [[1, -2], [3, 4]]
        let y = model.forward(&[1.0, -2.0, 3.0, 4.0], 1).unwrap();
        // conv: y = 1 + 2*x[right] -> [[1-4, 1], [1+8, 1]] = [[-3, 1], [9, 1]]
        // poly: [(-3)^2, 1, 9, 1 + 0.5] = [9, 1, 9, 1.5] -> mean 5.125
        // relu: [1, 0, 3, 4] -> affine 3x-1: [2, -1, 8, 11] -> mean 5
        assert_eq!(y, vec![5.125, 5.0]);
    }
}
