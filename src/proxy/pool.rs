//! Server connections owned by the proxy, pooled per (member, user,
//! database). A pool never holds more than `default_pool_size`
//! connections: a connection is only opened while holding one of the
//! pool's permits, and only when no idle one is left.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::route::Target;
use super::server::{Credentials, Server, ServerError};
use super::server_tls::ServerTls;
use crate::model::MemberName;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub target: Target,
    pub user: String,
    pub database: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AcquireError {
    #[error("all {size} server connections of the pool are busy")]
    Exhausted { size: usize },
    #[error(transparent)]
    Server(#[from] ServerError),
}

pub struct Pools {
    pools: Mutex<HashMap<PoolKey, Arc<Pool>>>,
    size: usize,
    lifetime: Duration,
    idle_timeout: Duration,
    connect_timeout: Duration,
    tls: Arc<ServerTls>,
    /// Members on this host: their Unix socket directory.
    unix_sockets: std::collections::BTreeMap<String, std::path::PathBuf>,
}

pub struct Pool {
    idle: Mutex<Vec<Server>>,
    permits: Arc<Semaphore>,
    in_use: AtomicUsize,
    /// Connections opened, ever (for the metrics).
    opened: AtomicU64,
    /// The last login's ParameterStatus values, for new clients.
    params: Mutex<Option<Vec<(String, String)>>>,
    /// Removed from the map by [`Pools::sweep`]: a session that cached it
    /// must look its pool up again.
    retired: AtomicBool,
}

impl Pool {
    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }
}

/// A server connection checked out of its pool. Dropping it closes the
/// connection; [`Pools::release`] returns it.
pub struct Lease {
    server: Option<Server>,
    pool: Arc<Pool>,
    _permit: OwnedSemaphorePermit,
}

