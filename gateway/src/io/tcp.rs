//! [`Transport`] over a tokio-uring TCP stream: reads on the ring; writes straight to the
//! socket while the worker has few requests in flight, on the ring when it is busy.

use std::{
    cell::Cell,
    io::{self, IoSlice},
    net::Shutdown,
    ops::Range,
    os::fd::AsRawFd,
};

use tokio_uring::{buf::BoundedBuf, net::TcpStream};

use super::Transport;

/// Most requests in flight on a worker at which writes go straight to the socket. With few,
/// a write through the ring costs a trip around the event loop of its own (its completion,
/// a park) that nothing else shares; with many, the ring's batching of their writes into one
/// `io_uring_enter` is cheaper than a system call each (interleaved runs at maximum
/// throughput: direct sends for every write took half again the CPU per request).
const DIRECT_SEND_MAX_IN_FLIGHT: u32 = 2;

thread_local! {
    /// Requests this thread's worker is serving now: see [`RequestInFlight`].
    static IN_FLIGHT: Cell<u32> = const { Cell::new(0) };
}

/// Counts a request as in flight on this worker's thread while it lives.
pub struct RequestInFlight(());

impl RequestInFlight {
    #[allow(clippy::new_without_default)]
    pub fn new() -> RequestInFlight {
        IN_FLIGHT.with(|n| n.set(n.get() + 1));
        RequestInFlight(())
    }
}

impl Drop for RequestInFlight {
    fn drop(&mut self) {
        IN_FLIGHT.with(|n| n.set(n.get().saturating_sub(1)));
    }
}

/// Whether the worker is quiet enough for writes to skip the ring.
fn few_in_flight() -> bool {
    IN_FLIGHT.with(|n| n.get()) <= DIRECT_SEND_MAX_IN_FLIGHT
}

pub struct TcpTransport {
    stream: TcpStream,
}

