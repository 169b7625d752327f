//! Events for embedders: what the agent did, pulled by the host (C, Python, Rust) at its own
//! pace so it can show them in its own UI.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::protocol::{JobState, StepState};

/// Something that happened in the agent. Serialises as JSON with a `type` tag.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event {
    /// Registered with the orchestrator.
    Registered { agent_id: String },
    /// The connection was lost (a reconnect follows unless auth failed or we stop).
    Disconnected,
    /// The next connection attempt starts in `delay_ms`; `attempt` counts from 0 and goes
    /// back to 0 only after a registration that lasted (see `ReconnectPolicy::stable_after`).
    #[serde(rename_all = "camelCase")]
    ReconnectScheduled { attempt: u32, delay_ms: u64 },
    /// The orchestrator refused our credentials; no more reconnects.
    AuthFailed { reason: String },
    /// A dispatch was accepted.
    #[serde(rename_all = "camelCase")]
    JobStarted {
        run_id: String,
        job_id: String,
        name: String,
    },
    /// A dispatch was rejected.
    #[serde(rename_all = "camelCase")]
    JobRejected {
        run_id: String,
        job_id: String,
        reason: String,
    },
    /// A step attempt ended.
    #[serde(rename_all = "camelCase")]
    StepFinished {
        run_id: String,
        job_id: String,
        step_index: u32,
        step_name: String,
        state: StepState,
        duration_ms: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A job ended.
    #[serde(rename_all = "camelCase")]
    JobFinished {
        run_id: String,
        job_id: String,
        name: String,
        state: JobState,
        duration_ms: u64,
        #[serde(skip_serializing_if = "Option::is_none")]
        error: Option<String>,
    },
    /// A scaler-managed agent decided to shut itself down (`reason`: `scaler-idle` or
    /// `scaler-pending-dispatch-timeout`); `stopped` follows once the shutdown is done.
    SelfShutdown { reason: String },
    /// The agent stopped.
    Stopped,
}

impl Event {
    /// The event as one JSON object.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| unreachable!("event serialisation: {e}"))
    }
}

/// A bounded queue of events: the oldest are dropped when nobody reads them.
pub struct EventQueue {
    queue: Mutex<VecDeque<Event>>,
    ready: Condvar,
    capacity: usize,
}

impl EventQueue {
    /// A queue keeping at most `capacity` unread events.
    pub fn new(capacity: usize) -> Self {
        EventQueue {
            queue: Mutex::new(VecDeque::new()),
            ready: Condvar::new(),
            capacity,
        }
    }

    /// Adds an event.
    pub fn push(&self, event: Event) {
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if queue.len() == self.capacity {
            queue.pop_front();
        }
        queue.push_back(event);
        self.ready.notify_all();
    }

    /// The next event, waiting up to `timeout` (`None` = wait forever). Blocking: call it from
    /// a host thread, not from async code.
    pub fn next(&self, timeout: Option<Duration>) -> Option<Event> {
        // A timeout too far away to represent is no deadline at all.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        let mut queue = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(event) = queue.pop_front() {
                return Some(event);
            }
            queue = match deadline {
                None => self.ready.wait(queue).unwrap_or_else(|e| e.into_inner()),
                Some(deadline) => {
                    let left = deadline.checked_duration_since(Instant::now())?;
                    self.ready
                        .wait_timeout(queue, left)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_events_go_when_full_and_next_times_out() {
        let queue = EventQueue::new(2);
        queue.push(Event::Disconnected);
        queue.push(Event::Registered {
            agent_id: "a".into(),
        });
        queue.push(Event::Stopped);
        assert_eq!(
            queue.next(Some(Duration::ZERO)),
            Some(Event::Registered {
                agent_id: "a".into()
            })
        );
        assert_eq!(queue.next(Some(Duration::ZERO)), Some(Event::Stopped));
        assert_eq!(queue.next(Some(Duration::from_millis(5))), None);
    }

    #[test]
    fn a_timeout_too_large_for_a_deadline_waits_without_one() {
        let queue = std::sync::Arc::new(EventQueue::new(2));
        queue.push(Event::Stopped);
        assert_eq!(queue.next(Some(Duration::MAX)), Some(Event::Stopped));
        // Nothing queued yet: it waits (no overflow, no early return) until one arrives.
        let pusher = {
            let queue = queue.clone();
            std::thread::spawn(move || queue.push(Event::Disconnected))
        };
        assert_eq!(queue.next(Some(Duration::MAX)), Some(Event::Disconnected));
        pusher.join().unwrap();
    }

    #[test]
    fn events_serialise_with_a_type_tag() {
        let event = Event::JobFinished {
            run_id: "r".into(),
            job_id: "j".into(),
            name: "build".into(),
            state: JobState::Failed,
            duration_ms: 3,
            error: Some("Step 'x' failed".into()),
        };
        assert_eq!(
            event.to_json(),
            r#"{"type":"job_finished","runId":"r","jobId":"j","name":"build","state":"failed","durationMs":3,"error":"Step 'x' failed"}"#
        );
    }
}
