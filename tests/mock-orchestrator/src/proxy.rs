//! A fault-injecting TCP proxy for chaos tests: it sits between an agent and the mock
//! orchestrator on loopback and, on command, stalls traffic (both directions stop, the
//! connection stays up, as in a network partition TCP survives) or cuts every connection
//! (both sides reset at once, as when a NAT or load balancer drops the flow).

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Shared switches of the proxy and its connections.
struct Switches {
    /// Traffic flows only while this is false.
    stalled: watch::Sender<bool>,
    /// Bumped by every cut; connections opened before it end with a reset.
    cuts: watch::Sender<u64>,
    upstream: std::sync::Mutex<SocketAddr>,
    connections: AtomicU64,
}

/// A running proxy; dropping it stops accepting (open connections end with their peers).
pub struct FaultProxy {
    addr: SocketAddr,
    switches: Arc<Switches>,
    accept: tokio::task::JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards every connection to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<FaultProxy> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let addr = listener.local_addr()?;
        let switches = Arc::new(Switches {
            stalled: watch::channel(false).0,
            cuts: watch::channel(0).0,
            upstream: std::sync::Mutex::new(upstream),
            connections: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&switches)));
        Ok(FaultProxy {
            addr,
            switches,
            accept,
        })
    }

    /// `ws://<proxy>/ws`: what the agent should connect to.
    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    /// Where new connections are forwarded from now on (a restarted orchestrator).
    pub fn set_upstream(&self, upstream: SocketAddr) {
        *self
            .switches
            .upstream
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = upstream;
    }

    /// Stops all traffic for `duration`; connections stay open.
    pub async fn stall(&self, duration: Duration) {
        self.switches.stalled.send_replace(true);
        tokio::time::sleep(duration).await;
        self.switches.stalled.send_replace(false);
    }

    /// Resets every open connection, both sides, at once.
    pub fn cut(&self) {
        self.switches.cuts.send_modify(|cuts| *cuts += 1);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.switches.connections.load(Ordering::SeqCst)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, switches: Arc<Switches>) {
    while let Ok((client, _)) = listener.accept().await {
        switches.connections.fetch_add(1, Ordering::SeqCst);
        let upstream = *switches.upstream.lock().unwrap_or_else(|e| e.into_inner());
        let switches = Arc::clone(&switches);
        tokio::spawn(async move {
            if let Ok(server) = TcpStream::connect(upstream).await {
                relay(client, server, &switches).await;
            }
        });
    }
}

/// Copies both ways until either side ends or a cut comes; a cut resets both sockets.
async fn relay(client: TcpStream, server: TcpStream, switches: &Switches) {
    let mut cuts = switches.cuts.subscribe();
    cuts.mark_unchanged();
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let cut = {
        let upstream = pump(
            &mut client_read,
            &mut server_write,
            switches.stalled.subscribe(),
        );
        let downstream = pump(
            &mut server_read,
            &mut client_write,
            switches.stalled.subscribe(),
        );
        tokio::select! {
            _ = async { tokio::join!(upstream, downstream) } => false,
            _ = cuts.changed() => true,
        }
    };
    if cut {
        // Linger 0: dropping the socket sends a reset instead of a FIN, and unsent data is
        // discarded, as when the network drops the flow.
        for stream in [
            client_read.reunite(client_write),
            server_read.reunite(server_write),
        ]
        .into_iter()
        .flatten()
        {
            let _ = stream.set_zero_linger();
        }
    }
}

/// Copies `from` to `to` while not stalled; returns when `from` ends or `to` fails.
async fn pump(
    from: &mut tokio::net::tcp::OwnedReadHalf,
    to: &mut tokio::net::tcp::OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        let read = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => {
                let _ = to.shutdown().await;
                return;
            }
            Ok(read) => read,
        };
        // A stall that began while this read was pending holds the bytes back too.
        if stalled.wait_for(|s| !*s).await.is_err() {
            return;
        }
        if to.write_all(&buffer[..read]).await.is_err() {
            return;
        }
    }
}
