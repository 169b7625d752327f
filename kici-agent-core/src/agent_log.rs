//! `agent.log`: the agent's own log lines streamed to the orchestrator (protocol.md §4.2, §6.2),
//! which echoes them to its stdout.
//!
//! - [`layer`] is a `tracing` layer the host installs next to its own output (the binary does;
//!   embedders may). It writes every event, as one JSON line (`timestamp`, `level`, `message`,
//!   `service:"agent"`, `target`, the event's fields), into the buffer of every live agent of the
//!   process. Nothing is collected while no agent exists. `TRACE` records are never streamed
//!   (one is logged per frame sent, which would feed itself).
//! - Each agent keeps a ring of [`RING_LINES`] lines (oldest dropped first, counted) and sends
//!   them in `agent.log` batches of up to [`BATCH_LINES`] lines, after [`BATCH_LINGER`] unless a
//!   batch is full, on the outbox's lowest-priority telemetry lane (never ahead of a status or a
//!   job log line, under the same pacer). At most [`BATCHES_IN_FLIGHT`] batches wait in the
//!   outbox; the rest wait in the ring, where overflow is counted.
//! - While not registered the lines stay in the ring. On registration, if lines were buffered or
//!   dropped meanwhile, one gap marker line goes first:
//!   `--- Orchestrator offline for <S>s. Replaying <L> buffered log lines.` plus
//!   ` <n> log lines dropped due to buffer overflow.` when lines were lost, then ` ---`. (The Node
//!   agent also counts its buffered events there; this agent's outbox replays those itself.)

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::Layer;

use crate::outbox::Outbox;
use crate::protocol::{new_message_id, now_ms, AgentLog, Outbound};

/// Lines per `agent.log` message, at most.
pub const BATCH_LINES: usize = 50;
/// How long a line waits for others to share its message.
pub const BATCH_LINGER: Duration = Duration::from_millis(100);
/// Lines held per agent (while offline or behind a slow link); the oldest go first.
pub const RING_LINES: usize = 10_000;
/// Recent lines kept for the diagnostics bundle, sent or not.
pub const RECENT_LINES: usize = 2_000;
/// `agent.log` messages allowed to wait in the outbox at once.
pub const BATCHES_IN_FLIGHT: usize = 4;

/// The buffers of the live agents of this process.
fn sinks() -> &'static Mutex<Vec<Weak<AgentLogBuffer>>> {
    static SINKS: OnceLock<Mutex<Vec<Weak<AgentLogBuffer>>>> = OnceLock::new();
    SINKS.get_or_init(|| Mutex::new(Vec::new()))
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

/// The layer that feeds every live agent's `agent.log` stream.
pub fn layer() -> AgentLogLayer {
    AgentLogLayer { _private: () }
}

/// See [`layer`].
#[derive(Debug)]
pub struct AgentLogLayer {
    _private: (),
}

/// Collects an event's fields.
struct Fields(Map<String, Value>);

impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let mut text = String::new();
        let _ = write!(text, "{value:?}");
        self.0.insert(field.name().to_owned(), Value::String(text));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().to_owned(), Value::from(value));
    }
}

impl<S: Subscriber> Layer<S> for AgentLogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        // Trace records include one per frame sent: streaming them would feed itself.
        if *event.metadata().level() == tracing::Level::TRACE {
            return;
        }
        let live: Vec<Arc<AgentLogBuffer>> = {
            let mut sinks = lock(sinks());
            sinks.retain(|sink| sink.strong_count() > 0);
            sinks.iter().filter_map(Weak::upgrade).collect()
        };
        if live.is_empty() {
            return;
        }
        let mut fields = Fields(Map::new());
        event.record(&mut fields);
        let mut record = Map::new();
        record.insert(
            "timestamp".into(),
            Value::from(chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        );
        record.insert(
            "level".into(),
            Value::from(event.metadata().level().as_str().to_ascii_lowercase()),
        );
        record.insert(
            "message".into(),
            fields.0.remove("message").unwrap_or(Value::from("")),
        );
        record.insert("service".into(), Value::from("agent"));
        record.insert("target".into(), Value::from(event.metadata().target()));
        record.extend(fields.0);
        let line = Value::Object(record).to_string();
        for sink in live {
            sink.push(line.clone());
        }
    }
}

#[derive(Default)]
struct Ring {
    lines: VecDeque<String>,
    /// When the first line now waiting arrived (the batch linger starts there).
    oldest_at: Option<Instant>,
    dropped: u64,
    registered: bool,
    /// Since when the agent is not registered; `None` while registered.
    offline_since: Option<Instant>,
    /// Lines buffered while not registered, for the gap marker.
    buffered_offline: u64,
    /// The last [`RECENT_LINES`] lines, for the diagnostics bundle.
    recent: VecDeque<String>,
}

/// One agent's `agent.log` ring.
pub(crate) struct AgentLogBuffer {
    ring: Mutex<Ring>,
    changed: Notify,
}

impl AgentLogBuffer {
    /// A ring fed by [`layer`] from now on, for as long as the returned handle lives.
    pub(crate) fn register() -> Arc<Self> {
        let buffer = Arc::new(AgentLogBuffer {
            ring: Mutex::new(Ring {
                offline_since: Some(Instant::now()),
                ..Ring::default()
            }),
            changed: Notify::new(),
        });
        lock(sinks()).push(Arc::downgrade(&buffer));
        buffer
    }

