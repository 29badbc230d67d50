//! Applying the cluster-wide server parameters (`postgresql.parameters` in
//! the `config` key) to the local server.
//!
//! This is a step the agent takes after the HA action of each loop, not an
//! [`Action`](crate::ha::Action) of the decision function: it never changes
//! roles, the lease or who may write, so it has no place among the safety
//! rules, and as an action it would compete with them for the one action
//! a loop carries out (a leader re-pointing its synchronous standbys must
//! not wait for a `work_mem` change, nor the other way round).
//!
//! Each change is checked with PostgreSQL's own parser before any file is
//! written; a refused value leaves the previous one in place and is shown
//! in the member record. The accepted map is kept in the state directory,
//! so an agent restarted while etcd is unreachable starts PostgreSQL with
//! the same parameters as before.

use std::collections::BTreeMap;

use super::Agent;
use crate::dcs::ClusterView;
use crate::model::ParameterStatus;
use crate::postgres::params;
use crate::postgres::query;

/// File name of the accepted cluster-wide parameters in the state directory.
const ACCEPTED_FILE: &str = "cluster-parameters.json";

/// What the agent remembers between loops.
#[derive(Debug, Default)]
pub(super) struct Parameters {
    /// The cluster-wide map as last read and handled; a new map in etcd
    /// is checked once, not on every loop.
    seen: Option<BTreeMap<String, String>>,
    /// The configuration file does not hold the accepted map yet.
    needs_reload: bool,
    status: ParameterStatus,
    /// Member-file values overridden by cluster-wide ones, as last logged.
    overridden: Vec<String>,
}

impl Parameters {
    pub(super) fn status(&self) -> ParameterStatus {
        self.status.clone()
    }
}

/// The accepted map saved by a previous run; empty when none was saved
/// (or it is unreadable: the next etcd read brings it back).
pub(super) fn load_accepted(state: &crate::safe_fs::TrustedDir) -> BTreeMap<String, String> {
    match state.read_to_string(ACCEPTED_FILE) {
        Ok(Some(text)) => serde_json::from_str(&text).unwrap_or_else(|e| {
            tracing::warn!(error = %e, file = ACCEPTED_FILE, "ignoring an unreadable parameter file");
            BTreeMap::new()
        }),
        Ok(None) => BTreeMap::new(),
        Err(e) => {
            tracing::warn!(error = %crate::util::chain(&e), file = ACCEPTED_FILE, "cannot read the parameter file");
            BTreeMap::new()
        }
    }
}

impl Agent {
    /// Takes in a changed cluster-wide map, rewrites and reloads the
    /// configuration when the server runs, and reads which parameters
    /// wait for a restart.
    pub(super) async fn apply_cluster_parameters(&mut self, view: Option<&ClusterView>) {
        if let Some(view) = view {
            let wanted = &view.config.postgresql.parameters;
            if self.parameters.seen.as_ref() != Some(wanted) {
                match self.accept_parameters(wanted).await {
                    Ok(()) => self.parameters.seen = Some(wanted.clone()),
                    Err(e) => {
                        tracing::warn!(
                            error = format!("{e:#}"),
                            "cannot check the cluster-wide parameters; retrying"
                        );
                    }
                }
            }
        }
        let running = self.observer.client().await.is_ok();
        if running && self.parameters.needs_reload {
            match self.reload_config().await {
                Ok(()) => {
                    self.parameters.needs_reload = false;
                    tracing::info!("reloaded the configuration with the cluster-wide parameters");
                }
                Err(e) => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "cannot reload the cluster-wide parameters; retrying"
                    )
                }
            }
        }
        self.parameters.status.pending_restart = if running {
            self.pending_restart().await.unwrap_or_default()
        } else {
            // A stopped server reads the current file when it starts.
            Vec::new()
        };
    }

    /// Checks the parameters that differ from the accepted ones; accepts
    /// the valid ones and keeps the previous value of every refused one.
    async fn accept_parameters(&mut self, wanted: &BTreeMap<String, String>) -> anyhow::Result<()> {
        let current = self.instance.cluster_parameters();
        let changed: BTreeMap<String, String> = wanted
            .iter()
            .filter(|(name, value)| current.get(*name) != Some(*value))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        // The same checks as `pgha config set`: etcd may have been written
        // by anything.
        let mut refused: BTreeMap<String, String> = changed
            .iter()
            .filter_map(|(n, v)| {
                params::check_cluster_parameter(n, v)
                    .err()
                    .map(|r| (n.clone(), r))
            })
            .collect();
        let to_check = changed
            .iter()
            .filter(|(n, _)| !refused.contains_key(*n))
            .map(|(n, v)| (n.clone(), v.clone()))
            .collect();
        refused.extend(params::check_values(&self.instance.parameter_checker(), &to_check).await?);
        let mut accepted = wanted.clone();
        for name in refused.keys() {
            match current.get(name) {
                Some(previous) => accepted.insert(name.clone(), previous.clone()),
                None => accepted.remove(name),
            };
        }
        for (name, reason) in &refused {
            tracing::error!(parameter = %name, value = %wanted[name], reason = %reason, "refusing a cluster-wide parameter; keeping the previous value");
        }
        // Refusals of values no longer wanted are forgotten.
        let still_refused = self
            .parameters
            .status
            .rejected
            .iter()
            .filter(|(n, _)| wanted.contains_key(*n) && !changed.contains_key(*n))
            .map(|(n, r)| (n.clone(), r.clone()));
        self.parameters.status.rejected = still_refused.chain(refused).collect();

        let overridden = params::effective(&self.instance.parameters, &accepted).1;
        if overridden != self.parameters.overridden {
            if !overridden.is_empty() {
                tracing::warn!(parameters = ?overridden, "the cluster-wide values of these parameters replace this member's [postgres.parameters]: every member must have the same");
            }
            self.parameters.overridden = overridden;
        }
        if accepted != current {
            let names: Vec<&String> = accepted
                .keys()
                .chain(current.keys())
                .filter(|n| accepted.get(*n) != current.get(*n))
                .collect();
            tracing::info!(parameters = ?names, "cluster-wide parameters changed");
            let text = serde_json::to_vec_pretty(&accepted)?;
            if let Err(e) = self
                .instance
                .state
                .write_durable(ACCEPTED_FILE, &text, 0o600)
            {
                tracing::warn!(error = %crate::util::chain(&e), "cannot save the cluster-wide parameters");
            }
            self.instance.set_cluster_parameters(accepted);
            self.parameters.needs_reload = true;
        }
        Ok(())
    }

    async fn pending_restart(&mut self) -> anyhow::Result<Vec<String>> {
        let client = self.observer.client().await?;
        let rows = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            client.query(query::PENDING_RESTART, &[]),
        )
        .await??;
        Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
    }
}