impl Lease {
    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("present until released")
    }
    pub fn server_mut(&mut self) -> &mut Server {
        self.server.as_mut().expect("present until released")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.in_use.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One pool's numbers, for `/metrics`.
#[derive(Clone, Debug)]
pub struct PoolStats {
    pub key: PoolKey,
    pub in_use: usize,
    pub idle: usize,
    pub opened: u64,
}

impl Pools {
    pub fn new(
        size: usize,
        lifetime: Duration,
        idle_timeout: Duration,
        tls: Arc<ServerTls>,
        unix_sockets: std::collections::BTreeMap<String, std::path::PathBuf>,
    ) -> Pools {
        Pools {
            pools: Mutex::new(HashMap::new()),
            size,
            lifetime,
            idle_timeout,
            connect_timeout: Duration::from_secs(5),
            tls,
            unix_sockets,
        }
    }

    /// The Unix socket of `target` when its member is on this host.
    fn socket_of(&self, target: &Target) -> Option<std::path::PathBuf> {
        self.unix_sockets
            .get(target.member.as_str())
            .map(|dir| dir.join(format!(".s.PGSQL.{}", target.port)))
    }

    /// The pool of `key`, created on first use. Sessions keep it between
    /// transactions (until it is retired), so that the map's lock and the
    /// key's hashing stay off the per-transaction path.
    pub fn pool(&self, key: &PoolKey) -> Arc<Pool> {
        let mut pools = self.pools.lock().expect("pool map");
        pools
            .entry(key.clone())
            .or_insert_with(|| {
                Arc::new(Pool {
                    idle: Mutex::new(Vec::new()),
                    permits: Arc::new(Semaphore::new(self.size)),
                    in_use: AtomicUsize::new(0),
                    opened: AtomicU64::new(0),
                    params: Mutex::new(None),
                    retired: AtomicBool::new(false),
                })
            })
            .clone()
    }

    /// An idle connection of `pool` (which is `key`'s), or a new one
    /// logged in with `credentials()`; waits for a permit until `deadline`.
    pub async fn acquire(
        &self,
        pool: &Arc<Pool>,
        key: &PoolKey,
        credentials: impl FnOnce() -> Credentials,
        deadline: tokio::time::Instant,
    ) -> Result<Lease, AcquireError> {
        let pool = pool.clone();
        let permit = tokio::time::timeout_at(deadline, pool.permits.clone().acquire_owned())
            .await
            .map_err(|_| AcquireError::Exhausted { size: self.size })?
            .expect("pool semaphores are never closed");
        let now = Instant::now();
        let reused = loop {
            let candidate = pool.idle.lock().expect("idle list").pop();
            match candidate {
                Some(s) if self.expired(&s, now) || !s.looks_alive() => continue,
                other => break other,
            }
        };
        let server = match reused {
            Some(s) => s,
            None => {
                let s = Server::connect(
                    &key.target,
                    &self.tls,
                    self.socket_of(&key.target).as_deref(),
                    &key.user,
                    &key.database,
                    &credentials(),
                    self.connect_timeout,
                )
                .await?;
                pool.opened.fetch_add(1, Ordering::Relaxed);
                *pool.params.lock().expect("params") = Some(s.params.clone());
                s
            }
        };
        pool.in_use.fetch_add(1, Ordering::Relaxed);
        Ok(Lease {
            server: Some(server),
            pool,
            _permit: permit,
        })
    }

    /// An idle connection to `member` from any of its pools, without
    /// waiting (for the proxy's own short queries); `None` when every
    /// connection is busy or there is none.
    pub fn borrow_idle(&self, member: &MemberName) -> Option<Lease> {
        let candidates: Vec<Arc<Pool>> = self
            .pools
            .lock()
            .expect("pool map")
            .iter()
            .filter(|(k, _)| &k.target.member == member)
            .map(|(_, p)| p.clone())
            .collect();
        let now = Instant::now();
        for pool in candidates {
            let Ok(permit) = pool.permits.clone().try_acquire_owned() else {
                continue;
            };
            let server = loop {
                let candidate = pool.idle.lock().expect("idle list").pop();
                match candidate {
                    Some(s) if self.expired(&s, now) || !s.looks_alive() => continue,
                    other => break other,
                }
            };
            if let Some(server) = server {
                pool.in_use.fetch_add(1, Ordering::Relaxed);
                return Some(Lease {
                    server: Some(server),
                    pool,
                    _permit: permit,
                });
            }
        }
        None
    }

    fn expired(&self, s: &Server, now: Instant) -> bool {
        now.duration_since(s.created) >= self.lifetime
            || now.duration_since(s.last_used) >= self.idle_timeout
    }

    /// Returns a clean server connection to its pool (or closes it when it
    /// has lived long enough).
    pub fn release(&self, mut lease: Lease) {
        let now = Instant::now();
        let pool = lease.pool.clone();
        let Some(mut server) = lease.server.take() else {
            return;
        };
        drop(lease);
        server.last_used = now;
        if now.duration_since(server.created) < self.lifetime {
            pool.idle.lock().expect("idle list").push(server);
        }
    }

    /// The ParameterStatus values servers of this pool announced.
    pub fn params(&self, key: &PoolKey) -> Option<Vec<(String, String)>> {
        self.pools
            .lock()
            .expect("pool map")
            .get(key)
            .and_then(|p| p.params.lock().expect("params").clone())
    }

    /// Connections in use on `member`, for least-connections balancing.
    pub fn load(&self, member: &MemberName) -> usize {
        self.pools
            .lock()
            .expect("pool map")
            .iter()
            .filter(|(k, _)| &k.target.member == member)
            .map(|(_, p)| p.in_use.load(Ordering::Relaxed))
            .sum()
    }

    /// Connections in use on each of `members`, under one lock.
    pub fn loads(&self, members: &[&MemberName]) -> Vec<usize> {
        let pools = self.pools.lock().expect("pool map");
        let mut loads = vec![0; members.len()];
        for (k, p) in pools.iter() {
            if let Some(i) = members.iter().position(|m| **m == k.target.member) {
                loads[i] += p.in_use.load(Ordering::Relaxed);
            }
        }
        loads
    }

    /// Closes idle connections past their idle timeout or lifetime, and
    /// the idle connections of every target `keep` refuses (a former
    /// leader, a replica that fell behind).
    pub fn sweep(&self, keep: impl Fn(&Target) -> bool) {
        let now = Instant::now();
        let mut pools = self.pools.lock().expect("pool map");
        for (key, pool) in pools.iter() {
            let keep_target = keep(&key.target);
            pool.idle
                .lock()
                .expect("idle list")
                .retain(|s| keep_target && !self.expired(s, now));
        }
        pools.retain(|key, pool| {
            let retain = keep(&key.target)
                || pool.in_use.load(Ordering::Relaxed) > 0
                || pool.permits.available_permits() < self.size;
            if !retain {
                pool.retired.store(true, Ordering::Relaxed);
            }
            retain
        });
    }

    pub fn stats(&self) -> Vec<PoolStats> {
        self.pools
            .lock()
            .expect("pool map")
            .iter()
            .map(|(k, p)| PoolStats {
                key: k.clone(),
                in_use: p.in_use.load(Ordering::Relaxed),
                idle: p.idle.lock().expect("idle list").len(),
                opened: p.opened.load(Ordering::Relaxed),
            })
            .collect()
    }
}
