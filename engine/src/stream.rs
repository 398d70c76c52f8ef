//! The executor: stages in order, tiles of a stage in raster order, inlined layers computed
//! inside the tiles that read them, linear layers as blocked GEMMs over the ciphertexts a
//! tile reads.

use crate::exec::ExecError;
use crate::graph::{winograd, LayerKind, Meta, ValueGraph, ValueRef, Winograd};
use crate::job::InputSource;
use crate::optime::{Op, OpTimes};
use crate::schedule::{tile_sources, Schedule, Segment, TileRef};
use crate::store::Store;
use beaa_ckks::{Ciphertext, Evaluator, FactoredWeights, LinearRow, RelinKey, SCALE_TOLERANCE};
use rayon::prelude::*;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

type Tile = Arc<Vec<Ciphertext>>;
/// A stored tile being loaded or loaded; readers of one tile share the slot.
type Slot = Arc<Mutex<Option<Tile>>>;

/// Stored tiles read by a running segment of a stage: loaded once, dropped from memory after
/// their last read in the segment.
struct Cache {
    reads: HashMap<TileRef, u32>,
    map: Mutex<HashMap<TileRef, (Slot, u32)>>,
}

impl Cache {
    /// The slot of `r`, counting this read; the last read takes the slot out of the cache.
    fn slot(&self, r: TileRef) -> Slot {
        let mut map = self.map.lock().expect("cache lock");
        let reads = self.reads.get(&r).copied().unwrap_or(1);
        let entry = map.entry(r).or_insert_with(|| (Arc::default(), reads));
        let slot = Arc::clone(&entry.0);
        entry.1 = entry.1.saturating_sub(1);
        if entry.1 == 0 {
            map.remove(&r);
        }
        slot
    }
}

/// What the executor reports as a segment's finished prefix grows: (the stage that computed
/// it, work done in all stages together).
pub type StageProgress<'a> = &'a mut (dyn FnMut(usize, u64) + Send);

/// A running segment's bookkeeping, shared by its threads.
struct Ledger<'a, 'p> {
    /// Per tile of the segment: written (now or by an earlier run).
    finished: Vec<bool>,
    /// Tiles before this index (from the segment's start) are all finished.
    prefix: usize,
    done_work: &'a mut u64,
    progress: StageProgress<'p>,
}

pub struct Runner<'a, I: InputSource + ?Sized> {
    pub g: &'a ValueGraph,
    pub schedule: &'a Schedule,
    /// The order to run the stages' tiles in ([`crate::Plan::segments`]).
    pub segments: &'a [Segment],
    pub ev: &'a Evaluator,
    pub rlk: &'a RelinKey,
    pub inputs: &'a I,
    pub store: &'a dyn Store,
    pub cancel: Option<&'a AtomicBool>,
    pub times: &'a OpTimes,
    /// Per layer, its Winograd weights in the kernels' form, prepared by the first block
    /// that needs them (the same for every block of the layer), split in as many groups of
    /// output channels as threads share a block.
    pub winograd_weights: Vec<Mutex<Option<Arc<Vec<WinogradGroup>>>>>,
}

/// The output channels `channels` of a Winograd layer: their transformed filters
/// (`16 x |channels| x C_in`) and those in the kernels' form.
pub struct WinogradGroup {
    channels: std::ops::Range<usize>,
    u: Vec<f64>,
    weights: FactoredWeights,
}

