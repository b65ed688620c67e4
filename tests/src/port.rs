//! Loopback ports: picking a free one and waiting until something listens on it.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

/// The only address the harness binds or connects to.
pub const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// A TCP port on 127.0.0.1 that was free a moment ago: the OS picks it (bind to port 0), then
/// the listener is closed so another process can take it. Someone else may grab it first;
/// callers that start a server on it must retry with a new port when the bind fails
/// ([`crate::Broker`] does).
pub fn free_port() -> io::Result<u16> {
    let listener = TcpListener::bind((LOOPBACK, 0))?;
    Ok(listener.local_addr()?.port())
}

/// Waits until `addr` accepts TCP connections, polling every 10 ms, for at most `timeout`.
/// The probe connection is closed at once.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> io::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStream::connect_timeout(&addr, left.clamp(Duration::from_millis(1), STEP * 20)) {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{addr} did not accept connections within {timeout:?}: {e}"),
                ));
            }
            Err(_) => std::thread::sleep(STEP),
        }
    }
}

const STEP: Duration = Duration::from_millis(10);
