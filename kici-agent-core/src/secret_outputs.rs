//! Secret outputs: values a step publishes for later jobs of its run that only the orchestrator
//! can read (`job.status.secretOutputs`, spec protocol.md §4.2 and agent.md §10.4).
//!
//! The dispatch carries the run's X25519 public key (`runPublicKey`, base64 of its DER SPKI).
//! Each job makes one ephemeral X25519 key pair, agrees a secret with the run key, derives an
//! AES-256 key from it with HKDF-SHA256 (empty salt, info `kici-run-secret-outputs`) and seals
//! every value with AES-256-GCM under a fresh random 12-byte IV. On the wire a value is
//! `{agentPublicKey: base64(DER SPKI of the ephemeral key), encrypted: base64(IV ‖ tag ‖
//! ciphertext)}`; the orchestrator repeats the agreement with the run's private key.
//!
//! The plaintext only lives until it is sealed (and in the job's log masker, which hides it
//! from every log line, error and plain output). Without a usable run key a secret output
//! cannot be sent, and the step that sets one fails with a message naming the key, never the
//! value.

use std::fmt;

use aes_gcm::aead::{Aead, AeadCore, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use hkdf::Hkdf;
use sha2::Sha256;
use x25519_dalek::{EphemeralSecret, PublicKey, SharedSecret};

use crate::protocol::SecretOutput;

/// HKDF `info` of the key that seals secret outputs.
pub const HKDF_INFO: &[u8] = b"kici-run-secret-outputs";

/// The DER header of an X25519 `SubjectPublicKeyInfo` (RFC 8410): SEQUENCE { SEQUENCE { OID
/// 1.3.101.110 }, BIT STRING (0 unused bits) } followed by the 32 key bytes.
const X25519_SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x03, 0x21, 0x00,
];

/// Bytes of the AES-GCM IV and tag in `encrypted`.
const IV_LEN: usize = 12;

/// Why the dispatch's `runPublicKey` cannot seal anything.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RunKeyError {
    #[error("the dispatch carried no runPublicKey")]
    Missing,
    #[error("the dispatch's runPublicKey is not base64")]
    NotBase64,
    #[error(
        "the dispatch's runPublicKey is not a DER SPKI X25519 public key ({len} bytes; expected 44 starting with the X25519 algorithm identifier)"
    )]
    NotX25519 { len: usize },
    #[error("the dispatch's runPublicKey is a low-order X25519 point (no shared secret)")]
    LowOrder,
}

/// A secret output that cannot be sent. The value is never part of it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SecretOutputError {
    #[error(
        "secret output '{key}' cannot be sent: {reason}, so this run has no key to encrypt it with"
    )]
    NoRunKey { key: String, reason: RunKeyError },
    #[error("a secret output needs a non-empty name")]
    EmptyName,
}

/// A secret value on its way to be sealed; `Debug` never shows it.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(transparent)]
pub struct SecretValue(pub String);

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SecretValue(***)")
    }
}

/// Checks the name of a secret output.
pub fn check_key(key: &str) -> Result<(), SecretOutputError> {
    if key.trim().is_empty() {
        return Err(SecretOutputError::EmptyName);
    }
    Ok(())
}

/// Parses `runPublicKey`: base64 of the 44-byte DER SPKI of an X25519 key.
pub fn parse_run_public_key(base64_spki: &str) -> Result<PublicKey, RunKeyError> {
    let der = base64::engine::general_purpose::STANDARD
        .decode(base64_spki.trim())
        .map_err(|_| RunKeyError::NotBase64)?;
    let key: [u8; 32] = der
        .strip_prefix(&X25519_SPKI_PREFIX[..])
        .and_then(|raw| raw.try_into().ok())
        .ok_or(RunKeyError::NotX25519 { len: der.len() })?;
    Ok(PublicKey::from(key))
}

/// Base64 of the DER SPKI of an X25519 public key.
pub fn spki_base64(key: &PublicKey) -> String {
    let mut der = X25519_SPKI_PREFIX.to_vec();
    der.extend_from_slice(key.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(der)
}

/// Seals the secret outputs of one job: one ephemeral key pair, one derived AES key, a fresh IV
/// per value.
pub struct SecretOutputSealer {
    cipher: Aes256Gcm,
    /// `agentPublicKey` of every envelope: base64 DER SPKI of the ephemeral public key.
    agent_public_key: String,
}

/// Shows the ephemeral public key only, never key material.
impl fmt::Debug for SecretOutputSealer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretOutputSealer")
            .field("agent_public_key", &self.agent_public_key)
            .finish_non_exhaustive()
    }
}

