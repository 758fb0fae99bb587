//! Where a model comes from, and its tensors under one naming.
//!
//! Four sources, one result ([`Checkpoint`]): an HF-format directory (`config.json` plus
//! `model.safetensors`, sharded safetensors with an index, or `pytorch_model.bin`), a fair-esm
//! `.pt` checkpoint, the `esm` package's ESM C `.pth`, or a HuggingFace hub id resolved through
//! the local cache ([`super::hub`]).
//! Tensor names are normalized to HF's `EsmModel` naming without the `esm.` prefix
//! (`encoder.layer.3.attention.self.query.weight`), so the model code has one vocabulary.
//! Tensors are read lazily (memory-mapped safetensors, lazily extracted pickles): a 15B checkpoint
//! is never held twice in memory.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;
use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::config::EsmConfig;
use super::esm_package;
use super::fair_esm;
use super::hub::HubOptions;
use super::names;
use crate::error::{Error, Result};

/// Where to load a model from, as the user named it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// An HF-format directory (`config.json` + weights).
    HfDir(PathBuf),
    /// A torch checkpoint file: fair-esm's (`esm2_t33_650M_UR50D.pt`, ESM-2) or the `esm`
    /// package's (`esmc_300m_2024_12_v0.pth`, ESM C), told apart by their contents.
    TorchFile(PathBuf),
    /// A HuggingFace hub id (`facebook/esm2_t33_650M_UR50D`).
    Hub(String),
    /// Random weights of a published shape (`random:650M`): for benchmarks of whole jobs; the
    /// vectors mean nothing.
    Random(String),
}

impl ModelSource {
    /// Interpret what the user typed: an existing directory or `.pt`/`.pth` file, a published short
    /// name (`650M`, `esmc-600m`), or a hub id (`org/name`).
    pub fn parse(spec: &str) -> Result<Self> {
        if let Some(shape) = spec.strip_prefix("random:") {
            return match EsmConfig::published(shape) {
                Some(_) => Ok(ModelSource::Random(shape.to_string())),
                None => Err(Error::model(
                    spec,
                    format!("unknown shape; use one of {}", EsmConfig::published_names()),
                )),
            };
        }
        let path = Path::new(spec);
        if path.is_dir() {
            return Ok(match esm_package_weights(path) {
                Some(pth) => ModelSource::TorchFile(pth),
                None => ModelSource::HfDir(path.to_path_buf()),
            });
        }
        if path.is_file() {
            return match path.extension().and_then(|e| e.to_str()) {
                Some("pt" | "pth") => Ok(ModelSource::TorchFile(path.to_path_buf())),
                Some("safetensors" | "json") => {
                    Ok(ModelSource::HfDir(path.parent().unwrap_or(Path::new(".")).into()))
                }
                _ => Err(Error::model(
                    spec,
                    "unknown file type: give an HF model directory, a fair-esm .pt or esm-package .pth file, or a hub id",
                )),
            };
        }
        if let Some(id) = EsmConfig::published_id(spec).filter(|id| *id != spec) {
            return Ok(ModelSource::Hub(id.to_string()));
        }
        let looks_like_id = spec.split('/').count() == 2
            && !spec.starts_with('.')
            && spec
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if looks_like_id {
            Ok(ModelSource::Hub(spec.to_string()))
        } else {
            Err(Error::model(
                spec,
                format!(
                    "no such file or directory, and not a hub id (`org/name`) or a published size ({})",
                    EsmConfig::published_names()
                ),
            ))
        }
    }

    /// How to name this source in messages.
    pub fn display_name(&self) -> String {
        match self {
            ModelSource::HfDir(p) | ModelSource::TorchFile(p) => p.display().to_string(),
            ModelSource::Hub(id) => id.clone(),
            ModelSource::Random(shape) => format!("random:{shape}"),
        }
    }
}

/// The one `.pth` under `data/weights/` of a directory without transformers' weights: the
/// layout of the `esm` package's hub repositories (`EvolutionaryScale/esmc-300m-2024-12`, whose
/// `config.json`, if present, is not transformers').
fn esm_package_weights(dir: &Path) -> Option<PathBuf> {
    let hf_weights = [
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
    ];
    if hf_weights.iter().any(|f| dir.join(f).exists()) {
        return None;
    }
    let mut weights = fs::read_dir(dir.join("data/weights"))
        .ok()?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "pth"));
    let first = weights.next()?;
    weights.next().is_none().then_some(first)
}

