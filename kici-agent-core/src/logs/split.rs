//! Splitting a byte stream into lines: line ends, UTF-8 validation, the cut of overlong lines.

use std::fmt;
use std::ops::Range;

use super::MAX_LINE_BYTES;

/// Splits a byte stream into lines.
///
/// A line ends at `\n`, `\r\n` (one line end) or a bare `\r` (progress bars redraw with it).
/// A partial last line is held until more bytes arrive or [`LineSplitter::finish`]; a line
/// longer than [`MAX_LINE_BYTES`] is cut into pieces (at a character boundary when the bytes
/// are UTF-8). Invalid UTF-8 is replaced with U+FFFD, keeping the rest of the line.
#[derive(Default)]
pub struct LineSplitter {
    /// Bytes of the line not yet ended (never more than `MAX_LINE_BYTES` between calls).
    partial: Vec<u8>,
    /// The previous call ended with `\r`: a `\n` at the start of the next one belongs to it.
    skip_leading_lf: bool,
}

impl fmt::Debug for LineSplitter {
    /// Shows how much is held, never the (unmasked) bytes.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("LineSplitter")
            .field("held_bytes", &self.partial.len())
            .field("skip_leading_lf", &self.skip_leading_lf)
            .finish()
    }
}

impl LineSplitter {
    /// A splitter with no buffered bytes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the lines completed by `bytes` to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<String>) {
        self.push_raw(bytes, &mut |line| out.push(line.to_owned()));
    }

    /// Appends the held partial line, if any, to `out` (end of stream).
    pub fn finish(&mut self, out: &mut Vec<String>) {
        self.finish_raw(&mut |line| out.push(line.to_owned()));
    }

    /// Calls `on_line` with the text of every line completed by `bytes`.
    pub(super) fn push_raw(&mut self, bytes: &[u8], on_line: &mut impl FnMut(&str)) {
        let mut bytes = bytes;
        if self.skip_leading_lf && !bytes.is_empty() {
            self.skip_leading_lf = false;
            if bytes[0] == b'\n' {
                bytes = &bytes[1..];
            }
        }
        let chunk = Validated::new(bytes);
        let mut line_start = 0;
        while let Some(offset) = find_line_end(&bytes[line_start..]) {
            let end = line_start + offset;
            let mut next = end + 1;
            if bytes[end] == b'\r' {
                match bytes.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.skip_leading_lf = true,
                }
            }
            if self.partial.is_empty() {
                chunk.emit_complete(line_start..end, on_line);
            } else {
                self.partial.extend_from_slice(&bytes[line_start..end]);
                Validated::new(&self.partial).emit_complete(0..self.partial.len(), on_line);
                self.partial.clear();
            }
            line_start = next;
        }
        // Hold the unterminated rest, emitting full-size pieces so that at most
        // `MAX_LINE_BYTES` stay behind.
        if self.partial.is_empty() {
            let rest_start = chunk.emit_oversized(line_start..bytes.len(), on_line);
            self.partial.extend_from_slice(&bytes[rest_start..]);
        } else {
            self.partial.extend_from_slice(&bytes[line_start..]);
            if self.partial.len() > MAX_LINE_BYTES {
                let rest_start =
                    Validated::new(&self.partial).emit_oversized(0..self.partial.len(), on_line);
                self.partial.drain(..rest_start);
            }
        }
    }

    /// Takes the held partial line's bytes out, to be pushed again.
    pub(super) fn take_partial(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.partial)
    }

    /// Calls `on_line` with the held partial line, if any.
    pub(super) fn finish_raw(&mut self, on_line: &mut impl FnMut(&str)) {
        self.skip_leading_lf = false;
        if !self.partial.is_empty() {
            Validated::new(&self.partial).emit(0..self.partial.len(), on_line);
            self.partial.clear();
        }
    }
}

/// Bytes and their longest valid UTF-8 prefix: validating a whole write once is much cheaper
/// than validating each of its lines.
struct Validated<'a> {
    bytes: &'a [u8],
    text: &'a str,
}

impl<'a> Validated<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        let text = match std::str::from_utf8(bytes) {
            Ok(text) => text,
            Err(error) => std::str::from_utf8(&bytes[..error.valid_up_to()]).unwrap_or_default(),
        };
        Self { bytes, text }
    }

    /// Emits `bytes[range]`, with U+FFFD for invalid UTF-8 when it is outside the valid prefix.
    fn emit(&self, range: Range<usize>, on_line: &mut impl FnMut(&str)) {
        match self.text.get(range.clone()) {
            Some(line) => on_line(line),
            None => on_line(&String::from_utf8_lossy(&self.bytes[range])),
        }
    }

    /// Emits a complete line, cut into pieces when it is longer than `MAX_LINE_BYTES`.
    fn emit_complete(&self, range: Range<usize>, on_line: &mut impl FnMut(&str)) {
        let rest_start = self.emit_oversized(range.clone(), on_line);
        self.emit(rest_start..range.end, on_line);
    }

    /// Emits leading pieces while more than `MAX_LINE_BYTES` remain; returns where the rest
    /// starts.
    fn emit_oversized(&self, mut range: Range<usize>, on_line: &mut impl FnMut(&str)) -> usize {
        while range.len() > MAX_LINE_BYTES {
            let cut = range.start + piece_end(&self.bytes[range.clone()]);
            self.emit(range.start..cut, on_line);
            range.start = cut;
        }
        range.start
    }
}

