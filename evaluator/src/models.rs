//! Finding a model by name: a shipped one in `models/zoo/<name>/`, or a directory path.

use anyhow::{bail, Context, Result};
use beaa_model::Model;
use std::path::{Path, PathBuf};

/// Directories searched for shipped models: `$BEAA_ZOO`, `./models/zoo`, and `models/zoo`
/// above the executable (for `target/release/beaa` run from anywhere in a checkout).
pub fn zoo_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(z) = std::env::var_os("BEAA_ZOO") {
        dirs.push(PathBuf::from(z));
    }
    dirs.push(PathBuf::from("models/zoo"));
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            dirs.push(dir.join("models/zoo"));
        }
    }
    dirs
}

/// Resolves `name`: an existing directory, else a shipped model of that name.
pub fn resolve(name: &str) -> Result<PathBuf> {
    let as_path = Path::new(name);
    if as_path.join(beaa_model::MANIFEST_FILE).is_file() {
        return Ok(as_path.to_path_buf());
    }
    // A shipped name is a plain word: never let it walk the file system.
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        bail!("no model directory at {name:?}");
    }
    for zoo in zoo_dirs() {
        let dir = zoo.join(name);
        if dir.join(beaa_model::MANIFEST_FILE).is_file() {
            return Ok(dir);
        }
    }
    bail!("unknown model {name:?}: not a model directory, and no models/zoo/{name}/ was found")
}

pub fn load(name: &str) -> Result<(PathBuf, Model)> {
    let dir = resolve(name)?;
    let model =
        Model::load(&dir).with_context(|| format!("loading model from {}", dir.display()))?;
    Ok((dir, model))
}
