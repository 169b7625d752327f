//! Step-log pipeline before transport: raw bytes from a step's stdout/stderr become masked,
//! size-capped lines (spec agent.md §10.3 and §14.1, protocol.md §5.6).
//!
//! Batching the lines into `log.chunk` frames happens elsewhere.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::BTreeSet;
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

/// What ends a line, for the splitter and for splitting multi-line secrets alike.
const LINE_ENDS: [char; 2] = ['\n', '\r'];

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
        if line.len() < self.min_len {
            return Some(found);
        }
        let mut budget = Self::VERIFY_BASE + line.len() / Self::VERIFY_BYTES_PER_UNIT;
        for probe in (0..=line.len() - self.gram_len).step_by(self.stride) {
            let gram = gram_value(&line[probe..probe + self.gram_len]);
            let slot = self.slot(gram);
            if self.bits[slot >> 6] & (1 << (slot & 63)) == 0 {
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
            .fold(0, |value, &byte| value << 8 | u32::from(byte)),
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
#[derive(Debug, Default)]
pub struct LineSplitter {
    /// Bytes of the line not yet ended (never more than `MAX_LINE_BYTES` between calls).
    partial: Vec<u8>,
    /// The previous call ended with `\r`: a `\n` at the start of the next one belongs to it.
    skip_leading_lf: bool,
}

impl LineSplitter {
    /// A splitter with no buffered bytes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends the lines completed by `bytes` to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<String>) {
        self.push_raw(bytes, |line| out.push(lossy_string(line)));
    }

    /// Appends the held partial line, if any, to `out` (end of stream).
    pub fn finish(&mut self, out: &mut Vec<String>) {
        self.finish_raw(|line| out.push(lossy_string(line)));
    }

    /// Calls `on_line` with the raw bytes of every line completed by `bytes`.
    fn push_raw(&mut self, mut bytes: &[u8], mut on_line: impl FnMut(&[u8])) {
        if self.skip_leading_lf && !bytes.is_empty() {
            self.skip_leading_lf = false;
            if bytes[0] == b'\n' {
                bytes = &bytes[1..];
            }
        }
        while let Some(end) = find_line_end(bytes) {
            let mut next = end + 1;
            if bytes[end] == b'\r' {
                match bytes.get(next) {
                    Some(b'\n') => next += 1,
                    Some(_) => {}
                    None => self.skip_leading_lf = true,
                }
            }
            let line = &bytes[..end];
            if self.partial.is_empty() {
                emit_complete(line, &mut on_line);
            } else {
                self.partial.extend_from_slice(line);
                emit_complete(&self.partial, &mut on_line);
                self.partial.clear();
            }
            bytes = &bytes[next..];
        }
        self.hold_incomplete(bytes, &mut on_line);
    }

    /// Calls `on_line` with the held partial line, if any.
    fn finish_raw(&mut self, mut on_line: impl FnMut(&[u8])) {
        self.skip_leading_lf = false;
        if !self.partial.is_empty() {
            on_line(&self.partial);
            self.partial.clear();
        }
    }

    /// Keeps the unterminated tail, emitting full-size pieces so at most `MAX_LINE_BYTES` stay.
    fn hold_incomplete(&mut self, tail: &[u8], on_line: &mut impl FnMut(&[u8])) {
        if self.partial.is_empty() {
            let emitted = emit_oversized_pieces(tail, on_line);
            self.partial.extend_from_slice(&tail[emitted..]);
        } else {
            self.partial.extend_from_slice(tail);
            let emitted = emit_oversized_pieces(&self.partial, on_line);
            self.partial.drain(..emitted);
        }
    }
}

/// `raw` as text, invalid UTF-8 replaced by U+FFFD (validating first: the lossy decoder is slow).
fn lossy_string(raw: &[u8]) -> String {
    match std::str::from_utf8(raw) {
        Ok(text) => text.to_owned(),
        Err(_) => String::from_utf8_lossy(raw).into_owned(),
    }
}

/// Emits a complete line, cut into pieces when it is longer than `MAX_LINE_BYTES`.
fn emit_complete(line: &[u8], on_line: &mut impl FnMut(&[u8])) {
    let emitted = emit_oversized_pieces(line, on_line);
    on_line(&line[emitted..]);
}

/// Emits leading pieces while more than `MAX_LINE_BYTES` remain; returns the bytes emitted.
fn emit_oversized_pieces(data: &[u8], on_line: &mut impl FnMut(&[u8])) -> usize {
    let mut emitted = 0;
    while data.len() - emitted > MAX_LINE_BYTES {
        let rest = &data[emitted..];
        let cut = piece_end(rest);
        on_line(&rest[..cut]);
        emitted += cut;
    }
    emitted
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
        self.splitter.push_raw(bytes, |line| gate.accept(line, out));
    }

    /// Feeds one whole line from an executor that emits lines; embedded line ends split it.
    /// Independent of any partial line held from [`StepLog::push_bytes`].
    pub fn push_line(&mut self, line: &str, out: &mut Vec<String>) {
        if line.is_empty() {
            self.gate.accept(b"", out);
            return;
        }
        let gate = &mut self.gate;
        let mut splitter = LineSplitter::new();
        splitter.push_raw(line.as_bytes(), |piece| gate.accept(piece, out));
        splitter.finish_raw(|piece| gate.accept(piece, out));
    }

    /// Flushes the held partial last line (end of the step's output).
    pub fn finish(&mut self, out: &mut Vec<String>) {
        let gate = &mut self.gate;
        self.splitter.finish_raw(|line| gate.accept(line, out));
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
struct LineGate {
    masker: SecretMasker,
    cap_bytes: u64,
    bytes_streamed: u64,
    truncated: bool,
    dropped_lines: u64,
}

impl LineGate {
    fn accept(&mut self, raw: &[u8], out: &mut Vec<String>) {
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
        let line = match std::str::from_utf8(raw) {
            Ok(text) => self.masker.mask_line(text),
            Err(_) => self.masker.mask_line(&String::from_utf8_lossy(raw)),
        };
        self.bytes_streamed += line.len() as u64;
        out.push(line);
    }
}
