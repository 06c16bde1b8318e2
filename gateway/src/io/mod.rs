//! Connection I/O: the [`Transport`] trait the proxy logic is written against (plain TCP now;
//! TLS through rustls's sans-IO core slots in as another implementation), and deadlines that
//! are safe with io_uring.

mod connect;
mod deadline;
#[cfg(test)]
pub mod memory;
pub mod proxy_protocol;
mod readiness;
mod reused_timer;
mod tcp;
mod tls;

use std::{io, net::Shutdown, ops::Range};

pub use connect::{accept_until, connect_before, Accepted, ConnectFailure};
pub use deadline::{
    read_before, write_and_read_before, write_before, write_pair_before, IoFailure,
};
pub use readiness::{readable_before, readable_unless, Readable};

/// A byte stream the proxy reads and writes with owned buffers, as io_uring requires.
///
/// Futures are not `Send`: each worker drives its connections on its own thread.
#[allow(async_fn_in_trait)]
pub trait Transport {
    /// Reads into the spare capacity of `buf`, after its current length; returns how many bytes
    /// were appended (0 at end of stream). `buf` must have spare capacity.
    async fn read(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>);
    /// Writes all of `buf[range]`.
    async fn write_all(&self, buf: Vec<u8>, range: Range<usize>) -> (io::Result<()>, Vec<u8>);
    /// Writes all of `head[head_range]`, then all of `body[body_range]`: one vectored write when
    /// the kernel takes it all, so a response head and the start of its body leave together.
    async fn write_all_pair(
        &self,
        head: Vec<u8>,
        head_range: Range<usize>,
        body: Vec<u8>,
        body_range: Range<usize>,
    ) -> (io::Result<()>, Vec<u8>, Vec<u8>);
    /// Shuts down one or both directions; pending operations then complete at once.
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
    /// The socket to wait on, holding no buffer, between requests: plain TCP, where nothing
    /// is buffered above the socket. `None` where the transport holds bytes of its own (TLS
    /// decrypts whole records), so the wait has to be a read.
    fn unbuffered_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// Whether the stream is TLS: a client that reached the gateway over TLS (for
    /// X-Forwarded-Proto), an upstream reached over TLS.
    fn is_tls(&self) -> bool {
        false
    }
    /// Whether the stream ended without the peer saying so (TLS: no close_notify), so what
    /// came last may have been cut; never on plain TCP, where a close is all there is.
    fn truncated(&self) -> bool {
        false
    }
    /// Says the stream ends (TLS: close_notify, so a body framed by the close is known to be
    /// whole), before `deadline`; nothing to say on plain TCP.
    async fn close_notify(&self, _deadline: tokio::time::Instant) {}
}

pub use tcp::{RequestInFlight, TcpTransport};
pub use tls::{HandshakeError, TlsTransport};
