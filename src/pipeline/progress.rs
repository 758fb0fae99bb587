//! How a job reports progress. The library draws nothing: the CLI turns these events into a
//! progress bar, a notebook front into a widget, tests into nothing.

use std::sync::Arc;

/// Something a job did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event {
    /// The job starts on `rows` input rows (counted before any model work).
    Started {
        /// Input rows.
        rows: u64,
    },
    /// `rows` more rows are settled (embedded, in the errors, or done by an earlier run).
    Advanced {
        /// Rows settled since the last event.
        rows: u64,
        /// Residues embedded per second so far, this run.
        residues_per_second: f64,
    },
    /// Part `index` is committed (its file and the manifest that lists it are written).
    PartCommitted {
        /// The part.
        index: usize,
    },
    /// Every stage is done (or stopped).
    Finished,
}

/// Where a job's [`Event`]s go. Called from the job's threads; keep it quick.
pub type Progress = Arc<dyn Fn(Event) + Send + Sync>;

/// A [`Progress`] that ignores everything.
pub fn silent() -> Progress {
    Arc::new(|_| {})
}
