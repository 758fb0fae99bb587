//! Object stores: `s3://bucket/key` (AWS S3 and S3-compatible stores such as MinIO) beside local
//! paths, for inputs and outputs.
//!
//! Credentials and settings come from the standard AWS environment variables as object_store's
//! `AmazonS3Builder::from_env` reads them (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
//! `AWS_SESSION_TOKEN`, `AWS_REGION`, `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, …); [`StoreOptions`]
//! (`--s3-endpoint`, `--s3-allow-http`) override them.
//!
//! Everything here is blocking (the pipeline's stages are blocking threads): requests run on a
//! small runtime of their own. Reads are range requests of [`CHUNK`] bytes, so a file streams and
//! is never downloaded whole. Uploads of more than one chunk are multipart uploads, which S3 makes
//! visible only when complete: a failed or interrupted upload leaves no object. Transient errors
//! (5xx, throttling, connection failures) are retried with exponential backoff, by object_store's
//! HTTP client and again here for whole operations; missing objects and refused credentials fail
//! at once with the URL and the fix.

use std::io::Read;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as Key;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload, WriteMultipart};

use crate::error::{Error, Result};

/// Bytes per read request and per uploaded part (S3's minimum part size is 5 MiB).
pub const CHUNK: usize = 8 << 20;

/// Settings beyond the environment.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Endpoint of an S3-compatible store (`http://localhost:9000`); overrides `AWS_ENDPOINT`.
    pub endpoint: Option<String>,
    /// Allow plain HTTP (local MinIO, tests); overrides `AWS_ALLOW_HTTP`.
    pub allow_http: bool,
    /// Attempts per operation before a transient error is reported.
    pub attempts: usize,
    /// First backoff (doubling at each retry, up to 10 s).
    pub backoff: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            endpoint: None,
            allow_http: false,
            attempts: 5,
            backoff: Duration::from_millis(200),
        }
    }
}

/// Whether `location` names an object-store URL (rather than a local path).
pub fn is_url(location: &str) -> bool {
    location.starts_with("s3://") || location.starts_with("s3a://")
}

/// The runtime that runs object-store requests for blocking callers.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("esmbed-io")
            .enable_all()
            .build()
            .expect("an I/O runtime starts")
    })
}

/// An object: a store, a bucket and a key.
#[derive(Clone)]
pub struct ObjectUrl {
    store: Arc<dyn ObjectStore>,
    bucket: String,
    key: Key,
    options: Arc<StoreOptions>,
}

impl std::fmt::Debug for ObjectUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url())
    }
}

/// How an object-store failure is reported.
fn classify(url: &str, error: object_store::Error) -> (bool, Error) {
    use object_store::Error as E;
    let text = error.to_string();
    let (transient, reason) = match &error {
        E::NotFound { .. } => (
            false,
            "no such object (check the bucket and key)".to_string(),
        ),
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => (
            false,
            format!(
                "access denied ({text}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the \
                 profile's session token) and the bucket's policy"
            ),
        ),
        E::Generic { .. } if text.contains("403 Forbidden") || text.contains("401") => (
            false,
            format!(
                "access denied ({text}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the \
                 bucket's policy"
            ),
        ),
        E::Generic { .. } if text.contains("NoSuchBucket") || text.contains("404 Not Found") => {
            (false, format!("no such bucket or prefix ({text})"))
        }
        E::Generic { .. } | E::JoinError { .. } => (true, text),
        _ => (false, text),
    };
    (
        transient,
        Error::Remote {
            url: url.to_string(),
            reason,
        },
    )
}

