//! `pgha edit-config`: the cluster-wide configuration in an editor, as
//! TOML, validated, shown as a diff and written with compare-and-swap.
//!
//! Unlike `pgha config set`, which re-applies its named keys on a fresh
//! read when someone else wrote in between, an edit is a whole new
//! configuration based on what the editor showed: if the key changed since,
//! the write is refused (nothing is lost, the edit is kept in its file).

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use super::UsageError;
use crate::config::Config;
use crate::dcs::{ClusterConfig, Dcs, DcsError};
use crate::postgres::params;

/// The configuration as `key = value` pairs, in the order `config show`
/// prints them: the named keys, then one pair per server parameter.
pub fn flatten(c: &ClusterConfig) -> Vec<(String, String)> {
    let mut pairs = vec![
        ("paused".to_string(), c.paused.to_string()),
        (
            "synchronous_mode".to_string(),
            c.synchronous_mode.to_string(),
        ),
        (
            "synchronous_node_count".to_string(),
            c.synchronous_node_count.to_string(),
        ),
        (
            "synchronous_quorum".to_string(),
            c.synchronous_quorum.to_string(),
        ),
        ("failsafe_mode".to_string(), c.failsafe_mode.to_string()),
    ];
    for (name, value) in &c.postgresql.parameters {
        pairs.push((
            format!("{}{name}", ClusterConfig::PARAMETER_PREFIX),
            value.clone(),
        ));
    }
    pairs
}

/// The TOML an operator edits.
pub fn to_toml(c: &ClusterConfig) -> String {
    let mut text = String::from(
        "# The cluster-wide configuration (etcd), for every member. A key left out\n\
         # is reset to its default; a parameter left out is removed.\n\
         # Server parameters go under [postgresql.parameters], e.g. work_mem = \"64MB\".\n\n",
    );
    let quote = |v: &str| toml::Value::String(v.to_string()).to_string();
    text.push_str(&format!("paused = {}\n", c.paused));
    text.push_str(&format!(
        "synchronous_mode = {}\n",
        quote(&c.synchronous_mode.to_string())
    ));
    text.push_str(&format!(
        "synchronous_node_count = {}\n",
        c.synchronous_node_count
    ));
    text.push_str(&format!("synchronous_quorum = {}\n", c.synchronous_quorum));
    text.push_str(&format!("failsafe_mode = {}\n", c.failsafe_mode));
    text.push_str("\n[postgresql.parameters]\n");
    for (name, value) in &c.postgresql.parameters {
        text.push_str(&format!("{name} = {}\n", quote(value)));
    }
    text
}

/// Parses an edited file: every key is checked as `pgha config set` checks
/// it; the error names the key.
pub fn from_toml(text: &str) -> Result<ClusterConfig, String> {
    let table: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| format!("not valid TOML: {}", e.to_string().trim_end()))?;
    let mut config = ClusterConfig::default();
    for (key, value) in &table {
        if key == "postgresql" {
            let Some(section) = value.as_table() else {
                return Err("postgresql must be a table ([postgresql.parameters])".into());
            };
            for (sub, value) in section {
                let Some(parameters) = value.as_table().filter(|_| sub == "parameters") else {
                    return Err(format!(
                        "unknown key postgresql.{sub}; only [postgresql.parameters] is known"
                    ));
                };
                for (name, value) in parameters {
                    let key = format!("{}{name}", ClusterConfig::PARAMETER_PREFIX);
                    let text = scalar(&key, value, true)?;
                    if text.is_empty() {
                        return Err(format!(
                            "{key}: an empty value is not supported; remove the line instead"
                        ));
                    }
                    config.set(&key, &text)?;
                }
            }
            continue;
        }
        config.set(key, &scalar(key, value, false)?)?;
    }
    Ok(config)
}

/// A TOML value as the text `config set` takes; booleans of server
/// parameters become `on`/`off`, as PostgreSQL writes them.
fn scalar(key: &str, value: &toml::Value, parameter: bool) -> Result<String, String> {
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(i) => i.to_string(),
        toml::Value::Float(f) if parameter => f.to_string(),
        toml::Value::Boolean(b) if parameter => if *b { "on" } else { "off" }.to_string(),
        toml::Value::Boolean(b) => b.to_string(),
        other => {
            return Err(format!(
                "{key} must be a string, number or boolean, not {}",
                other.type_str()
            ));
        }
    })
}

