//! Parquet inputs: the footer, the schema checks (a string sequence column, ids), the batches.
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = common::scratch_file("in.parquet", data);
    common::read_all(path, Some(esmbed::input::InputFormat::Parquet));
});
