//! An HTTP client that fails requests, put under object_store's retries through
//! `StoreOptions::http`: what it injects is what a store would answer, so the retries and the
//! error sorting under test are the real ones.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use object_store::client::{
    ClientOptions, HttpClient, HttpConnector, HttpError, HttpRequest, HttpResponse,
    HttpResponseBody, HttpService, ReqwestConnector,
};

/// Fails the first `fail` requests with 503 Slow Down and, when `fail > 0`, the first part of a
/// multipart upload once with 500; or every request with 403 when `denied`.
#[derive(Debug)]
pub struct Faulty(Arc<Faults>);

#[derive(Debug)]
struct Faults {
    fail: usize,
    denied: bool,
    calls: AtomicUsize,
    part_failed: AtomicBool,
}

impl Faulty {
    pub fn new(fail: usize, denied: bool) -> Self {
        Self(Arc::new(Faults {
            fail,
            denied,
            calls: AtomicUsize::new(0),
            part_failed: AtomicBool::new(false),
        }))
    }
}

impl HttpConnector for Faulty {
    fn connect(&self, options: &ClientOptions) -> object_store::Result<HttpClient> {
        let inner = ReqwestConnector::default().connect(options)?;
        Ok(HttpClient::new(FaultyClient {
            inner,
            faults: self.0.clone(),
        }))
    }
}

#[derive(Debug)]
struct FaultyClient {
    inner: HttpClient,
    faults: Arc<Faults>,
}

#[async_trait]
impl HttpService for FaultyClient {
    async fn call(&self, request: HttpRequest) -> Result<HttpResponse, HttpError> {
        let faults = &self.faults;
        if faults.denied {
            return Ok(answer(403, "AccessDenied (injected)"));
        }
        if faults.calls.fetch_add(1, Ordering::SeqCst) < faults.fail {
            return Ok(answer(503, "SlowDown (injected)"));
        }
        let is_part = request
            .uri()
            .query()
            .is_some_and(|q| q.contains("partNumber="));
        if is_part && faults.fail > 0 && !faults.part_failed.swap(true, Ordering::SeqCst) {
            return Ok(answer(500, "part lost (injected)"));
        }
        self.inner.execute(request).await
    }
}

fn answer(status: u16, code: &str) -> HttpResponse {
    let body = format!("<Error><Code>{code}</Code></Error>");
    http::Response::builder()
        .status(status)
        .body(HttpResponseBody::from(body))
        .expect("a valid response")
}
