//! The step's pipes: its stdin fed and closed, its stdout and stderr read as one stream of
//! chunks with backpressure, and the bounded drain once the group has been killed.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::process::{ChildStderr, ChildStdin, ChildStdout};
use tokio::sync::mpsc;
use tokio::time::sleep;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Size of one read from a step's output pipe, hence the largest chunk sent to the consumer.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// After the group has been killed, stop draining the pipes once they stay silent this long.
/// Only a process that left the group (`setsid`, a daemon) can still hold them open by then;
/// everything already written is readable at once, so the bound loses no output of the group.
const DRAIN_IDLE_LIMIT: Duration = Duration::from_secs(1);

/// After the group has been killed, stop draining once this much more output arrived: what the
/// group left in the pipe buffers is far less (at most 1 MiB per pipe on Linux), so more can
/// only come from an escaped process that keeps writing.
const DRAIN_BYTE_LIMIT: usize = 4 * 1024 * 1024;

/// Writes the step's input, then closes its stdin so it sees end of file. Gives up once the
/// group is dead (nobody left to read it).
pub(super) async fn feed_stdin(
    stdin: Option<ChildStdin>,
    input: Option<Vec<u8>>,
    group_killed: &CancellationToken,
) {
    let (Some(mut pipe), Some(input)) = (stdin, input) else {
        return;
    };
    tokio::select! {
        written = pipe.write_all(&input) => {
            if let Err(error) = written {
                // Usually EPIPE: the step exited without reading all of its input.
                debug!(%error, "step stopped reading its stdin");
            }
        }
        () = group_killed.cancelled() => {}
    }
}

/// Reads both pipes until both are closed, forwarding each chunk to `output`.
///
/// Sending waits for room in the bounded channel, and no read happens meanwhile: that is the
/// backpressure. Once the group has been killed, the drain is bounded by [`DRAIN_IDLE_LIMIT`]
/// and [`DRAIN_BYTE_LIMIT`] in case a process that left the group still holds a pipe.
pub(super) async fn pump_output(
    mut pipes: MergedPipes,
    output: &mpsc::Sender<Vec<u8>>,
    group_killed: &CancellationToken,
) {
    let mut receiver_gone = false;
    let mut drained_after_kill: Option<usize> = None;
    loop {
        let chunk = tokio::select! {
            // Reads first: output that is already there always wins over the drain bound.
            biased;
            chunk = poll_fn(|cx| pipes.poll_chunk(cx)) => chunk,
            () = group_killed.cancelled(), if drained_after_kill.is_none() => {
                drained_after_kill = Some(0);
                continue;
            }
            () = sleep(DRAIN_IDLE_LIMIT), if drained_after_kill.is_some() => {
                warn!("step output held open by a process outside its group; stopped reading");
                break;
            }
        };
        let Some(chunk) = chunk else { break };
        if let Some(drained) = drained_after_kill.as_mut() {
            *drained += chunk.len();
            if *drained > DRAIN_BYTE_LIMIT {
                warn!("step output still flowing from outside its group; stopped reading");
                break;
            }
        }
        if !receiver_gone && output.send(chunk).await.is_err() {
            debug!("step output receiver dropped; discarding the rest of the output");
            receiver_gone = true;
        }
    }
}

/// A step's stdout and stderr, read as one stream of chunks.
///
/// The pipes take turns so neither can starve the other, except that after a chunk ending
/// mid-line the same pipe goes first again: when both hold data, the rest of that line then
/// follows before the other pipe's output instead of being spliced apart by it. A pipe that
/// stays readable without ending a line keeps that priority for [`MAX_PARTIAL_LINE_BYTES`].
/// (A line still in the writer's buffer, not yet in the pipe, can be split: nothing to read.)
pub(super) struct MergedPipes {
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    /// Which pipe is polled first next time.
    stderr_first: bool,
    /// Bytes read in a row from one pipe without reaching a line end or catching up.
    partial_line_bytes: usize,
    buf: Box<[u8]>,
}

/// How much output one pipe may deliver in a row while the other waits, if it ends no line.
const MAX_PARTIAL_LINE_BYTES: usize = 1024 * 1024;

impl MergedPipes {
    pub(super) fn new(stdout: Option<ChildStdout>, stderr: Option<ChildStderr>) -> Self {
        Self {
            stdout,
            stderr,
            stderr_first: false,
            partial_line_bytes: 0,
            buf: vec![0; READ_CHUNK_BYTES].into_boxed_slice(),
        }
    }

    /// The next chunk from whichever pipe has data, or `None` once both are closed.
    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Option<Vec<u8>>> {
        for from_stderr in [self.stderr_first, !self.stderr_first] {
            let chunk = if from_stderr {
                poll_pipe(&mut self.stderr, cx, &mut self.buf)
            } else {
                poll_pipe(&mut self.stdout, cx, &mut self.buf)
            };
            if let Some(chunk) = chunk {
                self.partial_line_bytes += chunk.len();
                let mid_line = chunk.last() != Some(&b'\n');
                if mid_line && self.partial_line_bytes < MAX_PARTIAL_LINE_BYTES {
                    self.stderr_first = from_stderr;
                } else {
                    self.partial_line_bytes = 0;
                    self.stderr_first = !from_stderr;
                }
                return Poll::Ready(Some(chunk));
            }
        }
        if self.stdout.is_none() && self.stderr.is_none() {
            Poll::Ready(None)
        } else {
            // Caught up with the writers: the other pipe is not being starved.
            self.partial_line_bytes = 0;
            Poll::Pending
        }
    }
}

