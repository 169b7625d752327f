//! Throughput of the step-log pipeline (split + mask + cap) against plain line splitting.
//!
//! Run with `cargo bench -p kici-agent-core --bench log_pipeline`. Prints figures; asserts
//! nothing about speed.

#[path = "../src/logs.rs"]
#[allow(dead_code)]
mod logs;

use std::time::{Duration, Instant};

use base64::Engine as _;
use logs::{LineSplitter, SecretMasker, StepLog};

const TOTAL_BYTES: usize = 200 * 1024 * 1024;
const LINE_BYTES: usize = 80;
const WRITE_BYTES: usize = 64 * 1024;
const SECRET_COUNT: usize = 100;
/// One line in this many carries a secret (every other such line in base64 form).
const SECRET_LINE_EVERY: u64 = 20;

/// Small deterministic generator so runs are comparable without extra dependencies.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }

    fn text(&mut self, alphabet: &[u8], len: usize) -> String {
        (0..len)
            .map(|_| char::from(alphabet[self.below(alphabet.len())]))
            .collect()
    }
}

fn main() {
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let secret_alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-";
    let text_alphabet = b"abcdefghijklmnopqrstuvwxyz     0123456789.,:=/-";
    let secrets: Vec<String> = (0..SECRET_COUNT)
        .map(|_| {
            let len = 16 + rng.below(25);
            rng.text(secret_alphabet, len)
        })
        .collect();

    let input = generate_input(&mut rng, &secrets, text_alphabet);
    let line_count = input.len() / LINE_BYTES;

    let mut masker = SecretMasker::new();
    if let Err(error) = masker.add_all(secrets.iter().map(String::as_str)) {
        eprintln!("cannot register secrets: {error}");
        std::process::exit(1);
    }

    let (split_time, split_lines) = time_split_only(&input);
    let (pipeline_time, pipeline_lines, masked) = time_pipeline(&input, masker);
    assert_eq!(split_lines, line_count);
    assert_eq!(pipeline_lines, line_count);

    println!("split only: {:.0} MB/s", mb_per_s(input.len(), split_time));
    println!(
        "log pipeline: {:.0} MB/s ({pipeline_lines} lines, {masked} secrets masked)",
        mb_per_s(input.len(), pipeline_time)
    );
}

/// ~200 MB of 80-byte lines (79 characters and `\n`); some lines carry a secret.
fn generate_input(rng: &mut XorShift, secrets: &[String], alphabet: &[u8]) -> Vec<u8> {
    let base64 = base64::engine::general_purpose::STANDARD;
    let mut input = Vec::with_capacity(TOTAL_BYTES);
    let mut line_number = 0u64;
    while input.len() + LINE_BYTES <= TOTAL_BYTES {
        let mut line = String::with_capacity(LINE_BYTES);
        if line_number % SECRET_LINE_EVERY == 0 {
            let secret = &secrets[rng.below(secrets.len())];
            line.push_str("token=");
            if line_number % (2 * SECRET_LINE_EVERY) == 0 {
                line.push_str(secret);
            } else {
                line.push_str(&base64.encode(secret));
            }
            line.push(' ');
        }
        let fill = LINE_BYTES - 1 - line.len();
        line.push_str(&rng.text(alphabet, fill));
        input.extend_from_slice(line.as_bytes());
        input.push(b'\n');
        line_number += 1;
    }
    input
}

fn time_split_only(input: &[u8]) -> (Duration, usize) {
    let mut splitter = LineSplitter::new();
    let mut out = Vec::new();
    let mut lines = 0;
    let mut elapsed = Duration::ZERO;
    for write in input.chunks(WRITE_BYTES) {
        let started = Instant::now();
        splitter.push(write, &mut out);
        elapsed += started.elapsed();
        lines += out.len();
        out.clear();
    }
    splitter.finish(&mut out);
    (elapsed, lines + out.len())
}

fn time_pipeline(input: &[u8], masker: SecretMasker) -> (Duration, usize, usize) {
    let mut log = StepLog::new(masker, u64::MAX);
    let mut out = Vec::new();
    let mut lines = 0;
    let mut masked = 0;
    let mut elapsed = Duration::ZERO;
    for write in input.chunks(WRITE_BYTES) {
        let started = Instant::now();
        log.push_bytes(write, &mut out);
        elapsed += started.elapsed();
        lines += out.len();
        masked += out.iter().map(|line| line.matches("***").count()).sum::<usize>();
        out.clear();
    }
    log.finish(&mut out);
    (elapsed, lines + out.len(), masked)
}

fn mb_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}
