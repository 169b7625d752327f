//! Secrets in the step log: every encoded form a step may print, across every split the
//! pipeline makes (partial writes, the cut of an overlong line, a multi-line value's line ends).
//! Only the public masking API is used: these tests hold for any implementation.

use base64::Engine as _;
use kici_agent_core::internals::logs::{SecretMasker, StepLog, MASK, MAX_LINE_BYTES};
use proptest::prelude::*;

const PASSWORD: &str = "p@ss w0rd!";

fn masker(secrets: &[&str]) -> SecretMasker {
    let mut masker = SecretMasker::new();
    masker
        .add_all(secrets.iter().copied())
        .expect("test secrets build");
    masker
}

fn base64(bytes: impl AsRef<[u8]>) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The lines a step log sends for these writes.
fn log_lines(masker: &SecretMasker, writes: &[&[u8]]) -> Vec<String> {
    let mut log = StepLog::new(masker.clone(), u64::MAX);
    let mut out = Vec::new();
    for write in writes {
        log.push_bytes(write, &mut out);
    }
    log.finish(&mut out);
    out
}

/// `bytes` cut at each of `points` (sorted, deduplicated, within bounds).
fn split_at_points<'a>(bytes: &'a [u8], points: &[usize]) -> Vec<&'a [u8]> {
    let mut cuts: Vec<usize> = points.iter().map(|&p| p.min(bytes.len())).collect();
    cuts.sort_unstable();
    cuts.dedup();
    let mut pieces = Vec::new();
    let mut start = 0;
    for cut in cuts {
        pieces.push(&bytes[start..cut]);
        start = cut;
    }
    pieces.push(&bytes[start..]);
    pieces
}

/// The base64 characters of `prefix + secret + suffix` that encode whole groups of the
/// secret's own bytes: what identifies the secret whatever surrounds it.
fn base64_core(prefix: &[u8], secret: &[u8], suffix: &[u8]) -> String {
    let whole = [prefix, secret, suffix].concat();
    let encoded = base64(&whole);
    let first_group = prefix.len().div_ceil(3);
    let end_group = (prefix.len() + secret.len()) / 3;
    if end_group <= first_group {
        return String::new();
    }
    encoded[first_group * 4..end_group * 4].to_owned()
}

/// RFC 3986 percent encoding with `unescaped` kept and `space` for a space.
fn percent(value: &str, unescaped: &str, space: &str) -> String {
    value
        .bytes()
        .map(|byte| match byte {
            b' ' => space.to_owned(),
            _ if byte.is_ascii_alphanumeric() || unescaped.as_bytes().contains(&byte) => {
                char::from(byte).to_string()
            }
            _ => format!("%{byte:02X}"),
        })
        .collect()
}

/// The JSON string body (no quotes) as `serde_json` writes it.
fn json_body(value: &str) -> String {
    let quoted = serde_json::to_string(value).expect("a string serialises");
    quoted[1..quoted.len() - 1].to_owned()
}

/// The JSON string body with non-ASCII as `\uXXXX`, as Python's `json.dumps` writes it.
fn json_body_ascii(value: &str) -> String {
    json_body(value)
        .chars()
        .map(|c| {
            if c.is_ascii() {
                c.to_string()
            } else {
                let mut units = [0u16; 2];
                c.encode_utf16(&mut units)
                    .iter()
                    .map(|unit| format!("\\u{unit:04x}"))
                    .collect()
            }
        })
        .collect()
}

/// What bash's `printf %q` prints for `value`.
fn bash_printf_q(value: &str) -> String {
    let output = std::process::Command::new("bash")
        .args([
            "--noprofile",
            "--norc",
            "-c",
            "printf %q \"$1\"",
            "bash",
            value,
        ])
        .output()
        .expect("bash runs");
    assert!(output.status.success());
    String::from_utf8(output.stdout).expect("UTF-8 output")
}

#[test]
fn masks_base64_of_echo_output_with_its_trailing_newline() {
    let masker = masker(&[PASSWORD]);
    // `echo "$S" | base64`
    let echoed = base64(format!("{PASSWORD}\n"));
    let lines = log_lines(&masker, &[format!("encoded: {echoed}\n").as_bytes()]);
    assert_eq!(lines, ["encoded: ***"]);
    let plain = base64(PASSWORD);
    assert_eq!(masker.mask(&format!("{plain} {echoed}")), "*** ***");
}

