//! Keep-alive connections parked outside any task: a plain TCP connection quiet for
//! [`PARK_AFTER`] (asked by the worker's park sweep, every [`PARK_SWEEP_INTERVAL`]) leaves its
//! task and waits here as a small record, registered with the worker's epoll instance, until
//! its next request arrives or its deadline passes.
//!
//! A task is sized for the largest state of the connection's future (hundreds of bytes, plus
//! the task's own header), and every connection waiting inside one holds all of it. Parked,
//! an idle connection holds one [`Record`] (about a hundred bytes) and a registration in
//! the kernel. Busy connections never park: a request arriving within [`PARK_AFTER`] is read
//! by the waiting task itself, so the request path makes no extra system call (and arms no
//! timer: the sweep is one per worker).

use std::{
    cell::{Cell, RefCell},
    future::poll_fn,
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, OwnedFd, RawFd},
    task::{Poll, Waker},
    time::Duration,
};

use slab::Slab;
use tokio::time::Instant;
use tracing::debug;

use super::tracker::{ConnHandle, ConnTracker, ParkedSlot};
use crate::io::TcpTransport;

/// How long, at most, a keep-alive connection waits for its next request inside its task
/// before it parks (at least half of it). Short, so that many connections going quiet at
/// once do not all hold a task; long against the gaps between the requests of a busy
/// connection, so those never park.
pub const PARK_AFTER: Duration = Duration::from_millis(100);
/// How often the worker asks the connections idle since before its previous sweep to park:
/// two sweeps of quiet, so between half of [`PARK_AFTER`] and all of it.
pub const PARK_SWEEP_INTERVAL: Duration = Duration::from_nanos(PARK_AFTER.as_nanos() as u64 / 2);

/// Deadlines of parked connections are checked this often at most (and at least every
/// eighth of the shorter of the header and keep-alive timeouts)...
const MAX_SWEEP_INTERVAL: Duration = Duration::from_millis(500);
/// ...but not more often than this.
const MIN_SWEEP_INTERVAL: Duration = Duration::from_millis(10);

/// A connection leaving its task to wait for its next request.
pub struct Parked<C> {
    pub client: C,
    pub peer: SocketAddr,
    /// When the connection was accepted (its requests' contexts report it).
    pub accepted: Instant,
    /// When it closes if no request has begun.
    pub deadline: Instant,
}

/// A parked connection: what its task needs to carry on, and its registration.
struct Record {
    conn: Parked<TcpTransport>,
    slot: ParkedSlot,
    /// Tells this record's readiness reports from those of an earlier record in the same
    /// place of the slab.
    stamp: u32,
}

/// One worker's parked connections. Touched only by its own thread.
#[derive(Default)]
pub struct ParkingLot {
    /// Created by [`ParkingLot::open`]; until then nothing parks.
    epoll: std::cell::OnceCell<OwnedFd>,
    records: RefCell<Slab<Record>>,
    next_stamp: Cell<u32>,
    /// The task waiting for a first connection to park.
    waiting: Cell<Option<Waker>>,
}

impl ParkingLot {
    /// Lets connections park, with the epoll instance they register with (returned: the
    /// task that resumes them waits for it to be readable).
    pub fn open(&self) -> io::Result<RawFd> {
        if let Some(epoll) = self.epoll.get() {
            return Ok(epoll.as_raw_fd());
        }
        let epoll = crate::sys::epoll_create()?;
        let fd = epoll.as_raw_fd();
        let _ = self.epoll.set(epoll);
        Ok(fd)
    }

    /// True once connections may park.
    pub fn is_open(&self) -> bool {
        self.epoll.get().is_some()
    }

    /// How many connections are parked.
    pub fn len(&self) -> usize {
        self.records.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Parks `conn`; its registration stays with the tracker. A connection that cannot be
    /// registered for readiness is closed (the client sees the connection end, as at its
    /// keep-alive timeout).
    pub fn park(&self, conn: Parked<TcpTransport>, handle: ConnHandle<'_>) {
        let Some(epoll) = self.epoll.get() else {
            return;
        };
        let stamp = self.next_stamp.get().wrapping_add(1);
        self.next_stamp.set(stamp);
        let fd = conn.client.raw_fd();
        let mut records = self.records.borrow_mut();
        let entry = records.vacant_entry();
        let token = (u64::from(stamp) << 32) | entry.key() as u64;
        if let Err(e) = crate::sys::epoll_watch_once(epoll.as_raw_fd(), fd, token) {
            debug!(peer = %conn.peer, error = %e, "idle connection could not park: closing");
            return;
        }
        entry.insert(Record {
            conn,
            slot: handle.park(),
            stamp,
        });
        drop(records);
        if let Some(waker) = self.waiting.take() {
            waker.wake();
        }
    }

    /// Waits until at least one connection is parked.
    pub async fn wait_for_parked(&self) {
        poll_fn(|cx| {
            if self.is_empty() {
                self.waiting.set(Some(cx.waker().clone()));
                Poll::Pending
            } else {
                Poll::Ready(())
            }
        })
        .await
    }

    /// Takes out every parked connection the kernel reports readable now (tokens are read
    /// into `tokens`, whose capacity bounds one batch) and hands each to `resume`.
    pub fn take_ready(
        &self,
        tokens: &mut Vec<u64>,
        mut resume: impl FnMut(Parked<TcpTransport>, ParkedSlot),
    ) -> io::Result<()> {
        let Some(epoll) = self.epoll.get() else {
            return Ok(());
        };
        crate::sys::epoll_ready(epoll.as_raw_fd(), tokens)?;
        for &token in tokens.iter() {
            let key = (token & u64::from(u32::MAX)) as usize;
            let stamp = (token >> 32) as u32;
            let record = {
                let mut records = self.records.borrow_mut();
                match records.get(key) {
                    Some(r) if r.stamp == stamp => records.remove(key),
                    // A report for a record that already left (closed at its deadline).
                    _ => continue,
                }
            };
            resume(record.conn, record.slot);
        }
        Ok(())
    }

    /// Closes the parked connections whose deadline passed by `now`, deregistering them.
    pub fn close_expired(&self, now: Instant, tracker: &ConnTracker) {
        let expired: Vec<usize> = self
            .records
            .borrow()
            .iter()
            .filter(|(_, r)| r.conn.deadline <= now)
            .map(|(key, _)| key)
            .collect();
        for key in expired {
            let record = self.records.borrow_mut().remove(key);
            debug!(peer = %record.conn.peer, "parked connection reached its deadline: closing");
            drop(record.conn);
            drop(tracker.resume(record.slot));
        }
    }

    /// How long the task resuming parked connections may wait before it checks their
    /// deadlines again.
    pub fn sweep_interval(header_timeout: Duration, keepalive_timeout: Duration) -> Duration {
        (header_timeout.min(keepalive_timeout) / 8).clamp(MIN_SWEEP_INTERVAL, MAX_SWEEP_INTERVAL)
    }
}
