//! [`Transport`] over a tokio-uring TCP stream.

use std::{io, net::Shutdown, ops::Range, os::fd::AsRawFd};

use tokio_uring::{buf::BoundedBuf, net::TcpStream};

use super::Transport;

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
        let (res, slice) = self.stream.write_all(buf.slice(range)).await;
        (res, slice.into_inner())
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
        let (res, mut slices) = self
            .stream
            .writev(vec![
                head.slice(head_range.clone()),
                body.slice(body_range.clone()),
            ])
            .await;
        let body = slices.pop().expect("two slices").into_inner();
        let head = slices.pop().expect("two slices").into_inner();
        let written = match res {
            Ok(0) => return (Err(io::ErrorKind::WriteZero.into()), head, body),
            Ok(n) => n,
            Err(e) => return (Err(e), head, body),
        };
        // A short write: finish what is left of each part in order.
        let head_written = written.min(head_range.len());
        let (res, head) = self
            .write_all(head, head_range.start + head_written..head_range.end)
            .await;
        if res.is_err() {
            return (res, head, body);
        }
        let body_written = written - head_written;
        let (res, body) = self
            .write_all(body, body_range.start + body_written..body_range.end)
            .await;
        (res, head, body)
    }

    fn unbuffered_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.stream.as_raw_fd())
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.stream.shutdown(how)
    }
}