/// The changes from `before` to `after`, one `-`/`+` line per key.
pub fn diff(before: &ClusterConfig, after: &ClusterConfig) -> Vec<String> {
    let old: BTreeMap<String, String> = flatten(before).into_iter().collect();
    let new: BTreeMap<String, String> = flatten(after).into_iter().collect();
    let mut keys: Vec<String> = Vec::new();
    for (key, _) in flatten(before).into_iter().chain(flatten(after)) {
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    let mut lines = Vec::new();
    for key in keys {
        let (o, n) = (old.get(&key), new.get(&key));
        if o == n {
            continue;
        }
        if let Some(o) = o {
            lines.push(format!("- {key} = {o}"));
        }
        if let Some(n) = n {
            lines.push(format!("+ {key} = {n}"));
        }
    }
    lines
}

/// How to run this node's `postgres` binary for a value check: as
/// `postgres.os_user` when the command runs as root (the server refuses
/// to run as root).
fn checker(cfg: &Config) -> anyhow::Result<params::Checker<'_>> {
    let run_as = if nix::unistd::geteuid().is_root() {
        let user = nix::unistd::User::from_name(&cfg.postgres.os_user)?
            .with_context(|| format!("no OS user {:?} (postgres.os_user)", cfg.postgres.os_user))?;
        Some((user.uid.as_raw(), user.gid.as_raw()))
    } else {
        None
    };
    Ok(params::Checker {
        bin_dir: &cfg.postgres.bin_dir,
        run_as,
    })
}

/// Asks PostgreSQL about the server parameters `after` adds or changes.
/// A refused value is a usage error naming the key; when the check cannot
/// run at all, a warning (every agent checks again before applying).
pub async fn check_parameter_values(
    cfg: &Config,
    before: &ClusterConfig,
    after: &ClusterConfig,
) -> anyhow::Result<()> {
    let changed: BTreeMap<String, String> = after
        .postgresql
        .parameters
        .iter()
        .filter(|(n, v)| before.postgresql.parameters.get(*n) != Some(*v))
        .map(|(n, v)| (n.clone(), v.clone()))
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    let problems = match checker(cfg) {
        Ok(c) => params::check_values(&c, &changed)
            .await
            .map_err(anyhow::Error::from),
        Err(e) => Err(e),
    };
    match problems {
        Ok(problems) if problems.is_empty() => Ok(()),
        Ok(problems) => Err(UsageError(
            problems
                .iter()
                .map(|(name, why)| format!("{}{name}: {why}", ClusterConfig::PARAMETER_PREFIX))
                .collect::<Vec<_>>()
                .join("; "),
        )
        .into()),
        Err(e) => {
            eprintln!(
                "warning: could not ask PostgreSQL to check the values ({e:#}); every agent checks them before applying"
            );
            Ok(())
        }
    }
}

/// Where the edit comes from.
pub enum Source {
    /// `$EDITOR` (or `vi`) on a file pgha writes.
    Editor,
    /// `--apply FILE`, `-` for standard input: for scripts.
    File(PathBuf),
}

pub async fn edit_config(cfg: &Config, source: Source, force: bool) -> anyhow::Result<()> {
    let dcs = super::connect_dcs(cfg).await?;
    let view = dcs.read_cluster().await?;
    let (before, revision) = (view.config, view.config_revision);
    let interactive = std::io::stdin().is_terminal();
    let (after, kept) = match source {
        Source::File(path) => {
            let text = if path == Path::new("-") {
                std::io::read_to_string(std::io::stdin()).context("read standard input")?
            } else {
                std::fs::read_to_string(&path)
                    .with_context(|| format!("read {}", path.display()))?
            };
            let after = from_toml(&text).map_err(UsageError)?;
            check_parameter_values(cfg, &before, &after).await?;
            (after, None)
        }
        Source::Editor => {
            let path = std::env::temp_dir().join(format!(
                "pgha-{}-config-{}.toml",
                cfg.cluster,
                std::process::id()
            ));
            write_private(&path, &to_toml(&before))?;
            let after = loop {
                run_editor(&path)?;
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("read {}", path.display()))?;
                let problem = match from_toml(&text) {
                    Ok(after) => match check_parameter_values(cfg, &before, &after).await {
                        Ok(()) => break after,
                        Err(e) => format!("{e:#}"),
                    },
                    Err(e) => e,
                };
                eprintln!("error: {problem}");
                if !(interactive && ask("Edit again? [y/N] ")?) {
                    return Err(UsageError(format!(
                        "nothing was changed; your edit is kept in {}",
                        path.display()
                    ))
                    .into());
                }
            };
            (after, Some(path))
        }
    };
    let changes = diff(&before, &after);
    if changes.is_empty() {
        println!("no changes");
        remove(kept.as_deref());
        return Ok(());
    }
    for line in &changes {
        println!("{line}");
    }
    // A file given with --apply is a script's: no question. An editor
    // session asks, unless --force; without a terminal to ask on it
    // refuses rather than guessing.
    let confirmed = force || kept.is_none() || (interactive && ask("Apply these changes? [y/N] ")?);
    if !confirmed {
        let kept = kept
            .as_deref()
            .map(|p| format!("; your edit is kept in {}", p.display()));
        let why = if interactive {
            "not applied"
        } else {
            "not applied: standard input is not a terminal to confirm on; pass --force"
        };
        bail!("{why}{}", kept.unwrap_or_default());
    }
    match dcs.put_config(&after, revision).await {
        Ok(_) => {
            println!(
                "applied; every member takes the change within a loop (see `pgha list` for pending restarts)"
            );
            remove(kept.as_deref());
            Ok(())
        }
        Err(e @ DcsError::Conflict { .. }) => {
            let kept = kept
                .as_deref()
                .map(|p| format!("; your edit is kept in {}", p.display()))
                .unwrap_or_default();
            Err(anyhow::Error::new(e).context(format!(
                "the cluster configuration was changed by someone else since it was read, so this edit was not written (it would undo that change){kept}; run edit-config again"
            )))
        }
        Err(e) => Err(e.into()),
    }
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("write {}", path.display()))
}

