//! A repository in an S3-compatible object store.
//!
//! The client is `object_store` (Apache Arrow's, with its `aws` feature):
//! it signs requests itself, retries with backoff, speaks path-style and
//! virtual-hosted style, does multipart uploads and conditional writes,
//! and sits on the same reqwest 0.13 + rustls + aws-lc stack pgha already
//! links (etcd-client's TLS), so no second TLS implementation comes in.
//! `rust-s3`'s blocking client would have brought attohttpc with its own
//! rustls setup. `object_store` is async; [`S3Repository`] owns a small
//! runtime of its own and waits for each request on a plain channel, so
//! the synchronous [`Repository`] trait works from any thread, including
//! one inside another runtime (where `block_on` would panic).
//!
//! Creating an object never replaces one:
//! - Objects up to [`PART_SIZE`] (every WAL file, manifests) are one `PUT`
//!   with `If-None-Match: *`; the server answers 412 when the key exists.
//! - Larger ones (a base backup) are uploaded in parts under a hidden
//!   staging key next to the target, then copied to the key with a
//!   multipart copy whose completion carries `If-None-Match: *`, and the
//!   staging object is deleted. A reader never sees a partial object: S3
//!   makes an object visible only when its `PUT` or multipart upload
//!   completes.
//! - A copy part is at most 5 GiB, so that is the largest object this
//!   can create; [`Repository::max_object_size`] says so (at most
//!   `s3_max_object_mib`), and base backups are stored in pieces below it
//!   ([`super::base::store`]).
//!
//! Why not upload a large object to its key directly, with a conditional
//! completion of the multipart upload? object_store (0.14) sends
//! `If-None-Match: *` on a completion only inside its own one-part copy;
//! its uploads complete unconditionally, so the object would be put in
//! place over one a racing writer had created. Pieces need nothing beyond
//! the conditional write and copy every object already goes through.
//!
//! Servers that ignore `If-None-Match` on writes (AWS S3 before August
//! 2024, older MinIO and Ceph RGW releases) would let a write replace an
//! object. pgha looks the key up first (`HEAD`) and never uploads over an
//! object it can see, so only two writers racing on the same key could
//! replace one there; with WAL that is the primary and a standby archiving
//! the same segment, whose content is then the same. Use a server that
//! honours the header (AWS S3, MinIO, Ceph RGW 18+, Cloudflare R2, moto).

use std::future::Future;
use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use object_store::aws::{AmazonS3, AmazonS3Builder, S3ConditionalPut, S3CopyIfNotExists};
use object_store::path::Path as ObjPath;
use object_store::{
    ClientOptions, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, RetryConfig,
};

use super::repo::{Created, RepoError, Repository, valid_key};
use crate::config::backup::{S3Config, S3Credentials};

/// Objects up to this size are sent in one `PUT`; larger ones in parts of
/// this size (S3 wants at least 5 MiB per part and at most 10,000 parts).
pub const PART_SIZE: usize = 32 << 20;

/// A repository in an S3 bucket, under an optional key prefix.
pub struct S3Repository {
    store: Arc<AmazonS3>,
    /// `s3://bucket[/prefix]`, for messages.
    url: String,
    prefix: String,
    /// `s3_max_object_mib`, in bytes.
    max_object_size: u64,
    /// Taken on drop: `shutdown_background` never blocks, so dropping the
    /// repository inside an async task is fine.
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for S3Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Repository")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Drop for S3Repository {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Why an S3 repository could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("the S3 repository {url}: {message}")]
    Client { url: String, message: String },
    #[error("cannot start the S3 client of {url}")]
    Runtime {
        url: String,
        #[source]
        source: std::io::Error,
    },
}