#[test]
fn masks_base64_inside_a_longer_string_at_every_alignment() {
    let masker = masker(&[PASSWORD]);
    for user in ["u", "us", "usr", "user", ""] {
        for suffix in ["", "\n", "!", "!?"] {
            let prefix = if user.is_empty() {
                String::new()
            } else {
                format!("{user}:")
            };
            // HTTP Basic auth: base64 of `user:secret`.
            let header = format!(
                "Authorization: Basic {}",
                base64(format!("{prefix}{PASSWORD}{suffix}"))
            );
            let core = base64_core(prefix.as_bytes(), PASSWORD.as_bytes(), suffix.as_bytes());
            assert!(core.len() >= 8, "the core identifies the secret");
            let lines = log_lines(&masker, &[header.as_bytes(), b"\n"]);
            assert_eq!(lines.len(), 1);
            assert!(
                !lines[0].contains(&core) && lines[0].contains(MASK),
                "{prefix:?} {suffix:?}: {}",
                lines[0]
            );
        }
    }
}

#[test]
fn masks_url_encoded_forms() {
    let masker = masker(&[PASSWORD]);
    for encoded in [
        "p%40ss%20w0rd%21",
        "p%40ss+w0rd%21",
        // encodeURIComponent leaves `!` alone.
        "p%40ss%20w0rd!",
    ] {
        let lines = log_lines(&masker, &[format!("GET /?pw={encoded}&x=1\n").as_bytes()]);
        assert_eq!(lines, ["GET /?pw=***&x=1"], "{encoded}");
    }
    let form: String = url::form_urlencoded::byte_serialize(b"a~b* c/d").collect();
    let masker = self::masker(&["a~b* c/d"]);
    assert_eq!(masker.mask(&format!("pw={form}")), "pw=***");
}

#[test]
fn masks_shell_escaped_forms() {
    for secret in [
        PASSWORD,
        "it's a $ecret",
        "#~semi;colon|pipe",
        "back\\slash\"quote`tick",
    ] {
        let masker = masker(&[secret]);
        let escaped = bash_printf_q(secret);
        assert_ne!(escaped, secret);
        assert_eq!(
            masker.mask(&format!("+ curl -u {escaped} x")),
            "+ curl -u *** x"
        );
        // Inside double quotes only `"`, `\`, `$` and `` ` `` are escaped.
        let double_quoted: String = secret
            .chars()
            .flat_map(|c| {
                let escape = matches!(c, '"' | '\\' | '$' | '`').then_some('\\');
                escape.into_iter().chain(std::iter::once(c))
            })
            .collect();
        assert_eq!(
            masker.mask(&format!("export PW=\"{double_quoted}\"")),
            "export PW=\"***\""
        );
    }
}

