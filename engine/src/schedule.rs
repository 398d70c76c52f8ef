//! Which values are kept and which are recomputed where they are used, and in what order.
//!
//! A layer is **inlined** into its consumer when every one of its values is read by a single
//! tile (position) of a single consumer layer: it is then computed inside that tile, used, and
//! dropped (conv1 into fire1.squeeze through the 2x2 pool, the expand layers into the next
//! squeeze or pool, conv3 into the logits). Otherwise it is **stored**: computed once in its
//! own *stage*, tile by tile in raster order, kept in the store position by position while
//! later tiles may still read it, then deleted. Reads of overlapping windows (3x3
//! convolutions) then touch only a band of recent rows, so resident memory is bounded by a
//! few rows of one layer.

use crate::graph::{LayerKind, ValueGraph};
use std::collections::HashMap;

/// A tile of a layer: `(layer, tile)`. What the store holds and stages read of a stored layer
/// are its positions (`Layer::position_elems`), so a reference to a stored value names its
/// position; one to an inlined value names its computed tile.
pub type TileRef = (u32, u32);

#[derive(Debug, Clone)]
pub struct Stage {
    pub layer: u32,
    /// Activations computed per tile (including inlined layers): the progress weight.
    pub work: Vec<u64>,
    /// Stored positions this stage reads, with the last of its tiles that reads each.
    pub last_use: HashMap<TileRef, u32>,
    /// Per tile: the stored positions computing it reads, once per read (one read by several
    /// inlined tiles appears once for each).
    pub sources: Vec<Vec<TileRef>>,
}

impl Stage {
    /// How many times tiles `range` of this stage read each stored position: it leaves
    /// memory after its last read within the range.
    pub fn reads(&self, range: std::ops::Range<usize>) -> HashMap<TileRef, u32> {
        let mut reads = HashMap::new();
        for r in self.sources[range].iter().flatten() {
            *reads.entry(*r).or_default() += 1;
        }
        reads
    }

    /// Per tile: for each stored layer it reads (besides the input), the highest tile of that
    /// layer (as computed) holding a position it reads. Stages fill their layers in raster
    /// order, so tile `t` can be computed once every listed layer has more than that many
    /// tiles done.
    pub fn needs(&self, g: &ValueGraph) -> Vec<Vec<(u32, u32)>> {
        self.sources
            .iter()
            .map(|refs| {
                let mut need: HashMap<u32, u32> = HashMap::new();
                for &(l, p) in refs {
                    let layer = &g.layers[l as usize];
                    if layer.kind != LayerKind::Input {
                        let e = need.entry(l).or_default();
                        *e = (*e).max(layer.tile_of(p as usize) as u32);
                    }
                }
                let mut need: Vec<(u32, u32)> = need.into_iter().collect();
                need.sort_unstable();
                need
            })
            .collect()
    }
}

#[derive(Debug, Clone)]
pub struct Schedule {
    pub inlined: Vec<bool>,
    pub stages: Vec<Stage>,
    /// For each stored layer, the last stage that reads it (its tiles may be deleted after).
    pub last_stage: Vec<Option<usize>>,
}

impl Schedule {
    pub fn new(g: &ValueGraph) -> Self {
        let n = g.layers.len();
        // consumer[l]: Some(layer) while only one layer reads l; None after a second one.
        let mut consumer: Vec<Option<Option<u32>>> = vec![None; n];
        let mut tile_of_reader: Vec<Vec<u32>> =
            g.layers.iter().map(|l| vec![u32::MAX; l.len()]).collect();
        let mut conflict = vec![false; n];
        for (m, layer) in g.layers.iter().enumerate() {
            for (e, form) in layer.forms.iter().enumerate() {
                let t = layer.tile_of(e) as u32;
                for (v, _) in &form.terms {
                    let l = v.layer as usize;
                    consumer[l] = match consumer[l] {
                        None => Some(Some(m as u32)),
                        Some(Some(x)) if x == m as u32 => Some(Some(x)),
                        _ => Some(None),
                    };
                    let slot = &mut tile_of_reader[l][v.elem as usize];
                    if *slot == u32::MAX {
                        *slot = t;
                    } else if *slot != t {
                        conflict[l] = true;
                    }
                }
            }
        }
        let inlined: Vec<bool> = (0..n)
            .map(|l| {
                matches!(
                    g.layers[l].kind,
                    LayerKind::Activation { .. } | LayerKind::Sum
                ) && !conflict[l]
                    && matches!(consumer[l], Some(Some(_)) | None)
            })
            .collect();
        let mut stages = Vec::new();
        let mut last_stage = vec![None; n];
        for (l, layer) in g.layers.iter().enumerate() {
            if inlined[l] || layer.kind == LayerKind::Input {
                continue;
            }
            let mut work = Vec::with_capacity(layer.tiles());
            let mut last_use = HashMap::new();
            let mut sources = Vec::with_capacity(layer.tiles());
            for t in 0..layer.tiles() {
                let mut w = 0u64;
                let mut read = Vec::new();
                let mut record = |stored| {
                    last_use.insert(stored, t as u32);
                    read.push(stored);
                };
                visit(g, &inlined, (l as u32, t as u32), &mut record, &mut w);
                work.push(w.max(1));
                sources.push(read);
            }
            for &(sl, _) in last_use.keys() {
                last_stage[sl as usize] = Some(stages.len());
            }
            stages.push(Stage {
                layer: l as u32,
                work,
                last_use,
                sources,
            });
        }
        Schedule {
            inlined,
            stages,
            last_stage,
        }
    }

