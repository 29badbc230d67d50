//! A local S3-compatible server (moto, installed by
//! `scripts/install-deps.sh`) for the S3 repository tests: a free port, a
//! bucket, and a credentials file the PostgreSQL account can read and
//! nobody else; the server is killed with its process group on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{ProcessGuard, TestDir, free_port};

pub struct S3Server {
    // Dropped first: the server, then its directory.
    _process: ProcessGuard,
    dir: TestDir,
    port: u16,
    bucket: String,
}

/// The secret the tests put in the credentials file, to look for it where
/// it must not be.
pub const SECRET: &str = "s3cr3t-never-in-argv-or-rendered-files";

impl S3Server {
    /// Starts the server and creates `bucket`.
    pub fn start(bucket: &str) -> anyhow::Result<S3Server> {
        let dir = TestDir::new("s3");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("moto.log"))?;
        let process = ProcessGuard::spawn(
            Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log),
        )
        .context("moto_server (scripts/install-deps.sh installs it)")?;
        let server = S3Server {
            _process: process,
            dir,
            port,
            bucket: bucket.into(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("moto_server did not listen on {port}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let reply = server.request("PUT", &format!("/{bucket}"))?;
        if !reply.starts_with("HTTP/1.1 200") {
            bail!("create bucket {bucket}: {reply}");
        }
        let creds = server.credentials_file();
        std::fs::write(
            &creds,
            format!("access_key_id = \"testing\"\nsecret_access_key = \"{SECRET}\"\n"),
        )?;
        std::fs::set_permissions(&creds, std::fs::Permissions::from_mode(0o600))?;
        let pg = nix::unistd::User::from_name("postgres")?.context("no postgres user")?;
        nix::unistd::chown(&creds, Some(pg.uid), Some(pg.gid))?;
        Ok(server)
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    /// Owned by the PostgreSQL account, mode 0600.
    pub fn credentials_file(&self) -> PathBuf {
        self.dir.path().join("s3.credentials")
    }

    /// The `[backup]` keys (TOML literals) of a repository under `prefix`.
    pub fn backup_keys(&self, prefix: &str) -> Vec<(String, String)> {
        vec![
            (
                "repository".into(),
                format!("{:?}", format!("s3://{}/{prefix}", self.bucket)),
            ),
            ("s3_endpoint".into(), format!("{:?}", self.endpoint())),
            ("s3_path_style".into(), "true".into()),
            (
                "s3_credentials_file".into(),
                format!("{:?}", self.credentials_file().display().to_string()),
            ),
        ]
    }

    /// Every key in the bucket that starts with `prefix` (moto answers
    /// unsigned requests).
    pub fn keys(&self, prefix: &str) -> anyhow::Result<Vec<String>> {
        let reply = self.request(
            "GET",
            &format!("/{}?list-type=2&max-keys=1000&prefix={prefix}", self.bucket),
        )?;
        Ok(reply
            .split("<Key>")
            .skip(1)
            .filter_map(|s| s.split_once("</Key>").map(|(k, _)| k.to_string()))
            .collect())
    }

    fn request(&self, method: &str, target: &str) -> anyhow::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        write!(
            s,
            "{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            self.port
        )?;
        let mut reply = String::new();
        s.read_to_string(&mut reply)?;
        Ok(reply)
    }
}
