//! Step-log pipeline before transport: raw bytes from a step's stdout/stderr become masked,
//! size-capped lines (spec agent.md §10.3 and §14.1, protocol.md §5.6).
//!
//! Masking runs on the byte stream before it is split into lines, holding back only a tail
//! that may be the start of a secret, so a value is masked whatever split the pipeline or the
//! step makes: partial writes, the cut of an overlong line, a multi-line secret's line ends.
//! Batching the lines into `log.chunk` frames happens elsewhere.
//!
//! This file is the pipeline's face: its limits, [`StepLog`] (mask, then split, then cap), the
//! line gate that applies the cap, and [`truncation_marker`]. The rooms below it:
//! - `masker`: [`SecretMasker`], its compiled matcher and the sampled search of the hot path;
//! - `encodings`: the encoded forms of a secret a step may print (base64, percent, shell,
//!   JSON);
//! - `split`: [`LineSplitter`], line ends, UTF-8 validation and the cut of overlong lines.

use std::fmt;

mod encodings;
mod masker;
mod split;
#[cfg(test)]
mod testing;

pub use masker::{MaskerError, SecretMasker};
pub use split::LineSplitter;

/// What every occurrence of a secret is replaced with.
pub const MASK: &str = "***";

/// Values shorter than this many characters are never registered (spec §10.3).
pub const MIN_SECRET_CHARS: usize = 3;

/// A line of a multi-line secret is masked on its own only when it has at least this many
/// characters (after trimming). Shorter lines (`line`, `secret`, `}`, `-----`) are ordinary
/// words or punctuation that would mask unrelated log text, and carry too little of the secret
/// to be worth hiding; the lines of keys and certificates (64 characters of base64) are far
/// longer. The whole value is masked wherever it appears, whatever its lines.
pub const MIN_SECRET_LINE_CHARS: usize = 8;

/// Longest line the splitter holds back; a longer line is cut into pieces of at most this many
/// bytes so that a stream without newlines cannot grow memory without bound.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// What ends a line in a secret: trimmed from secrets, and where a multi-line secret is split into
/// its lines. (The splitter finds the same two bytes with `memchr2`.)
const LINE_ENDS: [char; 2] = ['\n', '\r'];

/// The line that replaces all output past the cap.
pub fn truncation_marker(cap_bytes: u64) -> String {
    format!("[TRUNCATED: log output exceeded {cap_bytes} bytes]")
}

/// One step's log (or the job-level log, step index -1): mask, then split, then cap.
///
/// Masking runs on the byte stream ahead of the splitter, holding back only a tail that may be
/// the start of a secret (see [`SecretMasker`]); a secret is masked whatever split the writes,
/// a line end inside a multi-line secret or the cut of an overlong line make.
///
/// Cap (spec §14.1): before a line is accepted, if the bytes accepted so far have reached the
/// cap, that line is replaced by `truncation_marker` (once) and every later line is dropped;
/// so the last accepted line may overshoot the cap. Bytes are counted as the UTF-8 length of the
/// masked line that is sent, without its line end. Empty lines are kept.
pub struct StepLog {
    masker: SecretMasker,
    /// Output bytes not masked yet: the tail that may be the start of a secret (never longer
    /// than the longest registered form, plus the lines a multi-line secret may span).
    unmasked: Vec<u8>,
    splitter: LineSplitter,
    gate: LineGate,
}

impl fmt::Debug for StepLog {
    /// Shows how much is held, never the (unmasked) bytes.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("StepLog")
            .field("masker", &self.masker)
            .field("unmasked_bytes", &self.unmasked.len())
            .field("splitter", &self.splitter)
            .field("gate", &self.gate)
            .finish()
    }
}

impl StepLog {
    /// A log that masks with `masker` and accepts about `cap_bytes` bytes.
    pub fn new(masker: SecretMasker, cap_bytes: u64) -> Self {
        Self {
            masker,
            unmasked: Vec::new(),
            splitter: LineSplitter::new(),
            gate: LineGate {
                cap_bytes,
                bytes_streamed: 0,
                truncated: false,
                dropped_lines: 0,
            },
        }
    }

    /// Swaps in a masker with more secrets (e.g. an OIDC token relayed mid-step); output not
    /// yet masked (the held tail and everything after) is masked with it.
    pub fn set_masker(&mut self, masker: SecretMasker) {
        self.masker = masker;
        // The splitter's partial line was masked with the old secrets only: mask it again.
        let mut unmasked = self.splitter.take_partial();
        unmasked.append(&mut self.unmasked);
        self.unmasked = unmasked;
    }

