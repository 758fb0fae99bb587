//! The job's progress events drawn as a terminal progress bar (indicatif), on stderr when it is
//! a terminal.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use crate::pipeline::progress::{Event, Progress};

/// A progress bar for a job, or nothing when `enabled` is false or stderr is not a terminal.
///
/// `ESMBED_TEST_PART_DELAY_MS` pauses the writer after each committed part: the kill-and-resume
/// tests use it to stop a job mid-way on any machine speed. It lives here, in the binary, so
/// that the library reads no test switches.
pub fn bar(enabled: bool) -> Progress {
    let delay = std::env::var("ESMBED_TEST_PART_DELAY_MS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis);
    let bar = if enabled && std::io::stderr().is_terminal() {
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {elapsed_precise} [{bar:40}] {human_pos}/{human_len} sequences  {per_sec}  ETA {eta}  {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar
    } else {
        indicatif::ProgressBar::hidden()
    };
    Arc::new(move |event| match event {
        Event::Started { rows } => {
            bar.set_length(rows);
            bar.enable_steady_tick(Duration::from_millis(200));
        }
        Event::Advanced {
            rows,
            residues_per_second,
        } => {
            bar.inc(rows);
            if residues_per_second > 0.0 {
                bar.set_message(format!("{residues_per_second:.0} residues/s"));
            }
        }
        Event::PartCommitted { .. } => {
            if let Some(delay) = delay {
                std::thread::sleep(delay);
            }
        }
        Event::Finished => bar.finish_and_clear(),
    })
}