#[test]
fn masks_json_escaped_forms() {
    let multi_line = "multi\nline\nsecret";
    let quoted = "say \"hi\" \\ bye";
    let accented = "pässwörd-€";
    let masker = masker(&[multi_line, quoted, accented]);
    for secret in [multi_line, quoted, accented] {
        let document = serde_json::json!({ "password": secret }).to_string();
        let lines = log_lines(&masker, &[document.as_bytes(), b"\n"]);
        assert_eq!(lines, [r#"{"password":"***"}"#], "{secret:?}");
        let ascii = format!("{{\"password\": \"{}\"}}", json_body_ascii(secret));
        assert_eq!(masker.mask(&ascii), r#"{"password": "***"}"#, "{secret:?}");
    }
}

#[test]
fn a_value_straddling_the_line_cut_is_masked() {
    let masker = masker(&[PASSWORD]);
    for before_cut in 1..PASSWORD.len() {
        let padding = "x".repeat(MAX_LINE_BYTES - before_cut);
        let output = format!("{padding}{PASSWORD} and a tail longer than it\n");
        for writes in [
            vec![output.as_bytes()],
            split_at_points(output.as_bytes(), &[MAX_LINE_BYTES - 3, MAX_LINE_BYTES + 2]),
            split_at_points(output.as_bytes(), &[1000, MAX_LINE_BYTES]),
        ] {
            let pieces = log_lines(&masker, &writes);
            assert!(pieces.len() >= 2, "the line is cut");
            assert!(pieces.iter().all(|piece| piece.len() <= MAX_LINE_BYTES));
            assert_eq!(
                pieces.concat(),
                format!("{padding}*** and a tail longer than it")
            );
        }
    }
}

#[test]
fn a_value_written_byte_by_byte_is_masked() {
    let masker = masker(&[PASSWORD, "multi\nline\nsecret"]);
    let output = format!(
        "a {PASSWORD} b {} c multi\nline\nsecret\n",
        base64(PASSWORD)
    );
    let writes: Vec<&[u8]> = output.as_bytes().chunks(1).collect();
    assert_eq!(log_lines(&masker, &writes), ["a *** b *** c ***"]);
}

#[test]
fn short_lines_of_a_multi_line_secret_stay_visible_in_ordinary_text() {
    let masker = masker(&["multi\nline\nsecret"]);
    let lines = log_lines(
        &masker,
        &[b"one line here\n", b"the secret is: multi\nline\nsecret\n"],
    );
    assert_eq!(lines, ["one line here", "the secret is: ***"]);
}

/// Printable characters a secret may hold, shell and URL specials and non-ASCII included; not
/// `*`, so that a mask next to the text can never look like a secret.
const SECRET_CHARS: &str =
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 @!%:/+=$\"'\\#~-_.,;&?é€";

fn secret_line() -> impl Strategy<Value = String> {
    let chars: Vec<char> = SECRET_CHARS.chars().collect();
    prop::collection::vec(prop::sample::select(chars), 3..24)
        .prop_map(|chars| chars.into_iter().collect::<String>())
        .prop_filter("at least 3 characters after trimming", |line| {
            line.trim().chars().count() >= 3
        })
}

fn secret() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => secret_line(),
        1 => prop::collection::vec(secret_line(), 2..4).prop_map(|lines| lines.join("\n")),
    ]
}

#[derive(Debug, Clone, Copy)]
enum Encoding {
    Raw,
    Base64,
    /// `echo "$S" | base64`.
    Base64Echo,
    /// Base64 of `prefix + S + suffix` with 0-3 bytes on either side.
    Base64Inside,
    UrlPercent20,
    UrlPlus,
    UrlComponent,
    UrlForm,
    ShellDoubleQuoted,
    Json,
    JsonAscii,
}

fn encoding() -> impl Strategy<Value = Encoding> {
    prop::sample::select(vec![
        Encoding::Raw,
        Encoding::Base64,
        Encoding::Base64Echo,
        Encoding::Base64Inside,
        Encoding::UrlPercent20,
        Encoding::UrlPlus,
        Encoding::UrlComponent,
        Encoding::UrlForm,
        Encoding::ShellDoubleQuoted,
        Encoding::Json,
        Encoding::JsonAscii,
    ])
}

/// The text a step prints for `secret` in `encoding`, and the part of it that must not reach
/// the orchestrator.
fn encoded(secret: &str, encoding: Encoding, around: &[u8]) -> (String, String) {
    let whole = |text: String| (text.clone(), text);
    match encoding {
        Encoding::Raw => whole(secret.to_owned()),
        Encoding::Base64 => whole(base64(secret)),
        Encoding::Base64Echo => whole(base64(format!("{secret}\n"))),
        Encoding::Base64Inside => {
            let (prefix, suffix) = around.split_at(around.len() / 2);
            let text = base64([prefix, secret.as_bytes(), suffix].concat());
            (text, base64_core(prefix, secret.as_bytes(), suffix))
        }
        Encoding::UrlPercent20 => whole(percent(secret, "-_.~", "%20")),
        Encoding::UrlPlus => whole(percent(secret, "-_.~", "+")),
        Encoding::UrlComponent => whole(percent(secret, "-_.!~*'()", "%20")),
        Encoding::UrlForm => {
            whole(url::form_urlencoded::byte_serialize(secret.as_bytes()).collect())
        }
        Encoding::ShellDoubleQuoted => whole(
            secret
                .chars()
                .flat_map(|c| {
                    let escape = matches!(c, '"' | '\\' | '$' | '`').then_some('\\');
                    escape.into_iter().chain(std::iter::once(c))
                })
                .collect(),
        ),
        Encoding::Json => whole(json_body(secret)),
        Encoding::JsonAscii => whole(json_body_ascii(secret)),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    /// Random secrets, printed in a random encoding at a random place (near the line cut
    /// too), written in random pieces: no output line holds the secret's identifying part.
    #[test]
    fn no_encoding_or_split_leaks_a_secret(
        secrets in prop::collection::vec(secret(), 1..4),
        pick in any::<prop::sample::Index>(),
        encoding in encoding(),
        around in prop::collection::vec(any::<u8>(), 0..7),
        padding in prop_oneof![0usize..40, (MAX_LINE_BYTES - 40)..(MAX_LINE_BYTES + 5)],
        text in "[a-z ]{0,30}",
        split_points in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
    ) {
        let secret = pick.get(&secrets);
        let masker = masker(&secrets.iter().map(String::as_str).collect::<Vec<_>>());
        let (printed, leak) = encoded(secret, encoding, &around);
        prop_assume!(!leak.is_empty());
        let output = format!("{}{text}{printed}{text}\nafter\n", "x".repeat(padding));
        let points: Vec<usize> = split_points.iter().map(|index| index.index(output.len() + 1)).collect();
        let lines = log_lines(&masker, &split_at_points(output.as_bytes(), &points));
        // Joined without separators, a value cut into two pieces would show up again.
        let joined = lines.concat();
        let joined_lines = lines.join("\n");
        prop_assert!(!joined.contains(&leak), "{encoding:?} leaked in {lines:?}");
        prop_assert!(!joined_lines.contains(&leak), "{encoding:?} leaked in {lines:?}");
        prop_assert_eq!(lines.last().map(String::as_str), Some("after"));
    }
}
