//! The DCS key layout, in one place.
//!
//! Everything pgha stores lives under `/<namespace>/<cluster>/`:
//!
//! | key               | value                                      | bound to lease |
//! |-------------------|--------------------------------------------|----------------|
//! | `initialize`      | `pending:<member>` during bootstrap, then the system identifier | no |
//! | `leader`          | the leader's member name                   | leader lease   |
//! | `members/<name>`  | [`MemberRecord`](crate::model::MemberRecord) as JSON | member lease |
//! | `config`          | cluster-wide dynamic configuration (JSON)  | no             |
//! | `history`         | JSON array of timeline switches            | no             |
//! | `failover`        | a pending switchover/failover request (JSON) | no           |
//! | `sync`            | the synchronous standby set (JSON)         | no             |
//! | `failsafe`        | the members a failsafe leader must hear from (JSON) | no    |
//! | `proxies/<name>`  | a live proxy's [`ProxyRecord`](super::ProxyRecord) (JSON) | the proxy's lease |

use crate::model::MemberName;

/// Key builder for one cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

/// Which pgha key a raw etcd key is, relative to the cluster prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Initialize,
    Leader,
    Member(MemberName),
    Config,
    History,
    Failover,
    Sync,
    Failsafe,
    Proxy(String),
    Unknown,
}

impl Keys {
    /// `namespace` and `cluster` are validated by the config to contain no `/`.
    pub fn new(namespace: &str, cluster: &str) -> Self {
        Keys {
            prefix: format!("/{namespace}/{cluster}/"),
        }
    }
    pub fn prefix(&self) -> &str {
        &self.prefix
    }
    pub fn initialize(&self) -> String {
        format!("{}initialize", self.prefix)
    }
    pub fn leader(&self) -> String {
        format!("{}leader", self.prefix)
    }
    pub fn members_prefix(&self) -> String {
        format!("{}members/", self.prefix)
    }
    pub fn member(&self, name: &MemberName) -> String {
        format!("{}members/{}", self.prefix, name)
    }
    pub fn config(&self) -> String {
        format!("{}config", self.prefix)
    }
    pub fn history(&self) -> String {
        format!("{}history", self.prefix)
    }
    pub fn failover(&self) -> String {
        format!("{}failover", self.prefix)
    }
    pub fn sync(&self) -> String {
        format!("{}sync", self.prefix)
    }
    pub fn failsafe(&self) -> String {
        format!("{}failsafe", self.prefix)
    }
    pub fn proxy(&self, name: &str) -> String {
        format!("{}proxies/{}", self.prefix, name)
    }

    /// Classifies a full key read back from etcd.
    pub fn classify(&self, key: &str) -> KeyKind {
        let Some(rest) = key.strip_prefix(&self.prefix) else {
            return KeyKind::Unknown;
        };
        match rest {
            "initialize" => KeyKind::Initialize,
            "leader" => KeyKind::Leader,
            "config" => KeyKind::Config,
            "history" => KeyKind::History,
            "failover" => KeyKind::Failover,
            "sync" => KeyKind::Sync,
            "failsafe" => KeyKind::Failsafe,
            _ => match (rest.strip_prefix("members/"), rest.strip_prefix("proxies/")) {
                (Some(name), _) if MemberName::is_valid(name) => {
                    KeyKind::Member(MemberName::new(name))
                }
                (_, Some(name)) if MemberName::is_valid(name) => KeyKind::Proxy(name.to_string()),
                _ => KeyKind::Unknown,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_is_stable() {
        let k = Keys::new("pgha", "main");
        assert_eq!(k.prefix(), "/pgha/main/");
        assert_eq!(k.initialize(), "/pgha/main/initialize");
        assert_eq!(k.leader(), "/pgha/main/leader");
        assert_eq!(k.member(&"node1".into()), "/pgha/main/members/node1");
        assert_eq!(k.members_prefix(), "/pgha/main/members/");
        assert_eq!(k.config(), "/pgha/main/config");
        assert_eq!(k.history(), "/pgha/main/history");
        assert_eq!(k.failover(), "/pgha/main/failover");
        assert_eq!(k.sync(), "/pgha/main/sync");
        assert_eq!(k.failsafe(), "/pgha/main/failsafe");
    }

    #[test]
    fn classify_round_trips() {
        let k = Keys::new("ns", "c");
        let cases = [
            (k.initialize(), KeyKind::Initialize),
            (k.leader(), KeyKind::Leader),
            (k.member(&"a-1".into()), KeyKind::Member("a-1".into())),
            (k.config(), KeyKind::Config),
            (k.history(), KeyKind::History),
            (k.failover(), KeyKind::Failover),
            (k.sync(), KeyKind::Sync),
            (k.failsafe(), KeyKind::Failsafe),
            (k.proxy("px-1"), KeyKind::Proxy("px-1".into())),
            ("/ns/c/proxies/".to_string(), KeyKind::Unknown),
            ("/ns/c/members/".to_string(), KeyKind::Unknown),
            ("/ns/other/leader".to_string(), KeyKind::Unknown),
            ("/ns/c/leaderx".to_string(), KeyKind::Unknown),
        ];
        for (key, kind) in cases {
            assert_eq!(k.classify(&key), kind, "{key}");
        }
    }

    #[test]
    fn clusters_do_not_share_prefixes() {
        // "/ns/c/" must not be a prefix of "/ns/c2/": the trailing slash matters.
        let a = Keys::new("ns", "c");
        let b = Keys::new("ns", "c2");
        assert!(!b.leader().starts_with(a.prefix()));
    }
}
