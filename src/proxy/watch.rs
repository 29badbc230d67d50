//! The proxy's view of the cluster, kept current by an etcd watch: one
//! range read, then every event applied to a local copy of the keys, so a
//! leader change reaches routing as soon as etcd reports it.
//!
//! While the watch is broken the proxy cannot know who leads, so it
//! publishes [`Routes::unknown`]: the read-write side holds new
//! transactions instead of trusting a stale leader.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};
use tokio::sync::watch;

use super::route::{self, Routes};
use crate::dcs::ClusterView;
use crate::dcs::etcd::{RawKv, decode_view};
use crate::dcs::keys::Keys;

/// Keeps `views` and `routes` current until the process ends.
pub async fn run(
    client: Client,
    keys: Keys,
    max_lag: u64,
    views: watch::Sender<Arc<ClusterView>>,
    routes: watch::Sender<Arc<Routes>>,
) {
    let publish = |view: ClusterView| {
        let r = route::routes(&view, max_lag, crate::util::unix_ms());
        routes.send_if_modified(|cur| {
            if **cur != r {
                *cur = Arc::new(r);
                true
            } else {
                false
            }
        });
        views.send_replace(Arc::new(view));
    };
    // A scheduled switchover becomes due without any key changing.
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        if let Err(e) = follow(client.clone(), &keys, &publish, &mut tick).await {
            tracing::warn!(error = %e, "cluster watch interrupted; holding read-write traffic until it resumes");
        }
        routes.send_if_modified(|cur| {
            let unknown = Routes::unknown();
            if **cur != unknown {
                *cur = Arc::new(unknown);
                true
            } else {
                false
            }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn follow(
    mut client: Client,
    keys: &Keys,
    publish: &impl Fn(ClusterView),
    tick: &mut tokio::time::Interval,
) -> Result<(), etcd_client::Error> {
    let resp = client
        .get(keys.prefix(), Some(GetOptions::new().with_prefix()))
        .await?;
    let mut revision = resp.header().map_or(0, |h| h.revision());
    let mut kvs: BTreeMap<String, RawKv> = resp
        .kvs()
        .iter()
        .map(|kv| {
            let key = String::from_utf8_lossy(kv.key()).to_string();
            (
                key.clone(),
                RawKv {
                    key,
                    value: kv.value().to_vec(),
                    lease: kv.lease(),
                    mod_revision: kv.mod_revision(),
                },
            )
        })
        .collect();
    let decode = |kvs: &BTreeMap<String, RawKv>, revision| {
        let list: Vec<RawKv> = kvs.values().cloned().collect();
        decode_view(keys, revision, &list)
    };
    let mut view = decode(&kvs, revision).unwrap_or_default();
    publish(view.clone());
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = client.watch(keys.prefix(), Some(opts)).await?;
    loop {
        tokio::select! {
            msg = stream.message() => {
                let Some(resp) = msg? else {
                    return Ok(());
                };
                if resp.canceled() {
                    return Ok(());
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    let key = String::from_utf8_lossy(kv.key()).to_string();
                    match ev.event_type() {
                        EventType::Put => {
                            kvs.insert(key.clone(), RawKv {
                                key,
                                value: kv.value().to_vec(),
                                lease: kv.lease(),
                                mod_revision: kv.mod_revision(),
                            });
                        }
                        EventType::Delete => {
                            kvs.remove(&key);
                        }
                    }
                }
                revision = resp.header().map_or(revision, |h| h.revision());
                match decode(&kvs, revision) {
                    Ok(v) => view = v,
                    Err(e) => tracing::warn!(error = %crate::util::chain(&e), "ignoring an unreadable cluster state"),
                }
                publish(view.clone());
            }
            _ = tick.tick() => publish(view.clone()),
        }
    }
}
