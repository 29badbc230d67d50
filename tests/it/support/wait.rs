//! Polling with a deadline, for conditions that become true "soon".

use std::future::Future;
use std::panic::Location;
use std::time::{Duration, Instant};

/// Polls `probe` every `poll_interval` until it returns `Some`, and returns
/// that value; fails once `timeout` has passed. The error names the
/// caller's source line, so a timed-out wait points at the condition that
/// never held. The probe is always run at least once, and once more after
/// the deadline, so a slow probe cannot make the wait fail without having
/// looked.
#[track_caller]
pub fn wait_until<T, F, Fut>(
    timeout: Duration,
    poll_interval: Duration,
    mut probe: F,
) -> impl Future<Output = anyhow::Result<T>>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let caller = Location::caller();
    async move {
        let start = Instant::now();
        let mut attempts = 0u32;
        loop {
            let past_deadline = start.elapsed() >= timeout;
            attempts += 1;
            if let Some(value) = probe().await {
                return Ok(value);
            }
            if past_deadline {
                anyhow::bail!(
                    "wait_until at {caller}: condition still false after {:?} ({attempts} attempts, timeout {timeout:?})",
                    start.elapsed()
                );
            }
            tokio::time::sleep(poll_interval).await;
        }
    }
}
