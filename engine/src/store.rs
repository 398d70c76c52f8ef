//! Where stored tiles live between stages: memory (tests, small models) or files in a job's
//! work directory (production: a full CIFAR-10 batch has tens of GB of intermediate
//! ciphertexts). Files double as checkpoints: a finished tile is on disk, so a restarted
//! job skips it.

use crate::exec::ExecError;
use beaa_ckks::{Ciphertext, Params};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Tiles between stages. A tile is *done* once put, and stays done after it is consumed: its
/// ciphertexts are freed but the store remembers it was computed, so a restarted job does not
/// recompute a layer whose readers have already used it up.
pub trait Store: Sync {
    fn put(&self, layer: u32, tile: u32, values: &[Ciphertext]) -> Result<(), ExecError>;
    /// The values of a done tile that has not been consumed.
    fn get(&self, layer: u32, tile: u32) -> Result<Vec<Ciphertext>, ExecError>;
    /// Whether the tile was computed (held or already consumed).
    fn is_done(&self, layer: u32, tile: u32) -> bool;
    /// Frees a tile no one will read again; it stays done.
    fn consume(&self, layer: u32, tile: u32);
    /// Bytes of ciphertext held (what a job needs on disk or in memory right now).
    fn bytes_held(&self) -> u64;
}

/// A tile's ciphertexts; `None` once consumed.
type Held = Option<Vec<Ciphertext>>;

/// Tiles in memory.
#[derive(Default)]
pub struct MemStore(Mutex<HashMap<(u32, u32), Held>>);

impl Store for MemStore {
    fn put(&self, layer: u32, tile: u32, values: &[Ciphertext]) -> Result<(), ExecError> {
        self.0
            .lock()
            .expect("store lock")
            .insert((layer, tile), Some(values.to_vec()));
        Ok(())
    }
    fn get(&self, layer: u32, tile: u32) -> Result<Vec<Ciphertext>, ExecError> {
        match self.0.lock().expect("store lock").get(&(layer, tile)) {
            Some(Some(values)) => Ok(values.clone()),
            Some(None) => Err(ExecError::Model(format!(
                "tile {tile} of layer {layer} was read after its last reader"
            ))),
            None => Err(ExecError::Model(format!(
                "tile {tile} of layer {layer} is missing"
            ))),
        }
    }
    fn is_done(&self, layer: u32, tile: u32) -> bool {
        self.0
            .lock()
            .expect("store lock")
            .contains_key(&(layer, tile))
    }
    fn consume(&self, layer: u32, tile: u32) {
        if let Some(slot) = self.0.lock().expect("store lock").get_mut(&(layer, tile)) {
            *slot = None;
        }
    }
    fn bytes_held(&self) -> u64 {
        self.0
            .lock()
            .expect("store lock")
            .values()
            .flatten()
            .flatten()
            .map(|ct| ct.serialized_len() as u64)
            .sum()
    }
}

/// The file in a work directory naming the plan its tiles belong to
/// ([`crate::job::work_dir_identity`]).
const IDENTITY_FILE: &str = "plan-identity";

/// The identity of the plan whose tiles `dir` holds, if it holds any stamp; a server compares
/// it with its own plan's to say why a resumed job starts over.
pub fn work_dir_stamp(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join(IDENTITY_FILE)).ok()
}

/// Tiles as files `L<layer>/<tile>.tile` under a directory: a u32 count, then per ciphertext
/// a u64 length and its `beaa-ckks` bytes (bit-packed, fingerprinted, validated on read).
/// Written to a temporary name and renamed, so a tile file is complete or absent. A consumed
/// tile leaves an empty `<tile>.done` marker behind (written before the tile is deleted).
pub struct DirStore {
    dir: PathBuf,
    params: Params,
    /// Bytes of the tile files written or found and not yet consumed.
    held: std::sync::atomic::AtomicU64,
}

impl DirStore {
    /// Opens `dir` for a job whose value graph has the given identity; tiles of a different
    /// plan (another model or parameter set) are discarded.
    pub fn open(dir: &Path, params: &Params, identity: &str) -> Result<Self, ExecError> {
        let io = |e: std::io::Error| ExecError::Io(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        let same = work_dir_stamp(dir).is_some_and(|s| s == identity);
        if !same {
            for entry in std::fs::read_dir(dir).map_err(io)? {
                let path = entry.map_err(io)?.path();
                if path.is_dir() {
                    std::fs::remove_dir_all(&path).map_err(io)?;
                }
            }
            std::fs::write(dir.join(IDENTITY_FILE), identity).map_err(io)?;
        }
        let held = tile_bytes(dir).map_err(io)?;
        Ok(DirStore {
            dir: dir.to_path_buf(),
            params: params.clone(),
            held: held.into(),
        })
    }

    fn path(&self, layer: u32, tile: u32) -> PathBuf {
        self.dir
            .join(format!("L{layer:03}"))
            .join(format!("{tile:06}.tile"))
    }
}

/// Total size of the `.tile` files one level below `dir`.
fn tile_bytes(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            for file in std::fs::read_dir(&path)? {
                let file = file?;
                if file.path().extension().is_some_and(|x| x == "tile") {
                    total += file.metadata()?.len();
                }
            }
        }
    }
    Ok(total)
}

