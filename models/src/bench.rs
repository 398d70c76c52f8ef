//! Training-step timing on random data (compared with PyTorch in models/scripts/).

use crate::net::{ActKind, Net, SqueezeNetSpec};
use crate::train::cross_entropy;
use candle_core::{Device, Tensor};
use serde::Serialize;
use std::time::Instant;

#[derive(Debug, Serialize)]
pub struct BenchResult {
    pub batch: usize,
    pub steps: usize,
    pub act: ActKind,
    pub threads: usize,
    /// Median seconds per step (forward + backward + SGD update).
    pub median_step_s: f64,
    pub mean_step_s: f64,
}

pub fn bench_train_step(batch: usize, steps: usize, act: ActKind) -> anyhow::Result<BenchResult> {
    let dev = Device::Cpu;
    let mut net = Net::new(SqueezeNetSpec::cifar(10), act, 0, &dev)?;
    let x = Tensor::from_vec(
        crate::net::normal_vec(
            &mut rand_core::SeedableRng::seed_from_u64(1),
            batch * 32 * 32 * 3,
            1.0,
        ),
        (batch, 32, 32, 3),
        &dev,
    )?;
    let y: Vec<u32> = (0..batch as u32).map(|i| i % 10).collect();
    let mut times = Vec::new();
    for i in 0..steps + 2 {
        let t = Instant::now();
        let logits = net.forward(&x, true, None)?;
        let loss = cross_entropy(&logits, &y, None)?;
        let grads = loss.backward()?;
        for v in net.vars.values() {
            if let Some(g) = grads.get(v) {
                v.set(&(v.as_tensor() - (g * 1e-3)?)?)?;
            }
        }
        if i >= 2 {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    Ok(BenchResult {
        batch,
        steps,
        act,
        threads: candle_core::utils::get_num_threads(),
        median_step_s: crate::net::median(&times),
        mean_step_s: times.iter().sum::<f64>() / times.len() as f64,
    })
}
