//! A moto S3 server on a free loopback port, and esmbed run against it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;
use esmbed::storage::{Credentials, ObjectUrl, StoreOptions};

/// A moto server on a free loopback port, stopped on drop.
pub struct Moto {
    child: Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    /// Start a server, or `None` (outside CI) when moto is not installed.
    pub fn start() -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("python3")
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut server = match child {
            Ok(child) => Moto { child, port },
            Err(e) => return skip(&format!("cannot run python3: {e}")),
        };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(status)) = server.child.try_wait() {
                return skip(&format!(
                    "moto_server exited ({status}); install it with: pip install 'moto[server]'"
                ));
            }
            if server
                .http("GET", "/moto-api/", None)
                .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
            {
                return Some(server);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        skip("moto_server did not answer within 30 s")
    }

    /// A raw HTTP request (moto's control API, bucket creation); the response text.
    pub fn http(&self, method: &str, path: &str, body: Option<&str>) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .ok()?;
        let body = body.unwrap_or("");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.port,
            body.len()
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        Some(response)
    }

    pub fn bucket(&self, name: &str) {
        let response = self.http("PUT", &format!("/{name}"), None).unwrap();
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Settings for this server, passed in (nothing in the process environment; moto accepts
    /// any credentials).
    pub fn options(&self) -> StoreOptions {
        StoreOptions {
            endpoint: Some(self.endpoint()),
            allow_http: true,
            region: Some("us-east-1".into()),
            credentials: Some(Credentials::new("test", "test")),
            attempts: 3,
            backoff: Duration::from_millis(20),
            ..StoreOptions::default()
        }
    }

    pub fn object(&self, url: &str) -> ObjectUrl {
        ObjectUrl::parse(url, &self.options()).unwrap()
    }

    /// Run esmbed with this server's settings.
    pub fn esmbed(&self, args: &[&str]) -> (i32, String, String) {
        self.esmbed_env(args, &[])
    }

    pub fn esmbed_env(&self, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
        let mut command = self.command(args);
        command.envs(env.iter().copied());
        let out = command.output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_esmbed"));
        command
            .args(args)
            .env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT", self.endpoint())
            .env("AWS_ALLOW_HTTP", "true")
            .env("HF_HUB_OFFLINE", "1")
            .env_remove("ESMBED_MODEL");
        command
    }

    /// Every key in the bucket.
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        self.object(&format!("s3://{bucket}/"))
            .list()
            .unwrap()
            .into_iter()
            .map(|m| m.location.to_string())
            .collect()
    }
}

fn skip(reason: &str) -> Option<Moto> {
    assert!(
        !in_ci(),
        "CI must run the S3 tests: {reason} (.ci/run installs moto[server])"
    );
    eprintln!("SKIPPED: no S3 test server: {reason}");
    None
}
