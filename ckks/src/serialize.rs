//! The byte format shared by the browser, the native client and the server.
//!
//! ```text
//! header  "BEAA" | version u8 | kind u8 | flags u8 | reserved u8 | params fingerprint [32]
//! body    per kind (little-endian), residues bit-packed at each prime's bit size
//! ```
//! Every length is derived from the parameter set the reader already trusts, never from the
//! input, so a reader allocates nothing before the input length has been checked exactly.
//! Readers verify the version, kind, fingerprint, level, degree, scale and that every
//! residue is below its prime.

use crate::error::{Error, Result};
use crate::ring::RnsPoly;
use crate::sampling::{seeded_rng, uniform_poly};
use crate::scheme::{Ciphertext, KeySwitchingKey, Params, PublicKey, RelinKey, SecretKey};

pub const MAGIC: [u8; 4] = *b"BEAA";
pub const VERSION: u8 = 1;
pub const HEADER_LEN: usize = 40;

/// What a byte string holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Ciphertext = 1,
    PublicKey = 2,
    RelinKey = 3,
    GaloisKey = 4,
    /// Written only to the user's own disk or browser storage; the server never accepts it.
    SecretKey = 5,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Self::Ciphertext,
            2 => Self::PublicKey,
            3 => Self::RelinKey,
            4 => Self::GaloisKey,
            5 => Self::SecretKey,
            _ => return None,
        })
    }
}

/// Reads the kind of a serialized object without trusting anything else in it.
pub fn peek_kind(bytes: &[u8]) -> Result<Kind> {
    if bytes.len() < HEADER_LEN || bytes[..4] != MAGIC {
        return Err(Error::Malformed("not a BEAA object".into()));
    }
    if bytes[4] != VERSION {
        return Err(Error::Malformed(format!(
            "unsupported version {}",
            bytes[4]
        )));
    }
    Kind::from_u8(bytes[5]).ok_or_else(|| Error::Malformed(format!("unknown kind {}", bytes[5])))
}

fn header(out: &mut Vec<u8>, kind: Kind, flags: u8, params: &Params) {
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&[VERSION, kind as u8, flags, 0]);
    out.extend_from_slice(params.fingerprint());
}

/// Checks the header and returns the flags.
fn check_header(bytes: &[u8], kind: Kind, params: &Params) -> Result<u8> {
    let got = peek_kind(bytes)?;
    if got != kind {
        return Err(Error::Malformed(format!(
            "expected {kind:?}, found {got:?}"
        )));
    }
    if bytes[7] != 0 {
        return Err(Error::Malformed("reserved byte is not zero".into()));
    }
    if bytes[8..HEADER_LEN] != params.fingerprint()[..] {
        return Err(Error::ParamsMismatch);
    }
    Ok(bytes[6])
}

/// Bytes of one packed polynomial on the given primes.
fn packed_len(params: &Params, basis: &[usize]) -> usize {
    let n = params.n();
    basis
        .iter()
        .map(|&i| n * params.ring().modulus(i).bits() as usize / 8)
        .sum()
}

fn pack(out: &mut Vec<u8>, params: &Params, poly: &RnsPoly, basis: &[usize]) {
    for (row, &i) in poly.rows().zip(basis) {
        let bits = params.ring().modulus(i).bits();
        let mut acc: u128 = 0;
        let mut fill = 0u32;
        for &x in row {
            acc |= (x as u128) << fill;
            fill += bits;
            while fill >= 64 {
                out.extend_from_slice(&(acc as u64).to_le_bytes());
                acc >>= 64;
                fill -= 64;
            }
        }
        // n * bits is a multiple of 8 (n >= 16 is a power of two).
        out.extend_from_slice(&acc.to_le_bytes()[..(fill / 8) as usize]);
    }
}

// `unpack` reads a residue with one 8-byte load shifted by up to 7 bits.
const _: () = assert!(crate::arith::MAX_MODULUS_BITS <= 57);

