//! TLS for the mock's agent endpoint (`wss://`): a throw-away certificate authority generated at
//! start and a server certificate it signed for `127.0.0.1` and `localhost`. Only the CA's
//! certificate leaves the mock, for the agent under test to trust (or not).

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

/// Why the mock's TLS material could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// Generating or signing a certificate failed.
    #[error("cannot generate the test certificates: {0}")]
    Generate(#[from] rcgen::Error),
    /// rustls refused the generated certificate or key.
    #[error("cannot build the TLS server configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A fresh test CA and the server side of TLS. Cheap to clone.
#[derive(Clone)]
pub struct MockTls {
    ca_pem: String,
    acceptor: TlsAcceptor,
}

impl std::fmt::Debug for MockTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MockTls").finish_non_exhaustive()
    }
}

impl MockTls {
    /// Generates a CA ("KiCI mock test CA") and a server certificate for `127.0.0.1` and
    /// `localhost` signed by it.
    pub fn generate() -> Result<MockTls, TlsSetupError> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "KiCI mock test CA");
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate()?;
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let issuer = Issuer::new(ca_params, ca_key);

        let mut server_params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
        server_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "kici-mock-orchestrator");
        server_params.use_authority_key_identifier_extension = true;
        server_params
            .extended_key_usages
            .push(rcgen::ExtendedKeyUsagePurpose::ServerAuth);
        let server_key = KeyPair::generate()?;
        let server_cert = server_params.signed_by(&server_key, &issuer)?;

        let chain = vec![CertificateDer::from(server_cert.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
        Ok(MockTls {
            ca_pem: ca_cert.pem(),
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// The CA certificate (PEM) that signed the server certificate: what an agent must trust.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// The server side of TLS with the CA-signed certificate, for tests that serve something
    /// other than the orchestrator (an HTTPS git remote, ...) under the same CA.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}
