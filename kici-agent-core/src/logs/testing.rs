//! Helpers shared by the log pipeline's unit tests.

// Everything of the log pipeline (and its imports), so that each test module needs one `use`
// besides its own `super::*`.
pub(super) use super::*;

use base64::Engine as _;

pub(super) fn masker(secrets: &[&str]) -> SecretMasker {
    let mut masker = SecretMasker::new();
    masker
        .add_all(secrets.iter().copied())
        .expect("test secrets build");
    masker
}

pub(super) fn base64(value: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(value)
}

pub(super) fn split_all(writes: &[&[u8]]) -> Vec<String> {
    let mut splitter = LineSplitter::new();
    let mut out = Vec::new();
    for write in writes {
        splitter.push(write, &mut out);
    }
    splitter.finish(&mut out);
    out
}

pub(super) fn step_lines(log: &mut StepLog, writes: &[&[u8]]) -> Vec<String> {
    let mut out = Vec::new();
    for write in writes {
        log.push_bytes(write, &mut out);
    }
    log.finish(&mut out);
    out
}

/// Deterministic pseudo-random numbers for the comparison tests.
pub(super) struct XorShift(pub(super) u64);

impl XorShift {
    pub(super) fn below(&mut self, bound: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % bound as u64) as usize
    }

    pub(super) fn text(&mut self, alphabet: &[u8], len: usize) -> String {
        (0..len)
            .map(|_| char::from(alphabet[self.below(alphabet.len())]))
            .collect()
    }
}