    /// Feeds raw output bytes; appends the lines ready to send to `out`.
    pub fn push_bytes(&mut self, bytes: &[u8], out: &mut Vec<String>) {
        self.mask_and_split(bytes, false, out);
    }

    /// Feeds one whole line from an executor that emits lines; embedded line ends split it.
    /// Independent of any partial line held from [`StepLog::push_bytes`].
    pub fn push_line(&mut self, line: &str, out: &mut Vec<String>) {
        if line.is_empty() {
            self.gate.accept("", out);
            return;
        }
        let masked = self.masker.mask(line);
        let gate = &mut self.gate;
        let mut accept = |piece: &str| gate.accept(piece, out);
        let mut splitter = LineSplitter::new();
        splitter.push_raw(masked.as_bytes(), &mut accept);
        splitter.finish_raw(&mut accept);
    }

    /// Flushes the held partial last line (end of the step's output).
    pub fn finish(&mut self, out: &mut Vec<String>) {
        self.mask_and_split(&[], true, out);
        let gate = &mut self.gate;
        self.splitter.finish_raw(&mut |line| gate.accept(line, out));
    }

    /// Masks what can be decided of the held tail plus `bytes` (everything when `at_end`) and
    /// splits it; keeps the undecided rest.
    fn mask_and_split(&mut self, bytes: &[u8], at_end: bool, out: &mut Vec<String>) {
        let Self {
            masker,
            unmasked,
            splitter,
            gate,
        } = self;
        let mut accept = |line: &str| gate.accept(line, out);
        let mut rest = bytes;
        if !unmasked.is_empty() {
            // Decide the held tail with the start of `bytes` only, so that a large write is
            // not copied behind it.
            let tail_len = unmasked.len();
            let seam_len = rest.len().min(masker.seam_bytes());
            unmasked.extend_from_slice(&rest[..seam_len]);
            let whole = seam_len == rest.len();
            let (spans, consumed) = masker.decide(unmasked, at_end && whole);
            if whole || consumed >= tail_len {
                split_masked(splitter, &unmasked[..consumed], spans, &mut accept);
                rest = &rest[(consumed.max(tail_len) - tail_len)..];
                if whole {
                    unmasked.drain(..consumed);
                    return;
                }
                unmasked.clear();
            } else {
                // The tail needs more than the seam (a long multi-line secret): take it all.
                unmasked.extend_from_slice(&rest[seam_len..]);
                let (spans, consumed) = masker.decide(unmasked, at_end);
                split_masked(splitter, &unmasked[..consumed], spans, &mut accept);
                unmasked.drain(..consumed);
                return;
            }
        }
        let (spans, consumed) = masker.decide(rest, at_end);
        split_masked(splitter, &rest[..consumed], spans, &mut accept);
        unmasked.extend_from_slice(&rest[consumed..]);
    }

    /// The spec's `logBytesStreamed`: UTF-8 bytes of the accepted (masked) lines, marker excluded.
    pub fn bytes_streamed(&self) -> u64 {
        self.gate.bytes_streamed
    }

    /// True once the cap was hit and the marker emitted.
    pub fn truncated(&self) -> bool {
        self.gate.truncated
    }

    /// Lines whose content was not sent because of the cap (including the one the marker
    /// replaced).
    pub fn dropped_lines(&self) -> u64 {
        self.gate.dropped_lines
    }
}

/// Feeds `data` to the splitter with each span replaced by `***`, piece by piece (no copy).
fn split_masked(
    splitter: &mut LineSplitter,
    data: &[u8],
    spans: Vec<(usize, usize)>,
    on_line: &mut impl FnMut(&str),
) {
    let mut copied_up_to = 0;
    for (start, end) in spans {
        splitter.push_raw(&data[copied_up_to..start], on_line);
        splitter.push_raw(MASK.as_bytes(), on_line);
        copied_up_to = end;
    }
    splitter.push_raw(&data[copied_up_to..], on_line);
}

/// The cap half of a [`StepLog`], applied to each split (already masked) line.
#[derive(Debug)]
struct LineGate {
    cap_bytes: u64,
    bytes_streamed: u64,
    truncated: bool,
    dropped_lines: u64,
}