/// Unpacks one polynomial, rejecting residues not below their prime.
fn unpack(bytes: &[u8], params: &Params, basis: &[usize]) -> Result<RnsPoly> {
    let n = params.n();
    let mut poly = RnsPoly::for_overwrite(n, basis.len());
    let mut pos = 0usize;
    for (row, &i) in poly.rows_mut().zip(basis) {
        let m = params.ring().modulus(i);
        let bits = m.bits();
        let mask = (1u64 << bits) - 1;
        let row_bytes = n * bits as usize / 8;
        let src = &bytes[pos..pos + row_bytes];
        pos += row_bytes;
        // Residue k starts at bit k * bits: one unaligned 8-byte load, shifted and masked,
        // holds all of it (bits <= 50 < 57). The last few, within 8 bytes of the end, are
        // loaded zero-padded. (A byte-at-a-time loop cost ~10% of a job.)
        for (k, x) in row.iter_mut().enumerate() {
            let bit = k * bits as usize;
            let (at, shift) = (bit / 8, bit % 8);
            let word = match src.get(at..at + 8) {
                Some(w) => u64::from_le_bytes(w.try_into().expect("8 bytes")),
                None => {
                    let mut w = [0u8; 8];
                    let tail = &src[at.min(src.len())..];
                    w[..tail.len()].copy_from_slice(tail);
                    u64::from_le_bytes(w)
                }
            };
            let v = (word >> shift) & mask;
            if v >= m.value() {
                return Err(Error::Malformed(format!(
                    "residue {v} not below its prime {}",
                    m.value()
                )));
            }
            *x = v;
        }
    }
    Ok(poly)
}

fn expand_seed(params: &Params, seed: &[u8; 32], basis: &[usize]) -> RnsPoly {
    let mut a = RnsPoly::zero(params.n(), basis.len());
    let moduli: Vec<_> = basis.iter().map(|&i| params.ring().modulus(i)).collect();
    uniform_poly(&mut seeded_rng(seed), &moduli, &mut a);
    a
}

const FLAG_SEEDED: u8 = 1;

/// Serialized size of a ciphertext with `degree + 1` polynomials at `level` (a seeded one
/// ships only `c0` and the seed): what a server expects before it reads a byte.
pub fn ciphertext_len(params: &Params, level: usize, degree: usize, seeded: bool) -> usize {
    let packed = packed_len(params, &params.q_basis(level.min(params.max_level())));
    let polys = if seeded { 1 } else { degree + 1 };
    HEADER_LEN + 10 + if seeded { 32 } else { 0 } + polys * packed
}

impl Ciphertext {
    /// Serialized size in bytes.
    pub fn serialized_len(&self) -> usize {
        let packed = packed_len(&self.params, &self.params.q_basis(self.level));
        let polys = if self.seed.is_some() {
            1
        } else {
            self.polys.len()
        };
        HEADER_LEN + 10 + if self.seed.is_some() { 32 } else { 0 } + polys * packed
    }