    /// Stored layers (besides the input) and the stages that compute them, by name.
    pub fn stored_layers<'g>(&self, g: &'g ValueGraph) -> Vec<&'g str> {
        self.stages
            .iter()
            .map(|s| g.layers[s.layer as usize].name.as_str())
            .collect()
    }
}

/// A stage's tiles are run in about this many segments. Between segments the executor runs
/// the latest stage that can go on, so a stored layer is consumed soon after it is made:
/// stored bytes stay near the bands that data dependencies keep alive instead of whole
/// layers. A full OCT job holds 23.6 GB at most (67.2 GB stage by stage; about 38 GB with 8
/// segments, 19 GB with 32), CIFAR-10 19.5 GB (34.4 GB): see `beaa plan`. Each segment reloads the band of rows it
/// shares with the previous one from the store, so more segments cost more reads.
pub const SEGMENTS_PER_STAGE: usize = 16;

/// ... but a segment has at least this many tiles (or what is left of its stage): the
/// executor's threads share a segment's tiles, so a one-tile segment runs on one thread.
/// Winograd's 2x2-block tiles made conv2's stage and the logits' partial sums 16 tiles each
/// at 32x32 (64 direct), one per segment: half of two cores idle for half the GEMM.
pub const MIN_TILES_PER_SEGMENT: usize = 4;

/// A run of consecutive tiles of one stage: `(stage index, tiles)`.
pub type Segment = (usize, std::ops::Range<usize>);

impl Schedule {
    /// The order the executor runs tiles in: a wavefront. After each segment, the latest stage
    /// that can run a whole segment (every stored value it reads is done) runs next; if none
    /// can, the earliest unfinished stage does. Stages fill their layers in raster order.
    /// Depends on the graph only, so the planner can tell the stored bytes in advance.
    pub fn segments(&self, g: &ValueGraph) -> Vec<Segment> {
        let stages = &self.stages;
        let needs: Vec<Vec<Vec<(u32, u32)>>> = stages.iter().map(|s| s.needs(g)).collect();
        let mut producer: Vec<Option<usize>> = vec![None; g.layers.len()];
        for (si, stage) in stages.iter().enumerate() {
            producer[stage.layer as usize] = Some(si);
        }
        let tiles: Vec<usize> = stages
            .iter()
            .map(|s| g.layers[s.layer as usize].tiles())
            .collect();
        let chunk = |si: usize| {
            tiles[si]
                .div_ceil(SEGMENTS_PER_STAGE)
                .max(MIN_TILES_PER_SEGMENT)
        };
        // Tiles 0..next[si] of stage si are done.
        let mut next = vec![0usize; stages.len()];
        let ready = |next: &[usize], si: usize, t: usize| {
            needs[si][t]
                .iter()
                .all(|&(l, last)| producer[l as usize].is_none_or(|p| next[p] > last as usize))
        };
        // How many tiles from next[si] on can run now (at most one segment).
        let runnable = |next: &[usize], si: usize| {
            let end = (next[si] + chunk(si)).min(tiles[si]);
            (next[si]..end).take_while(|&t| ready(next, si, t)).count()
        };
        let mut out = Vec::new();
        loop {
            let unfinished: Vec<usize> = (0..stages.len())
                .filter(|&si| next[si] < tiles[si])
                .collect();
            let Some(&earliest) = unfinished.first() else {
                break;
            };
            let pick = unfinished.iter().rev().copied().find_map(|si| {
                let n = runnable(&next, si);
                (n > 0 && n >= chunk(si).min(tiles[si] - next[si])).then_some((si, n))
            });
            // Everything the earliest unfinished stage reads is done, so it can always run.
            let (si, n) = pick.unwrap_or((earliest, runnable(&next, earliest).max(1)));
            out.push((si, next[si]..next[si] + n));
            next[si] += n;
        }
        out
    }

