//! pgha's integration tests: one test binary (`cargo test --test it`) so
//! that the crate and the fixtures are compiled once and every test can
//! run in parallel with the others.
//!
//! The tests drive real processes (etcd, and later PostgreSQL and pgha
//! agents) through the fixtures in [`support`]. Set `PGHA_KEEP_TEST_DIRS=1`
//! to keep the directories (data, logs) of failed tests for inspection.

mod support;

mod adopt;
mod api;
mod auto;
mod backup;
mod chaos;
mod cli;
mod dcs_etcd;
mod deploy;
mod etcd_tls;
mod failover;
mod failsafe;
mod foundation;
mod haproxy;
mod hardening;
mod operate;
mod packaging;
mod params;
mod promotion;
mod proxy;
mod proxy_auth_query;
mod proxy_server_tls;
mod slots;
mod sync;
mod sync_cut;
mod vip;
