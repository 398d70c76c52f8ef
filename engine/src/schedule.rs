//! Which values are kept and which are recomputed where they are used, and in what order.
//!
//! A layer is **inlined** into its consumer when every one of its values is read by a single
//! tile (position) of a single consumer layer: it is then computed inside that tile, used, and
//! dropped (conv1 into fire1.squeeze through the 2x2 pool, the expand layers into the next
//! squeeze or pool, conv3 into the logits). Otherwise it is **stored**: computed once in its
//! own *stage*, tile by tile in raster order, kept in the store while later tiles may still
//! read it, then deleted. Reads of overlapping windows (3x3 convolutions) then touch only a
//! band of recent rows, so resident memory is bounded by a few rows of one layer.

use crate::graph::{LayerKind, ValueGraph};
use std::collections::HashMap;

/// A tile of a layer: `(layer, tile)`.
pub type TileRef = (u32, u32);

#[derive(Debug, Clone)]
pub struct Stage {
    pub layer: u32,
    /// Activations computed per tile (including inlined layers): the progress weight.
    pub work: Vec<u64>,
    /// Stored tiles this stage reads, with the last of its tiles that reads each.
    pub last_use: HashMap<TileRef, u32>,
    /// How many times the stage reads each stored tile (it leaves memory after the last).
    pub reads: HashMap<TileRef, u32>,
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
            let mut reads: HashMap<TileRef, u32> = HashMap::new();
            for t in 0..layer.tiles() {
                let mut w = 0u64;
                let mut record = |stored| {
                    last_use.insert(stored, t as u32);
                    *reads.entry(stored).or_default() += 1;
                };
                visit(g, &inlined, (l as u32, t as u32), &mut record, &mut w);
                work.push(w.max(1));
            }
            for &(sl, _) in last_use.keys() {
                last_stage[sl as usize] = Some(stages.len());
            }
            stages.push(Stage {
                layer: l as u32,
                work,
                last_use,
                reads,
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

/// Walks what computing `tile` touches as the executor does: each stored tile it reads goes
/// to `stored` once per computed tile that reads it, inlined tiles are entered; `work`
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
        *work += layer.shape[0] as u64;
    }
    let (outer, inner) = tile_sources(g, inlined, (l, t));
    for r in outer {
        stored(r);
    }
    for r in inner {
        visit(g, inlined, r, stored, work);
    }
}

/// The tiles a tile's forms read, deduplicated: `(stored, inlined)`. The executor reads them
/// exactly so (once per computed tile), which is what the read counts rely on.
pub fn tile_sources(
    g: &ValueGraph,
    inlined: &[bool],
    (l, t): TileRef,
) -> (Vec<TileRef>, Vec<TileRef>) {
    let layer = &g.layers[l as usize];
    let (mut stored, mut inner) = (Vec::new(), Vec::new());
    for e in layer.tile_elems(t as usize) {
        for (v, _) in &layer.forms[e].terms {
            let r = (
                v.layer,
                g.layers[v.layer as usize].tile_of(v.elem as usize) as u32,
            );
            if inlined[v.layer as usize] {
                inner.push(r);
            } else {
                stored.push(r);
            }
        }
    }
    for list in [&mut stored, &mut inner] {
        list.sort_unstable();
        list.dedup();
    }
    (stored, inner)
}
