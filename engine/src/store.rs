//! Where stored tiles live between stages: memory (tests, small models) or files in a job's
//! work directory (production: a full CIFAR-10 batch has tens of GB of intermediate
//! ciphertexts). Files double as checkpoints: a finished tile is on disk, so a restarted
//! job skips it.

use crate::exec::ExecError;
use beaa_ckks::{Ciphertext, Params};
use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};

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
    /// Waits until every tile put so far is durable and every consumption done; reports a
    /// failure of either that happened in the background.
    fn flush(&self) -> Result<(), ExecError> {
        Ok(())
    }
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
/// Written to a temporary name and renamed once synced, so a tile file is complete or absent.
/// A consumed tile leaves an empty `<tile>.done` marker behind (written before the tile is
/// deleted).
///
/// The sync, the rename and the consumptions run on a thread of their own ([`Syncer`]), in
/// the order they were asked for: a worker that puts a tile goes on computing while the disk
/// catches up (a full CIFAR-10 job writes ~97 GB; the workers' "store" went from 167 to 117
/// thread-seconds), and a tile is still only consumed after every tile put before it - its
/// readers - is durable, so a crash never leaves a reader missing with its inputs gone.
pub struct DirStore {
    dir: PathBuf,
    params: Params,
    /// Bytes of the tile files written or found and not yet consumed.
    held: Arc<AtomicU64>,
    sync: Arc<Syncer>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Bytes of tiles written but not yet synced beyond which `put` waits: bounds the dirty
/// page cache a job piles up when it writes faster than the disk.
const MAX_UNSYNCED_BYTES: u64 = 1 << 30;

/// What the syncer thread does next, in the order the workers asked.
enum SyncJob {
    /// A complete tile in its temporary file: `fsync`, then rename it to its name.
    Put {
        key: (u32, u32),
        tmp: PathBuf,
        path: PathBuf,
        bytes: u64,
    },
    /// A tile whose readers are all put: marker, then delete (see [`consume_now`]).
    Consume { path: PathBuf },
}

#[derive(Default)]
struct SyncState {
    queue: VecDeque<SyncJob>,
    /// Tiles put and not yet renamed, by (layer, tile): their temporary files.
    pending: HashMap<(u32, u32), PathBuf>,
    unsynced_bytes: u64,
    /// The syncer holds a job it took from the queue.
    busy: bool,
    /// The first failure; the syncer then stops consuming (a reader may not be durable).
    error: Option<String>,
    closing: bool,
    /// Tests hold the syncer still to see tiles between put and sync.
    #[cfg(test)]
    paused: bool,
}

/// The state shared by a [`DirStore`] and its syncer thread.
#[derive(Default)]
struct Syncer {
    state: Mutex<SyncState>,
    changed: Condvar,
}

impl Syncer {
    fn lock(&self) -> std::sync::MutexGuard<'_, SyncState> {
        self.state.lock().expect("syncer lock")
    }

    fn run(&self, held: &AtomicU64) {
        loop {
            let (job, failed) = {
                let mut s = self.lock();
                loop {
                    #[cfg(test)]
                    if s.paused && !s.closing {
                        s = self.changed.wait(s).expect("syncer lock");
                        continue;
                    }
                    if let Some(job) = s.queue.pop_front() {
                        s.busy = true;
                        break (job, s.error.is_some());
                    }
                    if s.closing {
                        return;
                    }
                    s = self.changed.wait(s).expect("syncer lock");
                }
            };
            let result = match &job {
                SyncJob::Put { tmp, path, .. } => std::fs::File::open(tmp)
                    .and_then(|f| f.sync_data())
                    .and_then(|()| std::fs::rename(tmp, path))
                    .map_err(|e| format!("{}: {e}", path.display())),
                SyncJob::Consume { path } => {
                    if !failed {
                        consume_now(path, held);
                    }
                    Ok(())
                }
            };
            let mut s = self.lock();
            s.busy = false;
            if let SyncJob::Put { key, bytes, .. } = &job {
                s.pending.remove(key);
                s.unsynced_bytes -= bytes;
            }
            if let Err(e) = result {
                s.error.get_or_insert(e);
            }
            self.changed.notify_all();
        }
    }

