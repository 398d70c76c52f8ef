//! Validation of an input ciphertext while its body streams in: the verdict of
//! `Ciphertext::from_bytes` followed by `api::check_input` (a fresh seeded ciphertext at the
//! top level and the default scale), without unpacking polynomials or expanding the seed.
//!
//! Such an input is a fixed 50-byte prefix (header, level, degree, scale), a 32-byte seed
//! (any value is valid), then `c0` bit-packed prime by prime (`ckks/src/serialize.rs`): row
//! `i` is `n * bits_i / 8` bytes, i.e. `n / 8` groups of `bits_i` bytes holding 8 residues
//! each, and every residue must be below its prime. The tests below (and the fuzz target
//! `input_validator`) hold this reader to `from_bytes` on valid and mutated inputs.
//!
//! Depends only on `beaa_ckks` and std, so that `fuzz/` can include it as a module.

use beaa_ckks::serialize::{HEADER_LEN, MAGIC, VERSION};
use beaa_ckks::Params;

/// Why an input was refused, in the categories of `beaa_ckks::Error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Invalid {
    /// The header names another parameter set.
    ParamsMismatch,
    Malformed(String),
}

const KIND_CIPHERTEXT: u8 = 1;
const FLAG_SEEDED: u8 = 1;
/// Header, level, degree, scale.
const PREFIX_LEN: usize = HEADER_LEN + 10;
const SEED_LEN: usize = 32;

/// One prime's row of `c0`.
#[derive(Clone, Copy, Debug)]
struct Row {
    bytes: usize,
    bits: u32,
    q: u64,
}

/// Feeds on the body in pieces of any size; `finish` gives the verdict.
pub struct InputValidator {
    prefix: [u8; PREFIX_LEN],
    fingerprint: [u8; 32],
    rows: Vec<Row>,
    total: usize,
    /// Bytes seen so far.
    pos: usize,
    /// The current row and how much of it has been checked.
    row: usize,
    row_done: usize,
    /// A group of residues split across pieces.
    carry: [u8; 64],
    carry_len: usize,
    error: Option<Invalid>,
}

impl InputValidator {
    pub fn new(params: &Params) -> Self {
        let level = params.max_level();
        let mut prefix = [0u8; PREFIX_LEN];
        prefix[..4].copy_from_slice(&MAGIC);
        prefix[4..8].copy_from_slice(&[VERSION, KIND_CIPHERTEXT, FLAG_SEEDED, 0]);
        prefix[8..HEADER_LEN].copy_from_slice(params.fingerprint());
        prefix[HEADER_LEN] = level as u8;
        prefix[HEADER_LEN + 1] = 1;
        prefix[HEADER_LEN + 2..].copy_from_slice(&params.default_scale().to_le_bytes());
        let n = params.n();
        let rows: Vec<Row> = params
            .q_basis(level)
            .iter()
            .map(|&i| {
                let m = params.ring().modulus(i);
                Row {
                    bytes: n * m.bits() as usize / 8,
                    bits: m.bits(),
                    q: m.value(),
                }
            })
            .collect();
        let total = PREFIX_LEN + SEED_LEN + rows.iter().map(|r| r.bytes).sum::<usize>();
        InputValidator {
            prefix,
            fingerprint: *params.fingerprint(),
            rows,
            total,
            pos: 0,
            row: 0,
            row_done: 0,
            carry: [0; 64],
            carry_len: 0,
            error: None,
        }
    }

    /// The exact length of a valid input.
    pub fn len(&self) -> usize {
        self.total
    }

