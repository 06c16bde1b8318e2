//! Atomic operations on map values. `core::sync::atomic` offers no read-modify-write operations
//! on the BPF target (its spec declares no CAS), so these call the compiler intrinsics, which
//! LLVM lowers to BPF atomic instructions (`-C target-cpu=v3`: BPF_CMPXCHG, BPF_XCHG, fetch-add).
//!
//! Every function takes a pointer into a map value obtained from a lookup in the same program
//! run; such a pointer is valid, aligned (map values are 8-byte aligned and every field used here
//! is a u64) and may be written concurrently by other CPUs, which is what atomics are for.

use core::intrinsics::{self, AtomicOrdering::Relaxed};

/// Reads `*p`. A volatile read, not an atomic one: LLVM's BPF backend cannot select atomic
/// loads before v4, and an aligned 8-byte load is not torn on any architecture BPF runs on. The
/// value is only ever a guess that `compare_and_swap` confirms.
#[inline(always)]
pub fn load(p: *mut u64) -> u64 {
    // SAFETY: see the module documentation.
    unsafe { core::ptr::read_volatile(p) }
}

/// Adds `v` to `*p`.
#[inline(always)]
pub fn add(p: *mut u64, v: u64) {
    // SAFETY: see the module documentation.
    unsafe {
        intrinsics::atomic_xadd::<u64, u64, { Relaxed }>(p, v);
    }
}

/// Stores `v` in `*p`, returning the previous value.
#[inline(always)]
pub fn swap(p: *mut u64, v: u64) -> u64 {
    // SAFETY: see the module documentation.
    unsafe { intrinsics::atomic_xchg::<u64, { Relaxed }>(p, v) }
}

/// Replaces `*p` by `new` if it still holds `old`; true when it did.
#[inline(always)]
pub fn compare_and_swap(p: *mut u64, old: u64, new: u64) -> bool {
    // SAFETY: see the module documentation.
    unsafe { intrinsics::atomic_cxchg::<u64, { Relaxed }, { Relaxed }>(p, old, new).1 }
}
