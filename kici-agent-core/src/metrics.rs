//! The agent's Prometheus metrics (spec agent.md §5), in a registry owned by each agent so two
//! agents in one process never collide.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

use crate::protocol::{JobState, StepState};

/// Handles to every metric of one agent.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `kici_agent_jobs_total{status}`: jobs by their real terminal state.
    pub jobs_total: IntCounterVec,
    /// `kici_agent_jobs_active`.
    pub jobs_active: IntGauge,
    /// `kici_agent_steps_total{status}`.
    pub steps_total: IntCounterVec,
    /// `kici_agent_step_duration_seconds`.
    pub step_duration_seconds: Histogram,
    /// `kici_agent_clone_duration_seconds`.
    pub clone_duration_seconds: Histogram,
    /// `kici_agent_log_bytes_total`.
    pub log_bytes_total: IntCounter,
    /// `kici_agent_log_backpressure_events_total{mode}`.
    pub log_backpressure_events_total: IntCounterVec,
    /// `kici_agent_log_lines_dropped_total`.
    pub log_lines_dropped_total: IntCounter,
    /// `kici_agent_log_backpressure_active{mode}`.
    pub log_backpressure_active: IntGaugeVec,
    /// `kici_agent_connection_status`: 1 while registered, 0 otherwise.
    pub connection_status: IntGauge,
    /// `kici_agent_rate_limit_warnings_total`: `rate.limit.warning` replies received.
    pub rate_limit_warnings_total: IntCounter,
    /// `kici_agent_reconnects_total`: connection attempts after the first.
    pub reconnects_total: IntCounter,
    /// `kici_agent_outbox_backlog_bytes`: log bytes waiting to be sent.
    pub outbox_backlog_bytes: IntGauge,
    /// `kici_agent_superseded_messages_dropped_total`: messages of an earlier attempt of a job
    /// dropped because the orchestrator dispatched the job again.
    pub superseded_messages_dropped_total: IntCounter,
}

