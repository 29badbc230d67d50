//! pgha: a PostgreSQL high-availability manager.
//!
//! One agent runs beside each PostgreSQL server. Agents coordinate through
//! etcd: the member holding the `leader` key (bound to an etcd lease) is the
//! only one allowed to run PostgreSQL writable. The code is laid out along
//! that architecture:
//!
//! - [`model`]: domain values (LSN, timeline, member record) shared by all.
//! - [`config`]: the TOML file, parsed then validated into typed values.
//! - [`dcs`]: the distributed configuration store. A trait, an etcd v3
//!   backend, and an in-memory one for unit tests.
//! - [`postgres`]: control of the local PostgreSQL: initdb, start/stop,
//!   promote, clone, rewind, observation through SQL, and pure renderers
//!   for the files pgha writes.
//! - [`ha`]: the decision logic. A pure function from a snapshot (DCS view,
//!   local PostgreSQL state, configuration, time) to one action with a
//!   typed reason. No I/O, so it is tested exhaustively.
//! - [`agent`]: the loop that observes, calls [`ha::decide`], and the
//!   executor, the only code that turns an action into side effects; plus
//!   the fence keeper that stops a leader whose lease is running out.
//! - [`api`]: the REST API agents and operators use.
//! - [`cli`]: the `pgha` subcommands.
//! - [`backup`]: WAL archiving, base backups and restore into a repository.
//! - [`pem`]: certificate and key files for the API server and the etcd client.

pub mod agent;
pub mod api;
pub mod backup;
pub mod cli;
pub mod config;
pub mod dcs;
pub mod ha;
pub mod model;
pub mod pem;
pub mod postgres;
pub mod proxy;
pub mod safe_fs;
pub mod secret;
pub mod util;
