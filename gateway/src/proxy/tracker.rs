//! Per-worker registry of open client connections, so a drain can close the idle ones at once
//! and, past the drain timeout, shut down the rest. Touched only by its own worker thread.

use std::{
    cell::{Cell, RefCell},
    net::Shutdown,
    os::fd::RawFd,
    rc::Rc,
};

#[derive(Clone, Copy)]
struct Entry {
    fd: RawFd,
    idle: bool,
}

#[derive(Default)]
pub struct ConnTracker {
    slots: RefCell<Vec<Option<Entry>>>,
    free: RefCell<Vec<usize>>,
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
        let entry = Some(Entry { fd, idle: false });
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
            e.idle = idle;
        }
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
            if entry.is_some_and(|e| e.idle) {
                g.connections_idle.sub(1);
            }
        }
        self.tracker.free.borrow_mut().push(self.slot);
    }
}
