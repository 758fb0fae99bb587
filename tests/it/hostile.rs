//! Regressions found by fuzzing (`fuzz/`): each input that once crashed esmbed, now a clear error
//! or a working input.

use crate::common::*;

/// `esmbed embed INPUT` with the tiny model: (exit code, stderr, output path).
fn embed(input: &str, name: &str) -> (i32, String, std::path::PathBuf) {
    let input = fixture_dir(input);
    let out = scratch(&format!("hostile-{name}")).join("out.parquet");
    let model = fixture_dir("tiny_h16");
    let (code, _, stderr) = esmbed([
        "embed",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--model",
        model.to_str().unwrap(),
        "--no-progress",
    ]);
    (code, stderr, out)
}

#[test]
fn a_corrupt_arrow_schema_in_a_parquet_footer_is_not_a_crash() {
    // fuzz/parquet: the footer's ARROW:schema declares an integer of width 0, on which
    // arrow-ipc 59 panics. esmbed reads the file by its Parquet schema instead; here that schema
    // has an integer `sequence` column, which is the user's error to fix.
    let (code, stderr, _) = embed("bad/corrupt_arrow_schema.parquet", "arrow");
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("Arrow schema embedded in the footer is corrupt"),
        "{stderr}"
    );
    assert!(stderr.contains("sequences must be strings"), "{stderr}");
}

#[test]
fn corrupt_pages_are_an_error_not_a_crash() {
    // fuzz/parquet: pages on which parquet 59 / arrow-buffer 59 panic (a negative column-chunk
    // offset, a bit-reader overrun, a validity bitmap shorter than its length). The job stops with
    // the file named and the fix, exit code 3.
    for i in 1..=3 {
        let (code, stderr, out) = embed(
            &format!("bad/corrupt_pages_{i}.parquet"),
            &format!("pages{i}"),
        );
        assert_eq!(code, 3, "{i}: {stderr}");
        assert!(stderr.contains("corrupt data"), "{i}: {stderr}");
        assert!(!out.exists(), "{i}: no output from a failed job");
    }
}
