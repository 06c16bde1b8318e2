//! Reads and writes with a deadline that do not leak under io_uring.
//!
//! Dropping an in-flight io_uring read does not cancel it: the kernel keeps the buffer and the
//! socket until the operation completes, which for an idle peer is never. So on a deadline the
//! socket is shut down, which completes the operation at once, and the operation is awaited.
//! The connection is unusable afterwards and the caller closes it.

use std::{io, net::Shutdown, ops::Range, pin::pin};

use tokio::time::Instant;

use super::Transport;

/// Why a read or write with a deadline failed.
#[derive(Debug)]
pub enum IoFailure {
    /// The deadline passed; the socket has been shut down.
    TimedOut,
    /// The peer closed the connection before the operation could complete (or mid-write).
    Closed,
    Io(io::Error),
}

impl std::fmt::Display for IoFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            IoFailure::TimedOut => f.write_str("timed out"),
            IoFailure::Closed => f.write_str("connection closed by peer"),
            IoFailure::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Reads into the spare capacity of `buf`; `Ok(0)` is end of stream.
pub async fn read_before<T: Transport>(
    t: &T,
    buf: Vec<u8>,
    deadline: Instant,
) -> (Result<usize, IoFailure>, Vec<u8>) {
    let mut op = pin!(t.read(buf));
    tokio::select! {
        biased;
        (res, buf) = &mut op => (res.map_err(IoFailure::Io), buf),
        _ = super::reused_timer::sleep_until(deadline) => {
            let _ = t.shutdown(Shutdown::Both);
            let (_, buf) = op.await;
            (Err(IoFailure::TimedOut), buf)
        }
    }
}

/// Writes all of `buf[range]`.
pub async fn write_before<T: Transport>(
    t: &T,
    buf: Vec<u8>,
    range: Range<usize>,
    deadline: Instant,
) -> (Result<(), IoFailure>, Vec<u8>) {
    let mut op = pin!(t.write_all(buf, range));
    tokio::select! {
        biased;
        (res, buf) = &mut op => (res.map_err(classify_write_error), buf),
        _ = super::reused_timer::sleep_until(deadline) => {
            let _ = t.shutdown(Shutdown::Both);
            let (_, buf) = op.await;
            (Err(IoFailure::TimedOut), buf)
        }
    }
}

/// Writes all of `head[head_range]` then all of `body[body_range]`.
pub async fn write_pair_before<T: Transport>(
    t: &T,
    head: Vec<u8>,
    head_range: Range<usize>,
    body: Vec<u8>,
    body_range: Range<usize>,
    deadline: Instant,
) -> (Result<(), IoFailure>, Vec<u8>, Vec<u8>) {
    let mut op = pin!(t.write_all_pair(head, head_range, body, body_range));
    tokio::select! {
        biased;
        (res, head, body) = &mut op => (res.map_err(classify_write_error), head, body),
        _ = super::reused_timer::sleep_until(deadline) => {
            let _ = t.shutdown(Shutdown::Both);
            let (_, head, body) = op.await;
            (Err(IoFailure::TimedOut), head, body)
        }
    }
}

fn classify_write_error(e: io::Error) -> IoFailure {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::WriteZero => {
            IoFailure::Closed
        }
        _ => IoFailure::Io(e),
    }
}
