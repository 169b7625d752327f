//! The `kici-mock-orchestrator` binary and its HTTP control API, as C and Python tests use them.

mod common;

use std::process::Stdio;

use common::{register, Client, PROMPT};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

/// One HTTP/1.1 request over a fresh connection; returns the status and the JSON body.
async fn http(base: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let host = base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(host).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(PROMPT * 2, stream.read_to_string(&mut response))
        .await
        .unwrap()
        .unwrap();
    let status = response.split(' ').nth(1).unwrap().parse().unwrap();
    let (_, body) = response.split_once("\r\n\r\n").unwrap();
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test]
async fn control_api_drives_the_mock_end_to_end() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kici-mock-orchestrator"))
        .args(["--no-auth", "--ack-timeout-ms", "5000"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).await.unwrap();
    let endpoints: Value = serde_json::from_str(&line).unwrap();
    let ws = endpoints["ws"].as_str().unwrap();
    let control = endpoints["control"].as_str().unwrap();
    assert!(
        ws.starts_with("ws://127.0.0.1:") && ws.ends_with("/ws"),
        "{ws}"
    );

    let mut client = Client::connect(ws).await;
    client.send(&register("bin-agent")).await;
    assert_eq!(client.recv().await["type"], "register.ack");
    assert_eq!(
        http(control, "GET", "/wait_agent?timeoutMs=5000", None).await,
        (200, json!({"agentId": "bin-agent"}))
    );
    assert_eq!(
        http(control, "GET", "/agents", None).await,
        (200, json!(["bin-agent"]))
    );

    let sample = json!({"runId": "r1", "jobId": "j1", "repoUrl": "file:///repo", "ref": "main",
                        "sha": "abc", "steps": [{"name": "unit", "hasOutputs": false}]});
    let (status, _) = http(
        control,
        "POST",
        "/dispatch",
        Some(json!({"agentId": "bin-agent", "sample": sample})),
    )
    .await;
    assert_eq!(status, 200);
    let dispatch = client.recv().await;
    assert_eq!(
        (dispatch["type"].as_str(), dispatch["jobId"].as_str()),
        (Some("job.dispatch"), Some("j1"))
    );
    client
        .send(
            &json!({"type": "job.ack", "messageId": "a", "runId": "r1", "jobId": "j1",
                      "timestamp": common::now_ms()}),
        )
        .await;
    let (status, ack) = http(
        control,
        "GET",
        "/wait?type=job.ack&jobId=j1&timeoutMs=5000",
        None,
    )
    .await;
    assert_eq!((status, ack["messageId"].as_str()), (200, Some("a")));
    let (status, _) = http(control, "GET", "/wait?type=job.status&timeoutMs=50", None).await;
    assert_eq!(status, 408);

    let (_, received) = http(control, "GET", "/received", None).await;
    let types: Vec<&str> = received
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["msg"]["type"].as_str().unwrap())
        .collect();
    assert_eq!(types, ["agent.register", "job.ack"]);
    assert_eq!(received[0]["accepted"], true);
    let (_, stats) = http(control, "GET", "/stats", None).await;
    assert_eq!(
        stats,
        json!({"rateLimitWarnings": 0, "droppedByRateLimit": 0, "violations": [], "tlsFailures": []})
    );

    let (status, _) = http(
        control,
        "POST",
        "/send_raw",
        Some(json!({"agentId": "bin-agent", "text": "{\"type\":\"x\"}"})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(client.recv().await["type"], "x");
    let (status, _) = http(
        control,
        "POST",
        "/cancel",
        Some(json!({"agentId": "nobody", "runId": "r", "jobId": "j"})),
    )
    .await;
    assert_eq!(status, 404);

    assert_eq!(http(control, "POST", "/shutdown", None).await.0, 200);
    assert_eq!(client.expect_close().await.0, Some(1001));
    let exit = tokio::time::timeout(PROMPT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test]
async fn sigterm_exits_cleanly_and_bad_flags_are_usage_errors() {
    let bad = Command::new(env!("CARGO_BIN_EXE_kici-mock-orchestrator"))
        .arg("--bogus")
        .output()
        .await
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));

    let mut child = Command::new(env!("CARGO_BIN_EXE_kici-mock-orchestrator"))
        .args(["--token", "kat_custom"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).await.unwrap();
    let endpoints: Value = serde_json::from_str(&line).unwrap();
    let mut client = Client::connect(endpoints["ws"].as_str().unwrap()).await;
    client.send(&common::auth_request("kat_custom")).await;
    assert_eq!(client.recv().await["type"], "auth.success");

    let pid = child.id().unwrap().to_string();
    let kill = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .unwrap();
    assert!(kill.success());
    let exit = tokio::time::timeout(PROMPT, child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(exit.success(), "{exit:?}");
}