    fn error(s: &SyncState) -> Result<(), ExecError> {
        match &s.error {
            Some(e) => Err(ExecError::Io(format!("syncing a tile: {e}"))),
            None => Ok(()),
        }
    }
}

/// Marks a tile consumed and deletes it. The marker first: a crash in between leaves both,
/// never neither; a marker that cannot be written keeps the tile (recomputing it later would
/// be worse than the space).
fn consume_now(path: &Path, held: &AtomicU64) {
    if !path.is_file() {
        return; // consumed before (a resumed job passes its readers again)
    }
    if std::fs::write(path.with_extension("done"), b"").is_err() {
        return;
    }
    if let Ok(meta) = std::fs::metadata(path) {
        if std::fs::remove_file(path).is_ok() {
            held.fetch_sub(meta.len(), Ordering::Relaxed);
        }
    }
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
        let held = Arc::new(AtomicU64::new(tile_bytes(dir).map_err(io)?));
        let sync = Arc::new(Syncer::default());
        let thread = {
            let (sync, held) = (Arc::clone(&sync), Arc::clone(&held));
            std::thread::Builder::new()
                .name("beaa-tile-sync".into())
                .spawn(move || sync.run(&held))
                .map_err(io)?
        };
        Ok(DirStore {
            dir: dir.to_path_buf(),
            params: params.clone(),
            held,
            sync,
            thread: Some(thread),
        })
    }

    /// Opens a tile's file: its temporary one while the syncer has not renamed it (it may at
    /// any moment: then it has its name).
    fn open_tile(&self, layer: u32, tile: u32) -> std::io::Result<std::fs::File> {
        let tmp = self.sync.lock().pending.get(&(layer, tile)).cloned();
        match tmp.map(std::fs::File::open) {
            Some(Ok(f)) => Ok(f),
            _ => std::fs::File::open(self.path(layer, tile)),
        }
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
    /// Writes the tile to its temporary file and leaves the sync and rename to the syncer
    /// (waiting first while more than [`MAX_UNSYNCED_BYTES`] are unsynced).
    fn put(&self, layer: u32, tile: u32, values: &[Ciphertext]) -> Result<(), ExecError> {
        let path = self.path(layer, tile);
        let io = |e: std::io::Error| ExecError::Io(format!("{}: {e}", path.display()));
        std::fs::create_dir_all(path.parent().expect("tile path has a parent")).map_err(io)?;
        {
            let mut s = self.sync.lock();
            while s.unsynced_bytes > MAX_UNSYNCED_BYTES && s.error.is_none() {
                s = self.sync.changed.wait(s).expect("syncer lock");
            }
            Syncer::error(&s)?;
        }
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
        drop(f.into_inner().map_err(|e| io(e.into_error()))?);
        self.held.fetch_add(written, Ordering::Relaxed);
        let mut s = self.sync.lock();
        s.pending.insert((layer, tile), tmp.clone());
        s.unsynced_bytes += written;
        s.queue.push_back(SyncJob::Put {
            key: (layer, tile),
            tmp,
            path,
            bytes: written,
        });
        self.sync.changed.notify_all();
        Ok(())
    }

    /// Reads the tile one ciphertext at a time into one reused buffer: a whole tile (up to
    /// ~360 MB at full width) read at once was an allocation that glibc maps and unmaps per
    /// read in a worker thread's arena, every page faulting again. A tile not yet synced is
    /// read from its temporary file (complete: `put` wrote all of it).
    fn get(&self, layer: u32, tile: u32) -> Result<Vec<Ciphertext>, ExecError> {
        let path = self.path(layer, tile);
        let bad = |what: &str| ExecError::Io(format!("{}: {what}", path.display()));
        let file = self
            .open_tile(layer, tile)
            .map_err(|e| bad(&e.to_string()))?;
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
        if self.sync.lock().pending.contains_key(&(layer, tile)) {
            return true;
        }
        let path = self.path(layer, tile);
        path.is_file() || path.with_extension("done").is_file()
    }

    /// Queued behind every tile put so far (the tile's readers among them).
    fn consume(&self, layer: u32, tile: u32) {
        let mut s = self.sync.lock();
        s.queue.push_back(SyncJob::Consume {
            path: self.path(layer, tile),
        });
        self.sync.changed.notify_all();
    }

    fn bytes_held(&self) -> u64 {
        self.held.load(Ordering::Relaxed)
    }

    fn flush(&self) -> Result<(), ExecError> {
        let mut s = self.sync.lock();
        while (!s.queue.is_empty() || s.busy) && s.error.is_none() {
            s = self.sync.changed.wait(s).expect("syncer lock");
        }
        Syncer::error(&s)
    }
}

