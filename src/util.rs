//! Small helpers with no better home.

use std::time::{SystemTime, UNIX_EPOCH};

/// Wall-clock milliseconds since the Unix epoch, for records meant for humans.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Milliseconds on `CLOCK_BOOTTIME`: monotonic, shared by every process on
/// the host, and — unlike `CLOCK_MONOTONIC` — still advancing while the
/// machine is suspended, like the etcd server's lease clock. The agent and
/// the fence keeper exchange deadlines in this clock.
pub fn boottime_ms() -> u64 {
    let ts = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .expect("CLOCK_BOOTTIME is available on Linux");
    ts.tv_sec() as u64 * 1000 + ts.tv_nsec() as u64 / 1_000_000
}

/// Shows an error followed by its causes, `what failed: cause: root
/// cause`, as anyhow's `{:#}` does. pgha's error types keep the cause out
/// of their own message (it is only their `source()`), so that the chain
/// printed by `main` names each cause once; logs use this to show the same
/// whole chain: `tracing::warn!(error = %chain(&e), ...)`.
pub fn chain<'a>(error: &'a (dyn std::error::Error + 'a)) -> Chain<'a> {
    Chain(error)
}

/// See [`chain`].
pub struct Chain<'a>(&'a (dyn std::error::Error + 'a));

impl std::fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(cause) = source {
            write!(f, ": {cause}")?;
            source = cause.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::path::PathBuf;

    use super::chain;
    use crate::config::ConfigError;
    use crate::dcs::DcsError;
    use crate::postgres::PgError;

    const ROOT: &str = "the-root-cause-7";

    fn root() -> io::Error {
        io::Error::new(io::ErrorKind::PermissionDenied, ROOT)
    }

    /// Every pgha error that wraps a cause, nested in context as `main`
    /// and the agent see it: the cause must appear exactly once, after
    /// what was being attempted.
    #[test]
    fn a_nested_cause_is_shown_once() {
        let errors: Vec<(&str, Box<dyn std::error::Error + Send + Sync>)> = vec![
            (
                "cannot read",
                Box::new(ConfigError::Read {
                    path: PathBuf::from("/etc/pgha/node.toml"),
                    source: root(),
                }),
            ),
            (
                "while trying to read the cluster",
                Box::new(DcsError::Unavailable {
                    action: "read the cluster",
                    source: Box::new(root()),
                }),
            ),
            (
                "write postgresql.conf",
                Box::new(PgError::Io {
                    action: "write postgresql.conf".into(),
                    source: root(),
                }),
            ),
        ];
        for (attempted, e) in errors {
            let outer = anyhow::Error::from_boxed(e).context("outer step");
            for shown in [format!("{outer:#}"), chain(outer.as_ref()).to_string()] {
                assert_eq!(shown.matches(ROOT).count(), 1, "{shown}");
                let (head, tail) = shown.split_once(ROOT).unwrap();
                assert!(head.starts_with("outer step: "), "{shown}");
                assert!(head.contains(attempted), "{shown}");
                assert!(tail.is_empty(), "the root cause comes last: {shown}");
            }
        }
    }

    #[test]
    fn chain_of_an_error_without_source_is_its_message() {
        assert_eq!(chain(&root()).to_string(), ROOT);
    }
}
