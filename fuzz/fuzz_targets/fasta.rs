//! FASTA inputs, plain or gzip (detected from the content, as a job does).
#![no_main]

#[path = "common.rs"]
mod common;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    common::read_all(common::scratch_file("in.fasta", data), None);
});
