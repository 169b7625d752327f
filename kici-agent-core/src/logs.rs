//! Step-log pipeline before transport: raw bytes from a step's stdout/stderr become masked,
//! size-capped lines (spec agent.md §10.3 and §14.1, protocol.md §5.6).
//!
//! Batching the lines into `log.chunk` frames happens elsewhere.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::BTreeSet;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine as _;

/// What every occurrence of a secret is replaced with.
pub const MASK: &str = "***";

/// Values shorter than this many characters are never registered (spec §10.3).
pub const MIN_SECRET_CHARS: usize = 3;

/// Longest line the splitter holds back; a longer line is cut into pieces of at most this many
/// bytes so that a stream without newlines cannot grow memory without bound.
pub const MAX_LINE_BYTES: usize = 64 * 1024;

/// What ends a line, for the splitter and for splitting multi-line secrets alike.
const LINE_ENDS: [char; 2] = ['\n', '\r'];

/// Registering secrets failed because the combined matcher could not be built (only happens
/// with an absurd amount of secret material). The masker keeps its previous secrets.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the secret matcher for {patterns} patterns: {source}")]
pub struct MaskerError {
    patterns: usize,
    #[source]
    source: aho_corasick::BuildError,
}

/// Accumulating secret masker.
///
/// The reference agent replaced its pattern set on each registration; this one accumulates.
/// A clone is a cheap snapshot (the state lives behind an `Arc` that `add` rebuilds), so a
/// secret added later is only seen by holders of the updated masker (see
/// [`StepLog::set_masker`]).
#[derive(Clone, Default)]
pub struct SecretMasker {
    inner: Arc<MaskerInner>,
}

impl fmt::Debug for SecretMasker {
    /// Shows how many patterns are registered, never the values.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("SecretMasker")
            .field("patterns", &self.inner.patterns.len())
            .finish()
    }
}

#[derive(Default)]
struct MaskerInner {
    /// Every registered literal, deduplicated.
    patterns: BTreeSet<String>,
    /// `None` while nothing is registered.
    matcher: Option<Matcher>,
}

/// The compiled form of a pattern set.
struct Matcher {
    /// Leftmost-longest search over all patterns, for arbitrary text and as the fallback for
    /// lines where the sampled search would do too much work.
    automaton: AhoCorasick,
    /// Fast search for single log lines (the hot path).
    line_search: SampledSearch,
}

impl SecretMasker {
    /// A masker with no secrets; it masks nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers one secret value; see [`SecretMasker::add_all`].
    pub fn add(&mut self, secret: &str) -> Result<(), MaskerError> {
        self.add_all([secret])
    }

    /// Registers secret values and rebuilds the matcher once.
    ///
    /// Values shorter than 3 characters, or only whitespace, are ignored. For each kept value its
    /// standard padded base64 is registered too. A multi-line value (PEM keys and the like) also
    /// registers each of its lines (trimmed, at least 3 characters) and their base64, because
    /// log masking runs line by line. On error the masker keeps its previous secrets.
    pub fn add_all<'a>(
        &mut self,
        secrets: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), MaskerError> {
        let mut patterns = self.inner.patterns.clone();
        let before = patterns.len();
        for secret in secrets {
            register_with_encodings(&mut patterns, secret);
            if secret.contains(LINE_ENDS) {
                for line in secret.split(LINE_ENDS) {
                    register_with_encodings(&mut patterns, line.trim());
                }
            }
        }
        if patterns.len() == before {
            return Ok(());
        }
        let matcher = Matcher::build(&patterns)?;
        self.inner = Arc::new(MaskerInner {
            patterns,
            matcher: Some(matcher),
        });
        Ok(())
    }

    /// Replaces every occurrence of a registered value with `***` (leftmost, longest first).
    /// Returns the input borrowed when nothing matched.
    pub fn mask<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let masked = self
            .inner
            .matcher
            .as_ref()
            .and_then(|matcher| matcher.masked_by_automaton(text));
        match masked {
            Some(masked) => Cow::Owned(masked),
            None => Cow::Borrowed(text),
        }
    }

    /// True when no value is registered.
    pub fn is_empty(&self) -> bool {
        self.inner.patterns.is_empty()
    }

    /// The masked copy of one log line, which holds no line end; same result as
    /// [`SecretMasker::mask`].
    fn mask_line(&self, line: &str) -> String {
        let Some(matcher) = &self.inner.matcher else {
            return line.to_owned();
        };
        let masked = match matcher.line_search.find(line.as_bytes()) {
            Some(spans) => with_spans_masked(line, spans),
            None => matcher.masked_by_automaton(line),
        };
        masked.unwrap_or_else(|| line.to_owned())
    }
}