impl<I: InputSource + ?Sized> Runner<'_, I> {
    fn check_cancel(&self) -> Result<(), ExecError> {
        match self.cancel {
            Some(c) if c.load(Ordering::Relaxed) => Err(ExecError::Cancelled),
            _ => Ok(()),
        }
    }

    /// Runs the segments in order, skipping tiles already done, and returns the logits.
    pub fn run(&self, progress: StageProgress<'_>) -> Result<Vec<Ciphertext>, ExecError> {
        /// Frees the polynomial buffers kept for reuse when the run ends, however it ends.
        struct ReleaseSpares;
        impl Drop for ReleaseSpares {
            fn drop(&mut self) {
                beaa_ckks::ring::release_spare_buffers();
            }
        }
        let _spares = ReleaseSpares;
        let mut done_work = 0u64;
        for (si, range) in self.segments {
            self.run_segment(*si, range.clone(), &mut done_work, progress)?;
        }
        self.store.flush()?;
        let out = self.g.layers.len() as u32 - 1;
        self.store.get(out, 0)
    }

    /// Tiles `range` of stage `si`, skipping those already done. With many tiles each thread
    /// takes the next tile as soon as it finishes one (no barrier between batches: a thread
    /// that drew a cheap border tile does not wait for its partner's full one); with one tile
    /// (the logits) the tile is parallel inside.
    fn run_segment(
        &self,
        si: usize,
        range: std::ops::Range<usize>,
        done_work: &mut u64,
        progress: StageProgress<'_>,
    ) -> Result<(), ExecError> {
        let stage = &self.schedule.stages[si];
        let threads = rayon::current_num_threads().max(1);
        let tiles = self.g.layers[stage.layer as usize].tiles();
        // Threads take tiles of their own, except in stages that compute Winograd blocks:
        // there they share each tile (its GEMM split by output channels), so one block's
        // 16-position window and outputs are held at a time instead of one per thread.
        let outer = tiles >= 2 * threads && !self.has_winograd(stage.layer);
        let cache = Cache {
            reads: stage.reads(range.clone()),
            map: Mutex::default(),
        };
        let todo: Vec<usize> = range
            .clone()
            .filter(|&x| !self.tile_done(stage.layer, x))
            .collect();
        let ledger = Mutex::new(Ledger {
            finished: range
                .clone()
                .map(|x| todo.binary_search(&x).is_err())
                .collect(),
            prefix: 0,
            done_work,
            progress,
        });
        // Tiles finished by an earlier run: counted and consumed now, not news.
        self.advance(
            si,
            range.start,
            &mut ledger.lock().expect("ledger lock"),
            false,
        );
        let next = AtomicUsize::new(0);
        let failed = AtomicBool::new(false);
        let worker = |_| -> Result<(), ExecError> {
            while !failed.load(Ordering::Relaxed) {
                self.check_cancel()?;
                let Some(&x) = todo.get(next.fetch_add(1, Ordering::Relaxed)) else {
                    break;
                };
                let done = self
                    .tile(&cache, (stage.layer, x as u32), !outer)
                    .and_then(|values| {
                        self.times
                            .time(Op::Store, || self.put_tile(stage.layer, x, values))
                    });
                if let Err(e) = done {
                    failed.store(true, Ordering::Relaxed);
                    return Err(e);
                }
                let mut ledger = ledger.lock().expect("ledger lock");
                ledger.finished[x - range.start] = true;
                self.advance(si, range.start, &mut ledger, true);
            }
            Ok(())
        };
        if outer {
            (0..threads).into_par_iter().try_for_each(worker)
        } else {
            worker(0)
        }
    }

    /// Moves the segment's finished prefix forward: counts its work, reports progress, and
    /// consumes the stored tiles whose last reader is now written when no later stage reads
    /// them (never the client's inputs). Only the prefix: a restart still finds every tile an
    /// unfinished tile needs, and knows which tiles were consumed.
    fn advance(&self, si: usize, first: usize, ledger: &mut Ledger<'_, '_>, report: bool) {
        let stage = &self.schedule.stages[si];
        let from = ledger.prefix;
        while ledger.finished.get(ledger.prefix) == Some(&true) {
            ledger.prefix += 1;
        }
        if ledger.prefix == from {
            return;
        }
        let (start, end) = (first + from, first + ledger.prefix);
        *ledger.done_work += stage.work[start..end].iter().sum::<u64>();
        for (&(l, tl), &u) in &stage.last_use {
            if (start..end).contains(&(u as usize))
                && self.schedule.last_stage[l as usize] == Some(si)
                && self.g.layers[l as usize].kind != LayerKind::Input
            {
                self.store.consume(l, tl);
            }
        }
        if report {
            (ledger.progress)(si, *ledger.done_work);
        }
    }

    /// Whether computing a tile of layer `l` computes a Winograd block (of `l` or of a layer
    /// inlined into it; every tile of a layer reads the same layers).
    fn has_winograd(&self, l: u32) -> bool {
        if self.g.layers[l as usize].winograd.is_some() {
            return true;
        }
        let (_, inlined) = tile_sources(self.g, &self.schedule.inlined, (l, 0));
        let mut layers: Vec<u32> = inlined.into_iter().map(|(l, _)| l).collect();
        layers.dedup();
        layers.into_iter().any(|l| self.has_winograd(l))
    }

    /// Whether every position of tile `t` of stored layer `l` is in the store (or consumed):
    /// a tile interrupted between its positions is computed again.
    fn tile_done(&self, l: u32, t: usize) -> bool {
        self.g.layers[l as usize]
            .tile_positions(t)
            .all(|p| self.store.is_done(l, p as u32))
    }

    /// Stores tile `t` of layer `l` position by position (its values are channel by channel,
    /// each channel's positions in the tile's order).
    fn put_tile(&self, l: u32, t: usize, values: Vec<Ciphertext>) -> Result<(), ExecError> {
        let layer = &self.g.layers[l as usize];
        let positions: Vec<usize> = layer.tile_positions(t).collect();
        let k = positions.len();
        let mut per: Vec<Vec<Ciphertext>> = vec![Vec::with_capacity(layer.shape[0]); k];
        for (i, ct) in values.into_iter().enumerate() {
            per[i % k].push(ct);
        }
        for (p, values) in positions.into_iter().zip(per) {
            self.store.put(l, p as u32, &values)?;
        }
        Ok(())
    }

    /// The elements of what `source` returns for `r`, in its order.
    fn source_elems(&self, (l, t): TileRef) -> Vec<usize> {
        let layer = &self.g.layers[l as usize];
        if self.schedule.inlined[l as usize] {
            layer.tile_elems(t as usize).collect()
        } else {
            layer.position_elems(t as usize).collect()
        }
    }

    /// What a computation reads: an inlined layer's tile, computed now (with the threads
    /// sharing it if `parallel`), or a stored layer's position.
    fn source(&self, cache: &Cache, r: TileRef, parallel: bool) -> Result<Tile, ExecError> {
        if self.schedule.inlined[r.0 as usize] {
            Ok(Arc::new(self.tile(cache, r, parallel)?))
        } else {
            self.stored(cache, r)
        }
    }

    /// A stored position, loading it on first use.
    fn stored(&self, cache: &Cache, (l, t): TileRef) -> Result<Tile, ExecError> {
        let slot = cache.slot((l, t));
        let mut slot = slot.lock().expect("tile lock");
        if let Some(tile) = slot.as_ref() {
            return Ok(Arc::clone(tile));
        }
        let layer = &self.g.layers[l as usize];
        let values = self.times.time(Op::Load, || {
            if layer.kind == LayerKind::Input {
                layer
                    .position_elems(t as usize)
                    .map(|k| {
                        let ct = self.inputs.load(k)?;
                        check_meta(&ct, layer.meta[k], &layer.name)?;
                        Ok(ct)
                    })
                    .collect::<Result<Vec<_>, ExecError>>()
            } else {
                self.store.get(l, t)
            }
        })?;
        let expected = layer.shape[0];
        if values.len() != expected {
            return Err(ExecError::Model(format!(
                "position {t} of {} has {} values, expected {expected}",
                layer.name,
                values.len(),
            )));
        }
        let tile = Arc::new(values);
        *slot = Some(Arc::clone(&tile));
        Ok(tile)
    }

    /// The values of tile `t` of layer `l`, channel by channel.
    fn tile(
        &self,
        cache: &Cache,
        (l, t): TileRef,
        parallel: bool,
    ) -> Result<Vec<Ciphertext>, ExecError> {
        self.check_cancel()?;
        let layer = &self.g.layers[l as usize];
        let elems: Vec<usize> = layer.tile_elems(t as usize).collect();
        // Sources: all stored tiles as one chunk, then one chunk per inlined tile.
        let (stored, inlined) = tile_sources(self.g, &self.schedule.inlined, (l, t));
        let mut chunks: Vec<Vec<TileRef>> = Vec::new();
        if !stored.is_empty() {
            chunks.push(stored);
        }
        chunks.extend(inlined.into_iter().map(|r| vec![r]));

        if layer.kind == LayerKind::Sum {
            return self.sum_tile(cache, l, &elems, chunks, parallel);
        }
        // Partial sums of every output of the tile over one chunk of sources.
        let partial = |refs: &Vec<TileRef>| -> Result<Vec<Option<Ciphertext>>, ExecError> {
            let mut held: Vec<(TileRef, Tile)> = Vec::with_capacity(refs.len());
            for &r in refs {
                held.push((r, self.source(cache, r, parallel)?));
            }
            self.check_cancel()?;
            let mut index: HashMap<ValueRef, u32> = HashMap::new();
            let mut inputs: Vec<&Ciphertext> = Vec::new();
            for (r, tile) in &held {
                for (c, elem) in self.source_elems(*r).into_iter().enumerate() {
                    index.insert(
                        ValueRef {
                            layer: r.0,
                            elem: elem as u32,
                        },
                        inputs.len() as u32,
                    );
                    inputs.push(&tile[c]);
                }
            }
            let terms: Vec<Vec<(u32, f64)>> = elems
                .iter()
                .map(|&e| {
                    let mut t: Vec<(u32, f64)> = layer.forms[e]
                        .terms
                        .iter()
                        .filter_map(|(v, w)| index.get(v).map(|&i| (i, *w)))
                        .collect();
                    // In input order, so the outputs of one position (same inputs) are
                    // recognised as a group by the GEMM, and inputs are read in memory order.
                    t.sort_unstable_by_key(|&(i, _)| i);
                    t
                })
                .collect();
            let which: Vec<usize> = (0..elems.len()).filter(|&j| !terms[j].is_empty()).collect();
            let rows: Vec<LinearRow<'_>> = which
                .iter()
                .map(|&j| {
                    let m = layer.combine[elems[j]];
                    LinearRow {
                        terms: &terms[j],
                        level: m.level.max(0) as usize,
                        target_scale: m.scale,
                    }
                })
                .collect();
            let mut out: Vec<Option<Ciphertext>> = vec![None; elems.len()];
            let gemm = |rows: &[LinearRow<'_>]| {
                self.times
                    .time(Op::Gemm, || self.ev.linear_combinations(&inputs, rows))
            };
            // Shared by the threads (a tile they share): the rows split between them.
            let threads = rayon::current_num_threads().max(1);
            let combined: Vec<Ciphertext> = if parallel && rows.len() >= 2 * threads {
                let parts = rows
                    .par_chunks(rows.len().div_ceil(threads))
                    .map(gemm)
                    .collect::<Result<Vec<_>, _>>()?;
                parts.into_iter().flatten().collect()
            } else {
                gemm(&rows)?
            };
            for (j, ct) in which.into_iter().zip(combined) {
                out[j] = Some(ct);
            }
            Ok(out)
        };
        let add = |mut a: Vec<Option<Ciphertext>>,
                   b: Vec<Option<Ciphertext>>|
         -> Result<Vec<Option<Ciphertext>>, ExecError> {
            for (x, y) in a.iter_mut().zip(b) {
                match (x.as_mut(), y) {
                    (Some(x), Some(y)) => self.times.time(Op::Add, || self.ev.add_assign(x, &y))?,
                    (None, Some(y)) => *x = Some(y),
                    _ => {}
                }
            }
            Ok(a)
        };
        // In parallel mode, a few consecutive chunks at a time, so the stored tiles in use
        // stay a narrow band (raster order) instead of one band per thread.
        let mut sums: Vec<Option<Ciphertext>> = vec![None; elems.len()];
        let step = if parallel {
            rayon::current_num_threads().max(1)
        } else {
            1
        };
        let direct_chunks = match &layer.winograd {
            Some(wg) => {
                sums = self.winograd_sums(cache, (l, t), &chunks, wg, parallel)?;
                &[][..]
            }
            None => &chunks[..],
        };
        for group in direct_chunks.chunks(step) {
            let parts: Vec<Vec<Option<Ciphertext>>> = if parallel {
                group.par_iter().map(partial).collect::<Result<_, _>>()?
            } else {
                group.iter().map(partial).collect::<Result<_, _>>()?
            };
            for p in parts {
                sums = add(sums, p)?;
            }
        }
        let finish = |(j, sum): (usize, Option<Ciphertext>)| -> Result<Ciphertext, ExecError> {
            self.check_cancel()?;
            let e = elems[j];
            let mut x =
                sum.ok_or_else(|| ExecError::Model(format!("{}: empty form", layer.name)))?;
            if layer.kind == LayerKind::Partial {
                // Added up by the reader, which rescales the total.
                check_meta(&x, layer.meta[e], &layer.name)?;
                return Ok(x);
            }
            let constant = layer.forms[e].constant;
            if constant != 0.0 {
                self.times
                    .time(Op::Add, || self.ev.add_const_assign(&mut x, constant))?;
            }
            if layer.reads_lazy && layer.kind == LayerKind::Output {
                // The logits (a few ciphertexts, at a small scale): key switch, then two
                // rounding rescales. Rescaling the degree-2 sum first would round its s^2
                // part too (about 0.2 N per coefficient: 4e-2 of logit error at N = 32768),
                // and the fused division below floors with an error of up to the number of
                // divided primes per coefficient (1e-2 on a width/4 model).
                self.times.time(Op::KeySwitch, || {
                    self.ev.relinearize_assign(&mut x, self.rlk)
                })?;
                self.times.time(Op::Rescale, || {
                    self.ev.rescale_by_assign(&mut x, layer.divides)
                })?;
            } else if layer.reads_lazy {
                // Inside the network (scale 2^40) that floor is far below the values: one
                // key switch whose mod-down divides by the two primes of the rescales as
                // well, instead of two rescales of three polynomials (about half as many
                // transforms as the key switch) and a key switch two levels down. Over squares
                // of an unrescaled combination it divides by three primes.
                self.times.time(Op::KeySwitch, || {
                    self.ev
                        .relinearize_rescale_by_assign(&mut x, self.rlk, layer.divides)
                })?;
            } else if layer.divides > 0 {
                self.times.time(Op::Rescale, || {
                    self.ev.rescale_by_assign(&mut x, layer.divides)
                })?;
            }
            let y = match &layer.kind {
                LayerKind::Activation { beta, lazy } => {
                    let mut y = self
                        .times
                        .time(Op::Square, || self.ev.square_plus(&x, beta[e]))?;
                    if !lazy {
                        self.times.time(Op::KeySwitch, || {
                            self.ev.relinearize_rescale_assign(&mut y, self.rlk)
                        })?;
                    }
                    y
                }
                _ => x,
            };
            check_meta(&y, layer.meta[e], &layer.name)?;
            Ok(y)
        };
        if parallel {
            sums.into_par_iter().enumerate().map(finish).collect()
        } else {
            sums.into_iter().enumerate().map(finish).collect()
        }
    }

    /// The combinations of tile `t` (a 2x2 block) of a Winograd layer, before their constants
    /// and rescale: the block's 4x4 input patch per channel from the source tiles, one
    /// [`beaa_ckks::Evaluator::factored_combinations`]. In the order of `tile_elems`.
    fn winograd_sums(
        &self,
        cache: &Cache,
        (l, t): TileRef,
        chunks: &[Vec<TileRef>],
        wg: &Winograd,
        parallel: bool,
    ) -> Result<Vec<Option<Ciphertext>>, ExecError> {
        let layer = &self.g.layers[l as usize];
        let mut held: Vec<(TileRef, Tile)> = Vec::new();
        for &r in chunks.iter().flatten() {
            held.push((r, self.source(cache, r, parallel)?));
        }
        self.check_cancel()?;
        let mut index: HashMap<u32, u32> = HashMap::new();
        let mut inputs: Vec<&Ciphertext> = Vec::new();
        for (r, tile) in &held {
            if r.0 != wg.input_layer {
                return Err(ExecError::Model(format!(
                    "{}: reads a layer besides its convolution's input",
                    layer.name
                )));
            }
            for (c, elem) in self.source_elems(*r).into_iter().enumerate() {
                index.insert(elem as u32, inputs.len() as u32);
                inputs.push(&tile[c]);
            }
        }
        let [ci, h, w] = wg.input_shape;
        let b = winograd::BLOCK;
        // The block's top-left output position (the output map is the input's size).
        let corner = layer
            .tile_positions(t as usize)
            .next()
            .ok_or_else(|| ExecError::Model(format!("{}: empty tile {t}", layer.name)))?;
        let (y0, x0) = (corner / w, corner % w);
        let mut patch = Vec::with_capacity(ci * 16);
        for c in 0..ci {
            for py in 0..4 {
                for px in 0..4 {
                    let (iy, ix) = ((y0 + py).wrapping_sub(1), (x0 + px).wrapping_sub(1));
                    if iy >= h || ix >= w {
                        patch.push(None);
                        continue;
                    }
                    let (v, neg) = wg.inputs[(c * h + iy) * w + ix];
                    let i = index.get(&v).ok_or_else(|| {
                        ExecError::Model(format!("{}: an input of tile {t} is missing", layer.name))
                    })?;
                    patch.push(Some((*i, neg)));
                }
            }
        }
        let co = layer.shape[0];
        let factor: Vec<Option<f64>> = (0..co)
            .flat_map(|o| {
                (0..b * b).map(move |j| {
                    let (oy, ox) = (y0 + j / b, x0 + j % b);
                    (oy < h && ox < w).then(|| wg.factor[(o * h + oy) * w + ox])
                })
            })
            .collect();
        // Channel 0's first element is the corner itself.
        let cm = layer.combine[corner];
        let (level, scale) = (cm.level.max(0) as usize, cm.scale);
        let groups = if parallel {
            rayon::current_num_threads().clamp(1, co)
        } else {
            1
        };
        let groups = self.winograd_groups(l, wg, groups, |u, f| {
            let map = beaa_ckks::winograd::map(&patch, u, wg.u_bits, f, level, scale);
            self.ev.prepare_factored(&map)
        })?;
        let run = |g: &WinogradGroup| -> Result<Vec<Option<Ciphertext>>, ExecError> {
            self.times.time(Op::Gemm, || {
                let f = &factor[g.channels.start * b * b..g.channels.end * b * b];
                let map = beaa_ckks::winograd::map(&patch, &g.u, wg.u_bits, f, level, scale);
                Ok(self
                    .ev
                    .factored_combinations_prepared(&inputs, &map, &g.weights)?)
            })
        };
        let parts: Vec<Vec<Option<Ciphertext>>> = if groups.len() > 1 {
            groups.par_iter().map(run).collect::<Result<_, _>>()?
        } else {
            groups.iter().map(run).collect::<Result<_, _>>()?
        };
        let out = parts.into_iter().flatten();
        // Outputs channel by channel, block positions row-major; those outside the map are
        // `None` and not elements of the tile.
        Ok(out.into_iter().filter(Option::is_some).collect())
    }

    /// Layer `l`'s Winograd weights in `n` groups of output channels, prepared (by `prepare`,
    /// given a group's `u` and factors) on first use and kept for its other blocks.
    fn winograd_groups(
        &self,
        l: u32,
        wg: &Winograd,
        n: usize,
        prepare: impl Fn(&[f64], &[Option<f64>]) -> Result<FactoredWeights, beaa_ckks::Error>,
    ) -> Result<Arc<Vec<WinogradGroup>>, ExecError> {
        let mut slot = self.winograd_weights[l as usize]
            .lock()
            .expect("weights lock");
        if let Some(groups) = slot.as_ref().filter(|g| g.len() == n) {
            return Ok(Arc::clone(groups));
        }
        let [ci, _, _] = wg.input_shape;
        let co = self.g.layers[l as usize].shape[0];
        let t = wg.u.len() / (co * ci);
        let m = winograd::BLOCK * winograd::BLOCK;
        let groups = (0..n)
            .map(|g| {
                let channels = g * co / n..(g + 1) * co / n;
                let u: Vec<f64> = (0..t)
                    .flat_map(|k| {
                        channels.clone().flat_map(move |o| {
                            wg.u[(k * co + o) * ci..(k * co + o + 1) * ci]
                                .iter()
                                .copied()
                        })
                    })
                    .collect();
                // Only the shape of the factors matters for the weights.
                let f = vec![Some(1.0); channels.len() * m];
                let weights = prepare(&u, &f)?;
                Ok(WinogradGroup {
                    channels,
                    u,
                    weights,
                })
            })
            .collect::<Result<Vec<_>, ExecError>>()?;
        Ok(Arc::clone(slot.insert(Arc::new(groups))))
    }

    /// A sum tile: plain additions and subtractions of its (equal-level) values.
    fn sum_tile(
        &self,
        cache: &Cache,
        l: u32,
        elems: &[usize],
        chunks: Vec<Vec<TileRef>>,
        parallel: bool,
    ) -> Result<Vec<Ciphertext>, ExecError> {
        let layer = &self.g.layers[l as usize];
        // Source tiles one at a time, each added into the sums and dropped: a pool of lazy
        // squares would otherwise hold its whole window (conv1 at full width: 4 x 0.75 GB
        // per thread) instead of one tile and the sums.
        let mut acc: Vec<Option<Ciphertext>> = vec![None; elems.len()];
        let mut found = vec![0usize; elems.len()];
        for r in chunks.into_iter().flatten() {
            let tile = self.source(cache, r, parallel)?;
            let channel: HashMap<u32, usize> = self
                .source_elems(r)
                .into_iter()
                .enumerate()
                .map(|(c, elem)| (elem as u32, c))
                .collect();
            for (j, &e) in elems.iter().enumerate() {
                for (v, w) in &layer.forms[e].terms {
                    let Some(&c) = channel.get(&v.elem).filter(|_| v.layer == r.0) else {
                        continue;
                    };
                    let x = &tile[c];
                    found[j] += 1;
                    self.times.time(Op::Add, || -> Result<(), ExecError> {
                        match acc[j].as_mut() {
                            None => {
                                let mut first = x.clone();
                                if *w < 0.0 {
                                    self.ev.neg_assign(&mut first)?;
                                }
                                acc[j] = Some(first);
                            }
                            Some(a) if *w < 0.0 => self.ev.sub_assign(a, x)?,
                            Some(a) => self.ev.add_assign(a, x)?,
                        }
                        Ok(())
                    })?;
                }
            }
        }
        elems
            .iter()
            .zip(acc)
            .zip(found)
            .map(|((&e, y), found)| {
                if found != layer.forms[e].terms.len() {
                    return Err(ExecError::Model(format!("{}: missing term", layer.name)));
                }
                let mut y =
                    y.ok_or_else(|| ExecError::Model(format!("{}: empty sum", layer.name)))?;
                if layer.divides > 0 {
                    // A stored sum of lazy squares (pool2): one key switch per sum, which
                    // also divides by the squares' deferred prime.
                    self.check_cancel()?;
                    self.times.time(Op::KeySwitch, || {
                        self.ev
                            .relinearize_rescale_by_assign(&mut y, self.rlk, layer.divides)
                    })?;
                }
                check_meta(&y, layer.meta[e], &layer.name)?;
                Ok(y)
            })
            .collect()
    }
}

/// The executor and the plan must agree on every level and scale.
fn check_meta(ct: &Ciphertext, m: Meta, layer: &str) -> Result<(), ExecError> {
    let ok = ct.level() as isize == m.level
        && ((ct.scale() - m.scale) / m.scale).abs() <= SCALE_TOLERANCE;
    if ok {
        Ok(())
    } else {
        Err(ExecError::Model(format!(
            "{layer}: ciphertext at level {} scale 2^{:.3}, the plan says level {} scale 2^{:.3}",
            ct.level(),
            ct.scale().log2(),
            m.level,
            m.scale.log2()
        )))
    }
}
