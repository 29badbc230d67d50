//! Pieces of the JSON report shared by the subcommands.

use std::sync::OnceLock;

use serde_json::{Value, json};

use crate::cluster::Cluster;

/// `{"median", "min", "max", "all"}` of a list of milliseconds (or KiB),
/// rounded to whole units; nulls when the list is empty.
pub fn summary(values: &[f64]) -> Value {
    let round = |x: f64| x.round() as i64;
    let (median, min, max) = median_min_max(values);
    json!({
        "median": median.map(round),
        "min": min.map(round),
        "max": max.map(round),
        "all": values.iter().copied().map(round).collect::<Vec<_>>(),
    })
}

/// Like [`summary`], rounded to `digits` decimals (ratios, rates).
pub fn summary_decimals(values: &[f64], digits: i32) -> Value {
    let scale = 10f64.powi(digits);
    let round = |x: f64| (x * scale).round() / scale;
    let (median, min, max) = median_min_max(values);
    json!({
        "median": median.map(round),
        "min": min.map(round),
        "max": max.map(round),
        "all": values.iter().copied().map(round).collect::<Vec<_>>(),
    })
}

/// Median (the mean of the middle two for an even count), min and max.
fn median_min_max(values: &[f64]) -> (Option<f64>, Option<f64>, Option<f64>) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let median = match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    };
    (median, v.first().copied(), v.last().copied())
}

fn first_line_of(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_string)
}

static MACHINE: OnceLock<Value> = OnceLock::new();

/// What the numbers were measured on: they mean little without it.
/// Collected once at start-up, before the orphan reaper runs (it must not
/// race `Command::output` for these short-lived children).
pub fn init_machine() {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |text: &str, key: &str| {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let pgha = std::env::current_exe()
        .map(|e| e.with_file_name("pgha"))
        .ok()
        .and_then(|p| first_line_of(&p.to_string_lossy(), &["--version"]));
    let _ = MACHINE.set(json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "cpu_model": field(&cpuinfo, "model name"),
        "mem_total": field(&meminfo, "MemTotal"),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string()),
        "postgres": first_line_of("/usr/lib/postgresql/15/bin/pg_config", &["--version"]),
        "etcd": first_line_of("etcd", &["--version"]),
        "pgha": pgha,
        // Set by bench/failover.sh: `git describe --always --dirty`.
        "source_revision": std::env::var("PGHA_BENCH_REVISION").ok(),
        "loadavg_at_start": loadavg(),
    }));
}

/// The machine, with the load average now next to the one at start: other
/// work on a small host skews every timing, so the report says so.
pub fn machine() -> Value {
    let mut m = MACHINE.get().cloned().unwrap_or(Value::Null);
    if let Some(o) = m.as_object_mut() {
        o.insert("loadavg_at_end".into(), json!(loadavg()));
    }
    m
}

/// The 1, 5 and 15 minute load averages.
fn loadavg() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// The timing the agents ran with (pgha's defaults unless overridden).
pub fn config(cluster: &Cluster, extra: Value) -> Value {
    let ha = &cluster.ha;
    let fmt = |d: std::time::Duration| humantime::format_duration(d).to_string();
    let mut v = json!({
        "nodes": cluster.nodes.len(),
        "ttl": fmt(ha.ttl),
        "loop_wait": fmt(ha.loop_wait),
        "retry_timeout": fmt(ha.retry_timeout),
        "fence_margin": fmt(ha.fence_margin),
        "primary_start_timeout": fmt(ha.primary_start_timeout),
        "maximum_lag_on_failover": ha.maximum_lag_on_failover,
        "cluster_config": cluster.cluster_config,
        "bench_reaps_orphans": crate::reaper::is_subreaper(),
    });
    if let (Some(v), Value::Object(extra)) = (v.as_object_mut(), extra) {
        v.extend(extra);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_odd_even_and_empty() {
        assert_eq!(
            summary(&[3.0, 1.0, 2.0]),
            json!({"median": 2, "min": 1, "max": 3, "all": [3, 1, 2]})
        );
        assert_eq!(summary(&[1.0, 4.0])["median"], json!(3));
        assert_eq!(summary(&[])["median"], Value::Null);
    }
}
