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
//!   completes. A single copy part is at most 5 GiB, so a compressed base
//!   backup larger than that cannot be stored (the error says so).
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
                    "store (a multipart copy part is at most 5 GiB)"
                } else {
                    "store"
                },
                key,
                e,
            )),
        }
    }
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
            .map_err(|e| match e {
                // A missing bucket, not a missing directory (an empty
                // "directory" lists as nothing).
                object_store::Error::NotFound { .. } => RepoError::Missing {
                    repo: self.location(),
                },
                e => self.err("list", dir, e),
            })?;
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
