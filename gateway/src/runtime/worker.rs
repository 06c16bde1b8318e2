//! Worker threads: one per core, pinned, each with its own tokio-uring runtime, its own
//! SO_REUSEPORT listeners and its own upstream pools. Nothing on the request path is shared
//! between workers except the read-only config snapshot, which each worker takes anew at a
//! request boundary once a reload has published one.

use std::{
    net::TcpListener as StdListener, os::fd::AsRawFd, rc::Rc, sync::Arc, thread::JoinHandle,
    time::Duration,
};

use tokio::time::Instant;
use tokio_uring::net::TcpStream;
use tracing::{debug, info, warn};

use super::shutdown::{DrainFlag, DrainMode};
use crate::{
    http::encode,
    io::{accept_until, Accepted, TcpTransport, Transport},
    proxy::{connection::serve, snapshot::Published, worker::Worker},
    xdp::BanReporter,
};

/// Submission queue entries per worker ring.
const RING_ENTRIES: u32 = 4096;
/// Pause after a failed accept (such as EMFILE) so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(20);
/// How often a draining worker checks whether its connections have finished.
const DRAIN_POLL: Duration = Duration::from_millis(10);
/// After the drain timeout, how long connections get to finish once shut down.
const FORCED_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Starts the worker threads; each gets the listeners at its index.
pub fn spawn_workers(
    published: Arc<Published>,
    listeners: Vec<Vec<StdListener>>,
    drain: DrainFlag,
    bans: Option<BanReporter>,
) -> std::io::Result<Vec<JoinHandle<()>>> {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let (started_tx, started_rx) = std::sync::mpsc::channel::<usize>();
    let mut handles = Vec::new();
    for (id, listeners) in listeners.into_iter().enumerate() {
        let published = published.clone();
        let drain = drain.clone();
        let core = if cores.is_empty() {
            None
        } else {
            Some(cores[id % cores.len()])
        };
        let handle = std::thread::Builder::new()
            .name(format!("portcullis-w{id}"))
            .spawn({
                let started = started_tx.clone();
                let bans = bans.clone();
                move || run_worker(id, core, published, listeners, drain, started, bans)
            })?;
        handles.push(handle);
    }
    drop(started_tx);
    // Return once every worker is pinned and running its ring, so "listening" means ready.
    for _ in 0..handles.len() {
        if started_rx.recv().is_err() {
            return Err(std::io::Error::other("a worker thread failed to start"));
        }
    }
    Ok(handles)
}

fn run_worker(
    id: usize,
    core: Option<core_affinity::CoreId>,
    published: Arc<Published>,
    listeners: Vec<StdListener>,
    drain: DrainFlag,
    started: std::sync::mpsc::Sender<usize>,
    bans: Option<BanReporter>,
) {
    if let Some(core) = core {
        if !core_affinity::set_for_current(core) {
            warn!(
                worker = id,
                core = core.id,
                "could not pin worker to its core"
            );
        }
    }
    tokio_uring::builder()
        .entries(RING_ENTRIES)
        .start(async move {
            let worker = Rc::new(Worker::new(id, published, bans));
            debug!(worker = id, core = ?core.map(|c| c.id), "worker started");
            let _ = started.send(id);
            let accept_loops: Vec<_> = listeners
                .into_iter()
                .map(|l| tokio_uring::spawn(accept_loop(worker.clone(), l, drain.clone())))
                .collect();
            for task in accept_loops {
                let _ = task.await;
            }
            drain_worker(&worker, drain.mode() == Some(DrainMode::Upgrade)).await;
            debug!(worker = id, "worker stopped");
        });
}

async fn accept_loop(worker: Rc<Worker>, listener: StdListener, drain: DrainFlag) {
    // Not reloadable (see runtime::live): read once.
    let max_connections = worker
        .generation()
        .snapshot
        .server()
        .max_connections_per_worker;
    let fd = listener.as_raw_fd();
    loop {
        // A drain cancels the pending accept (keeping a connection it took in that instant),
        // and leaves the listening socket itself alone: after an upgrade the new process
        // accepts on it.
        let (stream, peer) = match accept_until(fd, drain.started()).await {
            Accepted::Connection(stream, peer) => (stream, peer),
            Accepted::Stopped => return,
            Accepted::Failed(_) if drain.is_set() => return,
            Accepted::Failed(e) => {
                crate::throttled_warn!(
                    crate::log_throttle::Noisy::Accept,
                    worker = worker.id,
                    error = %e,
                    "accept failed"
                );
                tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        if worker.tracker.active() >= max_connections {
            debug!(worker = worker.id, %peer, "connection limit reached: refusing");
            tokio_uring::spawn(refuse(stream));
            continue;
        }
        let worker = worker.clone();
        tokio_uring::spawn(async move {
            let transport = TcpTransport::new(stream);
            let handle = worker.tracker.register(transport.raw_fd());
            serve(transport, peer, &worker, &handle).await;
        });
        // A connection accepted as the drain began is served; no further accept is made.
        if drain.is_set() {
            return;
        }
    }
}

/// Answers 503 to a connection over `max_connections_per_worker`, then closes it.
async fn refuse(stream: TcpStream) {
    let transport = TcpTransport::new(stream);
    let mut out = Vec::with_capacity(160);
    encode::write_error(&mut out, 503, "connection limit reached", false, false);
    let len = out.len();
    let _ = tokio::time::timeout(Duration::from_secs(1), transport.write_all(out, 0..len)).await;
    let _ = transport.shutdown(std::net::Shutdown::Both);
}

/// Lets in-flight requests finish within the drain timeout, then closes what is left. Stopping
/// closes idle connections at once; after an upgrade they are left to make one more request,
/// answered with `Connection: close`, until the drain ends.
async fn drain_worker(worker: &Worker, upgrade: bool) {
    worker.draining.set(true);
    worker.closes_idle.set(!upgrade);
    let generation = worker.generation();
    for group in &generation.upstreams {
        group.clear_idle();
    }
    if !upgrade {
        worker.tracker.shutdown(true);
    }
    let deadline = Instant::now() + generation.snapshot.server().drain_timeout.get();
    while worker.tracker.active() > 0 && Instant::now() < deadline {
        tokio::time::sleep(DRAIN_POLL).await;
    }
    if worker.tracker.active() > 0 {
        info!(
            worker = worker.id,
            connections = worker.tracker.active(),
            "drain timeout: closing remaining connections"
        );
        worker.tracker.shutdown(false);
        let deadline = Instant::now() + FORCED_CLOSE_GRACE;
        while worker.tracker.active() > 0 && Instant::now() < deadline {
            tokio::time::sleep(DRAIN_POLL).await;
        }
    }
}
