//! `sd_notify(3)`: tells systemd (or a test) that the daemon is ready, stopping, or what it is doing.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;

/// Where notifications go: `$NOTIFY_SOCKET`, or nowhere.
#[derive(Debug, Clone, Default)]
pub struct Notifier {
    socket: Option<PathBuf>,
}

impl Notifier {
    /// A notifier for the socket path (`@name` for an abstract socket); `None` disables notifications.
    pub fn new(socket: Option<PathBuf>) -> Self {
        Self { socket }
    }

    /// Sends `state` (e.g. `"READY=1\nSTATUS=serving"`). Does nothing without a socket.
    ///
    /// # Errors
    /// When the datagram cannot be sent.
    pub fn notify(&self, state: &str) -> io::Result<()> {
        let Some(path) = &self.socket else {
            return Ok(());
        };
        let addr = match path.to_str().and_then(|p| p.strip_prefix('@')) {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name.as_bytes())?
            }
            None => SocketAddr::from_pathname(path)?,
        };
        UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    }
}

/// The watchdog interval systemd expects (`WatchdogSec=`), from `WATCHDOG_USEC` and `WATCHDOG_PID` (values
/// read from the environment by the caller): half the timeout, or `None` when no watchdog is set for this
/// process.
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>) -> Option<std::time::Duration> {
    if let Some(pid) = pid
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    let usec: u64 = usec?.parse().ok().filter(|u| *u > 0)?;
    Some(std::time::Duration::from_micros(usec) / 2)
}
