//! Crash safety: a job killed with SIGKILL leaves nothing that looks complete, and `--resume`
//! finishes it with a result equal to an uninterrupted run. SIGTERM stops cleanly and says how to
//! resume. (`ESMBED_TEST_PART_DELAY_MS` slows the writer down after each part so that the kill
//! lands mid-job; it changes no output.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const RESIDUES: &[u8] = b"ACDEFGHIKLMNPQRSTVWY";

fn input(dir: &Path, n: usize) -> PathBuf {
    let mut state = 12345u64;
    let mut text = String::new();
    for i in 0..n {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let len = 20 + (state >> 33) as usize % 180;
        text.push_str(&format!(">seq{i}\n"));
        for _ in 0..len {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            text.push(RESIDUES[(state >> 33) as usize % RESIDUES.len()] as char);
        }
        text.push('\n');
    }
    let path = dir.join("in.fasta");
    std::fs::write(&path, text).unwrap();
    path
}

fn args(input: &Path, out: &Path) -> Vec<String> {
    [
        "embed",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--model",
        fixture_dir("tiny_h16").to_str().unwrap(),
        "--rows-per-part",
        "40",
        "--no-progress",
    ]
    .map(String::from)
    .to_vec()
}

fn spawn_slow(args: &[String]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_esmbed"))
        .args(args)
        .env("ESMBED_TEST_PART_DELAY_MS", "200")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finished_parts(manifest: &Path) -> usize {
    std::fs::read_to_string(manifest)
        .ok()
        .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
        .and_then(|v| v["parts"].as_object().map(|p| p.len()))
        .unwrap_or(0)
}

fn wait_for_parts(manifest: &Path, parts: usize) {
    let start = Instant::now();
    while finished_parts(manifest) < parts {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "job made no progress"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Every visible Parquet file in `dir` must read completely.
fn assert_visible_files_complete(dir: &Path) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".parquet") && !name.starts_with('.') {
            let batch = read_parquet(&path);
            assert!(batch.num_rows() > 0, "{name} is empty");
        }
    }
}

#[test]
fn sigkill_then_resume_equals_an_uninterrupted_run() {
    let dir = scratch("kill");
    let input = input(&dir, 400);
    let reference = dir.join("reference.parquet");
    let (code, _, stderr) = esmbed(args(&input, &reference));
    assert_eq!(code, 0, "{stderr}");
    let expected = read_parquet(&reference);

    for target in ["killed.parquet", "killed_dataset/"] {
        let out = dir.join(target);
        let a = args(&input, &out);
        let mut child = spawn_slow(&a);
        let layout = esmbed::output::OutputLayout::new(&out);
        wait_for_parts(&layout.manifest_path(), 3);
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        if target.ends_with(".parquet") {
            assert!(
                !out.exists(),
                "a killed single-file job must not leave the output"
            );
        } else {
            assert!(
                !layout.manifest_path().exists() || finished_parts(&layout.manifest_path()) < 10
            );
            assert_visible_files_complete(&out);
        }
        assert_visible_files_complete(&layout.staging);

        // Without --resume the progress is protected.
        let (code, _, stderr) = esmbed(&a);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains("--resume"), "{stderr}");

        let (code, _, stderr) = esmbed([&a[..], &["--resume".to_string()]].concat());
        assert_eq!(code, 0, "{stderr}");
        assert!(stderr.contains("resumed:"), "{stderr}");
        let got = read_parquet(&out);
        assert_eq!(
            strings(&got, "id"),
            strings(&expected, "id"),
            "{target}: ids and order"
        );
        assert_eq!(
            vectors(&got, "embedding"),
            vectors(&expected, "embedding"),
            "{target}"
        );
        assert!(
            !layout.staging.exists()
                || layout.kind == esmbed::output::OutputKind::Dataset && !layout.staging.exists()
        );
    }
}

#[test]
fn a_resumed_job_with_repeated_sequences_equals_an_uninterrupted_run_without_reuse() {
    let dir = scratch("kill-reuse");
    let (input, _) = crate::reuse::repeated_fasta(&dir, 400, 5);
    let reference = dir.join("reference.parquet");
    let no_reuse = [&args(&input, &reference)[..], &["--no-reuse".to_string()]].concat();
    let (code, _, stderr) = esmbed(no_reuse);
    assert_eq!(code, 0, "{stderr}");
    let expected = read_parquet(&reference);

    let out = dir.join("killed.parquet");
    let a = args(&input, &out);
    let mut child = spawn_slow(&a);
    let layout = esmbed::output::OutputLayout::new(&out);
    wait_for_parts(&layout.manifest_path(), 3);
    child.kill().unwrap();
    child.wait().unwrap();
    let (code, _, stderr) = esmbed([&a[..], &["--resume".to_string()]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert!(stderr.contains("resumed:"), "{stderr}");
    assert!(stderr.contains("distinct sequences embedded"), "{stderr}");
    let got = read_parquet(&out);
    assert_eq!(strings(&got, "id"), strings(&expected, "id"));
    let bits = |b: &arrow::array::RecordBatch| -> Vec<Vec<u32>> {
        vectors(b, "embedding")
            .iter()
            .map(|v| v.iter().map(|x| x.to_bits()).collect())
            .collect()
    };
    assert_eq!(bits(&got), bits(&expected));
}

#[test]
fn sigterm_stops_cleanly_and_says_how_to_resume() {
    let dir = scratch("term");
    let input = input(&dir, 300);
    let out = dir.join("out.parquet");
    let a = args(&input, &out);
    let child = spawn_slow(&a);
    let layout = esmbed::output::OutputLayout::new(&out);
    wait_for_parts(&layout.manifest_path(), 2);
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    assert!(!out.exists());
    let (code, _, stderr) = esmbed([&a[..], &["--resume".to_string()]].concat());
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(read_parquet(&out).num_rows(), 300);
}

#[test]
fn resume_refuses_a_different_job() {
    let dir = scratch("mismatch");
    let input = input(&dir, 200);
    let out = dir.join("out.parquet");
    let a = args(&input, &out);
    let mut child = spawn_slow(&a);
    let layout = esmbed::output::OutputLayout::new(&out);
    wait_for_parts(&layout.manifest_path(), 1);
    child.kill().unwrap();
    child.wait().unwrap();
    let (code, _, stderr) =
        esmbed([&a[..], &["--resume", "--layers", "1,-1"].map(String::from)].concat());
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("differs in: layers"), "{stderr}");
}
