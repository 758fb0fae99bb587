//! esmbed's end-to-end tests, in one binary: linking DataFusion, arrow and candle once instead of
//! once per file saves minutes of every cold build. Each module is one area; `common` holds the
//! fixtures and helpers they share. The GPU tests are their own target (`tests/gpu.rs`, feature
//! `cuda`).

#[path = "../common/mod.rs"]
mod common;

mod bad_inputs;
mod bad_models;
mod cli;
#[cfg(feature = "cluster")]
mod cluster;
mod dry_run;
mod engine;
mod esmc;
mod hostile;
mod hub;
mod invariance;
mod memory;
mod naming;
mod oom;
mod real_fasta;
mod reference;
mod resume;
mod reuse;
mod s3;
mod scores;
mod sql;
mod workers;
