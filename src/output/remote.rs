//! Outputs in an object store (`-o s3://bucket/emb.parquet` or `-o s3://bucket/emb/`).
//!
//! The job runs on a local copy of the output layout in a work directory, and every committed
//! file is mirrored to the store at the same relative key:
//! ```text
//!   s3://b/.emb.parquet.esmbed/part-00000.parquet   uploaded when the part commits (multipart:
//!   s3://b/.emb.parquet.esmbed/_manifest.json        visible only once complete), then the manifest
//!   s3://b/emb.parquet                                at the end: parts combined, uploaded, staging removed
//! ```
//! The manifest in the store is the job's memory: it is uploaded after the part it lists, so it
//! never names an object that is not complete. `--resume` (on this or any machine) downloads it
//! and skips the parts it lists; a file output downloads the parts it needs to combine them.
//! A killed upload leaves no object (S3 shows multipart uploads only when completed).

use std::path::{Path, PathBuf};

use sha2::Digest;

use super::{Manifest, OutputKind, OutputLayout};
use crate::error::{Error, Result};
use crate::storage::{ObjectUrl, StoreOptions};

/// A job output in an object store, mirrored from a local layout.
#[derive(Debug, Clone)]
pub struct RemoteOutput {
    /// What the user named.
    pub url: String,
    /// The layout the job writes locally.
    pub local: OutputLayout,
    /// Local directory that stands for the remote parent "folder" of the output.
    work: PathBuf,
    /// The remote parent "folder" (a key prefix; may be empty).
    root: ObjectUrl,
}

impl RemoteOutput {
    /// Plan the output `url` (`s3://bucket/key.parquet`, or `s3://bucket/prefix/` for a dataset)
    /// with its local work directory under `work_root` (the system's temporary directory by
    /// default).
    pub fn new(url: &str, store: &StoreOptions, work_root: Option<&Path>) -> Result<Self> {
        let target = ObjectUrl::parse(url, store)?;
        let key = target.key().trim_end_matches('/').to_string();
        if key.is_empty() {
            return Err(Error::Remote {
                url: url.into(),
                reason: "name the output: s3://bucket/emb.parquet or s3://bucket/emb/".into(),
            });
        }
        let (parent, name) = key.rsplit_once('/').unwrap_or(("", &key));
        let digest = sha2::Sha256::digest(url.as_bytes());
        let tag: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
        let work = work_root
            .map(Path::to_path_buf)
            .unwrap_or_else(std::env::temp_dir)
            .join(format!("esmbed-work-{tag}"));
        let dataset = url.ends_with('/') || !(name.ends_with(".parquet") || name.ends_with(".pq"));
        let local_target = if dataset {
            PathBuf::from(format!("{}/", work.join(name).display()))
        } else {
            work.join(name)
        };
        Ok(Self {
            url: url.to_string(),
            local: OutputLayout::new(&local_target),
            work,
            root: target.with_key(parent),
        })
    }

    /// The object that mirrors a local file of the layout.
    fn remote(&self, local: &Path) -> ObjectUrl {
        let relative = local
            .strip_prefix(&self.work)
            .expect("layout files live in the work directory");
        self.root.join(&relative.to_string_lossy())
    }

    /// The errors file's URL.
    pub fn errors_url(&self) -> String {
        self.remote(&self.local.errors).url()
    }

    /// The output's URL as the summary shows it.
    pub fn output_url(&self) -> String {
        self.url.clone()
    }

    /// Upload one committed local file.
    pub fn upload(&self, local: &Path) -> Result<()> {
        self.remote(local).upload(local)
    }

    fn finished(&self) -> Result<bool> {
        Ok(match self.local.kind {
            OutputKind::File => self.remote(&self.local.target).head()?.is_some(),
            OutputKind::Dataset => match self.remote_manifest()? {
                Some(m) => m.complete,
                None => false,
            },
        })
    }

    fn remote_manifest(&self) -> Result<Option<Manifest>> {
        let object = self.remote(&self.local.manifest_path());
        if object.head()?.is_none() {
            return Ok(None);
        }
        let text = object.get()?;
        serde_json::from_slice(&text)
            .map(Some)
            .map_err(|e| Error::Remote {
                url: object.url(),
                reason: format!(
                    "not a valid esmbed manifest ({e}); pass --overwrite to start over"
                ),
            })
    }

    /// Before the job: a clean work directory holding the store's manifest (if a previous run
    /// left one), so that the local checks for existing output, progress and `--resume` apply.
    pub fn start(&self, overwrite: bool, resume: bool) -> Result<()> {
        if self.work.exists() {
            std::fs::remove_dir_all(&self.work).map_err(|e| Error::io(&self.work, e))?;
        }
        std::fs::create_dir_all(&self.work).map_err(|e| Error::io(&self.work, e))?;
        if overwrite {
            return self.delete_all();
        }
        // The progress left in the store is checked by the job, on the manifest fetched below.
        super::check_existing(&self.url, self.finished()?, None, resume)?;
        if let Some(manifest) = self.remote_manifest()? {
            let path = self.local.manifest_path();
            std::fs::create_dir_all(path.parent().expect("in a directory"))
                .map_err(|e| Error::io(&path, e))?;
            manifest.save(&path)?;
        }
        Ok(())
    }

    /// Every object a previous job wrote at this output (for `--overwrite`).
    fn delete_all(&self) -> Result<()> {
        let staging = self.remote(&self.local.staging);
        let mut doomed: Vec<ObjectUrl> = staging
            .list()?
            .into_iter()
            .map(|m| staging.with_key(m.location.as_ref()))
            .collect();
        doomed.push(self.remote(&self.local.errors));
        match self.local.kind {
            OutputKind::File => doomed.push(self.remote(&self.local.target)),
            OutputKind::Dataset => {
                let target = self.remote(&self.local.target);
                for m in target.list()? {
                    let name = m.location.filename().unwrap_or("");
                    if (name.starts_with("part-") && name.ends_with(".parquet"))
                        || name == "_manifest.json"
                    {
                        doomed.push(target.with_key(m.location.as_ref()));
                    }
                }
            }
        }
        for object in doomed {
            object.delete()?;
        }
        Ok(())
    }

    /// Before combining a file output: download the finished parts (and their errors) that are
    /// not in the work directory (the job was resumed here from another run).
    pub fn fetch_parts(&self, manifest: &Manifest) -> Result<()> {
        for (&index, record) in &manifest.parts {
            let mut files = Vec::new();
            if self.local.kind == OutputKind::File {
                files.push(self.local.part_path(index));
            }
            if record.error_rows > 0 {
                files.push(self.local.part_errors_path(index));
            }
            for file in files {
                if !file.exists() {
                    self.remote(&file).download(&file)?;
                }
            }
        }
        Ok(())
    }

    /// After the local layout is final: upload the output (file) or the completed manifest
    /// (dataset) and the errors file, then remove the staging objects and the work directory.
    pub fn finish(&self, has_errors: bool) -> Result<()> {
        let errors = self.remote(&self.local.errors);
        if has_errors {
            errors.upload(&self.local.errors)?;
        } else {
            errors.delete()?;
        }
        match self.local.kind {
            OutputKind::File => self.upload(&self.local.target)?,
            OutputKind::Dataset => self.upload(&self.local.manifest_path())?,
        }
        let staging = self.remote(&self.local.staging);
        for m in staging.list()? {
            staging.with_key(m.location.as_ref()).delete()?;
        }
        std::fs::remove_dir_all(&self.work).map_err(|e| Error::io(&self.work, e))
    }
}
