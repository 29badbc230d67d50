//! Who may call what.
//!
//! - Reads (`GET`, `HEAD`, `OPTIONS`) are public unless
//!   `api.public_read = false`.
//! - Everything else (actions) needs HTTP basic auth with
//!   `api.username` / `api.password`, or `Authorization: Bearer <api.token>`.
//! - With no credentials configured, actions are refused (403) with a
//!   message that says how to configure them: secure by default.
//!
//! Credentials are compared in constant time (`subtle`); the clear text is
//! never logged or echoed.

use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine;
use subtle::ConstantTimeEq;

use crate::config::ApiConfig;
use crate::secret::SecretString;

/// The credentials the API accepts, from `[api]`.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    pub basic: Option<(String, SecretString)>,
    pub token: Option<SecretString>,
    pub public_read: bool,
}

impl Credentials {
    pub fn from_config(api: &ApiConfig) -> Self {
        Credentials {
            basic: api.basic_auth.clone(),
            token: api.token.clone(),
            public_read: api.public_read,
        }
    }

    fn configured(&self) -> bool {
        self.basic.is_some() || self.token.is_some()
    }

    /// Whether an `Authorization` header value proves one of the
    /// configured credentials.
    fn accepts(&self, authorization: &str) -> bool {
        let Some((scheme, rest)) = authorization.trim().split_once(' ') else {
            return false;
        };
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let Some((user, password)) = &self.basic else {
                return false;
            };
            let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(rest) else {
                return false;
            };
            let Some(colon) = decoded.iter().position(|&b| b == b':') else {
                return false;
            };
            let (u, p) = (&decoded[..colon], &decoded[colon + 1..]);
            // Both compared, whatever the first result, so that timing
            // does not tell a right user name from a wrong one.
            let ok = u.ct_eq(user.as_bytes()) & p.ct_eq(password.expose().as_bytes());
            bool::from(ok)
        } else if scheme.eq_ignore_ascii_case("bearer") {
            let Some(token) = &self.token else {
                return false;
            };
            bool::from(rest.as_bytes().ct_eq(token.expose().as_bytes()))
        } else {
            false
        }
    }
}

/// What a request may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Action,
}

impl Access {
    pub fn of(method: &Method) -> Access {
        if method == Method::GET || method == Method::HEAD || method == Method::OPTIONS {
            Access::Read
        } else {
            Access::Action
        }
    }
}

/// The outcome of the credentials check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    /// 401: missing or wrong credentials; the challenge lists the schemes.
    Unauthorized {
        challenges: Vec<&'static str>,
    },
    /// 403: nothing is configured that could ever allow this request.
    Forbidden(&'static str),
}

pub const NO_CREDENTIALS_FOR_ACTIONS: &str = "actions are disabled because no API credentials are configured: set api.username and api.password (HTTP basic auth) or api.token (Authorization: Bearer) in the node's configuration file and restart the agent";
pub const NO_CREDENTIALS_FOR_READS: &str = "api.public_read is false but no API credentials are configured: set api.username and api.password or api.token, or set api.public_read = true";

