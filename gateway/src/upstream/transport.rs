//! The byte stream to an upstream server: plain TCP, or TLS over it.

use std::{io, net::Shutdown, ops::Range, os::fd::RawFd};

use tokio::time::Instant;

use crate::io::{TcpTransport, TlsTransport, Transport};

pub enum UpstreamTransport {
    Plain(TcpTransport),
    /// Boxed: a TLS session is large, and most pools hold plain connections.
    Tls(Box<TlsTransport>),
}

impl UpstreamTransport {
    pub fn raw_fd(&self) -> RawFd {
        match self {
            UpstreamTransport::Plain(t) => t.raw_fd(),
            UpstreamTransport::Tls(t) => t.raw_fd(),
        }
    }

    /// Whether the server sent anything not yet read (held by rustls, where a look at the
    /// socket cannot see it): such a connection is not pooled.
    pub fn has_unread(&self) -> bool {
        match self {
            UpstreamTransport::Plain(_) => false,
            UpstreamTransport::Tls(t) => t.has_unread(),
        }
    }
}

impl Transport for UpstreamTransport {
    async fn read(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        match self {
            UpstreamTransport::Plain(t) => t.read(buf).await,
            UpstreamTransport::Tls(t) => t.read(buf).await,
        }
    }

    async fn write_all(&self, buf: Vec<u8>, range: Range<usize>) -> (io::Result<()>, Vec<u8>) {
        match self {
            UpstreamTransport::Plain(t) => t.write_all(buf, range).await,
            UpstreamTransport::Tls(t) => t.write_all(buf, range).await,
        }
    }

    async fn write_all_pair(
        &self,
        head: Vec<u8>,
        head_range: Range<usize>,
        body: Vec<u8>,
        body_range: Range<usize>,
    ) -> (io::Result<()>, Vec<u8>, Vec<u8>) {
        match self {
            UpstreamTransport::Plain(t) => {
                t.write_all_pair(head, head_range, body, body_range).await
            }
            UpstreamTransport::Tls(t) => t.write_all_pair(head, head_range, body, body_range).await,
        }
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            UpstreamTransport::Plain(t) => t.shutdown(how),
            UpstreamTransport::Tls(t) => t.shutdown(how),
        }
    }

    fn is_tls(&self) -> bool {
        matches!(self, UpstreamTransport::Tls(_))
    }

    fn truncated(&self) -> bool {
        match self {
            UpstreamTransport::Plain(_) => false,
            UpstreamTransport::Tls(t) => t.truncated(),
        }
    }

    async fn close_notify(&self, deadline: Instant) {
        if let UpstreamTransport::Tls(t) = self {
            t.close_notify(deadline).await
        }
    }
}