impl ObjectUrl {
    /// Parse `s3://bucket/key` and connect (no request is made).
    pub fn parse(url: &str, options: &StoreOptions) -> Result<Self> {
        let bad = |reason: String| Error::Remote {
            url: url.to_string(),
            reason,
        };
        let rest = url
            .strip_prefix("s3://")
            .or_else(|| url.strip_prefix("s3a://"))
            .ok_or_else(|| bad("not an s3:// URL".into()))?;
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Err(bad("no bucket: write s3://BUCKET/KEY".into()));
        }
        let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(endpoint) = &options.endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        if options.allow_http {
            builder = builder.with_allow_http(true);
        }
        let retry = object_store::RetryConfig {
            max_retries: options.attempts.saturating_sub(1).min(10),
            retry_timeout: Duration::from_secs(60),
            backoff: object_store::BackoffConfig {
                init_backoff: options.backoff,
                ..Default::default()
            },
        };
        let store = builder
            .with_retry(retry)
            .build()
            .map_err(|e| bad(format!("cannot configure the store: {e}")))?;
        Ok(Self {
            store: Arc::new(store),
            bucket: bucket.to_string(),
            key: Key::from(key.trim_end_matches('/')),
            options: Arc::new(options.clone()),
        })
    }

    /// The same bucket over another store (tests wrap the store to inject faults).
    pub fn with_store(&self, store: Arc<dyn ObjectStore>) -> Self {
        Self {
            store,
            ..self.clone()
        }
    }

    /// The store (for DataFusion's registry).
    pub fn store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    /// The bucket.
    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// `s3://bucket/key`.
    pub fn url(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.key)
    }

    /// The key.
    pub fn key(&self) -> &str {
        self.key.as_ref()
    }

    /// Another key in the same bucket.
    pub fn with_key(&self, key: &str) -> Self {
        Self {
            key: Key::from(key),
            ..self.clone()
        }
    }

    /// A key below this one: `join("part-00000.parquet")`.
    pub fn join(&self, name: &str) -> Self {
        if self.key.as_ref().is_empty() {
            self.with_key(name)
        } else {
            self.with_key(&format!("{}/{name}", self.key))
        }
    }

    /// Run an operation, retrying transient failures with exponential backoff.
    fn retry<T, F, Fut>(&self, what: &str, op: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = object_store::Result<T>>,
    {
        let url = self.url();
        let mut delay = self.options.backoff;
        let attempts = self.options.attempts.max(1);
        for attempt in 1..=attempts {
            match runtime().block_on(op()) {
                Ok(v) => return Ok(v),
                Err(e) => {
                    let (transient, error) = classify(&url, e);
                    if !transient || attempt == attempts {
                        return Err(match error {
                            Error::Remote { url, reason } if attempt > 1 => Error::Remote {
                                url,
                                reason: format!("{what} failed {attempt} times, last: {reason}"),
                            },
                            other => other,
                        });
                    }
                    tracing::warn!("{url}: {what} failed ({error}); retrying in {delay:?}");
                    std::thread::sleep(delay);
                    delay = (delay * 2).min(Duration::from_secs(10));
                }
            }
        }
        unreachable!("the last attempt returns")
    }

    /// The object's metadata, or `None` if it does not exist.
    pub fn head(&self) -> Result<Option<ObjectMeta>> {
        match self.retry("HEAD", || self.store.head(&self.key)) {
            Ok(meta) => Ok(Some(meta)),
            Err(Error::Remote { reason, .. }) if reason.starts_with("no such object") => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The object's metadata; a missing object is an error naming it.
    pub fn require(&self) -> Result<ObjectMeta> {
        self.head()?.ok_or_else(|| Error::Remote {
            url: self.url(),
            reason: "no such object (check the bucket and key)".into(),
        })
    }

    /// Every object below this key (as a prefix), sorted by key.
    pub fn list(&self) -> Result<Vec<ObjectMeta>> {
        use futures::TryStreamExt;
        let prefix = (!self.key.as_ref().is_empty()).then_some(&self.key);
        let mut objects = self.retry("LIST", || self.store.list(prefix).try_collect::<Vec<_>>())?;
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(objects)
    }

    /// Bytes `range` of the object.
    pub fn get_range(&self, range: Range<u64>) -> Result<Bytes> {
        self.retry("GET", || self.store.get_range(&self.key, range.clone()))
    }

    /// The whole object (small objects: manifests).
    pub fn get(&self) -> Result<Bytes> {
        self.retry("GET", || async {
            self.store.get(&self.key).await?.bytes().await
        })
    }

    /// Write the object in one request (atomic: all or nothing).
    pub fn put(&self, bytes: Bytes) -> Result<()> {
        self.retry("PUT", || {
            self.store.put(&self.key, PutPayload::from(bytes.clone()))
        })
        .map(|_| ())
    }

    /// Upload a local file: one request when small, else a multipart upload that becomes visible
    /// only once complete (a failure aborts it, leaving no object). Retried as a whole.
    pub fn upload(&self, file: &Path) -> Result<()> {
        let size = std::fs::metadata(file)
            .map_err(|e| Error::io(file, e))?
            .len() as usize;
        if size <= CHUNK {
            let bytes = std::fs::read(file).map_err(|e| Error::io(file, e))?;
            return self.put(Bytes::from(bytes));
        }
        self.retry("multipart upload", || async {
            let upload = self.store.put_multipart(&self.key).await?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, CHUNK);
            let result = async {
                let mut source =
                    std::fs::File::open(file).map_err(|e| object_store::Error::Generic {
                        store: "local",
                        source: Box::new(e),
                    })?;
                let mut buffer = vec![0u8; CHUNK];
                loop {
                    writer.wait_for_capacity(4).await?;
                    let n = read_full(&mut source, &mut buffer).map_err(|e| {
                        object_store::Error::Generic {
                            store: "local",
                            source: Box::new(e),
                        }
                    })?;
                    if n == 0 {
                        break;
                    }
                    writer.write(&buffer[..n]);
                }
                Ok::<_, object_store::Error>(())
            }
            .await;
            match result {
                Ok(()) => writer.finish().await.map(|_| ()),
                Err(e) => {
                    let _ = writer.abort().await;
                    Err(e)
                }
            }
        })
    }

    /// Download the object to a local file (through a temporary name).
    pub fn download(&self, file: &Path) -> Result<()> {
        let meta = self.require()?;
        let temp = file.with_extension("download.tmp");
        let mut out = std::fs::File::create(&temp).map_err(|e| Error::io(&temp, e))?;
        let mut offset = 0u64;
        while offset < meta.size {
            let end = (offset + CHUNK as u64).min(meta.size);
            let bytes = self.get_range(offset..end)?;
            std::io::Write::write_all(&mut out, &bytes).map_err(|e| Error::io(&temp, e))?;
            offset = end;
        }
        out.sync_all().map_err(|e| Error::io(&temp, e))?;
        std::fs::rename(&temp, file).map_err(|e| Error::io(file, e))
    }

    /// Delete the object (absent is fine).
    pub fn delete(&self) -> Result<()> {
        match self.retry("DELETE", || self.store.delete(&self.key)) {
            Err(Error::Remote { reason, .. }) if reason.starts_with("no such object") => Ok(()),
            other => other,
        }
    }

    /// A sequential reader of the object, by range requests.
    pub fn reader(&self, size: u64) -> ObjectReader {
        ObjectReader {
            object: self.clone(),
            size,
            offset: 0,
            buffer: Bytes::new(),
        }
    }
}

fn read_full(source: &mut impl Read, buffer: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buffer.len() {
        match source.read(&mut buffer[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// Reads an object front to back, [`CHUNK`] bytes per request.
pub struct ObjectReader {
    object: ObjectUrl,
    size: u64,
    offset: u64,
    buffer: Bytes,
}

impl Read for ObjectReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.buffer.is_empty() {
            if self.offset >= self.size {
                return Ok(0);
            }
            let end = (self.offset + CHUNK as u64).min(self.size);
            self.buffer = self
                .object
                .get_range(self.offset..end)
                .map_err(std::io::Error::other)?;
            self.offset = end;
        }
        let n = out.len().min(self.buffer.len());
        out[..n].copy_from_slice(&self.buffer[..n]);
        self.buffer = self.buffer.slice(n..);
        Ok(n)
    }
}

/// A Parquet file in an object store, read by ranges (the footer first, then column chunks).
pub struct ObjectChunks {
    object: ObjectUrl,
    size: u64,
}

impl ObjectChunks {
    /// The object of `size` bytes.
    pub fn new(object: ObjectUrl, size: u64) -> Self {
        Self { object, size }
    }
}

impl parquet::file::reader::Length for ObjectChunks {
    fn len(&self) -> u64 {
        self.size
    }
}

impl parquet::file::reader::ChunkReader for ObjectChunks {
    type T = ObjectReader;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        let mut reader = self.object.reader(self.size);
        reader.offset = start;
        Ok(reader)
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.object
            .get_range(start..start + length as u64)
            .map_err(|e| parquet::errors::ParquetError::External(Box::new(e)))
    }
}

/// Whether a key matches a pattern with `*` (any characters but `/`) and `?` (one character).
pub fn glob_match(pattern: &str, key: &str) -> bool {
    fn go(p: &[u8], k: &[u8]) -> bool {
        match (p.first(), k.first()) {
            (None, None) => true,
            (Some(b'*'), _) => go(&p[1..], k) || (!k.is_empty() && k[0] != b'/' && go(p, &k[1..])),
            (Some(b'?'), Some(c)) if *c != b'/' => go(&p[1..], &k[1..]),
            (Some(a), Some(b)) if a == b => go(&p[1..], &k[1..]),
            _ => false,
        }
    }
    go(pattern.as_bytes(), key.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("in/*.fasta.gz", "in/a.fasta.gz"));
        assert!(!glob_match("in/*.fasta.gz", "in/sub/a.fasta.gz"));
        assert!(glob_match("in/part-?.parquet", "in/part-1.parquet"));
        assert!(!glob_match("in/part-?.parquet", "in/part-10.parquet"));
    }

    #[test]
    fn urls() {
        assert!(is_url("s3://b/k") && !is_url("/tmp/x") && !is_url("file:///x"));
        let options = StoreOptions::default();
        let o = ObjectUrl::parse("s3://bucket/dir/x.fasta", &options).unwrap();
        assert_eq!(o.url(), "s3://bucket/dir/x.fasta");
        assert_eq!(o.key(), "dir/x.fasta");
        let d = ObjectUrl::parse("s3://bucket/out/", &options).unwrap();
        assert_eq!(
            d.join("part-00000.parquet").url(),
            "s3://bucket/out/part-00000.parquet"
        );
        assert!(ObjectUrl::parse("s3:///x", &options).is_err());
    }
}
