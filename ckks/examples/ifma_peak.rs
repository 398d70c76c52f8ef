//! The GEMM's ceiling on this core: `cargo run --release -p beaa-ckks --example ifma_peak
//! [REPS]`. Prints one JSON line with two rates in multiply-adds per second and their ratio
//! (a modular multiply-add of a residue by a constant takes a low and a high 52-bit IFMA per
//! lane):
//! - `peak`: 16 independent chains of IFMAs on registers, no loads (the instruction's
//!   throughput);
//! - `rows_loop`: the rows kernel's inner loop alone (4 outputs x 16 coefficients per pass,
//!   2 loads and 4 broadcasts per 16 IFMAs) over a packed 288-term block, as
//!   `linear_combinations` feeds it for a fire1.expand3 tile, without the kernel's modular
//!   folds, output reduction, constant preparation or allocation.
//!
//! Compare them with `profile_ops gemm` (the whole `linear_combinations`) and with a job's
//! GEMM thread-seconds.
//!
//! Needs AVX-512 IFMA; prints `{"ifma": false}` otherwise.

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::hint::black_box;

    /// IFMAs per second on registers only.
    #[target_feature(enable = "avx512f,avx512ifma")]
    pub unsafe fn peak(iters: u64) -> f64 {
        let a = black_box(_mm512_set1_epi64(0x000f_ffff_ffff_fff1));
        let b = black_box(_mm512_set1_epi64(0x0007_ffff_ffff_ff13));
        let mut acc = [_mm512_setzero_si512(); 16];
        let t = std::time::Instant::now();
        for _ in 0..iters {
            for k in 0..8 {
                acc[2 * k] = _mm512_madd52lo_epu64(acc[2 * k], a, b);
                acc[2 * k + 1] = _mm512_madd52hi_epu64(acc[2 * k + 1], a, b);
            }
        }
        let secs = t.elapsed().as_secs_f64();
        black_box(acc);
        iters as f64 * 16.0 / secs
    }

    /// The rows kernel's inner loop over `terms` packed rows of `len` coefficients (stride
    /// `len + 8`), 4 outputs per pass, into `out` (`len` coefficients per output).
    #[target_feature(enable = "avx512f,avx512ifma")]
    pub unsafe fn rows_loop(x: &[u64], terms: usize, len: usize, w: &[u64], out: &mut [u64]) {
        let stride = len + 8;
        let zero = _mm512_setzero_si512();
        for g in 0..out.len() / (4 * len) {
            let wg = &w[g * terms * 4..(g + 1) * terms * 4];
            let mut k = 0;
            while k + 16 <= len {
                let mut lo = [[zero; 2]; 4];
                let mut hi = [[zero; 2]; 4];
                for j in 0..terms {
                    // SAFETY: j * stride + k + 16 <= terms * stride = x.len().
                    let p = unsafe { x.as_ptr().add(j * stride + k) };
                    let v = unsafe {
                        [
                            _mm512_loadu_si512(p as *const _),
                            _mm512_loadu_si512(p.add(8) as *const _),
                        ]
                    };
                    for r in 0..4 {
                        let wr = _mm512_set1_epi64(wg[j * 4 + r] as i64);
                        for u in 0..2 {
                            lo[r][u] = _mm512_madd52lo_epu64(lo[r][u], v[u], wr);
                            hi[r][u] = _mm512_madd52hi_epu64(hi[r][u], v[u], wr);
                        }
                    }
                }
                for r in 0..4 {
                    for u in 0..2 {
                        let at = (g * 4 + r) * len + k + 8 * u;
                        let s = _mm512_add_epi64(lo[r][u], hi[r][u]);
                        // SAFETY: at + 8 <= out.len() (out holds out.len() / len rows).
                        unsafe { _mm512_storeu_si512(out.as_mut_ptr().add(at) as *mut _, s) };
                    }
                }
                k += 16;
            }
        }
    }
}

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512ifma") {
        // Lanes per IFMA / IFMAs per multiply-add.
        let per_ifma = 8.0 / 2.0;
        let peak = (0..reps)
            .map(|_| unsafe { x86::peak(50_000_000) })
            .fold(0.0, f64::max);
        // One fire1.expand3 tile's shape: 288 terms, 64 outputs, a 512 KiB block (224
        // coefficients), all 32768 coefficients of one limb.
        let (terms, outputs, len, n) = (288usize, 64usize, 224usize, 32768usize);
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed & ((1 << 50) - 1)
        };
        let x: Vec<u64> = (0..terms * (len + 8)).map(|_| next()).collect();
        let w: Vec<u64> = (0..terms * outputs).map(|_| next()).collect();
        let mut out = vec![0u64; outputs * len];
        let blocks = n / len;
        let mut best = f64::MAX;
        for _ in 0..reps {
            let t = std::time::Instant::now();
            for _ in 0..blocks {
                unsafe { x86::rows_loop(&x, terms, len, &w, &mut out) };
            }
            best = best.min(t.elapsed().as_secs_f64());
        }
        std::hint::black_box(&out);
        let work = (terms * outputs * len * blocks) as f64;
        println!(
            "{{\"ifma\": true, \"peak_multiply_adds_per_s\": {:.4e}, \"rows_loop_multiply_adds_per_s\": {:.4e}, \"rows_loop_of_peak\": {:.3}}}",
            peak * per_ifma,
            work / best,
            work / best / (peak * per_ifma)
        );
        return;
    }
    println!("{{\"ifma\": false}}");
}
