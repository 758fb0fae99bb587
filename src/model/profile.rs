//! Per-operation timings of the forward, for finding where GPU time goes.
//!
//! Off by default (zero cost beyond an atomic load). With `ESMBED_PROFILE=1` every timed region
//! synchronizes the device before and after, so its time is the region's own, and
//! `esmbed bench` prints the table. Synchronizing slows the whole run down: use the table for
//! shares, not for throughput.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use candle_core::Device;

use crate::error::Result;

static ENABLED: AtomicU8 = AtomicU8::new(2); // 2 = not read yet
static TIMES: Mutex<BTreeMap<&'static str, (f64, u64)>> = Mutex::new(BTreeMap::new());

/// Whether `ESMBED_PROFILE` is set.
pub fn enabled() -> bool {
    match ENABLED.load(Ordering::Relaxed) {
        2 => {
            let on = std::env::var("ESMBED_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0");
            ENABLED.store(on as u8, Ordering::Relaxed);
            on
        }
        v => v == 1,
    }
}

/// Run `f`, timing it under `name` when profiling.
pub fn time<T>(device: &Device, name: &'static str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    if !enabled() {
        return f();
    }
    device.synchronize()?;
    let started = Instant::now();
    let out = f()?;
    device.synchronize()?;
    add(name, started.elapsed().as_secs_f64());
    Ok(out)
}

fn add(name: &'static str, seconds: f64) {
    let mut times = TIMES.lock().unwrap();
    let entry = times.entry(name).or_insert((0.0, 0));
    entry.0 += seconds;
    entry.1 += 1;
}

/// Add `seconds` under `name` for a part of an enclosing timed region (the caller synchronized
/// around it). Parts are named `"<region>/<part>"` and are left out of the shares' total, which
/// the enclosing region already counts.
pub fn record_part(name: &'static str, seconds: f64) {
    add(name, seconds);
}

/// Forget what was timed so far (the warm-up, which also compiles and loads kernels).
pub fn reset() {
    TIMES.lock().unwrap().clear();
}

/// The table so far (name, seconds, calls, share), largest first; then cleared.
pub fn take_report() -> Vec<(&'static str, f64, u64, f64)> {
    let mut times = TIMES.lock().unwrap();
    let total: f64 = times
        .iter()
        .filter(|(k, _)| !k.contains('/'))
        .map(|(_, v)| v.0)
        .sum();
    let mut rows: Vec<_> = times
        .iter()
        .map(|(k, v)| (*k, v.0, v.1, v.0 / total.max(1e-12)))
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    times.clear();
    rows
}
