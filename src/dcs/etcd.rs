//! The etcd v3 backend.
//!
//! - The leader key is created in a transaction conditioned on
//!   `create_revision == 0` and bound to a lease with the configured TTL;
//!   if the leader stops renewing, etcd deletes the key when the TTL runs out.
//! - Writes only the leader may make (`history`) are conditioned on the
//!   leader key still being bound to our lease, as etcd's own election
//!   recipe does.
//! - Keys operators edit (`config`, `failover`) are written in
//!   transactions conditioned on the `mod_revision` their caller read
//!   (0: the key must not exist), so concurrent edits never silently
//!   overwrite each other.
//! - Every request carries `require_leader`, so a partitioned etcd member
//!   answers "no leader" instead of serving stale data or renewing leases.
//! - A background watch wakes the agent when the leader, config or
//!   failover keys change.

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::{Mutex, Notify};

use super::keys::{KeyKind, Keys};
use super::{
    ClusterConfig, ClusterView, Dcs, DcsError, FailoverRequest, Initialize, LeaderKey,
    LeaseRenewal, Revision,
};
use super::{FailsafeRecord, SyncRecord};
use crate::config::{EtcdConfig, EtcdTls};
use crate::model::{HistoryEntry, MemberName, MemberRecord};
use crate::util::boottime_ms;

pub struct EtcdDcs {
    client: Client,
    keys: Keys,
    me: MemberName,
    ttl: Duration,
    timeout: Duration,
    leader_lease: Mutex<Option<i64>>,
    member_lease: Mutex<Option<i64>>,
    changed: Arc<Notify>,
    watch_task: Option<tokio::task::JoinHandle<()>>,
}

impl Drop for EtcdDcs {
    fn drop(&mut self) {
        if let Some(t) = &self.watch_task {
            t.abort();
        }
    }
}

fn unavailable(action: &'static str) -> impl FnOnce(etcd_client::Error) -> DcsError {
    move |e| DcsError::Unavailable {
        action,
        source: match e {
            etcd_client::Error::GRpcStatus(status) => {
                let mut message = if status.message().is_empty() {
                    status.code().to_string()
                } else {
                    status.message().to_string()
                };
                // The transport's causes, where they add something (the
                // status message often repeats the innermost one).
                let mut cause = std::error::Error::source(&status);
                while let Some(c) = cause {
                    let text = c.to_string();
                    if !message.contains(&text) {
                        message = format!("{message}: {text}");
                    }
                    cause = c.source();
                }
                Box::new(GrpcFailure { message })
            }
            other => Box::new(other),
        },
    }
}

/// A failed gRPC call, as the operator needs to read it: the status
/// message ("invalid peer certificate: UnknownIssuer", "etcdserver: user
/// name is empty") and the transport's causes. etcd-client's own rendering
/// appends tonic's debug dump of the transport error instead.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
struct GrpcFailure {
    message: String,
}