impl TcpTransport {
    pub fn new(stream: TcpStream) -> Self {
        TcpTransport { stream }
    }

    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.stream.as_raw_fd()
    }

    /// On a quiet worker, sends what the socket takes at once with one system call: how many
    /// bytes went (0 when busy, or when the send buffer is full).
    fn send_now_if_quiet(&self, parts: &[IoSlice<'_>]) -> io::Result<usize> {
        if !few_in_flight() {
            return Ok(0);
        }
        match crate::sys::send_ready(self.stream.as_raw_fd(), parts) {
            Ok(n) => Ok(n),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    /// Writes what is left of a head and a body after a short write, in order, through the
    /// ring: the socket's buffer was full.
    async fn finish_pair(
        &self,
        head: Vec<u8>,
        head_rest: Range<usize>,
        body: Vec<u8>,
        body_rest: Range<usize>,
    ) -> (io::Result<()>, Vec<u8>, Vec<u8>) {
        let (res, head) = self.write_all_on_ring(head, head_rest).await;
        if res.is_err() {
            return (res, head, body);
        }
        let (res, body) = self.write_all_on_ring(body, body_rest).await;
        (res, head, body)
    }

    /// Writes all of `buf[range]` through the ring, waiting for room as long as it takes.
    async fn write_all_on_ring(
        &self,
        buf: Vec<u8>,
        range: Range<usize>,
    ) -> (io::Result<()>, Vec<u8>) {
        if range.is_empty() {
            return (Ok(()), buf);
        }
        let (res, slice) = self.stream.write_all(buf.slice(range)).await;
        (res, slice.into_inner())
    }
}

impl Transport for TcpTransport {
    async fn read(&self, buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        let start = buf.len();
        debug_assert!(start < buf.capacity(), "read needs spare capacity");
        let (res, slice) = self.stream.read(buf.slice(start..)).await;
        (res, slice.into_inner())
    }

    async fn write_all(&self, buf: Vec<u8>, range: Range<usize>) -> (io::Result<()>, Vec<u8>) {
        if range.is_empty() {
            return (Ok(()), buf);
        }
        let sent = match self.send_now_if_quiet(&[IoSlice::new(&buf[range.clone()])]) {
            Ok(n) if n == range.len() => return (Ok(()), buf),
            Ok(n) => n,
            Err(e) => return (Err(e), buf),
        };
        self.write_all_on_ring(buf, range.start + sent..range.end)
            .await
    }

    async fn write_all_pair(
        &self,
        head: Vec<u8>,
        head_range: Range<usize>,
        body: Vec<u8>,
        body_range: Range<usize>,
    ) -> (io::Result<()>, Vec<u8>, Vec<u8>) {
        if head_range.is_empty() {
            let (res, body) = self.write_all(body, body_range).await;
            return (res, head, body);
        }
        if body_range.is_empty() {
            let (res, head) = self.write_all(head, head_range).await;
            return (res, head, body);
        }
        let sent = self.send_now_if_quiet(&[
            IoSlice::new(&head[head_range.clone()]),
            IoSlice::new(&body[body_range.clone()]),
        ]);
        let (written, head, body) = match sent {
            Ok(n) if n == head_range.len() + body_range.len() => return (Ok(()), head, body),
            Ok(0) => {
                // Busy, or the socket's buffer is full: one vectored write on the ring.
                let (res, mut slices) = self
                    .stream
                    .writev(vec![
                        head.slice(head_range.clone()),
                        body.slice(body_range.clone()),
                    ])
                    .await;
                let body = slices.pop().expect("two slices").into_inner();
                let head = slices.pop().expect("two slices").into_inner();
                match res {
                    Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), head, body),
                    Ok(n) => (n, head, body),
                    Err(e) => return (Err(e), head, body),
                }
            }
            Ok(n) => (n, head, body),
            Err(e) => return (Err(e), head, body),
        };
        // A short write: finish what is left of each part in order.
        let head_written = written.min(head_range.len());
        self.finish_pair(
            head,
            head_range.start + head_written..head_range.end,
            body,
            body_range.start + (written - head_written)..body_range.end,
        )
        .await
    }

    fn unbuffered_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.stream.as_raw_fd())
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.stream.shutdown(how)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    /// A connected pair: ours on the ring, the peer's a blocking std socket.
    fn pair() -> (TcpTransport, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        peer.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .unwrap();
        (TcpTransport::new(TcpStream::from_std(ours)), peer)
    }

    /// Bytes that show where each one came from, so a part sent twice or skipped shows.
    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// Writes a head alone and a head with a body far larger than the socket buffers take at
    /// once (so a direct send is short and the ring writes the rest), and checks that the
    /// peer read exactly those bytes in order.
    fn writes_arrive_whole_and_in_order() {
        tokio_uring::start(async {
            let (ours, mut peer) = pair();
            let head = pattern(300, 1);
            let body = pattern(8 << 20, 2);
            let mut expected = head[10..].to_vec();
            expected.extend_from_slice(&head[..200]);
            expected.extend_from_slice(&body[5..]);
            let total = expected.len();
            let reader = std::thread::spawn(move || {
                let mut got = vec![0u8; total];
                peer.read_exact(&mut got).unwrap();
                got
            });
            let (res, head) = ours.write_all(head, 10..300).await;
            res.unwrap();
            let len = body.len();
            let (res, _, _) = ours.write_all_pair(head, 0..200, body, 5..len).await;
            res.unwrap();
            assert!(
                reader.join().unwrap() == expected,
                "bytes lost, repeated or reordered"
            );
        });
    }

    #[test]
    fn on_a_quiet_worker_direct_sends_and_the_ring_finish_each_write_in_order() {
        assert!(few_in_flight());
        writes_arrive_whole_and_in_order();
    }

    #[test]
    fn on_a_busy_worker_the_ring_writes_everything_in_order() {
        let busy: Vec<_> = (0..=DIRECT_SEND_MAX_IN_FLIGHT)
            .map(|_| RequestInFlight::new())
            .collect();
        assert!(!few_in_flight());
        writes_arrive_whole_and_in_order();
        drop(busy);
        assert!(few_in_flight(), "each request's count ends with it");
    }
}