/// Backing storage of the tensors.
pub(super) enum Store {
    Safetensors(MmapedSafetensors),
    Pth(PthTensors),
}

/// A model's config and its tensors, under HF `EsmModel` names.
pub struct Checkpoint {
    /// The source as the user named it, for messages.
    pub source_name: String,
    /// Hyper-parameters.
    pub config: EsmConfig,
    store: Store,
    /// Normalized name → name in the file.
    names: HashMap<String, String>,
    /// The files the weights come from.
    files: Vec<PathBuf>,
}

impl Checkpoint {
    /// Open a checkpoint from any source. Hub ids are resolved through the local HF cache, and
    /// downloaded only where the hub is reachable and `HF_HUB_OFFLINE` is not set (the
    /// environment's [`HubOptions`]; see [`Checkpoint::open_with`]).
    pub fn open(source: &ModelSource) -> Result<Self> {
        Self::open_with(source, &HubOptions::from_env())
    }

    /// Open a checkpoint from any source, with hub ids resolved as `hub` says.
    pub fn open_with(source: &ModelSource, hub: &HubOptions) -> Result<Self> {
        match source {
            ModelSource::HfDir(dir) => Self::open_hf_dir(dir, &dir.display().to_string()),
            ModelSource::TorchFile(path) => Self::open_torch(path),
            ModelSource::Hub(id) => {
                let dir = super::hub::resolve(id, hub)?;
                match super::hub::package_weights(id) {
                    Some((_, file)) => Self::open_torch_named(&dir.join(file), id),
                    None => Self::open_hf_dir(&dir, id),
                }
            }
            ModelSource::Random(_) => Err(Error::model(
                source.display_name(),
                "random weights have no checkpoint; build them with Model::random",
            )),
        }
    }

