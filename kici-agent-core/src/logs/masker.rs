//! The accumulating secret masker: its compiled matcher, the sampled search of the hot path
//! and the decision of which tail of a stream buffer to hold back.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::BTreeSet;
use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};

use super::encodings::register_with_encodings;
use super::{LINE_ENDS, MASK, MAX_LINE_BYTES, MIN_SECRET_CHARS, MIN_SECRET_LINE_CHARS};

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
/// [`StepLog::set_masker`](super::StepLog::set_masker)).
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
    pub(super) fn decide(&self, data: &[u8], at_end: bool) -> (Vec<(usize, usize)>, usize) {
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
    pub(super) fn seam_bytes(&self) -> usize {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::testing::*;

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
    fn dense_lines_fall_back_to_the_automaton() {
        let masker = masker(&["aaa", "aaaa", "aaaaa"]);
        let line = "a".repeat(1000);
        let search = &masker.inner.matcher.as_ref().expect("built").sampled;
        assert!(search.find(line.as_bytes()).is_none());
        assert_eq!(masker.mask(&line), MASK);
    }
}
