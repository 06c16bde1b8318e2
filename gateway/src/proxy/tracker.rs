//! Per-worker registry of open client connections, so a drain can close the idle ones at once
//! and, past the drain timeout, shut down the rest; and so connections idle for a while are
//! asked to park. Touched only by its own worker thread.

use std::{
    cell::{Cell, RefCell},
    net::Shutdown,
    os::fd::RawFd,
    rc::Rc,
    task::{Context, Poll, Waker},
};

struct Entry {
    fd: RawFd,
    idle: bool,
    /// Waiting in the parking lot, outside any task.
    parked: bool,
    /// Asked to park (it has been idle for two park sweeps).
    park_requested: bool,
    /// The park sweep during which the connection last became idle.
    idle_since_sweep: u32,
    /// The task to wake when the connection is asked to park.
    waiting: Option<Waker>,
}

#[derive(Default)]
pub struct ConnTracker {
    slots: RefCell<Vec<Option<Entry>>>,
    free: RefCell<Vec<usize>>,
    /// Counts the park sweeps: a clock that costs the request path nothing to read.
    sweeps: Cell<u32>,
    /// Where the open and idle counts are published for the metrics, when they are on.
    gauges: Option<std::sync::Arc<crate::metrics::worker::WorkerCounters>>,
}

/// What a connection knows of the listener that accepted it.
#[derive(Default)]
pub struct ListenerFacts {
    /// Set when a reload removed the listener's address.
    pub removed: Rc<Cell<bool>>,
    /// Answer every request with a 308 to `https://` on this port.
    pub redirect_https: Option<u16>,
    /// `Strict-Transport-Security` for every answer (TLS listeners with `hsts`).
    pub hsts: Option<std::sync::Arc<str>>,
}

/// A registered connection; deregisters itself when dropped.
pub struct ConnHandle<'t> {
    tracker: &'t ConnTracker,
    slot: usize,
    listener: ListenerFacts,
    /// Handed over to a [`ParkedSlot`]: the registration outlives this handle.
    parked: bool,
}

/// The registration of a connection parked outside any task: still open (counted, and shut
/// down by a drain like any idle connection) until [`ConnTracker::resume`] takes it back.
pub struct ParkedSlot {
    slot: usize,
    listener: ListenerFacts,
}

impl ConnTracker {
    pub fn new(gauges: Option<std::sync::Arc<crate::metrics::worker::WorkerCounters>>) -> Self {
        ConnTracker {
            gauges,
            ..ConnTracker::default()
        }
    }

    /// Registers the connection on `fd`, accepted on the listener `listener` describes.
    pub fn register(&self, fd: RawFd, listener: ListenerFacts) -> ConnHandle<'_> {
        let entry = Some(Entry {
            fd,
            idle: false,
            parked: false,
            park_requested: false,
            idle_since_sweep: 0,
            waiting: None,
        });
        let mut slots = self.slots.borrow_mut();
        let slot = match self.free.borrow_mut().pop() {
            Some(i) => {
                slots[i] = entry;
                i
            }
            None => {
                slots.push(entry);
                slots.len() - 1
            }
        };
        if let Some(g) = &self.gauges {
            g.connections_open.inc();
        }
        ConnHandle {
            tracker: self,
            slot,
            listener,
            parked: false,
        }
    }

    /// The handle of a parked connection again (dropping it deregisters the connection).
    pub fn resume(&self, parked: ParkedSlot) -> ConnHandle<'_> {
        if let Some(g) = &self.gauges {
            g.connections_parked.sub(1);
        }
        if let Some(e) = self.slots.borrow_mut()[parked.slot].as_mut() {
            e.parked = false;
            e.park_requested = false;
        }
        ConnHandle {
            tracker: self,
            slot: parked.slot,
            listener: parked.listener,
            parked: false,
        }
    }

    pub fn active(&self) -> usize {
        self.slots.borrow().len() - self.free.borrow().len()
    }

    /// One park sweep: asks every connection idle in its task since before the previous
    /// sweep to park (wakes it), so a connection parks after one to two sweep intervals of
    /// quiet. Returns how many were asked.
    pub fn request_parks(&self) -> usize {
        let sweep = self.sweeps.get().wrapping_add(1);
        self.sweeps.set(sweep);
        let mut asked = 0;
        for e in self.slots.borrow_mut().iter_mut().flatten() {
            if e.idle
                && !e.parked
                && !e.park_requested
                && sweep.wrapping_sub(e.idle_since_sweep) >= 2
            {
                e.park_requested = true;
                if let Some(waker) = e.waiting.take() {
                    waker.wake();
                }
                asked += 1;
            }
        }
        asked
    }

    /// Shuts down connections: only the idle ones, or all of them.
    pub fn shutdown(&self, idle_only: bool) {
        for entry in self.slots.borrow().iter().flatten() {
            if entry.idle || !idle_only {
                let how = if idle_only {
                    Shutdown::Read
                } else {
                    Shutdown::Both
                };
                crate::sys::shutdown_fd(entry.fd, how);
            }
        }
    }
}