impl Matcher {
    fn build(patterns: &BTreeSet<String>) -> Result<Self, MaskerError> {
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(patterns)
            .map_err(|source| MaskerError {
                patterns: patterns.len(),
                source,
            })?;
        // A pattern holding a line end can never occur inside one split line.
        let line_patterns = patterns
            .iter()
            .filter(|pattern| !pattern.contains(LINE_ENDS))
            .map(|pattern| pattern.as_bytes().to_vec())
            .collect();
        Ok(Self {
            automaton,
            line_search: SampledSearch::build(line_patterns),
        })
    }

    fn masked_by_automaton(&self, text: &str) -> Option<String> {
        let spans = self
            .automaton
            .find_iter(text)
            .map(|found| (found.start(), found.end()));
        with_spans_masked(text, spans)
    }
}

/// `text` with each `(start, end)` byte span (ascending, disjoint, on character boundaries)
/// replaced by `***`, or `None` when there is no span (so the caller can keep its own copy).
fn with_spans_masked(
    text: &str,
    spans: impl IntoIterator<Item = (usize, usize)>,
) -> Option<String> {
    let mut spans = spans.into_iter().peekable();
    spans.peek()?;
    let mut masked = String::with_capacity(text.len());
    let mut copied_up_to = 0;
    for (start, end) in spans {
        masked.push_str(&text[copied_up_to..start]);
        masked.push_str(MASK);
        copied_up_to = end;
    }
    masked.push_str(&text[copied_up_to..]);
    Some(masked)
}

/// Leftmost-longest search for many literals that looks at a fraction of the text.
///
/// With `m` the shortest pattern length and `q = min(m, 4)`, every occurrence of a pattern
/// covers exactly one text position `p` that is a multiple of `stride = m - q + 1`, at an
/// offset `d < stride` from the occurrence's start, and `text[p..p + q]` is then the pattern's
/// q-gram at `d`. So the index keeps the first `stride` q-grams of every pattern and the search
/// probes only every `stride`-th position: a hashed bit set rejects almost all probes, the
/// exact gram list the rest, and each surviving (pattern, offset) entry is compared in full.
/// An automaton would look at every byte and, for a few hundred patterns, is several times
/// slower on this hot path.
struct SampledSearch {
    /// Shortest pattern, in bytes; `usize::MAX` when there is none.
    min_len: usize,
    gram_len: usize,
    stride: usize,
    /// `32 - log2(bit count)`: the hash keeps the top bits of the product.
    hash_shift: u32,
    bits: Vec<u64>,
    /// Every indexed gram, sorted and deduplicated.
    grams: Vec<u32>,
    /// For `grams[i]`, the range of `entries` that hold it.
    gram_entries: Vec<Range<usize>>,
    entries: Vec<GramEntry>,
    patterns: Vec<Vec<u8>>,
}

/// "`patterns[pattern]` has the gram at `offset`".
struct GramEntry {
    pattern: usize,
    offset: usize,
}

impl SampledSearch {
    const MAX_GRAM: usize = 4;
    /// Bit-set size per indexed gram: about 3 % of probes get past it.
    const BITS_PER_GRAM: usize = 32;
    const MIN_TABLE_BITS: u32 = 10;
    const MAX_TABLE_BITS: u32 = 22;
    /// Full comparisons allowed per line: this many, plus one per `VERIFY_BYTES_PER_UNIT` bytes
    /// of line. Low-entropy secrets and text can need many more; those lines go to the
    /// automaton, whose cost is linear.
    const VERIFY_BASE: usize = 16;
    const VERIFY_BYTES_PER_UNIT: usize = 8;

