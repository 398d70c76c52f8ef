//! Row-kernel microbenchmark on one prime: `gemm_kernel [inputs] [outputs] [block] [reps]`.
//! Compares one output per pass (`dot_const`) with `DOT_ROWS` outputs per pass
//! (`dot_const_rows`) on the blocked GEMM's access pattern; prints multiply-adds per second.

use beaa_ckks::arith::kernels::{dot_const, dot_const_rows, ShoupConst, DOT_ROWS};
use beaa_ckks::arith::{ntt_primes_below, Modulus};
use std::time::Instant;

fn main() {
    let a: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse().expect("number"))
        .collect();
    let (inputs, outputs, block, reps) = (
        *a.first().unwrap_or(&288),
        *a.get(1).unwrap_or(&64),
        *a.get(2).unwrap_or(&448),
        *a.get(3).unwrap_or(&3),
    );
    let n = 32768;
    let q = ntt_primes_below(50, n, 1, &[]).expect("prime")[0];
    let m = Modulus::new(q).expect("prime");
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let xs: Vec<Vec<u64>> = (0..inputs)
        .map(|_| (0..n).map(|_| next() % q).collect())
        .collect();
    let consts: Vec<Vec<ShoupConst>> = (0..outputs)
        .map(|_| {
            (0..inputs)
                .map(|_| ShoupConst::new(next() % q, &m))
                .collect()
        })
        .collect();
    let mut outs: Vec<Vec<u64>> = vec![vec![0; n]; outputs];
    let work = (inputs * outputs * n) as f64;
    for variant in ["one", "rows"] {
        let mut best = f64::MAX;
        for _ in 0..reps {
            let t = Instant::now();
            let mut start = 0;
            while start < n {
                let end = (start + block).min(n);
                let x: Vec<&[u64]> = xs.iter().map(|r| &r[start..end]).collect();
                if variant == "one" {
                    for (o, c) in outs.iter_mut().zip(&consts) {
                        dot_const(&mut o[start..end], &x, c, &m);
                    }
                } else {
                    for (os, cs) in outs.chunks_mut(DOT_ROWS).zip(consts.chunks(DOT_ROWS)) {
                        let r = os.len();
                        let c: Vec<ShoupConst> = (0..inputs)
                            .flat_map(|i| cs.iter().map(move |row| row[i]))
                            .collect();
                        let mut o: Vec<&mut [u64]> =
                            os.iter_mut().map(|o| &mut o[start..end]).collect();
                        debug_assert_eq!(o.len(), r);
                        dot_const_rows(&mut o, &x, &c, &m);
                    }
                }
                start = end;
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        let check: u64 = outs.iter().map(|o| o[7] ^ o[n - 1]).fold(0, |a, b| a ^ b);
        println!(
            "{variant}: {:.3} s, {:.2} G multiply-adds/s (check {check:x})",
            best,
            work / best / 1e9
        );
    }
}
