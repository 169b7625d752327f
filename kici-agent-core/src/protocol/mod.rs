//! Wire types of the orchestrator <-> agent WebSocket protocol (spec `protocol.md` §4).
//!
//! Every frame is one JSON object with a `type` tag. Outbound messages are built only from
//! [`Outbound`]; inbound frames are parsed by [`parse_inbound`], which never fails hard: an
//! unknown `type` or a frame that does not parse becomes [`Inbound::Unknown`] /
//! [`InboundError`] for the caller to log and ignore.
//!
//! Inbound structs keep fields this agent does not interpret in an `extra` map, so a dispatch
//! round-trips byte-for-byte-equivalent JSON (the fixture tests rely on that).
//!
//! One file per direction, re-exported here so every type is `protocol::X`: `inbound`
//! (orchestrator -> agent, `parse_inbound`), `job_config` (the `job.dispatch` and what it
//! carries: job config, steps, retry, clone credentials, secrets), `outbound` (agent ->
//! orchestrator).

mod inbound;
mod job_config;
mod outbound;

pub use inbound::*;
pub use job_config::*;
pub use outbound::*;

use serde::{Deserialize, Serialize};

/// The protocol version this agent speaks (`auth.request.protocolVersion`).
pub const PROTOCOL_VERSION: u32 = 1;

/// Unix epoch milliseconds, the unit of every `timestamp` field.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A fresh `messageId`.
pub fn new_message_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

/// The identifiers of a job, echoed on every job-scoped message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobRef {
    pub run_id: String,
    pub job_id: String,
}

/// The exact number of bytes `s` takes as a JSON string literal in serde_json's output,
/// quotes included. Used to pack log chunks under a byte budget without serialising twice.
pub fn json_string_len(s: &str) -> usize {
    let escapes: usize = s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | b'\n' | b'\r' | b'\t' | 0x08 | 0x0c => 1,
            0x00..=0x1f => 5,
            _ => 0,
        })
        .sum();
    s.len() + escapes + 2
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/real-orchestrator"
    );

    /// A file of the real orchestrator's recorded traffic, for every protocol test.
    pub(super) fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!("{FIXTURES}/{name}"))
            .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
    }

    #[test]
    fn json_string_len_matches_serde_json() {
        for s in [
            "plain",
            "quo\"te",
            "back\\slash",
            "ctl\u{1}\u{1f}",
            "tab\t\r\n",
            "ünï©ødé 😀",
            "",
        ] {
            assert_eq!(
                json_string_len(s),
                serde_json::to_string(s).unwrap().len(),
                "{s:?}"
            );
        }
    }
}
