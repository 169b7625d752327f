//! The one ordered outbox every agent -> orchestrator job message goes through.
//!
//! - **Priorities**: control messages (`job.ack`, `job.reject`, `agent.status`, `config.ack`)
//!   first, then statuses, then `job.heartbeat`s, then log lines. The connection heartbeat does
//!   not pass through here: it is exempt from the orchestrator's limits and sent directly.
//! - **Order per job**: a status waits behind the log lines of its job that were queued before
//!   it (a *barrier*), so a step's lines always precede its terminal status and the job's
//!   terminal status comes last, while statuses still overtake the log lines queued after them.
//! - **Nothing lost**: statuses are never dropped; while disconnected they are held and replayed
//!   in order after re-registering, and [`Outbox::undelivered_jobs`] feeds `inFlightJobs`.
//! - **Bounded memory**: a producer whose lines would push the log backlog past the bound waits
//!   (real backpressure: the step's pipe is not read), connected or not, so a short outage
//!   loses no line. Only once the agent has been disconnected for `offline_pause` (spec §14.3's
//!   30 s safety valve) do producers go on, and the oldest lines are dropped instead, with one
//!   marker line that says how many.
//! - **One attempt at a time**: when the orchestrator dispatches a job id again (after a cancel,
//!   or a missed ack deadline), [`Outbox::begin_attempt`] drops what the earlier attempt had not
//!   delivered yet, and everything that attempt queues later: the orchestrator would take it for
//!   the new attempt's (a stale `cancelled` would end the new one).
//! - **Pacing**: [`Pacer`] mirrors the orchestrator's token buckets; log lines are packed into as
//!   few `log.chunk` frames as the byte budget allows, never above `max_frame_bytes`.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::metrics::Metrics;
use crate::protocol::{
    json_string_len, new_message_id, now_ms, JobHeartbeat, JobRef, JobState, LogChunk, Outbound,
};

/// Limits of the outbox and of the pacing.
#[derive(Debug, Clone)]
pub struct OutboxLimits {
    /// Log bytes held before producers wait (or, past `offline_pause`, the oldest lines go).
    pub backlog_bytes: usize,
    /// How long producers over the bound wait for a lost connection to come back before the
    /// oldest lines are dropped so the step can go on (spec §14.3: 30 s).
    pub offline_pause: Duration,
    /// The largest frame ever sent (the orchestrator closes above 2 MiB).
    pub max_frame_bytes: usize,
    /// Lines wait this long to be batched with later ones ...
    pub linger: Duration,
    /// ... unless this many are queued.
    pub batch_lines: usize,
}

impl Default for OutboxLimits {
    fn default() -> Self {
        OutboxLimits {
            backlog_bytes: 8 * 1024 * 1024,
            offline_pause: Duration::from_secs(30),
            max_frame_bytes: 512 * 1024,
            linger: Duration::from_millis(100),
            batch_lines: 50,
        }
    }
}

/// Token buckets mirroring the orchestrator's per-connection limits (spec protocol.md §1.2).
#[derive(Debug, Clone)]
pub struct Pacer {
    msgs_per_sec: f64,
    msg_burst: f64,
    bytes_per_sec: f64,
    byte_burst: f64,
    msg_tokens: f64,
    byte_tokens: f64,
    refilled_at: Instant,
    paused_until: Option<Instant>,
}

impl Pacer {
    /// Full buckets with the given rates and bursts.
    pub fn new(msgs_per_sec: f64, msg_burst: f64, bytes_per_sec: f64, byte_burst: f64) -> Self {
        Pacer {
            msgs_per_sec,
            msg_burst,
            bytes_per_sec,
            byte_burst,
            msg_tokens: msg_burst,
            byte_tokens: byte_burst,
            refilled_at: Instant::now(),
            paused_until: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.refilled_at = now;
        self.msg_tokens = (self.msg_tokens + elapsed * self.msgs_per_sec).min(self.msg_burst);
        self.byte_tokens = (self.byte_tokens + elapsed * self.bytes_per_sec).min(self.byte_burst);
    }

    /// Bytes that can be sent right now in one message.
    pub fn available_bytes(&mut self, now: Instant) -> usize {
        self.refill(now);
        self.byte_tokens.max(0.0) as usize
    }

    /// How long until a message of `bytes` may go (zero = now).
    pub fn wait_for(&mut self, bytes: usize, now: Instant) -> Duration {
        self.refill(now);
        let bytes = (bytes as f64).min(self.byte_burst);
        let msg_wait = (1.0 - self.msg_tokens).max(0.0) / self.msgs_per_sec;
        let byte_wait = (bytes - self.byte_tokens).max(0.0) / self.bytes_per_sec;
        let pause = self
            .paused_until
            .map(|until| until.saturating_duration_since(now))
            .unwrap_or_default();
        Duration::from_secs_f64(msg_wait.max(byte_wait)).max(pause)
    }

    /// Takes the tokens of one sent message.
    pub fn consume(&mut self, bytes: usize, now: Instant) {
        self.refill(now);
        self.msg_tokens -= 1.0;
        self.byte_tokens -= bytes as f64;
    }

    /// The orchestrator dropped a message: send nothing paced for `retry_after`, then resume
    /// with empty buckets (its own are empty too).
    pub fn back_off(&mut self, retry_after: Duration, now: Instant) {
        self.refill(now);
        self.paused_until = Some(now + retry_after);
        self.msg_tokens = self.msg_tokens.min(0.0);
        self.byte_tokens = self.byte_tokens.min(0.0);
    }

    /// The largest message this pacer will ever allow.
    pub fn byte_burst(&self) -> usize {
        self.byte_burst as usize
    }
}

/// A frame ready for the socket.
#[derive(Debug, Clone)]
pub struct Frame {
    /// The JSON text.
    pub text: String,
    /// The message type, for logs and tests.
    pub message_type: &'static str,
}

struct QueuedLine {
    step_index: i64,
    text: String,
}

struct PendingStatus {
    /// Sendable once this many of the job's lines are sent (or dropped).
    barrier: u64,
    /// Global order among all statuses.
    seq: u64,
    terminal: bool,
    message: Outbound,
}

/// One dispatch of a job, as the outbox tells apart two dispatches of the same job id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobAttempt {
    /// The wire ids, shared by every attempt of the job.
    pub job: JobRef,
    id: u64,
}

