//! What the local PostgreSQL is doing, gathered in one SQL round trip over
//! a connection the observer keeps open between loops.

use std::time::Duration;

use tokio_postgres::{Client, NoTls};

use super::ctl::{Instance, PgError};
use super::query;
use crate::model::{Lsn, PgRole, Timeline};

/// `pg_stat_archiver`: how WAL archiving is going on this server.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ArchiveStatus {
    /// `archive_mode`: `on` (the primary archives), `always` (replicas
    /// too) or `off`.
    pub mode: String,
    pub archived_count: i64,
    pub failed_count: i64,
    pub last_archived_wal: Option<String>,
    pub last_failed_wal: Option<String>,
    pub last_archived_age_ms: Option<i64>,
    pub last_failed_age_ms: Option<i64>,
}

impl ArchiveStatus {
    /// The last attempt failed: a failure newer than the last success.
    pub fn failing(&self) -> bool {
        match (self.last_failed_age_ms, self.last_archived_age_ms) {
            (Some(f), Some(a)) => f < a,
            (Some(_), None) => true,
            _ => false,
        }
    }
}

/// What is on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataDirState {
    /// Absent or empty: needs initdb or a clone.
    Empty,
    /// A PostgreSQL data directory.
    Initialized,
    /// Something else (a half-finished clone, foreign files).
    Unusable(String),
}

/// A standby as the primary sees it in `pg_stat_replication`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StandbyInfo {
    pub application_name: String,
    pub state: String,
    pub flush_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    pub sync_state: String,
    /// Milliseconds since the standby's last reply (`now() - reply_time`,
    /// never negative); `None` before its first reply. A standby cut off
    /// stays `streaming` until `wal_sender_timeout`, but stops replying.
    pub reply_age_ms: Option<u64>,
}

/// A physical slot on this server (`pg_replication_slots`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    pub name: String,
    /// Where the slot holds WAL from; `None` while it reserves nothing
    /// (created without reserving, and never streamed from).
    pub restart_lsn: Option<Lsn>,
    /// A walsender streams from it right now.
    pub active: bool,
    /// `xmin` or `catalog_xmin` is set: the slot holds back the removal of
    /// old row versions (hot_standby_feedback of the member that streamed
    /// from it).
    pub holds_xmin: bool,
}

impl SlotInfo {
    /// A slot that holds neither WAL nor an xmin, as a replica creates it.
    pub fn unreserved(name: impl Into<String>) -> Self {
        SlotInfo {
            name: name.into(),
            restart_lsn: None,
            active: false,
            holds_xmin: false,
        }
    }
}

/// A running server's answers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Running {
    pub role: PgRole,
    pub timeline: Option<Timeline>,
    /// Primary only.
    pub current_lsn: Option<Lsn>,
    pub flush_lsn: Option<Lsn>,
    /// Replica only.
    pub receive_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// WAL receiver is connected and streaming.
    pub streaming: bool,
    pub sender: Option<(String, u16)>,
    pub synchronous_standby_names: String,
    /// host and port from the configured `primary_conninfo`, if any.
    pub configured_upstream: Option<(String, u16)>,
    pub system_id: String,
    /// Primary only.
    pub standbys: Vec<StandbyInfo>,
    pub slots: Vec<SlotInfo>,
}

