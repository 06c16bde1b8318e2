//! Waiting for a socket to have something to read without lending the kernel a buffer.
//!
//! An io_uring read owns its buffer for as long as it waits, so a connection waiting for its
//! next request that way holds memory while idle. `IORING_OP_POLL_ADD` waits with no buffer;
//! the bytes are then taken with a non-blocking `recv` into a buffer borrowed only then.

use std::{os::fd::RawFd, pin::pin};

use io_uring::{opcode, types};
use tokio::time::Instant;
use tokio_uring::UnsubmittedOneshot;

use super::{
    connect::{cancel_all_on, ResultOnly},
    IoFailure,
};

/// How a wait for readability ended without failing.
#[derive(Debug, PartialEq, Eq)]
pub enum Readable {
    /// The socket has bytes to read, its end, or an error: a read returns at once.
    Ready,
    /// `interrupt` completed first; the poll was cancelled and awaited.
    Interrupted,
}

/// Waits until `fd` has bytes to read, its end, or an error (a read then returns at once),
/// before `deadline`. At the deadline the poll is cancelled and awaited, so nothing stays in
/// the kernel; the connection is the caller's to close.
pub async fn readable_before(fd: RawFd, deadline: Instant) -> Result<(), IoFailure> {
    readable_unless(fd, deadline, std::future::pending())
        .await
        .map(|_| ())
}

/// [`readable_before`], or until `interrupt` completes, whichever is first: then, too, the
/// poll is cancelled and awaited (a socket that became readable meanwhile says `Ready`).
pub async fn readable_unless(
    fd: RawFd,
    deadline: Instant,
    interrupt: impl std::future::Future<Output = ()>,
) -> Result<Readable, IoFailure> {
    // POLLIN is also reported at end of stream; POLLERR and POLLHUP always are.
    let sqe = opcode::PollAdd::new(types::Fd(fd), libc::POLLIN as u32).build();
    let mut polling = pin!(UnsubmittedOneshot::new((), ResultOnly, sqe).submit());
    let timed_out = tokio::select! {
        biased;
        polled = &mut polling => return polled.map(|_| Readable::Ready).map_err(IoFailure::Io),
        () = super::reused_timer::sleep_until(deadline) => true,
        () = interrupt => false,
    };
    cancel_all_on(fd).await;
    match polling.await {
        // Readable in the same instant: use it.
        Ok(_) => Ok(Readable::Ready),
        Err(_) if timed_out => Err(IoFailure::TimedOut),
        Err(_) => Ok(Readable::Interrupted),
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{self, Write},
        time::Duration,
    };

    use super::*;

    fn pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        (client, server)
    }

    #[test]
    fn readable_once_bytes_arrive_and_then_recv_takes_them() {
        use std::os::fd::AsRawFd;
        let (mut client, server) = pair();
        tokio_uring::start(async move {
            let fd = server.as_raw_fd();
            let writer = std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                client.write_all(b"GET / HTTP/1.1\r\n").unwrap();
                client
            });
            let deadline = Instant::now() + Duration::from_secs(5);
            assert!(readable_before(fd, deadline).await.is_ok());
            let mut buf = Vec::with_capacity(64);
            let n = crate::sys::recv_ready(fd, &mut buf).unwrap();
            assert_eq!(&buf[..n], b"GET / HTTP/1.1\r\n");
            // Nothing more queued: a second recv does not block, it says so.
            let again = crate::sys::recv_ready(fd, &mut buf).unwrap_err();
            assert_eq!(again.kind(), io::ErrorKind::WouldBlock);
            drop(writer.join().unwrap());
            // The peer closed: readable again, and recv reads the end of stream.
            assert!(readable_before(fd, deadline).await.is_ok());
            assert_eq!(crate::sys::recv_ready(fd, &mut buf).unwrap(), 0);
        });
    }

    #[test]
    fn times_out_on_a_quiet_socket_and_leaves_no_poll_behind() {
        use std::os::fd::AsRawFd;
        let (mut client, server) = pair();
        tokio_uring::start(async move {
            let fd = server.as_raw_fd();
            let deadline = Instant::now() + Duration::from_millis(30);
            assert!(matches!(
                readable_before(fd, deadline).await,
                Err(IoFailure::TimedOut)
            ));
            // It returned, so the cancelled poll completed (it is not left in the kernel), and
            // the socket still works: a new wait sees new bytes.
            client.write_all(b"x").unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            assert!(readable_before(fd, deadline).await.is_ok());
        });
    }

    #[test]
    fn an_interrupt_cancels_the_poll_and_says_so() {
        use std::os::fd::AsRawFd;
        let (_client, server) = pair();
        tokio_uring::start(async move {
            let fd = server.as_raw_fd();
            let deadline = Instant::now() + Duration::from_secs(5);
            let interrupt = tokio::time::sleep(Duration::from_millis(20));
            assert_eq!(
                readable_unless(fd, deadline, interrupt).await.unwrap(),
                Readable::Interrupted
            );
        });
    }
}
