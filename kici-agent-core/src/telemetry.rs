//! Fleet telemetry: `agent.metrics` snapshots of the registry `/metrics` serves (protocol.md
//! §4.2, agent spec §5 "Metrics push"), every [`METRICS_PUSH_INTERVAL`], after each job and once
//! at shutdown.
//!
//! Snapshots take the outbox's lowest-priority telemetry lane, so they never delay a status or a
//! job log line and go through the same pacer. A snapshot is only queued while connected: one
//! taken offline would be stale by the time it could go, and the next one follows within 30 s.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus::proto::{MetricFamily, MetricType};
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::protocol::{
    new_message_id, now_ms, AgentMetrics, MetricBucket, MetricKind, MetricSample, Outbound,
};

/// Period of `agent.metrics` snapshots (the Node agent's).
pub const METRICS_PUSH_INTERVAL: Duration = Duration::from_secs(30);

/// The series of `families` as `agent.metrics` entries: counters `counter`, gauges `gauge`,
/// histograms `histogram` with cumulative finite buckets plus `count` and `sum`. Summaries and
/// untyped series (none are registered) are left out.
pub fn samples(families: &[MetricFamily]) -> Vec<MetricSample> {
    let mut samples = Vec::new();
    for family in families {
        for metric in family.get_metric() {
            let labels: BTreeMap<String, String> = metric
                .get_label()
                .iter()
                .map(|pair| (pair.name().to_owned(), pair.value().to_owned()))
                .collect();
            let sample = |kind, value| MetricSample {
                name: family.name().to_owned(),
                kind,
                value,
                labels: labels.clone(),
                buckets: None,
                count: None,
                sum: None,
            };
            match family.get_field_type() {
                MetricType::COUNTER => samples.push(sample(
                    MetricKind::Counter,
                    Some(metric.get_counter().get_value()),
                )),
                MetricType::GAUGE => samples.push(sample(
                    MetricKind::Gauge,
                    Some(metric.get_gauge().get_value()),
                )),
                MetricType::HISTOGRAM => {
                    let histogram = metric.get_histogram();
                    samples.push(MetricSample {
                        buckets: Some(
                            histogram
                                .get_bucket()
                                .iter()
                                // +Inf is not a JSON number; `count` carries it.
                                .filter(|b| b.upper_bound().is_finite())
                                .map(|b| MetricBucket {
                                    le: b.upper_bound(),
                                    count: b.cumulative_count(),
                                })
                                .collect(),
                        ),
                        count: Some(histogram.get_sample_count()),
                        sum: Some(histogram.get_sample_sum()),
                        ..sample(MetricKind::Histogram, None)
                    });
                }
                MetricType::SUMMARY | MetricType::UNTYPED => {}
            }
        }
    }
    samples
}

/// A snapshot of `metrics` as an `agent.metrics`, or `None` when there is no series.
pub fn snapshot(metrics: &Metrics, agent_id: &str) -> Option<Outbound> {
    let samples = samples(&metrics.gather());
    (!samples.is_empty()).then(|| {
        Outbound::AgentMetrics(AgentMetrics {
            message_id: new_message_id(),
            agent_id: agent_id.to_owned(),
            metrics: samples,
            timestamp: now_ms(),
        })
    })
}

/// Queues a snapshot at the lowest priority, if connected.
pub(crate) fn push_metrics(outbox: &Outbox, metrics: &Metrics, agent_id: &str) {
    if !outbox.is_connected() {
        return;
    }
    if let Some(message) = snapshot(metrics, agent_id) {
        outbox.push_telemetry(message);
    }
}

/// Pushes a snapshot every `period` until `stop`.
pub(crate) async fn push_metrics_every(
    period: Duration,
    outbox: Arc<Outbox>,
    metrics: Metrics,
    agent_id: String,
    stop: CancellationToken,
) {
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => push_metrics(&outbox, &metrics, &agent_id),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::{OutboxLimits, Pacer};
    use crate::protocol::JobState;

    #[test]
    fn snapshots_carry_counters_gauges_and_cumulative_histograms() {
        let metrics = Metrics::new();
        metrics.job_finished(JobState::Failed);
        metrics.jobs_active.set(2);
        metrics.clone_duration_seconds.observe(0.7);
        metrics.clone_duration_seconds.observe(20.0);
        let Some(Outbound::AgentMetrics(message)) = snapshot(&metrics, "agent-1") else {
            panic!("no snapshot");
        };
        assert_eq!(message.agent_id, "agent-1");
        let find = |name: &str| {
            message
                .metrics
                .iter()
                .find(|s| s.name == name)
                .unwrap_or_else(|| panic!("{name} missing"))
        };
        let jobs = |status: &str| {
            message
                .metrics
                .iter()
                .find(|s| s.name == "kici_agent_jobs_total" && s.labels["status"] == status)
                .unwrap_or_else(|| panic!("jobs_total{{status={status}}} missing"))
        };
        assert_eq!(jobs("failed").kind, MetricKind::Counter);
        assert_eq!(jobs("failed").value, Some(1.0));
        assert_eq!(jobs("success").value, Some(0.0));
        assert_eq!(find("kici_agent_jobs_active").value, Some(2.0));
        let clone = find("kici_agent_clone_duration_seconds");
        assert_eq!(clone.kind, MetricKind::Histogram);
        assert_eq!((clone.count, clone.sum), (Some(2), Some(20.7)));
        let buckets: Vec<(f64, u64)> = clone
            .buckets
            .as_ref()
            .unwrap()
            .iter()
            .map(|b| (b.le, b.count))
            .collect();
        assert_eq!(
            buckets,
            [
                (0.5, 0),
                (1.0, 1),
                (5.0, 1),
                (10.0, 1),
                (30.0, 2),
                (60.0, 2)
            ]
        );
        let text = serde_json::to_string(&Outbound::AgentMetrics(message.clone())).unwrap();
        assert!(
            text.starts_with(r#"{"type":"agent.metrics","messageId":"#),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_snapshot_is_queued_every_period_only_while_connected() {
        let outbox = Arc::new(Outbox::new(OutboxLimits::default(), Metrics::new()));
        let metrics = Metrics::new();
        metrics.jobs_active.set(1);
        let stop = CancellationToken::new();
        let task = tokio::spawn(push_metrics_every(
            Duration::from_secs(30),
            outbox.clone(),
            metrics,
            "a".into(),
            stop.clone(),
        ));
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert!(outbox.is_empty(), "queued while disconnected");
        outbox.set_connected(true);
        tokio::time::sleep(Duration::from_secs(30)).await;
        let mut pacer = Pacer::new(1e9, 1e9, 1e12, 1e12);
        let frame = outbox.next_frame(&mut pacer).await;
        assert_eq!(frame.message_type, "agent.metrics");
        assert!(outbox.is_empty());
        stop.cancel();
        task.await.unwrap();
    }
}
