//! HuggingFace hub ids resolved to a local snapshot directory, through the same cache layout as
//! Python's `huggingface_hub` (`$HF_HOME/hub/models--org--name/snapshots/<rev>/`), so a model
//! downloaded by either is found by both.
//!
//! [`HubOptions`] say where the cache is and whether the network may be used; the CLI takes them
//! from the environment ([`HubOptions::from_env`]: `HF_HOME`, `HF_HUB_OFFLINE`), a library user or
//! a test passes them. Offline means the cache only: no network access is attempted, and a model
//! that is not cached is an error saying how to get it there.

use std::path::PathBuf;

use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo};

use crate::error::{Error, Result};

const CONFIG: &str = "config.json";
const WEIGHTS: &str = "model.safetensors";
const INDEX: &str = "model.safetensors.index.json";

/// The `esm` package's ESM C repositories: no `config.json`, the weights one `.pth` state dict
/// ([`super::esm_package`]).
const ESM_PACKAGE_REPOS: [(&str, &str); 2] = [
    (
        "EvolutionaryScale/esmc-300m-2024-12",
        "data/weights/esmc_300m_2024_12_v0.pth",
    ),
    (
        "EvolutionaryScale/esmc-600m-2024-12",
        "data/weights/esmc_600m_2024_12_v0.pth",
    ),
];

/// An `esm`-package repository's id as the hub spells it, and its weights file.
pub(super) fn package_weights(model_id: &str) -> Option<(&'static str, &'static str)> {
    ESM_PACKAGE_REPOS
        .iter()
        .find(|(id, _)| id.eq_ignore_ascii_case(model_id))
        .copied()
}

/// The snapshot directory of `file` (which may sit in a subdirectory of the snapshot).
fn snapshot_of(file: &std::path::Path, name: &str) -> PathBuf {
    let depth = name.split('/').count();
    file.ancestors()
        .nth(depth)
        .map(PathBuf::from)
        .unwrap_or_default()
}

/// Where hub models are cached, and whether they may be downloaded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubOptions {
    /// The hub cache directory (`$HF_HOME/hub`, `~/.cache/huggingface/hub` by default).
    pub cache_dir: PathBuf,
    /// The cache only: never reach the network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
}

impl HubOptions {
    /// As `huggingface_hub` reads the environment: `HF_HOME` for the cache, `HF_HUB_OFFLINE`.
    pub fn from_env() -> Self {
        Self {
            cache_dir: Cache::from_env().path().clone(),
            offline: std::env::var("HF_HUB_OFFLINE")
                .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
                .unwrap_or(false),
        }
    }
}

/// The snapshot directory of `model_id`: from the cache when it holds the config and the weights,
/// else downloaded (unless offline).
pub fn resolve(model_id: &str, options: &HubOptions) -> Result<PathBuf> {
    let cache = Cache::new(options.cache_dir.clone());
    if let Some(dir) = cached(&cache, model_id) {
        return Ok(dir);
    }
    if options.offline {
        return Err(Error::Hub {
            model_id: model_id.to_string(),
            reason: format!(
                "not in the HuggingFace cache ({}) and HF_HUB_OFFLINE is set. Download it where \
                 the hub is reachable (`huggingface-cli download {model_id}`, or any esmbed run \
                 without HF_HUB_OFFLINE) and point HF_HOME at that cache, or pass a local model \
                 directory or .pt file with --model",
                cache.path().display()
            ),
        });
    }
    download(model_id, options)
}

/// The snapshot directory if the cache holds the config and the weights (single or sharded), or
/// an `esm`-package repository's weights.
fn cached(cache: &Cache, model_id: &str) -> Option<PathBuf> {
    if let Some((id, file)) = package_weights(model_id) {
        let repo = cache.repo(Repo::model(id.to_string()));
        return repo.get(file).map(|path| snapshot_of(&path, file));
    }
    let repo = cache.repo(Repo::model(model_id.to_string()));
    let config = repo.get(CONFIG)?;
    let dir = config.parent()?.to_path_buf();
    let complete = repo.get(WEIGHTS).is_some()
        || repo.get(INDEX).is_some_and(|index| {
            std::fs::read_to_string(index)
                .ok()
                .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
                .and_then(|v| {
                    v.get("weight_map")?.as_object().map(|map| {
                        map.values()
                            .filter_map(|f| f.as_str())
                            .all(|f| dir.join(f).is_file())
                    })
                })
                .unwrap_or(false)
        });
    complete.then_some(dir)
}

fn download(model_id: &str, options: &HubOptions) -> Result<PathBuf> {
    let hub_error = |what: &str, e: hf_hub::api::sync::ApiError| Error::Hub {
        model_id: model_id.to_string(),
        reason: format!(
            "could not download {what}: {e}. Check the id and your network; behind a proxy set \
             HTTPS_PROXY; for a mirror set HF_ENDPOINT; on a machine without network use \
             HF_HUB_OFFLINE=1 with a filled cache, or a local model directory"
        ),
    };
    let api = ApiBuilder::from_env()
        .with_cache_dir(options.cache_dir.clone())
        .with_progress(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_retries(3)
        .build()
        .map_err(|e| hub_error("anything (cannot start the hub client)", e))?;
    if let Some((id, file)) = package_weights(model_id) {
        let path = api
            .model(id.to_string())
            .get(file)
            .map_err(|e| hub_error(file, e))?;
        return Ok(snapshot_of(&path, file));
    }
    let repo = api.model(model_id.to_string());
    let config = repo.get(CONFIG).map_err(|e| hub_error(CONFIG, e))?;
    if repo.get(WEIGHTS).is_err() {
        let index = repo.get(INDEX).map_err(|e| hub_error(WEIGHTS, e))?;
        let text = std::fs::read_to_string(&index).map_err(|e| Error::io(&index, e))?;
        let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::Hub {
            model_id: model_id.to_string(),
            reason: format!("{INDEX} is not valid JSON: {e}"),
        })?;
        let mut shards: Vec<&str> = value
            .get("weight_map")
            .and_then(|m| m.as_object())
            .map(|m| m.values().filter_map(|f| f.as_str()).collect())
            .unwrap_or_default();
        shards.sort_unstable();
        shards.dedup();
        for shard in shards {
            repo.get(shard).map_err(|e| hub_error(shard, e))?;
        }
    }
    Ok(config.parent().map(PathBuf::from).unwrap_or_default())
}
