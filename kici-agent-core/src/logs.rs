//! Step-log pipeline before transport: raw bytes from a step's stdout/stderr become masked,
//! size-capped lines (spec agent.md §10.3 and §14.1, protocol.md §5.6).
//!
//! Masking runs on the byte stream before it is split into lines, holding back only a tail
//! that may be the start of a secret, so a value is masked whatever split the pipeline or the
//! step makes: partial writes, the cut of an overlong line, a multi-line secret's line ends.
//! Batching the lines into `log.chunk` frames happens elsewhere.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::BTreeSet;
use std::fmt;
use std::fmt::Write as _;
use std::ops::Range;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};
use base64::Engine as _;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

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
    /// Non-empty values that were too short (or blank) to mask.
    too_short: usize,
    /// `None` while nothing is registered.
    matcher: Option<Arc<Matcher>>,
}

/// The compiled form of a pattern set.
struct Matcher {
    /// Search for every occurrence, overlapping ones included: the fallback for text where
    /// the sampled search would do too much work.
    automaton: AhoCorasick,
    /// Fast search (the hot path).
    sampled: SampledSearch,
    /// Longest pattern, in bytes.
    longest: usize,
    /// Longest pattern without a line end, in bytes.
    longest_single_line: usize,
    /// Patterns holding a line end (raw multi-line secrets): few, checked one by one for a
    /// partial occurrence at the end of a stream buffer.
    multi_line: Vec<Vec<u8>>,
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
    /// Values shorter than 3 characters, or only whitespace, are not masked (they are counted,
    /// see [`SecretMasker::too_short`]). For each kept value these forms are registered too:
    /// standard base64 of the value and of the value plus a newline (`echo "$S" | base64`),
    /// the base64 of the value inside a longer encoded string at each of the three byte
    /// alignments (what does not depend on the neighbouring bytes), URL encoding (`%20` or
    /// `+` for a space; the sets of characters left as they are by RFC 3986, Python, HTML
    /// forms and JavaScript's `encodeURIComponent`), shell escaping
    /// (bash `printf %q` and inside double quotes) and JSON string escaping (as is, and with
    /// non-ASCII as `\uXXXX`). A multi-line value also registers each of its lines that has at
    /// least [`MIN_SECRET_LINE_CHARS`] characters (trimmed), with the same forms. On error the
    /// masker keeps its previous secrets.
    pub fn add_all<'a>(
        &mut self,
        secrets: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), MaskerError> {
        let mut patterns = self.inner.patterns.clone();
        let mut too_short = self.inner.too_short;
        let before = patterns.len();
        for given in secrets {
            // Surrounding line ends are left in the log, so that the next line stays apart.
            let secret = given.trim_matches(LINE_ENDS);
            if secret.chars().count() < MIN_SECRET_CHARS || secret.trim().is_empty() {
                too_short += usize::from(!given.is_empty());
                continue;
            }
            register_with_encodings(&mut patterns, secret);
            if secret.contains(LINE_ENDS) {
                for line in secret.split(LINE_ENDS).map(str::trim) {
                    if line.chars().count() >= MIN_SECRET_LINE_CHARS {
                        register_with_encodings(&mut patterns, line);
                    }
                }
            }
        }
        if patterns.len() == before {
            if too_short != self.inner.too_short {
                self.inner = Arc::new(MaskerInner {
                    patterns,
                    too_short,
                    matcher: self.inner.matcher.clone(),
                });
            }
            return Ok(());
        }
        let matcher = Matcher::build(&patterns)?;
        self.inner = Arc::new(MaskerInner {
            patterns,
            too_short,
            matcher: Some(Arc::new(matcher)),
        });
        Ok(())
    }

    /// How many non-empty values given to this masker were too short (under
    /// [`MIN_SECRET_CHARS`] characters) or blank, and so are not masked.
    pub fn too_short(&self) -> usize {
        self.inner.too_short
    }

    /// Replaces every occurrence of a registered value with `***` (overlapping occurrences
    /// together). Returns the input borrowed when nothing matched.
    pub fn mask<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let Some(matcher) = &self.inner.matcher else {
            return Cow::Borrowed(text);
        };
        let spans = matcher.spans(text.as_bytes());
        match with_spans_masked(text.as_bytes(), spans) {
            // Patterns are UTF-8 and so is the text: every span starts and ends on a
            // character boundary, and the result is UTF-8.
            Some(masked) => Cow::Owned(
                String::from_utf8(masked)
                    .unwrap_or_else(|error| String::from_utf8_lossy(error.as_bytes()).into_owned()),
            ),
            None => Cow::Borrowed(text),
        }
    }

    /// `value` with every string in it (object keys included) masked, or `None` when nothing
    /// in it holds a secret.
    pub fn mask_json(&self, value: &serde_json::Value) -> Option<serde_json::Value> {
        use serde_json::Value;
        match value {
            Value::String(text) => match self.mask(text) {
                Cow::Owned(masked) => Some(Value::String(masked)),
                Cow::Borrowed(_) => None,
            },
            Value::Array(items) => {
                let masked: Vec<Option<Value>> =
                    items.iter().map(|item| self.mask_json(item)).collect();
                masked.iter().any(Option::is_some).then(|| {
                    Value::Array(
                        masked
                            .into_iter()
                            .zip(items)
                            .map(|(masked, item)| masked.unwrap_or_else(|| item.clone()))
                            .collect(),
                    )
                })
            }
            Value::Object(fields) => {
                let mut changed = false;
                let masked = fields
                    .iter()
                    .map(|(key, item)| {
                        let masked_key = self.mask(key);
                        let masked_item = self.mask_json(item);
                        changed |= matches!(masked_key, Cow::Owned(_)) || masked_item.is_some();
                        (
                            masked_key.into_owned(),
                            masked_item.unwrap_or_else(|| item.clone()),
                        )
                    })
                    .collect();
                changed.then_some(Value::Object(masked))
            }
            Value::Null | Value::Bool(_) | Value::Number(_) => None,
        }
    }

    /// Masks step outputs in place, keys and values (strings anywhere in a JSON value); returns
    /// the (masked) keys of the outputs that held a secret.
    ///
    /// Outputs are masked, not refused: the job goes on with `***` where the secret was, as its
    /// logs do, and a step whose only fault is echoing a secret into an output does not fail
    /// its job or lose its other outputs.
    pub fn mask_outputs(&self, outputs: &mut [(String, serde_json::Value)]) -> Vec<String> {
        let mut masked_keys = Vec::new();
        for (key, value) in outputs {
            let masked_key = self.mask(key);
            let masked_value = self.mask_json(value);
            if matches!(masked_key, Cow::Borrowed(_)) && masked_value.is_none() {
                continue;
            }
            *key = masked_key.into_owned();
            if let Some(masked_value) = masked_value {
                *value = masked_value;
            }
            masked_keys.push(key.clone());
        }
        masked_keys
    }

    /// Whether `other` is this masker or a clone of it (no value added to either since).
    pub fn is_same(&self, other: &SecretMasker) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }

    /// True when no value is registered.
    pub fn is_empty(&self) -> bool {
        self.inner.patterns.is_empty()
    }

    /// Decides the start of a stream buffer: returns the spans to mask in `data[..consumed]`
    /// and `consumed`. `data[consumed..]` may be the start of a secret and must be offered
    /// again with the bytes that follow it (or with `at_end` once nothing follows). Deciding a
    /// prefix of a buffer and then the rest gives the same spans as deciding it whole.
    fn decide(&self, data: &[u8], at_end: bool) -> (Vec<(usize, usize)>, usize) {
        let Some(matcher) = &self.inner.matcher else {
            return (Vec::new(), data.len());
        };
        let held_from = if at_end {
            data.len()
        } else {
            matcher.held_tail_start(data)
        };
        let mut consumed = held_from;
        let mut spans = matcher.spans(data);
        // Spans starting in the held tail are found again with the bytes that follow.
        spans.retain(|&(start, _)| start < held_from);
        // A span reaching into the held tail may grow with the bytes that follow (overlapping
        // occurrences are merged), so it is held whole; unless it is absurdly long (output
        // that repeats a self-overlapping secret), which must not hold memory without bound.
        if let Some(&(start, end)) = spans.last() {
            if end > held_from {
                if end - start <= MAX_LINE_BYTES {
                    consumed = start;
                    spans.pop();
                } else {
                    consumed = end;
                }
            }
        }
        (spans, consumed)
    }

    /// How many bytes after a held tail are enough to decide it: twice the longest pattern.
    fn seam_bytes(&self) -> usize {
        self.inner
            .matcher
            .as_ref()
            .map_or(0, |matcher| 2 * matcher.longest)
            .max(256)
    }
}

