//! RNS polynomials: one row of `n` residues per prime, in a 64-byte-aligned buffer.

use aligned_vec::{AVec, ConstAlign};
use zeroize::Zeroize;

/// 64-byte-aligned storage, as tfhe-ntt's vectorized kernels prefer.
pub type AlignedVec = AVec<u64, ConstAlign<64>>;

fn aligned_zeros(len: usize) -> AlignedVec {
    AVec::from_iter(64, std::iter::repeat_n(0u64, len))
}

/// A polynomial in RNS form: `limbs` rows of `n` residues, row-major.
///
/// A polynomial does not know its moduli; the caller pairs row `i` with a prime of the
/// parameter set (the ciphertext level or key basis says which).
#[derive(Clone)]
pub struct RnsPoly {
    n: usize,
    limbs: usize,
    data: AlignedVec,
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
        Self {
            n,
            limbs,
            data: aligned_zeros(n * limbs),
        }
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
