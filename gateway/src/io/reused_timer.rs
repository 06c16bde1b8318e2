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
//! Only a registered timer that has not fired is kept or reused: one that fired (at its
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
#[derive(Debug)]
pub struct ReusedSleep {
    timer: Option<Pin<Box<Sleep>>>,
    /// Registered with the time driver: polled, or reset from a spare. A timer never polled
    /// is not kept, since it may belong to no running runtime.
    registered: bool,
}

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
    match spare {
        Some(mut timer) => {
            timer.as_mut().reset(deadline);
            ReusedSleep {
                timer: Some(timer),
                registered: true,
            }
        }
        None => ReusedSleep {
            timer: Some(Box::pin(tokio::time::sleep_until(deadline))),
            registered: false,
        },
    }
}

impl Future for ReusedSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.registered = true;
        match &mut self.timer {
            Some(timer) => timer.as_mut().poll(cx),
            // Only `drop` takes the timer.
            None => Poll::Pending,
        }
    }
}

impl Drop for ReusedSleep {
    fn drop(&mut self) {
        let Some(timer) = self.timer.take() else {
            return;
        };
        if !self.registered || timer.is_elapsed() {
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
    use std::{task::Waker, time::Duration};

    use super::*;

    fn spares() -> usize {
        SPARE_TIMERS.with(|s| s.borrow().len())
    }

    /// Polls `timer` once, as a `select!` that another branch wins does.
    fn poll_once(timer: ReusedSleep) -> ReusedSleep {
        let mut timer = timer;
        let _ = Pin::new(&mut timer).poll(&mut Context::from_waker(Waker::noop()));
        timer
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
            // Set far out, polled, given back, then taken for a short deadline: it must not
            // wait for the old one.
            drop(poll_once(sleep_until(
                Instant::now() + Duration::from_secs(3600),
            )));
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
            drop(poll_once(sleep_until(
                Instant::now() + Duration::from_secs(3600),
            )));
        });
        assert_eq!(spares(), 1);
        tokio_uring::start(async {
            let started = Instant::now();
            fires(sleep_until(started + Duration::from_millis(20))).await;
        });
    }

    #[test]
    fn a_thread_keeps_at_most_its_bound_of_spares_and_never_an_unpolled_one() {
        tokio_uring::start(async {
            drop(sleep_until(Instant::now() + Duration::from_secs(60)));
            assert_eq!(spares(), 0);
            let timers: Vec<_> = (0..SPARE_TIMERS_PER_THREAD + 10)
                .map(|_| poll_once(sleep_until(Instant::now() + Duration::from_secs(60))))
                .collect();
            drop(timers);
            assert_eq!(spares(), SPARE_TIMERS_PER_THREAD);
        });
    }
}
