//! The connection limits over real sockets, with a small router: a head
//! that trickles in is cut off, idle keep-alive connections are closed
//! (but the wait for the next request does not count against the head),
//! and at the limit the oldest waiting connection makes room, unless
//! every connection is busy.

use std::sync::atomic::AtomicUsize;

use axum::routing::get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Semaphore;

use super::*;

fn limits(header_ms: u64, idle_ms: u64, max: usize) -> ApiLimits {
    ApiLimits {
        header_read_timeout: Duration::from_millis(header_ms),
        body_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_millis(idle_ms),
        max_connections: max,
    }
}

/// `/` answers at once; `/slow` waits for a permit of `gate`.
struct Server {
    addr: SocketAddr,
    registry: Arc<Registry>,
    gate: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
}

async fn start(limits: ApiLimits) -> Server {
    let gate = Arc::new(Semaphore::new(0));
    let waiting = Arc::new(AtomicUsize::new(0));
    let (g, w) = (gate.clone(), waiting.clone());
    let router = Router::new().route("/", get(|| async { "ok" })).route(
        "/slow",
        get(move || async move {
            w.fetch_add(1, Ordering::SeqCst);
            g.acquire().await.unwrap().forget();
            "slow"
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let registry = Arc::new(Registry::new(limits.max_connections));
    tokio::spawn(serve(listener, None, router, limits, registry.clone()));
    Server {
        addr,
        registry,
        gate,
        waiting,
    }
}

const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n";

/// Reads one response (head plus `Content-Length` body) and returns it.
async fn response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let text = String::from_utf8_lossy(&buf).to_string();
        if let Some(end) = text.find("\r\n\r\n") {
            let len = text[..end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length: ")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk))
            .await
            .expect("a response within 5 s")
            .unwrap();
        assert!(n > 0, "closed before a whole response: {text:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// How long until the server closes `s` (bytes read meanwhile are
/// returned too); `None` if it stays open for `within`.
async fn closed_after(s: &mut TcpStream, within: Duration) -> Option<(Duration, Vec<u8>)> {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        let left = within.checked_sub(start.elapsed())?;
        match tokio::time::timeout(left, s.read(&mut chunk)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some((start.elapsed(), got)),
            Ok(Ok(n)) => got.extend_from_slice(&chunk[..n]),
        }
    }
}

async fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

#[tokio::test]
async fn a_head_must_arrive_within_the_header_timeout() {
    let srv = start(limits(400, 10_000, 64)).await;
    // A complete head is served.
    let mut s = connect(srv.addr).await;
    s.write_all(GET).await.unwrap();
    assert!(response(&mut s).await.starts_with("HTTP/1.1 200"));

    // Silent from the start: closed, without an answer, once the timeout
    // has passed (and not before).
    let mut silent = connect(srv.addr).await;
    let (after, bytes) = closed_after(&mut silent, Duration::from_secs(5))
        .await
        .expect("a silent connection is closed");
    assert!(
        after >= Duration::from_millis(300),
        "closed after {after:?}"
    );
    assert!(bytes.is_empty());

    // Trickling: a header line every 100 ms does not extend the deadline.
    let mut slow = connect(srv.addr).await;
    slow.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
    let start = Instant::now();
    let mut closed = false;
    while start.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if slow.write_all(b"X-Slow: 1\r\n").await.is_err() {
            closed = true;
            break;
        }
        if let Some((_, bytes)) = closed_after(&mut slow, Duration::from_millis(1)).await {
            assert!(bytes.is_empty(), "{bytes:?}");
            closed = true;
            break;
        }
    }
    assert!(closed, "a trickling head was never cut off");
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "{:?}",
        start.elapsed()
    );
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        srv.registry.len(),
        1,
        "only the kept-alive connection is left"
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    // The head timeout is shorter than the pauses between requests: the
    // wait for the next request is idle time, not head time.
    let srv = start(limits(300, 1500, 64)).await;
    let mut s = connect(srv.addr).await;
    for _ in 0..3 {
        s.write_all(GET).await.unwrap();
        assert!(response(&mut s).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let (after, bytes) = closed_after(&mut s, Duration::from_secs(5))
        .await
        .expect("an idle connection is closed");
    assert!(bytes.is_empty());
    // 600 ms of the idle time had passed already.
    assert!(
        after >= Duration::from_millis(700),
        "closed after {after:?}"
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(srv.registry.len(), 0);
}

#[tokio::test]
async fn at_the_limit_the_longest_waiting_connection_makes_room() {
    let srv = start(limits(30_000, 30_000, 4)).await;
    let mut waiting = Vec::new();
    for _ in 0..4 {
        waiting.push(connect(srv.addr).await);
        // Distinct ages, so the oldest is well defined.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while srv.registry.len() < 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut check = connect(srv.addr).await;
    check.write_all(GET).await.unwrap();
    assert!(response(&mut check).await.starts_with("HTTP/1.1 200"));
    assert!(
        closed_after(&mut waiting[0], Duration::from_secs(2))
            .await
            .is_some(),
        "the oldest connection was not closed"
    );
    for (i, s) in waiting.iter_mut().enumerate().skip(1) {
        assert!(
            closed_after(s, Duration::from_millis(100)).await.is_none(),
            "connection {i} was closed"
        );
    }
    assert!(srv.registry.len() <= 4);
}

#[tokio::test]
async fn at_the_limit_with_every_connection_busy_a_newcomer_is_closed() {
    let srv = start(limits(30_000, 30_000, 4)).await;
    let mut busy = Vec::new();
    for _ in 0..4 {
        let mut s = connect(srv.addr).await;
        s.write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        busy.push(s);
    }
    while srv.waiting.load(Ordering::SeqCst) < 4 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut late = connect(srv.addr).await;
    let _ = late.write_all(GET).await;
    let (_, bytes) = closed_after(&mut late, Duration::from_secs(2))
        .await
        .expect("a newcomer is closed when nothing can make room");
    assert!(bytes.is_empty(), "{}", String::from_utf8_lossy(&bytes));
    // Requests in progress are never cut off for a newcomer.
    srv.gate.add_permits(4);
    for s in &mut busy {
        assert!(response(s).await.ends_with("slow"));
    }
    let mut again = connect(srv.addr).await;
    again.write_all(GET).await.unwrap();
    assert!(response(&mut again).await.starts_with("HTTP/1.1 200"));
}
