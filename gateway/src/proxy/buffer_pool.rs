//! A worker's pool of connection buffers: a connection takes its read, head and upstream
//! buffers when a request begins and gives them back when it goes idle, so an idle keep-alive
//! connection holds only its small idle-read buffer, and busy connections reuse memory that is
//! already paged in instead of touching new pages.
//!
//! Owned by one worker thread (no lock); bounded, so a burst of connections does not pin its
//! peak memory for ever.

use std::cell::RefCell;

/// Buffers of one kind, all of at least `capacity` bytes.
pub struct BufferPool {
    free: RefCell<Vec<Vec<u8>>>,
    capacity: usize,
    keep: usize,
}

impl BufferPool {
    /// A pool of buffers of `capacity` bytes that keeps at most `keep` free ones.
    pub fn new(capacity: usize, keep: usize) -> BufferPool {
        BufferPool {
            free: RefCell::new(Vec::new()),
            capacity,
            keep,
        }
    }

    /// An empty buffer with room for at least `min_capacity` bytes (and at least the pool's
    /// size): a pooled one when there is one large enough.
    pub fn take(&self, min_capacity: usize) -> Vec<u8> {
        let wanted = min_capacity.max(self.capacity);
        let mut free = self.free.borrow_mut();
        while let Some(buf) = free.pop() {
            if buf.capacity() >= wanted {
                return buf;
            }
            // Smaller than a reload now asks for: let it go.
        }
        Vec::with_capacity(wanted)
    }

    /// Gives `buf` back for another connection. A buffer grown far past the pool's size (a
    /// large head or cached answer) is freed instead, so the pool stays `keep × capacity`-ish.
    pub fn give(&self, mut buf: Vec<u8>) {
        if buf.capacity() < self.capacity || buf.capacity() > self.capacity.saturating_mul(4) {
            return;
        }
        let mut free = self.free.borrow_mut();
        if free.len() < self.keep {
            buf.clear();
            free.push(buf);
        }
    }

    /// How many free buffers the pool holds.
    #[cfg(test)]
    pub fn free_len(&self) -> usize {
        self.free.borrow().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_given_buffer_is_taken_again_empty() {
        let pool = BufferPool::new(1024, 2);
        let mut buf = pool.take(0);
        assert!(buf.capacity() >= 1024);
        buf.extend_from_slice(b"left over");
        let ptr = buf.as_ptr();
        pool.give(buf);
        let again = pool.take(100);
        assert_eq!(again.as_ptr(), ptr, "the pooled buffer is reused");
        assert!(again.is_empty());
    }

    #[test]
    fn the_pool_is_bounded_and_refuses_odd_sizes() {
        let pool = BufferPool::new(1024, 2);
        for _ in 0..5 {
            pool.give(Vec::with_capacity(1024));
        }
        assert_eq!(pool.free_len(), 2);
        let pool = BufferPool::new(1024, 8);
        pool.give(Vec::new());
        pool.give(Vec::with_capacity(64 * 1024));
        assert_eq!(pool.free_len(), 0);
    }

    #[test]
    fn a_larger_request_skips_smaller_buffers() {
        let pool = BufferPool::new(1024, 4);
        pool.give(Vec::with_capacity(1024));
        let big = pool.take(4096);
        assert!(big.capacity() >= 4096);
        assert_eq!(pool.free_len(), 0, "the too-small buffer was let go");
    }
}
