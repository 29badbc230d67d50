//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as pure state machines: the proxy
//! as a server towards its clients (checking a proof against a stored
//! verifier), and as a client towards PostgreSQL with the keys it
//! recovered from the client's proof instead of a password.
//!
//! Nonces are passed in, so the tests replay recorded exchanges.
//!
//! Why the pass-through works: a client's proof is `ClientKey XOR
//! HMAC(StoredKey, AuthMessage)`. Knowing `StoredKey` (from the verifier)
//! the proxy recovers `ClientKey`, checks `H(ClientKey) == StoredKey`, and
//! can then answer any server's challenge for the same verifier (same
//! salt and iteration count, i.e. a verifier copied from `pg_authid`)
//! without ever knowing the password. pgbouncer does the same.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// What PostgreSQL stores for a SCRAM user (`pg_authid.rolpassword`).
#[derive(Clone, PartialEq, Eq)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    // A verifier is as sensitive as a password hash: never logged.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(***)")
    }
}

/// The keys a verified client handed over, enough to log in to a server
/// that stores the same verifier.
#[derive(Clone, PartialEq, Eq)]
pub struct ScramKeys {
    pub client_key: [u8; 32],
    pub server_key: [u8; 32],
}

impl std::fmt::Debug for ScramKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramKeys(***)")
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScramError {
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    #[error("SCRAM channel binding is not supported")]
    ChannelBinding,
    /// The proof does not match: a wrong password.
    #[error("SCRAM proof does not match")]
    BadProof,
    #[error("the server's SCRAM signature does not match")]
    BadServerSignature,
    #[error("the server sent a SCRAM error: {0}")]
    ServerError(String),
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts any key size");
    mac.update(data);
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// PBKDF2-HMAC-SHA-256 with one block (RFC 5802's `Hi`).
fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut salt1 = salt.to_vec();
    salt1.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &salt1);
    let mut out = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        for (o, b) in out.iter_mut().zip(u) {
            *o ^= b;
        }
    }
    out
}

impl ScramVerifier {
    /// Parses `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(text: &str) -> Result<ScramVerifier, ScramError> {
        let bad = ScramError::Malformed;
        let rest = text
            .strip_prefix("SCRAM-SHA-256$")
            .ok_or(bad("a verifier starts with SCRAM-SHA-256$"))?;
        let (params, keys) = rest.split_once('$').ok_or(bad("verifier has no keys"))?;
        let (iterations, salt) = params.split_once(':').ok_or(bad("verifier has no salt"))?;
        let (stored, server) = keys
            .split_once(':')
            .ok_or(bad("verifier has no ServerKey"))?;
        let iterations: u32 = iterations
            .parse()
            .ok()
            .filter(|&i| i > 0)
            .ok_or(bad("verifier iteration count"))?;
        let salt = STANDARD.decode(salt).map_err(|_| bad("verifier salt"))?;
        let key = |s: &str| -> Result<[u8; 32], ScramError> {
            STANDARD
                .decode(s)
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v).ok())
                .ok_or(bad("verifier key"))
        };
        Ok(ScramVerifier {
            iterations,
            salt,
            stored_key: key(stored)?,
            server_key: key(server)?,
        })
    }

    /// The verifier PostgreSQL would store for `password` with this salt
    /// (no SASLprep: ASCII passwords only, which is what tests and the
    /// demo use).
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> ScramVerifier {
        let salted = hi(password.as_bytes(), salt, iterations);
        let client_key = hmac(&salted, b"Client Key");
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&client_key),
            server_key: hmac(&salted, b"Server Key"),
        }
    }

    /// The text form, as in `pg_authid` and the auth file.
    pub fn encode(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            STANDARD.encode(&self.salt),
            STANDARD.encode(self.stored_key),
            STANDARD.encode(self.server_key)
        )
    }
}