impl S3Repository {
    pub fn new(cfg: &S3Config, creds: &S3Credentials) -> Result<S3Repository, OpenError> {
        let url = cfg.url();
        let client = ClientOptions::new()
            // Only when the operator wrote an http:// endpoint (a local
            // MinIO, a test server); AWS itself is always https.
            .with_allow_http(
                cfg.endpoint
                    .as_deref()
                    .is_some_and(|e| e.starts_with("http://")),
            )
            .with_connect_timeout(Duration::from_secs(10))
            // A whole part (32 MiB) must fit in it on a slow link.
            .with_timeout(Duration::from_secs(300));
        // Bounded so that archive_command fails (and PostgreSQL retries the
        // segment) rather than hanging for long on an unreachable store.
        let retry = RetryConfig {
            max_retries: 5,
            retry_timeout: Duration::from_secs(120),
            ..RetryConfig::default()
        };
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_access_key_id(&creds.access_key_id)
            .with_secret_access_key(&creds.secret_access_key)
            .with_virtual_hosted_style_request(!cfg.path_style)
            .with_conditional_put(S3ConditionalPut::ETagMatch)
            .with_copy_if_not_exists(S3CopyIfNotExists::Multipart)
            .with_client_options(client)
            .with_retry(retry);
        if let Some(token) = &creds.session_token {
            builder = builder.with_token(token);
        }
        if let Some(endpoint) = &cfg.endpoint {
            builder = builder.with_endpoint(if cfg.path_style {
                endpoint.clone()
            } else {
                // object_store takes a custom virtual-hosted endpoint with
                // the bucket already in the host name.
                virtual_hosted(endpoint, &cfg.bucket)
            });
        }
        let store = builder.build().map_err(|e| OpenError::Client {
            url: url.clone(),
            message: e.to_string(),
        })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pgha-s3")
            .enable_all()
            .build()
            .map_err(|source| OpenError::Runtime {
                url: url.clone(),
                source,
            })?;
        Ok(S3Repository {
            store: Arc::new(store),
            url,
            prefix: cfg.prefix.clone(),
            max_object_size: cfg.max_object_size,
            runtime: Some(runtime),
        })
    }

    /// Runs `fut` on the repository's runtime and waits for it on a plain
    /// channel (no `block_on`, so callable from inside another runtime).
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.runtime
            .as_ref()
            .expect("the runtime lives until drop")
            .spawn(async move {
                let _ = tx.send(fut.await);
            });
        rx.recv()
            .expect("an S3 request task ended without an answer")
    }

    /// The object path of a repository key (or directory).
    fn object(&self, key: &str) -> Result<ObjPath, RepoError> {
        if !valid_key(key) {
            return Err(RepoError::BadKey { key: key.into() });
        }
        Ok(self.full(key))
    }

    fn full(&self, key: &str) -> ObjPath {
        if self.prefix.is_empty() {
            ObjPath::from(key)
        } else {
            ObjPath::from(format!("{}/{key}", self.prefix))
        }
    }

    fn err(&self, action: &'static str, key: &str, e: object_store::Error) -> RepoError {
        if no_such_bucket(&e) {
            // Listing is how callers look at the repository as a whole;
            // other calls name their key.
            if action == "list" {
                return RepoError::Missing {
                    repo: self.location(),
                };
            }
            return RepoError::Io {
                repo: self.location(),
                action,
                key: key.into(),
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "the bucket does not exist",
                ),
            };
        }
        match e {
            object_store::Error::NotFound { .. } => RepoError::NotFound {
                repo: self.location(),
                key: key.into(),
            },
            e => RepoError::Io {
                repo: self.location(),
                action,
                key: key.into(),
                source: std::io::Error::other(e),
            },
        }
    }

    /// Multipart upload of `first` and the rest of `src` to a staging key,
    /// then a copy to `key` that fails if `key` exists.
    fn create_large(
        &self,
        key: &str,
        path: ObjPath,
        first: Vec<u8>,
        src: &mut dyn Read,
    ) -> Result<Created, RepoError> {
        let (dir, name) = key.rsplit_once('/').map_or(("", key), |(d, n)| (d, n));
        let staging_key = if dir.is_empty() {
            format!(".{name}.{}.tmp", super::repo::temp_suffix())
        } else {
            format!("{dir}/.{name}.{}.tmp", super::repo::temp_suffix())
        };
        let staging = self.full(&staging_key);
        let store = self.store.clone();
        let at = staging.clone();
        let mut upload = self
            .run(async move { store.put_multipart(&at).await })
            .map_err(|e| self.err("start an upload of", key, e))?;
        let mut bytes = 0u64;
        let mut part = first;
        let result = loop {
            let len = part.len();
            bytes += len as u64;
            let fut = upload.put_part(PutPayload::from(part));
            if let Err(e) = self.run(fut) {
                break Err(self.err("upload", key, e));
            }
            if len < PART_SIZE {
                break Ok(());
            }
            part = match read_up_to(src, PART_SIZE) {
                Ok(p) if p.is_empty() => break Ok(()),
                Ok(p) => p,
                Err(e) => {
                    break Err(RepoError::Io {
                        repo: self.location(),
                        action: "write",
                        key: key.into(),
                        source: e,
                    });
                }
            };
        };
        if let Err(e) = result {
            let _ = self.run(async move { upload.abort().await });
            return Err(e);
        }
        self.run(async move { upload.complete().await })
            .map_err(|e| self.err("upload", key, e))?;
        let store = self.store.clone();
        let from = staging.clone();
        let copied = self.run(async move { store.copy_if_not_exists(&from, &path).await });
        let store = self.store.clone();
        let _ = self.run(async move { store.delete(&staging).await });
        match copied {
            Ok(()) => Ok(Created::New { bytes }),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Created::Existed),
            Err(e) => Err(self.err(
                if bytes > 5 << 30 {
                    "store (a multipart copy part is at most 5 GiB; see s3_max_object_mib)"
                } else {
                    "store"
                },
                key,
                e,
            )),
        }
    }
}