    fn push(&self, line: String) {
        let mut ring = lock(&self.ring);
        if ring.lines.len() >= RING_LINES {
            ring.lines.pop_front();
            ring.dropped += 1;
        }
        if ring.recent.len() >= RECENT_LINES {
            ring.recent.pop_front();
        }
        ring.recent.push_back(line.clone());
        ring.lines.push_back(line);
        ring.oldest_at.get_or_insert_with(Instant::now);
        if !ring.registered {
            ring.buffered_offline += 1;
        }
        drop(ring);
        self.changed.notify_one();
    }

    /// The connection registered: lines may go, behind a gap marker when any waited or were lost.
    pub(crate) fn registered(&self) {
        let mut ring = lock(&self.ring);
        ring.registered = true;
        if let Some(since) = ring.offline_since.take() {
            let buffered = ring.buffered_offline.min(ring.lines.len() as u64);
            if buffered > 0 || ring.dropped > 0 {
                let mut marker = format!(
                    "--- Orchestrator offline for {}s. Replaying {buffered} buffered log lines.",
                    since.elapsed().as_secs()
                );
                if ring.dropped > 0 {
                    let _ = write!(
                        marker,
                        " {} log lines dropped due to buffer overflow.",
                        ring.dropped
                    );
                }
                marker.push_str(" ---");
                ring.lines.push_front(marker);
                ring.oldest_at = Some(Instant::now() - BATCH_LINGER);
            }
            ring.buffered_offline = 0;
            ring.dropped = 0;
        }
        drop(ring);
        self.changed.notify_one();
    }

    /// The most recent lines, oldest first (for the diagnostics bundle).
    pub(crate) fn recent(&self) -> Vec<String> {
        lock(&self.ring).recent.iter().cloned().collect()
    }

    /// The connection was lost: lines stay in the ring until the next registration.
    pub(crate) fn disconnected(&self) {
        let mut ring = lock(&self.ring);
        ring.registered = false;
        ring.offline_since.get_or_insert_with(Instant::now);
    }

    /// The next batch if one may go now, else how long to wait (`None`: until woken).
    fn take_batch(&self) -> Result<Vec<String>, Option<Duration>> {
        let mut ring = lock(&self.ring);
        if !ring.registered || ring.lines.is_empty() {
            return Err(None);
        }
        let age = ring.oldest_at.map_or(BATCH_LINGER, |at| at.elapsed());
        if ring.lines.len() < BATCH_LINES && age < BATCH_LINGER {
            return Err(Some(BATCH_LINGER - age));
        }
        let take = ring.lines.len().min(BATCH_LINES);
        let batch: Vec<String> = ring.lines.drain(..take).collect();
        ring.oldest_at = (!ring.lines.is_empty()).then(Instant::now);
        Ok(batch)
    }
}

/// Sends `buffer`'s lines as `agent.log` batches until `stop`.
pub(crate) async fn forward(
    buffer: Arc<AgentLogBuffer>,
    outbox: Arc<Outbox>,
    agent_id: String,
    stop: CancellationToken,
) {
    loop {
        let changed = buffer.changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let wait = if outbox.telemetry_len() >= BATCHES_IN_FLIGHT {
            // The link is slow: lines wait in the ring, where overflow is counted.
            Some(BATCH_LINGER)
        } else {
            match buffer.take_batch() {
                Ok(lines) => {
                    outbox.push_telemetry(Outbound::AgentLog(AgentLog {
                        message_id: new_message_id(),
                        agent_id: agent_id.clone(),
                        lines,
                        timestamp: now_ms(),
                    }));
                    continue;
                }
                Err(wait) => wait,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = &mut changed => {}
            _ = sleep_or_forever(wait) => {}
        }
    }
}

async fn sleep_or_forever(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(lines: usize) -> AgentLogBuffer {
        let buffer = AgentLogBuffer {
            ring: Mutex::new(Ring {
                offline_since: Some(Instant::now()),
                ..Ring::default()
            }),
            changed: Notify::new(),
        };
        for i in 0..lines {
            buffer.push(format!("line {i}"));
        }
        buffer
    }

    #[test]
    fn offline_lines_wait_in_a_bounded_ring_and_replay_behind_one_gap_marker() {
        let buffer = filled(RING_LINES + 5);
        assert_eq!(
            buffer.take_batch(),
            Err(None),
            "nothing goes before registration"
        );
        buffer.registered();
        let first = buffer.take_batch().unwrap();
        assert_eq!(first.len(), BATCH_LINES);
        assert_eq!(
            first[0],
            format!(
                "--- Orchestrator offline for 0s. Replaying {RING_LINES} buffered log lines. 5 log lines dropped due to buffer overflow. ---"
            )
        );
        assert_eq!(first[1], "line 5", "the oldest five were dropped");
        let mut sent = first.len() - 1;
        while let Ok(batch) = buffer.take_batch() {
            assert!(
                batch.iter().all(|l| !l.starts_with("---")),
                "one marker only"
            );
            sent += batch.len();
        }
        // The last partial batch waits for its linger.
        let lingering = lock(&buffer.ring).lines.len();
        assert!(lingering < BATCH_LINES);
        assert_eq!(sent + lingering, RING_LINES);
        lock(&buffer.ring).lines.clear();
        // A reconnect with nothing lost or waiting adds no marker.
        buffer.disconnected();
        buffer.registered();
        assert_eq!(buffer.take_batch(), Err(None));
    }

    #[test]
    fn a_partial_batch_waits_for_the_linger() {
        let buffer = filled(0);
        buffer.registered();
        buffer.push("one".into());
        assert!(matches!(buffer.take_batch(), Err(Some(wait)) if wait <= BATCH_LINGER));
    }
}