struct JobLane {
    job: JobRef,
    attempt: u64,
    /// A later attempt of the job began: everything of this one is dropped, and the lane goes
    /// once its terminal status was pushed (and dropped).
    superseded: bool,
    statuses: VecDeque<PendingStatus>,
    lines: VecDeque<QueuedLine>,
    lines_queued: u64,
    lines_done: u64,
    /// Lines dropped while disconnected and not yet announced by a marker line.
    dropped_unannounced: u64,
    oldest_line_at: Option<Instant>,
    heartbeat_due: bool,
    /// `cancelling` or the terminal status was queued: `running` may not be sent again.
    stopping: bool,
    finished: bool,
}

impl JobLane {
    fn new(attempt: &JobAttempt) -> Self {
        JobLane {
            job: attempt.job.clone(),
            attempt: attempt.id,
            superseded: false,
            statuses: VecDeque::new(),
            lines: VecDeque::new(),
            lines_queued: 0,
            lines_done: 0,
            dropped_unannounced: 0,
            oldest_line_at: None,
            heartbeat_due: false,
            stopping: false,
            finished: false,
        }
    }

    fn head_status_ready(&self) -> Option<&PendingStatus> {
        self.statuses
            .front()
            .filter(|s| s.barrier <= self.lines_done)
    }

    fn status_waits_on_lines(&self) -> bool {
        self.statuses
            .front()
            .is_some_and(|s| s.barrier > self.lines_done)
    }

    fn is_done(&self) -> bool {
        self.finished && self.statuses.is_empty() && self.lines.is_empty()
    }
}

#[derive(Default)]
struct State {
    control: VecDeque<Outbound>,
    lanes: Vec<JobLane>,
    next_status_seq: u64,
    next_attempt: u64,
    backlog_bytes: usize,
    connected: bool,
    /// Since when the connection has been down (`None` while connected). Tokio's clock, so
    /// tests can pause time.
    disconnected_at: Option<tokio::time::Instant>,
    /// Producers waiting for backlog space (backpressure is active while > 0).
    waiting_producers: usize,
    /// Lowest priority: fleet telemetry (`agent.metrics`, `agent.log`, `run.event
    /// agent.teardown`, diagnostics bundles), bounded by [`TELEMETRY_QUEUE_LIMIT`].
    telemetry: VecDeque<Outbound>,
}

impl State {
    /// When producers over the bound stop waiting for a lost connection: `None` while
    /// connected (they wait for the sender instead).
    fn offline_valve(&self, offline_pause: Duration) -> Option<tokio::time::Instant> {
        if self.connected {
            return None;
        }
        // Never connected yet counts as down since the start.
        let since = self
            .disconnected_at
            .unwrap_or_else(tokio::time::Instant::now);
        Some(since + offline_pause)
    }

    fn lane_index(&mut self, attempt: &JobAttempt) -> usize {
        let found = self
            .lanes
            .iter()
            .position(|l| l.attempt == attempt.id && l.job.job_id == attempt.job.job_id);
        found.unwrap_or_else(|| {
            self.lanes.push(JobLane::new(attempt));
            self.lanes.len() - 1
        })
    }

    /// The attempt's lane, or `None` when a later attempt of the job superseded it: the
    /// `items` being queued are then counted as dropped, and a superseded lane goes with its
    /// terminal status.
    fn live_lane(
        &mut self,
        attempt: &JobAttempt,
        terminal: bool,
        items: usize,
        metrics: &Metrics,
    ) -> Option<&mut JobLane> {
        let index = self.lane_index(attempt);
        if !self.lanes[index].superseded {
            return Some(&mut self.lanes[index]);
        }
        metrics
            .superseded_messages_dropped_total
            .inc_by(items as u64);
        if terminal {
            self.lanes.remove(index);
        }
        None
    }

    /// Drops the oldest lines until the backlog fits `bound`; returns how many went.
    fn drop_oldest_lines_over(&mut self, bound: usize) -> u64 {
        let mut dropped = 0;
        while self.backlog_bytes > bound {
            // The lane holding the oldest queued line loses it.
            let Some(lane) = self
                .lanes
                .iter_mut()
                .filter(|l| !l.lines.is_empty())
                .min_by_key(|l| l.oldest_line_at)
            else {
                break;
            };
            if let Some(line) = lane.lines.pop_front() {
                self.backlog_bytes -= line.text.len();
                lane.lines_done += 1;
                lane.dropped_unannounced += 1;
                dropped += 1;
            }
        }
        dropped
    }
}

