//! An in-memory [`Dcs`] for unit tests of the agent and executor.
//!
//! It follows the etcd backend's contract (one leader at a time, the
//! initialize race has one winner, writes conditioned on a revision are
//! refused when the key changed) but has no clock: tests expire the
//! leader lease explicitly with [`MemoryStore::expire_leader`]. Integration
//! tests never use it; they run a real etcd.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{
    ClusterConfig, ClusterView, Dcs, DcsError, FailoverRequest, Initialize, LeaderKey,
    LeaseRenewal, Revision,
};
use super::{FailsafeRecord, SyncRecord};
use crate::model::{HistoryEntry, MemberName, MemberRecord};

/// The shared "etcd": several [`MemoryDcs`] handles (one per simulated
/// member) point at one store.
#[derive(Clone, Default)]
pub struct MemoryStore {
    inner: Arc<Mutex<StoreState>>,
}

#[derive(Default)]
struct StoreState {
    view: ClusterView,
    next_lease: i64,
    reachable: bool,
}

impl MemoryStore {
    pub fn new() -> Self {
        let s = MemoryStore::default();
        s.inner.lock().unwrap().reachable = true;
        s
    }
    pub fn handle(&self, me: impl Into<MemberName>) -> MemoryDcs {
        MemoryDcs {
            store: self.clone(),
            me: me.into(),
            lease: Mutex::new(None),
        }
    }
    /// Simulates the leader lease running out.
    pub fn expire_leader(&self) {
        self.inner.lock().unwrap().view.leader = None;
    }
    /// Simulates a network partition between every handle and the store.
    pub fn set_reachable(&self, reachable: bool) {
        self.inner.lock().unwrap().reachable = reachable;
    }
    pub fn view(&self) -> ClusterView {
        self.inner.lock().unwrap().view.clone()
    }
}

impl StoreState {
    /// Like etcd's store revision: every write gets the next one.
    fn next_revision(&mut self) -> Revision {
        self.view.revision += 1;
        Revision(self.view.revision)
    }

    fn check(key: &str, current: Revision, expected: Revision) -> Result<(), DcsError> {
        if current == expected {
            Ok(())
        } else {
            Err(DcsError::Conflict {
                key: key.to_string(),
                expected,
                actual: current,
            })
        }
    }
}

pub struct MemoryDcs {
    store: MemoryStore,
    me: MemberName,
    lease: Mutex<Option<i64>>,
}

const FAR_FUTURE_MS: u64 = u64::MAX / 2;

impl MemoryDcs {
    fn with<T>(
        &self,
        action: &'static str,
        f: impl FnOnce(&mut StoreState) -> T,
    ) -> Result<T, DcsError> {
        let mut state = self.store.inner.lock().unwrap();
        if !state.reachable {
            return Err(DcsError::Unavailable {
                action,
                source: "memory store partitioned".into(),
            });
        }
        Ok(f(&mut state))
    }
    fn holds(&self, state: &StoreState) -> bool {
        let lease = *self.lease.lock().unwrap();
        matches!((&state.view.leader, lease), (Some(l), Some(id)) if l.lease_id == id && l.name == self.me)
    }
}