    fn fail(&mut self, e: Invalid) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }

    /// The prefix, checked in the order of `from_bytes` so that the error category matches:
    /// magic, version, kind and reserved byte, then the fingerprint, then the rest.
    fn check_prefix(&mut self, got: &[u8; PREFIX_LEN]) {
        let want = self.prefix;
        if got[..6] != want[..6] || got[7] != 0 {
            return self.fail(Invalid::Malformed("not a BEAA ciphertext".into()));
        }
        if got[8..HEADER_LEN] != self.fingerprint {
            return self.fail(Invalid::ParamsMismatch);
        }
        if got[6] != want[6] || got[HEADER_LEN..HEADER_LEN + 2] != want[HEADER_LEN..HEADER_LEN + 2]
        {
            return self.fail(Invalid::Malformed(
                "inputs are fresh seeded ciphertexts at the top level".into(),
            ));
        }
        if got[HEADER_LEN + 2..] != want[HEADER_LEN + 2..] {
            self.fail(Invalid::Malformed("inputs are at the default scale".into()));
        }
    }

    pub fn feed(&mut self, mut data: &[u8]) {
        if self.error.is_some() {
            self.pos += data.len();
            return;
        }
        // Header: gathered in `carry` until complete.
        if self.pos < PREFIX_LEN {
            let take = data.len().min(PREFIX_LEN - self.pos);
            self.carry[self.pos..self.pos + take].copy_from_slice(&data[..take]);
            self.pos += take;
            data = &data[take..];
            if self.pos < PREFIX_LEN {
                return;
            }
            let got: [u8; PREFIX_LEN] = self.carry[..PREFIX_LEN].try_into().expect("prefix");
            self.check_prefix(&got);
            if self.error.is_some() {
                self.pos += data.len();
                return;
            }
        }
        // Seed.
        if self.pos < PREFIX_LEN + SEED_LEN {
            let take = data.len().min(PREFIX_LEN + SEED_LEN - self.pos);
            self.pos += take;
            data = &data[take..];
        }
        // Rows.
        while !data.is_empty() {
            let Some(&row) = self.rows.get(self.row) else {
                // Longer than an input: the caller's exact length check reports it.
                self.pos += data.len();
                self.fail(Invalid::Malformed("ciphertext longer than expected".into()));
                return;
            };
            let group = row.bits as usize;
            let take = data.len().min(row.bytes - self.row_done);
            let (mut piece, rest) = data.split_at(take);
            data = rest;
            self.pos += take;
            self.row_done += take;
            let mut bad = false;
            if self.carry_len > 0 {
                let fill = piece.len().min(group - self.carry_len);
                self.carry[self.carry_len..self.carry_len + fill].copy_from_slice(&piece[..fill]);
                self.carry_len += fill;
                piece = &piece[fill..];
                if self.carry_len == group {
                    bad |= !groups_below(&self.carry[..group], row.bits, row.q);
                    self.carry_len = 0;
                }
            }
            let whole = piece.len() / group * group;
            bad |= !groups_below(&piece[..whole], row.bits, row.q);
            // Non-empty only when `carry` is empty (an incomplete carry took the whole piece).
            let tail = &piece[whole..];
            if !tail.is_empty() {
                self.carry[..tail.len()].copy_from_slice(tail);
                self.carry_len = tail.len();
            }
            if bad {
                let q = row.q;
                self.fail(Invalid::Malformed(format!(
                    "a residue is not below its prime {q}"
                )));
                self.pos += data.len();
                return;
            }
            if self.row_done == row.bytes {
                self.row += 1;
                self.row_done = 0;
            }
        }
    }

    /// The verdict once the whole body has been fed.
    pub fn finish(self) -> Result<(), Invalid> {
        if let Some(e) = self.error {
            return Err(e);
        }
        if self.pos != self.total {
            return Err(Invalid::Malformed(format!(
                "ciphertext is {} bytes, expected {}",
                self.pos, self.total
            )));
        }
        Ok(())
    }

    /// The verdict on a whole input at once (tests and `fuzz/`).
    #[allow(dead_code)]
    pub fn check(params: &Params, bytes: &[u8]) -> Result<(), Invalid> {
        let mut v = Self::new(params);
        v.feed(bytes);
        v.finish()
    }
}

// `groups_below` reads each residue with one 8-byte load.
const _: () = assert!(beaa_ckks::arith::MAX_MODULUS_BITS <= 56);

