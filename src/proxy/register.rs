//! The proxy's record in the DCS (`proxies/<name>`), bound to its own
//! lease, so `pgha list` shows live proxies and a switchover can see which
//! of them have drained. The state is derived by a pure function.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{Client, PutOptions};

use super::Shared;
use super::route::{Routes, Rw};
use crate::dcs::keys::Keys;
use crate::dcs::{ProxyRecord, ProxyState};
use crate::model::MemberName;

/// The state to publish: `drained` once no server connection is in use on
/// the leader a due switchover moves away from.
pub fn state_of(
    routes: &Routes,
    in_use_on: impl Fn(&MemberName) -> usize,
) -> (ProxyState, Option<i64>) {
    match &routes.rw {
        Rw::Serve(_) => (ProxyState::Serving, None),
        Rw::Hold(_) => (ProxyState::Holding, None),
        Rw::Drain { from, revision } if in_use_on(&from.member) == 0 => {
            (ProxyState::Drained, Some(revision.0))
        }
        Rw::Drain { .. } => (ProxyState::Draining, None),
    }
}

/// Keeps the record current until the task is aborted.
pub async fn run(
    client: Client,
    keys: Keys,
    base: ProxyRecord,
    ttl: Duration,
    shared: Arc<Shared>,
) {
    loop {
        if let Err(e) = publish(client.clone(), &keys, &base, ttl, &shared).await {
            tracing::warn!(error = %e, "cannot publish the proxy's record; retrying");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

async fn publish(
    mut client: Client,
    keys: &Keys,
    base: &ProxyRecord,
    ttl: Duration,
    shared: &Shared,
) -> Result<(), etcd_client::Error> {
    let key = keys.proxy(&base.name);
    let lease = client
        .lease_grant(ttl.as_secs().max(2) as i64, None)
        .await?
        .id();
    let (mut keeper, mut answers) = client.lease_keep_alive(lease).await?;
    let mut routes = shared.routes.clone();
    let mut published: Option<ProxyRecord> = None;
    let mut tick = tokio::time::interval(ttl / 3);
    let mut check = tokio::time::interval(Duration::from_millis(50));
    loop {
        let (state, drained_for) = state_of(&routes.borrow_and_update(), |m| shared.pools.load(m));
        let record = ProxyRecord {
            state,
            drained_for,
            ..base.clone()
        };
        if published.as_ref() != Some(&record) {
            if record.state == ProxyState::Drained {
                shared.stats.drains_total.fetch_add(1, Ordering::Relaxed);
                tracing::info!(revision = ?record.drained_for, "drained for the switchover");
            }
            let value = serde_json::to_vec(&record).expect("a record serializes");
            client
                .put(
                    key.clone(),
                    value,
                    Some(PutOptions::new().with_lease(lease)),
                )
                .await?;
            published = Some(record);
        }
        tokio::select! {
            _ = tick.tick() => {
                keeper.keep_alive().await?;
                match answers.message().await? {
                    Some(a) if a.ttl() > 0 => {}
                    _ => return Ok(()), // lease gone: grant a new one
                }
            }
            // While draining, connections in use change without a route
            // change: look again soon.
            _ = check.tick(), if published.as_ref().is_some_and(|p| p.state == ProxyState::Draining) => {}
            r = routes.changed() => { if r.is_err() { return Ok(()); } }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcs::Revision;
    use crate::proxy::route::{NoPrimary, Target};

    #[test]
    fn states_follow_the_routes_and_the_connections_in_use() {
        let t = Target {
            member: "n1".into(),
            host: "h".into(),
            port: 1,
        };
        let routes = |rw| Routes {
            rw,
            replicas: vec![],
            leader: None,
        };
        let busy = |_: &MemberName| 1;
        let idle = |_: &MemberName| 0;
        assert_eq!(
            state_of(&routes(Rw::Serve(t.clone())), busy),
            (ProxyState::Serving, None)
        );
        assert_eq!(
            state_of(&routes(Rw::Hold(NoPrimary::NoLeader)), busy),
            (ProxyState::Holding, None)
        );
        let drain = Rw::Drain {
            from: t,
            revision: Revision(9),
        };
        assert_eq!(
            state_of(&routes(drain.clone()), busy),
            (ProxyState::Draining, None)
        );
        assert_eq!(
            state_of(&routes(drain), idle),
            (ProxyState::Drained, Some(9))
        );
    }
}
