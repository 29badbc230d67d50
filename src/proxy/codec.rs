//! Wire framing, without I/O: splitting a byte buffer into PostgreSQL
//! messages (both directions share the `type byte + i32 length` frame,
//! except the client's first, untyped, startup packet), and building the
//! few backend messages the proxy writes itself. Parsing what servers send
//! is left to `postgres_protocol::message::backend`; building what the
//! proxy sends to servers to `postgres_protocol::message::frontend`.

use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Largest startup packet accepted: PostgreSQL's own limit is 10 000
/// bytes; a generous cap keeps a garbage length from reserving memory.
pub const MAX_STARTUP_LEN: usize = 1 << 20;

pub const PROTOCOL_3: i32 = 196_608;
pub const CANCEL_REQUEST: i32 = 80_877_102;
pub const SSL_REQUEST: i32 = 80_877_103;
pub const GSSENC_REQUEST: i32 = 80_877_104;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("invalid message length {0}")]
    BadLength(i64),
    #[error("message of {len} bytes exceeds the limit of {max}")]
    TooLong { len: usize, max: usize },
}

/// One complete message: its type byte and the whole frame (type, length
/// and body), ready to forward unchanged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub tag: u8,
    pub raw: Bytes,
}

impl Frame {
    /// The body, after type and length.
    pub fn body(&self) -> &[u8] {
        &self.raw[5..]
    }
}

/// Takes one typed message off the front of `buf`, if complete. Checks the
/// declared length before the body arrives, so an oversized length fails
/// at once instead of buffering.
pub fn split_frame(buf: &mut BytesMut, max: usize) -> Result<Option<Frame>, FrameError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(FrameError::BadLength(len.into()));
    }
    let total = len as usize + 1;
    if total > max {
        return Err(FrameError::TooLong { len: total, max });
    }
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let raw = buf.split_to(total).freeze();
    Ok(Some(Frame { tag: raw[0], raw }))
}

/// Takes the untyped startup-phase packet (length, then a code or
/// protocol version and the body) off `buf`, if complete.
pub fn split_startup(buf: &mut BytesMut) -> Result<Option<Startup>, FrameError> {
    if buf.len() < 4 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if len < 8 {
        return Err(FrameError::BadLength(len.into()));
    }
    let len = len as usize;
    if len > MAX_STARTUP_LEN {
        return Err(FrameError::TooLong {
            len,
            max: MAX_STARTUP_LEN,
        });
    }
    if buf.len() < len {
        return Ok(None);
    }
    let mut packet = buf.split_to(len);
    packet.advance(4);
    let code = packet.get_i32();
    Ok(Some(match code {
        SSL_REQUEST => Startup::Ssl,
        GSSENC_REQUEST => Startup::GssEnc,
        CANCEL_REQUEST if packet.len() == 8 => Startup::Cancel {
            process_id: packet.get_i32(),
            secret_key: packet.get_i32(),
        },
        PROTOCOL_3 => Startup::Startup(parse_parameters(&packet)?),
        other => Startup::UnsupportedVersion(other),
    }))
}

/// What a client opened with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Startup {
    Ssl,
    GssEnc,
    Cancel { process_id: i32, secret_key: i32 },
    Startup(Vec<(String, String)>),
    UnsupportedVersion(i32),
}

fn parse_parameters(mut body: &[u8]) -> Result<Vec<(String, String)>, FrameError> {
    let bad = || FrameError::BadLength(-1);
    let mut out = Vec::new();
    loop {
        let name = cstr(&mut body).ok_or_else(bad)?;
        if name.is_empty() {
            break;
        }
        let value = cstr(&mut body).ok_or_else(bad)?;
        out.push((name, value));
    }
    if !body.is_empty() {
        return Err(bad());
    }
    Ok(out)
}

/// Reads a NUL-terminated UTF-8 string off the front of `buf`.
pub fn cstr(buf: &mut &[u8]) -> Option<String> {
    let end = buf.iter().position(|&b| b == 0)?;
    let s = std::str::from_utf8(&buf[..end]).ok()?.to_string();
    *buf = &buf[end + 1..];
    Some(s)
}

