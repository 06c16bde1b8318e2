//! Deadline timers reused from one I/O operation to the next on a worker thread.
//!
//! Every read and write races its operation against a deadline. A fresh
//! `tokio::time::sleep_until` per operation looks up the runtime, registers a timer in the
//! time driver's wheel under the driver's lock on its first poll, and removes it again under
//! the lock when dropped: at full load that was 2% of all CPU samples. A timer
//! given back here stays registered, and setting it to a later deadline, as the next
//! operation's usually is, only updates its expiry (tokio catches up when the old one comes);
//! an earlier deadline re-registers it, as a fresh timer would.
//!
//! Only a timer that has not fired is kept or reused: one that fired (at its
//! deadline, or when an earlier runtime on this thread shut down and fired all of its own)
//! would cost a re-registration anyway, and one of a runtime that is gone would panic when
//! polled. A worker thread runs one runtime for its life, so a timer that has not fired
//! belongs to it. A spare keeps the waker of the task that last polled it until it is taken
//! again or fires; a wake-up from it is spurious, which futures allow. At most
//! [`SPARE_TIMERS_PER_THREAD`] are kept, so what they keep alive is bounded per worker and does
//! not grow with connections.

use std::{
    cell::RefCell,
    future::Future,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::time::{Instant, Sleep};

/// Spare timers a thread keeps; beyond this a finished timer is dropped (deregistered).
pub const SPARE_TIMERS_PER_THREAD: usize = 256;

thread_local! {
    static SPARE_TIMERS: RefCell<Vec<Pin<Box<Sleep>>>> = const { RefCell::new(Vec::new()) };
}

/// A timer that completes at its deadline and goes back to its thread's spares when dropped.
/// Its timer is registered from the start (a fresh tokio `Sleep` registers on first poll), so
/// whether it has fired says whether it may be kept.
#[derive(Debug)]
pub struct ReusedSleep(Option<Pin<Box<Sleep>>>);

/// A timer completing at `deadline`: a spare one reset to it, or a new one.
pub fn sleep_until(deadline: Instant) -> ReusedSleep {
    let spare = SPARE_TIMERS
        .try_with(|spares| {
            let mut spares = spares.try_borrow_mut().ok()?;
            // Fired spares are dropped here (see the module's comment).
            std::iter::from_fn(|| spares.pop()).find(|timer| !timer.is_elapsed())
        })
        .ok()
        .flatten();
    let mut timer = spare.unwrap_or_else(|| Box::pin(tokio::time::sleep_until(deadline)));
    // Registers a new timer with the current runtime's driver; moves a spare's deadline.
    timer.as_mut().reset(deadline);
    ReusedSleep(Some(timer))
}

impl Future for ReusedSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.0 {
            Some(timer) => timer.as_mut().poll(cx),
            // Only `drop` takes the timer.
            None => Poll::Pending,
        }
    }
}

impl Drop for ReusedSleep {
    fn drop(&mut self) {
        let Some(timer) = self.0.take() else {
            return;
        };
        if timer.is_elapsed() {
            return;
        }
        // During thread teardown the spares may be gone: the timer is then just dropped.
        let _ = SPARE_TIMERS.try_with(|spares| {
            if let Ok(mut spares) = spares.try_borrow_mut() {
                if spares.len() < SPARE_TIMERS_PER_THREAD {
                    spares.push(timer);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn spares() -> usize {
        SPARE_TIMERS.with(|s| s.borrow().len())
    }

    /// Waits for `timer`, failing the test rather than hanging if it keeps a later deadline.
    async fn fires(timer: ReusedSleep) {
        let fired = tokio::time::timeout(Duration::from_secs(5), timer).await;
        assert!(fired.is_ok(), "the timer kept an older, later deadline");
    }

    #[test]
    fn a_reused_timer_fires_at_its_new_deadline_earlier_or_later() {
        tokio_uring::start(async {
            let before = spares();
            // Set far out, given back, then taken for a short deadline: it must not
            // wait for the old one.
            drop(sleep_until(Instant::now() + Duration::from_secs(3600)));
            assert_eq!(spares(), before + 1);
            let started = Instant::now();
            fires(sleep_until(started + Duration::from_millis(20))).await;
            assert!(started.elapsed() >= Duration::from_millis(20));
            assert_eq!(spares(), before, "a fired timer is not kept");
            // One that lost its race is kept and, set later, does not complete early.
            let lost = tokio::select! {
                biased;
                () = sleep_until(Instant::now() + Duration::from_millis(200)) => false,
                () = tokio::time::sleep(Duration::from_millis(10)) => true,
            };
            assert!(lost);
            assert_eq!(spares(), before + 1);
            let started = Instant::now();
            fires(sleep_until(started + Duration::from_millis(400))).await;
            assert!(started.elapsed() >= Duration::from_millis(400));
        });
    }

    #[test]
    fn a_spare_of_a_runtime_that_has_shut_down_is_not_used() {
        tokio_uring::start(async {
            drop(sleep_until(Instant::now() + Duration::from_secs(3600)));
        });
        assert_eq!(spares(), 1);
        tokio_uring::start(async {
            let started = Instant::now();
            fires(sleep_until(started + Duration::from_millis(20))).await;
        });
    }

    #[test]
    fn a_thread_keeps_at_most_its_bound_of_spares() {
        tokio_uring::start(async {
            let timers: Vec<_> = (0..SPARE_TIMERS_PER_THREAD + 10)
                .map(|_| sleep_until(Instant::now() + Duration::from_secs(60)))
                .collect();
            drop(timers);
            assert_eq!(spares(), SPARE_TIMERS_PER_THREAD);
        });
    }
}
