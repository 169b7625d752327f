//! The checked-in C header is exactly what the pinned cbindgen generates from this crate, its
//! version macros match Cargo.toml, and the key list on `kici_config_set` is generated from the
//! core's setting table.
//!
//! Regenerate the key list and the header with
//! `KICI_UPDATE_HEADER=1 cargo test -p kici-agent-ffi --test header`.

use std::ffi::CStr;
use std::path::{Path, PathBuf};

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn header_path() -> PathBuf {
    crate_dir().join("../include/kici_agent.h")
}

fn generate(crate_dir: &Path) -> Vec<u8> {
    let config = cbindgen::Config::from_file(crate_dir.join("cbindgen.toml"))
        .unwrap_or_else(|e| panic!("reading cbindgen.toml: {e}"));
    let bindings = cbindgen::Builder::new()
        .with_crate(crate_dir)
        .with_config(config)
        .generate()
        .unwrap_or_else(|e| panic!("cbindgen failed: {e}"));
    let mut header = Vec::new();
    bindings.write(&mut header);
    header
}

const KEYS_BEGIN: &str =
    "/// Keys (variable, key, default: meaning), generated from the core's setting table:\n";
const KEYS_END: &str = "///\n/// (End of the generated keys.)\n";

/// The doc-comment lines listing every setting of `SETTINGS`, wrapped at 100 columns.
fn key_docs() -> String {
    let mut docs = String::new();
    for setting in kici_agent_core::config::SETTINGS {
        let default = match setting.default {
            None => "no default".to_owned(),
            Some("") => "default empty".to_owned(),
            Some(value) => format!("default `{value}`"),
        };
        let entry = format!(
            "- `{}` (`{}`), {default}: {}",
            setting.name, setting.key, setting.description
        );
        let mut line = String::from("///");
        for word in entry.split(' ') {
            if line.len() + 1 + word.len() > 100 && line.len() > "///   ".len() {
                docs.push_str(&line);
                docs.push('\n');
                line = String::from("///  ");
            }
            line.push(' ');
            line.push_str(word);
        }
        docs.push_str(&line);
        docs.push('\n');
    }
    docs
}

/// Puts the generated key list into `src/config.rs`, between the markers; true when it changed.
fn sync_key_docs(write: bool) -> bool {
    let path = crate_dir().join("src/config.rs");
    let source = std::fs::read_to_string(&path).expect("src/config.rs is readable");
    let start = source
        .find(KEYS_BEGIN)
        .expect("the key list's first marker")
        + KEYS_BEGIN.len();
    let end = start
        + source[start..]
            .find(KEYS_END)
            .expect("the key list's last marker");
    let docs = key_docs();
    if source[start..end] == docs {
        return false;
    }
    if write {
        let updated = format!("{}{docs}{}", &source[..start], &source[end..]);
        std::fs::write(&path, updated).expect("src/config.rs is writable");
    }
    true
}

#[test]
fn the_checked_in_header_is_what_cbindgen_generates() {
    let update = std::env::var_os("KICI_UPDATE_HEADER").is_some();
    // The key list first: the header is generated from the source that holds it.
    assert!(
        !sync_key_docs(update) || update,
        "the key list of kici_config_set in src/config.rs differs from the core's setting table; \
         regenerate it with KICI_UPDATE_HEADER=1 cargo test -p kici-agent-ffi --test header"
    );
    let generated = generate(&crate_dir());
    let path = header_path();
    if update {
        std::fs::write(&path, &generated)
            .unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        return;
    }
    let checked_in =
        std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    if generated != checked_in {
        let generated = String::from_utf8_lossy(&generated);
        let checked_in = String::from_utf8_lossy(&checked_in);
        let first_difference = generated
            .lines()
            .zip(checked_in.lines())
            .position(|(new, old)| new != old)
            .unwrap_or_else(|| generated.lines().count().min(checked_in.lines().count()));
        panic!(
            "include/kici_agent.h differs from the generated header from line {}; regenerate it \
             with KICI_UPDATE_HEADER=1 cargo test -p kici-agent-ffi --test header",
            first_difference + 1
        );
    }
}

/// The value of `#define NAME value` in the header.
fn macro_value<'a>(header: &'a str, name: &str) -> &'a str {
    let prefix = format!("#define {name} ");
    header
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("{name} is not defined in the header"))
        .trim()
}

#[test]
fn the_version_macros_and_function_match_cargo_toml() {
    let header = std::fs::read_to_string(header_path()).expect("the header is readable");
    assert_eq!(
        macro_value(&header, "KICI_AGENT_VERSION"),
        format!("\"{}\"", env!("CARGO_PKG_VERSION"))
    );
    for (name, expected) in [
        ("KICI_AGENT_VERSION_MAJOR", env!("CARGO_PKG_VERSION_MAJOR")),
        ("KICI_AGENT_VERSION_MINOR", env!("CARGO_PKG_VERSION_MINOR")),
        ("KICI_AGENT_VERSION_PATCH", env!("CARGO_PKG_VERSION_PATCH")),
    ] {
        assert_eq!(macro_value(&header, name), expected, "{name}");
    }
    // SAFETY: kici_version returns a static NUL-terminated string.
    let version = unsafe { CStr::from_ptr(kici_agent::kici_version()) };
    assert_eq!(version.to_str().ok(), Some(env!("CARGO_PKG_VERSION")));
}

#[test]
fn the_pkg_config_template_names_the_library_and_takes_the_version() {
    let template = std::fs::read_to_string(crate_dir().join("kici_agent.pc.in"))
        .expect("kici_agent.pc.in is readable");
    assert!(template.contains("-lkici_agent"), "{template}");
    assert!(template.contains("Version: @VERSION@"), "{template}");
}