impl Metrics {
    /// Creates the metrics in a fresh registry, with the process collector where supported.
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, label: &str| {
            let metric = IntCounterVec::new(Opts::new(name, help), &[label])
                .unwrap_or_else(|e| unreachable!("metric {name}: {e}"));
            register(&registry, metric)
        };
        let jobs_total = counter_vec(
            "kici_agent_jobs_total",
            "Jobs finished, by terminal status",
            "status",
        );
        let steps_total = counter_vec(
            "kici_agent_steps_total",
            "Steps finished, by status",
            "status",
        );
        let log_backpressure_events_total = counter_vec(
            "kici_agent_log_backpressure_events_total",
            "Transitions into log backpressure",
            "mode",
        );
        let counter = |name: &str, help: &str| {
            let metric =
                IntCounter::new(name, help).unwrap_or_else(|e| unreachable!("metric {name}: {e}"));
            register(&registry, metric)
        };
        let log_bytes_total = counter(
            "kici_agent_log_bytes_total",
            "UTF-8 bytes of step log lines accepted",
        );
        let log_lines_dropped_total = counter(
            "kici_agent_log_lines_dropped_total",
            "Log lines dropped (buffer overflow while disconnected)",
        );
        let rate_limit_warnings_total = counter(
            "kici_agent_rate_limit_warnings_total",
            "rate.limit.warning replies received from the orchestrator",
        );
        let reconnects_total = counter(
            "kici_agent_reconnects_total",
            "Connection attempts after the first",
        );
        let superseded_messages_dropped_total = counter(
            "kici_agent_superseded_messages_dropped_total",
            "Undelivered messages of an earlier attempt of a job dropped when it was dispatched again",
        );
        let gauge = |name: &str, help: &str| {
            let metric =
                IntGauge::new(name, help).unwrap_or_else(|e| unreachable!("metric {name}: {e}"));
            register(&registry, metric)
        };
        let jobs_active = gauge("kici_agent_jobs_active", "Jobs running now");
        let connection_status = gauge(
            "kici_agent_connection_status",
            "1 while registered with the orchestrator, else 0",
        );
        let outbox_backlog_bytes = gauge(
            "kici_agent_outbox_backlog_bytes",
            "Log bytes queued for the orchestrator",
        );
        let log_backpressure_active = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "kici_agent_log_backpressure_active",
                    "1 while log streaming is held back",
                ),
                &["mode"],
            )
            .unwrap_or_else(|e| unreachable!("backpressure gauge: {e}")),
        );
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let metric =
                Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))
                    .unwrap_or_else(|e| unreachable!("metric {name}: {e}"));
            register(&registry, metric)
        };
        let step_duration_seconds = histogram(
            "kici_agent_step_duration_seconds",
            "Step durations",
            &[0.1, 1.0, 5.0, 30.0, 60.0, 300.0, 600.0, 1800.0],
        );
        let clone_duration_seconds = histogram(
            "kici_agent_clone_duration_seconds",
            "Git checkout durations",
            &[0.5, 1.0, 5.0, 10.0, 30.0, 60.0],
        );
        #[cfg(target_os = "linux")]
        {
            let process = prometheus::process_collector::ProcessCollector::for_self();
            if let Err(e) = registry.register(Box::new(process)) {
                tracing::debug!(error = %e, "process metrics unavailable");
            }
        }
        // Known label sets start at zero so dashboards see every series from the start.
        for status in ["success", "failed", "cancelled"] {
            jobs_total.with_label_values(&[status]);
        }
        for status in ["success", "failed", "skipped", "cancelled"] {
            steps_total.with_label_values(&[status]);
        }
        for mode in ["pause", "drop"] {
            log_backpressure_events_total.with_label_values(&[mode]);
            log_backpressure_active.with_label_values(&[mode]);
        }
        Metrics {
            registry,
            jobs_total,
            jobs_active,
            steps_total,
            step_duration_seconds,
            clone_duration_seconds,
            log_bytes_total,
            log_backpressure_events_total,
            log_lines_dropped_total,
            log_backpressure_active,
            connection_status,
            rate_limit_warnings_total,
            reconnects_total,
            outbox_backlog_bytes,
            superseded_messages_dropped_total,
        }
    }

    /// Records a finished job.
    pub fn job_finished(&self, state: JobState) {
        self.jobs_total.with_label_values(&[state.as_str()]).inc();
    }

    /// Records a finished step.
    pub fn step_finished(&self, state: StepState, duration_secs: f64) {
        self.steps_total.with_label_values(&[state.as_str()]).inc();
        if duration_secs > 0.0 {
            self.step_duration_seconds.observe(duration_secs);
        }
    }

    /// Every metric family of this agent's registry (what `/metrics` renders).
    pub fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.registry.gather()
    }

    /// The Prometheus text exposition of every metric of this agent.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(error = %e, "metrics encoding failed");
        }
        String::from_utf8_lossy(&buffer).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: M) -> M {
    registry
        .register(Box::new(metric.clone()))
        .unwrap_or_else(|e| unreachable!("duplicate metric in a fresh registry: {e}"));
    metric
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The seed table of spec agent.md §5.
    pub const SPEC_METRICS: &[(&str, &str)] = &[
        ("kici_agent_jobs_total", "counter"),
        ("kici_agent_jobs_active", "gauge"),
        ("kici_agent_steps_total", "counter"),
        ("kici_agent_step_duration_seconds", "histogram"),
        ("kici_agent_clone_duration_seconds", "histogram"),
        ("kici_agent_log_bytes_total", "counter"),
        ("kici_agent_log_backpressure_events_total", "counter"),
        ("kici_agent_log_lines_dropped_total", "counter"),
        ("kici_agent_log_backpressure_active", "gauge"),
        ("kici_agent_connection_status", "gauge"),
    ];

    #[test]
    fn every_spec_metric_is_exposed_with_its_type() {
        let metrics = Metrics::new();
        let text = metrics.render();
        for (name, kind) in SPEC_METRICS {
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} ({kind}) missing from:\n{text}"
            );
        }
        assert!(text.contains("kici_agent_step_duration_seconds_bucket{le=\"1800\"}"));
        assert!(text.contains("kici_agent_clone_duration_seconds_bucket{le=\"0.5\"}"));
    }

    #[test]
    fn two_agents_do_not_share_values() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.job_finished(JobState::Failed);
        assert!(a
            .render()
            .contains("kici_agent_jobs_total{status=\"failed\"} 1"));
        assert!(b
            .render()
            .contains("kici_agent_jobs_total{status=\"failed\"} 0"));
    }
}
