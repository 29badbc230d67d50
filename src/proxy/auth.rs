//! The proxy's credential files, parsed without I/O.
//!
//! - The auth file lists SCRAM verifiers, one user a line, in pgbouncer's
//!   userlist format: `"user" "SCRAM-SHA-256$..."`. Filled from
//!   `pg_authid`, the same verifiers let the proxy log in to the servers
//!   with the keys the client's proof reveals (see `scram.rs`).
//! - The server passfile (libpq format, `host:port:database:user:password`)
//!   is the fallback for users whose server-side verifier differs.

use std::collections::HashMap;

use super::scram::ScramVerifier;
use crate::secret::SecretString;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("line {line}: {message}")]
pub struct FileError {
    pub line: usize,
    pub message: String,
}

/// User name → SCRAM verifier.
#[derive(Clone, Debug, Default)]
pub struct AuthFile {
    users: HashMap<String, ScramVerifier>,
}

impl AuthFile {
    pub fn parse(text: &str) -> Result<AuthFile, FileError> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let err = |message: &str| FileError {
                line: i + 1,
                message: message.to_string(),
            };
            let trimmed = line.trim();
            if trimmed.is_empty() || trimmed.starts_with(';') || trimmed.starts_with('#') {
                continue;
            }
            let (user, rest) =
                quoted(trimmed).ok_or_else(|| err("expected \"user\" \"verifier\""))?;
            let (secret, rest) =
                quoted(rest.trim_start()).ok_or_else(|| err("expected \"user\" \"verifier\""))?;
            if !rest.trim().is_empty() {
                return Err(err("unexpected text after the verifier"));
            }
            if user.is_empty() {
                return Err(err("empty user name"));
            }
            // Never echo the secret: the line number is enough to find it.
            let verifier = ScramVerifier::parse(&secret).map_err(|_| {
                err("the secret must be a SCRAM-SHA-256 verifier (SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>)")
            })?;
            users.insert(user, verifier);
        }
        Ok(AuthFile { users })
    }

    pub fn get(&self, user: &str) -> Option<&ScramVerifier> {
        self.users.get(user)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// `"text"` with `""` as an escaped quote; returns the text and the rest.
fn quoted(s: &str) -> Option<(String, &str)> {
    let mut chars = s.strip_prefix('"')?.char_indices();
    let body = &s[1..];
    let mut out = String::new();
    while let Some((i, c)) = chars.next() {
        if c == '"' {
            if body[i + 1..].starts_with('"') {
                out.push('"');
                chars.next();
            } else {
                return Some((out, &body[i + 1..]));
            }
        } else {
            out.push(c);
        }
    }
    None
}

/// A libpq passfile.
#[derive(Clone, Debug, Default)]
pub struct Passfile {
    entries: Vec<[String; 5]>,
}

impl Passfile {
    pub fn parse(text: &str) -> Result<Passfile, FileError> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() || line.starts_with('#') {
                continue;
            }
            let mut fields: Vec<String> = vec![String::new()];
            let mut chars = line.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            fields.last_mut().expect("non-empty").push(n);
                        }
                    }
                    ':' if fields.len() < 5 => fields.push(String::new()),
                    c => fields.last_mut().expect("non-empty").push(c),
                }
            }
            let fields: [String; 5] = fields.try_into().map_err(|_| FileError {
                line: i + 1,
                message: "expected host:port:database:user:password".into(),
            })?;
            entries.push(fields);
        }
        Ok(Passfile { entries })
    }

    /// Some entry may match `user` (by name or `*`).
    pub fn has_user(&self, user: &str) -> bool {
        self.entries.iter().any(|e| e[3] == "*" || e[3] == user)
    }

    /// The first matching entry's password, as libpq picks it.
    pub fn lookup(
        &self,
        host: &str,
        port: u16,
        database: &str,
        user: &str,
    ) -> Option<SecretString> {
        let port = port.to_string();
        let want = [host, port.as_str(), database, user];
        self.entries
            .iter()
            .find(|e| {
                e[..4]
                    .iter()
                    .zip(want)
                    .all(|(pattern, value)| pattern == "*" || pattern == value)
            })
            .map(|e| SecretString::new(e[4].clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_file_reads_pgbouncer_userlists() {
        let v = ScramVerifier::from_password("pw", b"salt", 4096).encode();
        let text =
            format!("; comment\n\n\"alice\" \"{v}\"\n  \"we\"\"ird\" \"{v}\"  \n# another\n");
        let f = AuthFile::parse(&text).unwrap();
        assert_eq!(f.len(), 2);
        assert!(f.get("alice").is_some());
        assert!(f.get("we\"ird").is_some());
        assert!(f.get("bob").is_none());
    }

    #[test]
    fn auth_file_errors_name_the_line_and_hide_the_secret() {
        let cases = [
            ("alice pw", 1),
            ("\n\"alice\" \"md5abcdef\"", 2),
            ("\"alice\" \"plain-password\"", 1),
            ("\"alice\"", 1),
            ("\"alice", 1),
            ("\"\" \"SCRAM-SHA-256$1:AA==$AA:AA\"", 1),
        ];
        for (text, line) in cases {
            let e = AuthFile::parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text}");
            assert!(!e.message.contains("plain-password"), "{e}");
        }
    }

    #[test]
    fn passfile_matches_like_libpq() {
        let f = Passfile::parse(
            "# comment\nh1:5432:db:u:first\n*:*:*:u:second\n*:*:*:we\\:ird:pa\\:ss\n",
        )
        .unwrap();
        let pw = |h, p, d, u| f.lookup(h, p, d, u).map(|s| s.expose().to_string());
        assert_eq!(pw("h1", 5432, "db", "u").as_deref(), Some("first"));
        assert_eq!(pw("h2", 5432, "db", "u").as_deref(), Some("second"));
        assert_eq!(pw("h2", 1, "x", "we:ird").as_deref(), Some("pa:ss"));
        assert_eq!(pw("h2", 1, "x", "nobody"), None);
        assert!(Passfile::parse("a:b:c:d").is_err());
    }
}
