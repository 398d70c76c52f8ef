//! `beaa keygen`: the client's keys for a model, written to a directory.
//!
//! `secret.key` (mode 0600, `SecretKey::to_local_bytes`; never uploaded), `relin.key` (the
//! evaluation key the server needs) and `keys.json` (model, parameter set, fingerprint).

use crate::predict::fetch_model;
use anyhow::{bail, Context, Result};
use beaa_ckks::{KeyGenerator, Params, RelinKey, SecretKey};
use serde_json::json;
use std::path::{Path, PathBuf};

pub const SECRET_FILE: &str = "secret.key";
pub const RELIN_FILE: &str = "relin.key";
pub const META_FILE: &str = "keys.json";

#[derive(clap::Args, Debug)]
pub struct KeygenArgs {
    /// The model (a served name with --server, else a shipped name or a model directory).
    #[arg(long)]
    pub model: String,
    /// Where to write the keys (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Take the parameter set from this server's /api/models instead of planning locally.
    #[arg(long)]
    pub server: Option<String>,
    /// Plan locally on the NOT SECURE test parameters (matches `serve --insecure-test-params`).
    #[arg(long)]
    pub insecure_test_params: bool,
}

/// A client's keys as loaded from or written to a directory.
pub struct ClientKeys {
    pub sk: SecretKey,
    pub rlk_bytes: Vec<u8>,
}

pub fn run(args: &KeygenArgs) -> Result<()> {
    let (params, insecure) = match &args.server {
        Some(url) => {
            let m = fetch_model(url, &args.model)?;
            (m.params, m.insecure)
        }
        None => {
            let (_, model) = crate::models::load(&args.model)?;
            let (params, _) = if args.insecure_test_params {
                beaa_engine::Plan::choose_insecure_for_tests(&model)?
            } else {
                beaa_engine::Plan::choose(&model)?
            };
            (params, args.insecure_test_params)
        }
    };
    let t = std::time::Instant::now();
    let keys = generate(&params);
    save(&args.out, &args.model, &params, insecure, &keys)?;
    eprintln!(
        "keys for {} (N = {}, fingerprint {}) in {}: {:.1} s",
        args.model,
        params.n(),
        &crate::serve::util::hex(params.fingerprint())[..16],
        args.out.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn generate(params: &Params) -> ClientKeys {
    let mut kg = KeyGenerator::new(params);
    let sk = kg.secret_key();
    let rlk_bytes = kg.relin_key(&sk).to_bytes();
    ClientKeys { sk, rlk_bytes }
}

pub fn save(
    dir: &Path,
    model: &str,
    params: &Params,
    insecure: bool,
    keys: &ClientKeys,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let sk_bytes = keys.sk.to_local_bytes();
    crate::files::write_private(&dir.join(SECRET_FILE), &sk_bytes)?;
    std::fs::write(dir.join(RELIN_FILE), &keys.rlk_bytes)?;
    let meta = json!({
        "model": model,
        "params": params.spec(),
        "insecure_test_params": insecure,
        "params_fingerprint": crate::serve::util::hex(params.fingerprint()),
    });
    std::fs::write(dir.join(META_FILE), serde_json::to_vec_pretty(&meta)?)?;
    Ok(())
}

/// Loads keys from `dir` if they were made for `params` (None when the directory has none).
pub fn load(dir: &Path, params: &Params) -> Result<Option<ClientKeys>> {
    let secret = dir.join(SECRET_FILE);
    if !secret.is_file() {
        return Ok(None);
    }
    let meta: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(META_FILE))?)
        .context("reading keys.json")?;
    let fp = crate::serve::util::hex(params.fingerprint());
    if meta["params_fingerprint"].as_str() != Some(fp.as_str()) {
        bail!(
            "the keys in {} were made for another parameter set than the server's",
            dir.display()
        );
    }
    let sk_bytes = zeroize::Zeroizing::new(std::fs::read(&secret)?);
    let sk = SecretKey::from_local_bytes(params, &sk_bytes).context("reading secret.key")?;
    let rlk_bytes = std::fs::read(dir.join(RELIN_FILE))?;
    RelinKey::from_bytes(params, &rlk_bytes).context("reading relin.key")?;
    Ok(Some(ClientKeys { sk, rlk_bytes }))
}

impl std::fmt::Debug for ClientKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientKeys(..)")
    }
}
