//! `beaa bench ckks`: single-threaded per-operation medians of the CKKS engine.

use anyhow::{bail, Context, Result};
use beaa_ckks::{
    decrypt, presets, Encoder, Encryptor, Evaluator, KeyGenerator, ParamSpec, Params, RelinKey,
};
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct CkksBenchArgs {
    /// Ring degree N (8192, 16384 or 32768).
    #[arg(long, default_value_t = 32768)]
    pub n: usize,
    /// Ciphertext primes (one 50-bit, the rest 40-bit); default: the preset for N.
    #[arg(long)]
    pub limbs: Option<usize>,
    /// Key-switching digits (fewer digits: smaller, faster keys but more special primes).
    #[arg(long)]
    pub digits: Option<usize>,
    /// Repetitions per operation (median reported).
    #[arg(long, default_value_t = 7)]
    pub reps: usize,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Serialize)]
struct Report {
    library: &'static str,
    n: usize,
    limbs: usize,
    special_primes: usize,
    digits: usize,
    log_q: f64,
    log_qp: f64,
    secure_128: bool,
    ntt_ifma: bool,
    /// The row kernels' path on this CPU (`beaa_ckks::arith::kernels::kernel_path`).
    kernels: &'static str,
    threads: usize,
    reps: usize,
    ops_ms: BTreeMap<&'static str, f64>,
    sizes_bytes: BTreeMap<&'static str, usize>,
    throughput_gb_s: BTreeMap<&'static str, f64>,
    notes: BTreeMap<&'static str, &'static str>,
}

