//! The models the server offers: every model directory of the zoo, planned once in a
//! background thread (the full-width model takes tens of seconds and gigabytes to plan) and
//! listed as soon as its plan is ready.

use super::util::hex;
use beaa_ckks::{serialize::ciphertext_len, Evaluator, Params, RelinKey};
use beaa_engine::Plan;
use beaa_model::Model;
use serde_json::json;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

/// A model with its parameters and plan, ready to take jobs.
pub struct ReadyModel {
    pub name: String,
    pub model: Model,
    pub params: Params,
    pub plan: Plan,
    pub ev: Evaluator,
    pub fingerprint: String,
    pub input_ct_len: usize,
    pub rlk_len: usize,
    /// The most bytes of intermediate tiles a job holds (the plan's wavefront peak).
    pub work_peak: u64,
    pub info: serde_json::Value,
}

#[derive(Default)]
pub struct Registry {
    ready: RwLock<BTreeMap<String, Arc<ReadyModel>>>,
    /// Names found in the zoo (planned or not yet).
    pending: RwLock<BTreeMap<String, PathBuf>>,
    done: AtomicBool,
}

/// A model name is a plain word: it names a directory of the zoo and nothing else.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// The zoo: `--zoo`, else `$BEAA_ZOO`, `./models/zoo`, or `models/zoo` above the executable
/// (the first that exists).
pub fn find_zoo(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(z) = explicit {
        return Some(z.to_path_buf());
    }
    crate::models::zoo_dirs().into_iter().find(|d| d.is_dir())
}

/// The web directory: `--web-dir`, else `./web` or `web` above the executable.
pub fn find_web(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(w) = explicit {
        return Some(w.to_path_buf());
    }
    let mut dirs = vec![PathBuf::from("web")];
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            dirs.push(dir.join("web"));
        }
    }
    dirs.into_iter().find(|d| d.join("index.html").is_file())
}

impl Registry {
    pub fn get(&self, name: &str) -> Option<Arc<ReadyModel>> {
        self.ready
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
    }

    pub fn list(&self) -> Vec<Arc<ReadyModel>> {
        self.ready
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// True while `name` is in the zoo but not planned yet.
    pub fn is_pending(&self, name: &str) -> bool {
        !self.done.load(Ordering::Acquire)
            && self
                .pending
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(name)
    }

    /// The zoo's models still being planned (empty once planning is over: a model that
    /// failed is not served and not loading either).
    pub fn loading(&self) -> Vec<String> {
        if self.done.load(Ordering::Acquire) {
            return Vec::new();
        }
        let ready = self.ready.read().unwrap_or_else(|p| p.into_inner());
        self.pending
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .filter(|name| !ready.contains_key(*name))
            .cloned()
            .collect()
    }

    /// Lists the zoo's model directories (cheap; before the listener and the queue start).
    pub fn discover(&self, zoo: Option<&Path>) {
        let mut found = BTreeMap::new();
        if let Some(zoo) = zoo {
            match std::fs::read_dir(zoo) {
                Ok(rd) => {
                    for e in rd.flatten() {
                        let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                            continue;
                        };
                        if valid_name(&name) && e.path().join(beaa_model::MANIFEST_FILE).is_file() {
                            found.insert(name, e.path());
                        }
                    }
                }
                Err(e) => tracing::warn!(zoo = %zoo.display(), "cannot read the zoo: {e}"),
            }
        } else {
            tracing::warn!("no model zoo found (use --zoo DIR or $BEAA_ZOO)");
        }
        *self.pending.write().unwrap_or_else(|p| p.into_inner()) = found;
    }

    /// Plans the discovered models one after another (3x3 convolutions over at least
    /// `winograd = Some(c)` input channels in Winograd's form); `on_ready` runs after each
    /// (the queue may be waiting for it).
    pub fn plan_all(&self, insecure: bool, winograd: Option<usize>, on_ready: &dyn Fn()) {
        let found = self
            .pending
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (name, dir) in found {
            let t = std::time::Instant::now();
            match prepare(&name, &dir, insecure, winograd) {
                Ok(ready) => {
                    tracing::info!(
                        model = %name,
                        log_n = ready.params.spec().log_n,
                        depth = ready.plan.depth,
                        winograd = %ready.plan.winograd_layers().join(","),
                        insecure_test_params = insecure,
                        seconds = t.elapsed().as_secs_f64(),
                        "model ready"
                    );
                    self.ready
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name, Arc::new(ready));
                }
                Err(e) => tracing::warn!(model = %name, "model not served: {e}"),
            }
            on_ready();
        }
        self.done.store(true, Ordering::Release);
        on_ready();
    }
}

fn prepare(
    name: &str,
    dir: &Path,
    insecure: bool,
    winograd: Option<usize>,
) -> anyhow::Result<ReadyModel> {
    let model = Model::load(dir)?;
    let (params, plan) = if insecure {
        Plan::choose_insecure_for_tests_with(&model, winograd)?
    } else {
        let (params, plan) = Plan::choose_with(&model, winograd)?;
        // Never serve a set below 128 bits without the flag.
        anyhow::ensure!(
            params.is_secure(),
            "the chosen parameters are not 128-bit secure"
        );
        (params, plan)
    };
    let fingerprint = hex(params.fingerprint());
    let input_ct_len = ciphertext_len(&params, params.max_level(), 1, true);
    let rlk_len = RelinKey::serialized_len(&params);
    let work_peak = plan.work_dir_peak.0;
    let info = json!({
        "name": name,
        "classes": model.manifest.classes,
        "input": model.manifest.input,
        "params": params.spec(),
        "insecure_test_params": insecure,
        "params_fingerprint": fingerprint,
        "depth": plan.depth,
        "winograd": plan.winograd_layers(),
        "input_ciphertexts": model.input_len(),
        "output_ciphertexts": model.manifest.classes.len(),
        "max_batch": params.slots(),
        "input_ciphertext_bytes": input_ct_len,
        "relin_key_bytes": rlk_len,
        "work_dir_bytes": work_peak,
        "logits_calibration_max_abs": model.logit_calibration(),
        "validation": model.validation(),
    });
    let ev = Evaluator::new(&params);
    Ok(ReadyModel {
        name: name.to_owned(),
        model,
        params,
        plan,
        ev,
        fingerprint,
        input_ct_len,
        rlk_len,
        work_peak,
        info,
    })
}
