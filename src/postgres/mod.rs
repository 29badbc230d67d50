//! The local PostgreSQL instance: everything the agent does to the server
//! on its own machine.
//!
//! - [`adopt`]: taking over a database pgha never managed.
//! - [`conf`]: pure renderers for postgresql.conf, pg_hba.conf, passfiles.
//! - [`ctl`]: initdb, start, stop, pg_basebackup, pg_rewind, run
//!   as the unprivileged OS user when the agent runs as root.
//! - [`observe`]: the server's state, through SQL and pg_controldata.
//! - [`params`]: server parameters from the member's file and from etcd.
//! - [`promote`]: promotion, finished as soon as the server accepts writes.
//! - [`query`]: the SQL pgha sends, as named constants.
//! - `relay`: runs the restore of a replica from a backup, relaying its
//!   progress into the log.

pub mod adopt;
pub mod conf;
pub mod ctl;
pub mod observe;
pub mod params;
pub mod promote;
pub mod query;
mod relay;

pub use ctl::{Instance, PgError, StopMode};
pub use observe::{DataDirState, Observation, PgStatus};
