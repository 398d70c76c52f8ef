//! NTT-friendly prime generation.

use super::Modulus;

/// Deterministic Miller-Rabin for all `n < 2^64`.
pub fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    for p in [2u64, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37] {
        if n.is_multiple_of(p) {
            return n == p;
        }
    }
    let mut d = n - 1;
    let mut s = 0;
    while d.is_multiple_of(2) {
        d /= 2;
        s += 1;
    }
    let mulmod = |a: u64, b: u64| ((a as u128 * b as u128) % n as u128) as u64;
    let powmod = |mut b: u64, mut e: u64| {
        let mut r = 1u64;
        while e > 0 {
            if e & 1 == 1 {
                r = mulmod(r, b);
            }
            b = mulmod(b, b);
            e >>= 1;
        }
        r
    };
    'witness: for a in [2u64, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37] {
        let mut x = powmod(a, d);
        if x == 1 || x == n - 1 {
            continue;
        }
        for _ in 1..s {
            x = mulmod(x, x);
            if x == n - 1 {
                continue 'witness;
            }
        }
        return false;
    }
    true
}

/// The largest primes `q < 2^bits` with `q = 1 mod 2n`, skipping those in `taken`.
///
/// Deterministic: the same request always yields the same primes, so a parameter set is fully
/// described by its bit sizes. Returns `None` if fewer than `count` such primes exist.
pub fn ntt_primes_below(bits: u32, n: usize, count: usize, taken: &[u64]) -> Option<Vec<u64>> {
    let two_n = 2 * n as u64;
    if !(2..=64).contains(&bits) || two_n == 0 {
        return None;
    }
    let limit = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    // Largest candidate = k*2n + 1 <= limit.
    let mut k = (limit - 1) / two_n;
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        if k == 0 {
            return None;
        }
        let q = k * two_n + 1;
        // Stay within the requested size so that "40-bit prime" means bit length 40.
        if 64 - q.leading_zeros() < bits {
            return None;
        }
        if is_prime(q) && !taken.contains(&q) && !out.contains(&q) {
            out.push(q);
        }
        k -= 1;
    }
    Some(out)
}

/// Checks that `q` is a usable NTT prime for ring degree `n`.
pub fn is_ntt_prime(q: u64, n: usize) -> bool {
    Modulus::new(q).is_some() && is_prime(q) && (q - 1).is_multiple_of(2 * n as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_primes() {
        let primes: Vec<u64> = (0..60).filter(|&n| is_prime(n)).collect();
        assert_eq!(
            primes,
            vec![2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59]
        );
        // Carmichael numbers and strong pseudoprimes to small bases.
        for c in [561u64, 1105, 3215031751, 3825123056546413051] {
            assert!(!is_prime(c), "{c}");
        }
        assert!(is_prime((1u64 << 61) - 1));
    }

    #[test]
    fn generated_primes_are_ntt_friendly_and_distinct() {
        let n = 1 << 15;
        let a = ntt_primes_below(50, n, 3, &[]).unwrap();
        let b = ntt_primes_below(50, n, 2, &a).unwrap();
        for &q in a.iter().chain(&b) {
            assert!(is_ntt_prime(q, n));
            assert_eq!(64 - q.leading_zeros(), 50);
            assert!(tfhe_ntt::prime64::Plan::try_new(n, q).is_some());
        }
        assert!(a.iter().all(|q| !b.contains(q)));
        assert!(a.windows(2).all(|w| w[0] > w[1]));
        // Deterministic.
        assert_eq!(a, ntt_primes_below(50, n, 3, &[]).unwrap());
    }
}
