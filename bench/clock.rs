//! One time base for the whole run: milliseconds since the bench started,
//! on the monotonic clock, so that write acknowledgements, injected events
//! and status polls can be compared directly.

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();

/// Milliseconds since the first call (call it early in `main`).
pub fn now_ms() -> f64 {
    START.get_or_init(Instant::now).elapsed().as_secs_f64() * 1000.0
}

/// A progress line on stderr (stdout is reserved for the JSON report).
pub fn log(msg: &str) {
    eprintln!("[{:8.1}s] {msg}", now_ms() / 1000.0);
}
