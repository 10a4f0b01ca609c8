//! Where results go: JSON lines on stdout, over UDP (one datagram per line), or into memory.

use std::io::Write;
use std::net::{SocketAddr, UdpSocket};

/// A destination for JSON lines (each `line` without its newline).
pub trait Sink {
    /// Publishes one line.
    fn publish(&mut self, line: &str) -> std::io::Result<()>;
}

/// Lines on standard output.
pub struct Stdout;

impl Sink for Stdout {
    fn publish(&mut self, line: &str) -> std::io::Result<()> {
        let mut out = std::io::stdout().lock();
        out.write_all(line.as_bytes())?;
        out.write_all(b"\n")
    }
}

/// One UDP datagram per line to a fixed address.
pub struct Udp {
    socket: UdpSocket,
    to: SocketAddr,
}

impl Udp {
    /// A sender bound to an ephemeral local port of the same address family as `to`.
    pub fn new(to: SocketAddr) -> std::io::Result<Udp> {
        let local: SocketAddr = if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
        Ok(Udp { socket: UdpSocket::bind(local)?, to })
    }
}

impl Sink for Udp {
    fn publish(&mut self, line: &str) -> std::io::Result<()> {
        self.socket.send_to(line.as_bytes(), self.to).map(|_| ())
    }
}

/// Lines collected in memory (tests, embedding).
#[derive(Default)]
pub struct Memory(pub Vec<String>);

impl Sink for Memory {
    fn publish(&mut self, line: &str) -> std::io::Result<()> {
        self.0.push(line.to_string());
        Ok(())
    }
}