    /// Open an HF-format directory.
    pub fn open_hf_dir(dir: &Path, source_name: &str) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = fs::read_to_string(&config_path).map_err(|e| {
            Error::model(
                source_name,
                format!("cannot read {}: {e}", config_path.display()),
            )
        })?;
        let config = EsmConfig::from_json(&text)
            .map_err(|e| Error::model(source_name, format!("{}: {e}", config_path.display())))?;
        config
            .validate()
            .map_err(|reason| Error::model(source_name, reason))?;

        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let bin = dir.join("pytorch_model.bin");
        let mut files = vec![config_path.clone()];
        let store = if single.is_file() {
            files.push(single.clone());
            Store::Safetensors(mmap_safetensors(&[single], source_name)?)
        } else if index.is_file() {
            let shards = shards_from_index(&index, source_name)?;
            files.extend(shards.iter().cloned());
            Store::Safetensors(mmap_safetensors(&shards, source_name)?)
        } else if bin.is_file() {
            files.push(bin.clone());
            Store::Pth(
                PthTensors::new(&bin, None)
                    .map_err(|e| Error::model(source_name, format!("{}: {e}", bin.display())))?,
            )
        } else {
            return Err(Error::model(
                source_name,
                format!(
                    "no weights in {}: expected model.safetensors, model.safetensors.index.json or pytorch_model.bin",
                    dir.display()
                ),
            ));
        };
        let names = resolve_names(&store, names::group(file_names(&store)), source_name)?;
        Ok(Self {
            source_name: source_name.to_string(),
            config,
            store,
            names,
            files,
        })
    }

    /// Open a torch checkpoint: the `esm` package's ESM C state dict where it has the package's
    /// names ([`esm_package`]), else a fair-esm checkpoint.
    pub fn open_torch(path: &Path) -> Result<Self> {
        Self::open_torch_named(path, &path.display().to_string())
    }

    /// [`Checkpoint::open_torch`], naming the source `source_name` in messages (a hub id).
    fn open_torch_named(path: &Path, source_name: &str) -> Result<Self> {
        match PthTensors::new(path, None) {
            Ok(pth) if pth.tensor_infos().contains_key(esm_package::MARKER) => {
                Self::open_esm_package(path, pth, source_name)
            }
            _ => Self::open_fair_esm(path),
        }
    }

    /// An `esm`-package ESM C state dict (`torch.save(model.state_dict())`).
    fn open_esm_package(path: &Path, pth: PthTensors, source_name: &str) -> Result<Self> {
        let hf = esm_package::hf_names(pth.tensor_infos().keys(), source_name)?;
        let shape = |hf_name: &str| {
            let info = pth.tensor_infos().get(hf.get(hf_name)?)?;
            Some(info.layout.shape().dims().to_vec())
        };
        let config = esm_package::config(&hf, shape, source_name)?;
        config
            .validate()
            .map_err(|reason| Error::model(source_name, reason))?;
        let store = Store::Pth(pth);
        let names = resolve_names(&store, names::group_as(hf), source_name)?;
        Ok(Self {
            source_name: source_name.to_string(),
            config,
            store,
            names,
            files: vec![path.to_path_buf()],
        })
    }

    /// Open a fair-esm `.pt` checkpoint (`{"cfg": {"model": ...}, "model": state_dict}`).
    pub fn open_fair_esm(path: &Path) -> Result<Self> {
        let source_name = path.display().to_string();
        let pth = PthTensors::new(path, Some("model")).map_err(|e| {
            Error::model(
                &source_name,
                format!(
                    "not a checkpoint esmbed reads ({e}): a torch file must be fair-esm's \
                     (ESM-2: {{\"cfg\", \"model\": state dict}}) or the esm package's ESM C state \
                     dict (names `transformer.blocks.*`); for anything else give an HF directory"
                ),
            )
        })?;
        let store = Store::Pth(pth);
        let hf: HashMap<String, String> = file_names(&store)
            .into_iter()
            .filter_map(|name| Some((fair_esm::hf_name(&name)?, name)))
            .collect();
        let config = fair_esm::config(path, &hf, &store, &source_name)?;
        // fair-esm names mapped to HF's, then HF's rules (one inv_freq for the model).
        let names = resolve_names(&store, names::group_as(hf), &source_name)?;
        config
            .validate()
            .map_err(|reason| Error::model(&source_name, reason))?;
        Ok(Self {
            source_name,
            config,
            store,
            names,
            files: vec![path.to_path_buf()],
        })
    }

    /// A fingerprint of the weights: SHA-256 over the config, and each file's size, first and last
    /// 4 MiB (a safetensors or pickle header lists every tensor; the samples catch re-trained
    /// weights of the same shape). Hashing every byte of a 15B model would take minutes.
    pub fn fingerprint(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        use std::io::{Seek, SeekFrom};
        const SAMPLE: u64 = 4 << 20;
        let mut hasher = Sha256::new();
        hasher.update(serde_json::to_vec(&self.config).expect("config serializes"));
        for path in &self.files {
            let mut file = fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let size = file.metadata().map_err(|e| Error::io(path, e))?.len();
            hasher.update(size.to_le_bytes());
            let mut buf = Vec::new();
            (&mut file)
                .take(SAMPLE)
                .read_to_end(&mut buf)
                .map_err(|e| Error::io(path, e))?;
            if size > 2 * SAMPLE {
                file.seek(SeekFrom::Start(size - SAMPLE))
                    .map_err(|e| Error::io(path, e))?;
                file.take(SAMPLE)
                    .read_to_end(&mut buf)
                    .map_err(|e| Error::io(path, e))?;
            }
            hasher.update(&buf);
        }
        Ok(format!("sha256:{:x}", hasher.finalize()))
    }

    /// Whether the checkpoint has a masked-LM head (an `EsmForMaskedLM` save or a fair-esm
    /// `.pt`), which scores need.
    pub fn has_lm_head(&self) -> bool {
        self.contains("lm_head.dense.weight")
    }

    /// Whether a tensor exists. Any name transformers accepts for it works
    /// ([`names::canonical`]): `esm.`-prefixed, legacy `gamma`/`beta`, per-layer `inv_freq`.
    pub fn contains(&self, name: &str) -> bool {
        self.file_name(name).is_some()
    }

    /// The name in the file of the tensor `name` (any accepted name).
    fn file_name(&self, name: &str) -> Option<&String> {
        let canonical = names::canonical(name).unwrap_or_else(|| name.to_string());
        self.names.get(&canonical)
    }

    /// Shape of a tensor without loading it.
    pub fn shape(&self, name: &str) -> Option<Vec<usize>> {
        let file_name = self.file_name(name)?;
        match &self.store {
            Store::Safetensors(st) => st.get(file_name).ok().map(|v| v.shape().to_vec()),
            Store::Pth(pth) => pth
                .tensor_infos()
                .get(file_name)
                .map(|info| info.layout.shape().dims().to_vec()),
        }
    }

    /// Load a tensor by normalized name, checking its shape, converted to `dtype` on `device`.
    pub fn load(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let tensor = self.load_any(name, dtype, device)?;
        if tensor.dims() != shape {
            return Err(Error::TensorShape {
                source_name: self.source_name.clone(),
                tensor: name.to_string(),
                found: tensor.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        Ok(tensor)
    }

    /// Load a tensor by normalized name, whatever its shape.
    pub fn load_any(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let missing = || Error::MissingTensor {
            source_name: self.source_name.clone(),
            tensor: name.to_string(),
            tried: names::aliases(name),
        };
        let file_name = self.file_name(name).ok_or_else(missing)?;
        let tensor = read(&self.store, file_name)?.ok_or_else(missing)?;
        Ok(tensor.to_dtype(dtype)?.to_device(device)?)
    }

    /// The names of all tensors the checkpoint holds (normalized).
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.names.keys().map(String::as_str)
    }
}

fn mmap_safetensors(paths: &[PathBuf], source_name: &str) -> Result<MmapedSafetensors> {
    // SAFETY: the files are opened read-only; as with every mmap, modifying them while esmbed runs
    // is undefined behaviour, which is the documented contract of candle's loader.
    unsafe { MmapedSafetensors::multi(paths) }
        .map_err(|e| Error::model(source_name, format!("cannot read safetensors: {e}")))
}

fn shards_from_index(index: &Path, source_name: &str) -> Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: HashMap<String, String>,
    }
    let text = fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let parsed: Index = serde_json::from_str(&text)
        .map_err(|e| Error::model(source_name, format!("{}: {e}", index.display())))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<&String> = parsed.weight_map.values().collect();
    files.sort();
    files.dedup();
    // Shards are files beside the index: a name that leaves the directory is refused.
    if let Some(bad) = files.iter().find(|f| {
        Path::new(f.as_str()).components().count() != 1
            || !matches!(
                Path::new(f.as_str()).components().next(),
                Some(std::path::Component::Normal(_))
            )
    }) {
        return Err(Error::model(
            source_name,
            format!(
                "{}: shard {bad:?} is not a file name in the model directory",
                index.display()
            ),
        ));
    }
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}

