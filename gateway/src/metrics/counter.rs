//! A counter written by one thread (its worker) and read by another (the scrape).

use std::sync::atomic::{AtomicU64, Ordering};

/// Written by one thread only, so an increment is a plain load and store (no locked
/// instruction, no contention); any thread may read it.
#[derive(Debug, Default)]
pub struct LocalCounter(AtomicU64);

impl LocalCounter {
    #[inline]
    pub fn add(&self, n: u64) {
        // Single writer: no increment can be lost between the load and the store.
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }

    #[inline]
    pub fn inc(&self) {
        self.add(1);
    }

    /// For gauges the writer moves both ways.
    #[inline]
    pub fn sub(&self, n: u64) {
        self.0.store(
            self.0.load(Ordering::Relaxed).wrapping_sub(n),
            Ordering::Relaxed,
        );
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}