/// Lets the syncer finish what it was given (a cancelled or failed job's finished tiles stay
/// checkpoints), then joins it.
impl Drop for DirStore {
    fn drop(&mut self) {
        self.sync.lock().closing = true;
        self.sync.changed.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
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
        store.flush().unwrap();
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

    fn pause(store: &DirStore, paused: bool) {
        store.sync.lock().paused = paused;
        store.sync.changed.notify_all();
    }

    #[test]
    fn tiles_are_read_before_their_sync_and_consumed_only_after_earlier_puts() {
        let params = Params::insecure_for_tests(ParamSpec::chain(10, 3, 40, 2)).unwrap();
        let dir = std::env::temp_dir().join(format!("beaa-sync-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cts = tile(&params, 2);
        let same = |a: &[Ciphertext]| {
            a.len() == cts.len()
                && a.iter()
                    .zip(&cts)
                    .all(|(x, y)| x.to_bytes() == y.to_bytes())
        };
        let store = DirStore::open(&dir, &params, "test plan").unwrap();
        store.put(1, 0, &cts).unwrap();
        store.flush().unwrap();
        assert!(store.path(1, 0).is_file());

        // Held still: a put is readable and done before its sync; a consumption waits for it.
        pause(&store, true);
        store.put(2, 0, &cts).unwrap();
        store.consume(1, 0);
        assert!(!store.path(2, 0).exists() && store.path(2, 0).with_extension("tmp").is_file());
        assert!(store.is_done(2, 0));
        assert!(same(&store.get(2, 0).unwrap()));
        assert!(
            store.path(1, 0).is_file(),
            "consumed before its reader was synced"
        );
        pause(&store, false);
        store.flush().unwrap();
        assert!(store.path(2, 0).is_file());
        assert!(!store.path(1, 0).exists() && store.path(1, 0).with_extension("done").is_file());
        assert!(store.is_done(1, 0));
        assert_eq!(
            store.bytes_held(),
            std::fs::metadata(store.path(2, 0)).unwrap().len()
        );

        // Dropping the store finishes what was queued.
        pause(&store, true);
        store.put(3, 0, &cts).unwrap();
        drop(store);
        assert!(DirStore::open(&dir, &params, "test plan")
            .unwrap()
            .path(3, 0)
            .is_file());

        // A failed sync is reported, and later consumptions are not done.
        let store = DirStore::open(&dir, &params, "test plan").unwrap();
        pause(&store, true);
        store.put(4, 0, &cts).unwrap();
        store.consume(2, 0);
        std::fs::remove_dir_all(dir.join("L004")).unwrap();
        pause(&store, false);
        assert!(store
            .flush()
            .unwrap_err()
            .to_string()
            .contains("syncing a tile"));
        assert!(store.put(5, 0, &cts).is_err());
        assert!(!store.is_done(4, 0));
        assert!(store.path(2, 0).is_file(), "consumed after a failed sync");
        drop(store);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
