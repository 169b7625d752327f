//! Opening the orchestrator socket (`ws://` or `wss://`) and the certificate authorities both the
//! socket and git HTTPS clones trust.
//!
//! Trusted for `wss://`: the platform's roots as `rustls-native-certs` finds them (the OS store;
//! instead of it, the files named by `SSL_CERT_FILE` / `SSL_CERT_DIR` when either is set, the
//! OpenSSL convention), plus the certificates of [`AgentConfig::tls_ca_file`]. rustls runs with
//! the `ring` provider, passed explicitly: no process-wide default provider is needed, and none a
//! host installed can change ours.
//!
//! Git HTTPS clones go through libgit2 and OpenSSL, which read `SSL_CERT_FILE` / `SSL_CERT_DIR`
//! themselves; [`crate::checkout::trust_extra_ca`] adds the same extra CA file to libgit2's
//! (process-wide) store.
//!
//! [`AgentConfig::tls_ca_file`]: crate::config::AgentConfig::tls_ca_file

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use nix::sys::socket::{setsockopt, sockopt};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The orchestrator socket.
pub(crate) type Socket = WebSocketStream<MaybeTlsStream<Transport>>;

/// The TCP stream under the WebSocket, written with `send(MSG_NOSIGNAL)` only. rustls hands its
/// records over as vectored writes, and `writev` to a socket the peer has closed raises SIGPIPE,
/// which kills a C host that does not ignore it (Rust and Python programs do). Forwarding only
/// `poll_write` keeps every write on `send`, which reports `EPIPE` instead.
pub(crate) struct Transport(TcpStream);

impl AsyncRead for Transport {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Transport {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Why the orchestrator socket could not be opened. The messages name the endpoint as
/// `host:port` only: the URL itself may carry credentials.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectError {
    /// The URL cannot be connected to (validated configurations never get here).
    #[error("unusable orchestrator URL: {0}")]
    Url(String),
    /// TCP connect (or name resolution) failed.
    #[error("connect to {endpoint} failed: {source}")]
    Tcp {
        /// `host:port`.
        endpoint: String,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// The trusted certificates could not be loaded.
    #[error("TLS setup for {endpoint} failed: {reason}")]
    TlsSetup {
        /// `host:port`.
        endpoint: String,
        /// What went wrong.
        reason: String,
    },
    /// The TLS handshake failed, e.g. the orchestrator's certificate is not trusted.
    #[error("TLS handshake with {endpoint} failed: {reason}")]
    TlsHandshake {
        /// `host:port`.
        endpoint: String,
        /// The TLS error, e.g. `invalid peer certificate: UnknownIssuer`.
        reason: String,
    },
    /// The WebSocket upgrade failed.
    #[error("WebSocket handshake with {endpoint} failed: {source}")]
    WebSocket {
        /// `host:port`.
        endpoint: String,
        /// The handshake error.
        #[source]
        source: tokio_tungstenite::tungstenite::Error,
    },
}

/// Opens the WebSocket to `url` (`ws://` or `wss://`), trusting `extra_ca_file` besides the
/// platform's roots for `wss://`. The trust store is read afresh for every connection, so a
/// CA added to the system or the file while the agent retries is picked up.
pub(crate) async fn connect(
    url: &str,
    extra_ca_file: Option<&Path>,
) -> Result<Socket, ConnectError> {
    let parsed = url::Url::parse(url).map_err(|e| ConnectError::Url(e.to_string()))?;
    let secure = match parsed.scheme() {
        "ws" => false,
        "wss" => true,
        other => return Err(ConnectError::Url(format!("unsupported scheme {other:?}"))),
    };
    let host = match parsed.host() {
        Some(url::Host::Domain(domain)) => domain.to_owned(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err(ConnectError::Url("the URL has no host".into())),
    };
    let port = parsed
        .port_or_known_default()
        .ok_or_else(|| ConnectError::Url("the URL has no port".into()))?;
    let endpoint = match parsed.host() {
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]:{port}"),
        _ => format!("{host}:{port}"),
    };

    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|source| ConnectError::Tcp {
            endpoint: endpoint.clone(),
            source,
        })?;
    // Nagle off: a heartbeat or status should not wait behind a delayed ACK.
    tcp.set_nodelay(true).map_err(|source| ConnectError::Tcp {
        endpoint: endpoint.clone(),
        source,
    })?;
    limit_send_buffer(&tcp);

