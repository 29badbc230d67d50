//! Fixtures that run real processes for the integration tests, in the
//! spirit of ripgrep's `tests/util.rs`: each test gets its own directory,
//! its own ports and its own processes, so tests run in parallel, and
//! nothing outlives the test that started it.
//!
//! - [`free_port`]: a port no other test of this process was given.
//! - [`TestDir`]: a short, world-traversable temp directory, kept on
//!   failure when `PGHA_KEEP_TEST_DIRS` is set.
//! - [`ProcessGuard`]: a child in its own process group, killed on drop.
//! - [`Etcd`]: a single-node etcd that can be stopped, restarted and paused,
//!   optionally serving TLS with client certificates from a [`Pki`].
//! - [`wait_until`]: polls a condition with a deadline.
//! - [`s3::S3Server`]: a local S3-compatible server (moto) with a bucket.
//! - [`Cluster`], [`Node`]: real pgha agents with PostgreSQL (`cluster.rs`).
//! - [`Writer`], [`OneWritablePrimary`]: failover oracles (`oracle.rs`).

// Each test module uses a different subset of the fixtures.
#![allow(dead_code)]

pub mod cluster;
mod dir;
mod etcd;
pub mod oracle;
mod pki;
mod port;
pub mod process;
pub mod proxy;
pub mod s3;
mod wait;

pub use cluster::{Cluster, ClusterOptions, Node};
pub use dir::TestDir;
pub use etcd::Etcd;
pub use oracle::{OneWritablePrimary, Writer};
pub use pki::Pki;
pub use port::free_port;
pub use process::ProcessGuard;
pub use wait::wait_until;