/// A 404 for the bucket rather than the key: the repository is missing
/// (a typo, or not created yet), which must not read as "this WAL file was
/// never archived" (recovery would end early). object_store keeps the
/// status to itself but carries the server's error body, whose S3 error
/// code is stable.
fn no_such_bucket(e: &object_store::Error) -> bool {
    format!("{e:?}").contains("NoSuchBucket")
}

/// `https://host` → `https://bucket.host`.
fn virtual_hosted(endpoint: &str, bucket: &str) -> String {
    match endpoint.split_once("://") {
        Some((scheme, host)) => format!("{scheme}://{bucket}.{host}"),
        None => endpoint.to_string(),
    }
}

/// Reads until `limit` bytes or the end of `src`.
fn read_up_to(src: &mut dyn Read, limit: usize) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::with_capacity(limit.min(1 << 20));
    src.take(limit as u64).read_to_end(&mut buf)?;
    Ok(buf)
}

impl Repository for S3Repository {
    fn location(&self) -> String {
        self.url.clone()
    }

    fn list(&self, dir: &str) -> Result<Vec<String>, RepoError> {
        let prefix = if dir.is_empty() {
            (!self.prefix.is_empty()).then(|| ObjPath::from(self.prefix.as_str()))
        } else {
            Some(self.object(dir)?)
        };
        let store = self.store.clone();
        let listed = self
            .run(async move { store.list_with_delimiter(prefix.as_ref()).await })
            .map_err(|e| self.err("list", dir, e))?;
        let mut names: Vec<String> = listed
            .common_prefixes
            .iter()
            .chain(listed.objects.iter().map(|o| &o.location))
            .filter_map(|p| p.filename().map(str::to_string))
            // Staging objects of uploads in flight (or of a crashed one).
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, RepoError> {
        let path = self.object(key)?;
        let store = self.store.clone();
        let got = self
            .run(async move { store.get(&path).await })
            .map_err(|e| self.err("open", key, e))?;
        Ok(Box::new(ObjectReader {
            stream: Some(got.into_stream()),
            chunk: Bytes::new(),
            handle: self
                .runtime
                .as_ref()
                .expect("the runtime lives until drop")
                .handle()
                .clone(),
            repo: self.location(),
            key: key.into(),
        }))
    }

    fn create(&self, key: &str, src: &mut dyn Read) -> Result<Created, RepoError> {
        let path = self.object(key)?;
        // Cheap, and the only protection on a server that ignores
        // If-None-Match (see the module comment).
        let store = self.store.clone();
        let at = path.clone();
        match self.run(async move { store.head(&at).await }) {
            Ok(_) => return Ok(Created::Existed),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.err("look up", key, e)),
        }
        let first = read_up_to(src, PART_SIZE).map_err(|source| RepoError::Io {
            repo: self.location(),
            action: "write",
            key: key.into(),
            source,
        })?;
        if first.len() == PART_SIZE {
            return self.create_large(key, path, first, src);
        }
        let bytes = first.len() as u64;
        let store = self.store.clone();
        let opts = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self.run(async move { store.put_opts(&path, PutPayload::from(first), opts).await }) {
            Ok(_) => Ok(Created::New { bytes }),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Created::Existed),
            Err(e) => Err(self.err("store", key, e)),
        }
    }

    fn max_object_size(&self) -> Option<u64> {
        Some(self.max_object_size)
    }

    fn delete(&self, key: &str) -> Result<(), RepoError> {
        let path = self.object(key)?;
        let store = self.store.clone();
        match self.run(async move { store.delete(&path).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }
}

/// Streams an object's body: each `read` that needs more data waits for
/// the next chunk on the repository's runtime, so a base backup is never
/// held in memory whole.
struct ObjectReader {
    stream: Option<BoxStream<'static, object_store::Result<Bytes>>>,
    chunk: Bytes,
    handle: tokio::runtime::Handle,
    repo: String,
    key: String,
}

impl Read for ObjectReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            let Some(mut stream) = self.stream.take() else {
                return Ok(0);
            };
            let (tx, rx) = std::sync::mpsc::sync_channel(1);
            self.handle.spawn(async move {
                let next = stream.next().await;
                let _ = tx.send((next, stream));
            });
            let (next, stream) = rx.recv().map_err(|_| {
                std::io::Error::other(format!(
                    "{}: the S3 client of {} stopped",
                    self.key, self.repo
                ))
            })?;
            match next {
                None => return Ok(0),
                Some(Ok(chunk)) => {
                    self.chunk = chunk;
                    self.stream = Some(stream);
                }
                Some(Err(e)) => {
                    return Err(std::io::Error::other(format!(
                        "read {} in the repository {}: {e}",
                        self.key, self.repo
                    )));
                }
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk[..n]);
        self.chunk = self.chunk.slice(n..);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Child, Command, Stdio};
    use std::time::Instant;

    use super::*;
    use crate::config::backup::{DEFAULT_S3_MAX_OBJECT_MIB, DEFAULT_S3_REGION};

    /// A moto S3 server on a free port of 127.0.0.1, killed on drop.
    struct Moto {
        child: Child,
        port: u16,
    }

    impl Moto {
        fn start() -> Moto {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = Command::new("moto_server")
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("moto_server (scripts/install-deps.sh installs it)");
            let moto = Moto { child, port };
            let deadline = Instant::now() + Duration::from_secs(30);
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(Instant::now() < deadline, "moto_server did not listen");
                std::thread::sleep(Duration::from_millis(100));
            }
            moto
        }

        fn endpoint(&self) -> String {
            format!("http://127.0.0.1:{}", self.port)
        }

        /// Creates a bucket (moto accepts unsigned requests).
        fn bucket(&self, name: &str) {
            let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
            write!(
                s,
                "PUT /{name} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                self.port
            )
            .unwrap();
            let mut reply = String::new();
            s.read_to_string(&mut reply).unwrap();
            assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
        }
    }

    impl Drop for Moto {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn config(moto: &Moto, bucket: &str, prefix: &str, dir: &std::path::Path) -> S3Config {
        let credentials_file = dir.join("s3.credentials");
        std::fs::write(
            &credentials_file,
            "access_key_id = \"testing\"\nsecret_access_key = \"testing\"\n",
        )
        .unwrap();
        std::fs::set_permissions(&credentials_file, std::fs::Permissions::from_mode(0o600))
            .unwrap();
        S3Config {
            bucket: bucket.into(),
            prefix: prefix.into(),
            endpoint: Some(moto.endpoint()),
            region: DEFAULT_S3_REGION.into(),
            path_style: true,
            credentials_file,
            config_path: dir.join("pgha.toml"),
            max_object_size: DEFAULT_S3_MAX_OBJECT_MIB << 20,
        }
    }

    fn open(cfg: &S3Config) -> S3Repository {
        S3Repository::new(cfg, &cfg.load_credentials().unwrap()).unwrap()
    }

    #[test]
    fn the_repository_contract_against_a_real_s3_server() {
        let moto = Moto::start();
        moto.bucket("pgha-test");
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(&moto, "pgha-test", "clusters/one", dir.path());
        let repo = open(&cfg);
        assert_eq!(repo.location(), "s3://pgha-test/clusters/one");

        assert_eq!(repo.list("").unwrap(), Vec::<String>::new());
        assert_eq!(repo.list("archive").unwrap(), Vec::<String>::new());
        assert_eq!(
            repo.create("archive/00000001/obj", &mut &b"first"[..])
                .unwrap(),
            Created::New { bytes: 5 }
        );
        assert_eq!(
            repo.create("archive/00000001/obj", &mut &b"second"[..])
                .unwrap(),
            Created::Existed
        );
        assert_eq!(repo.read("archive/00000001/obj").unwrap(), b"first");
        repo.create("archive/00000001/other", &mut &b""[..])
            .unwrap();
        repo.create("archive/00000002/x", &mut &b"x"[..]).unwrap();
        assert_eq!(repo.list("").unwrap(), ["archive"]);
        assert_eq!(repo.list("archive").unwrap(), ["00000001", "00000002"]);
        assert_eq!(repo.list("archive/00000001").unwrap(), ["obj", "other"]);
        assert_eq!(repo.read("archive/00000001/other").unwrap(), b"");

        let err = repo.read("archive/00000001/none").unwrap_err();
        assert!(matches!(err, RepoError::NotFound { .. }), "{err}");
        assert!(err.to_string().contains("archive/00000001/none"), "{err}");
        assert!(
            err.to_string().contains("s3://pgha-test/clusters/one"),
            "{err}"
        );
        for bad in ["", "/abs", "a/../b", "a//b", ".hidden", "a b"] {
            assert!(
                matches!(repo.open(bad), Err(RepoError::BadKey { .. })),
                "{bad:?}"
            );
            assert!(
                matches!(
                    repo.create(bad, &mut &b""[..]),
                    Err(RepoError::BadKey { .. })
                ),
                "{bad:?}"
            );
            assert!(
                matches!(repo.delete(bad), Err(RepoError::BadKey { .. })),
                "{bad:?}"
            );
        }

        repo.delete("archive/00000001/obj").unwrap();
        repo.delete("archive/00000001/obj").unwrap();
        assert_eq!(repo.list("archive/00000001").unwrap(), ["other"]);
        assert!(matches!(
            repo.read("archive/00000001/obj"),
            Err(RepoError::NotFound { .. })
        ));
        // Deleted, the key can be created again.
        repo.create("archive/00000001/obj", &mut &b"again"[..])
            .unwrap();
        assert_eq!(repo.read("archive/00000001/obj").unwrap(), b"again");

        // The prefix keeps repositories apart in one bucket.
        let other = open(&config(&moto, "pgha-test", "clusters/two", dir.path()));
        assert_eq!(other.list("").unwrap(), Vec::<String>::new());
        let root = open(&config(&moto, "pgha-test", "", dir.path()));
        assert_eq!(root.list("").unwrap(), ["clusters"]);
        assert_eq!(root.read("clusters/one/archive/00000002/x").unwrap(), b"x");

        // A bucket that does not exist: named, not taken for an empty one.
        let missing = open(&config(&moto, "no-such-bucket", "", dir.path()));
        let err = missing.list("archive").unwrap_err();
        assert!(matches!(err, RepoError::Missing { .. }), "{err}");
        assert!(err.to_string().contains("s3://no-such-bucket"), "{err}");
        let err = missing.create("archive/obj", &mut &b"x"[..]).unwrap_err();
        assert!(err.to_string().contains("archive/obj"), "{err}");
        assert!(err.to_string().contains("s3://no-such-bucket"), "{err}");
    }

    /// More than one part: staged, copied into place without replacing,
    /// read back whole, and no staging object left over.
    #[test]
    fn large_objects_are_staged_and_never_replace_one() {
        let moto = Moto::start();
        moto.bucket("pgha-large");
        let dir = tempfile::tempdir().unwrap();
        let repo = open(&config(&moto, "pgha-large", "p", dir.path()));
        let data: Vec<u8> = (0..PART_SIZE * 2 + 12345)
            .map(|i| (i % 251) as u8)
            .collect();
        assert_eq!(
            repo.create("backup/b1/base.tar.zst", &mut &data[..])
                .unwrap(),
            Created::New {
                bytes: data.len() as u64
            }
        );
        let mut back = Vec::new();
        repo.open("backup/b1/base.tar.zst")
            .unwrap()
            .read_to_end(&mut back)
            .unwrap();
        assert!(back == data, "the object read back differs");
        let root = open(&config(&moto, "pgha-large", "", dir.path()));
        assert_eq!(root.list("p/backup/b1").unwrap(), ["base.tar.zst"]);

        // A second large create of the same key: the look-up finds it and
        // nothing is uploaded (the raw bucket listing shows no dot names).
        let other: Vec<u8> = vec![7u8; PART_SIZE + 1];
        assert_eq!(
            repo.create("backup/b1/base.tar.zst", &mut &other[..])
                .unwrap(),
            Created::Existed
        );
        let store = repo.store.clone();
        let all: Vec<String> = repo.run(async move {
            store
                .list(None)
                .map(|m| m.unwrap().location.to_string())
                .collect()
                .await
        });
        assert_eq!(all, ["p/backup/b1/base.tar.zst"]);
        assert_eq!(
            repo.read("backup/b1/base.tar.zst").unwrap().len(),
            data.len()
        );

        // The staged path on its own: the copy that would replace the
        // object is refused by the server, and the staging object removed.
        let path = repo.object("backup/b1/base.tar.zst").unwrap();
        let first = other[..PART_SIZE].to_vec();
        let got = repo
            .create_large(
                "backup/b1/base.tar.zst",
                path,
                first,
                &mut &other[PART_SIZE..],
            )
            .unwrap();
        assert_eq!(got, Created::Existed);
        let store = repo.store.clone();
        let all: Vec<String> = repo.run(async move {
            store
                .list(None)
                .map(|m| m.unwrap().location.to_string())
                .collect()
                .await
        });
        assert_eq!(all, ["p/backup/b1/base.tar.zst"]);
        let back = repo.read("backup/b1/base.tar.zst").unwrap();
        assert!(back == data, "the object was replaced");
    }

    /// A base backup's stored stream over the repository's limit: stored
    /// as pieces, each created through the staged upload and the copy that
    /// never replaces, read back whole and checked; a second backup
    /// under the same keys replaces nothing.
    #[test]
    fn a_stream_over_the_object_limit_is_stored_in_pieces() {
        use crate::backup::base::{self, ManifestFile};
        let moto = Moto::start();
        moto.bucket("pgha-pieces");
        let dir = tempfile::tempdir().unwrap();
        let max = (PART_SIZE + (1 << 20)) as u64;
        let repo = open(&S3Config {
            max_object_size: max,
            ..config(&moto, "pgha-pieces", "p", dir.path())
        });
        assert_eq!(repo.max_object_size(), Some(max));
        let content = base::tests::noise(2 * max as usize + 12345);
        let data = zstd::stream::encode_all(&content[..], 1).unwrap();
        let key = "backup/b1/base.tar.zst";
        let mut pieces = base::store(&repo, key, &mut &data[..], repo.max_object_size()).unwrap();
        let sizes: Vec<u64> = pieces.iter().map(|p| p.stored_size).collect();
        assert_eq!(sizes, [max, max, data.len() as u64 - 2 * max]);
        let f = base::stored_file("base.tar", content.len() as u64, &mut pieces);
        let read = |f: &ManifestFile| {
            let mut out = Vec::new();
            base::read_checked(&repo, f, |c| {
                out.extend_from_slice(c);
                Ok(())
            })
            .map(|()| out)
        };
        assert!(read(&f).unwrap() == content, "read back differs");
        let all = |repo: &S3Repository| -> Vec<String> {
            let store = repo.store.clone();
            repo.run(async move {
                store
                    .list(None)
                    .map(|m| m.unwrap().location.to_string())
                    .collect()
                    .await
            })
        };
        let expected = [
            "p/backup/b1/base.tar.zst",
            "p/backup/b1/base.tar.zst.2",
            "p/backup/b1/base.tar.zst.3",
        ];
        assert_eq!(all(&repo), expected, "no staging object left");

        // Other content under the same keys: refused, nothing replaced,
        // nothing left behind.
        let other = zstd::stream::encode_all(&base::tests::noise(max as usize + 1)[..], 1).unwrap();
        let err = base::store(&repo, key, &mut &other[..], repo.max_object_size()).unwrap_err();
        assert!(
            matches!(err, crate::backup::BackupError::Exists { .. }),
            "{err}"
        );
        assert_eq!(all(&repo), expected);
        // A racing writer's object at the second piece's key: the copy
        // into place refuses to replace it even past the look-up
        // (`create_large` on its own), and a store that meets it removes
        // the first piece it made.
        let racing = open(&S3Config {
            max_object_size: max,
            ..config(&moto, "pgha-pieces", "q", dir.path())
        });
        racing
            .create("backup/b2/base.tar.zst.2", &mut &b"raced"[..])
            .unwrap();
        let path = racing.object("backup/b2/base.tar.zst.2").unwrap();
        let got = racing
            .create_large(
                "backup/b2/base.tar.zst.2",
                path,
                data[..PART_SIZE].to_vec(),
                &mut &data[PART_SIZE..max as usize],
            )
            .unwrap();
        assert_eq!(got, Created::Existed);
        assert_eq!(racing.read("backup/b2/base.tar.zst.2").unwrap(), b"raced");
        let err = base::store(
            &racing,
            "backup/b2/base.tar.zst",
            &mut &data[..],
            racing.max_object_size(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("base.tar.zst.2"), "{err}");
        assert_eq!(racing.list("backup/b2").unwrap(), ["base.tar.zst.2"]);
        assert!(read(&f).unwrap() == content, "the first backup is intact");
    }

    /// The single-PUT path on its own: `If-None-Match: *` makes the server
    /// refuse a replacement even when the HEAD check is not there to stop
    /// it (two writers racing).
    #[test]
    fn a_conditional_put_keeps_the_first_object() {
        let moto = Moto::start();
        moto.bucket("pgha-race");
        let dir = tempfile::tempdir().unwrap();
        let repo = open(&config(&moto, "pgha-race", "", dir.path()));
        repo.create("k/obj", &mut &b"first"[..]).unwrap();
        let store = repo.store.clone();
        let path = repo.object("k/obj").unwrap();
        let put = repo.run(async move {
            store
                .put_opts(
                    &path,
                    PutPayload::from_static(b"second"),
                    PutOptions {
                        mode: PutMode::Create,
                        ..PutOptions::default()
                    },
                )
                .await
        });
        assert!(
            matches!(put, Err(object_store::Error::AlreadyExists { .. })),
            "{put:?}"
        );
        assert_eq!(repo.read("k/obj").unwrap(), b"first");
    }

    #[test]
    fn the_credentials_file_must_be_private_and_well_formed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = S3Config {
            bucket: "b-1".into(),
            prefix: String::new(),
            endpoint: None,
            region: DEFAULT_S3_REGION.into(),
            path_style: false,
            credentials_file: dir.path().join("creds"),
            config_path: dir.path().join("pgha.toml"),
            max_object_size: DEFAULT_S3_MAX_OBJECT_MIB << 20,
        };
        let err = cfg.load_credentials().unwrap_err().to_string();
        assert!(err.contains("backup.s3_credentials_file"), "{err}");
        assert!(err.contains("pgha.toml"), "{err}");
        std::fs::write(
            &cfg.credentials_file,
            "access_key_id = \"AK\"\nsecret_access_key = \"SECRET\"\n",
        )
        .unwrap();
        std::fs::set_permissions(
            &cfg.credentials_file,
            std::fs::Permissions::from_mode(0o640),
        )
        .unwrap();
        let err = cfg.load_credentials().unwrap_err().to_string();
        assert!(err.contains("mode 0640"), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
        std::fs::set_permissions(
            &cfg.credentials_file,
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let creds = cfg.load_credentials().unwrap();
        assert_eq!(creds.access_key_id, "AK");
        assert!(!format!("{creds:?}").contains("SECRET"));
        // A symlink to it is refused (O_NOFOLLOW).
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&cfg.credentials_file, &link).unwrap();
        let linked = S3Config {
            credentials_file: link,
            ..cfg.clone()
        };
        assert!(linked.load_credentials().is_err());
        std::fs::write(&cfg.credentials_file, "access_key_id = \"AK\"\n").unwrap();
        let err = cfg.load_credentials().unwrap_err().to_string();
        assert!(err.contains("secret_access_key"), "{err}");
        std::fs::write(
            &cfg.credentials_file,
            "access_key_id = \"\"\nsecret_access_key = \"S\"\n",
        )
        .unwrap();
        let err = cfg.load_credentials().unwrap_err().to_string();
        assert!(err.contains("access_key_id"), "{err}");
    }
}
