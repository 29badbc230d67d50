//! Named prepared statements across server connections (transaction
//! pooling), without I/O.
//!
//! A client's `Parse` of a named statement is remembered under the
//! client's name and sent to servers under a name derived from its content
//! (query text and parameter types), so that every server connection
//! holds at most one copy of each statement and any client may use it.
//! Before a `Bind` or `Describe` of a statement the current server lacks,
//! the proxy sends the `Parse` itself and hides its `ParseComplete` from
//! the client; that bookkeeping lives in `session.rs`.

use bytes::{BufMut, Bytes, BytesMut};
use sha2::{Digest, Sha256};

use super::codec::cstr;

/// Prefix of the statement names the proxy uses on servers.
pub const SERVER_PREFIX: &str = "pgha_";

/// A client's Parse, as the proxy replays it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Statement {
    /// The name on servers: content-derived.
    pub server_name: String,
    /// The whole Parse frame under `server_name`.
    pub parse: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseMsg<'a> {
    pub name: String,
    pub query: String,
    /// Parameter types and anything after them, unchanged.
    pub rest: &'a [u8],
}

pub fn parse_parse(body: &[u8]) -> Option<ParseMsg<'_>> {
    let mut b = body;
    let name = cstr(&mut b)?;
    let query = cstr(&mut b)?;
    Some(ParseMsg {
        name,
        query,
        rest: b,
    })
}

/// The content-derived server name of a statement.
pub fn server_name(query: &str, rest: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(query.as_bytes());
    h.update([0]);
    h.update(rest);
    let digest = h.finalize();
    let mut name = String::from(SERVER_PREFIX);
    for b in &digest[..12] {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

fn frame(tag: u8, body: impl FnOnce(&mut BytesMut)) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(tag);
    out.put_i32(0);
    body(&mut out);
    let len = (out.len() - 1) as i32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out.freeze()
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// The statement a named client Parse becomes.
pub fn statement(msg: &ParseMsg<'_>) -> Statement {
    let server_name = server_name(&msg.query, msg.rest);
    let parse = frame(b'P', |b| {
        put_cstr(b, &server_name);
        put_cstr(b, &msg.query);
        b.put_slice(msg.rest);
    });
    Statement { server_name, parse }
}

/// `Bind`: portal, then statement name, then the rest (formats,
/// parameters), borrowed from the frame: Bind is on every transaction's
/// path, so it is read without allocating.
pub fn bind_statement(body: &[u8]) -> Option<(&str, &str, &[u8])> {
    let mut b = body;
    let portal = cstr_ref(&mut b)?;
    let stmt = cstr_ref(&mut b)?;
    Some((portal, stmt, b))
}

/// Appends a Bind of `stmt` to `out`, the rest unchanged.
pub fn write_bind(out: &mut BytesMut, portal: &str, stmt: &str, rest: &[u8]) {
    let len = 4 + portal.len() + 1 + stmt.len() + 1 + rest.len();
    out.reserve(1 + len);
    out.put_u8(b'B');
    out.put_i32(len as i32);
    put_cstr(out, portal);
    put_cstr(out, stmt);
    out.put_slice(rest);
}

/// A NUL-terminated UTF-8 string off the front of `buf`, borrowed.
fn cstr_ref<'a>(buf: &mut &'a [u8]) -> Option<&'a str> {
    let end = buf.iter().position(|&b| b == 0)?;
    let s = std::str::from_utf8(&buf[..end]).ok()?;
    *buf = &buf[end + 1..];
    Some(s)
}

/// `Describe` and `Close`: a kind byte ('S' statement, 'P' portal) and a name.
pub fn target(body: &[u8]) -> Option<(u8, String)> {
    let (&kind, mut rest) = body.split_first()?;
    let name = cstr(&mut rest)?;
    rest.is_empty().then_some((kind, name))
}

pub fn rebuild_target(tag: u8, kind: u8, name: &str) -> Bytes {
    frame(tag, |b| {
        b.put_u8(kind);
        put_cstr(b, name);
    })
}

