//! Where a job's time goes: thread-seconds per kind of operation, summed over the threads.
//!
//! Only leaf operations are timed (never one inside another), so the kinds add up to the
//! threads' busy time; what is missing from `threads x wall` is waiting (locks, idle threads
//! at the end of a stage) and the executor's own bookkeeping.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// The kinds of operation a job's time is split into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Reading and validating stored tiles and input ciphertexts.
    Load,
    /// Linear combinations of ciphertexts with public weights (the modular GEMM).
    Gemm,
    /// Adding partial sums and constants.
    Add,
    /// Rescales outside a fused key switch.
    Rescale,
    /// Relinearizations, including the rescale fused into some of them.
    KeySwitch,
    /// The activation's square and linear term.
    Square,
    /// Writing finished tiles.
    Store,
}

impl Op {
    pub const ALL: [Op; 7] = [
        Op::Load,
        Op::Gemm,
        Op::Add,
        Op::Rescale,
        Op::KeySwitch,
        Op::Square,
        Op::Store,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Op::Load => "load",
            Op::Gemm => "gemm",
            Op::Add => "add",
            Op::Rescale => "rescale",
            Op::KeySwitch => "key_switch",
            Op::Square => "square",
            Op::Store => "store",
        }
    }
}

/// Thread-nanoseconds per [`Op`]; shared by the threads of one job.
#[derive(Debug, Default)]
pub struct OpTimes {
    nanos: [AtomicU64; Op::ALL.len()],
}

impl OpTimes {
    /// Runs `f`, adding its wall time on this thread to `op`.
    pub fn time<T>(&self, op: Op, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        let ns = start.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.nanos[op as usize].fetch_add(ns, Ordering::Relaxed);
        out
    }

    /// Thread-seconds of `op` so far.
    pub fn seconds(&self, op: Op) -> f64 {
        self.nanos[op as usize].load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// Every kind with its thread-seconds, in [`Op::ALL`] order.
    pub fn all_seconds(&self) -> Vec<(&'static str, f64)> {
        Op::ALL
            .iter()
            .map(|&op| (op.name(), self.seconds(op)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_add_up_per_kind() {
        let t = OpTimes::default();
        let v = t.time(Op::Gemm, || {
            std::thread::sleep(std::time::Duration::from_millis(20));
            7
        });
        assert_eq!(v, 7);
        t.time(Op::Gemm, || {
            std::thread::sleep(std::time::Duration::from_millis(5))
        });
        assert!(t.seconds(Op::Gemm) >= 0.025, "{}", t.seconds(Op::Gemm));
        assert_eq!(t.seconds(Op::Store), 0.0);
        let all = t.all_seconds();
        assert_eq!(all.len(), Op::ALL.len());
        assert_eq!(all[1].0, "gemm");
    }
}
