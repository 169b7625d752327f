//! The orchestrator's side of secret outputs (protocol.md §4.2, `job.status.secretOutputs`): a
//! run's X25519 key pair, the `runPublicKey` a dispatch carries, and opening the envelopes an
//! agent sends. Written from the spec's text, independently of the agent's code, so a test that
//! holds the run's private key checks the agent's encryption end to end.

use aes_gcm::aead::{Aead, KeyInit, OsRng};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use hkdf::Hkdf;
use serde_json::Value;
use sha2::Sha256;
use x25519_dalek::{PublicKey, StaticSecret};

/// DER of an X25519 SubjectPublicKeyInfo (RFC 8410) before the 32 key bytes.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x6e, 0x03, 0x21, 0x00,
];

/// The HKDF info of the spec.
const INFO: &[u8] = b"kici-run-secret-outputs";

/// A run's key pair, as the orchestrator makes one per run.
pub struct RunKeyPair {
    private: StaticSecret,
}

impl Default for RunKeyPair {
    fn default() -> Self {
        Self::generate()
    }
}

impl RunKeyPair {
    /// A fresh random key pair.
    pub fn generate() -> Self {
        RunKeyPair {
            private: StaticSecret::random_from_rng(OsRng),
        }
    }

    /// `runPublicKey`: base64 of the DER SPKI of the public key.
    pub fn public_key_base64(&self) -> String {
        let mut der = SPKI_PREFIX.to_vec();
        der.extend_from_slice(PublicKey::from(&self.private).as_bytes());
        BASE64.encode(der)
    }

    /// Opens one `secretOutputs` envelope `{agentPublicKey, encrypted}`: ECDH of the run's
    /// private key with `agentPublicKey`, HKDF-SHA256 (empty salt, the spec's info, 32 bytes),
    /// AES-256-GCM over `encrypted` = IV (12) ‖ tag (16) ‖ ciphertext.
    pub fn open(&self, envelope: &Value) -> Result<String, String> {
        let field = |name: &str| {
            envelope
                .get(name)
                .and_then(Value::as_str)
                .ok_or_else(|| format!("envelope has no string `{name}`"))
        };
        let agent_key = parse_spki(field("agentPublicKey")?)?;
        let shared = self.private.diffie_hellman(&agent_key);
        let mut key = [0u8; 32];
        Hkdf::<Sha256>::new(Some(&[]), shared.as_bytes())
            .expand(INFO, &mut key)
            .map_err(|e| e.to_string())?;
        let packed = BASE64
            .decode(field("encrypted")?)
            .map_err(|e| format!("encrypted is not base64: {e}"))?;
        if packed.len() < 28 {
            return Err(format!(
                "encrypted holds {} bytes, less than IV + tag",
                packed.len()
            ));
        }
        let (iv, rest) = packed.split_at(12);
        let (tag, ciphertext) = rest.split_at(16);
        let mut sealed = ciphertext.to_vec();
        sealed.extend_from_slice(tag);
        let plain = Aes256Gcm::new(&key.into())
            .decrypt(Nonce::from_slice(iv), sealed.as_slice())
            .map_err(|_| "AES-GCM authentication failed (wrong key, layout or data)".to_owned())?;
        String::from_utf8(plain).map_err(|e| format!("not UTF-8: {e}"))
    }
}

/// The public key of a base64 DER SPKI X25519 key.
fn parse_spki(text: &str) -> Result<PublicKey, String> {
    let der = BASE64
        .decode(text)
        .map_err(|e| format!("not base64: {e}"))?;
    let raw: [u8; 32] = der
        .strip_prefix(&SPKI_PREFIX[..])
        .and_then(|raw| raw.try_into().ok())
        .ok_or_else(|| format!("not a DER SPKI X25519 key ({} bytes)", der.len()))?;
    Ok(PublicKey::from(raw))
}

/// Why an envelope is not shaped as the spec says (without opening it).
pub(crate) fn envelope_shape(envelope: &Value) -> Result<(), String> {
    let agent_key = envelope
        .get("agentPublicKey")
        .and_then(Value::as_str)
        .unwrap_or_default();
    parse_spki(agent_key).map_err(|e| format!("agentPublicKey: {e}"))?;
    let encrypted = envelope
        .get("encrypted")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let packed = BASE64
        .decode(encrypted)
        .map_err(|e| format!("encrypted: not base64: {e}"))?;
    if packed.len() < 28 {
        return Err(format!(
            "encrypted: {} bytes, less than the 12-byte IV and 16-byte tag",
            packed.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Sealed by Node's `node:crypto` (the orchestrator's library) for run private key
    /// 0x11 x 32 with ephemeral key 0x22 x 32 and IV 0x33 x 12.
    #[test]
    fn opens_an_envelope_sealed_by_node_crypto() {
        let pair = RunKeyPair {
            private: StaticSecret::from([0x11; 32]),
        };
        assert_eq!(
            pair.public_key_base64(),
            "MCowBQYDK2VuAyEAe06Qm75//kTEZaIgA31gjuNYl9Me+XLwf3SJLLD3PxM="
        );
        let envelope = json!({
            "agentPublicKey": "MCowBQYDK2VuAyEAD6poTtKIZ7l/Smot7l34zpdOdrcBjj8iocTPJnhXDyA=",
            "encrypted": "MzMzMzMzMzMzMzMzS/h69nx9a+wUMKB1A1Noy6FaANKoFa22cRuBbw==",
        });
        assert_eq!(pair.open(&envelope).unwrap(), "s3cr3t-value");
        assert!(RunKeyPair::generate().open(&envelope).is_err());
        assert_eq!(envelope_shape(&envelope), Ok(()));
    }
}
