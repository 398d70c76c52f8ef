//! `beaa demo`: the BEAA data flow in one process.
//!
//! Until the trained models and the encrypted executor land, the demo runs one BEAA layer on
//! random "images": ciphertext k holds feature k of every image (image b in slot b), a
//! linear layer needs only ciphertext-by-scalar products and additions, and every output
//! element has its own quadratic activation. It encrypts, evaluates, decrypts, and reports
//! the error against the same computation in f64.

use anyhow::{bail, Result};
use beaa_ckks::{
    decrypt, presets, Ciphertext, Encoder, Encryptor, Evaluator, KeyGenerator, Params,
};
use std::time::Instant;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Images in the batch (at most N/2 = 4096 with the N = 8192 preset).
    #[arg(long, default_value_t = 4096)]
    pub batch: usize,
    /// Input features per image.
    #[arg(long, default_value_t = 16)]
    pub inputs: usize,
    /// Output features per image.
    #[arg(long, default_value_t = 8)]
    pub outputs: usize,
}

/// A tiny deterministic generator for the demo's public weights and inputs (not keys).
struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
    }
}

pub fn run(args: &DemoArgs) -> Result<()> {
    let params = Params::new(presets::n8192())?;
    if args.batch == 0 || args.batch > params.slots() {
        bail!("--batch must be in 1..={}", params.slots());
    }
    let t0 = Instant::now();
    let mut kg = KeyGenerator::new(&params);
    let sk = kg.secret_key();
    let rlk = kg.relin_key(&sk);
    eprintln!(
        "keys: N = {}, {} limbs, log2(QP) = {:.0} (128-bit secure: {}), {:.0} ms",
        params.n(),
        params.max_level() + 1,
        params.log_qp(),
        params.is_secure(),
        t0.elapsed().as_secs_f64() * 1e3
    );
    let mut rng = Lcg(42);
    let images: Vec<Vec<f64>> = (0..args.batch)
        .map(|_| (0..args.inputs).map(|_| rng.next()).collect())
        .collect();
    let weights: Vec<Vec<f64>> = (0..args.outputs)
        .map(|_| (0..args.inputs).map(|_| rng.next() * 0.5).collect())
        .collect();
    let poly: Vec<[f64; 3]> = (0..args.outputs)
        .map(|_| {
            [
                0.1 + 0.05 * rng.next(),
                0.5 + 0.1 * rng.next(),
                0.2 * rng.next(),
            ]
        })
        .collect();

    // Client: pack feature k of every image into ciphertext k and encrypt.
    let t = Instant::now();
    let enc = Encoder::new(&params);
    let mut encryptor = Encryptor::new(&params);
    let top = params.max_level();
    let mut inputs = Vec::with_capacity(args.inputs);
    for k in 0..args.inputs {
        let column: Vec<f64> = images.iter().map(|img| img[k]).collect();
        let pt = enc.encode(&column, params.default_scale(), top)?;
        let ct = encryptor.encrypt_sk(&sk, &pt)?;
        // What the server receives: bytes, validated on arrival.
        inputs.push(Ciphertext::from_bytes(&params, &ct.to_bytes())?);
    }
    eprintln!(
        "client: packed and encrypted {} images x {} features in {:.0} ms",
        args.batch,
        args.inputs,
        t.elapsed().as_secs_f64() * 1e3
    );

    // Server: linear layer (scalar products + additions), then a*x^2 + b*x + c per element
    // as x*(a*x + b) + c.
    let t = Instant::now();
    let ev = Evaluator::new(&params);
    let mut outputs = Vec::with_capacity(args.outputs);
    for (w, [a, b, c]) in weights.iter().zip(&poly) {
        let q = params.q()[top] as f64;
        let mut acc: Option<Ciphertext> = None;
        for (x, &wk) in inputs.iter().zip(w) {
            let mut term = x.clone();
            ev.mul_const_assign(&mut term, wk, q)?;
            match &mut acc {
                None => acc = Some(term),
                Some(s) => ev.add_assign(s, &term)?,
            }
        }
        let mut y = acc.expect("at least one input");
        ev.rescale_assign(&mut y)?;
        let mut inner = y.clone();
        let q = params.q()[y.level()] as f64;
        ev.mul_const_assign(&mut inner, *a, q)?;
        ev.rescale_assign(&mut inner)?;
        ev.add_const_assign(&mut inner, *b)?;
        let mut y_low = y.clone();
        ev.drop_to_level(&mut y_low, inner.level())?;
        let mut z = ev.mul(&y_low, &inner)?;
        ev.relinearize_assign(&mut z, &rlk)?;
        ev.rescale_assign(&mut z)?;
        ev.add_const_assign(&mut z, *c)?;
        outputs.push(z);
    }
    eprintln!(
        "server: {} outputs (linear + element-wise quadratic) in {:.0} ms",
        args.outputs,
        t.elapsed().as_secs_f64() * 1e3
    );

    // Client: decrypt and compare with the same layer in f64.
    let mut max_err = 0.0f64;
    for (j, ct) in outputs.iter().enumerate() {
        let got = enc.decode(&decrypt(&sk, ct)?);
        for (b, img) in images.iter().enumerate() {
            let y: f64 = img.iter().zip(&weights[j]).map(|(x, w)| x * w).sum();
            let [a, bb, c] = poly[j];
            let want = a * y * y + bb * y + c;
            max_err = max_err.max((got[b] - want).abs());
        }
    }
    println!(
        "demo: {} images, {} -> {} features, element-wise quadratic activation; max |encrypted - plaintext| = {:.2e}",
        args.batch, args.inputs, args.outputs, max_err
    );
    if max_err > 1e-3 {
        bail!("encrypted result disagrees with plaintext (max error {max_err})");
    }
    Ok(())
}