impl Matcher {
    fn build(patterns: &BTreeSet<String>) -> Result<Self, MaskerError> {
        let automaton = AhoCorasick::builder()
            .match_kind(MatchKind::Standard)
            .build(patterns)
            .map_err(|source| MaskerError {
                patterns: patterns.len(),
                source,
            })?;
        let (multi_line, single_line): (Vec<&String>, Vec<&String>) = patterns
            .iter()
            .partition(|pattern| pattern.contains(LINE_ENDS));
        Ok(Self {
            automaton,
            sampled: SampledSearch::build(
                patterns
                    .iter()
                    .map(|pattern| pattern.as_bytes().to_vec())
                    .collect(),
            ),
            longest: patterns.iter().map(String::len).max().unwrap_or(0),
            longest_single_line: single_line.iter().map(|p| p.len()).max().unwrap_or(0),
            multi_line: multi_line
                .into_iter()
                .map(|pattern| pattern.as_bytes().to_vec())
                .collect(),
        })
    }

    /// The occurrences in `text`, merged into ascending disjoint spans.
    fn spans(&self, text: &[u8]) -> Vec<(usize, usize)> {
        self.sampled.find(text).unwrap_or_else(|| {
            merged(
                self.automaton
                    .find_overlapping_iter(text)
                    .map(|found| (found.start(), found.end()))
                    .collect(),
            )
        })
    }