impl Store for DirStore {
    fn put(&self, layer: u32, tile: u32, values: &[Ciphertext]) -> Result<(), ExecError> {
        let path = self.path(layer, tile);
        let io = |e: std::io::Error| ExecError::Io(format!("{}: {e}", path.display()));
        std::fs::create_dir_all(path.parent().expect("tile path has a parent")).map_err(io)?;
        let tmp = path.with_extension("tmp");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        let mut written = 4u64;
        f.write_all(&(values.len() as u32).to_le_bytes())
            .map_err(io)?;
        for ct in values {
            let bytes = ct.to_bytes();
            f.write_all(&(bytes.len() as u64).to_le_bytes())
                .map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
            written += 8 + bytes.len() as u64;
        }
        f.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_data()
            .map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)?;
        self.held
            .fetch_add(written, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// Reads the tile one ciphertext at a time into one reused buffer: a whole tile (up to
    /// ~360 MB at full width) read at once was an allocation that glibc maps and unmaps per
    /// read in a worker thread's arena, every page faulting again.
    fn get(&self, layer: u32, tile: u32) -> Result<Vec<Ciphertext>, ExecError> {
        let path = self.path(layer, tile);
        let bad = |what: &str| ExecError::Io(format!("{}: {what}", path.display()));
        let file = std::fs::File::open(&path).map_err(|e| bad(&e.to_string()))?;
        let mut left = file.metadata().map_err(|e| bad(&e.to_string()))?.len();
        let mut file = std::io::BufReader::with_capacity(1 << 16, file);
        // Every length is checked against the bytes the file still has before anything is
        // allocated for it.
        let mut read = |buf: &mut Vec<u8>, n: u64| -> Result<(), ExecError> {
            if n > left {
                return Err(bad("truncated tile file"));
            }
            left -= n;
            buf.resize(n as usize, 0);
            file.read_exact(buf).map_err(|e| bad(&e.to_string()))
        };
        let mut buf = Vec::new();
        read(&mut buf, 4)?;
        let count = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
        let mut out = Vec::with_capacity(count.min(4096));
        for _ in 0..count {
            read(&mut buf, 8)?;
            let len = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
            read(&mut buf, len)?;
            out.push(Ciphertext::from_bytes(&self.params, &buf).map_err(|e| bad(&e.to_string()))?);
        }
        if left != 0 {
            return Err(bad("tile file longer than its ciphertexts"));
        }
        Ok(out)
    }

    fn is_done(&self, layer: u32, tile: u32) -> bool {
        let path = self.path(layer, tile);
        path.is_file() || path.with_extension("done").is_file()
    }

    fn consume(&self, layer: u32, tile: u32) {
        let path = self.path(layer, tile);
        if !path.is_file() {
            return; // consumed before (a resumed job passes its readers again)
        }
        // The marker first: a crash in between leaves both, never neither.
        if std::fs::write(path.with_extension("done"), b"").is_err() {
            return; // keep the tile: recomputing it later would be worse than the space
        }
        if let Ok(meta) = std::fs::metadata(&path) {
            if std::fs::remove_file(&path).is_ok() {
                self.held
                    .fetch_sub(meta.len(), std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    fn bytes_held(&self) -> u64 {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use beaa_ckks::{Encryptor, KeyGenerator, ParamSpec};

    fn tile(params: &Params, n: usize) -> Vec<Ciphertext> {
        let sk = KeyGenerator::new(params).secret_key();
        let mut enc = Encryptor::new(params);
        (0..n)
            .map(|k| {
                let v = vec![k as f64 * 0.25; 4];
                enc.encrypt_values_sk(&sk, &v, params.default_scale(), params.max_level())
                    .unwrap()
            })
            .collect()
    }

    #[test]
    fn tile_files_round_trip_and_damaged_ones_are_refused() {
        let params = Params::insecure_for_tests(ParamSpec::chain(10, 3, 40, 2)).unwrap();
        let dir = std::env::temp_dir().join(format!("beaa-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = DirStore::open(&dir, &params, "test plan").unwrap();
        let cts = tile(&params, 3);
        store.put(1, 7, &cts).unwrap();
        let back = store.get(1, 7).unwrap();
        assert_eq!(back.len(), 3);
        for (a, b) in cts.iter().zip(&back) {
            assert_eq!(a.to_bytes(), b.to_bytes());
        }
        let path = store.path(1, 7);
        let bytes = std::fs::read(&path).unwrap();
        let refuse = |b: &[u8], why: &str| {
            std::fs::write(&path, b).unwrap();
            let e = store.get(1, 7).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        };
        refuse(&bytes[..bytes.len() - 1], "truncated");
        refuse(&[&bytes[..], &[0u8]].concat(), "longer than");
        // A length field claiming far more than the file holds: refused, nothing allocated.
        let mut huge = bytes.clone();
        huge[4..12].copy_from_slice(&u64::MAX.to_le_bytes());
        refuse(&huge, "truncated");
        // The first ciphertext's header (its magic) damaged: refused by the ciphertext reader.
        let mut flipped = bytes.clone();
        flipped[12] ^= 0x40;
        std::fs::write(&path, &flipped).unwrap();
        assert!(store.get(1, 7).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
