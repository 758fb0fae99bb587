//! Object stores beside local paths, for inputs and outputs, on object_store's primitives.
//!
//! ```text
//!   "s3://bucket/in/*.fa.gz" ─ ObjectStoreScheme ─> a store for s3://bucket (StoreOptions: retry
//!                                                   policy, endpoint, credentials)
//!                            └ the key as typed ──> ObjectUrl (store + key) or KeyPattern (a glob)
//! ```
//! Schemes built: `s3://` and `s3a://` (AWS S3 and S3-compatible stores such as MinIO) and
//! `file://`. `gs://` (Google Cloud Storage) and `az://`, `abfs://` … (Azure) are object_store's
//! too, behind this crate's cargo features `gcs` and `azure`; a URL of a scheme that is not built
//! is an error that names the feature.
//!
//! Settings are [`StoreOptions`]: the CLI starts from the environment ([`StoreOptions::from_env`]:
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_REGION`,
//! `AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, … as object_store's `AmazonS3Builder::from_env` reads them)
//! and `--s3-endpoint`, `--s3-allow-http`, `--s3-attempts` override it; a library user or a test
//! passes endpoint, region and credentials explicitly.
//!
//! Everything here is blocking (the pipeline's stages are blocking threads): requests run on a
//! small runtime of their own. Reads are range requests of [`CHUNK`] bytes, so a file streams and
//! is never downloaded whole. Uploads go through object_store's `BufWriter`: up to [`CHUNK`] bytes
//! one PUT, beyond that a multipart upload, which S3 makes visible only when complete; a failed
//! upload is aborted and leaves no object (one whose last parts fail while it completes is left
//! incomplete, invisible, for the bucket's lifecycle rule to remove).
//!
//! Retries are object_store's alone (its `RetryConfig`): a request that meets a transient error
//! (5xx, throttling, a dropped connection) is sent again with exponential backoff, `attempts` times
//! in all; nothing here retries again. Failures are sorted by object_store's error variants (and
//! the HTTP status the store answered, see `errors`), never by their text: a missing object is
//! [`Error::NotFound`], refused credentials and everything else [`Error::Store`], each with the
//! URL and the fix.

mod connect;
mod errors;
pub mod glob;
mod read;

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use object_store::client::HttpConnector;
use object_store::path::Path as Key;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, ObjectStoreScheme, PutPayload};
use url::Url;

use crate::error::{Error, Result};

pub use self::connect::connect;
pub use self::glob::KeyPattern;
pub use self::read::{ObjectChunks, ObjectReader};

/// Bytes per read request and per uploaded part (S3's minimum part size is 5 MiB).
pub const CHUNK: usize = 8 << 20;

/// How stores are reached: the environment or explicit settings, and the retry policy.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Start from the environment's settings (the `AWS_*` variables as `AmazonS3Builder::from_env`
    /// reads them; for `gs://` and `az://` their builders' `from_env`). The fields below override
    /// them.
    pub environment: bool,
    /// Endpoint of an S3-compatible store (`http://localhost:9000`).
    pub endpoint: Option<String>,
    /// Allow plain HTTP (local MinIO, tests).
    pub allow_http: bool,
    /// The S3 region.
    pub region: Option<String>,
    /// Static S3 credentials.
    pub credentials: Option<Credentials>,
    /// Attempts per request before a transient error is reported (object_store's `max_retries`
    /// is one less).
    pub attempts: usize,
    /// First backoff (doubling at each retry, with jitter, up to 10 s).
    pub backoff: Duration,
    /// The HTTP client under object_store's retries; `None` is object_store's own (reqwest).
    /// Tests put a fault injector here.
    pub http: Option<Arc<dyn HttpConnector>>,
}

impl Default for StoreOptions {
    /// Nothing from the environment: explicit settings only, 5 attempts per request.
    fn default() -> Self {
        Self {
            environment: false,
            endpoint: None,
            allow_http: false,
            region: None,
            credentials: None,
            attempts: 5,
            backoff: Duration::from_millis(200),
            http: None,
        }
    }
}

