//! An in-memory [`Transport`] for tests of the request path without sockets: reads hand out
//! scripted chunks (then end of stream), writes append to a shared buffer the test inspects.

use std::{cell::RefCell, collections::VecDeque, io, net::Shutdown, ops::Range, rc::Rc};

use super::Transport;

/// A scripted peer.
#[derive(Default)]
pub struct MemoryTransport {
    input: RefCell<VecDeque<Vec<u8>>>,
    output: Rc<RefCell<Vec<u8>>>,
    shut_down: RefCell<Option<Shutdown>>,
}

impl MemoryTransport {
    /// A peer that sends `chunks`, one per read (a chunk larger than the read buffer's spare
    /// room is handed out over several reads), then ends the stream.
    pub fn sending<I, B>(chunks: I) -> MemoryTransport
    where
        I: IntoIterator<Item = B>,
        B: AsRef<[u8]>,
    {
        MemoryTransport {
            input: RefCell::new(chunks.into_iter().map(|c| c.as_ref().to_vec()).collect()),
            ..MemoryTransport::default()
        }
    }

    /// Everything written to this peer, shared so it can be read after the transport is gone.
    pub fn written(&self) -> Rc<RefCell<Vec<u8>>> {
        self.output.clone()
    }
}

impl Transport for MemoryTransport {
    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        if self.shut_down.borrow().is_some() {
            return (Ok(0), buf);
        }
        let mut input = self.input.borrow_mut();
        let Some(chunk) = input.front_mut() else {
            return (Ok(0), buf);
        };
        let n = chunk.len().min(buf.capacity() - buf.len());
        buf.extend_from_slice(&chunk[..n]);
        chunk.drain(..n);
        if chunk.is_empty() {
            input.pop_front();
        }
        (Ok(n), buf)
    }

    async fn write_all(&self, buf: Vec<u8>, range: Range<usize>) -> (io::Result<()>, Vec<u8>) {
        if matches!(
            *self.shut_down.borrow(),
            Some(Shutdown::Write | Shutdown::Both)
        ) {
            return (Err(io::ErrorKind::BrokenPipe.into()), buf);
        }
        self.output.borrow_mut().extend_from_slice(&buf[range]);
        (Ok(()), buf)
    }

    async fn write_all_pair(
        &self,
        head: Vec<u8>,
        head_range: Range<usize>,
        body: Vec<u8>,
        body_range: Range<usize>,
    ) -> (io::Result<()>, Vec<u8>, Vec<u8>) {
        let (res, head) = self.write_all(head, head_range).await;
        if res.is_err() {
            return (res, head, body);
        }
        let (res, body) = self.write_all(body, body_range).await;
        (res, head, body)
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        *self.shut_down.borrow_mut() = Some(how);
        Ok(())
    }
}