    /// A fresh secret-key ciphertext ships `c_0` and the 32-byte seed of `c_1`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.serialized_len());
        let flags = if self.seed.is_some() { FLAG_SEEDED } else { 0 };
        header(&mut out, Kind::Ciphertext, flags, &self.params);
        out.push(self.level as u8);
        out.push((self.polys.len() - 1) as u8);
        out.extend_from_slice(&self.scale.to_le_bytes());
        let basis = self.params.q_basis(self.level);
        match &self.seed {
            Some(seed) => {
                out.extend_from_slice(seed);
                pack(&mut out, &self.params, &self.polys[0], &basis);
            }
            None => {
                for p in &self.polys {
                    pack(&mut out, &self.params, p, &basis);
                }
            }
        }
        debug_assert_eq!(out.len(), self.serialized_len());
        out
    }

    pub fn from_bytes(params: &Params, bytes: &[u8]) -> Result<Self> {
        let flags = check_header(bytes, Kind::Ciphertext, params)?;
        if flags & !FLAG_SEEDED != 0 {
            return Err(Error::Malformed(format!("unknown flags {flags:#x}")));
        }
        let seeded = flags & FLAG_SEEDED != 0;
        let body = &bytes[HEADER_LEN..];
        if body.len() < 10 {
            return Err(Error::Malformed("truncated ciphertext header".into()));
        }
        let level = body[0] as usize;
        let degree = body[1] as usize;
        if level > params.max_level() {
            return Err(Error::Malformed(format!(
                "level {level} above the maximum {}",
                params.max_level()
            )));
        }
        if !(1..=2).contains(&degree) || (seeded && degree != 1) {
            return Err(Error::Malformed(format!("bad degree {degree}")));
        }
        let scale = f64::from_le_bytes(body[2..10].try_into().expect("8 bytes"));
        let max_scale = (params.log_q_at(level) + 1.0).exp2();
        if !(scale.is_normal() && scale > 0.0 && scale <= max_scale) {
            return Err(Error::Malformed(format!("bad scale {scale}")));
        }
        let basis = params.q_basis(level);
        let packed = packed_len(params, &basis);
        let stored = if seeded { 1 } else { degree + 1 };
        let expected = 10 + if seeded { 32 } else { 0 } + stored * packed;
        if body.len() != expected {
            return Err(Error::Malformed(format!(
                "ciphertext body is {} bytes, expected {expected}",
                body.len()
            )));
        }
        let mut rest = &body[10..];
        let mut seed = None;
        if seeded {
            seed = Some(<[u8; 32]>::try_from(&rest[..32]).expect("32 bytes"));
            rest = &rest[32..];
        }
        let mut polys = Vec::with_capacity(degree + 1);
        for k in 0..stored {
            polys.push(unpack(&rest[k * packed..(k + 1) * packed], params, &basis)?);
        }
        if let Some(s) = &seed {
            polys.push(expand_seed(params, s, &basis));
        }
        Ok(Ciphertext {
            params: params.clone(),
            polys,
            level,
            scale,
            seed,
        })
    }
}

impl PublicKey {
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        header(&mut out, Kind::PublicKey, 0, &self.params);
        out.extend_from_slice(&self.seed);
        pack(
            &mut out,
            &self.params,
            &self.b,
            &self.params.q_basis(self.params.max_level()),
        );
        out
    }

    pub fn from_bytes(params: &Params, bytes: &[u8]) -> Result<Self> {
        if check_header(bytes, Kind::PublicKey, params)? != 0 {
            return Err(Error::Malformed("unknown flags".into()));
        }
        let basis = params.q_basis(params.max_level());
        let body = &bytes[HEADER_LEN..];
        if body.len() != 32 + packed_len(params, &basis) {
            return Err(Error::Malformed("public key has the wrong length".into()));
        }
        let seed: [u8; 32] = body[..32].try_into().expect("32 bytes");
        let b = unpack(&body[32..], params, &basis)?;
        Ok(PublicKey {
            params: params.clone(),
            a: expand_seed(params, &seed, &basis),
            seed,
            b,
        })
    }
}

impl KeySwitchingKey {
    fn write_body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seed);
        let basis = self.params.key_basis();
        for b in &self.b {
            pack(out, &self.params, b, &basis);
        }
    }

    fn body_len(params: &Params) -> usize {
        32 + params.digits(params.max_level()) * packed_len(params, &params.key_basis())
    }

    fn read_body(params: &Params, body: &[u8]) -> Result<Self> {
        if body.len() != Self::body_len(params) {
            return Err(Error::Malformed(format!(
                "key-switching key body is {} bytes, expected {}",
                body.len(),
                Self::body_len(params)
            )));
        }
        let basis = params.key_basis();
        let packed = packed_len(params, &basis);
        let seed: [u8; 32] = body[..32].try_into().expect("32 bytes");
        let digits = params.digits(params.max_level());
        let mut rng = seeded_rng(&seed);
        let moduli: Vec<_> = basis.iter().map(|&i| params.ring().modulus(i)).collect();
        let (mut bs, mut as_) = (Vec::with_capacity(digits), Vec::with_capacity(digits));
        for j in 0..digits {
            bs.push(unpack(
                &body[32 + j * packed..32 + (j + 1) * packed],
                params,
                &basis,
            )?);
            let mut a = RnsPoly::zero(params.n(), basis.len());
            uniform_poly(&mut rng, &moduli, &mut a);
            as_.push(a);
        }
        Ok(KeySwitchingKey {
            params: params.clone(),
            seed,
            b: bs,
            a: as_,
        })
    }
}