impl EtcdDcs {
    /// Without credentials the connection is lazy: this succeeds even when
    /// etcd is down, and every call then fails within `timeout`, which is
    /// what the agent needs to keep looping (and logging) instead of
    /// hanging at start. With credentials it must authenticate first.
    /// With `etcd.tls` the TLS files are read here (the configuration
    /// check already parsed them).
    pub async fn connect(
        etcd: &EtcdConfig,
        keys: Keys,
        me: MemberName,
        ttl: Duration,
        timeout: Duration,
        watch: bool,
    ) -> Result<Self, DcsError> {
        let endpoints = &etcd.endpoints;
        let mut options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout)
            .with_keep_alive(Duration::from_secs(1), timeout)
            .with_require_leader(true);
        if let Some((user, password)) = &etcd.credentials {
            options = options.with_user(user.clone(), password.expose().to_string());
        }
        if let Some(tls) = &etcd.tls {
            options = options.with_tls(tls_options(tls)?);
        }
        let client = tokio::time::timeout(timeout, Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| DcsError::Timeout {
                action: "connect",
                timeout,
            })?
            .map_err(unavailable("connect"))?;
        let changed = Arc::new(Notify::new());
        let watch_task =
            watch.then(|| tokio::spawn(watch_loop(client.clone(), keys.clone(), changed.clone())));
        Ok(EtcdDcs {
            client,
            keys,
            me,
            ttl,
            timeout,
            leader_lease: Mutex::new(None),
            member_lease: Mutex::new(None),
            changed,
            watch_task,
        })
    }

    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// The underlying client, for the proxy's own watch.
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    async fn timed<T, F>(&self, action: &'static str, fut: F) -> Result<T, DcsError>
    where
        F: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r.map_err(unavailable(action)),
            Err(_) => Err(DcsError::Timeout {
                action,
                timeout: self.timeout,
            }),
        }
    }

    /// Runs a transaction whose conditions include "the leader key is bound
    /// to our lease"; a failed condition means this member no longer leads.
    async fn leader_txn(&self, action: &'static str, txn: Txn) -> Result<(), DcsError> {
        let mut client = self.client.clone();
        let resp = self
            .timed(action, async move { client.txn(txn).await })
            .await?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(DcsError::NotLeader)
        }
    }

    /// Runs `op` on `key` only if the key's `mod_revision` is still
    /// `expected` (etcd compares a missing key as revision 0, so ABSENT
    /// means "create only"). On a conflict the same round trip reads the
    /// key's current revision for the error message.
    async fn write_if_unchanged(
        &self,
        action: &'static str,
        key: String,
        op: TxnOp,
        expected: Revision,
    ) -> Result<Revision, DcsError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                expected.0,
            )])
            .and_then([op])
            .or_else([TxnOp::get(key.clone(), None)]);
        let mut client = self.client.clone();
        let resp = self
            .timed(action, async move { client.txn(txn).await })
            .await?;
        if resp.succeeded() {
            return Ok(Revision(resp.header().map_or(0, |h| h.revision())));
        }
        let actual = resp
            .op_responses()
            .into_iter()
            .find_map(|r| match r {
                TxnOpResponse::Get(g) => Some(g.kvs().first().map_or(0, |kv| kv.mod_revision())),
                _ => None,
            })
            .unwrap_or(0);
        Err(DcsError::Conflict {
            key,
            expected,
            actual: Revision(actual),
        })
    }

    fn ttl_secs(&self) -> i64 {
        self.ttl.as_secs() as i64
    }

    /// One keepalive round trip. Returns the TTL the lease now has, 0 when
    /// etcd says the lease no longer exists (expired or revoked).
    async fn keep_alive_once(&self, action: &'static str, lease_id: i64) -> Result<i64, DcsError> {
        let mut client = self.client.clone();
        let ttl = self.ttl_secs();
        self.timed(action, async move {
            // etcd-client sends the first keepalive itself and waits for its
            // answer; a TTL of 0 comes back as this specific error (the same
            // variant also reports channel failures, hence the message match).
            match client.lease_keep_alive(lease_id).await {
                Ok(_) => Ok(ttl),
                Err(etcd_client::Error::LeaseKeepAliveError(m)) if m == "lease not found" => Ok(0),
                Err(e) => Err(e),
            }
        })
        .await
    }

    fn renewal(&self, lease_id: i64, sent_at_ms: u64, granted_ttl: i64) -> LeaseRenewal {
        // Deadline counts from when the request was sent: etcd received
        // it later, so the lease lives at least this long.
        let ttl_ms = (granted_ttl.min(self.ttl_secs()).max(0) as u64) * 1000;
        LeaseRenewal {
            lease_id,
            valid_until_ms: sent_at_ms + ttl_ms,
        }
    }
}