/// True when every residue packed in `bytes` (whole groups of `bits` bytes, 8 residues of
/// `bits` bits each, little-endian) is below `q`.
fn groups_below(bytes: &[u8], bits: u32, q: u64) -> bool {
    debug_assert!((1..=64).contains(&bits) && bytes.len().is_multiple_of(bits as usize));
    let group = bits as usize;
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let mut bad = 0u64;
    let mut pad = [0u8; 64 + 16];
    for start in (0..bytes.len()).step_by(group) {
        // The last groups of the slice are copied out so that the loads stay inside.
        let src: &[u8] = if start + group + 16 <= bytes.len() {
            &bytes[start..start + group + 16]
        } else {
            pad[..group].copy_from_slice(&bytes[start..start + group]);
            &pad[..group + 16]
        };
        for j in 0..8 {
            // A residue plus its offset in its first byte fits one 8-byte load (bits <= 56).
            let bit = j * group;
            let at = bit / 8;
            let word = u64::from_le_bytes(src[at..at + 8].try_into().expect("8 bytes"));
            bad |= ((word >> (bit % 8) & mask) >= q) as u64;
        }
    }
    bad == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use beaa_ckks::{Ciphertext, Encryptor, KeyGenerator, ParamSpec};

    fn params() -> Params {
        Params::insecure_for_tests(ParamSpec::chain(11, 3, 40, 2)).unwrap()
    }

    /// `from_bytes` plus the input checks of the server, as a category.
    fn reference(params: &Params, bytes: &[u8]) -> Result<(), Invalid> {
        match Ciphertext::from_bytes(params, bytes) {
            Err(beaa_ckks::Error::ParamsMismatch) => Err(Invalid::ParamsMismatch),
            Err(e) => Err(Invalid::Malformed(e.to_string())),
            Ok(ct) => {
                if ct.level() != params.max_level()
                    || ct.degree() != 1
                    || !ct.is_seeded()
                    || ct.scale() != params.default_scale()
                {
                    Err(Invalid::Malformed("not an input".into()))
                } else {
                    Ok(())
                }
            }
        }
    }

    fn same_category(a: &Result<(), Invalid>, b: &Result<(), Invalid>) -> bool {
        matches!(
            (a, b),
            (Ok(()), Ok(()))
                | (Err(Invalid::ParamsMismatch), Err(Invalid::ParamsMismatch))
                | (Err(Invalid::Malformed(_)), Err(Invalid::Malformed(_)))
        )
    }

    fn rand(x: &mut u64) -> u64 {
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x
    }

    /// Feeds `bytes` in random pieces.
    fn streamed(params: &Params, bytes: &[u8], x: &mut u64) -> Result<(), Invalid> {
        let mut v = InputValidator::new(params);
        let mut rest = bytes;
        while !rest.is_empty() {
            let take = match rand(x) % 4 {
                0 => 1,
                1 => (rand(x) % 97) as usize,
                _ => (rand(x) % 70_000) as usize,
            }
            .min(rest.len());
            v.feed(&rest[..take]);
            rest = &rest[take..];
        }
        v.finish()
    }

    fn fresh(params: &Params) -> Vec<u8> {
        let mut kg = KeyGenerator::new(params);
        let sk = kg.secret_key();
        let values: Vec<f64> = (0..params.slots()).map(|i| (i % 7) as f64 - 3.0).collect();
        Encryptor::new(params)
            .encrypt_values_sk(&sk, &values, params.default_scale(), params.max_level())
            .unwrap()
            .to_bytes()
    }

    #[test]
    fn valid_inputs_pass_in_any_pieces() {
        let p = params();
        let ct = fresh(&p);
        assert_eq!(InputValidator::new(&p).len(), ct.len());
        assert_eq!(InputValidator::check(&p, &ct), Ok(()));
        let mut x = 7;
        for _ in 0..50 {
            assert_eq!(streamed(&p, &ct, &mut x), Ok(()));
        }
    }

    /// The same verdict as `from_bytes` + the input checks on mutated inputs of the right
    /// length (the server checks the length before reading a byte).
    #[test]
    fn agrees_with_from_bytes_on_mutations() {
        let p = params();
        let ct = fresh(&p);
        let other = Params::insecure_for_tests(ParamSpec::chain(11, 3, 40, 3)).unwrap();
        let (mut pass, mut mismatch, mut malformed) = (0, 0, 0);
        let mut x = 0x1234_5678_9abc_def1u64;
        for i in 0..4000 {
            let mut m = ct.clone();
            match i % 8 {
                // Flip bits anywhere, most often in the prefix.
                0 | 1 => {
                    let at = if i % 2 == 0 {
                        (rand(&mut x) % 90) as usize
                    } else {
                        (rand(&mut x) as usize) % m.len()
                    };
                    m[at] ^= 1 << (rand(&mut x) % 8);
                }
                // Set high bits of a residue (often to a value >= q).
                2 | 3 => {
                    let at = 82 + (rand(&mut x) as usize) % (m.len() - 82);
                    m[at] |= 0xf0 | rand(&mut x) as u8;
                }
                // A random byte in the body.
                4 => {
                    let at = 82 + (rand(&mut x) as usize) % (m.len() - 82);
                    m[at] = rand(&mut x) as u8;
                }
                // Random bytes behind a correct prefix, or entirely random.
                5 => {
                    for b in &mut m[82..] {
                        *b = rand(&mut x) as u8;
                    }
                }
                6 => {
                    for b in &mut m {
                        *b = rand(&mut x) as u8;
                    }
                }
                // Another parameter set's fingerprint, another scale or level.
                _ => match rand(&mut x) % 4 {
                    0 => m[8..40].copy_from_slice(other.fingerprint()),
                    1 => m[42..50].copy_from_slice(&(p.default_scale() * 2.0).to_le_bytes()),
                    2 => m[40] = 0,
                    _ => {
                        // Unseeded, or degree 2.
                        m[6] = 0;
                        m[41] = 1 + (rand(&mut x) % 2) as u8;
                    }
                },
            }
            let want = reference(&p, &m);
            let got = streamed(&p, &m, &mut x);
            assert!(
                same_category(&want, &got),
                "mutation {i}: from_bytes {want:?}, validator {got:?}"
            );
            match want {
                Ok(()) => pass += 1,
                Err(Invalid::ParamsMismatch) => mismatch += 1,
                Err(Invalid::Malformed(_)) => malformed += 1,
            }
        }
        // The mutations exercise every verdict.
        assert!(
            pass > 100 && mismatch > 50 && malformed > 500,
            "{pass} {mismatch} {malformed}"
        );
    }

    #[test]
    fn residue_equal_to_its_prime_is_refused() {
        let p = params();
        let mut ct = fresh(&p);
        // The first residue of the first row is `q` itself.
        let m = p.ring().modulus(p.q_basis(p.max_level())[0]);
        let bits = m.bits() as usize;
        let mut acc = u128::from_le_bytes(ct[82..98].try_into().unwrap());
        acc &= !((1u128 << bits) - 1);
        acc |= m.value() as u128;
        ct[82..98].copy_from_slice(&acc.to_le_bytes());
        assert!(reference(&p, &ct).is_err());
        assert!(matches!(
            InputValidator::check(&p, &ct),
            Err(Invalid::Malformed(_))
        ));
        // And `q - 1` is fine.
        acc &= !((1u128 << bits) - 1);
        acc |= m.value() as u128 - 1;
        ct[82..98].copy_from_slice(&acc.to_le_bytes());
        assert_eq!(reference(&p, &ct), Ok(()));
        assert_eq!(InputValidator::check(&p, &ct), Ok(()));
    }

    #[test]
    fn wrong_lengths_are_refused() {
        let p = params();
        let ct = fresh(&p);
        assert!(InputValidator::check(&p, &ct[..ct.len() - 1]).is_err());
        assert!(InputValidator::check(&p, &ct[..10]).is_err());
        assert!(InputValidator::check(&p, b"").is_err());
        let mut longer = ct.clone();
        longer.push(0);
        assert!(InputValidator::check(&p, &longer).is_err());
    }
}