    /// Stage by stage, each whole: the order before the wavefront (for comparison).
    pub fn stage_by_stage(&self, g: &ValueGraph) -> Vec<Segment> {
        self.stages
            .iter()
            .enumerate()
            .map(|(si, s)| (si, 0..g.layers[s.layer as usize].tiles()))
            .collect()
    }

    /// The most bytes the store holds at once when `segments` run (tile by tile: a tile's
    /// positions are put, then the positions it was the last reader of are consumed), given
    /// each stored value's size in bytes. The executor consumes after each batch of `threads`
    /// tiles, so it may briefly hold up to a batch more.
    pub fn peak_stored_bytes(
        &self,
        g: &ValueGraph,
        segments: &[Segment],
        value_bytes: impl Fn(u32, usize) -> u64,
    ) -> u64 {
        let position_bytes = |l: u32, p: usize| -> u64 {
            g.layers[l as usize]
                .position_elems(p)
                .map(|e| value_bytes(l, e))
                .sum()
        };
        let tile_bytes = |l: u32, t: u32| -> u64 {
            g.layers[l as usize]
                .tile_positions(t as usize)
                .map(|p| position_bytes(l, p))
                .sum()
        };
        // Per stage: which stored positions each of its tiles is the last reader of.
        let frees: Vec<HashMap<u32, Vec<TileRef>>> = self
            .stages
            .iter()
            .enumerate()
            .map(|(si, s)| {
                let mut m: HashMap<u32, Vec<TileRef>> = HashMap::new();
                for (&(l, t), &u) in &s.last_use {
                    if self.last_stage[l as usize] == Some(si)
                        && g.layers[l as usize].kind != LayerKind::Input
                    {
                        m.entry(u).or_default().push((l, t));
                    }
                }
                m
            })
            .collect();
        let (mut held, mut peak) = (0u64, 0u64);
        for (si, range) in segments {
            let layer = self.stages[*si].layer;
            for t in range.clone() {
                held += tile_bytes(layer, t as u32);
                peak = peak.max(held);
                for &(l, p) in frees[*si].get(&(t as u32)).into_iter().flatten() {
                    held -= position_bytes(l, p as usize);
                }
            }
        }
        peak
    }
}

/// Walks what computing `tile` touches as the executor does: each stored position it reads
/// goes to `stored` once per computed tile that reads it, inlined tiles are entered; `work`
/// counts the activations computed.
fn visit(
    g: &ValueGraph,
    inlined: &[bool],
    (l, t): TileRef,
    stored: &mut dyn FnMut(TileRef),
    work: &mut u64,
) {
    let layer = &g.layers[l as usize];
    if matches!(layer.kind, LayerKind::Activation { .. }) {
        *work += layer.tile_len(t as usize) as u64;
    }
    let (outer, inner) = tile_sources(g, inlined, (l, t));
    for r in outer {
        stored(r);
    }
    for r in inner {
        visit(g, inlined, r, stored, work);
    }
}

/// What a tile's forms read, deduplicated: `(stored positions, inlined tiles)`. The executor
/// reads them exactly so (once per computed tile), which is what the read counts rely on.
pub fn tile_sources(
    g: &ValueGraph,
    inlined: &[bool],
    (l, t): TileRef,
) -> (Vec<TileRef>, Vec<TileRef>) {
    let layer = &g.layers[l as usize];
    let (mut stored, mut inner) = (Vec::new(), Vec::new());
    for e in layer.tile_elems(t as usize) {
        for (v, _) in &layer.forms[e].terms {
            let src = &g.layers[v.layer as usize];
            if inlined[v.layer as usize] {
                inner.push((v.layer, src.tile_of(v.elem as usize) as u32));
            } else {
                stored.push((v.layer, src.position_of(v.elem as usize) as u32));
            }
        }
    }
    for list in [&mut stored, &mut inner] {
        list.sort_unstable();
        list.dedup();
    }
    (stored, inner)
}