impl RelinKey {
    /// Serialized size in bytes, known from the parameters alone.
    pub fn serialized_len(params: &Params) -> usize {
        HEADER_LEN + KeySwitchingKey::body_len(params)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::serialized_len(&self.0.params));
        header(&mut out, Kind::RelinKey, 0, &self.0.params);
        self.0.write_body(&mut out);
        out
    }

    pub fn from_bytes(params: &Params, bytes: &[u8]) -> Result<Self> {
        if check_header(bytes, Kind::RelinKey, params)? != 0 {
            return Err(Error::Malformed("unknown flags".into()));
        }
        Ok(RelinKey(KeySwitchingKey::read_body(
            params,
            &bytes[HEADER_LEN..],
        )?))
    }
}

/// One Galois key: the element, then the key-switching key.
pub fn galois_key_to_bytes(galois: u64, key: &KeySwitchingKey) -> Vec<u8> {
    let mut out = Vec::new();
    header(&mut out, Kind::GaloisKey, 0, &key.params);
    out.extend_from_slice(&galois.to_le_bytes());
    key.write_body(&mut out);
    out
}

pub fn galois_key_from_bytes(params: &Params, bytes: &[u8]) -> Result<(u64, KeySwitchingKey)> {
    if check_header(bytes, Kind::GaloisKey, params)? != 0 {
        return Err(Error::Malformed("unknown flags".into()));
    }
    let body = &bytes[HEADER_LEN..];
    if body.len() < 8 {
        return Err(Error::Malformed("truncated Galois key".into()));
    }
    let g = u64::from_le_bytes(body[..8].try_into().expect("8 bytes"));
    let two_n = 2 * params.n() as u64;
    if g % 2 == 0 || g >= two_n || g == 1 {
        return Err(Error::Malformed(format!("bad Galois element {g}")));
    }
    Ok((g, KeySwitchingKey::read_body(params, &body[8..])?))
}

impl SecretKey {
    /// For the key owner's own storage only (a 0600 file, the browser's IndexedDB). Two bits
    /// per coefficient. Nothing that talks to the server ever calls this.
    pub fn to_local_bytes(&self) -> zeroize::Zeroizing<Vec<u8>> {
        let mut out =
            zeroize::Zeroizing::new(Vec::with_capacity(HEADER_LEN + self.coeffs.len() / 4));
        header(&mut out, Kind::SecretKey, 0, &self.params);
        for chunk in self.coeffs.chunks(4) {
            let mut b = 0u8;
            for (k, &c) in chunk.iter().enumerate() {
                b |= ((c + 1) as u8) << (2 * k);
            }
            out.push(b);
        }
        out
    }