/// Telemetry messages held at most; the oldest goes first (it is the least useful).
pub const TELEMETRY_QUEUE_LIMIT: usize = 256;

/// What the sender will send next, before pacing.
enum Plan {
    Telemetry,
    Control,
    Status {
        lane: usize,
    },
    JobHeartbeat {
        lane: usize,
    },
    Lines {
        lane: usize,
        bytes: usize,
        ready_in: Duration,
    },
}

/// The outbox shared by job runners (producers) and the connection (consumer).
pub struct Outbox {
    state: Mutex<State>,
    limits: OutboxLimits,
    metrics: Metrics,
    /// Woken when something was queued or the connection state changed.
    changed: Notify,
    /// Woken when backlog space was freed or the connection dropped.
    space: Notify,
}

impl Outbox {
    /// An empty outbox that reports backpressure, drops and backlog to `metrics`.
    pub fn new(limits: OutboxLimits, metrics: Metrics) -> Self {
        Outbox {
            state: Mutex::new(State::default()),
            limits,
            metrics,
            changed: Notify::new(),
            space: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding this lock leaves plain queues behind: still consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts a new attempt of `job` (before its `job.ack` is queued). What an earlier attempt
    /// of the same job id has not delivered yet is dropped, and so is anything it queues from
    /// now on; both are counted in `kici_agent_superseded_messages_dropped_total`.
    pub fn begin_attempt(&self, job: &JobRef) -> JobAttempt {
        let mut state = self.lock();
        let id = state.next_attempt;
        state.next_attempt += 1;
        let same_job = |message: &Outbound| match message {
            Outbound::JobAck(ack) => ack.job_id == job.job_id,
            Outbound::JobStatus(status) => status.job_id == job.job_id,
            _ => false,
        };
        let control_before = state.control.len();
        state.control.retain(|message| !same_job(message));
        let mut dropped = control_before - state.control.len();
        let mut freed_bytes = 0;
        for lane in state
            .lanes
            .iter_mut()
            .filter(|l| l.job.job_id == job.job_id)
        {
            dropped += lane.statuses.len() + lane.lines.len() + usize::from(lane.heartbeat_due);
            freed_bytes += lane.lines.iter().map(|l| l.text.len()).sum::<usize>();
            lane.statuses.clear();
            lane.lines.clear();
            lane.lines_done = lane.lines_queued;
            lane.oldest_line_at = None;
            lane.heartbeat_due = false;
            lane.superseded = true;
        }
        // A lane whose terminal status was already pushed has nothing more to come.
        state.lanes.retain(|l| !(l.superseded && l.finished));
        state.backlog_bytes -= freed_bytes;
        self.metrics
            .outbox_backlog_bytes
            .set(state.backlog_bytes as i64);
        drop(state);
        if dropped > 0 {
            self.metrics
                .superseded_messages_dropped_total
                .inc_by(dropped as u64);
            tracing::warn!(
                run_id = %job.run_id,
                job_id = %job.job_id,
                dropped,
                "job dispatched again: dropping the undelivered messages of its earlier attempt"
            );
        }
        if freed_bytes > 0 {
            self.space.notify_waiters();
        }
        JobAttempt {
            job: job.clone(),
            id,
        }
    }

    /// Queues a control message (`job.ack`, `job.reject`, `agent.status`, `config.ack`).
    pub fn push_control(&self, message: Outbound) {
        self.lock().control.push_back(message);
        self.changed.notify_one();
    }

    /// Queues a telemetry message at the lowest priority: it goes only when no control message,
    /// status, job heartbeat or log line could go instead. Returns whether an older telemetry
    /// message was dropped to make room.
    pub fn push_telemetry(&self, message: Outbound) -> bool {
        let mut state = self.lock();
        let full = state.telemetry.len() >= TELEMETRY_QUEUE_LIMIT;
        if full {
            state.telemetry.pop_front();
        }
        state.telemetry.push_back(message);
        drop(state);
        self.changed.notify_one();
        full
    }

    /// Queues a `job.status` or `step.status` of `job`, ordered after the job's lines queued so
    /// far. A terminal `job.status` (`terminal`) closes the job's lane once delivered.
    pub fn push_status(&self, attempt: &JobAttempt, message: Outbound, terminal: bool) {
        let mut state = self.lock();
        let seq = state.next_status_seq;
        state.next_status_seq += 1;
        let Some(lane) = state.live_lane(attempt, terminal, 1, &self.metrics) else {
            return;
        };
        let barrier = lane.lines_queued;
        let cancelling =
            matches!(&message, Outbound::JobStatus(s) if s.state == JobState::Cancelling);
        lane.stopping |= terminal || cancelling;
        lane.statuses.push_back(PendingStatus {
            barrier,
            seq,
            terminal,
            message,
        });
        if terminal {
            lane.finished = true;
        }
        drop(state);
        self.changed.notify_one();
    }

    /// Queues a repeated `job.status running` of a job already running, ahead of log lines and
    /// statuses like a control message, unless the job has queued `cancelling` or its
    /// terminal status (a `running` after those would move it back) or is gone. Returns
    /// whether it was queued.
    pub fn push_running_again(&self, attempt: &JobAttempt, running: Outbound) -> bool {
        let mut state = self.lock();
        let running_lane = state.lanes.iter().any(|l| {
            l.attempt == attempt.id && l.job == attempt.job && !l.stopping && !l.superseded
        });
        if running_lane {
            state.control.push_back(running);
            drop(state);
            self.changed.notify_one();
        }
        running_lane
    }

    /// Marks a `job.heartbeat` due for `attempt` (coalesced: one pending at most).
    pub fn job_heartbeat_due(&self, attempt: &JobAttempt) {
        if let Some(lane) = self.lock().live_lane(attempt, false, 1, &self.metrics) {
            lane.heartbeat_due = true;
        }
        self.changed.notify_one();
    }

    /// Queues log lines of one step. Waits while the backlog is over its bound; once the
    /// connection has been down for `offline_pause`, drops the oldest queued lines instead.
    pub async fn push_lines(&self, attempt: &JobAttempt, step_index: i64, lines: Vec<String>) {
        if lines.is_empty() {
            return;
        }
        let mut waited = false;
        loop {
            let space = self.space.notified();
            let valve;
            {
                let mut state = self.lock();
                valve = state.offline_valve(self.limits.offline_pause);
                let valve_open = valve.is_some_and(|at| tokio::time::Instant::now() >= at);
                if valve_open || state.backlog_bytes < self.limits.backlog_bytes {
                    self.enqueue_lines(&mut state, attempt, step_index, lines);
                    if valve_open {
                        let dropped = state.drop_oldest_lines_over(self.limits.backlog_bytes);
                        self.metrics.log_lines_dropped_total.inc_by(dropped);
                    }
                    if waited {
                        state.waiting_producers -= 1;
                        if state.waiting_producers == 0 {
                            self.backpressure_gauge().set(0);
                        }
                    }
                    self.metrics
                        .outbox_backlog_bytes
                        .set(state.backlog_bytes as i64);
                    break;
                }
                if !waited {
                    waited = true;
                    state.waiting_producers += 1;
                    if state.waiting_producers == 1 {
                        self.metrics
                            .log_backpressure_events_total
                            .with_label_values(&["pause"])
                            .inc();
                        self.backpressure_gauge().set(1);
                    }
                }
            }
            match valve {
                // Wake at the valve too: nothing else frees space while disconnected.
                Some(at) => {
                    let _ = tokio::time::timeout_at(at, space).await;
                }
                None => space.await,
            }
        }
        self.changed.notify_one();
    }

    fn backpressure_gauge(&self) -> prometheus::IntGauge {
        self.metrics
            .log_backpressure_active
            .with_label_values(&["pause"])
    }

    /// Queues log lines without waiting (for callers that cannot await; the bound still holds
    /// by dropping the oldest lines).
    pub fn push_lines_now(&self, attempt: &JobAttempt, step_index: i64, lines: Vec<String>) {
        if lines.is_empty() {
            return;
        }
        let mut state = self.lock();
        self.enqueue_lines(&mut state, attempt, step_index, lines);
        let dropped = state.drop_oldest_lines_over(self.limits.backlog_bytes);
        self.metrics.log_lines_dropped_total.inc_by(dropped);
        drop(state);
        self.changed.notify_one();
    }

    fn enqueue_lines(
        &self,
        state: &mut State,
        attempt: &JobAttempt,
        step_index: i64,
        lines: Vec<String>,
    ) {
        let added: usize = lines.iter().map(String::len).sum();
        let Some(lane) = state.live_lane(attempt, false, lines.len(), &self.metrics) else {
            return;
        };
        lane.oldest_line_at.get_or_insert_with(Instant::now);
        lane.lines_queued += lines.len() as u64;
        lane.lines.extend(
            lines
                .into_iter()
                .map(|text| QueuedLine { step_index, text }),
        );
        state.backlog_bytes += added;
    }

    /// The connection state: while disconnected nothing is sent, and producers over the bound
    /// wait up to `offline_pause` for it to come back.
    pub fn set_connected(&self, connected: bool) {
        let mut state = self.lock();
        if !connected && state.connected {
            state.disconnected_at = Some(tokio::time::Instant::now());
        }
        state.connected = connected;
        if connected {
            state.disconnected_at = None;
        } else {
            // Acks of jobs we run are still owed; everything else in the control lane is
            // regenerated on the next registration or no longer meaningful.
            state.control.retain(|m| matches!(m, Outbound::JobAck(_)));
        }
        drop(state);
        self.space.notify_waiters();
        self.changed.notify_one();
    }

    /// Telemetry messages waiting.
    pub fn telemetry_len(&self) -> usize {
        self.lock().telemetry.len()
    }

    /// Whether the connection is registered (what [`Outbox::set_connected`] last said).
    pub fn is_connected(&self) -> bool {
        self.lock().connected
    }

    /// Jobs whose terminal status has not been delivered yet (for `inFlightJobs`).
    pub fn undelivered_jobs(&self) -> Vec<JobRef> {
        self.lock()
            .lanes
            .iter()
            .filter(|l| l.finished && !l.superseded)
            .map(|l| l.job.clone())
            .collect()
    }

    /// Drops every queued log line and returns how many (shutdown after its grace): the
    /// statuses waiting behind them become sendable.
    pub fn abandon_lines(&self) -> usize {
        let mut state = self.lock();
        let mut abandoned = 0;
        for lane in &mut state.lanes {
            abandoned += lane.lines.len();
            lane.lines_done += lane.lines.len() as u64;
            lane.lines.clear();
            lane.oldest_line_at = None;
        }
        state.backlog_bytes = 0;
        self.metrics.outbox_backlog_bytes.set(0);
        self.metrics
            .log_lines_dropped_total
            .inc_by(abandoned as u64);
        drop(state);
        self.space.notify_waiters();
        self.changed.notify_one();
        abandoned
    }

    /// Whether nothing at all waits to be sent.
    pub fn is_empty(&self) -> bool {
        let state = self.lock();
        state.control.is_empty()
            && state.telemetry.is_empty()
            && state
                .lanes
                .iter()
                .all(|l| l.statuses.is_empty() && l.lines.is_empty() && !l.heartbeat_due)
    }

    /// Waits until nothing waits to be sent.
    pub async fn wait_empty(&self) {
        loop {
            let space = self.space.notified();
            if self.is_empty() {
                return;
            }
            space.await;
        }
    }

    fn plan(&self, state: &State, now: Instant, budget_hint: usize) -> Option<Plan> {
        if !state.control.is_empty() {
            return Some(Plan::Control);
        }
        let ready_status = state
            .lanes
            .iter()
            .enumerate()
            .filter_map(|(i, l)| l.head_status_ready().map(|s| (i, s.seq)))
            .min_by_key(|(_, seq)| *seq);
        if let Some((lane, _)) = ready_status {
            return Some(Plan::Status { lane });
        }
        if let Some(lane) = state.lanes.iter().position(|l| l.heartbeat_due) {
            return Some(Plan::JobHeartbeat { lane });
        }
        // Lines: a lane whose status waits on them first, else the oldest lines.
        let Some(lane) = state
            .lanes
            .iter()
            .enumerate()
            .filter(|(_, l)| !l.lines.is_empty())
            .min_by_key(|(_, l)| (!l.status_waits_on_lines(), l.oldest_line_at))
            .map(|(i, _)| i)
        else {
            return (!state.telemetry.is_empty()).then_some(Plan::Telemetry);
        };
        let l = &state.lanes[lane];
        let urgent = l.status_waits_on_lines() || l.lines.len() >= self.limits.batch_lines;
        let age = l
            .oldest_line_at
            .map(|t| now.saturating_duration_since(t))
            .unwrap_or_default();
        let ready_in = if urgent {
            Duration::ZERO
        } else {
            self.limits.linger.saturating_sub(age)
        };
        if !ready_in.is_zero() && !state.telemetry.is_empty() {
            // The lines are still gathering into a batch: telemetry does not delay them.
            return Some(Plan::Telemetry);
        }
        // Ask the pacer for a worthwhile chunk: what is queued, up to a quarter frame.
        let queued: usize = l.lines.iter().take(4096).map(|q| q.text.len() + 3).sum();
        let bytes = queued
            .min(self.limits.max_frame_bytes / 4)
            .min(budget_hint.max(1));
        Some(Plan::Lines {
            lane,
            bytes: bytes + 200,
            ready_in,
        })
    }

    /// Waits for the next frame that may go now under `pacer`, and takes it from the queue.
    /// Cancel-safe: nothing is taken until the frame is returned.
    pub async fn next_frame(&self, pacer: &mut Pacer) -> Frame {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let now = Instant::now();
            let wait = {
                let state = self.lock();
                if !state.connected {
                    None
                } else {
                    match self.plan(&state, now, pacer.byte_burst()) {
                        None => None,
                        Some(Plan::Lines {
                            bytes, ready_in, ..
                        }) => Some(pacer.wait_for(bytes, now).max(ready_in)),
                        Some(Plan::Telemetry) => {
                            let bytes = state.telemetry.front().map_or(0, |m| m.to_frame().len());
                            Some(pacer.wait_for(bytes, now))
                        }
                        Some(_) => Some(pacer.wait_for(400, now)),
                    }
                }
            };
            match wait {
                None => changed.await,
                Some(wait) if wait.is_zero() => {
                    let budget = pacer.available_bytes(now).min(self.limits.max_frame_bytes);
                    if let Some(frame) = self.take(budget.max(1024), now) {
                        pacer.consume(frame.text.len(), Instant::now());
                        return frame;
                    }
                }
                Some(wait) => {
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = &mut changed => {}
                    }
                }
            }
        }
    }

