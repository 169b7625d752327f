//! systemd's service notification protocol (`sd_notify(3)`), for an agent run as a
//! `Type=notify` unit: `READY=1` once it is registered with the orchestrator (not merely
//! started), `STATUS=` lines as the connection comes and goes, `STOPPING=1` when it begins to
//! stop. The standalone binary uses it; an embedding host may too.
//!
//! The protocol is one datagram per message to the `AF_UNIX` socket named by `NOTIFY_SOCKET`
//! (a path, or `@name` in the abstract namespace); without the variable nothing is sent.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};

use crate::events::Event;

/// The variable the service manager sets for `Type=notify` units.
pub const NOTIFY_SOCKET: &str = "NOTIFY_SOCKET";

/// `NOTIFY_SOCKET` could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ServiceNotifyError {
    #[error("{NOTIFY_SOCKET}={value:?} is neither an absolute path nor an @abstract name")]
    BadAddress { value: String },
    #[error("{NOTIFY_SOCKET}: {source}")]
    Socket {
        #[source]
        source: io::Error,
    },
}

/// Sends notifications to the service manager.
#[derive(Debug)]
pub struct ServiceNotifier {
    socket: UnixDatagram,
    address: SocketAddr,
    /// Whether `READY=1` went out: it is sent once, at the first registration.
    ready: AtomicBool,
}

impl ServiceNotifier {
    /// The notifier for `NOTIFY_SOCKET`, or `None` when the variable is unset or empty (not
    /// run by a service manager that wants notifications).
    pub fn from_env() -> Result<Option<Self>, ServiceNotifyError> {
        match std::env::var_os(NOTIFY_SOCKET) {
            Some(value) if !value.is_empty() => {
                Self::for_address(&value.to_string_lossy()).map(Some)
            }
            _ => Ok(None),
        }
    }

    /// A notifier for socket `value` in `NOTIFY_SOCKET`'s syntax.
    pub fn for_address(value: &str) -> Result<Self, ServiceNotifyError> {
        let address = if let Some(name) = value.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes())
        } else if value.starts_with('/') {
            SocketAddr::from_pathname(value)
        } else {
            return Err(ServiceNotifyError::BadAddress {
                value: value.to_owned(),
            });
        }
        .map_err(|source| ServiceNotifyError::Socket { source })?;
        let socket =
            UnixDatagram::unbound().map_err(|source| ServiceNotifyError::Socket { source })?;
        Ok(ServiceNotifier {
            socket,
            address,
            ready: AtomicBool::new(false),
        })
    }

    /// Sends one notification (`KEY=value` lines).
    pub fn send(&self, message: &str) -> io::Result<()> {
        self.socket
            .send_to_addr(message.as_bytes(), &self.address)
            .map(|_| ())
    }

    /// Tells the service manager what `event` means for the service: ready at the first
    /// registration, a status line for the connection's ups and downs. Other events say
    /// nothing to it.
    pub fn on_event(&self, event: &Event) -> io::Result<()> {
        let Some(status) = status_of(event) else {
            return Ok(());
        };
        let ready =
            matches!(event, Event::Registered { .. }) && !self.ready.swap(true, Ordering::SeqCst);
        let message = if ready {
            format!("READY=1\nSTATUS={status}")
        } else {
            format!("STATUS={status}")
        };
        self.send(&message)
    }

    /// Tells the service manager the agent is stopping (shutdown or drain), with why.
    pub fn stopping(&self, why: &str) -> io::Result<()> {
        self.send(&format!("STOPPING=1\nSTATUS={}", one_line(why)))
    }
}

/// The `STATUS=` text for an event, if it concerns the service's state.
fn status_of(event: &Event) -> Option<String> {
    match event {
        Event::Registered { agent_id } => Some(format!("Registered as {}", one_line(agent_id))),
        Event::Disconnected => Some("Disconnected from the orchestrator; reconnecting".to_owned()),
        Event::AuthFailed { reason } => Some(format!(
            "Authentication rejected ({}); not reconnecting, /ready answers 503",
            one_line(reason)
        )),
        _ => None,
    }
}

/// A notification is newline-separated `KEY=value` pairs: a value keeps to one line.
fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn listener() -> (tempfile::TempDir, UnixDatagram, ServiceNotifier) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let notifier = ServiceNotifier::for_address(path.to_str().unwrap()).unwrap();
        (dir, socket, notifier)
    }

    fn receive(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let len = socket.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..len]).into_owned()
    }

    #[test]
    fn ready_goes_out_once_at_the_first_registration_then_only_status() {
        let (_dir, socket, notifier) = listener();
        notifier
            .on_event(&Event::JobStarted {
                run_id: "r".into(),
                job_id: "j".into(),
                name: "n".into(),
            })
            .unwrap();
        notifier.on_event(&Event::Disconnected).unwrap();
        assert_eq!(
            receive(&socket),
            "STATUS=Disconnected from the orchestrator; reconnecting"
        );
        let registered = Event::Registered {
            agent_id: "a1".into(),
        };
        notifier.on_event(&registered).unwrap();
        assert_eq!(receive(&socket), "READY=1\nSTATUS=Registered as a1");
        notifier.on_event(&registered).unwrap();
        assert_eq!(receive(&socket), "STATUS=Registered as a1");
        notifier.stopping("Shutting down\non SIGTERM").unwrap();
        assert_eq!(
            receive(&socket),
            "STOPPING=1\nSTATUS=Shutting down on SIGTERM"
        );
    }

    #[test]
    fn abstract_names_are_understood_and_relative_paths_refused() {
        let name = format!("kici-notify-test-{}", uuid::Uuid::new_v4().simple());
        let address = {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name.as_bytes()).unwrap()
        };
        let socket = UnixDatagram::bind_addr(&address).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let notifier = ServiceNotifier::for_address(&format!("@{name}")).unwrap();
        notifier.stopping("bye").unwrap();
        assert_eq!(receive(&socket), "STOPPING=1\nSTATUS=bye");
        assert!(matches!(
            ServiceNotifier::for_address("relative/notify.sock"),
            Err(ServiceNotifyError::BadAddress { .. })
        ));
    }
}