fn message(out: &mut BytesMut, tag: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(tag);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn put_cstr(out: &mut BytesMut, s: &str) {
    out.put_slice(s.as_bytes());
    out.put_u8(0);
}

/// Severity of an error the proxy reports itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

/// An ErrorResponse like PostgreSQL's: severity (localized and not), code,
/// message.
pub fn error_response(out: &mut BytesMut, severity: Severity, code: &str, text: &str) {
    let sev = match severity {
        Severity::Error => "ERROR",
        Severity::Fatal => "FATAL",
    };
    message(out, b'E', |b| {
        for (field, value) in [(b'S', sev), (b'V', sev), (b'C', code), (b'M', text)] {
            b.put_u8(field);
            put_cstr(b, value);
        }
        b.put_u8(0);
    });
}

pub fn auth_sasl(out: &mut BytesMut) {
    message(out, b'R', |b| {
        b.put_i32(10);
        put_cstr(b, "SCRAM-SHA-256");
        b.put_u8(0);
    });
}

pub fn auth_sasl_continue(out: &mut BytesMut, data: &[u8]) {
    message(out, b'R', |b| {
        b.put_i32(11);
        b.put_slice(data);
    });
}

pub fn auth_sasl_final(out: &mut BytesMut, data: &[u8]) {
    message(out, b'R', |b| {
        b.put_i32(12);
        b.put_slice(data);
    });
}

pub fn auth_ok(out: &mut BytesMut) {
    message(out, b'R', |b| b.put_i32(0));
}

pub fn parameter_status(out: &mut BytesMut, name: &str, value: &str) {
    message(out, b'S', |b| {
        put_cstr(b, name);
        put_cstr(b, value);
    });
}

pub fn backend_key_data(out: &mut BytesMut, process_id: i32, secret_key: i32) {
    message(out, b'K', |b| {
        b.put_i32(process_id);
        b.put_i32(secret_key);
    });
}

pub fn ready_for_query(out: &mut BytesMut, status: u8) {
    message(out, b'Z', |b| b.put_u8(status));
}

pub fn parse_complete(out: &mut BytesMut) {
    message(out, b'1', |_| {});
}

/// Reads the SASL mechanism and initial data of a SASLInitialResponse.
pub fn sasl_initial_response(body: &[u8]) -> Option<(String, &[u8])> {
    let mut rest = body;
    let mechanism = cstr(&mut rest)?;
    if rest.len() < 4 {
        return None;
    }
    let len = i32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
    let data = &rest[4..];
    (len >= 0 && len as usize == data.len()).then_some((mechanism, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_only_when_complete() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(b"Q\0\0\0\x09SEL");
        assert_eq!(split_frame(&mut buf, 100).unwrap(), None);
        buf.extend_from_slice(b"1\0X\0\0");
        let f = split_frame(&mut buf, 100).unwrap().unwrap();
        assert_eq!(f.tag, b'Q');
        assert_eq!(f.body(), b"SEL1\0");
        assert_eq!(&buf[..], b"X\0\0");
        buf.extend_from_slice(b"\0\x04");
        assert_eq!(split_frame(&mut buf, 100).unwrap().unwrap().body(), b"");
        assert!(buf.is_empty());
    }

    #[test]
    fn bad_lengths_fail_before_the_body_arrives() {
        for (bytes, err) in [
            (&b"Q\0\0\0\x03"[..], FrameError::BadLength(3)),
            (&b"Q\xff\xff\xff\xff"[..], FrameError::BadLength(-1)),
            (
                &b"Q\0\x10\0\0"[..],
                FrameError::TooLong {
                    len: 0x10_0001,
                    max: 1000,
                },
            ),
        ] {
            let mut buf = BytesMut::from(bytes);
            assert_eq!(split_frame(&mut buf, 1000).unwrap_err(), err);
        }
    }

    #[test]
    fn startup_packets() {
        let mut out = BytesMut::new();
        postgres_protocol::message::frontend::startup_message(
            [("user", "alice"), ("database", "db")],
            &mut out,
        )
        .unwrap();
        postgres_protocol::message::frontend::ssl_request(&mut out);
        postgres_protocol::message::frontend::cancel_request(7, 9, &mut out);
        out.extend_from_slice(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30]);
        out.extend_from_slice(&[0, 0, 0, 8, 0, 2, 0, 0]);
        let mut got = Vec::new();
        while let Some(s) = split_startup(&mut out).unwrap() {
            got.push(s);
        }
        assert_eq!(
            got,
            vec![
                Startup::Startup(vec![
                    ("user".into(), "alice".into()),
                    ("database".into(), "db".into())
                ]),
                Startup::Ssl,
                Startup::Cancel {
                    process_id: 7,
                    secret_key: 9
                },
                Startup::GssEnc,
                Startup::UnsupportedVersion(0x20000),
            ]
        );
    }

    #[test]
    fn garbage_startup_is_an_error() {
        for bytes in [
            &b"\0\0\0\x02"[..],
            &b"\xff\xff\xff\xff"[..],
            &b"\x7f\0\0\0"[..],
            // Protocol 3 with an unterminated parameter.
            &b"\0\0\0\x0c\0\x03\0\0user"[..],
        ] {
            let mut buf = BytesMut::from(bytes);
            assert!(split_startup(&mut buf).is_err(), "{bytes:?}");
        }
    }

    #[test]
    fn built_messages_parse_with_postgres_protocol() {
        use postgres_protocol::message::backend::Message;
        let mut out = BytesMut::new();
        error_response(&mut out, Severity::Fatal, "28P01", "nope");
        backend_key_data(&mut out, 1, 2);
        ready_for_query(&mut out, b'I');
        match Message::parse(&mut out).unwrap().unwrap() {
            Message::ErrorResponse(body) => {
                use fallible_iterator::FallibleIterator;
                let fields: Vec<(u8, String)> = body
                    .fields()
                    .map(|f| {
                        Ok((
                            f.type_(),
                            String::from_utf8_lossy(f.value_bytes()).into_owned(),
                        ))
                    })
                    .collect()
                    .unwrap();
                assert!(fields.contains(&(b'C', "28P01".into())));
                assert!(fields.contains(&(b'M', "nope".into())));
            }
            _ => panic!("not an error"),
        }
        assert!(matches!(
            Message::parse(&mut out).unwrap().unwrap(),
            Message::BackendKeyData(k) if k.process_id() == 1 && k.secret_key() == 2
        ));
        assert!(matches!(
            Message::parse(&mut out).unwrap().unwrap(),
            Message::ReadyForQuery(r) if r.status() == b'I'
        ));
    }
}
