//! The cluster (DataFusion Ballista): a real scheduler and executor processes of the esmbed binary
//! on loopback ports, the client `esmbed sql --cluster`, and the same queries' results compared
//! with `esmbed embed`'s, bitwise. Faults: an executor SIGKILLed mid-query, the scheduler
//! restarted under a waiting client, an executor with other weights or another dtype. Every
//! process is killed by its PID when its test ends, pass or fail.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const MODEL: &str = "tiny_h64";

/// A port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Two consecutive free ports (an executor's Flight and task services).
fn free_port_pair() -> u16 {
    loop {
        let port = free_port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// A scheduler and executors of the esmbed binary; every process is killed on drop.
struct Cluster {
    dir: PathBuf,
    port: u16,
    scheduler: Option<Child>,
    executors: Vec<Option<Child>>,
    env: Vec<(String, String)>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let children = self.executors.iter_mut().chain([&mut self.scheduler]);
        for child in children.flatten() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Cluster {
    /// A scheduler and `executors` executors serving `model`, with `env` (S3 settings) in each.
    fn start(name: &str, executors: usize, model: &str, env: &[(&str, &str)]) -> Cluster {
        let mut cluster = Cluster {
            dir: scratch(name),
            port: free_port(),
            scheduler: None,
            executors: Vec::new(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        cluster.start_scheduler();
        for _ in 0..executors {
            cluster.add_executor(model);
        }
        cluster.await_executors(executors);
        cluster
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn spawn(&self, log: &str, args: &[String]) -> Child {
        let log = std::fs::File::create(self.dir.join(log)).unwrap();
        Command::new(env!("CARGO_BIN_EXE_esmbed"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("HF_HUB_OFFLINE", "1")
            .env(
                "RUST_LOG",
                "esmbed=info,ballista_executor=info,ballista_scheduler=warn",
            )
            .env_remove("ESMBED_MODEL")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("esmbed starts")
    }

    fn start_scheduler(&mut self) {
        let args = [
            "scheduler",
            "--bind",
            &self.address(),
            "--executor-timeout",
            "3",
        ]
        .map(String::from);
        self.scheduler = Some(self.spawn("scheduler.log", &args));
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the scheduler did not listen within 60 s\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn add_executor(&mut self, model: &str) {
        let index = self.executors.len();
        let work = self.dir.join(format!("work{index}"));
        std::fs::create_dir_all(&work).unwrap();
        let args = [
            "executor",
            "--scheduler",
            &self.address(),
            "--bind",
            &format!("127.0.0.1:{}", free_port_pair()),
            "--model",
            &fixture_dir(model).display().to_string(),
            "--device",
            "cpu",
            "--heartbeat",
            "1",
            "--task-slots",
            "2",
            "--work-dir",
            &work.display().to_string(),
        ]
        .map(String::from);
        let child = self.spawn(&format!("executor{index}.log"), &args);
        self.executors.push(Some(child));
    }

    /// Executors the scheduler lists as alive (its REST API).
    fn registered(&self) -> Option<usize> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET /api/executors HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let body = response.split("\r\n\r\n").nth(1)?;
        // A chunked body: take the JSON array inside.
        let json = &body[body.find('[')?..=body.rfind(']')?];
        let list: serde_json::Value = serde_json::from_str(json).ok()?;
        Some(list.as_array()?.len())
    }

    fn await_executors(&self, n: usize) {
        let started = Instant::now();
        while self.registered() != Some(n) {
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "{n} executors did not register within 120 s (got {:?})\n{}",
                self.registered(),
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn kill_executor(&mut self, index: usize) {
        let mut child = self.executors[index].take().expect("running");
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
    }

    fn kill_scheduler(&mut self) {
        let mut child = self.scheduler.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// The last lines of every process's log.
    fn logs(&self) -> String {
        let mut out = String::new();
        let mut logs: Vec<PathBuf> = std::fs::read_dir(&self.dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .collect();
        logs.sort();
        for log in logs {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(25)..];
            out += &format!("--- {}\n{}\n", log.display(), tail.join("\n"));
        }
        out
    }

    /// `esmbed sql --cluster` with `args` before `-c SQL`.
    fn sql_command(&self, model: &str, args: &[&str], sql: &str) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_esmbed"));
        command
            .args(["sql", "--cluster", &self.address(), "--model"])
            .arg(fixture_dir(model))
            .args(args)
            .args(["-c", sql])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("ESMBED_MODEL")
            .current_dir(&self.dir);
        command
    }

    fn sql(&self, args: &[&str], sql: &str) -> (i32, String, String) {
        let out = self.sql_command(MODEL, args, sql).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Run `sql`, which must succeed.
    fn sql_ok(&self, args: &[&str], sql: &str) -> String {
        let (code, stdout, stderr) = self.sql(args, sql);
        assert_eq!(code, 0, "{sql}\n{stderr}\n{}", self.logs());
        stdout
    }
}

/// `n` FASTA files of 30 sequences (lengths 20 to 260, a few repeated across files).
fn fasta_files(dir: &Path, n: usize) -> Vec<PathBuf> {
    let residues = b"ACDEFGHIKLMNPQRSTVWY";
    let seq = |i: usize| -> String {
        (0..20 + (i * 37) % 240)
            .map(|j| residues[(i * 7 + j * 13 + j / 5) % 20] as char)
            .collect()
    };
    let input = dir.join("fasta");
    std::fs::create_dir_all(&input).unwrap();
    (0..n)
        .map(|f| {
            let text: String = (0..30)
                .map(|k| {
                    let i = f * 30 + k;
                    format!(">s{i:04} protein {i}\n{}\n", seq(i % 200))
                })
                .collect();
            let path = input.join(format!("part{f:02}.fasta"));
            std::fs::write(&path, text).unwrap();
            path
        })
        .collect()
}

/// The FASTA files as a Parquet table of several files (`id`, `sequence`).
fn parquet_files(dir: &Path, fasta: &[PathBuf]) -> PathBuf {
    let table = dir.join("parquet");
    std::fs::create_dir_all(&table).unwrap();
    for (i, f) in fasta.iter().enumerate() {
        let (code, _, stderr) = esmbed_in(
            dir,
            [
                "sql",
                "--no-model",
                "-c",
                &format!(
                    "CREATE EXTERNAL TABLE f STORED AS FASTA LOCATION '{}';
                     COPY (SELECT id, sequence FROM f) TO '{}' STORED AS PARQUET",
                    f.display(),
                    table.join(format!("t{i:02}.parquet")).display()
                ),
            ],
        );
        assert_eq!(code, 0, "{stderr}");
    }
    table
}

/// `esmbed embed`'s embeddings of the FASTA files, by id.
fn reference(dir: &Path, fasta: &[PathBuf]) -> Vec<(String, Vec<f32>)> {
    let out = dir.join("reference.parquet");
    let mut args = vec!["embed".to_string()];
    args.extend(fasta.iter().map(|p| p.display().to_string()));
    args.extend(
        [
            "-o",
            &out.display().to_string(),
            "--model",
            &fixture_dir(MODEL).display().to_string(),
            "--device",
            "cpu",
        ]
        .map(String::from),
    );
    let (code, _, stderr) = esmbed(&args);
    assert_eq!(code, 0, "{stderr}");
    by_id(&read_parquet(&out))
}

/// `(id, embedding)` rows sorted by id.
fn by_id(batch: &arrow::array::RecordBatch) -> Vec<(String, Vec<f32>)> {
    let mut rows: Vec<(String, Vec<f32>)> = strings(batch, "id")
        .into_iter()
        .map(Option::unwrap)
        .zip(vectors(batch, "embedding"))
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

/// Every Parquet file of a directory, as one batch.
fn read_dir_parquet(dir: &Path) -> arrow::array::RecordBatch {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no Parquet file in {}", dir.display());
    let batches: Vec<_> = files.iter().map(|f| read_parquet(f)).collect();
    arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap()
}

fn copy_sql(table: &str, location: &str, out: &str) -> String {
    format!(
        "CREATE EXTERNAL TABLE proteins STORED AS {table} LOCATION '{location}';
         COPY (SELECT id, esm_embed(sequence) AS embedding FROM proteins) TO '{out}' STORED AS PARQUET"
    )
}

#[test]
fn parquet_and_fasta_tables_through_two_executors_equal_embed_bitwise() {
    let cluster = Cluster::start("cluster-two", 2, MODEL, &[]);
    let fasta = fasta_files(&cluster.dir, 6);
    let parquet = parquet_files(&cluster.dir, &fasta);
    let expected = reference(&cluster.dir, &fasta);
    assert_eq!(expected.len(), 180);
    let fasta_dir = cluster.dir.join("fasta").display().to_string() + "/";
    for (adaptive, table, location) in [
        (false, "PARQUET", parquet.display().to_string() + "/"),
        (false, "FASTA", fasta_dir.clone()),
        (true, "PARQUET", parquet.display().to_string() + "/"),
        (true, "FASTA", fasta_dir.clone()),
    ] {
        let out = cluster.dir.join(format!("out-{table}-{adaptive}"));
        let args: &[&str] = if adaptive {
            &["--adaptive"]
        } else {
            &["--partitions", "3"]
        };
        let sql = copy_sql(table, &location, &format!("{}/", out.display()));
        let stdout = cluster.sql_ok(args, &sql);
        assert!(
            stdout.contains("180"),
            "the COPY answers its rows: {stdout}"
        );
        if !adaptive {
            // Each partition's task wrote a file of its own, `<write id>-<attempt>.parquet`.
            let files: Vec<String> = std::fs::read_dir(&out)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            let write_id = files[0].split('-').next().unwrap().to_string();
            assert!(
                files.len() == 3 && files.iter().all(|f| f.starts_with(&write_id)),
                "{table}: {files:?}"
            );
        }
        let got = by_id(&read_dir_parquet(&out));
        assert_eq!(got.len(), expected.len(), "{table}, adaptive {adaptive}");
        assert!(
            got == expected,
            "{table} (adaptive {adaptive}): the cluster's vectors differ from esmbed embed's"
        );
    }
    // The query's results come back to the client too, with the local semantics of bad rows.
    // (A bad record in a table of its own: Ballista 55 loses track of a UNION ALL of a
    // multi-file table and a literal row, see the README.)
    let bad = cluster.dir.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("bad.fasta"), ">bad\nMKT1V\n>good\nMKTAYIAK\n").unwrap();
    let rows = format!(
        "CREATE EXTERNAL TABLE p STORED AS FASTA LOCATION '{fasta_dir}';
         CREATE EXTERNAL TABLE b STORED AS FASTA LOCATION '{}/';
         SELECT count(*) AS n, count(esm_embed(sequence)) AS embedded FROM
           (SELECT sequence FROM p UNION ALL SELECT sequence FROM b)",
        bad.display()
    );
    let stdout = cluster.sql_ok(&["--lenient"], &rows);
    assert!(stdout.contains("182") && stdout.contains("181"), "{stdout}");
    let (code, _, stderr) = cluster.sql(&[], &rows);
    assert_ne!(code, 0);
    assert!(stderr.contains("MKT1V"), "the bad row is named: {stderr}");
}

#[test]
fn an_executor_with_other_weights_or_dtype_refuses_the_task_naming_both() {
    let cluster = Cluster::start("cluster-mismatch", 1, "tiny_h16", &[]);
    let fasta = fasta_files(&cluster.dir, 1);
    let sql = copy_sql(
        "FASTA",
        &fasta[0].display().to_string(),
        &format!("{}/", cluster.dir.join("out").display()),
    );
    let (code, _, stderr) = cluster.sql(&[], &sql);
    assert_ne!(code, 0, "{stderr}");
    assert!(
        stderr.contains("tiny_h16") && stderr.contains("tiny_h64") && stderr.contains("--model"),
        "the error names both models and the fix: {stderr}"
    );
    assert!(!cluster.dir.join("out").exists() || read_dir_is_empty(&cluster.dir.join("out")));
    // The same weights in another dtype than asked for (the executor runs the CPU's f32).
    let out = cluster
        .sql_command("tiny_h16", &["--dtype", "bf16"], &sql)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("computes in f32") && stderr.contains("bf16") && stderr.contains("--dtype"),
        "the error names both dtypes and the fix: {stderr}"
    );
    assert!(!cluster.dir.join("out").exists() || read_dir_is_empty(&cluster.dir.join("out")));
}

fn read_dir_is_empty(dir: &Path) -> bool {
    std::fs::read_dir(dir).unwrap().next().is_none()
}

/// Start a slow `COPY` (one row per call, six partitions for the executors' task slots) and
/// return the client once executor `index` has begun a task.
fn start_long_copy(cluster: &Cluster, index: usize) -> Child {
    let sql = copy_sql(
        "FASTA",
        &(cluster.dir.join("fasta").display().to_string() + "/"),
        &format!("{}/", cluster.dir.join("out").display()),
    );
    let client = cluster
        .sql_command(MODEL, &["--batch-rows", "1", "--partitions", "6"], &sql)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let log = cluster.dir.join(format!("executor{index}.log"));
    let started = Instant::now();
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("Execute task")
    {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "executor {index} got no task\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    client
}

/// Wait (at most `limit`) for the client to exit: its status and stderr.
fn finish(cluster: &Cluster, client: &mut Child, limit: Duration) -> (ExitStatus, String) {
    let started = Instant::now();
    let status = loop {
        if let Some(status) = client.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < limit,
            "the client still runs after {limit:?}\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut stderr = String::new();
    let mut pipe = client.stderr.take().expect("stderr is piped");
    pipe.read_to_string(&mut stderr).unwrap();
    (status, stderr)
}

#[test]
fn an_executor_killed_mid_query_loses_nothing() {
    let mut cluster = Cluster::start("cluster-kill", 2, MODEL, &[]);
    let fasta = fasta_files(&cluster.dir, 12);
    let expected = reference(&cluster.dir, &fasta);
    let mut client = start_long_copy(&cluster, 1);
    cluster.kill_executor(1);
    let (status, stderr) = finish(&cluster, &mut client, Duration::from_secs(300));
    assert!(status.success(), "{stderr}\n{}", cluster.logs());
    let got = by_id(&read_dir_parquet(&cluster.dir.join("out")));
    assert_eq!(
        got.len(),
        expected.len(),
        "nothing lost, nothing duplicated"
    );
    assert!(got == expected, "the vectors differ from esmbed embed's");
}

#[test]
fn a_restarted_scheduler_gives_the_waiting_client_an_error_not_a_hang() {
    let mut cluster = Cluster::start("cluster-restart", 1, MODEL, &[]);
    fasta_files(&cluster.dir, 12);
    let mut client = start_long_copy(&cluster, 0);
    cluster.kill_scheduler();
    cluster.start_scheduler();
    // Bounded: the client must give up, not hang.
    let (status, stderr) = finish(&cluster, &mut client, Duration::from_secs(90));
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("esmbed: error:"), "{stderr}");
    let _ = client.kill();
}

#[test]
fn input_and_output_in_s3_through_the_cluster_equal_embed() {
    let Some(moto) = crate::s3::moto::Moto::start() else {
        return;
    };
    moto.bucket("lab");
    let endpoint = moto.endpoint();
    let env = [
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
    ];
    let cluster = Cluster::start("cluster-s3", 2, MODEL, &env);
    let fasta = fasta_files(&cluster.dir, 4);
    let parquet = parquet_files(&cluster.dir, &fasta);
    let expected = reference(&cluster.dir, &fasta);
    for entry in std::fs::read_dir(&parquet).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        moto.object(&format!("s3://lab/in/{name}"))
            .upload(&path)
            .unwrap();
    }
    cluster.sql_ok(&[], &copy_sql("PARQUET", "s3://lab/in/", "s3://lab/emb/"));
    let local = cluster.dir.join("downloaded");
    std::fs::create_dir_all(&local).unwrap();
    let keys: Vec<String> = moto
        .keys("lab")
        .into_iter()
        .filter(|k| k.starts_with("emb/"))
        .collect();
    assert!(!keys.is_empty(), "nothing written under s3://lab/emb/");
    for (i, key) in keys.iter().enumerate() {
        moto.object(&format!("s3://lab/{key}"))
            .download(&local.join(format!("{i:03}.parquet")))
            .unwrap();
    }
    let got = by_id(&read_dir_parquet(&local));
    assert!(got == expected, "the vectors differ from esmbed embed's");
}
