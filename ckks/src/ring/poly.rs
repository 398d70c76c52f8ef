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
