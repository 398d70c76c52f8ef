//! Runs one operation in a loop, for `perf record`: `cargo run --release --example
//! profile_ops -- relin|rescale|lazy|lazy_fused|to_bytes|from_bytes|decrypt|mul|ntt|mrr|gemm [reps]`. `gemm`: the shape of one
//! fire1.expand3 tile at CIFAR-10 width (64 outputs x 288 inputs, 12 limbs), or
//! `gemm REPS OUTPUTS TERMS LEVEL DEGREE` for another shape. Run with
//! `GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1000000000000` to
//! allocate as `beaa` does (no page faults for each fresh buffer).

use beaa_ckks::*;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let op = args.get(1).map(String::as_str).unwrap_or("relin");
    let reps: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20);
    let params = Params::new(presets::n32768()).unwrap();
    let mut kg = KeyGenerator::new(&params);
    let sk = kg.secret_key();
    let rlk = kg.relin_key(&sk);
    let enc = Encoder::new(&params);
    let ev = Evaluator::new(&params);
    let v: Vec<f64> = (0..params.slots()).map(|i| (i % 7) as f64).collect();
    let pt = enc
        .encode(&v, params.default_scale(), params.max_level())
        .unwrap();
    let a = Encryptor::new(&params).encrypt_sk(&sk, &pt).unwrap();
    let d2 = ev.mul(&a, &a).unwrap();
    let d1 = ev.relinearize(&d2, &rlk).unwrap();
    let d1_bytes = d1.to_bytes();
    // `gemm OUTPUTS TERMS LEVEL DEGREE` after the repetitions: another layer's tile shape.
    let shape: Vec<usize> = args.iter().skip(3).filter_map(|s| s.parse().ok()).collect();
    let (outputs, terms, level, degree) = match shape[..] {
        [o, t, l, d] => (o, t as u32, l, d),
        _ => (64, 288, 11, 1),
    };
    let mut low = if degree == 2 { d2.clone() } else { a.clone() };
    ev.drop_to_level(&mut low, level).unwrap();
    let gemm_inputs: Vec<Ciphertext> = (0..terms).map(|_| low.clone()).collect();
    let gemm_refs: Vec<&Ciphertext> = gemm_inputs.iter().collect();
    let gemm_terms: Vec<Vec<(u32, f64)>> = (0..outputs as u32)
        .map(|j| {
            (0..terms)
                .map(|t| (t, ((t + j) % 13) as f64 * 0.01 - 0.06))
                .collect()
        })
        .collect();
    let gemm_rows: Vec<LinearRow> = gemm_terms
        .iter()
        .map(|t| LinearRow {
            terms: t,
            level,
            target_scale: low.scale() * params.q()[level] as f64,
        })
        .collect();
    let gemm_work = outputs * terms as usize * (level + 1) * (degree + 1) * params.n();
    let t = std::time::Instant::now();
    let mut best = f64::MAX;
    for _ in 0..reps {
        // Rescale works in place: its input is copied before the clock starts.
        let mut input = (op == "rescale").then(|| d1.clone());
        let t1 = std::time::Instant::now();
        match op {
            "relin" => drop(ev.relinearize(&d2, &rlk).unwrap()),
            "rescale" => ev.rescale_assign(input.as_mut().unwrap()).unwrap(),
            "mrr" => {
                let mut c = ev.mul(&a, &a).unwrap();
                ev.relinearize_rescale_assign(&mut c, &rlk).unwrap();
                drop(c)
            }
            // A sum of lazy squares: two rescales and a key switch, or one key switch that
            // divides by the two primes too.
            "lazy" => {
                let mut c = d2.clone();
                ev.rescale_by_assign(&mut c, 2).unwrap();
                ev.relinearize_assign(&mut c, &rlk).unwrap();
                drop(c)
            }
            "lazy_fused" => {
                let mut c = d2.clone();
                ev.relinearize_rescale_by_assign(&mut c, &rlk, 2).unwrap();
                drop(c)
            }
            // The same dividing by three primes: the reader of squares whose combination
            // was not rescaled.
            "lazy_fused3" => {
                let mut c = d2.clone();
                ev.relinearize_rescale_by_assign(&mut c, &rlk, 3).unwrap();
                drop(c)
            }
            // Tile files: a degree-1 ciphertext at the top level to bytes and back.
            "to_bytes" => drop(std::hint::black_box(d1.to_bytes())),
            "from_bytes" => drop(Ciphertext::from_bytes(&params, &d1_bytes).unwrap()),
            "decrypt" => drop(enc.decode(&decrypt(&sk, &a).unwrap())),
            "mul" => drop(ev.mul(&a, &a).unwrap()),
            "ntt" => {
                let mut row = a.polys()[0].limb(1).to_vec();
                params.ring().table(1).forward(&mut row);
                std::hint::black_box(&row);
            }
            "gemm" => drop(ev.linear_combinations(&gemm_refs, &gemm_rows).unwrap()),
            other => panic!("unknown op {other}"),
        }
        best = best.min(t1.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "{op}: mean {:.3} ms, min {best:.3} ms",
        t.elapsed().as_secs_f64() * 1e3 / reps as f64
    );
    if op == "gemm" {
        println!(
            "gemm {outputs} x {terms} at level {level}, degree {degree}: {:.2} G multiply-adds/s (min)",
            gemm_work as f64 / best / 1e6
        );
    }
}