impl StoreOptions {
    /// The environment's settings (what the CLI starts from).
    pub fn from_env() -> Self {
        Self {
            environment: true,
            ..Self::default()
        }
    }
}

/// An access key (S3 and S3-compatible stores). `Debug` does not show the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: String,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: String,
    /// `AWS_SESSION_TOKEN`, for temporary credentials.
    pub session_token: Option<String>,
}

impl Credentials {
    /// A key without a session token.
    pub fn new(access_key_id: impl Into<String>, secret_access_key: impl Into<String>) -> Self {
        Self {
            access_key_id: access_key_id.into(),
            secret_access_key: secret_access_key.into(),
            session_token: None,
        }
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"…")
            .field("session_token", &self.session_token.as_ref().map(|_| "…"))
            .finish()
    }
}

/// Whether `location` names an object store (rather than a local path or `file://` URL).
pub fn is_url(location: &str) -> bool {
    Url::parse(location)
        .ok()
        .and_then(|url| ObjectStoreScheme::parse(&url).ok())
        .is_some_and(|(scheme, _)| scheme != ObjectStoreScheme::Local)
}

/// `s3://bucket/in/*.fa.gz` → the store's URL (`s3://bucket`) and its scheme, and the key as
/// typed (`in/*.fa.gz`). The key is taken from the text, not the parsed URL: a URL parser would
/// read a glob's `?` as the start of a query.
pub fn split(location: &str) -> Result<(Url, ObjectStoreScheme, &str)> {
    let bad = |reason: String| Error::Remote {
        url: location.to_string(),
        reason,
    };
    let url = Url::parse(location).map_err(|e| bad(format!("not a URL ({e})")))?;
    let (scheme, _) = ObjectStoreScheme::parse(&url).map_err(|_| {
        bad(format!(
            "not an object-store URL: write s3://BUCKET/KEY{}",
            connect::OTHER_SCHEMES
        ))
    })?;
    if matches!(scheme, ObjectStoreScheme::Http | ObjectStoreScheme::Memory) {
        return Err(bad(format!(
            "{}:// is not a store esmbed reads: write s3://BUCKET/KEY{}",
            url.scheme(),
            connect::OTHER_SCHEMES
        )));
    }
    let root = Url::parse(&url[..url::Position::BeforePath])
        .map_err(|e| bad(format!("not a URL ({e})")))?;
    let key = location
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('/'))
        .map_or("", |(_, key)| key);
    Ok((root, scheme, key))
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

/// An object: a store and a key.
#[derive(Clone)]
pub struct ObjectUrl {
    store: Arc<dyn ObjectStore>,
    /// The store's URL (`s3://bucket`), for messages.
    root: Arc<str>,
    key: Key,
}

impl std::fmt::Debug for ObjectUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.url())
    }
}

impl ObjectUrl {
    /// Parse `s3://bucket/key` (or another built scheme) and connect (no request is made).
    pub fn parse(location: &str, options: &StoreOptions) -> Result<Self> {
        let (root, scheme, key) = split(location)?;
        let store = connect::store(&root, scheme, options)?;
        Ok(Self {
            store,
            root: root[..url::Position::BeforePath].into(),
            key: Key::from(key.trim_end_matches('/')),
        })
    }

    /// `s3://bucket/key`.
    pub fn url(&self) -> String {
        format!("{}/{}", self.root, self.key)
    }

    /// The key.
    pub fn key(&self) -> &str {
        self.key.as_ref()
    }

    /// Another key in the same store.
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