    /// Takes the next frame within `budget` bytes, if any may go.
    fn take(&self, budget: usize, now: Instant) -> Option<Frame> {
        let mut state = self.lock();
        let plan = self.plan(&state, now, budget)?;
        let (message, freed) = match plan {
            Plan::Control => (state.control.pop_front()?, false),
            Plan::Telemetry => (state.telemetry.pop_front()?, false),
            Plan::Status { lane } => {
                let l = &mut state.lanes[lane];
                let status = l.statuses.pop_front()?;
                if status.terminal && l.is_done() {
                    state.lanes.remove(lane);
                }
                (status.message, false)
            }
            Plan::JobHeartbeat { lane } => {
                let l = &mut state.lanes[lane];
                l.heartbeat_due = false;
                let message = Outbound::JobHeartbeat(JobHeartbeat {
                    run_id: l.job.run_id.clone(),
                    job_id: l.job.job_id.clone(),
                    timestamp: now_ms(),
                });
                (message, false)
            }
            Plan::Lines { lane, .. } => {
                let max = budget.min(self.limits.max_frame_bytes);
                let (chunk, bytes) = pack_chunk(&mut state.lanes[lane], max);
                state.backlog_bytes -= bytes;
                self.metrics
                    .outbox_backlog_bytes
                    .set(state.backlog_bytes as i64);
                if state.lanes[lane].is_done() {
                    state.lanes.remove(lane);
                }
                (chunk, true)
            }
        };
        drop(state);
        if freed {
            self.space.notify_waiters();
        }
        let text = message.to_frame();
        if self.is_empty() {
            self.space.notify_waiters();
        }
        Some(Frame {
            text,
            message_type: message.message_type(),
        })
    }
}