#[async_trait::async_trait]
impl Dcs for MemoryDcs {
    async fn read_cluster(&self) -> Result<ClusterView, DcsError> {
        self.with("read the cluster state", |s| s.view.clone())
    }
    async fn claim_initialize(&self) -> Result<bool, DcsError> {
        self.with("claim cluster initialization", |s| {
            if s.view.initialize.is_some() {
                return false;
            }
            s.view.initialize = Some(Initialize::Pending {
                by: self.me.clone(),
            });
            true
        })
    }
    async fn complete_initialize(&self, system_id: &str) -> Result<(), DcsError> {
        self.with("record the system identifier", |s| {
            s.view.initialize = Some(Initialize::Done {
                system_id: system_id.to_string(),
            })
        })
    }
    async fn abandon_initialize(&self) -> Result<(), DcsError> {
        self.with("abandon cluster initialization", |s| {
            if s.view.initialize
                == Some(Initialize::Pending {
                    by: self.me.clone(),
                })
            {
                s.view.initialize = None;
            }
        })
    }
    async fn acquire_leader(&self) -> Result<Option<LeaseRenewal>, DcsError> {
        let won = self.with("take the leader key", |s| {
            if s.view.leader.is_some() {
                return None;
            }
            s.next_lease += 1;
            s.view.leader = Some(LeaderKey {
                name: self.me.clone(),
                lease_id: s.next_lease,
            });
            Some(s.next_lease)
        })?;
        *self.lease.lock().unwrap() = won;
        Ok(won.map(|lease_id| LeaseRenewal {
            lease_id,
            valid_until_ms: FAR_FUTURE_MS,
        }))
    }
    async fn adopt_leader(&self, lease_id: i64) -> Result<Option<LeaseRenewal>, DcsError> {
        let ok = self.with(
            "adopt the leader lease",
            |s| matches!(&s.view.leader, Some(l) if l.lease_id == lease_id && l.name == self.me),
        )?;
        if ok {
            *self.lease.lock().unwrap() = Some(lease_id);
        }
        Ok(ok.then_some(LeaseRenewal {
            lease_id,
            valid_until_ms: FAR_FUTURE_MS,
        }))
    }
    async fn renew_leader(&self) -> Result<Option<LeaseRenewal>, DcsError> {
        let ok = self.with("renew the leader lease", |s| self.holds(s))?;
        let lease_id = self.lease.lock().unwrap().unwrap_or_default();
        Ok(ok.then_some(LeaseRenewal {
            lease_id,
            valid_until_ms: FAR_FUTURE_MS,
        }))
    }
    async fn release_leader(&self) -> Result<(), DcsError> {
        self.with("delete the leader key", |s| {
            if self.holds(s) {
                s.view.leader = None;
            }
        })?;
        *self.lease.lock().unwrap() = None;
        Ok(())
    }
    async fn put_member(&self, record: &MemberRecord) -> Result<(), DcsError> {
        self.with("publish the member record", |s| {
            s.view.members.insert(self.me.clone(), record.clone());
        })
    }
    async fn delete_member(&self) -> Result<(), DcsError> {
        self.with("delete the member record", |s| {
            s.view.members.remove(&self.me);
        })
    }
    async fn append_history(&self, entry: &HistoryEntry) -> Result<(), DcsError> {
        self.with("append to the history", |s| {
            if !self.holds(s) {
                return Err(DcsError::NotLeader);
            }
            s.view.history.push(entry.clone());
            Ok(())
        })?
    }
    async fn put_sync(&self, record: &SyncRecord) -> Result<(), DcsError> {
        self.with("write the synchronous set", |s| {
            if !self.holds(s) {
                return Err(DcsError::NotLeader);
            }
            s.view.sync = Some(record.clone());
            Ok(())
        })?
    }
    async fn put_failsafe(&self, record: &FailsafeRecord) -> Result<(), DcsError> {
        self.with("write the failsafe membership", |s| {
            if !self.holds(s) {
                return Err(DcsError::NotLeader);
            }
            s.view.failsafe = Some(record.clone());
            Ok(())
        })?
    }
    async fn put_config(
        &self,
        config: &ClusterConfig,
        expected: Revision,
    ) -> Result<Revision, DcsError> {
        self.with("write the cluster config", |s| {
            StoreState::check("config", s.view.config_revision, expected)?;
            s.view.config = config.clone();
            s.view.config_revision = s.next_revision();
            Ok(s.view.config_revision)
        })?
    }
    async fn put_failover(
        &self,
        request: &FailoverRequest,
        expected: Revision,
    ) -> Result<Revision, DcsError> {
        self.with("write the failover request", |s| {
            StoreState::check("failover", s.view.failover_revision, expected)?;
            s.view.failover = Some(request.clone());
            s.view.failover_revision = s.next_revision();
            Ok(s.view.failover_revision)
        })?
    }
    async fn clear_failover(&self, expected: Revision) -> Result<(), DcsError> {
        self.with("clear the failover request", |s| {
            StoreState::check("failover", s.view.failover_revision, expected)?;
            s.view.failover = None;
            s.view.failover_revision = Revision::ABSENT;
            s.next_revision();
            Ok(())
        })?
    }
    async fn wait_for_change(&self, timeout: Duration) {
        tokio::time::sleep(timeout.min(Duration::from_millis(10))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_leader_at_a_time() {
        let store = MemoryStore::new();
        let (a, b) = (store.handle("a"), store.handle("b"));
        assert!(a.acquire_leader().await.unwrap().is_some());
        assert!(b.acquire_leader().await.unwrap().is_none());
        assert!(a.renew_leader().await.unwrap().is_some());
        store.expire_leader();
        assert!(a.renew_leader().await.unwrap().is_none());
        assert!(b.acquire_leader().await.unwrap().is_some());
        assert!(
            a.append_history(&sample_history()).await.is_err(),
            "only the leader writes history"
        );
    }

    #[tokio::test]
    async fn conditional_writes_refuse_stale_revisions() {
        let store = MemoryStore::new();
        let (a, b) = (store.handle("a"), store.handle("b"));
        let read = a.read_cluster().await.unwrap();
        let paused = ClusterConfig {
            paused: true,
            ..Default::default()
        };
        let rev = b.put_config(&paused, read.config_revision).await.unwrap();
        let stale = a
            .put_config(&ClusterConfig::default(), read.config_revision)
            .await;
        assert!(matches!(stale, Err(DcsError::Conflict { actual, .. }) if actual == rev));
        assert!(store.view().config.paused);

        let request = FailoverRequest {
            from: None,
            to: Some("b".into()),
            not_before_unix_ms: None,
            accept_data_loss: false,
            requested_at_unix_ms: 1,
        };
        let first = a.put_failover(&request, Revision::ABSENT).await.unwrap();
        assert!(matches!(
            b.put_failover(&request, Revision::ABSENT).await,
            Err(DcsError::Conflict { .. })
        ));
        let second = b.put_failover(&request, first).await.unwrap();
        assert!(matches!(
            a.clear_failover(first).await,
            Err(DcsError::Conflict { .. })
        ));
        a.clear_failover(second).await.unwrap();
        assert_eq!(store.view().failover, None);
    }

    /// Another writer changes the config between `update_config`'s read
    /// and its write: the edit is applied again to the fresh value, and
    /// both changes land.
    #[tokio::test]
    async fn update_config_retries_from_a_fresh_read() {
        let store = MemoryStore::new();
        let a = store.handle("a");
        let mut calls = 0;
        let update = crate::dcs::update_config(&a, |c| {
            calls += 1;
            if calls == 1 {
                let mut s = store.inner.lock().unwrap();
                s.view.config.synchronous_quorum = true;
                s.view.config_revision = s.next_revision();
            }
            Ok(ClusterConfig {
                paused: true,
                ..c.clone()
            })
        })
        .await
        .unwrap();
        assert_eq!((calls, update.attempts), (2, 2));
        let config = store.view().config;
        assert!(config.paused && config.synchronous_quorum, "{config:?}");
        assert_eq!(update.revision, store.view().config_revision);

        // Invalid edits write nothing; no-op edits neither.
        let before = store.view().revision;
        let e = crate::dcs::update_config(&a, |_| Err("no".into())).await;
        assert!(matches!(e, Err(crate::dcs::UpdateConfigError::Invalid(m)) if m == "no"));
        let same = crate::dcs::update_config(&a, |c| Ok(c.clone()))
            .await
            .unwrap();
        assert!(!same.changed());
        assert_eq!(store.view().revision, before);
    }

    /// A writer that always loses gives up after a bounded number of
    /// attempts, with the conflict as the error.
    #[tokio::test]
    async fn update_config_gives_up_when_it_always_loses() {
        let store = MemoryStore::new();
        let a = store.handle("a");
        let mut calls = 0;
        let result = crate::dcs::update_config(&a, |c| {
            calls += 1;
            let mut s = store.inner.lock().unwrap();
            s.view.config.synchronous_node_count += 1;
            s.view.config_revision = s.next_revision();
            Ok(ClusterConfig {
                paused: true,
                ..c.clone()
            })
        })
        .await;
        assert!(matches!(
            result,
            Err(crate::dcs::UpdateConfigError::Dcs(
                DcsError::Conflict { .. }
            ))
        ));
        assert_eq!(calls, crate::dcs::CONFIG_WRITE_ATTEMPTS);
        assert!(!store.view().config.paused);
    }

    #[tokio::test]
    async fn initialize_race_has_one_winner() {
        let store = MemoryStore::new();
        assert!(store.handle("a").claim_initialize().await.unwrap());
        assert!(!store.handle("b").claim_initialize().await.unwrap());
    }

    fn sample_history() -> HistoryEntry {
        HistoryEntry {
            old_timeline: crate::model::Timeline(1),
            new_timeline: crate::model::Timeline(2),
            switch_lsn: crate::model::Lsn(0),
            at_unix_ms: 0,
            reason: "test".into(),
            old_leader: None,
            new_leader: "a".into(),
        }
    }
}
