//! Shared by the fuzz targets: a per-process scratch directory for inputs that esmbed reads from
//! files (its readers take paths, as a job does).

use std::path::PathBuf;
use std::sync::Once;

/// libFuzzer's panic hook aborts on every panic, caught or not. esmbed catches the panics of the
/// Parquet reader on corrupt files (arrow-ipc 59 on a corrupt `ARROW:schema` in the footer,
/// parquet and arrow-buffer 59 on some corrupt pages; see `src/input/parquet.rs`) and turns them
/// into errors;
/// those are let through here so the fuzzer goes on. Every other panic still aborts.
pub fn allow_known_upstream_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let abort_hook = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let known = info.location().is_some_and(|l| {
                let file = l.file();
                file.contains("/parquet-59.") || (file.contains("/arrow-") && file.contains("-59."))
            });
            if !known {
                abort_hook(info);
            }
        }));
    });
}

/// `name` in this process's scratch directory, holding `data`.
pub fn scratch_file(name: &str, data: &[u8]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("esmbed-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, data).unwrap();
    path
}

/// Read every row of a local input as a job does (format checks, schema checks, the sequence and
/// id columns, the input policy on each sequence). Errors are fine; panics are bugs.
pub fn read_all(path: PathBuf, format: Option<esmbed::input::InputFormat>) {
    allow_known_upstream_panics();
    let options = esmbed::input::InputOptions {
        format,
        ..Default::default()
    };
    let Ok(inputs) = esmbed::input::Inputs::open(&[path], options) else {
        return;
    };
    let policy = esmbed::prepare::InputPolicy {
        tokenizer: esmbed::Tokenizer::default(),
        max_length: 50,
        long: esmbed::prepare::LongPolicy::Window,
    };
    let Ok(batches) = inputs.read(0) else { return };
    for batch in batches {
        let Ok(batch) = batch else { return };
        let rows = inputs.rows(batch);
        for (i, sequence) in rows.sequences.iter().enumerate() {
            if let Some(sequence) = sequence {
                let _ = policy.prepare(sequence);
            }
            let _ = rows.id(i);
        }
    }
}
