//! `pgha proxy explain "SQL"`: where the auto listener would send a
//! statement, and why. With `-c FILE` (a proxy file), the file's
//! `read_only_functions` count and the current cluster view names the
//! members.

use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use crate::config::ProxyFileConfig;
use crate::dcs::Dcs;
use crate::dcs::etcd::EtcdDcs;
use crate::dcs::keys::Keys;
use crate::model::MemberName;
use crate::proxy::classify::{self, Destination, ReadOnlyFunctions, SessionState};
use crate::proxy::route;

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Explanation {
    /// `leader` or `replica`.
    pub destination: &'static str,
    /// The metric label (`read_only`, `write`, `in_transaction`,
    /// `function`, `parse_failure`).
    pub reason: &'static str,
    /// The reason in words.
    pub detail: String,
    pub functions: Vec<String>,
    pub relations: Vec<String>,
    /// With `-c`: the members that would serve it now (the leader, or the
    /// replicas in rotation).
    pub members: Option<Vec<String>>,
}

/// The pure part: the decision for `sql` outside a transaction block.
pub fn explain(sql: &str, functions: &ReadOnlyFunctions) -> Explanation {
    let analysis = classify::analyze(sql);
    let temp = Default::default();
    let d = classify::decide(
        &analysis,
        SessionState {
            in_transaction: false,
            temp_tables: &temp,
        },
        functions,
    );
    Explanation {
        destination: match d.destination {
            Destination::AnyMember => "replica",
            Destination::Leader => "leader",
        },
        reason: d.reason.label(),
        detail: d.reason.to_string(),
        functions: analysis.functions,
        relations: analysis.relations,
        members: None,
    }
}

pub async fn run(sql: &str, config: Option<&Path>, json: bool) -> anyhow::Result<()> {
    let file = config.map(ProxyFileConfig::load).transpose()?;
    let configured: Vec<String> = file
        .as_ref()
        .map(|f| f.proxy.read_only_functions.clone())
        .unwrap_or_default();
    let mut e = explain(sql, &ReadOnlyFunctions::new(&configured));
    if let Some(f) = &file {
        let dcs = EtcdDcs::connect(
            &f.etcd,
            Keys::new(&f.namespace, &f.cluster),
            MemberName::new(format!("{}-explain", f.proxy.name)),
            Duration::from_secs(3),
            Duration::from_secs(3),
            false,
        )
        .await?;
        let view = dcs.read_cluster().await?;
        let routes = route::routes(&view, f.proxy.max_lag, crate::util::unix_ms());
        let members = match (e.destination, routes.rw_target()) {
            ("replica", _) if !routes.replicas.is_empty() => {
                routes.replicas.iter().map(|t| t.to_string()).collect()
            }
            (_, Some(leader)) => vec![leader.to_string()],
            (_, None) => Vec::new(),
        };
        e.members = Some(members);
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&e)?);
        return Ok(());
    }
    println!("{}: {}", e.destination, e.detail);
    if !e.functions.is_empty() {
        println!("functions: {}", e.functions.join(", "));
    }
    if !e.relations.is_empty() {
        println!("relations: {}", e.relations.join(", "));
    }
    if let Some(members) = &e.members {
        if members.is_empty() {
            println!("now: no member can serve it (no running primary)");
        } else {
            println!("now: {}", members.join(", "));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explains_reads_writes_and_configured_functions() {
        let none = ReadOnlyFunctions::new::<&str>(&[]);
        let e = explain("SELECT * FROM t WHERE id = 1", &none);
        assert_eq!((e.destination, e.reason), ("replica", "read_only"));
        assert_eq!(e.relations, vec!["t"]);
        let e = explain(
            "WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d",
            &none,
        );
        assert_eq!((e.destination, e.reason), ("leader", "write"));
        let e = explain("SELECT f(1)", &none);
        assert_eq!((e.destination, e.reason), ("leader", "function"));
        let e = explain("SELECT f(1)", &ReadOnlyFunctions::new(&["f"]));
        assert_eq!((e.destination, e.reason), ("replica", "read_only"));
    }
}
