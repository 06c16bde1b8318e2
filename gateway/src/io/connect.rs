//! Connecting and accepting on the worker's ring with operations that can really be ended.
//!
//! Connect: a deadline that really ends the attempt. tokio-uring's
//! own connect cannot be cancelled: dropped at a timeout, the operation stays in the kernel
//! (holding its socket) until the handshake is abandoned, about two minutes with the default
//! `tcp_syn_retries`, so a blackholed upstream would leak a descriptor per request. Here the
//! connect is submitted as our own operation, and at the deadline it is cancelled
//! (`IORING_OP_ASYNC_CANCEL` matching its descriptor, Linux 5.19+), awaited, and its socket
//! closed at once.

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, RawFd},
    time::Duration,
};

use io_uring::{cqueue, opcode, types};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio_uring::{net::TcpStream, OneshotOutputTransform, UnsubmittedOneshot};

/// Why a connect with a deadline failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectFailure {
    #[error("connect did not complete within {0:?}")]
    TimedOut(Duration),
    #[error("connect failed: {0}")]
    Io(#[from] io::Error),
}

/// What the kernel reads while the connect is in flight; kept alive by the operation.
struct ConnectData {
    socket: Socket,
    /// Boxed: the operation moves between the submitter and the driver, the address must not.
    address: Box<SockAddr>,
}

struct ConnectDone;

impl OneshotOutputTransform for ConnectDone {
    type Output = (io::Result<()>, Socket);
    type StoredData = ConnectData;

    fn transform_oneshot_output(self, data: ConnectData, cqe: cqueue::Entry) -> Self::Output {
        drop(data.address);
        (result_of(&cqe).map(|_| ()), data.socket)
    }
}

/// The completion of an operation that carries no data: its result, or the errno.
pub(super) struct ResultOnly;

impl OneshotOutputTransform for ResultOnly {
    type Output = io::Result<u32>;
    type StoredData = ();

    fn transform_oneshot_output(self, _: (), cqe: cqueue::Entry) -> Self::Output {
        result_of(&cqe)
    }
}

fn result_of(cqe: &cqueue::Entry) -> io::Result<u32> {
    match cqe.result() {
        n if n >= 0 => Ok(n as u32),
        errno => Err(io::Error::from_raw_os_error(-errno)),
    }
}

/// Cancels every operation in flight on `fd` on this thread's ring, and waits until the
/// cancellation itself completed (the cancelled operations then complete with ECANCELED).
pub async fn cancel_all_on(fd: RawFd) {
    let sqe = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all()).build();
    // ENOENT (nothing left to cancel) is as good as done.
    let _ = UnsubmittedOneshot::new((), ResultOnly, sqe).submit().await;
}

/// Connects to `addr` within `timeout`; on timeout nothing of the attempt is left behind.
pub async fn connect_before(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, ConnectFailure> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    let address = Box::new(SockAddr::from(addr));
    let fd = socket.as_raw_fd();
    let sqe = opcode::Connect::new(types::Fd(fd), address.as_ptr(), address.len()).build();
    let mut connecting =
        UnsubmittedOneshot::new(ConnectData { socket, address }, ConnectDone, sqe).submit();
    let (result, socket) = tokio::select! {
        done = &mut connecting => done,
        () = tokio::time::sleep(timeout) => {
            cancel_all_on(fd).await;
            let (result, socket) = connecting.await;
            if result.is_ok() {
                // Connected in the same instant as the deadline: use it.
                (result, socket)
            } else {
                drop(socket);
                return Err(ConnectFailure::TimedOut(timeout));
            }
        }
    };
    result?;
    Ok(TcpStream::from_std(socket.into()))
}

struct AcceptDone;

impl OneshotOutputTransform for AcceptDone {
    type Output = io::Result<RawFd>;
    type StoredData = ();

    fn transform_oneshot_output(self, _: (), cqe: cqueue::Entry) -> Self::Output {
        result_of(&cqe).map(|fd| fd as RawFd)
    }
}

/// What [`accept_until`] ended with.
pub enum Accepted {
    /// A new connection, and its peer.
    Connection(TcpStream, std::net::SocketAddr),
    /// `stop` resolved; the accept was cancelled (nothing it took is lost: a connection it had
    /// already accepted comes back as `Connection` first).
    Stopped,
    Failed(io::Error),
}

/// Accepts one connection on `listener`, or ends when `stop` resolves. Unlike dropping
/// tokio-uring's accept, stopping cancels the operation and waits for it, so a connection
/// accepted in that instant is still returned, never lost, and the listening socket is left
/// untouched (another process may be accepting on it after a binary upgrade).
pub async fn accept_until(
    listener: RawFd,
    stop: impl std::future::Future<Output = ()>,
) -> Accepted {
    let sqe = opcode::Accept::new(
        types::Fd(listener),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
    .flags(libc::SOCK_CLOEXEC)
    .build();
    let mut accepting = UnsubmittedOneshot::new((), AcceptDone, sqe).submit();
    let result = tokio::select! {
        done = &mut accepting => done,
        () = stop => {
            cancel_all_on(listener).await;
            match accepting.await {
                Ok(fd) => Ok(fd),
                Err(_) => return Accepted::Stopped,
            }
        }
    };
    match result {
        Ok(fd) => {
            let stream = crate::sys::stream_from_accepted(fd);
            match stream.peer_addr() {
                Ok(peer) => Accepted::Connection(TcpStream::from_std(stream), peer),
                // Reset before we looked: nothing to serve.
                Err(e) => Accepted::Failed(e),
            }
        }
        Err(e) => Accepted::Failed(e),
    }
}