/// Whether a simple query (its text, without the terminating NUL) may
/// drop every prepared statement of the server (`DISCARD ALL`,
/// `DEALLOCATE [PREPARE] ALL`), so the proxy must forget them before it
/// forwards anything after it.
///
/// Every `;`-separated part is checked, after its leading whitespace and
/// comments. This is a text check, not a parser: a `;` inside a literal
/// can make it answer yes for a query that drops nothing (one needless
/// re-`Parse`), and a `;` inside a comment, or a comment between the
/// keywords, can make it miss one. What it misses, the server's own
/// answer ([`completes_drop_all`]) catches for every later batch; only a
/// `Bind` pipelined behind such a query, before that answer, can fail.
pub fn drops_all_statements(query: &[u8]) -> bool {
    query.split(|&b| b == b';').any(|part| {
        let mut words = skip_comments(part)
            .split(|b| b.is_ascii_whitespace())
            .filter(|w| !w.is_empty());
        let mut next = || words.next().unwrap_or_default();
        let (first, second) = (next(), next());
        let is = |w: &[u8], keyword: &str| w.eq_ignore_ascii_case(keyword.as_bytes());
        (is(first, "discard") && is(second, "all"))
            || (is(first, "deallocate")
                && (is(second, "all") || (is(second, "prepare") && is(next(), "all"))))
    })
}

/// `text` after its leading whitespace and `--` / `/* */` comments.
fn skip_comments(mut text: &[u8]) -> &[u8] {
    loop {
        text = text.trim_ascii_start();
        if let Some(rest) = text.strip_prefix(b"--") {
            let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            text = &rest[end..];
        } else if let Some(rest) = text.strip_prefix(b"/*") {
            let end = rest.windows(2).position(|w| w == b"*/");
            text = end.map_or(&[][..], |e| &rest[e + 2..]);
        } else {
            return text;
        }
    }
}

/// Whether a server's message (a whole frame) is an ErrorResponse about a
/// missing prepared statement (SQLSTATE 26000): the proxy's idea of what
/// that server holds was wrong (dropped in a way it could not see), so it
/// must forget it all rather than fail every later `Bind` of that
/// statement there. Errors are rare: parsing one here costs nothing that
/// matters.
pub fn reports_missing_statement(frame: &[u8]) -> bool {
    use postgres_protocol::message::backend::Message;
    match Message::parse(&mut BytesMut::from(frame)) {
        Ok(Some(Message::ErrorResponse(body))) => super::server::error_fields(&body).0 == "26000",
        _ => false,
    }
}

