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

/// Writes all of `out[range]` and reads into the spare capacity of `inbuf` at the same time,
/// each before its own deadline (either deadline shuts the socket down, which ends both): a
/// request and the first read of its answer reach the kernel in one submission. Awaiting
/// the write before submitting the read costs one more trip through the event loop for the
/// read (the write's completion, a park to submit it). The read is submitted second, so the
/// kernel attempts it after the write. If the write fails,
/// the socket is shut down, so the read ends too; the connection is not usable afterwards.
///
/// Only for a transport that takes a read and a write at once (plain TCP): a TLS read may
/// flush records of its own, which must not overtake a write in flight.
pub async fn write_and_read_before<T: Transport>(
    t: &T,
    out: Vec<u8>,
    range: Range<usize>,
    write_deadline: Instant,
    inbuf: Vec<u8>,
    read_deadline: Instant,
) -> (
    (Result<(), IoFailure>, Vec<u8>),
    (Result<usize, IoFailure>, Vec<u8>),
) {
    let write = async {
        let (res, out) = write_before(t, out, range, write_deadline).await;
        if res.is_err() {
            let _ = t.shutdown(Shutdown::Both);
        }
        (res, out)
    };
    // Biased: the write is polled, and so submitted, first.
    tokio::join!(biased; write, read_before(t, inbuf, read_deadline))
}

fn classify_write_error(e: io::Error) -> IoFailure {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset | io::ErrorKind::WriteZero => {
            IoFailure::Closed
        }
        _ => IoFailure::Io(e),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        time::Duration,
    };

    use super::*;
    use crate::io::TcpTransport;

    /// A connected pair: the gateway's side on the ring, the peer's a blocking std socket.
    fn pair() -> (TcpTransport, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (
            TcpTransport::new(tokio_uring::net::TcpStream::from_std(ours)),
            peer,
        )
    }

    #[test]
    fn write_and_read_sends_the_request_and_reads_its_answer() {
        tokio_uring::start(async {
            let (ours, mut peer) = pair();
            let server = std::thread::spawn(move || {
                let mut request = [0u8; 14];
                peer.read_exact(&mut request).unwrap();
                peer.write_all(b"HTTP/1.1 200 OK\r\n").unwrap();
                request
            });
            let soon = Instant::now() + Duration::from_secs(5);
            let out = b"xxGET / HTTP/1.1".to_vec();
            let ((written, out), (read, inbuf)) =
                write_and_read_before(&ours, out, 2..16, soon, Vec::with_capacity(64), soon).await;
            assert!(written.is_ok());
            assert_eq!(out.len(), 16, "the buffer comes back whole");
            let n = read.expect("the answer was read");
            assert!(n > 0);
            assert_eq!(&server.join().unwrap(), b"GET / HTTP/1.1");
            assert!(b"HTTP/1.1 200 OK\r\n".starts_with(&inbuf[..n]));
        });
    }

    #[test]
    fn a_quiet_peer_times_the_read_out_after_the_write_went() {
        tokio_uring::start(async {
            let (ours, mut peer) = pair();
            let now = Instant::now();
            let ((written, _), (read, _)) = write_and_read_before(
                &ours,
                b"ping".to_vec(),
                0..4,
                now + Duration::from_secs(5),
                Vec::with_capacity(64),
                now + Duration::from_millis(50),
            )
            .await;
            assert!(written.is_ok());
            assert!(matches!(read, Err(IoFailure::TimedOut)));
            let mut got = [0u8; 4];
            peer.read_exact(&mut got).unwrap();
            assert_eq!(&got, b"ping");
        });
    }

    #[test]
    fn a_write_that_cannot_finish_ends_the_read_with_it() {
        tokio_uring::start(async {
            // The peer reads nothing: 64 MiB cannot fit in the sockets' buffers.
            let (ours, _peer) = pair();
            let now = Instant::now();
            let big = vec![b'x'; 64 << 20];
            let len = big.len();
            let ((written, _), (read, _)) = write_and_read_before(
                &ours,
                big,
                0..len,
                now + Duration::from_millis(50),
                Vec::with_capacity(64),
                now + Duration::from_secs(30),
            )
            .await;
            assert!(matches!(written, Err(IoFailure::TimedOut)));
            // The write's deadline shut the socket down: the read ended long before its own.
            assert!(!matches!(read, Err(IoFailure::TimedOut)));
            assert!(now.elapsed() < Duration::from_secs(10));
        });
    }

    #[test]
    fn a_failed_write_ends_the_read_with_it() {
        tokio_uring::start(async {
            // The peer is quiet; only the failed write can end the read before its deadline.
            let (ours, _peer) = pair();
            ours.shutdown(std::net::Shutdown::Write).unwrap();
            let now = Instant::now();
            let ((written, _), (read, _)) = write_and_read_before(
                &ours,
                b"ping".to_vec(),
                0..4,
                now + Duration::from_secs(30),
                Vec::with_capacity(64),
                now + Duration::from_secs(30),
            )
            .await;
            assert!(matches!(written, Err(IoFailure::Closed)), "EPIPE");
            assert!(!matches!(read, Err(IoFailure::TimedOut)));
            assert!(now.elapsed() < Duration::from_secs(10));
        });
    }
}