    fn build(patterns: Vec<Vec<u8>>) -> Self {
        let min_len = patterns.iter().map(Vec::len).min();
        let gram_len = min_len.map_or(1, |len| len.min(Self::MAX_GRAM));
        let stride = min_len.map_or(1, |len| len - gram_len + 1);
        let mut indexed: Vec<(u32, GramEntry)> = patterns
            .iter()
            .enumerate()
            .flat_map(|(pattern, bytes)| {
                bytes
                    .windows(gram_len)
                    .take(stride)
                    .enumerate()
                    .map(move |(offset, gram)| (gram_value(gram), GramEntry { pattern, offset }))
            })
            .collect();
        indexed.sort_unstable_by_key(|(gram, _)| *gram);
        let mut grams = Vec::new();
        let mut gram_entries: Vec<Range<usize>> = Vec::new();
        let mut entries = Vec::with_capacity(indexed.len());
        for (gram, entry) in indexed {
            match gram_entries.last_mut() {
                Some(range) if grams.last() == Some(&gram) => range.end += 1,
                _ => {
                    grams.push(gram);
                    gram_entries.push(entries.len()..entries.len() + 1);
                }
            }
            entries.push(entry);
        }
        let table_bits = (grams.len() * Self::BITS_PER_GRAM)
            .next_power_of_two()
            .trailing_zeros()
            .clamp(Self::MIN_TABLE_BITS, Self::MAX_TABLE_BITS);
        let mut search = Self {
            min_len: min_len.unwrap_or(usize::MAX),
            gram_len,
            stride,
            hash_shift: 32 - table_bits,
            bits: vec![0; 1 << (table_bits - 6)],
            grams,
            gram_entries,
            entries,
            patterns,
        };
        for index in 0..search.grams.len() {
            let slot = search.slot(search.grams[index]);
            search.bits[slot >> 6] |= 1 << (slot & 63);
        }
        search
    }

    /// The leftmost-longest non-overlapping occurrences in `line` as ascending `(start, end)`
    /// spans, or `None` when the line needs more full comparisons than its budget.
    fn find(&self, line: &[u8]) -> Option<Vec<(usize, usize)>> {
        let mut found = Vec::new();
        if !self.may_match(line) {
            return Some(found);
        }
        let mut budget = Self::VERIFY_BASE + line.len() / Self::VERIFY_BYTES_PER_UNIT;
        for probe in self.probes(line) {
            let gram = gram_value(&line[probe..probe + self.gram_len]);
            if self.gram_bit(gram) == 0 {
                continue;
            }
            let Ok(index) = self.grams.binary_search(&gram) else {
                continue;
            };
            for entry in &self.entries[self.gram_entries[index].clone()] {
                budget = budget.checked_sub(1)?;
                let Some(start) = probe.checked_sub(entry.offset) else {
                    continue;
                };
                let pattern = &self.patterns[entry.pattern];
                if line[start..].starts_with(pattern) {
                    found.push((start, start + pattern.len()));
                }
            }
        }
        // Every occurrence is now known; keep what a leftmost-longest scan would report.
        found.sort_unstable_by_key(|&(start, end)| (start, Reverse(end)));
        let mut covered_up_to = 0;
        found.retain(|&(start, end)| {
            let keep = start >= covered_up_to;
            if keep {
                covered_up_to = end;
            }
            keep
        });
        Some(found)
    }

    /// Whether any sampled gram of `line` passes the bit set. Branch-free, so the table
    /// loads of one line overlap instead of stalling one after another.
    fn may_match(&self, line: &[u8]) -> bool {
        let mut any = 0;
        for probe in self.probes(line) {
            any |= self.gram_bit(gram_value(&line[probe..probe + self.gram_len]));
        }
        any != 0
    }

