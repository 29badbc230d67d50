//! Throwaway certificates for TLS tests, made with the `openssl` command:
//! a CA, a server certificate for 127.0.0.1/localhost and a client
//! certificate signed by it, plus an unrelated CA that trusts neither.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, ensure};

/// PEM files in one directory (keys are PKCS#8, EC P-256).
#[derive(Clone, Debug)]
pub struct Pki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed none of the above.
    pub other_ca: PathBuf,
}

impl Pki {
    /// Generates everything into `dir` (created if missing).
    pub fn generate(dir: &Path) -> anyhow::Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let p = |name: &str| dir.join(name);
        self_signed_ca(dir, "ca", "pgha test CA")?;
        self_signed_ca(dir, "other-ca", "unrelated test CA")?;
        signed(
            dir,
            "server",
            "localhost",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
        )?;
        signed(dir, "client", "pgha", "extendedKeyUsage=clientAuth\n")?;
        Ok(Pki {
            ca: p("ca.pem"),
            server_cert: p("server.pem"),
            server_key: p("server.key"),
            client_cert: p("client.pem"),
            client_key: p("client.key"),
            other_ca: p("other-ca.pem"),
        })
    }
}

impl Pki {
    /// Another certificate and key (`<name>.pem`, `<name>.key` in `dir`,
    /// which [`generate`](Pki::generate) filled) signed by the same CA, for
    /// these IP addresses, usable by servers and clients alike.
    pub fn issue(
        dir: &Path,
        name: &str,
        ips: &[std::net::Ipv4Addr],
    ) -> anyhow::Result<(PathBuf, PathBuf)> {
        let sans: Vec<String> = ips.iter().map(|ip| format!("IP:{ip}")).collect();
        signed(
            dir,
            name,
            name,
            &format!(
                "subjectAltName={}\nextendedKeyUsage=serverAuth,clientAuth\n",
                sans.join(",")
            ),
        )?;
        Ok((
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        ))
    }
}

fn openssl(dir: &Path, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("run openssl (install it with: apt-get install openssl)")?;
    ensure!(
        out.status.success(),
        "openssl {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn self_signed_ca(dir: &Path, name: &str, cn: &str) -> anyhow::Result<()> {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    )
}

/// A key and a certificate signed by `ca`, with `extensions` (openssl
/// extension-file syntax).
fn signed(dir: &Path, name: &str, cn: &str, extensions: &str) -> anyhow::Result<()> {
    let ext = format!("{name}.ext");
    std::fs::write(dir.join(&ext), extensions)?;
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    )?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &format!("{name}.pem"),
        ],
    )
}