impl SecretOutputSealer {
    /// A sealer for the run key `run_public_key` (the dispatch's `runPublicKey`) with a fresh
    /// ephemeral key pair.
    pub fn new(run_public_key: Option<&str>) -> Result<Self, RunKeyError> {
        let run_key = parse_run_public_key(run_public_key.ok_or(RunKeyError::Missing)?)?;
        let ephemeral = EphemeralSecret::random_from_rng(OsRng);
        let agent_key = PublicKey::from(&ephemeral);
        Self::from_agreement(ephemeral.diffie_hellman(&run_key), &agent_key)
    }

    /// The sealer of an agreed secret (`shared`) and the ephemeral public key that made it.
    fn from_agreement(shared: SharedSecret, agent_key: &PublicKey) -> Result<Self, RunKeyError> {
        // A low-order run key makes the shared secret all zeros: anyone could derive the key.
        if !shared.was_contributory() {
            return Err(RunKeyError::LowOrder);
        }
        let mut aes_key = [0u8; 32];
        Hkdf::<Sha256>::new(Some(&[]), shared.as_bytes())
            .expand(HKDF_INFO, &mut aes_key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let cipher = Aes256Gcm::new(&aes_key.into());
        aes_key.fill(0);
        Ok(SecretOutputSealer {
            cipher,
            agent_public_key: spki_base64(agent_key),
        })
    }

    /// Seals one value under a fresh random IV.
    pub fn seal(&self, value: &str) -> SecretOutput {
        self.seal_with_iv(value, Aes256Gcm::generate_nonce(&mut OsRng))
    }

    fn seal_with_iv(
        &self,
        value: &str,
        iv: Nonce<<Aes256Gcm as AeadCore>::NonceSize>,
    ) -> SecretOutput {
        // `encrypt` appends the 16-byte tag to the ciphertext; the wire wants IV ‖ tag ‖ text.
        let sealed = self
            .cipher
            .encrypt(&iv, value.as_bytes())
            .expect("AES-GCM encrypts any message shorter than 64 GiB");
        let (ciphertext, tag) = sealed.split_at(sealed.len() - 16);
        let mut packed = Vec::with_capacity(IV_LEN + sealed.len());
        packed.extend_from_slice(&iv);
        packed.extend_from_slice(tag);
        packed.extend_from_slice(ciphertext);
        SecretOutput {
            agent_public_key: self.agent_public_key.clone(),
            encrypted: base64::engine::general_purpose::STANDARD.encode(packed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x25519_dalek::StaticSecret;

    /// The orchestrator's side, written from the spec: agree with the run's private key and
    /// the envelope's public key, derive, split IV ‖ tag ‖ ciphertext, open.
    fn open(run_private: &StaticSecret, envelope: &SecretOutput) -> Result<String, String> {
        let agent_key =
            parse_run_public_key(&envelope.agent_public_key).map_err(|e| e.to_string())?;
        let shared = run_private.diffie_hellman(&agent_key);
        let mut key = [0u8; 32];
        Hkdf::<Sha256>::new(None, shared.as_bytes())
            .expand(b"kici-run-secret-outputs", &mut key)
            .unwrap();
        let packed = base64::engine::general_purpose::STANDARD
            .decode(&envelope.encrypted)
            .map_err(|e| e.to_string())?;
        let (iv, rest) = packed.split_at(12);
        let (tag, ciphertext) = rest.split_at(16);
        let mut sealed = ciphertext.to_vec();
        sealed.extend_from_slice(tag);
        let plain = Aes256Gcm::new(&key.into())
            .decrypt(Nonce::from_slice(iv), sealed.as_slice())
            .map_err(|_| "authentication failed".to_owned())?;
        String::from_utf8(plain).map_err(|e| e.to_string())
    }

    fn run_key_pair(seed: u8) -> (StaticSecret, String) {
        let private = StaticSecret::from([seed; 32]);
        let public = spki_base64(&PublicKey::from(&private));
        (private, public)
    }

    #[test]
    fn the_run_private_key_opens_what_was_sealed() {
        let (private, public) = run_key_pair(7);
        let sealer = SecretOutputSealer::new(Some(&public)).unwrap();
        let first = sealer.seal("hunter2-deploy-token");
        let second = sealer.seal("hunter2-deploy-token");
        assert_eq!(open(&private, &first).unwrap(), "hunter2-deploy-token");
        assert_eq!(open(&private, &sealer.seal("")).unwrap(), "");
        assert_eq!(
            open(&private, &sealer.seal("ünïcode ✓")).unwrap(),
            "ünïcode ✓"
        );
        // One ephemeral key per job, a fresh IV per value.
        assert_eq!(first.agent_public_key, second.agent_public_key);
        assert_ne!(first.encrypted, second.encrypted);
        // Another run's key cannot open it, and a flipped bit is detected.
        let (other, _) = run_key_pair(9);
        assert!(open(&other, &first).is_err());
        let mut packed = base64::engine::general_purpose::STANDARD
            .decode(&first.encrypted)
            .unwrap();
        *packed.last_mut().unwrap() ^= 1;
        let tampered = SecretOutput {
            encrypted: base64::engine::general_purpose::STANDARD.encode(packed),
            ..first.clone()
        };
        assert!(open(&private, &tampered).is_err());
        // A new job makes a new ephemeral key.
        let next_job = SecretOutputSealer::new(Some(&public)).unwrap();
        assert_ne!(next_job.seal("x").agent_public_key, first.agent_public_key);
    }

    #[test]
    fn the_envelope_layout_is_iv_then_tag_then_ciphertext() {
        let (_, public) = run_key_pair(3);
        let sealed = SecretOutputSealer::new(Some(&public))
            .unwrap()
            .seal("abcde");
        let packed = base64::engine::general_purpose::STANDARD
            .decode(&sealed.encrypted)
            .unwrap();
        assert_eq!(packed.len(), 12 + 16 + 5);
        let spki = base64::engine::general_purpose::STANDARD
            .decode(&sealed.agent_public_key)
            .unwrap();
        assert_eq!(spki.len(), 44);
        assert_eq!(spki[..12], X25519_SPKI_PREFIX);
    }

    /// A vector computed independently with Node's `node:crypto` (OpenSSL), the library the
    /// KiCI orchestrator decrypts with: run private key 0x11 x 32 and ephemeral private key
    /// 0x22 x 32 (PKCS#8 DER `302e020100300506032b656e04220420` + the bytes), `diffieHellman`,
    /// `hkdfSync('sha256', shared, empty, 'kici-run-secret-outputs', 32)`, `aes-256-gcm` with
    /// IV 0x33 x 12 over `s3cr3t-value`, packed IV ‖ tag ‖ ciphertext.
    #[test]
    fn a_known_answer_from_node_crypto() {
        let ephemeral = StaticSecret::from([0x22; 32]);
        let agent_key = PublicKey::from(&ephemeral);
        let run_key = PublicKey::from(&StaticSecret::from([0x11; 32]));
        let sealer =
            SecretOutputSealer::from_agreement(ephemeral.diffie_hellman(&run_key), &agent_key)
                .unwrap();
        let sealed = sealer.seal_with_iv("s3cr3t-value", [0x33; 12].into());
        assert_eq!(sealed.agent_public_key, KNOWN_AGENT_PUBLIC_KEY);
        assert_eq!(sealed.encrypted, KNOWN_ENCRYPTED);
    }

    const KNOWN_AGENT_PUBLIC_KEY: &str =
        "MCowBQYDK2VuAyEAD6poTtKIZ7l/Smot7l34zpdOdrcBjj8iocTPJnhXDyA=";
    const KNOWN_ENCRYPTED: &str = "MzMzMzMzMzMzMzMzS/h69nx9a+wUMKB1A1Noy6FaANKoFa22cRuBbw==";

    #[test]
    fn unusable_run_keys_are_refused_clearly() {
        assert_eq!(
            SecretOutputSealer::new(None).unwrap_err(),
            RunKeyError::Missing
        );
        assert_eq!(
            SecretOutputSealer::new(Some("not base64!")).unwrap_err(),
            RunKeyError::NotBase64
        );
        // An Ed25519 SPKI key (OID 1.3.101.112) is not an X25519 key.
        let ed25519 = "MCowBQYDK2VwAyEAGb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE=";
        assert_eq!(
            SecretOutputSealer::new(Some(ed25519)).unwrap_err(),
            RunKeyError::NotX25519 { len: 44 }
        );
        let zero = spki_base64(&PublicKey::from([0u8; 32]));
        assert_eq!(
            SecretOutputSealer::new(Some(&zero)).unwrap_err(),
            RunKeyError::LowOrder
        );
        let message = SecretOutputError::NoRunKey {
            key: "TOKEN".into(),
            reason: RunKeyError::Missing,
        }
        .to_string();
        assert!(
            message.contains("'TOKEN'") && message.contains("runPublicKey"),
            "{message}"
        );
    }

    #[test]
    fn the_fixture_run_key_parses() {
        // fixtures/real-orchestrator/job.dispatch.json
        parse_run_public_key("MCowBQYDK2VuAyEARa2aY9Tb+zXaoT7ReEfCUDr739N8qZeC3ygBFTVHEnw=")
            .unwrap();
    }
}