fn median_ms<T>(reps: usize, mut f: impl FnMut() -> T) -> f64 {
    let mut times: Vec<f64> = (0..reps.max(1))
        .map(|_| {
            let t = Instant::now();
            std::hint::black_box(f());
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    times[times.len() / 2]
}

pub fn spec_for(n: usize, limbs: Option<usize>, digits: Option<usize>) -> Result<ParamSpec> {
    let preset = presets::for_n(n).with_context(|| format!("no preset for N = {n}"))?;
    let limbs = limbs.unwrap_or(preset.q_bits.len());
    if limbs == 0 {
        bail!("--limbs must be at least 1");
    }
    let preset_digits = preset.q_bits.len().div_ceil(preset.p_bits.len());
    if limbs == preset.q_bits.len() && digits.is_none_or(|d| d == preset_digits) {
        return Ok(preset);
    }
    let digits = digits.unwrap_or(preset_digits);
    let mut spec = ParamSpec::chain(n.trailing_zeros(), limbs, 40, digits);
    // Special primes as large as the 128-bit budget allows (at most 50 bits each).
    let bound = beaa_ckks::max_log_qp_128(spec.log_n).unwrap_or(0);
    let log_q: u32 = spec.q_bits.iter().sum();
    let alpha = spec.p_bits.len() as u32;
    let p_bits = (bound.saturating_sub(log_q) / alpha).min(50);
    if p_bits < 40 {
        bail!(
            "{limbs} limbs with {digits} digits leave {p_bits}-bit special primes in the 128-bit \
             budget of {bound} bits; use fewer limbs or more digits"
        );
    }
    spec.p_bits = vec![p_bits; alpha as usize];
    Ok(spec)
}

pub fn run(args: &CkksBenchArgs) -> Result<()> {
    let spec = spec_for(args.n, args.limbs, args.digits)?;
    let params = Params::new(spec).context("parameter set")?;
    // The CKKS crate never spawns threads: these are single-threaded per-operation costs,
    // comparable with SEAL run with one thread.
    let report = measure(&params, args.reps)?;
    eprintln!(
        "beaa-ckks N={} limbs={} special={} digits={} log2(Q)={:.1} log2(QP)={:.1} (128-bit: {}), IFMA NTT: {}, kernels: {}",
        report.n, report.limbs, report.special_primes, report.digits, report.log_q, report.log_qp,
        report.secure_128, report.ntt_ifma, report.kernels
    );
    for (k, v) in &report.ops_ms {
        eprintln!("  {k:<20} {v:>10.3} ms");
    }
    for (k, v) in &report.sizes_bytes {
        eprintln!("  {k:<20} {:>10.2} MB", *v as f64 / 1e6);
    }
    for (k, v) in &report.throughput_gb_s {
        eprintln!("  {k:<20} {v:>10.2} GB/s");
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

fn measure(params: &Params, reps: usize) -> Result<Report> {
    let top = params.max_level();
    let enc = Encoder::new(params);
    let ev = Evaluator::new(params);
    let mut encryptor = Encryptor::new(params);
    let values: Vec<f64> = (0..params.slots())
        .map(|i| ((i % 101) as f64 - 50.0) / 50.0)
        .collect();
    let mut ops = BTreeMap::new();

    let mut kg = KeyGenerator::new(params);
    let keygen = median_ms(reps.min(3), || {
        let sk = kg.secret_key();
        let pk = kg.public_key(&sk);
        let rlk = kg.relin_key(&sk);
        (pk, rlk)
    });
    ops.insert("keygen", keygen);
    let sk = kg.secret_key();
    ops.insert("keygen_relin", median_ms(reps.min(3), || kg.relin_key(&sk)));
    let pk = kg.public_key(&sk);
    let rlk: RelinKey = kg.relin_key(&sk);

    ops.insert(
        "encode",
        median_ms(reps, || {
            enc.encode(&values, params.default_scale(), top).unwrap()
        }),
    );
    let pt = enc.encode(&values, params.default_scale(), top)?;
    ops.insert(
        "encrypt",
        median_ms(reps, || {
            encryptor
                .encrypt_values_sk(&sk, &values, params.default_scale(), top)
                .unwrap()
        }),
    );
    ops.insert(
        "encrypt_pk",
        median_ms(reps, || {
            let pt = enc.encode(&values, params.default_scale(), top).unwrap();
            encryptor.encrypt_pk(&pk, &pt).unwrap()
        }),
    );
    let a = encryptor.encrypt_sk(&sk, &pt)?;
    let b = encryptor.encrypt_pk(&pk, &pt)?;
    ops.insert(
        "decrypt",
        median_ms(reps, || enc.decode(&decrypt(&sk, &a).unwrap())),
    );
    ops.insert("add", median_ms(reps, || ev.add(&a, &b).unwrap()));
    let q_top = params.q()[top] as f64;
    ops.insert(
        "mul_scalar",
        median_ms(reps, || {
            let mut c = a.clone();
            ev.mul_const_assign(&mut c, 0.73, q_top).unwrap();
            c
        }),
    );
    ops.insert("clone", median_ms(reps, || a.clone()));
    let table = params.ring().table(1);
    let mut row = a.polys()[0].limb(1).to_vec();
    ops.insert(
        "ntt_one_limb",
        median_ms(reps * 20, || table.forward(&mut row)),
    );
    ops.insert(
        "intt_one_limb",
        median_ms(reps * 20, || table.inverse(&mut row)),
    );
    ops.insert("mul", median_ms(reps, || ev.mul(&a, &b).unwrap()));
    let d2 = ev.mul(&a, &b)?;
    ops.insert(
        "relin",
        median_ms(reps, || ev.relinearize(&d2, &rlk).unwrap()),
    );
    let d1 = ev.relinearize(&d2, &rlk)?;
    ops.insert("rescale", median_ms(reps, || ev.rescale(&d1).unwrap()));
    ops.insert(
        "mul_relin_rescale",
        median_ms(reps, || {
            let mut c = ev.mul(&a, &b).unwrap();
            ev.relinearize_rescale_assign(&mut c, &rlk).unwrap();
            c
        }),
    );
    ops.insert(
        "mul_relin_rescale_separate",
        median_ms(reps, || {
            let mut c = ev.mul(&a, &b).unwrap();
            ev.relinearize_assign(&mut c, &rlk).unwrap();
            ev.rescale_assign(&mut c).unwrap();
            c
        }),
    );
    // Sanity: the measured path computes the right thing.
    let mut check = ev.mul(&a, &b)?;
    ev.relinearize_rescale_assign(&mut check, &rlk)?;
    let got = enc.decode(&decrypt(&sk, &check)?);
    let err = got
        .iter()
        .zip(&values)
        .map(|(g, v)| (g - v * v).abs())
        .fold(0.0, f64::max);
    if err > 1e-3 {
        bail!("benchmark self-check failed: max error {err}");
    }
    let fresh_bytes = a.to_bytes().len();
    let full = ev.add(&a, &b)?;
    let ct_bytes = full.to_bytes().len();
    // Bytes moved per operation: add reads two ciphertexts and writes one (plus the
    // clone that `add` makes); mul_scalar reads and writes one (plus its clone).
    let ct_mem = 2 * (top + 1) * params.n() * 8;
    let mut tp = BTreeMap::new();
    let clone_ms = ops["clone"];
    tp.insert(
        "add",
        3.0 * ct_mem as f64 / ((ops["add"] - clone_ms).max(1e-6) * 1e6),
    );
    tp.insert(
        "mul_scalar",
        2.0 * ct_mem as f64 / ((ops["mul_scalar"] - clone_ms).max(1e-6) * 1e6),
    );
    tp.insert(
        "memcpy_clone",
        2.0 * ct_mem as f64 / (clone_ms.max(1e-6) * 1e6),
    );
    let mut sizes = BTreeMap::new();
    sizes.insert("ciphertext_fresh_seeded", fresh_bytes);
    sizes.insert("ciphertext", ct_bytes);
    sizes.insert("relin_key", rlk.to_bytes().len());
    sizes.insert("public_key", pk.to_bytes().len());
    sizes.insert("ciphertext_in_memory", ct_mem);
    let mut notes = BTreeMap::new();
    notes.insert("keygen", "secret + public + relinearization key");
    notes.insert(
        "encrypt",
        "encode N/2 reals + secret-key encryption with seeded c1",
    );
    notes.insert("decrypt", "decrypt + decode at the top level");
    notes.insert(
        "mul_scalar",
        "ct * real constant as an integer at scale q_top, no rescale (includes a ciphertext clone)",
    );
    notes.insert(
        "add",
        "ct + ct at the top level (includes a ciphertext clone)",
    );
    notes.insert(
        "mul_relin_rescale",
        "tensor + hybrid key switching + rescale at the top level",
    );
    notes.insert(
        "throughput",
        "add/mul_scalar GB/s exclude the clone measured separately",
    );
    Ok(Report {
        library: "beaa-ckks",
        n: params.n(),
        limbs: top + 1,
        special_primes: params.alpha(),
        digits: params.digits(top),
        log_q: params.log_q_at(top),
        log_qp: params.log_qp(),
        secure_128: params.is_secure(),
        ntt_ifma: params.ring().table(0).uses_ifma(),
        kernels: beaa_ckks::arith::kernels::kernel_path(),
        threads: 1,
        reps,
        ops_ms: ops,
        sizes_bytes: sizes,
        throughput_gb_s: tp,
        notes,
    })
}