    pub fn from_local_bytes(params: &Params, bytes: &[u8]) -> Result<Self> {
        if check_header(bytes, Kind::SecretKey, params)? != 0 {
            return Err(Error::Malformed("unknown flags".into()));
        }
        let body = &bytes[HEADER_LEN..];
        if body.len() != params.n() / 4 {
            return Err(Error::Malformed("secret key has the wrong length".into()));
        }
        let mut coeffs = Vec::with_capacity(params.n());
        for &b in body {
            for k in 0..4 {
                let v = (b >> (2 * k)) & 3;
                if v == 3 {
                    return Err(Error::Malformed("secret coefficient out of range".into()));
                }
                coeffs.push(v as i64 - 1);
            }
        }
        Ok(SecretKey::from_coeffs(params, coeffs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arith::MAX_MODULUS_BITS;
    use crate::scheme::*;
    use proptest::prelude::*;
    use rand_chacha::ChaCha20Rng;
    use rand_core::SeedableRng;

    struct F {
        params: Params,
        sk: SecretKey,
        pk: PublicKey,
        rlk: RelinKey,
        fresh: Ciphertext,
        product: Ciphertext,
        enc: Encoder,
    }

    fn fixture() -> F {
        let params = Params::insecure_for_tests(ParamSpec::chain(10, 4, 36, 2)).unwrap();
        let mut kg = KeyGenerator::with_rng(&params, ChaCha20Rng::seed_from_u64(3));
        let sk = kg.secret_key();
        let pk = kg.public_key(&sk);
        let rlk = kg.relin_key(&sk);
        let enc = Encoder::new(&params);
        let pt = enc
            .encode(&[1.5, -2.25, 3.0], params.default_scale(), 3)
            .unwrap();
        let fresh = Encryptor::new(&params).encrypt_sk(&sk, &pt).unwrap();
        let ev = Evaluator::new(&params);
        let product = ev.mul(&fresh, &fresh).unwrap();
        F {
            params,
            sk,
            pk,
            rlk,
            fresh,
            product,
            enc,
        }
    }

    #[test]
    fn round_trips() {
        let f = fixture();
        let ev = Evaluator::new(&f.params);
        for ct in [&f.fresh, &f.product] {
            let bytes = ct.to_bytes();
            assert_eq!(bytes.len(), ct.serialized_len());
            let back = Ciphertext::from_bytes(&f.params, &bytes).unwrap();
            assert_eq!(back.polys(), ct.polys());
            assert_eq!(
                (back.level(), back.scale(), back.degree()),
                (ct.level(), ct.scale(), ct.degree())
            );
        }
        // Seeded: one polynomial plus the seed.
        let unseeded = ev.add(&f.fresh, &f.fresh).unwrap();
        assert!(f.fresh.to_bytes().len() * 2 - HEADER_LEN - 10 - 64 <= unseeded.to_bytes().len());
        assert!(!unseeded.is_seeded());

        let pk = PublicKey::from_bytes(&f.params, &f.pk.to_bytes()).unwrap();
        assert_eq!(pk.a, f.pk.a);
        assert_eq!(pk.b, f.pk.b);
        let bytes = f.rlk.to_bytes();
        assert_eq!(bytes.len(), RelinKey::serialized_len(&f.params));
        let rlk = RelinKey::from_bytes(&f.params, &bytes).unwrap();
        assert_eq!(rlk.0.a, f.rlk.0.a);
        assert_eq!(rlk.0.b, f.rlk.0.b);
        let sk = SecretKey::from_local_bytes(&f.params, &f.sk.to_local_bytes()).unwrap();
        assert_eq!(sk.coeffs, f.sk.coeffs);
        // A deserialized key decrypts what the original encrypted.
        let got = f.enc.decode(&decrypt(&sk, &f.fresh).unwrap());
        assert!((got[1] + 2.25).abs() < 1e-6);

        let mut kg = KeyGenerator::with_rng(&f.params, ChaCha20Rng::seed_from_u64(4));
        let gk = kg.galois_keys(&f.sk, &[1]);
        let g = gk.elements().next().unwrap();
        let (g2, key) =
            galois_key_from_bytes(&f.params, &galois_key_to_bytes(g, gk.get(g).unwrap())).unwrap();
        assert_eq!(g, g2);
        assert_eq!(key.b, gk.get(g).unwrap().b);
    }

    #[test]
    fn rejects_truncation_extension_and_wrong_params() {
        let f = fixture();
        let bytes = f.fresh.to_bytes();
        for len in [
            0,
            3,
            HEADER_LEN - 1,
            HEADER_LEN,
            HEADER_LEN + 9,
            bytes.len() - 1,
        ] {
            assert!(
                Ciphertext::from_bytes(&f.params, &bytes[..len]).is_err(),
                "len {len}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(Ciphertext::from_bytes(&f.params, &longer).is_err());
        let other = Params::insecure_for_tests(ParamSpec::chain(10, 4, 35, 2)).unwrap();
        assert_eq!(
            Ciphertext::from_bytes(&other, &bytes).unwrap_err(),
            Error::ParamsMismatch
        );
        assert!(RelinKey::from_bytes(&f.params, &bytes).is_err());
        assert!(RelinKey::from_bytes(&other, &f.rlk.to_bytes()).is_err());
        assert!(PublicKey::from_bytes(&f.params, &f.rlk.to_bytes()).is_err());
        assert!(SecretKey::from_local_bytes(&f.params, &bytes).is_err());
    }

    #[test]
    fn rejects_bad_fields() {
        let f = fixture();
        let bytes = f.fresh.to_bytes();
        let patch = |at: usize, v: u8| {
            let mut b = bytes.clone();
            b[at] = v;
            Ciphertext::from_bytes(&f.params, &b)
        };
        assert!(patch(0, b'X').is_err()); // magic
        assert!(patch(4, 2).is_err()); // version
        assert!(patch(5, 9).is_err()); // kind
        assert!(patch(6, 0x80).is_err()); // flags
        assert!(patch(7, 1).is_err()); // reserved
        assert!(patch(HEADER_LEN, 200).is_err()); // level
        assert!(patch(HEADER_LEN + 1, 2).is_err()); // degree 2 with a seed
        assert!(patch(HEADER_LEN + 1, 7).is_err()); // degree
                                                    // scale = NaN
        let mut b = bytes.clone();
        b[HEADER_LEN + 2..HEADER_LEN + 10].copy_from_slice(&f64::NAN.to_le_bytes());
        assert!(Ciphertext::from_bytes(&f.params, &b).is_err());
        // A residue >= q: set the first packed value's bits all to one.
        let mut b = bytes.clone();
        let start = HEADER_LEN + 10 + 32;
        for k in 0..7 {
            b[start + k] = 0xff;
        }
        assert!(matches!(
            Ciphertext::from_bytes(&f.params, &b),
            Err(Error::Malformed(_))
        ));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Any single bit flip is rejected or yields a ciphertext that still validates
        /// (flips inside residues or the seed are indistinguishable from another ciphertext).
        #[test]
        fn bit_flips_never_panic(pos in 0usize..1_000_000, bit in 0u8..8) {
            let f = fixture();
            let mut b = f.product.to_bytes();
            let pos = pos % b.len();
            b[pos] ^= 1 << bit;
            if let Ok(ct) = Ciphertext::from_bytes(&f.params, &b) {
                prop_assert!(pos >= HEADER_LEN + 2, "header flip at {pos} accepted: {ct:?}");
            }
        }

        /// Packing then unpacking returns every residue, for every prime size the
        /// parameters allow (the word-load unpacking reads across byte boundaries).
        #[test]
        fn packed_residues_round_trip(
            bits in proptest::collection::vec(17u32..=MAX_MODULUS_BITS, 1..4),
            seed in any::<u64>(),
        ) {
            let spec = ParamSpec { log_n: 5, q_bits: bits, p_bits: vec![MAX_MODULUS_BITS], log_scale: 17 };
            let params = Params::insecure_for_tests(spec).unwrap();
            let basis: Vec<usize> = (0..params.q().len()).collect();
            let mut poly = RnsPoly::zero(params.n(), basis.len());
            let mut x = seed | 1;
            for (row, &i) in poly.rows_mut().zip(&basis) {
                let q = params.ring().modulus(i).value();
                for (k, v) in row.iter_mut().enumerate() {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    // the extremes of the range too
                    *v = match k % 8 { 0 => 0, 1 => q - 1, _ => x % q };
                }
            }
            let mut out = Vec::new();
            pack(&mut out, &params, &poly, &basis);
            prop_assert_eq!(out.len(), packed_len(&params, &basis));
            let back = unpack(&out, &params, &basis).unwrap();
            prop_assert!(back.rows().zip(poly.rows()).all(|(a, b)| a == b));
        }

        #[test]
        fn random_bytes_are_rejected(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let f = fixture();
            prop_assert!(Ciphertext::from_bytes(&f.params, &bytes).is_err());
            prop_assert!(RelinKey::from_bytes(&f.params, &bytes).is_err());
            prop_assert!(PublicKey::from_bytes(&f.params, &bytes).is_err());
            prop_assert!(galois_key_from_bytes(&f.params, &bytes).is_err());
        }
    }
}