/// The pure decision: may a request with this `Authorization` header
/// (if any) get this kind of access?
pub fn check(creds: &Credentials, access: Access, authorization: Option<&str>) -> Verdict {
    if access == Access::Read && creds.public_read {
        return Verdict::Allowed;
    }
    if !creds.configured() {
        return Verdict::Forbidden(match access {
            Access::Read => NO_CREDENTIALS_FOR_READS,
            Access::Action => NO_CREDENTIALS_FOR_ACTIONS,
        });
    }
    if authorization.is_some_and(|a| creds.accepts(a)) {
        return Verdict::Allowed;
    }
    let mut challenges = Vec::new();
    if creds.basic.is_some() {
        challenges.push(r#"Basic realm="pgha", charset="UTF-8""#);
    }
    if creds.token.is_some() {
        challenges.push(r#"Bearer realm="pgha""#);
    }
    Verdict::Unauthorized { challenges }
}

fn authorization(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

/// Middleware: answers 401/403 before the handler (and before the body
/// is read) when the credentials do not allow the request.
pub async fn require(
    State(creds): State<std::sync::Arc<Credentials>>,
    req: Request,
    next: Next,
) -> Response {
    let access = Access::of(req.method());
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<super::server::PeerAddr>>()
        .map(|c| c.0.0.to_string())
        .unwrap_or_default();
    match check(&creds, access, authorization(req.headers())) {
        Verdict::Allowed => next.run(req).await,
        Verdict::Forbidden(message) => {
            tracing::warn!(%peer, method = %req.method(), path = %req.uri().path(), "refused API request: no credentials configured");
            super::json_error(StatusCode::FORBIDDEN, message)
        }
        Verdict::Unauthorized { challenges } => {
            tracing::warn!(%peer, method = %req.method(), path = %req.uri().path(), "refused API request: missing or wrong credentials");
            let mut resp = super::json_error(
                StatusCode::UNAUTHORIZED,
                "authentication required: use HTTP basic auth or Authorization: Bearer <token>",
            )
            .into_response();
            for c in challenges {
                resp.headers_mut()
                    .append(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
            }
            resp
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(basic: bool, token: bool, public_read: bool) -> Credentials {
        Credentials {
            basic: basic.then(|| ("admin".to_string(), SecretString::new("s3cret-pass"))),
            token: token.then(|| SecretString::new("0123456789abcdef-token")),
            public_read,
        }
    }

    fn basic(user: &str, pass: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    }

    #[test]
    fn reads_are_public_by_default() {
        for c in [creds(false, false, true), creds(true, true, true)] {
            assert_eq!(check(&c, Access::Read, None), Verdict::Allowed);
            assert_eq!(
                check(&c, Access::Read, Some("Bearer wrong")),
                Verdict::Allowed
            );
        }
    }

    #[test]
    fn actions_without_configured_credentials_are_forbidden() {
        let c = creds(false, false, true);
        assert_eq!(
            check(&c, Access::Action, Some(&basic("admin", "s3cret-pass"))),
            Verdict::Forbidden(NO_CREDENTIALS_FOR_ACTIONS)
        );
        assert!(NO_CREDENTIALS_FOR_ACTIONS.contains("api.token"));
        let c = creds(false, false, false);
        assert_eq!(
            check(&c, Access::Read, None),
            Verdict::Forbidden(NO_CREDENTIALS_FOR_READS)
        );
    }

    #[test]
    fn basic_and_bearer() {
        let c = creds(true, true, false);
        for access in [Access::Read, Access::Action] {
            assert_eq!(
                check(&c, access, Some(&basic("admin", "s3cret-pass"))),
                Verdict::Allowed
            );
            assert_eq!(
                check(&c, access, Some("Bearer 0123456789abcdef-token")),
                Verdict::Allowed
            );
            assert_eq!(
                check(&c, access, Some("bearer   0123456789abcdef-token ")),
                Verdict::Allowed
            );
            for wrong in [
                basic("admin", "s3cret-pas"),
                basic("admin", "s3cret-pass2"),
                basic("Admin", "s3cret-pass"),
                basic("", ""),
                "Basic not-base64!".to_string(),
                "Basic YWRtaW4=".to_string(), // "admin", no colon
                "Bearer 0123456789abcdef-toke".to_string(),
                "Bearer".to_string(),
                "Token 0123456789abcdef-token".to_string(),
                String::new(),
            ] {
                let v = check(&c, access, Some(&wrong));
                assert!(
                    matches!(v, Verdict::Unauthorized { ref challenges } if challenges.len() == 2),
                    "{wrong:?}: {v:?}"
                );
            }
            assert!(matches!(
                check(&c, access, None),
                Verdict::Unauthorized { .. }
            ));
        }
    }

    #[test]
    fn a_scheme_that_is_not_configured_never_matches() {
        let only_token = creds(false, true, true);
        assert_eq!(
            check(
                &only_token,
                Access::Action,
                Some(&basic("admin", "s3cret-pass"))
            ),
            Verdict::Unauthorized {
                challenges: vec![r#"Bearer realm="pgha""#]
            }
        );
        let only_basic = creds(true, false, true);
        assert!(matches!(
            check(
                &only_basic,
                Access::Action,
                Some("Bearer 0123456789abcdef-token")
            ),
            Verdict::Unauthorized { .. }
        ));
    }

    #[test]
    fn methods() {
        assert_eq!(Access::of(&Method::GET), Access::Read);
        assert_eq!(Access::of(&Method::HEAD), Access::Read);
        assert_eq!(Access::of(&Method::OPTIONS), Access::Read);
        for m in [Method::POST, Method::PATCH, Method::PUT, Method::DELETE] {
            assert_eq!(Access::of(&m), Access::Action);
        }
    }
}
