//! Running `pgha backup unpack-replica` for [`super::Instance::restore_from_backup`]
//! (and `unpack-bootstrap` for [`super::Instance::restore_for_bootstrap`])
//! while the agent's log shows how far it is: the command writes progress
//! lines on its standard error ([`crate::backup::progress::PREFIX`]), and
//! they are relayed at info level as they come. A replica's restore runs
//! in a background job, never in the HA loop itself; the bootstrap's runs
//! in the loop, which has nothing else to do before the cluster exists
//! (see `docs/backup.md`).

use tokio::io::{AsyncBufReadExt, AsyncReadExt};
use tokio::process::Command;

use super::ctl::{PgError, io};

/// Longer lines are cut (and the rest read as another line).
const MAX_LINE: u64 = 8 << 10;
/// Standard error lines other than progress kept for the error message.
const KEPT_LINES: usize = 40;
/// Standard output kept (the report is one short line).
const MAX_OUTPUT: u64 = 64 << 10;

/// Runs `cmd` (both outputs piped) to its end, relaying its progress lines
/// into the log. Keeps the last [`KEPT_LINES`] of its other standard error
/// lines for the error message and returns its standard output; memory
/// stays bounded whatever the command writes. `tool` and `action` name
/// the command in errors, `doing` in the progress lines' log message.
pub(super) async fn run(
    mut cmd: Command,
    tool: &str,
    action: &str,
    doing: &str,
) -> Result<String, PgError> {
    let mut child = cmd.spawn().map_err(io(format!("run {tool} to {action}")))?;
    let stdout = child.stdout.take().expect("piped");
    let stderr = child.stderr.take().expect("piped");
    let out = async {
        let mut kept = Vec::new();
        let mut stdout = stdout.take(MAX_OUTPUT);
        stdout.read_to_end(&mut kept).await?;
        tokio::io::copy(&mut stdout.into_inner(), &mut tokio::io::sink()).await?;
        Ok::<_, std::io::Error>(kept)
    };
    let err = async {
        let mut reader = tokio::io::BufReader::new(stderr);
        let mut kept = std::collections::VecDeque::with_capacity(KEPT_LINES);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut reader)
                .take(MAX_LINE)
                .read_until(b'\n', &mut line)
                .await?;
            if n == 0 {
                break;
            }
            let text = String::from_utf8_lossy(&line);
            match crate::backup::progress::parse_line(&text) {
                Some(progress) => {
                    tracing::info!(%progress, "{doing}");
                }
                None if text.trim().is_empty() => {}
                None => {
                    if kept.len() == KEPT_LINES {
                        kept.pop_front();
                    }
                    kept.push_back(text.trim().to_string());
                }
            }
        }
        Ok::<_, std::io::Error>(kept)
    };
    let (out, err) = tokio::join!(out, err);
    let status = child
        .wait()
        .await
        .map_err(io(format!("wait for {tool} to {action}")))?;
    let read = || io(format!("read the output of {tool}"));
    let out = out.map_err(read())?;
    let err = err.map_err(read())?;
    if !status.success() {
        return Err(PgError::Tool {
            tool: tool.into(),
            action: action.into(),
            status: status.to_string(),
            stderr: Vec::from(err).join("\n"),
        });
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing::instrument::WithSubscriber;

    use super::*;

    /// The log lines written while `fut` runs, and its result.
    async fn logged<T>(fut: impl Future<Output = T>) -> (T, String) {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let result = fut.with_subscriber(subscriber).await;
        let text = String::from_utf8_lossy(&buf.0.lock().unwrap()).into_owned();
        (result, text)
    }

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        cmd
    }

    #[tokio::test]
    async fn progress_is_logged_and_the_report_returned() {
        let script = r#"
            echo "progress: backup b1: unpacked 0 B of 2.0 MiB (0%), 0s elapsed" >&2
            echo "2026-01-31T02:00:00Z  WARN pgha: something else" >&2
            echo "progress: backup b1: unpacked 2.0 MiB of 2.0 MiB (100%), done" >&2
            echo '{"backup":"b1"}'
        "#;
        let (result, log) = logged(run(
            sh(script),
            "sh",
            "test",
            "restoring a backup for this replica",
        ))
        .await;
        assert_eq!(result.unwrap(), "{\"backup\":\"b1\"}\n");
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 2, "{log}");
        assert!(
            lines[0].contains("INFO")
                && lines[0].contains("restoring a backup for this replica")
                && lines[0]
                    .ends_with("progress=backup b1: unpacked 0 B of 2.0 MiB (0%), 0s elapsed"),
            "{log}"
        );
        assert!(lines[1].ends_with("(100%), done"), "{log}");
    }

    #[tokio::test]
    async fn a_failure_carries_the_last_other_lines_only() {
        // Progress interleaved with 100 other lines, a line longer than
        // MAX_LINE, then the error; plenty of standard output.
        let script = format!(
            r#"
            i=0
            while [ $i -lt 100 ]; do
                echo "progress: $i" >&2
                echo "line $i" >&2
                i=$((i + 1))
            done
            head -c {} /dev/zero | tr '\0' x >&2
            echo >&2
            head -c 1000000 /dev/zero
            echo "error: corrupt object" >&2
            exit 3
            "#,
            MAX_LINE + 10
        );
        let (result, log) = logged(run(
            sh(&script),
            "sh",
            "test",
            "restoring a backup for this replica",
        ))
        .await;
        let Err(PgError::Tool { status, stderr, .. }) = result else {
            panic!("{result:?}");
        };
        assert!(status.contains('3'), "{status}");
        let kept: Vec<&str> = stderr.lines().collect();
        assert_eq!(kept.len(), KEPT_LINES, "{stderr}");
        assert_eq!(kept.last(), Some(&"error: corrupt object"));
        // The long line came as two, both kept; the oldest lines went.
        assert_eq!(kept[KEPT_LINES - 2], "x".repeat(10));
        assert_eq!(kept[KEPT_LINES - 3], "x".repeat(MAX_LINE as usize));
        assert_eq!(kept[0], format!("line {}", 100 - (KEPT_LINES - 3)));
        assert!(!stderr.contains("progress"), "{stderr}");
        assert_eq!(log.lines().count(), 100, "{log}");
    }
}