/// Where to cut `data` (longer than `MAX_LINE_BYTES`): the last character boundary at or below
/// the limit, or the limit itself when the bytes there are not UTF-8.
fn piece_end(data: &[u8]) -> usize {
    let is_continuation = |byte: u8| byte & 0b1100_0000 == 0b1000_0000;
    (MAX_LINE_BYTES.saturating_sub(3)..=MAX_LINE_BYTES)
        .rev()
        .find(|&cut| cut > 0 && !is_continuation(data[cut]))
        .unwrap_or(MAX_LINE_BYTES)
}

/// Position of the first `\n` or `\r`.
fn find_line_end(bytes: &[u8]) -> Option<usize> {
    memchr::memchr2(b'\n', b'\r', bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::testing::*;

    #[test]
    fn splits_on_lf_crlf_and_bare_cr() {
        assert_eq!(
            split_all(&[b"one\ntwo\r\nthree\rfour\r\rfive"]),
            ["one", "two", "three", "four", "", "five"]
        );
        // "\r\n" split across writes is still one line end.
        assert_eq!(split_all(&[b"a\r", b"\nb\r", b"", b"\nc"]), ["a", "b", "c"]);
        assert_eq!(split_all(&[b"a\r", b"b"]), ["a", "b"]);
        assert_eq!(split_all(&[b"\n\n"]), ["", ""]);
    }

    #[test]
    fn holds_the_partial_last_line_until_finish() {
        let mut splitter = LineSplitter::new();
        let mut out = Vec::new();
        splitter.push(b"par", &mut out);
        splitter.push(b"tial", &mut out);
        assert!(out.is_empty());
        splitter.finish(&mut out);
        assert_eq!(out, ["partial"]);
        splitter.finish(&mut out);
        assert_eq!(out.len(), 1, "nothing left to flush");
    }

    #[test]
    fn replaces_invalid_utf8_and_keeps_the_rest() {
        assert_eq!(
            split_all(&[b"ok \xff\xfe tail\n"]),
            ["ok \u{FFFD}\u{FFFD} tail"]
        );
        // A character split across writes is reassembled, not replaced.
        let euro = "€".as_bytes();
        assert_eq!(split_all(&[&euro[..1], &euro[1..], b"\n"]), ["€"]);
        assert_eq!(split_all(&[b"a\n\xe2\x82", b"\xac\n"]), ["a", "€"]);
        // Lines after an invalid one in the same write are unaffected.
        assert_eq!(
            split_all(&[b"good\nbad \xff\nafter \xc3\xa9\n"]),
            ["good", "bad \u{FFFD}", "after é"]
        );
        let mut log = StepLog::new(masker(&["secret-value"]), u64::MAX);
        let lines = step_lines(&mut log, &[b"\xc3 secret-value \xff\n"]);
        assert_eq!(lines, ["\u{FFFD} *** \u{FFFD}"]);
    }

    #[test]
    fn cuts_overlong_lines_at_a_character_boundary() {
        let mut splitter = LineSplitter::new();
        let mut out = Vec::new();
        // Two-byte characters placed so that the limit falls inside one.
        let long = format!("x{}", "é".repeat(MAX_LINE_BYTES));
        splitter.push(long.as_bytes(), &mut out);
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|piece| piece.len() <= MAX_LINE_BYTES));
        assert!(out.iter().all(|piece| !piece.contains('\u{FFFD}')));
        assert!(splitter.partial.len() <= MAX_LINE_BYTES);
        splitter.push(b"\n", &mut out);
        assert_eq!(out.concat(), long);

        // Small writes adding up past the limit are cut the same way.
        let mut out = Vec::new();
        let quarter = "z".repeat(MAX_LINE_BYTES / 4 + 1);
        for _ in 0..4 {
            splitter.push(quarter.as_bytes(), &mut out);
        }
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].len(), MAX_LINE_BYTES);
        assert_eq!(splitter.partial.len(), 4);
        splitter.finish(&mut out);
        assert_eq!(out[1], "zzzz");

        let exact = "y".repeat(MAX_LINE_BYTES);
        assert_eq!(split_all(&[exact.as_bytes(), b"\n"]), [exact]);
    }
}
