//! Every log line arrives under the orchestrator's rate limits (the strict mock enforces the
//! real token buckets: 100 msg/s burst 200, 500 KiB/s burst 2 MiB, drop + warning, 4003).

mod common;

use std::time::Duration;

use common::{start, Harness};
use serde_json::json;

const LONG: Duration = Duration::from_secs(120);
/// 66 characters: each spew line is 79 characters + newline = 80 bytes.
const PAD: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcd";

fn spew_command(lines: u32) -> String {
    format!("seq 1 {lines} | awk '{{ printf \"spew %07d {PAD}\\n\", $1 }}'")
}

fn expected_line(i: u32) -> String {
    format!("spew {i:07} {PAD}")
}

async fn terminal(h: &Harness, job_id: &str) -> serde_json::Value {
    let job_id = job_id.to_owned();
    h.mock
        .wait_for_message(
            "job.status",
            move |m| {
                m["jobId"] == job_id.as_str()
                    && m["state"] != "running"
                    && m["state"] != "cancelling"
            },
            LONG,
        )
        .await
        .expect("terminal status")
}

fn assert_clean(h: &Harness) {
    assert_eq!(
        h.mock.rate_limit_warnings_sent(),
        0,
        "rate.limit.warning sent"
    );
    assert_eq!(h.mock.dropped_by_rate_limit(), 0);
    assert!(
        h.mock.closes().iter().all(|c| c.code != Some(4003)),
        "{:?}",
        h.mock.closes()
    );
    h.assert_no_violations();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_thousand_lines_arrive_up_to_the_default_cap_then_the_marker() {
    assert_eq!(expected_line(1).len(), 79);
    let h = start(|c| c).await;
    h.registered().await;
    h.dispatch(
        "spew",
        json!([{"name": "spew", "run": spew_command(200_000)}]),
    )
    .await;
    assert_eq!(terminal(&h, "spew").await["state"], "success");
    let lines = h.lines("spew", 0);
    // 79 bytes a line: the line that reaches 10 MiB is still sent, the next becomes the marker.
    let accepted = (10_485_760u64).div_ceil(79) as u32;
    assert_eq!(lines.len() as u32, accepted + 1);
    for (i, line) in lines[..accepted as usize].iter().enumerate() {
        assert_eq!(line, &expected_line(i as u32 + 1));
    }
    assert_eq!(
        lines.last().unwrap(),
        "[TRUNCATED: log output exceeded 10485760 bytes]"
    );
    assert_clean(&h);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_32_mib_cap_every_line_arrives_heartbeats_flow_and_a_new_dispatch_is_acked_fast() {
    let h = start(|c| {
        c.with_max_log_size_bytes(32 * 1024 * 1024)
            .with_max_concurrency(2)
            .with_job_heartbeat_interval(Duration::from_millis(500))
    })
    .await;
    h.registered().await;
    h.dispatch(
        "big",
        json!([{"name": "spew", "run": spew_command(200_000)}]),
    )
    .await;
    // While the backlog drains, a second dispatch is answered at once.
    assert!(
        h.mock
            .wait_until(|_| h.lines("big", 0).len() > 20_000, LONG)
            .await
    );
    h.dispatch("quick", json!([{"name": "q", "run": "echo quick"}]))
        .await;
    assert_eq!(terminal(&h, "quick").await["state"], "success");
    assert_eq!(terminal(&h, "big").await["state"], "success");
    // The ack overtook the queued backlog (8 MiB, about 100,000 lines) instead of waiting for
    // it: ordering, not wall time, so a loaded machine cannot fail it. The mock's 10 s ack
    // deadline still bounds the latency (a violation otherwise).
    let received = h.mock.received();
    let ack_at = received
        .iter()
        .position(|r| r.msg["type"] == "job.ack" && r.msg["jobId"] == "quick")
        .expect("quick acked");
    let big_lines_after_ack: usize = received[ack_at..]
        .iter()
        .filter(|r| r.msg["type"] == "log.chunk" && r.msg["jobId"] == "big")
        .map(|r| r.msg["lines"].as_array().map_or(0, Vec::len))
        .sum();
    assert!(
        big_lines_after_ack > 10_000,
        "only {big_lines_after_ack} queued lines went after the ack"
    );
    let lines = h.lines("big", 0);
    assert_eq!(lines.len(), 200_000);
    assert!(lines
        .iter()
        .enumerate()
        .all(|(i, l)| *l == expected_line(i as u32 + 1)));
    // job.heartbeat kept flowing during the ~30 s drain (every 500 ms here).
    let beats = h
        .job_messages("big")
        .iter()
        .filter(|m| m["type"] == "job.heartbeat")
        .count();
    assert!(beats >= 20, "only {beats} job.heartbeat during the drain");
    assert_clean(&h);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_twenty_thousand_lines_at_the_end_of_a_step_is_delivered() {
    let h = start(|c| c).await;
    h.registered().await;
    let burst =
        format!("awk 'BEGIN {{ for (i = 1; i <= 20000; i++) printf \"spew %07d {PAD}\\n\", i }}'");
    h.dispatch("burst", json!([{"name": "burst", "run": burst}]))
        .await;
    assert_eq!(terminal(&h, "burst").await["state"], "success");
    let lines = h.lines("burst", 0);
    assert_eq!(lines.len(), 20_000);
    assert_eq!(lines.last().unwrap(), &expected_line(20_000));
    assert_clean(&h);
}