    /// Where the tail of `data` that may be the start of an occurrence begins (`data.len()`
    /// when there is none).
    fn held_tail_start(&self, data: &[u8]) -> usize {
        let end = data.len();
        // A partial single-line occurrence is shorter than the longest such pattern and holds
        // no line end, so it lies in the last line (which the splitter holds anyway).
        let mut held_from = end.saturating_sub(self.longest_single_line.saturating_sub(1));
        if let Some(line_end) = memchr::memrchr2(b'\n', b'\r', &data[held_from..]) {
            held_from += line_end + 1;
        }
        // A multi-line pattern may span complete lines: hold from its earliest partial
        // occurrence.
        for pattern in &self.multi_line {
            let first = end.saturating_sub(pattern.len() - 1);
            if let Some(start) =
                (first..held_from).find(|&start| pattern.starts_with(&data[start..]))
            {
                held_from = start;
            }
        }
        held_from
    }
}

/// `text` with each `(start, end)` byte span (ascending, disjoint) replaced by `***`, or `None`
/// when there is no span (so the caller can keep its own copy).
fn with_spans_masked(
    text: &[u8],
    spans: impl IntoIterator<Item = (usize, usize)>,
) -> Option<Vec<u8>> {
    let mut spans = spans.into_iter().peekable();
    spans.peek()?;
    let mut masked = Vec::with_capacity(text.len());
    let mut copied_up_to = 0;
    for (start, end) in spans {
        masked.extend_from_slice(&text[copied_up_to..start]);
        masked.extend_from_slice(MASK.as_bytes());
        copied_up_to = end;
    }
    masked.extend_from_slice(&text[copied_up_to..]);
    Some(masked)
}

/// The union of `occurrences` as ascending, disjoint spans: overlapping occurrences become one
/// span, so that no part of any occurrence is left unmasked (a leftmost-longest choice would
/// show the tail of a secret that overlaps an earlier one).
fn merged(mut occurrences: Vec<(usize, usize)>) -> Vec<(usize, usize)> {
    occurrences.sort_unstable_by_key(|&(start, end)| (start, Reverse(end)));
    let mut spans: Vec<(usize, usize)> = Vec::with_capacity(occurrences.len());
    for (start, end) in occurrences {
        match spans.last_mut() {
            Some(last) if start < last.1 => last.1 = last.1.max(end),
            _ => spans.push((start, end)),
        }
    }
    spans
}

