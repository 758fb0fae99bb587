//! Object-store failures sorted into the library's errors, by object_store's error variants and
//! by what the store answered, never by message text.
//!
//! Some object_store requests (LIST, multipart) report every HTTP failure as `Generic`, and its
//! retry errors are not public types: so the HTTP client under object_store's retries (see
//! `connect`) notes, for the operation running on this task, how many requests failed and the
//! status of the last. That is what tells a refused LIST from a missing bucket, and lets a message
//! say how many times a request was tried.

use std::cell::Cell;

use crate::error::Error;

/// What the store answered the requests of one operation.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Tries {
    /// Requests that failed (an HTTP error status or no response).
    pub failed: usize,
    /// The HTTP status of the last failed request, if it got one.
    pub status: Option<u16>,
}

tokio::task_local! {
    /// The tries of the operation that runs on this task (see [`recorded`]).
    static TRIES: Cell<Tries>;
}

/// Run `operation`, noting what its requests were answered. Requests that object_store spawns on
/// other tasks (the parts of a multipart upload) are not counted.
pub(super) async fn recorded<T>(operation: impl std::future::Future<Output = T>) -> (T, Tries) {
    TRIES
        .scope(Cell::new(Tries::default()), async {
            let result = operation.await;
            (result, TRIES.with(Cell::get))
        })
        .await
}

/// Note a failed request of the operation on this task (none outside [`recorded`]: DataFusion's).
pub(super) fn note_failure(status: Option<u16>) {
    let _ = TRIES.try_with(|tries| {
        let mut t = tries.get();
        t.failed += 1;
        t.status = status;
        tries.set(t);
    });
}

/// The hint of a missing object.
pub(super) const NO_SUCH_OBJECT: &str = "no such object (check the bucket and key)";

const ACCESS_DENIED: &str = "access denied: check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or \
                             the profile's session token) and the bucket's policy";

/// The library's error for `error`, from operation `what` on `url`.
pub(super) fn store_error(
    url: &str,
    what: &str,
    error: object_store::Error,
    tries: Tries,
) -> Error {
    use object_store::Error as E;
    let not_found = |hint: &str| Error::NotFound {
        url: url.to_string(),
        hint: hint.to_string(),
    };
    let reason = match (&error, tries.status) {
        (E::NotFound { .. }, _) => return not_found(NO_SUCH_OBJECT),
        (E::Generic { .. }, Some(404)) => {
            return not_found("no such bucket or prefix (check the bucket's name)")
        }
        (E::PermissionDenied { .. } | E::Unauthenticated { .. }, _)
        | (E::Generic { .. }, Some(401 | 403)) => ACCESS_DENIED.to_string(),
        _ if tries.failed > 1 => format!(
            "{what} failed {} times (transient errors are retried --s3-attempts times in all)",
            tries.failed
        ),
        _ => format!("{what} failed"),
    };
    Error::Store {
        url: url.to_string(),
        reason,
        error: Box::new(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic() -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: "no text is read".into(),
        }
    }

    #[test]
    fn variants_and_statuses_decide() {
        let missing = object_store::Error::NotFound {
            path: "k".into(),
            source: "".into(),
        };
        let error = store_error("s3://b/k", "GET", missing, Tries::default());
        assert!(matches!(error, Error::NotFound { .. }), "{error}");
        let refused = Tries {
            failed: 1,
            status: Some(403),
        };
        let error = store_error("s3://b/", "LIST", generic(), refused);
        assert!(error.to_string().contains("access denied"), "{error}");
        assert_eq!(error.kind(), crate::ErrorKind::Io);
        let busy = Tries {
            failed: 3,
            status: Some(503),
        };
        let error = store_error("s3://b/k", "PUT", generic(), busy).to_string();
        assert!(error.starts_with("s3://b/k: PUT failed 3 times"), "{error}");
    }

    #[test]
    fn tries_are_counted_per_operation() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let ((), tries) = runtime.block_on(recorded(async {
            note_failure(Some(503));
            note_failure(None);
        }));
        assert_eq!(
            tries,
            Tries {
                failed: 2,
                status: None
            }
        );
        note_failure(Some(500)); // outside an operation: ignored
    }
}
