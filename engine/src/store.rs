//! Where stored tiles live between stages: memory (tests, small models) or files in a job's
//! work directory (production: a full CIFAR-10 batch has tens of GB of intermediate
//! ciphertexts). Files double as checkpoints: a finished tile is on disk, so a restarted
//! job skips it.

use crate::exec::ExecError;
use beaa_ckks::{Ciphertext, Params};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

pub trait Store: Sync {
    fn put(&self, layer: u32, tile: u32, values: &[Ciphertext]) -> Result<(), ExecError>;
    fn get(&self, layer: u32, tile: u32) -> Result<Vec<Ciphertext>, ExecError>;
    fn has(&self, layer: u32, tile: u32) -> bool;
    fn remove(&self, layer: u32, tile: u32);
}

#[derive(Default)]
pub struct MemStore(Mutex<HashMap<(u32, u32), Vec<Ciphertext>>>);

impl Store for MemStore {
    fn put(&self, layer: u32, tile: u32, values: &[Ciphertext]) -> Result<(), ExecError> {
        self.0
            .lock()
            .expect("store lock")
            .insert((layer, tile), values.to_vec());
        Ok(())
    }
    fn get(&self, layer: u32, tile: u32) -> Result<Vec<Ciphertext>, ExecError> {
        self.0
            .lock()
            .expect("store lock")
            .get(&(layer, tile))
            .cloned()
            .ok_or_else(|| ExecError::Model(format!("tile {tile} of layer {layer} is missing")))
    }
    fn has(&self, layer: u32, tile: u32) -> bool {
        self.0
            .lock()
            .expect("store lock")
            .contains_key(&(layer, tile))
    }
    fn remove(&self, layer: u32, tile: u32) {
        self.0.lock().expect("store lock").remove(&(layer, tile));
    }
}

/// Tiles as files `L<layer>/<tile>.tile` under a directory: a u32 count, then per ciphertext
/// a u64 length and its `beaa-ckks` bytes (bit-packed, fingerprinted, validated on read).
/// Written to a temporary name and renamed, so a tile file is complete or absent.
pub struct DirStore {
    dir: PathBuf,
    params: Params,
}

impl DirStore {
    /// Opens `dir` for a job whose value graph has the given identity; tiles of a different
    /// plan (another model or parameter set) are discarded.
    pub fn open(dir: &Path, params: &Params, identity: &str) -> Result<Self, ExecError> {
        let io = |e: std::io::Error| ExecError::Io(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(io)?;
        let stamp = dir.join("plan-identity");
        let same = std::fs::read_to_string(&stamp).is_ok_and(|s| s == identity);
        if !same {
            for entry in std::fs::read_dir(dir).map_err(io)? {
                let path = entry.map_err(io)?.path();
                if path.is_dir() {
                    std::fs::remove_dir_all(&path).map_err(io)?;
                }
            }
            std::fs::write(&stamp, identity).map_err(io)?;
        }
        Ok(DirStore {
            dir: dir.to_path_buf(),
            params: params.clone(),
        })
    }

    fn path(&self, layer: u32, tile: u32) -> PathBuf {
        self.dir
            .join(format!("L{layer:03}"))
            .join(format!("{tile:06}.tile"))
    }
}

impl Store for DirStore {
    fn put(&self, layer: u32, tile: u32, values: &[Ciphertext]) -> Result<(), ExecError> {
        let path = self.path(layer, tile);
        let io = |e: std::io::Error| ExecError::Io(format!("{}: {e}", path.display()));
        std::fs::create_dir_all(path.parent().expect("tile path has a parent")).map_err(io)?;
        let tmp = path.with_extension("tmp");
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
        f.write_all(&(values.len() as u32).to_le_bytes())
            .map_err(io)?;
        for ct in values {
            let bytes = ct.to_bytes();
            f.write_all(&(bytes.len() as u64).to_le_bytes())
                .map_err(io)?;
            f.write_all(&bytes).map_err(io)?;
        }
        f.into_inner()
            .map_err(|e| io(e.into_error()))?
            .sync_data()
            .map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }

    fn get(&self, layer: u32, tile: u32) -> Result<Vec<Ciphertext>, ExecError> {
        let path = self.path(layer, tile);
        let bad = |what: &str| ExecError::Io(format!("{}: {what}", path.display()));
        let bytes = std::fs::read(&path).map_err(|e| bad(&e.to_string()))?;
        let mut rest = bytes.as_slice();
        let mut take = |n: usize| -> Result<&[u8], ExecError> {
            if rest.len() < n {
                return Err(bad("truncated tile file"));
            }
            let (head, tail) = rest.split_at(n);
            rest = tail;
            Ok(head)
        };
        let count = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
        let mut out = Vec::with_capacity(count.min(4096));
        for _ in 0..count {
            let len = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes")) as usize;
            let ct = Ciphertext::from_bytes(&self.params, take(len)?)
                .map_err(|e| bad(&e.to_string()))?;
            out.push(ct);
        }
        Ok(out)
    }

    fn has(&self, layer: u32, tile: u32) -> bool {
        self.path(layer, tile).is_file()
    }

    fn remove(&self, layer: u32, tile: u32) {
        let _ = std::fs::remove_file(self.path(layer, tile));
    }
}
