//! SQL sent to the local server, as named constants so that every query
//! pgha depends on can be found (and reviewed) in one place.

/// One round trip for the whole observation. Timeline on a primary comes
/// from the WAL file name of the insert position (a checkpoint after
/// promotion may not have happened yet, so pg_control can be stale).
pub const OBSERVE: &str = "
SELECT pg_is_in_recovery() AS in_recovery,
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn()::text END AS current_lsn,
       CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_flush_lsn()::text END AS flush_lsn,
       pg_last_wal_receive_lsn()::text AS receive_lsn,
       pg_last_wal_replay_lsn()::text AS replay_lsn,
       CASE WHEN pg_is_in_recovery()
            THEN greatest((SELECT received_tli FROM pg_stat_wal_receiver),
                          (SELECT timeline_id FROM pg_control_checkpoint()))
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
       END AS timeline,
       (SELECT status FROM pg_stat_wal_receiver) AS receiver_status,
       (SELECT sender_host FROM pg_stat_wal_receiver) AS sender_host,
       (SELECT sender_port FROM pg_stat_wal_receiver) AS sender_port,
       (SELECT system_identifier::text FROM pg_control_system()) AS system_id,
       current_setting('primary_conninfo') AS primary_conninfo,
       current_setting('synchronous_standby_names') AS synchronous_standby_names";

/// Standbys connected to this server (primary side), with the age of each
/// one's last reply in milliseconds. `reply_time` is stamped by the standby;
/// comparing it with the server's `now()` here keeps the agent's own clock
/// out of it (the two hosts' clocks still have to agree, within seconds).
pub const REPLICATION: &str = "
SELECT application_name, state, coalesce(flush_lsn::text, ''), coalesce(replay_lsn::text, ''), sync_state,
       (extract(epoch FROM clock_timestamp() - reply_time) * 1000)::bigint
  FROM pg_stat_replication";

/// The history file of timeline `$1` (written at promotion).
pub const TIMELINE_HISTORY: &str =
    "SELECT pg_read_file('pg_wal/' || lpad(upper(to_hex($1::int)), 8, '0') || '.history')";

/// Physical slots on this server, with what they hold back (WAL from
/// `restart_lsn`, old row versions through `xmin`).
/// Temporary slots (pg_basebackup's) are excluded: they vanish on their own.
pub const SLOTS: &str = "
SELECT slot_name, restart_lsn::text, active, xmin IS NOT NULL OR catalog_xmin IS NOT NULL
  FROM pg_replication_slots WHERE slot_type = 'physical' AND NOT temporary";

pub const CREATE_SLOT: &str = "SELECT pg_create_physical_replication_slot($1, $2)";
pub const DROP_SLOT: &str = "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1 AND NOT active";

/// Promotion without a restart; returns once the request is signalled
/// (see [`super::promote`] for why pgha waits by itself).
pub const PROMOTE_NO_WAIT: &str = "SELECT pg_promote(wait => false)";
/// Whether recovery still runs, what the startup process waits for, and,
/// once writable, the new timeline (from the insert position, as in
/// [`OBSERVE`]).
pub const PROMOTION_PROGRESS: &str = "
SELECT pg_is_in_recovery() AS in_recovery,
       (SELECT wait_event FROM pg_stat_activity WHERE backend_type = 'startup') AS startup_wait,
       CASE WHEN pg_is_in_recovery() THEN NULL
            ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
       END AS timeline";
pub const RELOAD: &str = "SELECT pg_reload_conf()";
/// Parameters whose value in the configuration file differs from the
/// running one and only a restart applies (as seen by this session, which
/// takes in a reload when idle).
pub const PENDING_RESTART: &str =
    "SELECT name FROM pg_settings WHERE pending_restart ORDER BY name";
pub const CHECKPOINT: &str = "CHECKPOINT";

/// The archiver's counters (`[backup]`): a query of its own, so that the
/// observation above keeps its columns. Ages in milliseconds, measured by
/// the server so that no clock comparison is needed.
pub const ARCHIVER: &str = "
SELECT current_setting('archive_mode') AS mode,
       archived_count, failed_count, last_archived_wal, last_failed_wal,
       (extract(epoch FROM now() - last_archived_time) * 1000)::bigint AS last_archived_age_ms,
       (extract(epoch FROM now() - last_failed_time) * 1000)::bigint AS last_failed_age_ms
  FROM pg_stat_archiver";