    let tcp = Transport(tcp);
    let stream = if secure {
        let config = client_config(extra_ca_file).map_err(|reason| ConnectError::TlsSetup {
            endpoint: endpoint.clone(),
            reason,
        })?;
        let server_name =
            ServerName::try_from(host).map_err(|e| ConnectError::Url(e.to_string()))?;
        let tls = TlsConnector::from(config)
            .connect(server_name, tcp)
            .await
            .map_err(|error| ConnectError::TlsHandshake {
                endpoint: endpoint.clone(),
                reason: tls_reason(&error),
            })?;
        MaybeTlsStream::Rustls(tls)
    } else {
        MaybeTlsStream::Plain(tcp)
    };
    let (socket, _response) = tokio_tungstenite::client_async_with_config(url, stream, None)
        .await
        .map_err(|source| ConnectError::WebSocket { endpoint, source })?;
    Ok(socket)
}

#[cfg(feature = "http")]
/// `GET url` (`http://` or `https://`, trusting the platform's roots and `SSL_CERT_*`) over
/// HTTP/1.1: the body of a 200 answer. Errors name the host, never the URL (a presigned URL's
/// query is a credential).
pub(crate) async fn http_get(url: &url::Url) -> Result<hyper::body::Incoming, String> {
    let host = match url.host() {
        Some(url::Host::Domain(domain)) => domain.to_owned(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        None => return Err("the URL has no host".into()),
    };
    let port = url
        .port_or_known_default()
        .ok_or_else(|| "the URL has no port".to_owned())?;
    let endpoint = match url.host() {
        Some(url::Host::Ipv6(ip)) => format!("[{ip}]:{port}"),
        _ => format!("{host}:{port}"),
    };
    let tcp = TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("cannot connect to {endpoint}: {e}"))?;
    let target = match url.query() {
        Some(query) => format!("{}?{query}", url.path()),
        None => url.path().to_owned(),
    };
    let request = hyper::Request::get(target)
        .header(hyper::header::HOST, &endpoint)
        .body(http_body_util::Empty::<hyper::body::Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = if url.scheme() == "https" {
        let config = client_config(None)?;
        let server_name = ServerName::try_from(host).map_err(|e| e.to_string())?;
        let tls = TlsConnector::from(config)
            .connect(server_name, tcp)
            .await
            .map_err(|e| format!("TLS with {endpoint}: {}", tls_reason(&e)))?;
        send_http1(tls, request, &endpoint).await?
    } else {
        send_http1(tcp, request, &endpoint).await?
    };
    if response.status() != hyper::StatusCode::OK {
        return Err(format!("{endpoint} answered {}", response.status()));
    }
    Ok(response.into_body())
}

#[cfg(feature = "http")]
async fn send_http1<S>(
    stream: S,
    request: hyper::Request<http_body_util::Empty<hyper::body::Bytes>>,
    endpoint: &str,
) -> Result<hyper::Response<hyper::body::Incoming>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP with {endpoint}: {e}"))?;
    // The connection task ends with the body (or its drop).
    tokio::spawn(connection);
    sender
        .send_request(request)
        .await
        .map_err(|e| format!("HTTP with {endpoint}: {e}"))
}

/// Bytes the kernel may hold unsent for the orchestrator (Linux doubles the value asked for).
const SEND_BUFFER_BYTES: usize = 128 * 1024;

/// Caps the socket's send buffer. The agent paces its frames to the orchestrator's token
/// buckets, but whatever sits in the send buffer when the network stalls arrives at once when
/// it recovers: with the kernel's autotuned buffer (up to 4 MiB) that burst overflowed the
/// orchestrator's 2 MiB byte burst and it dropped log chunks (the chaos suite's "reader stops
/// 10 s" scenario lost 15 % of a 200,000-line log). With a small buffer the backlog waits in
/// the outbox, still paced, instead. 256 KiB still carries the 500 KiB/s budget over any
/// round trip under half a second.
fn limit_send_buffer(tcp: &TcpStream) {
    if let Err(error) = setsockopt(tcp, sockopt::SndBuf, &SEND_BUFFER_BYTES) {
        tracing::debug!(%error, "could not limit the socket's send buffer");
    }
}

/// The rustls error inside a handshake failure (`invalid peer certificate: UnknownIssuer`), or
/// the I/O error when there is none (the peer hung up, ...).
fn tls_reason(error: &io::Error) -> String {
    match error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(tls) => tls.to_string(),
        None => error.to_string(),
    }
}

/// A client configuration trusting the platform's roots plus `extra_ca_file`.
fn client_config(extra_ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        // Unreadable entries of the store are skipped, like OpenSSL does.
        tracing::debug!(%error, "skipping part of the platform certificate store");
    }
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    tracing::debug!(added, ignored, "platform root certificates loaded");
    if let Some(path) = extra_ca_file {
        for cert in read_ca_file(path)? {
            roots
                .add(cert)
                .map_err(|e| format!("cannot trust a certificate of {}: {e}", path.display()))?;
        }
    }
    if roots.is_empty() {
        return Err(
            "no trusted CA certificate: the platform store is empty (install \
             ca-certificates, or point SSL_CERT_FILE at a bundle) and no extra CA file is \
             configured"
                .into(),
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The certificates of a PEM file; an unreadable file or one without any certificate is an
/// error naming the file.
pub(crate) fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let shown = path.display();
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read {shown}: {e}"))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot read the certificates of {shown}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("{shown} contains no PEM certificate"));
    }
    Ok(certs)
}
