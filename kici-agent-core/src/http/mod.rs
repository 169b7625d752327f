//! `GET /health`, `GET /ready` and `GET /metrics` (spec agent.md §4): the agent binds
//! [`Endpoints`] at start and serves them until it stops.
//!
//! The server is the cargo feature `http` (hyper, in `server`). A build without it binds and
//! serves nothing, and [`Endpoints::bind`] warns at every start that `KICI_PORT` is not served,
//! so an operator probing the port finds the reason in the log.

#[cfg(feature = "http")]
mod server;

#[cfg(feature = "http")]
pub(crate) use server::{iso8601_utc, Endpoints, HealthView, Readiness};

#[cfg(not(feature = "http"))]
pub(crate) use no_server::Endpoints;

#[cfg(not(feature = "http"))]
mod no_server {
    use std::net::SocketAddr;
    use std::sync::Arc;

    use tokio_util::sync::CancellationToken;

    /// Stands in for the server in a build without the `http` feature.
    pub(crate) struct Endpoints;

    impl Endpoints {
        /// Binds nothing; says so, naming the address the configuration asked for.
        pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<Endpoints> {
            tracing::warn!(
                %addr,
                "this build of the agent has no HTTP endpoints (cargo feature `http` left out): \
                 /health, /ready and /metrics are not served; KICI_PORT and KICI_BIND_ADDRESS \
                 have no effect"
            );
            Ok(Endpoints)
        }

        /// Nothing is served.
        pub(crate) fn local_addr(&self) -> Option<SocketAddr> {
            None
        }

        /// Nothing to serve: returns at once. Generic over the view because the agent's
        /// `HealthView` exists only with the server.
        pub(crate) async fn serve<V: ?Sized>(self, _view: Arc<V>, _shutdown: CancellationToken) {}
    }
}
