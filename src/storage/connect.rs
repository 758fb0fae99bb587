//! Stores built from URLs: the scheme as object_store's `ObjectStoreScheme` reads it, the
//! builder of that scheme with [`StoreOptions`], object_store's retry policy, and an HTTP client
//! that notes what each request of an operation was answered (see `errors`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use object_store::aws::AmazonS3Builder;
use object_store::client::{
    ClientOptions, HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse, HttpService,
    ReqwestConnector,
};
use object_store::local::LocalFileSystem;
use object_store::{BackoffConfig, ObjectStore, ObjectStoreScheme, RetryConfig};
use url::Url;

use super::StoreOptions;
use crate::error::{Error, Result};

/// The schemes beyond `s3://` that this build reads, for messages.
#[cfg(all(feature = "gcs", feature = "azure"))]
pub(super) const OTHER_SCHEMES: &str = ", gs://BUCKET/KEY, az://CONTAINER/KEY or file:///PATH";
#[cfg(all(feature = "gcs", not(feature = "azure")))]
pub(super) const OTHER_SCHEMES: &str = ", gs://BUCKET/KEY or file:///PATH";
#[cfg(all(not(feature = "gcs"), feature = "azure"))]
pub(super) const OTHER_SCHEMES: &str = ", az://CONTAINER/KEY or file:///PATH";
#[cfg(not(any(feature = "gcs", feature = "azure")))]
pub(super) const OTHER_SCHEMES: &str =
    " or file:///PATH (gs:// and az:// need esmbed built with --features gcs or azure)";

/// The store for `url` (`s3://bucket`, `file:///`, …): no request is made.
pub fn connect(url: &Url, options: &StoreOptions) -> Result<Arc<dyn ObjectStore>> {
    let (scheme, _) = ObjectStoreScheme::parse(url).map_err(|_| Error::Remote {
        url: url.to_string(),
        reason: format!("not an object-store URL: write s3://BUCKET/KEY{OTHER_SCHEMES}"),
    })?;
    store(url, scheme, options)
}

/// The store of `scheme` at `url`.
pub(super) fn store(
    url: &Url,
    scheme: ObjectStoreScheme,
    options: &StoreOptions,
) -> Result<Arc<dyn ObjectStore>> {
    let built = match scheme {
        ObjectStoreScheme::Local => return Ok(Arc::new(LocalFileSystem::new())),
        ObjectStoreScheme::AmazonS3 => {
            s3(url, options).map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        }
        #[cfg(feature = "gcs")]
        ObjectStoreScheme::GoogleCloudStorage => {
            gcs(url, options).map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        }
        #[cfg(feature = "azure")]
        ObjectStoreScheme::MicrosoftAzure => {
            azure(url, options).map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
        }
        other => {
            let feature = match other {
                ObjectStoreScheme::GoogleCloudStorage => "gcs",
                ObjectStoreScheme::MicrosoftAzure => "azure",
                _ => "",
            };
            return Err(Error::Remote {
                url: url.to_string(),
                reason: if feature.is_empty() {
                    format!("not a store esmbed reads: write s3://BUCKET/KEY{OTHER_SCHEMES}")
                } else {
                    format!(
                        "{}:// needs esmbed built with --features {feature}",
                        url.scheme()
                    )
                },
            });
        }
    };
    built.map_err(|error| Error::Store {
        url: url.to_string(),
        reason: "cannot configure the store".into(),
        error: Box::new(error),
    })
}

/// object_store's retry policy for `options`: `attempts` requests in all, within a minute.
fn retry(options: &StoreOptions) -> RetryConfig {
    RetryConfig {
        max_retries: options.attempts.saturating_sub(1).min(10),
        retry_timeout: Duration::from_secs(60),
        backoff: BackoffConfig {
            init_backoff: options.backoff,
            max_backoff: Duration::from_secs(10),
            base: 2.0,
        },
    }
}

fn s3(url: &Url, options: &StoreOptions) -> object_store::Result<impl ObjectStore> {
    let mut builder = match options.environment {
        true => AmazonS3Builder::from_env(),
        false => AmazonS3Builder::new(),
    }
    .with_url(url.as_str())
    .with_retry(retry(options))
    .with_http_connector(Recording(options.http.clone()));
    if let Some(endpoint) = &options.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if options.allow_http {
        builder = builder.with_allow_http(true);
    }
    if let Some(region) = &options.region {
        builder = builder.with_region(region);
    }
    if let Some(key) = &options.credentials {
        builder = builder
            .with_access_key_id(&key.access_key_id)
            .with_secret_access_key(&key.secret_access_key);
        if let Some(token) = &key.session_token {
            builder = builder.with_token(token);
        }
    }
    builder.build()
}

#[cfg(feature = "gcs")]
fn gcs(url: &Url, options: &StoreOptions) -> object_store::Result<impl ObjectStore> {
    use object_store::gcp::GoogleCloudStorageBuilder;
    match options.environment {
        true => GoogleCloudStorageBuilder::from_env(),
        false => GoogleCloudStorageBuilder::new(),
    }
    .with_url(url.as_str())
    .with_retry(retry(options))
    .with_http_connector(Recording(options.http.clone()))
    .build()
}

#[cfg(feature = "azure")]
fn azure(url: &Url, options: &StoreOptions) -> object_store::Result<impl ObjectStore> {
    use object_store::azure::MicrosoftAzureBuilder;
    let mut builder = match options.environment {
        true => MicrosoftAzureBuilder::from_env(),
        false => MicrosoftAzureBuilder::new(),
    }
    .with_url(url.as_str())
    .with_retry(retry(options))
    .with_http_connector(Recording(options.http.clone()));
    if options.allow_http {
        builder = builder.with_allow_http(true);
    }
    builder.build()
}

/// object_store's HTTP client (or the one in [`StoreOptions::http`]), noting failed requests.
#[derive(Debug)]
struct Recording(Option<Arc<dyn HttpConnector>>);

impl HttpConnector for Recording {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = match &self.0 {
            Some(connector) => connector.connect(options)?,
            None => ReqwestConnector::default().connect(options)?,
        };
        Ok(HttpClient::new(RecordingService(inner)))
    }
}

#[derive(Debug)]
struct RecordingService(HttpClient);

#[async_trait]
impl HttpService for RecordingService {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let response = self.0.execute(request).await;
        match &response {
            Ok(r) if r.status().is_client_error() || r.status().is_server_error() => {
                super::errors::note_failure(Some(r.status().as_u16()))
            }
            Ok(_) => {}
            Err(_) => super::errors::note_failure(None),
        }
        response
    }
}
