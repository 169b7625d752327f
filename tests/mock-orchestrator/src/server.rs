//! The listening socket: accepts agent connections, and can stop listening and listen again on
//! the same port to simulate an orchestrator outage.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;

use crate::connection::serve_connection;
use crate::state::Shared;

/// Frees a connection whose client never completes the handshake. Generous: an agent under
/// valgrind on a loaded machine needs more than 10 s for its side of the handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// Listens on `addr` with SO_REUSEADDR, so the same port can be bound again after an outage.
pub(crate) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    reserve(addr)?.listen(1024)
}

/// A socket bound to `addr` that does not listen: the kernel refuses connection attempts, and
/// the port stays ours. Closing the listener outright would let the kernel hand the port to an
/// outgoing connection as its ephemeral source port (the mock's port is an ephemeral one), and
/// listening again would fail with "address in use" (seen under load). `SO_REUSEPORT` lets it
/// be bound while the listener it replaces still is.
fn reserve(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

/// Serves one accepted connection, first completing the TLS handshake in TLS mode.
async fn serve(shared: Arc<Shared>, stream: TcpStream) {
    let Some(tls) = shared.config.tls.clone() else {
        return serve_connection(shared, stream).await;
    };
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, tls.acceptor().accept(stream)).await {
        Ok(Ok(stream)) => serve_connection(shared, stream).await,
        Ok(Err(err)) => shared.record_tls_failure(err.to_string()),
        Err(_) => shared.record_tls_failure("TLS handshake timed out".to_string()),
    }
}

/// Accepts connections until `stop` turns true. While `accepting` is false the port is held by a
/// socket that does not listen, so connection attempts are refused by the kernel.
pub(crate) async fn accept_loop(
    shared: Arc<Shared>,
    listener: TcpListener,
    mut accepting: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
) {
    let addr = match listener.local_addr() {
        Ok(addr) => addr,
        Err(err) => {
            shared.record_problem(format!("listener has no local address: {err}"));
            return;
        }
    };
    let mut listener = Some(listener);
    let mut reserved: Option<TcpSocket> = None;
    shared.set_listening(true);
    loop {
        if *stop.borrow_and_update() {
            break;
        }
        if !*accepting.borrow_and_update() {
            if listener.is_some() {
                match reserve(addr) {
                    Ok(socket) => reserved = Some(socket),
                    Err(err) => shared.record_problem(format!("cannot hold {addr}: {err}")),
                }
                listener = None;
                shared.set_listening(false);
            }
        } else if listener.is_none() {
            let relisten = match reserved.take() {
                Some(socket) => socket.listen(1024),
                None => bind(addr),
            };
            match relisten {
                Ok(rebound) => {
                    listener = Some(rebound);
                    shared.set_listening(true);
                }
                Err(err) => shared.record_problem(format!("cannot listen on {addr} again: {err}")),
            }
        }
        let Some(active) = &listener else {
            tokio::select! {
                changed = accepting.changed() => if changed.is_err() { break },
                _ = stop.changed() => break,
            }
            continue;
        };
        tokio::select! {
            accepted = active.accept() => match accepted {
                // A connection that raced with set_accepting(false) is dropped unanswered.
                Ok((stream, _)) if *accepting.borrow() => {
                    // Answers go out at once, like any latency-sensitive server's.
                    if let Err(err) = stream.set_nodelay(true) {
                        shared.record_problem(format!("cannot set TCP_NODELAY: {err}"));
                    }
                    tokio::spawn(serve(Arc::clone(&shared), stream));
                }
                Ok(_) => {}
                Err(err) => shared.record_problem(format!("accept failed: {err}")),
            },
            changed = accepting.changed() => if changed.is_err() { break },
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    shared.set_listening(false);
}
