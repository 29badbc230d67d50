//! The PostgreSQL OS user as an attacker. A database superuser becomes that
//! user with `COPY ... TO PROGRAM`; from there it must not reach root
//! through the agent, nor switch off the agent's safeguards.
//!
//! These stories need the agent to run as root with PostgreSQL as
//! `postgres` (as in production and in CI); run as another user there is no
//! privilege boundary to test, and they say so and return.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support::{Cluster, ClusterOptions, ProcessGuard};

const HEAL_TIMEOUT: Duration = Duration::from_secs(120);

fn postgres_user() -> Option<nix::unistd::User> {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not root: the agent and PostgreSQL share one account; nothing to test");
        return None;
    }
    nix::unistd::User::from_name("postgres").ok().flatten()
}

/// Runs a shell command as the PostgreSQL OS user; returns whether it
/// succeeded and its stderr.
fn as_postgres(user: &nix::unistd::User, script: &str) -> (bool, String) {
    let out = Command::new("/bin/sh")
        .args(["-c", script])
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .stdin(Stdio::null())
        .output()
        .expect("run sh as postgres");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A root-owned file the attacker wants overwritten or handed over.
fn victim(dir: &Path, name: &str) -> std::path::PathBuf {
    let v = dir.join(name);
    std::fs::write(&v, "root's precious file\n").unwrap();
    std::fs::set_permissions(&v, std::fs::Permissions::from_mode(0o644)).unwrap();
    v
}

fn assert_untouched(v: &Path) {
    let meta = std::fs::symlink_metadata(v).unwrap();
    assert_eq!(
        std::fs::read_to_string(v).unwrap(),
        "root's precious file\n",
        "{} was written",
        v.display()
    );
    assert_eq!(meta.uid(), 0, "{} was handed over", v.display());
    assert_eq!(
        meta.permissions().mode() & 0o7777,
        0o644,
        "{} chmodded",
        v.display()
    );
}

/// Symlinks planted by the PostgreSQL user in every place the agent writes
/// to as root — the data directory's configuration files, their temporary
/// names, the passfile's directory — are replaced, never followed; the
/// state directory holding the fence state and the former-primary mark is
/// not even writable for that user; and a forged `postmaster.pid` naming a
/// root process does not make the agent or its keeper signal it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_user_cannot_redirect_the_root_agent() {
    let Some(pg) = postgres_user() else { return };
    let mut cluster = Cluster::start("hard-symlink", 1, ClusterOptions::default())
        .await
        .unwrap();
    let node = &cluster.nodes[0];
    let (state, data) = (
        node.state_dir().to_path_buf(),
        node.data_dir().to_path_buf(),
    );
    let outside = cluster.dir().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::set_permissions(&outside, std::fs::Permissions::from_mode(0o755)).unwrap();

    // The layout: state directory root's, traversable only; its files
    // root's and private; the PostgreSQL account's subdirectory its own.
    let meta = std::fs::metadata(&state).unwrap();
    assert_eq!((meta.uid(), meta.mode() & 0o7777), (0, 0o711));
    for f in ["fence.state", "fence.ack", "former-primary"] {
        let m = std::fs::symlink_metadata(state.join(f)).unwrap();
        assert!(m.file_type().is_file(), "{f}");
        assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o600), "{f}");
    }
    let pgpass = std::fs::metadata(state.join("postgres/pgpass")).unwrap();
    assert_eq!(
        (pgpass.uid(), pgpass.mode() & 0o777),
        (pg.uid.as_raw(), 0o600)
    );

    // Nothing in the state directory is the PostgreSQL user's to change.
    let v_state = victim(&outside, "state-victim");
    for script in [
        format!("ln -s {} {}/fence.tmp", v_state.display(), state.display()),
        format!("rm -f {}/former-primary", state.display()),
        format!("echo disarmed 1 > {}/fence.state", state.display()),
        format!("mv {} {}.moved", state.display(), state.display()),
    ] {
        let (ok, _) = as_postgres(&pg, &script);
        assert!(!ok, "the PostgreSQL user could run: {script}");
    }
    assert!(state.join("former-primary").exists());

    // Stop the agent (and PostgreSQL), plant links and a forged pid file,
    // start again: the agent rewrites every configuration file on start.
    cluster.nodes[0].stop().await.unwrap();
    let victims: Vec<_> = [
        "postgresql.conf",
        "pg_hba.conf",
        "postgresql.auto.conf",
        "standby.signal",
        "postgresql.pgha-tmp",
        "pg_hba.pgha-tmp",
    ]
    .iter()
    .map(|name| {
        let v = victim(&outside, &format!("victim-{name}"));
        let (ok, err) = as_postgres(
            &pg,
            &format!("ln -sf {} {}/{name}", v.display(), data.display()),
        );
        assert!(ok, "plant {name}: {err}");
        v
    })
    .collect();
    // A root process named "postgres", and a pid file naming it.
    let fake_exe = outside.join("postgres");
    std::fs::copy("/bin/sleep", &fake_exe).unwrap();
    let mut sleeper = Command::new(&fake_exe);
    sleeper.arg("600");
    let sleeper = ProcessGuard::spawn(&mut sleeper).unwrap();
    let (ok, err) = as_postgres(
        &pg,
        &format!(
            "printf '{}\\n{}\\n' > {}/postmaster.pid",
            sleeper.pid(),
            data.display(),
            data.display()
        ),
    );
    assert!(ok, "forge postmaster.pid: {err}");

    cluster.nodes[0].start().unwrap();
    cluster
        .wait_healthy(HEAL_TIMEOUT)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", cluster.log_tails(40)));
    let node = &cluster.nodes[0];
    assert!(node.is_writable().await.unwrap(), "leader writable again");
    for v in &victims {
        assert_untouched(v);
    }
    assert_untouched(&v_state);
    for name in ["postgresql.conf", "pg_hba.conf", "postgresql.auto.conf"] {
        let m = std::fs::symlink_metadata(data.join(name)).unwrap();
        assert!(m.file_type().is_file(), "{name} is a file again");
        assert_eq!(m.uid(), pg.uid.as_raw(), "{name} belongs to postgres");
    }
    assert!(
        crate::support::cluster::alive(sleeper.pid() as i32),
        "the root process named in the forged postmaster.pid was signalled"
    );
}
