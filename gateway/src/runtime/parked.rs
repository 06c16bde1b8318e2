//! The worker tasks around parked keep-alive connections: the park sweep, which asks
//! connections quiet for a while to park, and the one that brings them back (each its epoll
//! instance reports readable gets a task again to serve its next request) or closes those
//! past their deadline.

use std::rc::Rc;

use tokio::time::Instant;
use tracing::warn;

use crate::{
    io::{readable_before, IoFailure, TcpTransport},
    proxy::{
        connection::{serve, Start},
        parking::{Parked, ParkingLot, PARK_SWEEP_INTERVAL},
        tracker::ParkedSlot,
        worker::Worker,
    },
};

/// Readiness reports taken in one batch.
const READY_BATCH: usize = 64;

/// Serves `worker`'s parked connections for as long as the worker runs. Without an epoll
/// instance (the kernel refused one) connections never park, and this returns.
pub async fn resume_parked(worker: Rc<Worker>) {
    let lot = &worker.parking;
    let epoll = match lot.open() {
        Ok(fd) => fd,
        Err(e) => {
            warn!(worker = worker.id, error = %e, "no epoll instance: idle connections wait in their tasks");
            return;
        }
    };
    tokio_uring::spawn(sweep_parks(worker.clone()));
    let mut tokens = Vec::with_capacity(READY_BATCH);
    let mut next_sweep = Instant::now();
    loop {
        lot.wait_for_parked().await;
        let now = Instant::now();
        if now >= next_sweep {
            lot.close_expired(now, &worker.tracker);
            let generation = worker.generation();
            let server = generation.snapshot.server();
            next_sweep = now
                + ParkingLot::sweep_interval(
                    server.header_timeout.get(),
                    server.keepalive_timeout.get(),
                );
        }
        if lot.is_empty() {
            continue;
        }
        match readable_before(epoll, next_sweep).await {
            Ok(()) | Err(IoFailure::TimedOut) => {}
            Err(e) => {
                warn!(worker = worker.id, error = %e, "waiting for parked connections failed");
                tokio::time::sleep_until(next_sweep).await;
            }
        }
        let resumed = lot.take_ready(&mut tokens, |conn, slot| {
            spawn_resumed(&worker, conn, slot);
        });
        if let Err(e) = resumed {
            warn!(worker = worker.id, error = %e, "reading parked connections' readiness failed");
        }
    }
}

/// Asks the connections quiet since before the previous sweep to park, every
/// [`PARK_SWEEP_INTERVAL`], for as long as the worker runs.
async fn sweep_parks(worker: Rc<Worker>) {
    let mut next = Instant::now();
    loop {
        next += PARK_SWEEP_INTERVAL;
        tokio::time::sleep_until(next).await;
        worker.tracker.request_parks();
        // Behind (a long stall): carry on from now rather than sweep in a burst.
        next = next.max(Instant::now());
    }
}

/// Gives a parked connection reported readable a task again, which parks it anew when it
/// goes quiet.
fn spawn_resumed(worker: &Rc<Worker>, conn: Parked<TcpTransport>, slot: ParkedSlot) {
    let worker = worker.clone();
    tokio_uring::spawn(async move {
        let handle = worker.tracker.resume(slot);
        let Parked {
            client,
            peer,
            accepted,
            deadline,
        } = conn;
        let start = Start::Resumed { accepted, deadline };
        if let Some(parked) = serve(client, peer, &worker, &handle, start, None).await {
            worker.parking.park(parked, handle);
        }
    });
}