/// Polls one pipe: `Some(data)` when it had some; `None` when it has nothing yet (a wake-up is
/// registered) or is closed, in which case the slot is emptied.
fn poll_pipe<R: AsyncRead + Unpin>(
    slot: &mut Option<R>,
    cx: &mut Context<'_>,
    buf: &mut [u8],
) -> Option<Vec<u8>> {
    let pipe = slot.as_mut()?;
    let mut read_buf = ReadBuf::new(buf);
    match Pin::new(pipe).poll_read(cx, &mut read_buf) {
        Poll::Pending => None,
        Poll::Ready(Ok(())) if read_buf.filled().is_empty() => {
            *slot = None;
            None
        }
        Poll::Ready(Ok(())) => Some(read_buf.filled().to_vec()),
        Poll::Ready(Err(error)) => {
            warn!(%error, "reading step output failed; closing that pipe");
            *slot = None;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::tests::{bash, limits_with_timeout, printed_pids, run_collect};
    use crate::process::{run, ExitStatus, Outcome, RunLimits};
    use nix::sys::signal::Signal;
    use nix::unistd::Pid;

    #[tokio::test]
    async fn output_arrives_complete_and_in_order() {
        let script = "seq 1 200000; echo to-stderr >&2";
        let (report, output) = run_collect(bash(script), RunLimits::default()).await;
        assert_eq!(
            report.expect("run").outcome,
            Outcome::Exited(ExitStatus::Code(0))
        );
        let text = String::from_utf8(output).expect("utf-8");
        let stdout: String = text.lines().filter(|line| *line != "to-stderr").fold(
            String::new(),
            |mut all, line| {
                all.push_str(line);
                all.push('\n');
                all
            },
        );
        let expected: String = (1..=200_000).map(|n| format!("{n}\n")).collect();
        assert_eq!(stdout, expected);
        assert_eq!(text.matches("to-stderr\n").count(), 1);
    }

    #[tokio::test]
    async fn stdin_is_fed_then_closed_and_null_otherwise() {
        let input: Vec<u8> = (0..1_000_000u32).map(|n| (n % 251) as u8).collect();
        let mut spec = bash("cat");
        spec.stdin = Some(input.clone());
        let (report, output) = run_collect(spec, RunLimits::default()).await;
        assert_eq!(
            report.expect("run").outcome,
            Outcome::Exited(ExitStatus::Code(0))
        );
        assert_eq!(output, input);

        let limits = limits_with_timeout(Duration::from_secs(10), Duration::from_secs(1));
        let (report, output) = run_collect(bash("cat"), limits).await;
        assert_eq!(
            report.expect("run").outcome,
            Outcome::Exited(ExitStatus::Code(0))
        );
        assert!(output.is_empty());
    }

    #[tokio::test]
    async fn slow_consumer_holds_the_step_back_without_losing_output() {
        const TOTAL: usize = 4 * 1024 * 1024;
        let (sender, mut receiver) = mpsc::channel(1);
        let script = format!("head -c {TOTAL} /dev/zero");
        let task = tokio::spawn(run(bash(&script), RunLimits::default(), sender));
        // Nothing is read: with a pipe buffer, one queued and one in-flight chunk, the step
        // must be blocked writing, far from done.
        sleep(Duration::from_millis(300)).await;
        assert!(!task.is_finished(), "step finished without a reader");
        let mut received = 0;
        while let Some(chunk) = receiver.recv().await {
            assert!(chunk.iter().all(|&byte| byte == 0));
            received += chunk.len();
            tokio::task::yield_now().await;
        }
        let report = task.await.expect("task").expect("run");
        assert_eq!(report.outcome, Outcome::Exited(ExitStatus::Code(0)));
        assert_eq!(received, TOTAL);
    }

    #[tokio::test]
    async fn dropped_receiver_does_not_block_the_step() {
        let (sender, receiver) = mpsc::channel(1);
        drop(receiver);
        let report = run(
            bash("head -c 1000000 /dev/zero"),
            RunLimits::default(),
            sender,
        )
        .await
        .expect("run");
        assert_eq!(report.outcome, Outcome::Exited(ExitStatus::Code(0)));
    }

    #[tokio::test]
    async fn drain_is_bounded_when_an_escaped_process_holds_the_pipe() {
        // `setsid` moves the sleep out of the step's group, out of reach of the orphan kill.
        let script = "setsid sleep 300 & echo \"pids: $!\"";
        let (report, output) = run_collect(bash(script), RunLimits::default()).await;
        let escaped = printed_pids(&String::from_utf8_lossy(&output));
        for &pid in &escaped {
            // The pid is this test's own (started above); it may be gone already.
            let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let report = report.expect("run");
        assert_eq!(report.outcome, Outcome::Exited(ExitStatus::Code(0)));
        assert!(
            report.duration < DRAIN_IDLE_LIMIT * 5,
            "{:?}",
            report.duration
        );
    }
}
