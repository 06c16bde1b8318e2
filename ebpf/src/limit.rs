//! GCRA (the generic cell rate algorithm): a token bucket held as one timestamp, the theoretical
//! arrival time (TAT) of the next packet, so an update is a single compare-and-swap.
//!
//! Several CPUs may see the same source at once. Each update reads the TAT, decides, and swaps
//! the new TAT in only if nobody changed it meanwhile (BPF_CMPXCHG, which needs the v3 BPF
//! instruction set: the xtask builds with `-C target-cpu=v3`). So concurrent CPUs can neither
//! lose an update nor admit the same slot twice: admission is exact. After
//! [`CAS_ATTEMPTS`](portcullis_common::CAS_ATTEMPTS) lost races the packet passes and is counted
//! as contended: the only error, always in the permissive direction, and visible.

use portcullis_common::CAS_ATTEMPTS;

use crate::atomic;

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Gcra {
    Allow,
    Deny,
    Contended,
}

/// Admits one packet at `now` against emission `interval` and burst `tolerance` (both in ns).
/// An interval of 0 means no limit.
#[inline(always)]
pub fn gcra(tat: *mut u64, now: u64, interval: u64, tolerance: u64) -> Gcra {
    if interval == 0 {
        return Gcra::Allow;
    }
    for _ in 0..CAS_ATTEMPTS {
        let old = atomic::load(tat);
        let base = if old > now { old } else { now };
        if base - now > tolerance {
            return Gcra::Deny;
        }
        if atomic::compare_and_swap(tat, old, base + interval) {
            return Gcra::Allow;
        }
    }
    Gcra::Contended
}