/// Search for every occurrence of many literals that looks at a fraction of the text.
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
    /// Probes per prefilter block: about a line of text.
    const PROBES_PER_BLOCK: usize = 8;
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

    /// The occurrences in `line`, merged into ascending disjoint `(start, end)` spans, or
    /// `None` when the line needs more full comparisons than its budget.
    fn find(&self, line: &[u8]) -> Option<Vec<(usize, usize)>> {
        let mut found = Vec::new();
        let mut budget = Self::VERIFY_BASE + line.len() / Self::VERIFY_BYTES_PER_UNIT;
        // Blocks of probes go through the branch-free prefilter first: most blocks of most
        // text have no candidate at all.
        let probes_end = self.probes_end(line);
        let block_len = Self::PROBES_PER_BLOCK * self.stride;
        let mut block_start = 0;
        while block_start < probes_end {
            let block = block_start..(block_start + block_len).min(probes_end);
            block_start += block_len;
            if !self.may_match_at(line, block.clone()) {
                continue;
            }
            for probe in block.step_by(self.stride) {
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
        }
        // Every occurrence is now known.
        Some(merged(found))
    }

    /// Whether any sampled gram of `line` at the probes in `block` (starting on a probe)
    /// passes the bit set. Branch-free, so the table loads overlap instead of stalling one
    /// after another.
    fn may_match_at(&self, line: &[u8], block: Range<usize>) -> bool {
        let mut any = 0;
        let mut probe = block.start;
        // Not `step_by`: its set-up divides, which costs as much as the probes of a block.
        while probe < block.end {
            any |= self.gram_bit(gram_value(&line[probe..probe + self.gram_len]));
            probe += self.stride;
        }
        any != 0
    }

    /// End of the sampled positions of `line`: 0 when it is shorter than every pattern.
    fn probes_end(&self, line: &[u8]) -> usize {
        if line.len() < self.min_len {
            0
        } else {
            line.len() - self.gram_len + 1
        }
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

/// Adds `value` (long enough to be worth masking) and every encoded form of it a step may
/// print; see [`SecretMasker::add_all`].
fn register_with_encodings(patterns: &mut BTreeSet<String>, value: &str) {
    let base64 = base64::engine::general_purpose::STANDARD;
    patterns.insert(value.to_owned());
    patterns.insert(base64.encode(value));
    patterns.insert(base64.encode(format!("{value}\n")));
    // Inside a longer encoded string (`user:$S`) the value starts at any of three byte
    // alignments; the characters that encode whole groups of its own bytes are the same
    // whatever surrounds it (as the GitHub Actions runner masks).
    let bytes = value.as_bytes();
    for skipped in 0..3.min(bytes.len()) {
        let rest = &bytes[skipped..];
        let whole_groups = rest.len() / 3 * 3;
        if whole_groups > 0 {
            patterns.insert(base64.encode(&rest[..whole_groups]));
        }
    }
    for (kept, space) in [
        // RFC 3986 (curl, Python's `quote(safe="")` and `quote_plus`).
        (RFC3986_UNRESERVED, Space::Escaped),
        (RFC3986_UNRESERVED, Space::Plus),
        // Python's `quote` keeps `/` by default.
        (PYTHON_QUOTE_SAFE, Space::Escaped),
        // JavaScript's `encodeURIComponent`.
        (URI_COMPONENT_SAFE, Space::Escaped),
    ] {
        patterns.insert(percent_encoded(value, kept, space));
    }
    // HTML forms and the WHATWG URL standard (`*-._` kept, a space becomes `+`).
    patterns.insert(form_urlencoded::byte_serialize(value.as_bytes()).collect());
    if let Some(escaped) = shell_escaped(value) {
        patterns.insert(escaped);
    }
    patterns.insert(shell_double_quoted(value));
    patterns.insert(json_escaped(value, false));
    patterns.insert(json_escaped(value, true));
}

/// What percent encoding leaves of the ASCII punctuation besides letters and digits: RFC 3986's
/// unreserved characters.
const RFC3986_UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// Python's `urllib.parse.quote` with its default `safe="/"`.
const PYTHON_QUOTE_SAFE: &AsciiSet = &RFC3986_UNRESERVED.remove(b'/');
/// JavaScript's `encodeURIComponent`.
const URI_COMPONENT_SAFE: &AsciiSet = &RFC3986_UNRESERVED
    .remove(b'!')
    .remove(b'*')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')');

/// How a percent encoding writes a space.
#[derive(Clone, Copy)]
enum Space {
    Escaped,
    Plus,
}

/// URL (percent) encoding: ASCII letters, digits and what `kept` leaves stay, every other byte
/// becomes `%XX`, a space `%20` or `+`.
fn percent_encoded(value: &str, kept: &'static AsciiSet, space: Space) -> String {
    let encoded = utf8_percent_encode(value, kept).to_string();
    match space {
        Space::Escaped => encoded,
        // A `%` is always escaped itself, so every `%20` of the result stands for a space.
        Space::Plus => encoded.replace("%20", "+"),
    }
}

/// The value as bash's `printf %q` writes it, or `None` for values with control characters
/// (which it writes in `$'...'` form instead).
fn shell_escaped(value: &str) -> Option<String> {
    const SPECIAL: &str = " !\"$&'()*,;<>?[\\]^`{|}";
    if value.chars().any(char::is_control) {
        return None;
    }
    let mut escaped = String::with_capacity(value.len() * 2);
    for (index, character) in value.chars().enumerate() {
        let leading_only = index == 0 && matches!(character, '#' | '~');
        if SPECIAL.contains(character) || leading_only {
            escaped.push('\\');
        }
        escaped.push(character);
    }
    Some(escaped)
}

/// The value between double quotes in a shell script: `"`, `\`, `$` and `` ` `` escaped.
fn shell_double_quoted(value: &str) -> String {
    let mut escaped = String::with_capacity(value.len() * 2);
    for character in value.chars() {
        if matches!(character, '"' | '\\' | '$' | '`') {
            escaped.push('\\');
        }
        escaped.push(character);
    }
    escaped
}

/// The value inside a JSON string (without the quotes); with `ascii_only`, every non-ASCII
/// character as `\uXXXX` (UTF-16, as Python's `json.dumps` writes by default).
fn json_escaped(value: &str, ascii_only: bool) -> String {
    let mut escaped = String::with_capacity(value.len() + 8);
    for character in value.chars() {
        match character {
            '"' => escaped.push_str("\\\""),
            '\\' => escaped.push_str("\\\\"),
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push_str("\\t"),
            '\u{8}' => escaped.push_str("\\b"),
            '\u{c}' => escaped.push_str("\\f"),
            control if u32::from(control) < 0x20 => {
                let _ = write!(escaped, "\\u{:04x}", u32::from(control));
            }
            other if ascii_only && !other.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in other.encode_utf16(&mut units) {
                    let _ = write!(escaped, "\\u{unit:04x}");
                }
            }
            other => escaped.push(other),
        }
    }
    escaped
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

    /// Takes the held partial line's bytes out, to be pushed again.
    fn take_partial(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.partial)
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

/// Position of the first `\n` or `\r`.
fn find_line_end(bytes: &[u8]) -> Option<usize> {
    memchr::memchr2(b'\n', b'\r', bytes)
}

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

    /// The occurrences the automaton finds, merged.
    fn automaton_spans(masker: &SecretMasker, text: &str) -> Vec<(usize, usize)> {
        let matcher = masker.inner.matcher.as_ref().expect("built");
        merged(
            matcher
                .automaton
                .find_overlapping_iter(text)
                .map(|found| (found.start(), found.end()))
                .collect(),
        )
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
    fn masks_a_multi_line_secret_whole_and_its_long_lines() {
        let pem = "-----BEGIN KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX\n  6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu  \n-----END KEY-----\n";
        let masker = masker(&[pem]);
        // Printed in one piece, the whole value is masked, across its line ends and any split
        // of the writes; its trailing line end is kept.
        let mut log = StepLog::new(masker.clone(), u64::MAX);
        let output = format!("key: {pem}after\n");
        let (first, second) = output.as_bytes().split_at(40);
        let lines = step_lines(&mut log, &[first, second]);
        assert_eq!(lines, ["key: ***", "after"]);
        assert_eq!(masker.mask(&format!("error: {pem}")), "error: ***\n");
        // Printed line by line with other output in between, each long line is masked.
        let mut log = StepLog::new(masker.clone(), u64::MAX);
        let interleaved = "-----BEGIN KEY-----\nnoise\n  6Ppy1tPf9Cnzj4p4WGeKLs1Pt8Qu  \n";
        let lines = step_lines(&mut log, &[interleaved.as_bytes()]);
        assert_eq!(lines, ["***", "noise", "  ***  "]);
        let line_base64 = base64("MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEX");
        assert_eq!(masker.mask(&line_base64), "***");
    }

    #[test]
    fn short_lines_of_a_multi_line_secret_are_not_masked_alone() {
        let masker = masker(&["multi\nline\nsecret"]);
        assert_eq!(
            masker.mask("one line of a secret, multi-line"),
            "one line of a secret, multi-line"
        );
        assert_eq!(masker.mask("x multi\nline\nsecret y"), "x *** y");
        let mut log = StepLog::new(masker, u64::MAX);
        let lines = step_lines(&mut log, &[b"a line\nmulti\nline\nsecret\nend\n"]);
        assert_eq!(lines, ["a line", "***", "end"]);
    }

    #[test]
    fn masks_a_secret_split_across_writes() {
        let mut log = StepLog::new(masker(&["s3cr3t-token-value"]), u64::MAX);
        let lines = step_lines(&mut log, &[b"token=s3cr3t-to", b"ken-value done\n"]);
        assert_eq!(lines, ["token=*** done"]);
    }

    #[test]
    fn overlapping_secrets_are_masked_together() {
        let masker = masker(&["abcdef", "abcdefgh", "defghijk"]);
        assert_eq!(masker.mask("x abcdefgh y"), "x *** y");
        // A leftmost-longest choice would leave "ijk" of the second secret.
        assert_eq!(masker.mask("abcdefghijk"), "***");
        let mut log = StepLog::new(masker, u64::MAX);
        assert_eq!(step_lines(&mut log, &[b"abcdefghijk\n"]), ["***"]);
        let mut log = StepLog::new(self::masker(&["defghijk", "abcdef"]), u64::MAX);
        assert_eq!(step_lines(&mut log, &[b"abcdefg", b"hijk\n"]), ["***"]);
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
    fn counts_values_too_short_to_mask() {
        let masker = masker(&["ab", "", "   ", "x\n", "long-enough"]);
        // The empty value is nothing to hide; the others are secrets left visible.
        assert_eq!(masker.too_short(), 3);
        let mut more = masker.clone();
        more.add("z").expect("builds");
        assert_eq!(more.too_short(), 4);
        assert_eq!(more.mask("long-enough"), MASK);
        assert_eq!(masker.too_short(), 3);
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
        assert_eq!(format!("{masker:?}"), "SecretMasker { patterns: 11 }");
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
                let matcher = masker.inner.matcher.as_ref().expect("built");
                if let Some(sampled) = matcher.sampled.find(line.as_bytes()) {
                    assert_eq!(
                        sampled,
                        automaton_spans(&masker, &line),
                        "secrets {secrets:?}, line {line:?}"
                    );
                }
                assert_eq!(
                    masker.mask(&line).matches(MASK).count(),
                    automaton_spans(&masker, &line).len()
                );
            }
        }
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
    fn dense_lines_fall_back_to_the_automaton() {
        let masker = masker(&["aaa", "aaaa", "aaaaa"]);
        let line = "a".repeat(1000);
        let search = &masker.inner.matcher.as_ref().expect("built").sampled;
        assert!(search.find(line.as_bytes()).is_none());
        assert_eq!(masker.mask(&line), MASK);
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
