//! Throughput of the step-log pipeline (mask + split + cap) against plain line splitting.
//!
//! Run with `cargo bench -p kici-agent-core --bench log_pipeline`. Prints figures; asserts
//! nothing about speed. Without `--bench` (as under `cargo test --all-targets`) it runs on 1 MB
//! as a quick smoke test.

use std::time::{Duration, Instant};

use base64::Engine as _;
use kici_agent_core::internals::logs::{LineSplitter, SecretMasker, StepLog};

const BENCH_BYTES: usize = 200 * 1024 * 1024;
const SMOKE_BYTES: usize = 1024 * 1024;
const LINE_BYTES: usize = 80;
const WRITE_BYTES: usize = 64 * 1024;
const SECRET_COUNT: usize = 100;
/// Timed passes per measurement; the fastest is reported.
const PASSES: usize = 3;
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

    let total_bytes = if std::env::args().any(|arg| arg == "--bench") {
        BENCH_BYTES
    } else {
        SMOKE_BYTES
    };
    let input = generate_input(&mut rng, &secrets, text_alphabet, total_bytes);
    let line_count = input.len() / LINE_BYTES;

    let mut masker = SecretMasker::new();
    if let Err(error) = masker.add_all(secrets.iter().map(String::as_str)) {
        eprintln!("cannot register secrets: {error}");
        std::process::exit(1);
    }

    let split = fastest_of(PASSES, || time_split_only(&input));
    let pipeline = fastest_of(PASSES, || time_pipeline(&input, &masker));
    assert_eq!(split.lines, line_count);
    assert_eq!(pipeline.lines, line_count);
    assert_eq!(
        pipeline.masked,
        line_count.div_ceil(SECRET_LINE_EVERY as usize)
    );

    println!(
        "split only: {:.0} MB/s",
        mb_per_s(input.len(), split.elapsed)
    );
    println!(
        "log pipeline: {:.0} MB/s ({} lines, {} secrets masked)",
        mb_per_s(input.len(), pipeline.elapsed),
        pipeline.lines,
        pipeline.masked
    );
}

/// What one pass over the input produced and how long the timed calls took.
struct Pass {
    elapsed: Duration,
    lines: usize,
    masked: usize,
}

/// The fastest of `passes` runs, to damp noise from other processes.
fn fastest_of(passes: usize, mut run: impl FnMut() -> Pass) -> Pass {
    let mut fastest = run();
    for _ in 1..passes {
        let pass = run();
        if pass.elapsed < fastest.elapsed {
            fastest = pass;
        }
    }
    fastest
}

/// `total_bytes` of 80-byte lines (79 characters and `\n`); some lines carry a secret.
fn generate_input(
    rng: &mut XorShift,
    secrets: &[String],
    alphabet: &[u8],
    total_bytes: usize,
) -> Vec<u8> {
    let base64 = base64::engine::general_purpose::STANDARD;
    let mut input = Vec::with_capacity(total_bytes);
    let mut line_number = 0u64;
    while input.len() + LINE_BYTES <= total_bytes {
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

/// Times `push` and dropping the produced lines (the consumer pays for that too).
fn time_split_only(input: &[u8]) -> Pass {
    let mut splitter = LineSplitter::new();
    let mut out = Vec::new();
    let mut lines = 0;
    let mut elapsed = Duration::ZERO;
    for write in input.chunks(WRITE_BYTES) {
        let started = Instant::now();
        splitter.push(write, &mut out);
        lines += out.len();
        out.clear();
        elapsed += started.elapsed();
    }
    splitter.finish(&mut out);
    Pass {
        elapsed,
        lines: lines + out.len(),
        masked: 0,
    }
}

/// Times `push_bytes` and dropping the produced lines; counts masks outside the timed part.
fn time_pipeline(input: &[u8], masker: &SecretMasker) -> Pass {
    let mut log = StepLog::new(masker.clone(), u64::MAX);
    let mut out = Vec::new();
    let mut lines = 0;
    let mut masked = 0;
    let mut elapsed = Duration::ZERO;
    for write in input.chunks(WRITE_BYTES) {
        let started = Instant::now();
        log.push_bytes(write, &mut out);
        elapsed += started.elapsed();
        lines += out.len();
        masked += out
            .iter()
            .map(|line| line.matches("***").count())
            .sum::<usize>();
        let started = Instant::now();
        out.clear();
        elapsed += started.elapsed();
    }
    log.finish(&mut out);
    Pass {
        elapsed,
        lines: lines + out.len(),
        masked,
    }
}

fn mb_per_s(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / 1e6 / elapsed.as_secs_f64()
}
