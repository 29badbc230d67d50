//! `auth_user` / `auth_query`: a role created on the leader after the
//! proxy started logs in through it; a wrong password, an unknown user and
//! a role with an md5 secret all get PostgreSQL's
//! `28P01 password authentication failed for user "x"`.

use std::os::unix::fs::PermissionsExt;

use tokio_postgres::error::SqlState;

use crate::support::cluster::{SUPERUSER, connect};
use crate::support::proxy::Proxy;
use crate::support::{Cluster, ClusterOptions};

async fn login(proxy: &Proxy, user: &str, password: &str) -> Result<String, tokio_postgres::Error> {
    let mut cfg = proxy.config(proxy.rw_port);
    cfg.user(user).password(password);
    let (client, connection) = cfg.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let row = client.query_one("SELECT current_user::text", &[]).await?;
    Ok(row.get(0))
}

/// Asserts PostgreSQL's answer to a failed password login.
fn assert_password_failure(result: Result<String, tokio_postgres::Error>, user: &str, log: &str) {
    let err = match result {
        Ok(who) => panic!("{user} logged in (as {who})\n{log}"),
        Err(e) => e,
    };
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("{user}: not a server error: {err:#}\n{log}"));
    assert_eq!(db.code(), &SqlState::INVALID_PASSWORD, "{user}: {db:?}");
    assert_eq!(
        db.message(),
        format!("password authentication failed for user \"{user}\""),
        "{user}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auth_query_fetches_new_roles_from_the_leader() {
    let cluster = Cluster::start("pxaq", 1, ClusterOptions::default())
        .await
        .unwrap();
    let passfile = cluster.dir().join("auth-user-pgpass");
    std::fs::write(
        &passfile,
        format!("*:*:*:{SUPERUSER}:{}\n", cluster.superuser_password()),
    )
    .unwrap();
    std::fs::set_permissions(&passfile, std::fs::Permissions::from_mode(0o600)).unwrap();
    let proxy = Proxy::start(
        &cluster,
        "pxaq1",
        &[
            ("auth_user", &format!("{SUPERUSER:?}")),
            (
                "server_passfile",
                &format!("{:?}", passfile.display().to_string()),
            ),
            ("auth_cache_ttl", "\"1s\""),
        ],
    )
    .await
    .unwrap();

    // Unknown to the proxy's auth file, which was written at its start.
    let leader = cluster.leader_node().await.unwrap();
    leader
        .psql("CREATE ROLE late_alice LOGIN PASSWORD 'alice-secret-1'")
        .await
        .unwrap();
    let who = login(&proxy, "late_alice", "alice-secret-1")
        .await
        .unwrap_or_else(|e| panic!("late_alice: {e:#}\n{}", proxy.log_tail()));
    assert_eq!(who, "late_alice");

    assert_password_failure(
        login(&proxy, "late_alice", "not-her-password").await,
        "late_alice",
        &proxy.log_tail(),
    );
    assert_password_failure(
        login(&proxy, "nobody_here", "whatever").await,
        "nobody_here",
        &proxy.log_tail(),
    );

    // An md5 secret cannot be checked nor passed through: refused, logged.
    let c = connect(&leader.pg_config()).await.unwrap();
    c.batch_execute(
        "SET password_encryption = 'md5'; CREATE ROLE md5_bob LOGIN PASSWORD 'bob-secret-1'",
    )
    .await
    .unwrap();
    assert_password_failure(
        login(&proxy, "md5_bob", "bob-secret-1").await,
        "md5_bob",
        &proxy.log_tail(),
    );
    assert!(
        proxy.log_tail().contains("auth_query returned an md5 hash"),
        "{}",
        proxy.log_tail()
    );

    // A changed password is seen once the cache entry expires.
    leader
        .psql("ALTER ROLE late_alice PASSWORD 'alice-secret-2'")
        .await
        .unwrap();
    let who = crate::support::wait_until(
        std::time::Duration::from_secs(30),
        std::time::Duration::from_millis(200),
        || async { login(&proxy, "late_alice", "alice-secret-2").await.ok() },
    )
    .await
    .unwrap_or_else(|e| panic!("the new password never worked: {e:#}\n{}", proxy.log_tail()));
    assert_eq!(who, "late_alice");
}