/// Whether a server's CommandComplete body says every prepared statement
/// was dropped: the authoritative check behind [`drops_all_statements`].
pub fn completes_drop_all(body: &[u8]) -> bool {
    body == b"DISCARD ALL\0" || body == b"DEALLOCATE ALL\0"
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::frontend;

    fn body(f: &[u8]) -> &[u8] {
        &f[5..]
    }

    #[test]
    fn parse_is_renamed_by_content() {
        let mut out = BytesMut::new();
        frontend::parse("P_1", "select $1", [23], &mut out).unwrap();
        let msg = parse_parse(body(&out)).unwrap();
        assert_eq!(msg.name, "P_1");
        assert_eq!(msg.query, "select $1");
        let st = statement(&msg);
        assert!(st.server_name.starts_with(SERVER_PREFIX));
        assert_eq!(st.server_name.len(), SERVER_PREFIX.len() + 24);

        // The rewritten frame is the same Parse under the server name.
        let mut want = BytesMut::new();
        frontend::parse(&st.server_name, "select $1", [23], &mut want).unwrap();
        assert_eq!(&st.parse[..], &want[..]);

        // Same content under another client name: same server name.
        let mut other = BytesMut::new();
        frontend::parse("stmt_b", "select $1", [23], &mut other).unwrap();
        assert_eq!(statement(&parse_parse(body(&other)).unwrap()), st);

        // Other parameter types: another statement.
        let mut typed = BytesMut::new();
        frontend::parse("P_1", "select $1", [25], &mut typed).unwrap();
        assert_ne!(
            statement(&parse_parse(body(&typed)).unwrap()).server_name,
            st.server_name
        );
    }

    #[test]
    fn bind_describe_close_are_rewritten() {
        let mut out = BytesMut::new();
        frontend::bind(
            "portal",
            "P_1",
            [1i16],
            [Some(&b"42"[..])],
            |v, buf| {
                buf.put_slice(v.unwrap());
                Ok(postgres_protocol::IsNull::No)
            },
            [0i16],
            &mut out,
        )
        .map_err(|_| ())
        .unwrap();
        let (portal, stmt, rest) = bind_statement(body(&out)).unwrap();
        assert_eq!((portal, stmt), ("portal", "P_1"));
        let mut rebuilt = BytesMut::from(&b"prefix"[..]);
        write_bind(&mut rebuilt, portal, "pgha_x", rest);
        let rebuilt = rebuilt.split_off(6);
        let len = i32::from_be_bytes([rebuilt[1], rebuilt[2], rebuilt[3], rebuilt[4]]);
        assert_eq!(len as usize + 1, rebuilt.len());
        let (_, stmt2, rest2) = bind_statement(&rebuilt[5..]).unwrap();
        assert_eq!(stmt2, "pgha_x");
        assert_eq!(rest2, rest);

        let mut d = BytesMut::new();
        frontend::describe(b'S', "P_1", &mut d).unwrap();
        assert_eq!(target(body(&d)), Some((b'S', "P_1".to_string())));
        let mut want = BytesMut::new();
        frontend::describe(b'S', "pgha_x", &mut want).unwrap();
        assert_eq!(&rebuild_target(b'D', b'S', "pgha_x")[..], &want[..]);
        assert_eq!(target(b"S"), None);
        assert_eq!(parse_parse(b"no terminator"), None);
    }

    #[test]
    fn discard_all_is_recognised() {
        for (q, want) in [
            ("DISCARD ALL", true),
            ("  discard   all;", true),
            ("deallocate all", true),
            ("DEALLOCATE PREPARE ALL", true),
            ("discard plans", false),
            ("deallocate p1", false),
            ("select 'discard all'", false),
            ("select 1; discard all", true),
            ("/* pool reset */ DISCARD ALL", true),
            ("-- reset\n  deallocate all", true),
            ("/* unterminated discard all", false),
            ("deallocate prepare p1", false),
            ("", false),
            (";;", false),
        ] {
            assert_eq!(drops_all_statements(q.as_bytes()), want, "{q}");
        }
    }

    #[test]
    fn a_missing_statement_is_read_from_the_error_code() {
        let error = |code: &str| {
            let mut out = BytesMut::new();
            crate::proxy::codec::error_response(
                &mut out,
                crate::proxy::codec::Severity::Error,
                code,
                "prepared statement \"pgha_1\" does not exist",
            );
            out
        };
        assert!(reports_missing_statement(&error("26000")));
        assert!(!reports_missing_statement(&error("42P01")));
        // A notice with the same code, a truncated frame, no frame.
        let mut notice = error("26000");
        notice[0] = b'N';
        assert!(!reports_missing_statement(&notice));
        assert!(!reports_missing_statement(&error("26000")[..8]));
        assert!(!reports_missing_statement(b""));
    }

    #[test]
    fn a_drop_all_is_read_from_the_command_tag() {
        assert!(completes_drop_all(b"DISCARD ALL\0"));
        assert!(completes_drop_all(b"DEALLOCATE ALL\0"));
        assert!(!completes_drop_all(b"DEALLOCATE\0"));
        assert!(!completes_drop_all(b"DISCARD PLANS\0"));
        assert!(!completes_drop_all(b"SELECT 1\0"));
    }
}
