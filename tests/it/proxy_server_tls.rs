//! The proxy's TLS towards the servers (`server_tls`) against a real
//! PostgreSQL with `ssl = on` and a throwaway CA: `verify-full` with the
//! right CA encrypts (as `pg_stat_ssl` shows), with a wrong CA it refuses
//! the server, until the CA file is replaced and the proxy gets SIGHUP; a
//! client certificate is shown to the server (`pg_stat_ssl.client_dn`);
//! once the server stops offering TLS, `require` refuses it and `prefer`
//! goes on in plain text.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use crate::support::cluster::connect;
use crate::support::proxy::Proxy;
use crate::support::{Cluster, ClusterOptions, Pki, TestDir, wait_until};

/// Whether the server backend that serves this proxy connection is on
/// TLS, and the subject of the client certificate it was shown, if any.
async fn backend_tls(proxy: &Proxy) -> anyhow::Result<(bool, Option<String>)> {
    let c = connect(&proxy.config(proxy.rw_port)).await?;
    let row = c
        .query_one(
            "SELECT ssl, client_dn FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

async fn backend_ssl(proxy: &Proxy) -> anyhow::Result<bool> {
    Ok(backend_tls(proxy).await?.0)
}

/// The error a client gets through `proxy` (login or first query).
async fn client_error(proxy: &Proxy) -> String {
    let attempt = async {
        let c = connect(&proxy.config(proxy.rw_port)).await?;
        c.query_one("SELECT 1", &[]).await?;
        anyhow::Ok(())
    };
    match attempt.await {
        Ok(()) => panic!("a client got through\n{}", proxy.log_tail()),
        Err(e) => format!("{e:#}"),
    }
}

fn tls_proxy_keys<'a>(mode: &'a str, ca: Option<&'a str>) -> Vec<(&'a str, &'a str)> {
    let mut keys = vec![("server_tls", mode)];
    if let Some(ca) = ca {
        keys.push(("server_tls_ca", ca));
    }
    keys
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_tls_verifies_the_certificate_and_refuses_plain_servers() {
    let pki_dir = TestDir::new("pxstls-pki");
    let pki = Pki::generate(&pki_dir.subdir("pki")).unwrap();
    // PostgreSQL wants its key owned by the user it runs as, mode 0600.
    let pg_key = pki_dir.path().join("pg-server.key");
    std::fs::copy(&pki.server_key, &pg_key).unwrap();
    let uid = Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .unwrap();
    let uid: u32 = String::from_utf8_lossy(&uid.stdout).trim().parse().unwrap();
    std::os::unix::fs::chown(&pg_key, Some(uid), None).unwrap();
    std::fs::set_permissions(&pg_key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let quoted = |p: &std::path::Path| format!("{:?}", p.display().to_string());
    let cluster = Cluster::start(
        "pxstls",
        1,
        ClusterOptions::default()
            .parameter("ssl", "\"on\"")
            .parameter("ssl_cert_file", &quoted(&pki.server_cert))
            .parameter("ssl_key_file", &quoted(&pg_key))
            // The server asks for a client certificate and checks it
            // against the CA (pg_hba.conf does not require one).
            .parameter("ssl_ca_file", &quoted(&pki.ca)),
    )
    .await
    .unwrap();
    let ca = quoted(&pki.ca);

    // The right CA and the member's address (127.0.0.1, in the
    // certificate's names): the server connection is encrypted.
    let good = Proxy::start(
        &cluster,
        "pxvfull",
        &tls_proxy_keys("\"verify-full\"", Some(&ca)),
    )
    .await
    .unwrap();
    assert!(
        backend_ssl(&good).await.unwrap(),
        "verify-full: the proxy's server connection is not encrypted"
    );
    assert_eq!(
        backend_tls(&good).await.unwrap().1,
        None,
        "no client certificate configured, none shown"
    );
    // So is the default's (prefer) while the server offers TLS.
    let preferring = Proxy::start(&cluster, "pxpref1", &[]).await.unwrap();
    assert!(backend_ssl(&preferring).await.unwrap());

    // A client certificate, shown to the server that asks for one.
    let (client_cert, client_key) = (quoted(&pki.client_cert), quoted(&pki.client_key));
    let mut keys = tls_proxy_keys("\"verify-full\"", Some(&ca));
    keys.push(("server_tls_certificate", &client_cert));
    keys.push(("server_tls_key", &client_key));
    let with_cert = Proxy::start(&cluster, "pxcert", &keys).await.unwrap();
    let (_, dn) = backend_tls(&with_cert).await.unwrap();
    assert!(
        dn.as_deref().is_some_and(|dn| dn.contains("CN=pgha")),
        "the server saw client_dn {dn:?}"
    );

    // A CA that did not sign the server's certificate, in a file that is
    // replaced with the right CA later.
    let rotating = pki_dir.path().join("rotating-ca.pem");
    std::fs::copy(&pki.other_ca, &rotating).unwrap();
    let rotating_ca = quoted(&rotating);
    let wrong = Proxy::spawn(
        &cluster,
        "pxwrongca",
        &tls_proxy_keys("\"verify-full\"", Some(&rotating_ca)),
    )
    .await
    .unwrap();
    let err = client_error(&wrong).await;
    assert!(
        err.contains("TLS handshake failed") && err.contains("certificate"),
        "{err}"
    );
    assert!(
        wrong.log_tail().contains("cannot open a server connection"),
        "the refusal is not logged:\n{}",
        wrong.log_tail()
    );
    // The operator puts the right CA in place and sends SIGHUP: the same
    // proxy process now trusts the server.
    std::fs::copy(&pki.ca, &rotating).unwrap();
    wrong.signal(nix::sys::signal::Signal::SIGHUP).unwrap();
    wait_until(
        Duration::from_secs(20),
        Duration::from_millis(200),
        || async { backend_ssl(&wrong).await.ok().filter(|ssl| *ssl) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", wrong.log_tail()));

    // The server stops offering TLS.
    let leader = cluster.leader_node().await.unwrap();
    leader.psql("ALTER SYSTEM SET ssl = off").await.unwrap();
    leader.psql("SELECT pg_reload_conf()").await.unwrap();
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(200),
        || async { (leader.scalar("SHOW ssl").await.ok()?? == "off").then_some(()) },
    )
    .await
    .unwrap();

    let requiring = Proxy::spawn(&cluster, "pxrequire", &tls_proxy_keys("\"require\"", None))
        .await
        .unwrap();
    let err = client_error(&requiring).await;
    assert!(
        err.contains("does not accept TLS") && err.contains("server_tls = \"require\""),
        "{err}"
    );
    assert!(
        requiring
            .log_tail()
            .contains("cannot open a server connection"),
        "{}",
        requiring.log_tail()
    );
    let plain = Proxy::start(&cluster, "pxpref2", &[]).await.unwrap();
    assert!(
        !backend_ssl(&plain).await.unwrap(),
        "prefer against a server without TLS"
    );
}
