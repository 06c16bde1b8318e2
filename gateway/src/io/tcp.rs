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

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.stream.shutdown(how)
    }
}