    /// Run one operation (`what`, for messages) to its end, object_store's retries included.
    fn run<T>(
        &self,
        what: &str,
        operation: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> Result<T> {
        let (result, tries) = runtime().block_on(errors::recorded(operation));
        result.map_err(|e| errors::store_error(&self.url(), what, e, tries))
    }

    /// The object's metadata, or `None` if it does not exist.
    pub fn head(&self) -> Result<Option<ObjectMeta>> {
        match self.run("HEAD", self.store.head(&self.key)) {
            Ok(meta) => Ok(Some(meta)),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The object's metadata; a missing object is an error naming it.
    pub fn require(&self) -> Result<ObjectMeta> {
        self.head()?.ok_or_else(|| Error::NotFound {
            url: self.url(),
            hint: errors::NO_SUCH_OBJECT.into(),
        })
    }

    /// Every object below this key (as a prefix), sorted by key.
    pub fn list(&self) -> Result<Vec<ObjectMeta>> {
        use futures::TryStreamExt;
        let prefix = (!self.key.as_ref().is_empty()).then_some(&self.key);
        let mut objects = self.run("LIST", self.store.list(prefix).try_collect::<Vec<_>>())?;
        objects.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(objects)
    }

    /// The objects of this store whose keys match `pattern`, sorted by key.
    pub fn matching(&self, pattern: &KeyPattern) -> Result<Vec<ObjectMeta>> {
        self.with_key(pattern.base())
            .run("LIST", glob::matching(self.store.as_ref(), pattern))
    }

    /// Bytes `range` of the object.
    pub fn get_range(&self, range: std::ops::Range<u64>) -> Result<Bytes> {
        self.run("GET", self.store.get_range(&self.key, range))
    }

    /// The whole object (small objects: manifests).
    pub fn get(&self) -> Result<Bytes> {
        self.run("GET", async {
            self.store.get(&self.key).await?.bytes().await
        })
    }

    /// Write the object in one request (atomic: all or nothing).
    pub fn put(&self, bytes: Bytes) -> Result<()> {
        self.run("PUT", self.store.put(&self.key, PutPayload::from(bytes)))
            .map(|_| ())
    }

    /// Upload a local file through object_store's `BufWriter`: one request when small, else a
    /// multipart upload that becomes visible only once complete (a failure aborts it).
    pub fn upload(&self, file: &Path) -> Result<()> {
        let mut source = std::fs::File::open(file).map_err(|e| Error::io(file, e))?;
        let store = self.store.clone();
        let key = self.key.clone();
        self.run("upload", read::upload(&mut source, store, key))?
            .map_err(|e| Error::io(file, e))
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
        match self.run("DELETE", self.store.delete(&self.key)) {
            Err(Error::NotFound { .. }) => Ok(()),
            other => other,
        }
    }

    /// A sequential reader of the object, by range requests.
    pub fn reader(&self, size: u64) -> ObjectReader {
        ObjectReader::new(self.clone(), size, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn keys_are_taken_as_typed() {
        let (root, scheme, key) = split("s3://bucket/in/part-?.parquet").unwrap();
        assert_eq!(
            (root.as_str(), scheme, key),
            (
                "s3://bucket",
                ObjectStoreScheme::AmazonS3,
                "in/part-?.parquet"
            )
        );
        let (_, scheme, key) = split("file:///tmp/a b.fa").unwrap();
        assert_eq!((scheme, key), (ObjectStoreScheme::Local, "tmp/a b.fa"));
        let local = ObjectUrl::parse("file:///tmp/x.fa", &StoreOptions::default()).unwrap();
        assert_eq!(local.url(), "file:///tmp/x.fa");
    }

    #[test]
    fn schemes_that_are_not_built_say_so() {
        let options = StoreOptions::default();
        for url in ["https://example.com/x", "memory:///x", "nope://b/x"] {
            let error = ObjectUrl::parse(url, &options).unwrap_err().to_string();
            assert!(error.contains("s3://BUCKET/KEY"), "{url}: {error}");
        }
        #[cfg(not(feature = "gcs"))]
        {
            let error = ObjectUrl::parse("gs://b/x", &options).unwrap_err();
            assert!(error.to_string().contains("--features gcs"), "{error}");
        }
    }

    #[test]
    fn credentials_are_not_shown() {
        let debug = format!("{:?}", Credentials::new("AKIA", "very-secret"));
        assert!(
            debug.contains("AKIA") && !debug.contains("very-secret"),
            "{debug}"
        );
    }
}