fn file_names(store: &Store) -> Vec<String> {
    match store {
        Store::Safetensors(st) => st.tensors().into_iter().map(|(name, _)| name).collect(),
        Store::Pth(pth) => pth.tensor_infos().keys().cloned().collect(),
    }
}

/// A tensor as the file names it, on the CPU in its stored dtype.
fn read(store: &Store, file_name: &str) -> Result<Option<Tensor>> {
    Ok(match store {
        Store::Safetensors(st) => Some(st.load(file_name, &Device::Cpu)?),
        Store::Pth(pth) => pth.get(file_name)?,
    })
}

/// Canonical name → the file name to read it from. Where several file names resolve to one
/// parameter ([`names::group`]), they must hold the same values: else the checkpoint is refused,
/// naming both (esmbed never picks one silently).
fn resolve_names(
    store: &Store,
    groups: std::collections::BTreeMap<String, Vec<String>>,
    source_name: &str,
) -> Result<HashMap<String, String>> {
    let mut resolved = HashMap::with_capacity(groups.len());
    for (canonical, file_names) in groups {
        let first = &file_names[0];
        if file_names.len() > 1 {
            let values = |name: &str| -> Result<Option<(Vec<usize>, Vec<f32>)>> {
                let Some(t) = read(store, name)? else {
                    return Ok(None);
                };
                let t = t.to_dtype(DType::F32)?;
                Ok(Some((
                    t.dims().to_vec(),
                    t.flatten_all()?.to_vec1::<f32>()?,
                )))
            };
            let reference = values(first)?;
            for other in &file_names[1..] {
                let same = match (&reference, values(other)?) {
                    (Some((da, a)), Some((db, b))) => {
                        *da == db && a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits())
                    }
                    _ => false,
                };
                if !same {
                    return Err(Error::ConflictingTensors {
                        source_name: source_name.to_string(),
                        parameter: canonical,
                        first: first.clone(),
                        second: other.clone(),
                    });
                }
            }
        }
        resolved.insert(canonical, first.clone());
    }
    Ok(resolved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sources() {
        assert_eq!(
            ModelSource::parse("650M").unwrap(),
            ModelSource::Hub("facebook/esm2_t33_650M_UR50D".into())
        );
        assert_eq!(
            ModelSource::parse("facebook/esm2_t6_8M_UR50D").unwrap(),
            ModelSource::Hub("facebook/esm2_t6_8M_UR50D".into())
        );
        let err = ModelSource::parse("./no/such/dir").unwrap_err().to_string();
        assert!(err.contains("no such file"), "{err}");
    }
}
