//! RNS polynomials: one row of `n` residues per prime, in a 64-byte-aligned buffer.

use aligned_vec::{AVec, ConstAlign};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use zeroize::Zeroize;

/// Bytes of polynomial storage alive in this process. Ciphertexts, keys and the evaluator's
/// temporaries are all [`RnsPoly`]s, so this is the memory that grows with N and with what a
/// schedule keeps, without the pages an allocator retains after a free (which RSS includes).
static LIVE_BYTES: AtomicU64 = AtomicU64::new(0);
/// The most of [`LIVE_BYTES`] since the last [`take_poly_bytes_peak`].
static PEAK_BYTES: AtomicU64 = AtomicU64::new(0);

fn count_alloc(bytes: u64) {
    let live = LIVE_BYTES.fetch_add(bytes, Relaxed) + bytes;
    PEAK_BYTES.fetch_max(live, Relaxed);
}

/// Bytes of [`RnsPoly`] storage alive now.
pub fn poly_bytes_live() -> u64 {
    LIVE_BYTES.load(Relaxed)
}

/// The most bytes of [`RnsPoly`] storage alive at once since the previous call (since the
/// start for the first), so that a computation's peak can be split into parts.
pub fn take_poly_bytes_peak() -> u64 {
    PEAK_BYTES.swap(LIVE_BYTES.load(Relaxed), Relaxed)
}

/// 64-byte-aligned storage, as tfhe-ntt's vectorized kernels prefer.
pub type AlignedVec = AVec<u64, ConstAlign<64>>;

fn aligned_zeros(len: usize) -> AlignedVec {
    AVec::from_iter(64, std::iter::repeat_n(0u64, len))
}

/// Most bytes of dropped polynomials' buffers kept for [`RnsPoly::for_overwrite`]: about
/// two GEMM calls' outputs (a conv1 tile's are 512 MiB at N = 32768), whose sizes repeat from
/// tile to tile. None in the browser, whose memory is scarcer.
#[cfg(not(target_arch = "wasm32"))]
const SPARE_BYTES: usize = 1 << 30;
#[cfg(target_arch = "wasm32")]
const SPARE_BYTES: usize = 0;
/// Smaller buffers are not worth keeping, except in this crate's tests, where every reused
/// buffer is poisoned (see [`RnsPoly::for_overwrite`]) so that the scheme's tests, at small
/// N, check that each user writes every residue.
const SPARE_MIN_BYTES: usize = if cfg!(test) { 8 } else { 64 << 10 };

/// Spare buffers, oldest first.
struct Spares {
    bufs: Vec<AlignedVec>,
    bytes: usize,
}

static SPARES: std::sync::Mutex<Spares> = std::sync::Mutex::new(Spares {
    bufs: Vec::new(),
    bytes: 0,
});

fn spares() -> std::sync::MutexGuard<'static, Spares> {
    // The lists stay consistent at every unlock, so a panic elsewhere poisons nothing.
    SPARES.lock().unwrap_or_else(|e| e.into_inner())
}

/// The newest spare buffer with room for `len` words and not more than twice that, its
/// contents whatever they were, resized to `len`.
fn take_spare(len: usize) -> Option<AlignedVec> {
    if len * 8 < SPARE_MIN_BYTES {
        return None;
    }
    let mut buf = {
        let mut s = spares();
        let i = s
            .bufs
            .iter()
            .rposition(|b| b.capacity() >= len && b.capacity() <= 2 * len)?;
        let buf = s.bufs.remove(i);
        s.bytes -= buf.capacity() * 8;
        buf
    };
    // A shorter one grows by zeros; the rest is left as it was.
    buf.resize(len, 0);
    Some(buf)
}

/// Keeps `buf` for a later [`RnsPoly::for_overwrite`], dropping the oldest spares for room.
fn keep_spare(buf: AlignedVec) {
    let bytes = buf.capacity() * 8;
    if !(SPARE_MIN_BYTES..=SPARE_BYTES).contains(&bytes) {
        return;
    }
    let evicted = {
        let mut s = spares();
        let mut evicted = Vec::new();
        while s.bytes + bytes > SPARE_BYTES {
            let old = s.bufs.remove(0);
            s.bytes -= old.capacity() * 8;
            evicted.push(old);
        }
        s.bytes += bytes;
        s.bufs.push(buf);
        evicted
    };
    // Freed outside the lock.
    drop(evicted);
}

/// Frees every spare buffer kept for [`RnsPoly::for_overwrite`] (a finished job's, so that an
/// idle server does not hold them).
pub fn release_spare_buffers() {
    let bufs = {
        let mut s = spares();
        s.bytes = 0;
        std::mem::take(&mut s.bufs)
    };
    drop(bufs);
}

/// A polynomial in RNS form: `limbs` rows of `n` residues, row-major.
///
/// A polynomial does not know its moduli; the caller pairs row `i` with a prime of the
/// parameter set (the ciphertext level or key basis says which).
pub struct RnsPoly {
    n: usize,
    limbs: usize,
    data: AlignedVec,
}