impl Running {
    /// The furthest WAL position this server has (written or received).
    pub fn wal_position(&self) -> Option<Lsn> {
        [
            self.flush_lsn,
            self.current_lsn,
            self.receive_lsn,
            self.replay_lsn,
        ]
        .into_iter()
        .flatten()
        .max()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PgStatus {
    /// No postmaster.
    Stopped,
    /// A postmaster exists but does not answer queries (yet).
    Starting,
    Running(Box<Running>),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Observation {
    pub data: DataDirState,
    pub status: PgStatus,
}

/// Keeps a session to the local server and turns it into [`Observation`]s.
pub struct Observer {
    instance: Instance,
    client: Option<Client>,
}

impl Observer {
    pub fn new(instance: Instance) -> Self {
        Observer {
            instance,
            client: None,
        }
    }

    pub fn data_dir_state(&self) -> DataDirState {
        data_dir_state(&self.instance.data_dir)
    }

    /// Forgets the session (after a restart or role change).
    pub fn reset(&mut self) {
        self.client = None;
    }

    /// A live session, connecting if needed.
    pub async fn client(&mut self) -> Result<&Client, PgError> {
        if self.client.as_ref().is_none_or(|c| c.is_closed()) {
            let (client, connection) = self
                .instance
                .client_config()
                .connect(NoTls)
                .await
                .map_err(PgError::Connect)?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            self.client = Some(client);
        }
        Ok(self.client.as_ref().expect("just set"))
    }

    /// The archiver's counters, or `None` when the server does not answer
    /// (they are for display: never a reason to fail a loop).
    pub async fn archive_status(&mut self) -> Option<ArchiveStatus> {
        let client = self.client().await.ok()?;
        let row = tokio::time::timeout(
            Duration::from_secs(1),
            client.query_one(query::ARCHIVER, &[]),
        )
        .await
        .ok()?
        .ok()?;
        Some(ArchiveStatus {
            mode: row.get("mode"),
            archived_count: row.get("archived_count"),
            failed_count: row.get("failed_count"),
            last_archived_wal: row.get("last_archived_wal"),
            last_failed_wal: row.get("last_failed_wal"),
            last_archived_age_ms: row.get("last_archived_age_ms"),
            last_failed_age_ms: row.get("last_failed_age_ms"),
        })
    }

    pub async fn observe(&mut self) -> Observation {
        let data = self.data_dir_state();
        if self.instance.postmaster_pid().is_none() {
            // A crashed (or fenced) postmaster we adopted must not linger as
            // a zombie: PostgreSQL and pg_rewind refuse to start beside it.
            super::ctl::reap_postgres_orphans();
            self.client = None;
            return Observation {
                data,
                status: PgStatus::Stopped,
            };
        }
        let status = match tokio::time::timeout(Duration::from_secs(2), self.query()).await {
            Ok(Ok(running)) => PgStatus::Running(Box::new(running)),
            Ok(Err(e)) => {
                tracing::debug!(error = %crate::util::chain(&e), "PostgreSQL not answering");
                self.client = None;
                PgStatus::Starting
            }
            Err(_) => {
                self.client = None;
                PgStatus::Starting
            }
        };
        Observation { data, status }
    }

    async fn query(&mut self) -> Result<Running, PgError> {
        let client = self.client().await?;
        let sql = |action: &str| {
            let action = action.to_string();
            move |source| PgError::Sql { action, source }
        };
        let row = client
            .query_one(query::OBSERVE, &[])
            .await
            .map_err(sql("observe the server"))?;
        let lsn = |idx: &str| -> Option<Lsn> {
            row.get::<_, Option<String>>(idx)
                .and_then(|s| s.parse().ok())
        };
        let in_recovery: bool = row.get("in_recovery");
        let role = if in_recovery {
            PgRole::Replica
        } else {
            PgRole::Primary
        };
        let timeline = row
            .get::<_, Option<i32>>("timeline")
            .map(|t| Timeline(t as u32));
        let receiver_status: Option<String> = row.get("receiver_status");
        let sender_host: Option<String> = row.get("sender_host");
        let sender_port: Option<i32> = row.get("sender_port");
        let mut running = Running {
            role,
            timeline,
            current_lsn: lsn("current_lsn"),
            flush_lsn: lsn("flush_lsn"),
            receive_lsn: lsn("receive_lsn"),
            replay_lsn: lsn("replay_lsn"),
            streaming: receiver_status.as_deref() == Some("streaming"),
            sender: sender_host.zip(sender_port.map(|p| p as u16)),
            system_id: row
                .get::<_, Option<String>>("system_id")
                .unwrap_or_default(),
            synchronous_standby_names: row
                .get::<_, Option<String>>("synchronous_standby_names")
                .unwrap_or_default(),
            configured_upstream: parse_conninfo_target(
                &row.get::<_, Option<String>>("primary_conninfo")
                    .unwrap_or_default(),
            ),
            standbys: Vec::new(),
            slots: Vec::new(),
        };
        if role == PgRole::Primary {
            for r in client
                .query(query::REPLICATION, &[])
                .await
                .map_err(sql("list standbys"))?
            {
                running.standbys.push(StandbyInfo {
                    application_name: r.get::<_, Option<String>>(0).unwrap_or_default(),
                    state: r.get::<_, Option<String>>(1).unwrap_or_default(),
                    flush_lsn: r.get::<_, String>(2).parse().ok(),
                    replay_lsn: r.get::<_, String>(3).parse().ok(),
                    sync_state: r.get::<_, Option<String>>(4).unwrap_or_default(),
                    reply_age_ms: r.get::<_, Option<i64>>(5).map(|ms| ms.max(0) as u64),
                });
            }
        }
        for r in client
            .query(query::SLOTS, &[])
            .await
            .map_err(sql("list slots"))?
        {
            running.slots.push(SlotInfo {
                name: r.get(0),
                restart_lsn: r.get::<_, Option<String>>(1).and_then(|l| l.parse().ok()),
                active: r.get(2),
                holds_xmin: r.get(3),
            });
        }
        Ok(running)
    }
}

/// Extracts `host` and `port` from a conninfo string as pgha writes it
/// (`key='value'` pairs).
pub fn parse_conninfo_target(conninfo: &str) -> Option<(String, u16)> {
    let mut host = None;
    let mut port = None;
    for part in conninfo.split_whitespace() {
        let Some((k, v)) = part.split_once('=') else {
            continue;
        };
        let v = v.trim_matches('\'');
        match k {
            "host" => host = Some(v.to_string()),
            "port" => port = v.parse().ok(),
            _ => {}
        }
    }
    Some((host?, port.unwrap_or(5432)))
}

pub fn data_dir_state(dir: &std::path::Path) -> DataDirState {
    match std::fs::read_dir(dir) {
        Err(_) => DataDirState::Empty,
        Ok(mut entries) => {
            if entries.next().is_none() {
                return DataDirState::Empty;
            }
            if dir.join("PG_VERSION").is_file() && dir.join("global/pg_control").is_file() {
                DataDirState::Initialized
            } else {
                DataDirState::Unusable(format!(
                    "{} is neither empty nor a PostgreSQL data directory",
                    dir.display()
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_upstream_from_conninfo() {
        let c = crate::postgres::conf::primary_conninfo(
            &crate::postgres::conf::Upstream {
                host: "10.0.0.5".into(),
                port: 5433,
                user: "r".into(),
                slot: "s".into(),
            },
            "n1",
            "/p",
        );
        assert_eq!(
            parse_conninfo_target(&c),
            Some(("10.0.0.5".to_string(), 5433))
        );
        assert_eq!(parse_conninfo_target(""), None);
    }

    #[test]
    fn classifies_data_directories() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("data");
        assert_eq!(data_dir_state(&d), DataDirState::Empty);
        std::fs::create_dir(&d).unwrap();
        assert_eq!(data_dir_state(&d), DataDirState::Empty);
        std::fs::write(d.join("junk"), "x").unwrap();
        assert!(matches!(data_dir_state(&d), DataDirState::Unusable(_)));
        std::fs::write(d.join("PG_VERSION"), "15").unwrap();
        std::fs::create_dir(d.join("global")).unwrap();
        std::fs::write(d.join("global/pg_control"), "").unwrap();
        assert_eq!(data_dir_state(&d), DataDirState::Initialized);
    }
}
