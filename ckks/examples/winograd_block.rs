//! One 2x2 output block of a 3x3 convolution over ciphertexts, computed directly (the GEMM of
//! `linear_combinations`: 4 positions x `co` rows over their 3x3 x `ci` inputs) and in
//! Winograd's F(2x2, 3x3) form (`factored_combinations_prepared`, its weights prepared once
//! as the engine does per layer), alternately, at N = 32768. Prints one JSON line: median
//! milliseconds of each, their ratio, and the one-off preparation.
//!
//! `cargo run --release -p beaa-ckks --example winograd_block -- CI CO LEVEL [REPS]`, e.g.
//! `128 192 5` (conv2 of the CIFAR-10 model), `192 192 3` (conv3), `32 64 11`
//! (fire1.expand3). At most 256 distinct input ciphertexts are allocated and reused
//! cyclically, so a wide block fits in memory beside other work.

use beaa_ckks::*;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("CI CO LEVEL [REPS] as integers"))
        .collect();
    let (ci, co, level) = match args[..] {
        [ci, co, level, ..] => (ci, co, level),
        _ => (128, 192, 5),
    };
    let reps = args.get(3).copied().unwrap_or(5);
    let params = Params::new(presets::n32768()).unwrap();
    let mut kg = KeyGenerator::new(&params);
    let sk = kg.secret_key();
    let enc = Encoder::new(&params);
    let ev = Evaluator::new(&params);
    let mut encryptor = Encryptor::new(&params);
    let distinct = (ci * 16).min(256);
    let cts: Vec<Ciphertext> = (0..distinct)
        .map(|i| {
            let v: Vec<f64> = (0..params.slots())
                .map(|s| ((s + i) % 9) as f64 * 0.1 - 0.4)
                .collect();
            let pt = enc.encode(&v, params.default_scale(), level).unwrap();
            encryptor.encrypt_sk(&sk, &pt).unwrap()
        })
        .collect();
    // Input (c, i) of the 4x4 patch is cts[(c * 16 + i) % distinct].
    let inputs: Vec<&Ciphertext> = (0..ci * 16).map(|e| &cts[e % distinct]).collect();
    let g: Vec<[f64; 9]> = (0..co * ci)
        .map(|oc| std::array::from_fn(|k| ((oc * 7 + k * 3) % 11) as f64 * 0.01 - 0.05))
        .collect();
    let scale = params.default_scale();
    let target = scale * params.q()[level] as f64;

    // Direct: position (jy, jx) reads patch rows jy..jy+3, columns jx..jx+3; rows of one
    // position share their inputs (sorted), as the engine presents them.
    let direct_terms: Vec<Vec<(u32, f64)>> = (0..4)
        .flat_map(|j| (0..co).map(move |o| (j, o)))
        .map(|(j, o)| {
            let (jy, jx) = (j / 2, j % 2);
            let mut t = Vec::with_capacity(ci * 9);
            for c in 0..ci {
                for ky in 0..3 {
                    for kx in 0..3 {
                        let i = (jy + ky) * 4 + jx + kx;
                        t.push(((c * 16 + i) as u32, g[o * ci + c][ky * 3 + kx]));
                    }
                }
            }
            t
        })
        .collect();
    let rows: Vec<LinearRow> = direct_terms
        .iter()
        .map(|t| LinearRow {
            terms: t,
            level,
            target_scale: target,
        })
        .collect();

    let patch: Vec<Option<(u32, bool)>> = (0..ci * 16).map(|e| Some((e as u32, false))).collect();
    let mut u = vec![0.0; winograd::T * co * ci];
    for o in 0..co {
        for c in 0..ci {
            for (k, w) in winograd::filter(&g[o * ci + c]).into_iter().enumerate() {
                u[(k * co + o) * ci + c] = w;
            }
        }
    }
    let fac: Vec<Option<f64>> = vec![Some(1.0); co * winograd::M];
    let map = winograd::map(&patch, &u, 20, &fac, level, target);
    let t = std::time::Instant::now();
    let prepared = ev.prepare_factored(&map).unwrap();
    let prepare_ms = t.elapsed().as_secs_f64() * 1e3;

    let (mut direct, mut wino) = (Vec::new(), Vec::new());
    for _ in 0..reps {
        let t = std::time::Instant::now();
        drop(ev.linear_combinations(&inputs, &rows).unwrap());
        direct.push(t.elapsed().as_secs_f64() * 1e3);
        let t = std::time::Instant::now();
        drop(
            ev.factored_combinations_prepared(&inputs, &map, &prepared)
                .unwrap(),
        );
        wino.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let limbs = (level + 1) as u64;
    let n = params.n() as u64;
    let (d, w) = (median(direct), median(wino));
    println!(
        "{{\"ci\":{ci},\"co\":{co},\"level\":{level},\"reps\":{reps},\"kernel_path\":\"{}\",\
         \"direct_ms\":{d:.1},\"winograd_ms\":{w:.1},\"speedup\":{:.3},\"prepare_ms\":{prepare_ms:.1},\
         \"gemm_multiply_adds_direct\":{},\"gemm_multiply_adds_winograd\":{}}}",
        arith::kernels::kernel_path(),
        d / w,
        4 * co as u64 * ci as u64 * 9 * limbs * 2 * n,
        16 * co as u64 * ci as u64 * limbs * 2 * n,
    );
}