impl Clone for RnsPoly {
    fn clone(&self) -> Self {
        let data = self.data.clone();
        count_alloc(data.capacity() as u64 * 8);
        Self {
            n: self.n,
            limbs: self.limbs,
            data,
        }
    }
}

impl Drop for RnsPoly {
    fn drop(&mut self) {
        LIVE_BYTES.fetch_sub(self.data.capacity() as u64 * 8, Relaxed);
        keep_spare(std::mem::replace(&mut self.data, AVec::new(64)));
    }
}

impl std::fmt::Debug for RnsPoly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RnsPoly(n={}, limbs={})", self.n, self.limbs)
    }
}

impl PartialEq for RnsPoly {
    fn eq(&self, other: &Self) -> bool {
        self.n == other.n && self.limbs == other.limbs && self.data[..] == other.data[..]
    }
}
impl Eq for RnsPoly {}

impl RnsPoly {
    pub fn zero(n: usize, limbs: usize) -> Self {
        let data = aligned_zeros(n * limbs);
        count_alloc(data.capacity() as u64 * 8);
        Self { n, limbs, data }
    }

    /// A polynomial whose residues are unspecified (but initialized), for a computation that
    /// writes every one of them: the buffer of a polynomial dropped earlier when one fits,
    /// which saves zeroing it (memset was about 8% of a job's time,
    /// `perf record` on the width/4 model's full batch). Test builds fill it with `u64::MAX`,
    /// which is no residue, so that a residue left unwritten shows.
    pub fn for_overwrite(n: usize, limbs: usize) -> Self {
        let Some(mut data) = take_spare(n * limbs) else {
            return Self::zero(n, limbs);
        };
        if cfg!(test) {
            data.fill(u64::MAX);
        }
        count_alloc(data.capacity() as u64 * 8);
        Self { n, limbs, data }
    }

    #[inline]
    pub fn n(&self) -> usize {
        self.n
    }

    #[inline]
    pub fn limbs(&self) -> usize {
        self.limbs
    }

    #[inline]
    pub fn limb(&self, i: usize) -> &[u64] {
        &self.data[i * self.n..(i + 1) * self.n]
    }

    #[inline]
    pub fn limb_mut(&mut self, i: usize) -> &mut [u64] {
        &mut self.data[i * self.n..(i + 1) * self.n]
    }

    pub fn as_slice(&self) -> &[u64] {
        &self.data
    }

    pub fn as_mut_slice(&mut self) -> &mut [u64] {
        &mut self.data
    }

    /// Iterator over rows.
    pub fn rows(&self) -> std::slice::ChunksExact<'_, u64> {
        self.data.chunks_exact(self.n)
    }

    pub fn rows_mut(&mut self) -> std::slice::ChunksExactMut<'_, u64> {
        self.data.chunks_exact_mut(self.n)
    }

    /// Keeps the first `limbs` rows (dropping primes from the top of the chain).
    pub fn truncate(&mut self, limbs: usize) {
        assert!(limbs <= self.limbs);
        self.data.truncate(limbs * self.n);
        self.limbs = limbs;
    }

    /// A copy of rows `range`.
    pub fn copy_rows(&self, range: std::ops::Range<usize>) -> Self {
        let mut out = Self::zero(self.n, range.len());
        out.data
            .copy_from_slice(&self.data[range.start * self.n..range.end * self.n]);
        out
    }
}

impl Zeroize for RnsPoly {
    fn zeroize(&mut self) {
        self.data.as_mut_slice().zeroize();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dropped polynomial's buffer is reused by the next `for_overwrite` of a size it fits
    /// (and counted as live again), not by one for which it is more than twice too large.
    /// (The sizes are odd so that tests running beside this one do not take the buffer.)
    #[test]
    fn dropped_buffers_are_reused_for_overwrite() {
        const N: usize = 3_333_331;
        let a = RnsPoly::zero(N, 1);
        let ptr = a.as_slice().as_ptr();
        drop(a);
        let small = RnsPoly::for_overwrite(N / 3, 1);
        assert_ne!(small.as_slice().as_ptr(), ptr);
        assert!(small.as_slice().iter().all(|&x| x == 0));
        let b = RnsPoly::for_overwrite(N - 5, 1);
        assert_eq!(b.as_slice().as_ptr(), ptr);
        assert_eq!(b.as_slice().len(), N - 5);
        assert!(b.as_slice().iter().all(|&x| x == u64::MAX));
        assert!(poly_bytes_live() >= 8 * N as u64);
    }

    /// Polynomials made, cloned and dropped are counted: the peak since the last take holds
    /// both copies of a 32 MB polynomial. (Other tests run beside this one and only add.)
    #[test]
    fn polynomial_bytes_are_counted() {
        const BYTES: u64 = (1 << 16) * 64 * 8;
        take_poly_bytes_peak();
        let a = RnsPoly::zero(1 << 16, 64);
        assert!(poly_bytes_live() >= BYTES);
        let b = a.clone();
        drop(a);
        drop(b);
        assert!(take_poly_bytes_peak() >= 2 * BYTES);
    }
}