/// The etcd client's TLS settings: the configured CA (or the system's
/// roots) and the client certificate, if any.
fn tls_options(tls: &EtcdTls) -> Result<TlsOptions, DcsError> {
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| DcsError::TlsFile {
            path: path.to_path_buf(),
            source,
        })
    };
    let mut options = TlsOptions::new();
    options = match &tls.ca_file {
        Some(ca) => options.ca_certificate(Certificate::from_pem(read(ca)?)),
        None => options.with_native_roots(),
    };
    if let Some(client) = &tls.client {
        options = options.identity(Identity::from_pem(
            read(&client.cert_file)?,
            read(&client.key_file)?,
        ));
    }
    Ok(options)
}

async fn watch_loop(mut client: Client, keys: Keys, changed: Arc<Notify>) {
    loop {
        let opts = WatchOptions::new().with_prefix();
        if let Ok(mut stream) = client.watch(keys.prefix(), Some(opts)).await {
            // Something may have changed while we were not watching.
            changed.notify_one();
            while let Ok(Some(resp)) = stream.message().await {
                let relevant = resp.events().iter().any(|ev| {
                    let key = ev.kv().and_then(|kv| kv.key_str().ok()).unwrap_or("");
                    // Member records change every loop; waking on them would
                    // turn the loop into a busy loop.
                    !matches!(keys.classify(key), KeyKind::Member(_) | KeyKind::Proxy(_))
                        || ev.event_type() == EventType::Delete
                });
                if relevant {
                    changed.notify_one();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn decode_json<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, DcsError> {
    serde_json::from_slice(value).map_err(|e| DcsError::Malformed {
        key: key.to_string(),
        message: e.to_string(),
    })
}

/// One key-value of a range read, as [`decode_view`] needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RawKv {
    pub key: String,
    pub value: Vec<u8>,
    pub lease: i64,
    pub mod_revision: i64,
}

/// Builds a [`ClusterView`] from the raw key-values of one range read.
pub fn decode_view(keys: &Keys, revision: i64, kvs: &[RawKv]) -> Result<ClusterView, DcsError> {
    let mut view = ClusterView {
        revision,
        ..Default::default()
    };
    for RawKv {
        key,
        value,
        lease,
        mod_revision,
    } in kvs
    {
        match keys.classify(key) {
            KeyKind::Initialize => {
                let text = String::from_utf8_lossy(value).to_string();
                view.initialize = Some(match text.strip_prefix("pending:") {
                    Some(by) => Initialize::Pending {
                        by: MemberName::new(by),
                    },
                    None => Initialize::Done { system_id: text },
                });
            }
            KeyKind::Leader => {
                let name = String::from_utf8_lossy(value).to_string();
                view.leader = Some(LeaderKey {
                    name: MemberName::new(name),
                    lease_id: *lease,
                });
            }
            KeyKind::Member(name) => match decode_json::<MemberRecord>(key, value) {
                Ok(rec) => {
                    view.members.insert(name, rec);
                }
                // One unreadable record (say, from a newer pgha) must not
                // blind the whole cluster: skip it, loudly.
                Err(e) => tracing::warn!(error = %crate::util::chain(&e), "ignoring member record"),
            },
            KeyKind::Config => {
                view.config = decode_json::<ClusterConfig>(key, value)?;
                view.config_revision = Revision(*mod_revision);
            }
            KeyKind::History => view.history = decode_json(key, value)?,
            KeyKind::Failover => {
                // Kept even when the request is unreadable, so that it can
                // be replaced or cleared on purpose.
                view.failover_revision = Revision(*mod_revision);
                match decode_json::<FailoverRequest>(key, value) {
                    Ok(f) => view.failover = Some(f),
                    Err(e) => {
                        tracing::warn!(error = %crate::util::chain(&e), "ignoring failover request")
                    }
                }
            }
            KeyKind::Sync => view.sync = Some(decode_json(key, value)?),
            KeyKind::Failsafe => view.failsafe = Some(decode_json(key, value)?),
            KeyKind::Proxy(name) => match decode_json::<super::ProxyRecord>(key, value) {
                Ok(rec) => {
                    view.proxies.insert(name, rec);
                }
                Err(e) => tracing::warn!(error = %crate::util::chain(&e), "ignoring proxy record"),
            },
            KeyKind::Unknown => {}
        }
    }
    Ok(view)
}

#[async_trait::async_trait]
impl Dcs for EtcdDcs {
    async fn read_cluster(&self) -> Result<ClusterView, DcsError> {
        let mut client = self.client.clone();
        let resp = self
            .timed("read the cluster state", async move {
                client
                    .get(self.keys.prefix(), Some(GetOptions::new().with_prefix()))
                    .await
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let kvs: Vec<RawKv> = resp
            .kvs()
            .iter()
            .map(|kv| RawKv {
                key: String::from_utf8_lossy(kv.key()).to_string(),
                value: kv.value().to_vec(),
                lease: kv.lease(),
                mod_revision: kv.mod_revision(),
            })
            .collect();
        decode_view(&self.keys, revision, &kvs)
    }

    async fn claim_initialize(&self) -> Result<bool, DcsError> {
        let key = self.keys.initialize();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, format!("pending:{}", self.me), None)]);
        let mut client = self.client.clone();
        let resp = self
            .timed("claim cluster initialization", async move {
                client.txn(txn).await
            })
            .await?;
        Ok(resp.succeeded())
    }

    async fn complete_initialize(&self, system_id: &str) -> Result<(), DcsError> {
        let key = self.keys.initialize();
        let txn = Txn::new()
            .when([Compare::value(
                key.clone(),
                CompareOp::Equal,
                format!("pending:{}", self.me),
            )])
            .and_then([TxnOp::put(key, system_id, None)]);
        let mut client = self.client.clone();
        let resp = self
            .timed("record the system identifier", async move {
                client.txn(txn).await
            })
            .await?;
        if resp.succeeded() {
            Ok(())
        } else {
            Err(DcsError::NotLeader)
        }
    }

    async fn abandon_initialize(&self) -> Result<(), DcsError> {
        let key = self.keys.initialize();
        let txn = Txn::new()
            .when([Compare::value(
                key.clone(),
                CompareOp::Equal,
                format!("pending:{}", self.me),
            )])
            .and_then([TxnOp::delete(key, None)]);
        let mut client = self.client.clone();
        self.timed("abandon cluster initialization", async move {
            client.txn(txn).await
        })
        .await?;
        Ok(())
    }

    async fn acquire_leader(&self) -> Result<Option<LeaseRenewal>, DcsError> {
        let sent_at = boottime_ms();
        let mut client = self.client.clone();
        let ttl = self.ttl_secs();
        let grant = self
            .timed("grant a leader lease", async move {
                client.lease_grant(ttl, None).await
            })
            .await?;
        let lease_id = grant.id();
        let key = self.keys.leader();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key,
                self.me.as_str(),
                Some(PutOptions::new().with_lease(lease_id)),
            )]);
        let mut client = self.client.clone();
        let won = self
            .timed("take the leader key", async move { client.txn(txn).await })
            .await
            .map(|r| r.succeeded());
        match won {
            Ok(true) => {
                *self.leader_lease.lock().await = Some(lease_id);
                Ok(Some(self.renewal(lease_id, sent_at, grant.ttl())))
            }
            other => {
                // Lost the race (or do not know): the lease is useless, and
                // it must not linger holding nothing.
                let mut client = self.client.clone();
                let _ = self
                    .timed("revoke an unused lease", async move {
                        client.lease_revoke(lease_id).await
                    })
                    .await;
                other.map(|_| None)
            }
        }
    }

    async fn adopt_leader(&self, lease_id: i64) -> Result<Option<LeaseRenewal>, DcsError> {
        let sent_at = boottime_ms();
        let ttl = self
            .keep_alive_once("renew the adopted leader lease", lease_id)
            .await?;
        if ttl <= 0 {
            return Ok(None);
        }
        *self.leader_lease.lock().await = Some(lease_id);
        Ok(Some(self.renewal(lease_id, sent_at, ttl)))
    }

    async fn renew_leader(&self) -> Result<Option<LeaseRenewal>, DcsError> {
        let Some(lease_id) = *self.leader_lease.lock().await else {
            return Ok(None);
        };
        let sent_at = boottime_ms();
        let ttl = self
            .keep_alive_once("renew the leader lease", lease_id)
            .await?;
        if ttl <= 0 {
            *self.leader_lease.lock().await = None;
            return Ok(None);
        }
        Ok(Some(self.renewal(lease_id, sent_at, ttl)))
    }

    async fn release_leader(&self) -> Result<(), DcsError> {
        let Some(lease_id) = self.leader_lease.lock().await.take() else {
            return Ok(());
        };
        let key = self.keys.leader();
        let txn = Txn::new()
            .when([Compare::lease(key.clone(), CompareOp::Equal, lease_id)])
            .and_then([TxnOp::delete(key, None)]);
        let mut client = self.client.clone();
        self.timed(
            "delete the leader key",
            async move { client.txn(txn).await },
        )
        .await?;
        let mut client = self.client.clone();
        self.timed("revoke the leader lease", async move {
            client.lease_revoke(lease_id).await
        })
        .await?;
        Ok(())
    }

    async fn put_member(&self, record: &MemberRecord) -> Result<(), DcsError> {
        let mut lease = self.member_lease.lock().await;
        let alive = match *lease {
            Some(id) => self.keep_alive_once("renew the member lease", id).await? > 0,
            None => false,
        };
        if !alive {
            let mut client = self.client.clone();
            let ttl = self.ttl_secs();
            let grant = self
                .timed("grant a member lease", async move {
                    client.lease_grant(ttl, None).await
                })
                .await?;
            *lease = Some(grant.id());
        }
        let lease_id = lease.expect("set above");
        let value = serde_json::to_vec(record).expect("member records always serialize");
        let key = self.keys.member(&self.me);
        let mut client = self.client.clone();
        self.timed("publish the member record", async move {
            client
                .put(key, value, Some(PutOptions::new().with_lease(lease_id)))
                .await
        })
        .await?;
        Ok(())
    }

    async fn delete_member(&self) -> Result<(), DcsError> {
        let key = self.keys.member(&self.me);
        let mut client = self.client.clone();
        self.timed("delete the member record", async move {
            client.delete(key, None).await
        })
        .await?;
        if let Some(id) = self.member_lease.lock().await.take() {
            let mut client = self.client.clone();
            let _ = self
                .timed("revoke the member lease", async move {
                    client.lease_revoke(id).await
                })
                .await;
        }
        Ok(())
    }

    async fn append_history(&self, entry: &HistoryEntry) -> Result<(), DcsError> {
        let Some(lease_id) = *self.leader_lease.lock().await else {
            return Err(DcsError::NotLeader);
        };
        let key = self.keys.history();
        let mut client = self.client.clone();
        let current = self
            .timed(
                "read the history",
                async move { client.get(key, None).await },
            )
            .await?;
        let (mut history, mod_rev): (Vec<HistoryEntry>, i64) = match current.kvs().first() {
            Some(kv) => (
                decode_json(&self.keys.history(), kv.value())?,
                kv.mod_revision(),
            ),
            None => (Vec::new(), 0),
        };
        history.push(entry.clone());
        let value = serde_json::to_vec(&history).expect("history serializes");
        let key = self.keys.history();
        let txn = Txn::new()
            .when([
                Compare::lease(self.keys.leader(), CompareOp::Equal, lease_id),
                Compare::mod_revision(key.clone(), CompareOp::Equal, mod_rev),
            ])
            .and_then([TxnOp::put(key, value, None)]);
        self.leader_txn("append to the history", txn).await
    }

    async fn put_sync(&self, record: &SyncRecord) -> Result<(), DcsError> {
        let Some(lease_id) = *self.leader_lease.lock().await else {
            return Err(DcsError::NotLeader);
        };
        let value = serde_json::to_vec(record).expect("sync record serializes");
        let key = self.keys.sync();
        let txn = Txn::new()
            .when([Compare::lease(
                self.keys.leader(),
                CompareOp::Equal,
                lease_id,
            )])
            .and_then([TxnOp::put(key, value, None)]);
        self.leader_txn("write the synchronous set", txn).await
    }

    async fn put_failsafe(&self, record: &FailsafeRecord) -> Result<(), DcsError> {
        let Some(lease_id) = *self.leader_lease.lock().await else {
            return Err(DcsError::NotLeader);
        };
        let value = serde_json::to_vec(record).expect("failsafe record serializes");
        let txn = Txn::new()
            .when([Compare::lease(
                self.keys.leader(),
                CompareOp::Equal,
                lease_id,
            )])
            .and_then([TxnOp::put(self.keys.failsafe(), value, None)]);
        self.leader_txn("write the failsafe membership", txn).await
    }

    async fn put_config(
        &self,
        config: &ClusterConfig,
        expected: Revision,
    ) -> Result<Revision, DcsError> {
        let value = serde_json::to_vec(config).expect("config serializes");
        let key = self.keys.config();
        let op = TxnOp::put(key.clone(), value, None);
        self.write_if_unchanged("write the cluster config", key, op, expected)
            .await
    }

    async fn put_failover(
        &self,
        request: &FailoverRequest,
        expected: Revision,
    ) -> Result<Revision, DcsError> {
        let value = serde_json::to_vec(request).expect("failover request serializes");
        let key = self.keys.failover();
        let op = TxnOp::put(key.clone(), value, None);
        self.write_if_unchanged("write the failover request", key, op, expected)
            .await
    }

    async fn clear_failover(&self, expected: Revision) -> Result<(), DcsError> {
        let key = self.keys.failover();
        let op = TxnOp::delete(key.clone(), None);
        self.write_if_unchanged("clear the failover request", key, op, expected)
            .await?;
        Ok(())
    }

    async fn wait_for_change(&self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.changed.notified()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_full_view() {
        let keys = Keys::new("pgha", "c");
        let rec = r#"{"name":"n1","api_url":"http://a","host":"h","port":1,"role":"primary","state":"running"}"#;
        let kv = |key: String, value: &[u8], lease: i64, mod_revision: i64| RawKv {
            key,
            value: value.to_vec(),
            lease,
            mod_revision,
        };
        let kvs = vec![
            kv(keys.initialize(), b"7312345678901234567", 0, 2),
            kv(keys.leader(), b"n1", 42, 3),
            kv(keys.member(&"n1".into()), rec.as_bytes(), 7, 4),
            kv(keys.member(&"bad".into()), b"{not json", 7, 5),
            kv(keys.config(), br#"{"paused":true}"#, 0, 6),
            kv(
                keys.failover(),
                br#"{"to":"n2","requested_at_unix_ms":5}"#,
                0,
                8,
            ),
        ];
        let view = decode_view(&keys, 9, &kvs).unwrap();
        assert_eq!(
            view.initialize,
            Some(Initialize::Done {
                system_id: "7312345678901234567".into()
            })
        );
        assert_eq!(
            view.leader,
            Some(LeaderKey {
                name: "n1".into(),
                lease_id: 42
            })
        );
        assert_eq!(view.members.len(), 1, "the malformed record is skipped");
        assert!(view.config.paused);
        assert_eq!(view.config_revision, Revision(6));
        assert_eq!(view.failover.unwrap().to, Some("n2".into()));
        assert_eq!(view.failover_revision, Revision(8));
        assert_eq!(view.revision, 9);
    }

    #[test]
    fn pending_initialize_names_the_claimant() {
        let keys = Keys::new("pgha", "c");
        let raw = RawKv {
            key: keys.initialize(),
            value: b"pending:n3".to_vec(),
            lease: 0,
            mod_revision: 1,
        };
        let view = decode_view(&keys, 1, &[raw]).unwrap();
        assert_eq!(view.config_revision, Revision::ABSENT);
        assert_eq!(view.failover_revision, Revision::ABSENT);
        assert_eq!(
            view.initialize,
            Some(Initialize::Pending { by: "n3".into() })
        );
    }
}