/// Envelope bytes of a `log.chunk` around its lines (ids are UUIDs; generous).
const CHUNK_ENVELOPE_BYTES: usize = 220;

/// Packs the lane's leading lines of one step into a chunk of at most `max_bytes`.
/// Returns the chunk and the raw line bytes removed from the backlog.
fn pack_chunk(lane: &mut JobLane, max_bytes: usize) -> (Outbound, usize) {
    let step_index = lane.lines.front().map(|l| l.step_index).unwrap_or(-1);
    let mut lines = Vec::new();
    let mut size = CHUNK_ENVELOPE_BYTES + lane.job.run_id.len() + lane.job.job_id.len();
    if lane.dropped_unannounced > 0 {
        let marker = format!(
            "[{} lines dropped: the orchestrator was unreachable and the buffer was full]",
            lane.dropped_unannounced
        );
        size += json_string_len(&marker) + 1;
        lines.push(marker);
        lane.dropped_unannounced = 0;
    }
    let mut raw_bytes = 0;
    while let Some(next) = lane.lines.front() {
        if next.step_index != step_index {
            break;
        }
        let cost = json_string_len(&next.text) + 1;
        if !lines.is_empty() && size + cost > max_bytes {
            break;
        }
        size += cost;
        raw_bytes += next.text.len();
        if let Some(line) = lane.lines.pop_front() {
            lines.push(line.text);
        }
        lane.lines_done += 1;
    }
    lane.oldest_line_at = if lane.lines.is_empty() {
        None
    } else {
        lane.oldest_line_at
    };
    let chunk = Outbound::LogChunk(LogChunk {
        message_id: new_message_id(),
        run_id: lane.job.run_id.clone(),
        job_id: lane.job.job_id.clone(),
        step_index,
        lines,
        timestamp: now_ms(),
    });
    (chunk, raw_bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{JobAck, JobStatus};

    fn job(id: &str) -> JobRef {
        JobRef {
            run_id: format!("run-{id}"),
            job_id: id.to_string(),
        }
    }

    fn status(job: &JobRef, state: JobState) -> Outbound {
        Outbound::JobStatus(JobStatus {
            message_id: new_message_id(),
            run_id: job.run_id.clone(),
            job_id: job.job_id.clone(),
            state,
            timestamp: 1,
            data: None,
            secret_outputs: None,
        })
    }

    fn ack(job: &JobRef) -> Outbound {
        Outbound::JobAck(JobAck {
            message_id: new_message_id(),
            run_id: job.run_id.clone(),
            job_id: job.job_id.clone(),
            timestamp: 1,
        })
    }

    fn unlimited() -> Pacer {
        Pacer::new(1e9, 1e9, 1e12, 1e12)
    }

    async fn drain(outbox: &Outbox, pacer: &mut Pacer) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        while !outbox.is_empty() {
            let frame = outbox.next_frame(pacer).await;
            out.push(serde_json::from_str(&frame.text).unwrap());
        }
        out
    }

    fn teardown(job: &JobRef) -> Outbound {
        Outbound::RunEvent(crate::protocol::RunEvent {
            run_id: job.run_id.clone(),
            event_type: "agent.teardown".into(),
            timestamp_ms: 1,
            source_service: "agent".into(),
            job_id: Some(job.job_id.clone()),
            metadata: None,
            duration_ms: None,
        })
    }

    #[tokio::test]
    async fn telemetry_goes_last_but_does_not_wait_for_lines_still_batching() {
        let outbox = Outbox::new(OutboxLimits::default(), Metrics::new());
        outbox.set_connected(true);
        let a = outbox.begin_attempt(&job("a"));
        outbox.push_telemetry(teardown(&a.job));
        outbox.push_lines(&a, 0, vec!["one".into()]).await;
        outbox.push_status(&a, status(&a.job, JobState::Success), true);
        outbox.push_control(ack(&job("b")));
        let sent = drain(&outbox, &mut unlimited()).await;
        let types: Vec<&str> = sent.iter().map(|m| m["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["job.ack", "log.chunk", "job.status", "run.event"]);

        // A line still gathering its batch (100 ms linger) lets queued telemetry through first.
        outbox.push_lines(&a, 0, vec!["late".into()]).await;
        outbox.push_telemetry(teardown(&a.job));
        let sent = drain(&outbox, &mut unlimited()).await;
        let types: Vec<&str> = sent.iter().map(|m| m["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["run.event", "log.chunk"]);
    }

    #[test]
    fn the_telemetry_queue_is_bounded_dropping_the_oldest() {
        let outbox = Outbox::new(OutboxLimits::default(), Metrics::new());
        let a = job("a");
        for _ in 0..TELEMETRY_QUEUE_LIMIT {
            assert!(!outbox.push_telemetry(teardown(&a)));
        }
        assert!(outbox.push_telemetry(teardown(&a)));
        assert_eq!(outbox.lock().telemetry.len(), TELEMETRY_QUEUE_LIMIT);
    }

    #[tokio::test]
    async fn statuses_wait_for_earlier_lines_but_overtake_later_ones() {
        let outbox = Outbox::new(OutboxLimits::default(), Metrics::new());
        outbox.set_connected(true);
        let a = outbox.begin_attempt(&job("a"));
        outbox.push_status(&a, status(&a.job, JobState::Running), false);
        outbox
            .push_lines(&a, 0, vec!["one".into(), "two".into()])
            .await;
        outbox.push_status(&a, status(&a.job, JobState::Success), true);
        outbox.push_control(ack(&job("b")));
        let sent = drain(&outbox, &mut unlimited()).await;
        let types: Vec<&str> = sent.iter().map(|m| m["type"].as_str().unwrap()).collect();
        assert_eq!(types, ["job.ack", "job.status", "log.chunk", "job.status"]);
        assert_eq!(sent[2]["lines"], serde_json::json!(["one", "two"]));
        assert_eq!(sent[3]["state"], "success");
        assert!(outbox.undelivered_jobs().is_empty());
    }

    #[tokio::test]
    async fn held_while_disconnected_and_listed_as_in_flight() {
        let outbox = Outbox::new(OutboxLimits::default(), Metrics::new());
        let a = outbox.begin_attempt(&job("a"));
        outbox.push_status(&a, status(&a.job, JobState::Running), false);
        outbox.push_status(&a, status(&a.job, JobState::Failed), true);
        assert_eq!(outbox.undelivered_jobs(), vec![a.job.clone()]);
        let mut pacer = unlimited();
        // Nothing goes while disconnected.
        let pending =
            tokio::time::timeout(Duration::from_millis(20), outbox.next_frame(&mut pacer));
        assert!(pending.await.is_err());
        outbox.set_connected(true);
        let sent = drain(&outbox, &mut pacer).await;
        let states: Vec<&str> = sent.iter().map(|m| m["state"].as_str().unwrap()).collect();
        assert_eq!(states, ["running", "failed"]);
        assert!(outbox.undelivered_jobs().is_empty());
    }

    #[tokio::test]
    async fn offline_overflow_past_the_pause_drops_oldest_with_one_marker() {
        let limits = OutboxLimits {
            backlog_bytes: 100,
            offline_pause: Duration::ZERO,
            ..OutboxLimits::default()
        };
        let outbox = Outbox::new(limits, Metrics::new());
        let a = outbox.begin_attempt(&job("a"));
        for i in 0..50 {
            outbox.push_lines(&a, 0, vec![format!("line {i:04}")]).await;
        }
        assert!(outbox.lock().backlog_bytes <= 100);
        outbox.set_connected(true);
        let sent = drain(&outbox, &mut unlimited()).await;
        let lines: Vec<String> = sent
            .iter()
            .flat_map(|m| m["lines"].as_array().unwrap().clone())
            .map(|l| l.as_str().unwrap().to_string())
            .collect();
        // 9 bytes a line: the 11 newest fit in 100 bytes.
        assert!(lines[0].starts_with("[39 lines dropped"), "{lines:?}");
        assert_eq!(lines[1], "line 0039");
        assert_eq!(lines.last().unwrap(), "line 0049");
        assert_eq!(lines.len(), 12);
    }

    /// A short outage loses nothing: producers over the bound wait for the connection, and only
    /// once it has been down for `offline_pause` do the oldest lines go.
    #[tokio::test(start_paused = true)]
    async fn producers_wait_through_an_outage_until_the_offline_pause_ends() {
        let limits = OutboxLimits {
            backlog_bytes: 10,
            offline_pause: Duration::from_secs(30),
            ..OutboxLimits::default()
        };
        let outbox = std::sync::Arc::new(Outbox::new(limits, Metrics::new()));
        outbox.set_connected(true);
        let a = outbox.begin_attempt(&job("a"));
        outbox.push_lines(&a, 0, vec!["0123456789ab".into()]).await;
        outbox.set_connected(false);
        let producer = {
            let outbox = outbox.clone();
            let a = a.clone();
            tokio::spawn(async move { outbox.push_lines(&a, 0, vec!["second".into()]).await })
        };
        tokio::time::sleep(Duration::from_secs(29)).await;
        assert!(!producer.is_finished(), "a 29 s outage must not drop lines");
        outbox.set_connected(true);
        let mut pacer = unlimited();
        assert!(outbox
            .next_frame(&mut pacer)
            .await
            .text
            .contains("0123456789ab"));
        producer.await.unwrap();
        assert!(outbox.next_frame(&mut pacer).await.text.contains("second"));

        // A longer outage: at 30 s the producer goes on and the oldest line is dropped.
        outbox.push_lines(&a, 0, vec!["0123456789cd".into()]).await;
        outbox.set_connected(false);
        let producer = {
            let outbox = outbox.clone();
            let a = a.clone();
            tokio::spawn(async move { outbox.push_lines(&a, 0, vec!["third".into()]).await })
        };
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert!(
            producer.is_finished(),
            "the producer waits no longer than the pause"
        );
        outbox.set_connected(true);
        let text = outbox.next_frame(&mut pacer).await.text;
        assert!(
            text.contains("[1 lines dropped") && text.contains("third"),
            "{text}"
        );
        assert!(!text.contains("0123456789cd"), "{text}");
    }

    #[tokio::test]
    async fn producers_wait_while_connected_and_over_the_bound() {
        let limits = OutboxLimits {
            backlog_bytes: 10,
            ..OutboxLimits::default()
        };
        let outbox = std::sync::Arc::new(Outbox::new(limits, Metrics::new()));
        outbox.set_connected(true);
        let a = outbox.begin_attempt(&job("a"));
        outbox.push_lines(&a, 0, vec!["0123456789ab".into()]).await;
        let producer = {
            let outbox = outbox.clone();
            let a = a.clone();
            tokio::spawn(async move { outbox.push_lines(&a, 0, vec!["second".into()]).await })
        };
        tokio::task::yield_now().await;
        assert!(!producer.is_finished());
        let mut pacer = unlimited();
        let first = outbox.next_frame(&mut pacer).await;
        assert!(first.text.contains("0123456789ab"));
        producer.await.unwrap();
        let second = outbox.next_frame(&mut pacer).await;
        assert!(second.text.contains("second"));
    }

    #[tokio::test]
    async fn chunks_never_exceed_the_frame_limit_and_keep_every_line() {
        let limits = OutboxLimits {
            max_frame_bytes: 64 * 1024,
            backlog_bytes: 64 * 1024 * 1024,
            ..OutboxLimits::default()
        };
        let outbox = Outbox::new(limits, Metrics::new());
        outbox.set_connected(true);
        let a = outbox.begin_attempt(&job("a"));
        let lines: Vec<String> = (0..20_000)
            .map(|i| format!("{i:08} \"quoted\" {}", "x".repeat(60)))
            .collect();
        outbox.push_lines(&a, 3, lines.clone()).await;
        let mut pacer = unlimited();
        let mut got = Vec::new();
        while !outbox.is_empty() {
            let frame = outbox.next_frame(&mut pacer).await;
            assert!(
                frame.text.len() <= 64 * 1024,
                "frame of {}",
                frame.text.len()
            );
            let v: serde_json::Value = serde_json::from_str(&frame.text).unwrap();
            assert_eq!(v["stepIndex"], 3);
            got.extend(
                v["lines"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|l| l.as_str().unwrap().to_string()),
            );
        }
        assert_eq!(got, lines);
    }

    #[tokio::test]
    async fn abandoned_lines_let_the_terminal_status_through() {
        let outbox = Outbox::new(OutboxLimits::default(), Metrics::new());
        let a = outbox.begin_attempt(&job("a"));
        outbox.push_lines(&a, 0, vec!["x".into(); 10]).await;
        outbox.push_status(&a, status(&a.job, JobState::Cancelled), true);
        assert_eq!(outbox.abandon_lines(), 10);
        outbox.set_connected(true);
        let sent = drain(&outbox, &mut unlimited()).await;
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0]["state"], "cancelled");
        assert!(outbox.undelivered_jobs().is_empty());
    }

    #[test]
    fn pacer_waits_for_tokens() {
        let now = Instant::now();
        let mut pacer = Pacer::new(10.0, 1.0, 1000.0, 1000.0);
        assert_eq!(pacer.wait_for(500, now), Duration::ZERO);
        pacer.consume(500, now);
        // No message token left: 1/10 s; bytes: 1000 - 500 < 800 -> 0.3 s.
        let wait = pacer.wait_for(800, now);
        assert!(
            wait >= Duration::from_millis(299) && wait <= Duration::from_millis(301),
            "{wait:?}"
        );
        pacer.back_off(Duration::from_secs(2), now);
        assert!(pacer.wait_for(1, now) >= Duration::from_secs(2));
    }

    #[tokio::test]
    async fn a_new_attempt_drops_what_the_earlier_one_left_undelivered() {
        let metrics = Metrics::new();
        let outbox = Outbox::new(OutboxLimits::default(), metrics.clone());
        let first = outbox.begin_attempt(&job("a"));
        outbox.push_control(ack(&first.job));
        outbox.push_status(&first, status(&first.job, JobState::Running), false);
        outbox.push_lines(&first, 0, vec!["old".into(); 3]).await;
        outbox.push_status(&first, status(&first.job, JobState::Cancelling), false);
        // Dispatched again before any of it was delivered.
        let second = outbox.begin_attempt(&job("a"));
        assert_eq!(outbox.lock().backlog_bytes, 0);
        assert_eq!(metrics.superseded_messages_dropped_total.get(), 6);
        outbox.push_control(ack(&second.job));
        outbox.push_status(&second, status(&second.job, JobState::Running), false);
        // The first attempt ends late: its terminal status goes nowhere.
        outbox.push_lines(&first, 0, vec!["old".into(); 2]).await;
        outbox.push_status(&first, status(&first.job, JobState::Cancelled), true);
        assert_eq!(metrics.superseded_messages_dropped_total.get(), 9);
        assert!(!outbox.push_running_again(&first, status(&first.job, JobState::Running)));
        outbox.push_lines(&second, 0, vec!["new".into()]).await;
        outbox.push_status(&second, status(&second.job, JobState::Success), true);
        assert_eq!(outbox.undelivered_jobs(), vec![second.job.clone()]);

        outbox.set_connected(true);
        let sent = drain(&outbox, &mut unlimited()).await;
        let shown: Vec<String> = sent
            .iter()
            .map(|m| match m["type"].as_str().unwrap() {
                "log.chunk" => format!("lines {}", m["lines"]),
                "job.status" => format!("status {}", m["state"].as_str().unwrap()),
                other => other.to_owned(),
            })
            .collect();
        assert_eq!(
            shown,
            [
                "job.ack",
                "status running",
                "lines [\"new\"]",
                "status success"
            ]
        );
        assert!(outbox.undelivered_jobs().is_empty());
        assert!(outbox.lock().lanes.is_empty());
    }
}