    /// The sampled positions of `line`: none when it is shorter than every pattern.
    fn probes(&self, line: &[u8]) -> impl Iterator<Item = usize> {
        let end = if line.len() < self.min_len {
            0
        } else {
            line.len() - self.gram_len + 1
        };
        // Not `step_by`: its set-up divides, which costs as much as the probes of a short line.
        let stride = self.stride;
        std::iter::successors(Some(0), move |probe| Some(probe + stride))
            .take_while(move |&probe| probe < end)
    }

    /// 1 when `gram` may be indexed, 0 when it certainly is not.
    fn gram_bit(&self, gram: u32) -> u64 {
        let slot = self.slot(gram);
        (self.bits[slot >> 6] >> (slot & 63)) & 1
    }

    fn slot(&self, gram: u32) -> usize {
        (gram.wrapping_mul(0x9E37_79B1) >> self.hash_shift) as usize
    }
}

/// Packs up to four bytes into a number (one load for the common four-byte case).
fn gram_value(gram: &[u8]) -> u32 {
    match gram {
        [a, b, c, d] => u32::from_le_bytes([*a, *b, *c, *d]),
        _ => gram
            .iter()
            .fold(0, |value, &byte| (value << 8) | u32::from(byte)),
    }
}

/// Adds `value` and its base64 form when it is long enough to be worth masking.
fn register_with_encodings(patterns: &mut BTreeSet<String>, value: &str) {
    if value.chars().count() < MIN_SECRET_CHARS || value.trim().is_empty() {
        return;
    }
    patterns.insert(base64::engine::general_purpose::STANDARD.encode(value));
    patterns.insert(value.to_owned());
}

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
    fn push_raw(&mut self, bytes: &[u8], on_line: &mut impl FnMut(&str)) {
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

    /// Calls `on_line` with the held partial line, if any.
    fn finish_raw(&mut self, on_line: &mut impl FnMut(&str)) {
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

/// Position of the first `\n` or `\r`, scanning eight bytes at a time.
fn find_line_end(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    // Flags zero bytes; only bytes above the first true zero can be false positives, so the
    // lowest flag is exact.
    let zero_bytes = |word: u64| word.wrapping_sub(ONES) & !word & HIGHS;
    let mut words = bytes.chunks_exact(8);
    let mut offset = 0;
    for chunk in &mut words {
        let mut raw = [0u8; 8];
        raw.copy_from_slice(chunk);
        let word = u64::from_le_bytes(raw);
        let hits = zero_bytes(word ^ (ONES * u64::from(b'\n')))
            | zero_bytes(word ^ (ONES * u64::from(b'\r')));
        if hits != 0 {
            return Some(offset + (hits.trailing_zeros() / 8) as usize);
        }
        offset += 8;
    }
    words
        .remainder()
        .iter()
        .position(|&byte| byte == b'\n' || byte == b'\r')
        .map(|position| offset + position)
}

/// The line that replaces all output past the cap.
pub fn truncation_marker(cap_bytes: u64) -> String {
    format!("[TRUNCATED: log output exceeded {cap_bytes} bytes]")
}

/// One step's log (or the job-level log, step index -1): split, then mask, then cap.
///
/// Cap (spec §14.1): before a line is accepted, if the bytes accepted so far have reached the
/// cap, that line is replaced by [`truncation_marker`] (once) and every later line is dropped;
/// so the last accepted line may overshoot the cap. Bytes are counted as the UTF-8 length of the
/// masked line that is sent, without its line end. Empty lines are kept.
#[derive(Debug)]
pub struct StepLog {
    splitter: LineSplitter,
    gate: LineGate,
}

impl StepLog {
    /// A log that masks with `masker` and accepts about `cap_bytes` bytes.
    pub fn new(masker: SecretMasker, cap_bytes: u64) -> Self {
        Self {
            splitter: LineSplitter::new(),
            gate: LineGate {
                masker,
                cap_bytes,
                bytes_streamed: 0,
                truncated: false,
                dropped_lines: 0,
            },
        }
    }

    /// Swaps in a masker with more secrets (e.g. an OIDC token relayed mid-step); lines not yet
    /// completed are masked with it.
    pub fn set_masker(&mut self, masker: SecretMasker) {
        self.gate.masker = masker;
    }

    /// Feeds raw output bytes; appends the lines ready to send to `out`.
    pub fn push_bytes(&mut self, bytes: &[u8], out: &mut Vec<String>) {
        let gate = &mut self.gate;
        self.splitter
            .push_raw(bytes, &mut |line| gate.accept(line, out));
    }

    /// Feeds one whole line from an executor that emits lines; embedded line ends split it.
    /// Independent of any partial line held from [`StepLog::push_bytes`].
    pub fn push_line(&mut self, line: &str, out: &mut Vec<String>) {
        if line.is_empty() {
            self.gate.accept("", out);
            return;
        }
        let gate = &mut self.gate;
        let mut accept = |piece: &str| gate.accept(piece, out);
        let mut splitter = LineSplitter::new();
        splitter.push_raw(line.as_bytes(), &mut accept);
        splitter.finish_raw(&mut accept);
    }

    /// Flushes the held partial last line (end of the step's output).
    pub fn finish(&mut self, out: &mut Vec<String>) {
        let gate = &mut self.gate;
        self.splitter.finish_raw(&mut |line| gate.accept(line, out));
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

/// The mask-and-cap half of a [`StepLog`], applied to each split line.
#[derive(Debug)]
struct LineGate {
    masker: SecretMasker,
    cap_bytes: u64,
    bytes_streamed: u64,
    truncated: bool,
    dropped_lines: u64,
}

impl LineGate {
    fn accept(&mut self, text: &str, out: &mut Vec<String>) {
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
        let line = self.masker.mask_line(text);
        self.bytes_streamed += line.len() as u64;
        out.push(line);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masker(secrets: &[&str]) -> SecretMasker {
        let mut masker = SecretMasker::new();
        masker
            .add_all(secrets.iter().copied())
            .expect("test secrets build");
        masker
    }

    fn base64(value: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(value)
    }

    fn split_all(writes: &[&[u8]]) -> Vec<String> {
        let mut splitter = LineSplitter::new();
        let mut out = Vec::new();
        for write in writes {
            splitter.push(write, &mut out);
        }
        splitter.finish(&mut out);
        out
    }

    fn step_lines(log: &mut StepLog, writes: &[&[u8]]) -> Vec<String> {
        let mut out = Vec::new();
        for write in writes {
            log.push_bytes(write, &mut out);
        }
        log.finish(&mut out);
        out
    }

    /// Deterministic pseudo-random numbers for the comparison tests.
    struct XorShift(u64);

    impl XorShift {
        fn below(&mut self, bound: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % bound as u64) as usize
        }

        fn text(&mut self, alphabet: &[u8], len: usize) -> String {
            (0..len)
                .map(|_| char::from(alphabet[self.below(alphabet.len())]))
                .collect()
        }
    }

    #[test]
    fn masks_plain_and_base64_forms() {
        let masker = masker(&["hunter2pass"]);
        assert_eq!(masker.mask("login hunter2pass ok"), "login *** ok");
        let encoded = format!("auth: {}", base64("hunter2pass"));
        assert_eq!(masker.mask(&encoded), "auth: ***");

        let mut log = StepLog::new(masker, u64::MAX);
        let lines = step_lines(&mut log, &[encoded.as_bytes(), b"\nx hunter2pass\n"]);
        assert_eq!(lines, ["auth: ***", "x ***"]);
    }

    #[test]
    fn masks_each_line_of_a_multi_line_secret() {
        let pem = "-----BEGIN KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX\n  6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu  \n-----END KEY-----\n";
        let masker = masker(&[pem]);
        let mut log = StepLog::new(masker.clone(), u64::MAX);
        let lines = step_lines(&mut log, &[pem.as_bytes()]);
        assert_eq!(lines, ["***", "***", "  ***  ", "***"]);
        assert_eq!(masker.mask(&format!("error: {pem}")), "error: ***");
        let line_base64 = base64("MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX");
        assert_eq!(masker.mask(&line_base64), "***");
    }

    #[test]
    fn masks_a_secret_split_across_writes() {
        let mut log = StepLog::new(masker(&["s3cr3t-token-value"]), u64::MAX);
        let lines = step_lines(&mut log, &[b"token=s3cr3t-to", b"ken-value done\n"]);
        assert_eq!(lines, ["token=*** done"]);
    }

    #[test]
    fn longest_overlapping_secret_wins() {
        let masker = masker(&["abcdef", "abcdefgh", "defghijk"]);
        assert_eq!(masker.mask("x abcdefgh y"), "x *** y");
        // Leftmost first, then longest at that start.
        assert_eq!(masker.mask("abcdefghijk"), "***ijk");
        let mut log = StepLog::new(masker, u64::MAX);
        assert_eq!(step_lines(&mut log, &[b"abcdefghijk\n"]), ["***ijk"]);
    }

    #[test]
    fn ignores_short_and_blank_values() {
        let masker = masker(&["ab", "x", "", "   \t"]);
        assert!(masker.is_empty());
        assert!(matches!(masker.mask("ab x ab"), Cow::Borrowed("ab x ab")));
        let masker = self::masker(&["abc"]);
        assert_eq!(masker.mask("abcd ab"), "***d ab");
    }

    #[test]
    fn registrations_accumulate_and_clones_are_snapshots() {
        let mut masker = masker(&["first-secret"]);
        assert_eq!(masker.mask("first-secret"), "***");
        let before = masker.clone();
        masker.add("second-secret").expect("builds");
        assert_eq!(masker.mask("first-secret second-secret"), "*** ***");
        assert_eq!(before.mask("second-secret"), "second-secret");
        masker.add("first-secret").expect("duplicate is accepted");
        assert_eq!(format!("{masker:?}"), "SecretMasker { patterns: 4 }");
        let mut splitter = LineSplitter::new();
        splitter.push(b"first-secret", &mut Vec::new());
        assert!(!format!("{splitter:?}").contains("first"));
    }

    #[test]
    fn mask_borrows_when_nothing_matches() {
        assert!(matches!(
            SecretMasker::new().mask("plain"),
            Cow::Borrowed("plain")
        ));
        let masker = masker(&["secret-value"]);
        assert!(matches!(masker.mask("plain text"), Cow::Borrowed(_)));
        assert!(matches!(masker.mask("a secret-value"), Cow::Owned(_)));
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
    fn sampled_line_search_agrees_with_the_automaton() {
        let mut rng = XorShift(0x2545_F491_4F6C_DD1D);
        // A tiny alphabet makes overlaps, shared grams and dense lines common.
        let alphabet = b"abc";
        for round in 0..200 {
            let count = 1 + rng.below(12);
            let secrets: Vec<String> = (0..count)
                .map(|_| {
                    let len = 3 + rng.below(if round % 2 == 0 { 4 } else { 20 });
                    rng.text(alphabet, len)
                })
                .collect();
            let masker = masker(&secrets.iter().map(String::as_str).collect::<Vec<_>>());
            for _ in 0..20 {
                let len = rng.below(120);
                let line = rng.text(b"abcab -", len);
                assert_eq!(
                    masker.mask_line(&line),
                    masker.mask(&line),
                    "secrets {secrets:?}, line {line:?}"
                );
            }
        }
    }

    #[test]
    fn dense_lines_fall_back_to_the_automaton() {
        let masker = masker(&["aaa", "aaaa", "aaaaa"]);
        let line = "a".repeat(1000);
        let search = &masker.inner.matcher.as_ref().expect("built").line_search;
        assert!(search.find(line.as_bytes()).is_none());
        assert_eq!(masker.mask_line(&line), masker.mask(&line));
    }

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