impl LineGate {
    fn accept(&mut self, line: &str, out: &mut Vec<String>) {
        if self.truncated {
            self.dropped_lines += 1;
            return;
        }
        if self.bytes_streamed >= self.cap_bytes {
            self.truncated = true;
            self.dropped_lines += 1;
            out.push(truncation_marker(self.cap_bytes));
            return;
        }
        self.bytes_streamed += line.len() as u64;
        out.push(line.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::testing::*;

    #[test]
    fn masks_a_secret_split_across_writes() {
        let mut log = StepLog::new(masker(&["s3cr3t-token-value"]), u64::MAX);
        let lines = step_lines(&mut log, &[b"token=s3cr3t-to", b"ken-value done\n"]);
        assert_eq!(lines, ["token=*** done"]);
    }

    #[test]
    fn set_masker_applies_to_lines_not_yet_complete() {
        let mut log = StepLog::new(SecretMasker::new(), u64::MAX);
        let mut out = Vec::new();
        log.push_bytes(b"early oidc-token-123\nlate oidc-tok", &mut out);
        log.set_masker(masker(&["oidc-token-123"]));
        log.push_bytes(b"en-123\n", &mut out);
        assert_eq!(out, ["early oidc-token-123", "late ***"]);
    }

    #[test]
    fn any_split_of_the_writes_gives_the_same_lines() {
        let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
        for round in 0..300 {
            let secrets: Vec<String> = (0..1 + rng.below(4))
                .map(|_| {
                    let len = 3 + rng.below(12);
                    let secret = rng.text(b"abc\n", len);
                    if round % 3 == 0 {
                        secret
                    } else {
                        secret.replace('\n', "")
                    }
                })
                .collect();
            let masker = masker(&secrets.iter().map(String::as_str).collect::<Vec<_>>());
            let len = rng.below(400);
            let text = rng.text(b"abcab\n-", len);
            let whole = step_lines(
                &mut StepLog::new(masker.clone(), u64::MAX),
                &[text.as_bytes()],
            );
            let mut writes = Vec::new();
            let mut start = 0;
            while start < text.len() {
                let end = (start + 1 + rng.below(40)).min(text.len());
                writes.push(&text.as_bytes()[start..end]);
                start = end;
            }
            let split = step_lines(&mut StepLog::new(masker, u64::MAX), &writes);
            assert_eq!(split, whole, "secrets {secrets:?}, text {text:?}");
        }
    }

    #[test]
    fn caps_output_with_one_marker() {
        let mut log = StepLog::new(SecretMasker::new(), 10);
        let lines = step_lines(&mut log, &[b"12345\n\n67890\nabc\ndef\nghi"]);
        assert_eq!(
            lines,
            [
                "12345",
                "",
                "67890",
                "[TRUNCATED: log output exceeded 10 bytes]"
            ]
        );
        assert_eq!(log.bytes_streamed(), 10);
        assert!(log.truncated());
        assert_eq!(log.dropped_lines(), 3);
        let mut out = Vec::new();
        log.push_line("more", &mut out);
        assert!(out.is_empty());
        assert_eq!(log.dropped_lines(), 4);
    }

    #[test]
    fn the_line_that_crosses_the_cap_is_still_sent() {
        let mut log = StepLog::new(SecretMasker::new(), 3);
        let lines = step_lines(&mut log, &[b"123456789\nnext\n"]);
        assert_eq!(lines, ["123456789", &truncation_marker(3)]);
        assert_eq!(log.bytes_streamed(), 9);
        assert_eq!(log.dropped_lines(), 1);
    }

    #[test]
    fn counts_the_masked_text() {
        let mut log = StepLog::new(masker(&["a-long-secret-value"]), u64::MAX);
        let lines = step_lines(&mut log, &[b"k=a-long-secret-value\n"]);
        assert_eq!(lines, ["k=***"]);
        assert_eq!(log.bytes_streamed(), 5);
        assert!(!log.truncated());
    }

    #[test]
    fn push_line_splits_embedded_line_ends() {
        let mut log = StepLog::new(masker(&["pa55word"]), u64::MAX);
        let mut out = Vec::new();
        log.push_line("[0] info pa55word\nsecond\r\n", &mut out);
        log.push_line("", &mut out);
        assert_eq!(out, ["[0] info ***", "second", ""]);
        assert_eq!(log.bytes_streamed(), 18);
    }

    #[test]
    fn push_line_leaves_the_byte_stream_partial_alone() {
        let mut log = StepLog::new(SecretMasker::new(), u64::MAX);
        let mut out = Vec::new();
        log.push_bytes(b"progress", &mut out);
        log.push_line("structured", &mut out);
        log.push_bytes(b" done\n", &mut out);
        assert_eq!(out, ["structured", "progress done"]);
    }

    #[test]
    fn marker_text_matches_the_spec() {
        assert_eq!(
            truncation_marker(10_485_760),
            "[TRUNCATED: log output exceeded 10485760 bytes]"
        );
    }
}