/// The server side of one exchange.
pub struct ScramServer<'v> {
    verifier: &'v ScramVerifier,
    server_nonce: String,
    state: ServerState,
}

enum ServerState {
    First,
    Final {
        client_first_bare: String,
        server_first: String,
        gs2_header: String,
        nonce: String,
    },
    Done,
}

impl<'v> ScramServer<'v> {
    /// `server_nonce`: printable characters other than ','; the caller
    /// makes it random.
    pub fn new(verifier: &'v ScramVerifier, server_nonce: String) -> Self {
        ScramServer {
            verifier,
            server_nonce,
            state: ServerState::First,
        }
    }

    /// Takes the client-first message, returns the server-first message.
    pub fn client_first(&mut self, message: &[u8]) -> Result<String, ScramError> {
        let bad = ScramError::Malformed;
        let ServerState::First = self.state else {
            return Err(bad("unexpected client-first message"));
        };
        let text = std::str::from_utf8(message).map_err(|_| bad("not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let (flag, rest) = text.split_once(',').ok_or(bad("no GS2 header"))?;
        match flag {
            "n" | "y" => {}
            f if f.starts_with("p=") => return Err(ScramError::ChannelBinding),
            _ => return Err(bad("GS2 channel-binding flag")),
        }
        let (authzid, bare) = rest.split_once(',').ok_or(bad("no GS2 header"))?;
        if !authzid.is_empty() {
            return Err(bad("authorization identities are not supported"));
        }
        let gs2_header = format!("{flag},{authzid},");
        // client-first-bare: "n=" user "," "r=" nonce ["," extensions]
        let mut parts = bare.split(',');
        if !parts.next().is_some_and(|p| p.starts_with("n=")) {
            return Err(bad("no user name attribute"));
        }
        let client_nonce = parts
            .next()
            .and_then(|p| p.strip_prefix("r="))
            .filter(|n| !n.is_empty())
            .ok_or(bad("no client nonce"))?;
        let nonce = format!("{client_nonce}{}", self.server_nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            STANDARD.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        self.state = ServerState::Final {
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            gs2_header,
            nonce,
        };
        Ok(server_first)
    }

    /// Takes the client-final message. On a correct proof returns the
    /// server-final message and the client's keys.
    pub fn client_final(&mut self, message: &[u8]) -> Result<(String, ScramKeys), ScramError> {
        let bad = ScramError::Malformed;
        let ServerState::Final {
            client_first_bare,
            server_first,
            gs2_header,
            nonce,
        } = std::mem::replace(&mut self.state, ServerState::Done)
        else {
            return Err(bad("unexpected client-final message"));
        };
        let text = std::str::from_utf8(message).map_err(|_| bad("not UTF-8"))?;
        let (without_proof, proof) = text.rsplit_once(",p=").ok_or(bad("no proof"))?;
        let mut parts = without_proof.split(',');
        let cbind = parts
            .next()
            .and_then(|p| p.strip_prefix("c="))
            .ok_or(bad("no channel binding attribute"))?;
        if STANDARD.decode(cbind).ok().as_deref() != Some(gs2_header.as_bytes()) {
            return Err(ScramError::ChannelBinding);
        }
        if parts.next().and_then(|p| p.strip_prefix("r=")) != Some(nonce.as_str()) {
            return Err(bad("nonce does not match"));
        }
        let proof: [u8; 32] = STANDARD
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(bad("proof"))?;
        let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
        let signature = hmac(&self.verifier.stored_key, auth_message.as_bytes());
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(signature) {
            *k ^= s;
        }
        if !bool::from(sha256(&client_key).ct_eq(&self.verifier.stored_key)) {
            return Err(ScramError::BadProof);
        }
        let server_signature = hmac(&self.verifier.server_key, auth_message.as_bytes());
        Ok((
            format!("v={}", STANDARD.encode(server_signature)),
            ScramKeys {
                client_key,
                server_key: self.verifier.server_key,
            },
        ))
    }
}

/// The client side of one exchange, with keys instead of a password.
pub struct ScramKeysClient {
    keys: ScramKeys,
    client_nonce: String,
    auth_message: Option<String>,
}

impl ScramKeysClient {
    pub fn new(keys: ScramKeys, client_nonce: String) -> Self {
        ScramKeysClient {
            keys,
            client_nonce,
            auth_message: None,
        }
    }

    /// The client-first message (PostgreSQL ignores the user name here).
    pub fn client_first(&self) -> String {
        format!("n,,n=,r={}", self.client_nonce)
    }

    /// Takes the server-first message, returns the client-final message.
    pub fn server_first(&mut self, message: &[u8]) -> Result<String, ScramError> {
        let bad = ScramError::Malformed;
        let text = std::str::from_utf8(message).map_err(|_| bad("not UTF-8"))?;
        let nonce = text
            .split(',')
            .next()
            .and_then(|p| p.strip_prefix("r="))
            .ok_or(bad("no server nonce"))?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() {
            return Err(bad("server nonce does not extend ours"));
        }
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = format!("n=,r={},{text},{without_proof}", self.client_nonce);
        let stored_key = sha256(&self.keys.client_key);
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let mut proof = self.keys.client_key;
        for (p, s) in proof.iter_mut().zip(signature) {
            *p ^= s;
        }
        self.auth_message = Some(auth_message);
        Ok(format!("{without_proof},p={}", STANDARD.encode(proof)))
    }

    /// Checks the server-final message: the server proves it knows the
    /// verifier too.
    pub fn server_final(&self, message: &[u8]) -> Result<(), ScramError> {
        let bad = ScramError::Malformed;
        let text = std::str::from_utf8(message).map_err(|_| bad("not UTF-8"))?;
        if let Some(e) = text.strip_prefix("e=") {
            return Err(ScramError::ServerError(e.to_string()));
        }
        let signature = text
            .strip_prefix("v=")
            .and_then(|v| STANDARD.decode(v).ok())
            .ok_or(bad("no server signature"))?;
        let auth_message = self
            .auth_message
            .as_ref()
            .ok_or(bad("unexpected server-final message"))?;
        let expected = hmac(&self.keys.server_key, auth_message.as_bytes());
        if bool::from(expected.as_slice().ct_eq(&signature)) {
            Ok(())
        } else {
            Err(ScramError::BadServerSignature)
        }
    }
}

/// A random nonce of printable characters without ','.
pub fn random_nonce() -> String {
    let bytes: [u8; 18] = rand::random();
    STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7677 section 3: user "user", password "pencil".
    const CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_verifier() -> ScramVerifier {
        let salt = STANDARD.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        ScramVerifier::from_password("pencil", &salt, 4096)
    }

    #[test]
    fn server_replays_the_rfc_exchange() {
        let v = rfc_verifier();
        let mut server = ScramServer::new(&v, SERVER_NONCE.into());
        assert_eq!(
            server.client_first(CLIENT_FIRST.as_bytes()).unwrap(),
            SERVER_FIRST
        );
        let (server_final, keys) = server.client_final(CLIENT_FINAL.as_bytes()).unwrap();
        assert_eq!(server_final, SERVER_FINAL);
        assert_eq!(sha256(&keys.client_key), v.stored_key);
    }

    #[test]
    fn wrong_proof_is_refused() {
        let v = ScramVerifier::from_password("other", &[1, 2, 3], 4096);
        let mut server = ScramServer::new(&v, SERVER_NONCE.into());
        server.client_first(CLIENT_FIRST.as_bytes()).unwrap();
        // The nonce matches but the proof was made with "pencil".
        assert_eq!(
            server.client_final(CLIENT_FINAL.as_bytes()).unwrap_err(),
            ScramError::BadProof
        );
    }

    #[test]
    fn malformed_messages_are_errors_not_panics() {
        let v = rfc_verifier();
        let firsts: &[&[u8]] = &[
            b"",
            b"n",
            b"n,,",
            b"x,,n=u,r=abc",
            b"n,a=admin,n=u,r=abc",
            b"n,,r=abc",
            b"n,,n=u",
            b"n,,n=u,r=",
            b"\xff\xfe",
        ];
        for msg in firsts {
            let mut server = ScramServer::new(&v, "s".into());
            assert!(server.client_first(msg).is_err(), "{msg:?}");
        }
        assert_eq!(
            ScramServer::new(&v, "s".into())
                .client_first(b"p=tls-server-end-point,,n=u,r=a")
                .unwrap_err(),
            ScramError::ChannelBinding
        );
        let finals: &[&[u8]] = &[
            b"",
            b"c=biws",
            b"c=biws,r=abcs,p=",
            b"c=biws,r=wrong,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            b"c=eSws,r=abcs,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
            b"c=biws,r=abcs,p=AAAA",
        ];
        for msg in finals {
            let mut server = ScramServer::new(&v, "s".into());
            server.client_first(b"n,,n=u,r=abc").unwrap();
            assert!(server.client_final(msg).is_err(), "{msg:?}");
        }
        // Out of order.
        let mut server = ScramServer::new(&v, "s".into());
        assert!(server.client_final(CLIENT_FINAL.as_bytes()).is_err());
    }

    #[test]
    fn keys_client_logs_in_where_the_password_would() {
        // The proxy verifies a client, then logs in to a "server" with the
        // same verifier using the recovered keys.
        let v = rfc_verifier();
        let mut front = ScramServer::new(&v, SERVER_NONCE.into());
        front.client_first(CLIENT_FIRST.as_bytes()).unwrap();
        let (_, keys) = front.client_final(CLIENT_FINAL.as_bytes()).unwrap();

        let mut client = ScramKeysClient::new(keys, "proxynonce".into());
        let mut back = ScramServer::new(&v, "servernonce".into());
        let server_first = back.client_first(client.client_first().as_bytes()).unwrap();
        let client_final = client.server_first(server_first.as_bytes()).unwrap();
        let (server_final, _) = back.client_final(client_final.as_bytes()).unwrap();
        client.server_final(server_final.as_bytes()).unwrap();

        // A server with another verifier (another salt) refuses it.
        let other = ScramVerifier::from_password("pencil", b"another salt", 4096);
        let mut back = ScramServer::new(&other, "n2".into());
        let mut client = ScramKeysClient::new(
            ScramKeys {
                client_key: [0; 32],
                server_key: [0; 32],
            },
            "c2".into(),
        );
        let sf = back.client_first(client.client_first().as_bytes()).unwrap();
        let cf = client.server_first(sf.as_bytes()).unwrap();
        assert_eq!(
            back.client_final(cf.as_bytes()).unwrap_err(),
            ScramError::BadProof
        );
    }

    #[test]
    fn verifier_text_round_trips_and_matches_postgres() {
        let v = rfc_verifier();
        assert_eq!(ScramVerifier::parse(&v.encode()).unwrap(), v);
        // What postgres-protocol (the same algorithm as PostgreSQL's
        // server) produces verifies against our server.
        let text = postgres_protocol::password::scram_sha_256(b"secret");
        let v = ScramVerifier::parse(&text).unwrap();
        assert_eq!(
            ScramVerifier::from_password("secret", &v.salt, v.iterations),
            v
        );
        for bad in [
            "",
            "md5abc",
            "SCRAM-SHA-256$4096:c2FsdA==",
            "SCRAM-SHA-256$0:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$x:c2FsdA==$AAAA:AAAA",
            "SCRAM-SHA-256$4096:c2FsdA==$AAAA:AAAA",
        ] {
            assert!(ScramVerifier::parse(bad).is_err(), "{bad}");
        }
    }
}