impl ConnHandle<'_> {
    /// True once the connection's listening address was removed by a reload: it winds down
    /// like a drain after an upgrade.
    pub fn listener_removed(&self) -> bool {
        self.listener.removed.get()
    }

    /// The listener this connection came through.
    pub fn listener(&self) -> &ListenerFacts {
        &self.listener
    }

    /// Keeps the connection registered (and idle) past this handle, for a connection that
    /// leaves its task to wait parked.
    pub fn park(mut self) -> ParkedSlot {
        self.set_idle(true);
        if let Some(e) = self.tracker.slots.borrow_mut()[self.slot].as_mut() {
            e.parked = true;
            e.waiting = None;
        }
        self.parked = true;
        if let Some(g) = &self.tracker.gauges {
            g.connections_parked.inc();
        }
        ParkedSlot {
            slot: self.slot,
            listener: std::mem::take(&mut self.listener),
        }
    }

    /// Marks the connection idle (waiting for a next request) or busy.
    pub fn set_idle(&self, idle: bool) {
        if let Some(e) = self.tracker.slots.borrow_mut()[self.slot].as_mut() {
            if e.idle != idle {
                if let Some(g) = &self.tracker.gauges {
                    if idle {
                        g.connections_idle.inc();
                    } else {
                        g.connections_idle.sub(1);
                    }
                }
            }
            if idle && !e.idle {
                e.idle_since_sweep = self.tracker.sweeps.get();
            }
            if !idle {
                e.park_requested = false;
            }
            e.idle = idle;
        }
    }

    /// Ready once a park sweep asked this idle connection to park; until then the task
    /// polling it is woken by the sweep that asks.
    pub fn poll_park_request(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut slots = self.tracker.slots.borrow_mut();
        let Some(e) = slots[self.slot].as_mut() else {
            return Poll::Pending;
        };
        if e.park_requested {
            return Poll::Ready(());
        }
        match &e.waiting {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => e.waiting = Some(cx.waker().clone()),
        }
        Poll::Pending
    }
}

impl Drop for ConnHandle<'_> {
    fn drop(&mut self) {
        if self.parked {
            return;
        }
        let entry = self.tracker.slots.borrow_mut()[self.slot].take();
        if let Some(g) = &self.tracker.gauges {
            g.connections_open.sub(1);
            if entry.as_ref().is_some_and(|e| e.idle) {
                g.connections_idle.sub(1);
            }
        }
        self.tracker.free.borrow_mut().push(self.slot);
    }
}

#[cfg(test)]
mod tests {
    use std::task::{Context, Poll, Waker};

    use super::*;

    #[test]
    fn an_idle_connection_is_asked_to_park_on_the_second_sweep_and_not_once_busy() {
        let tracker = ConnTracker::default();
        let idle = tracker.register(-1, ListenerFacts::default());
        let busy = tracker.register(-1, ListenerFacts::default());
        let mut cx = Context::from_waker(Waker::noop());
        idle.set_idle(true);
        assert_eq!(idle.poll_park_request(&mut cx), Poll::Pending);
        // Idle since this sweep's interval began: not yet.
        assert_eq!(tracker.request_parks(), 0);
        busy.set_idle(true);
        assert_eq!(tracker.request_parks(), 1);
        assert_eq!(idle.poll_park_request(&mut cx), Poll::Ready(()));
        // A request began on the other one: it is not asked, and its clock starts again.
        busy.set_idle(false);
        assert_eq!(tracker.request_parks(), 0);
        busy.set_idle(true);
        assert_eq!(tracker.request_parks(), 0);
        assert_eq!(busy.poll_park_request(&mut cx), Poll::Pending);
        // Parked, and back: asked again only after two more sweeps of quiet.
        let slot = idle.park();
        assert_eq!(tracker.active(), 2);
        let idle = tracker.resume(slot);
        assert_eq!(idle.poll_park_request(&mut cx), Poll::Pending);
        drop((idle, busy));
        assert_eq!(tracker.active(), 0);
    }
}