fn remove(path: Option<&Path>) {
    if let Some(p) = path {
        let _ = std::fs::remove_file(p);
    }
}

/// Runs `$EDITOR FILE` (through the shell, so `EDITOR="code --wait"`
/// works), `vi` when unset.
fn run_editor(path: &Path) -> anyhow::Result<()> {
    let editor = std::env::var("EDITOR")
        .ok()
        .filter(|e| !e.trim().is_empty())
        .unwrap_or_else(|| "vi".into());
    let status = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("pgha-editor")
        .arg(path)
        .status()
        .with_context(|| format!("run the editor {editor:?}"))?;
    if !status.success() {
        bail!(
            "the editor {editor:?} exited with {status}; nothing was changed (the file is {})",
            path.display()
        );
    }
    Ok(())
}

fn ask(question: &str) -> anyhow::Result<bool> {
    print!("{question}");
    std::io::stdout().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dcs::SyncMode;

    fn with_parameters(pairs: &[(&str, &str)]) -> ClusterConfig {
        let mut c = ClusterConfig::default();
        for (k, v) in pairs {
            c.set(&format!("postgresql.parameters.{k}"), v).unwrap();
        }
        c
    }

    #[test]
    fn the_edited_text_reads_back_as_what_was_shown() {
        let mut c = with_parameters(&[("work_mem", "64MB"), ("search_path", "\"$user\", 'x'")]);
        c.synchronous_mode = SyncMode::Strict;
        c.paused = true;
        assert_eq!(from_toml(&to_toml(&c)), Ok(c));
        let empty = ClusterConfig::default();
        assert_eq!(from_toml(&to_toml(&empty)), Ok(empty));
    }

    #[test]
    fn edits_are_checked_like_config_set_and_name_the_key() {
        let base = to_toml(&ClusterConfig::default());
        let cases = [
            ("synchronous_mode = \"sometimes\"", "synchronous_mode"),
            ("bogus = 1", "bogus"),
            (
                "[postgresql.parameters]\nsynchronous_standby_names = \"*\"",
                "postgresql.parameters.synchronous_standby_names",
            ),
            (
                "[postgresql.parameters]\nwal_level = \"minimal\"",
                "postgresql.parameters.wal_level",
            ),
            ("[postgresql.other]\nx = 1", "postgresql.other"),
            ("paused = [1]", "paused"),
            ("paused = ", "TOML"),
        ];
        for (edit, named) in cases {
            // Later lines replace the shown ones; a duplicate key is a
            // TOML error, so each case starts from its own document.
            let text = if edit.starts_with('[') {
                base.replace("[postgresql.parameters]\n", "") + edit
            } else {
                edit.to_string()
            };
            let err = from_toml(&text).unwrap_err();
            assert!(err.contains(named), "{edit}: {err}");
        }
        // Booleans and numbers become the text PostgreSQL reads.
        let c = from_toml(
            "[postgresql.parameters]\njit = false\nrandom_page_cost = 1.5\nmax_connections = 200",
        )
        .unwrap();
        assert_eq!(
            c.postgresql.parameters,
            BTreeMap::from([
                ("jit".to_string(), "off".to_string()),
                ("max_connections".to_string(), "200".to_string()),
                ("random_page_cost".to_string(), "1.5".to_string()),
            ])
        );
    }

    #[test]
    fn the_diff_names_each_changed_key_once() {
        let before = with_parameters(&[("work_mem", "4MB"), ("jit", "off")]);
        let mut after = with_parameters(&[("work_mem", "64MB"), ("max_connections", "200")]);
        after.paused = true;
        assert_eq!(
            diff(&before, &after),
            vec![
                "- paused = false",
                "+ paused = true",
                "- postgresql.parameters.jit = off",
                "- postgresql.parameters.work_mem = 4MB",
                "+ postgresql.parameters.work_mem = 64MB",
                "+ postgresql.parameters.max_connections = 200",
            ]
        );
        assert!(diff(&before, &before).is_empty());
    }

    #[test]
    fn config_set_removes_a_parameter_with_an_empty_value() {
        let mut c = with_parameters(&[("work_mem", "64MB")]);
        c.set("postgresql.parameters.work_mem", "").unwrap();
        assert!(c.postgresql.parameters.is_empty());
        let err = c.set("postgresql.parameters.port", "5000").unwrap_err();
        assert!(err.contains("postgresql.parameters.port"), "{err}");
        assert!(err.contains("postgres.port"), "{err}");
    }
}
