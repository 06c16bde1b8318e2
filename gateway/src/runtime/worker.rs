//! Worker threads: one per core, pinned, each with its own tokio-uring runtime, its own
//! SO_REUSEPORT listeners and its own upstream pools. Nothing on the request path is shared
//! between workers except the read-only config snapshot, which each worker takes anew at a
//! request boundary once a reload has published one.

use std::{
    cell::Cell,
    net::{SocketAddr, TcpListener as StdListener},
    os::fd::AsRawFd,
    rc::Rc,
    sync::Arc,
    thread::JoinHandle,
    time::Duration,
};

use tokio::time::Instant;
use tokio_uring::net::TcpStream;
use tracing::{debug, info, warn};

use super::{
    listener::{ListenerChange, WorkerListeners},
    shutdown::{DrainFlag, DrainMode},
};
use crate::{
    access_log::AccessLog,
    config::ListenMode,
    http::encode,
    io::{accept_until, Accepted, TcpTransport, TlsTransport, Transport},
    metrics::Metrics,
    proxy::{
        connection::{serve, Start},
        snapshot::Published,
        worker::Worker,
    },
    xdp::BanReporter,
};

/// How often a worker hands its latency histograms to the collector.
const LATENCY_HAND_OVER: Duration = Duration::from_secs(1);
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
    listeners: Vec<WorkerListeners>,
    drain: DrainFlag,
    bans: Option<BanReporter>,
    observers: Observers,
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
                let observers = observers.clone();
                move || {
                    run_worker(
                        id, core, published, listeners, drain, started, bans, observers,
                    )
                }
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

#[allow(clippy::too_many_arguments)]
fn run_worker(
    id: usize,
    core: Option<core_affinity::CoreId>,
    published: Arc<Published>,
    listeners: WorkerListeners,
    drain: DrainFlag,
    started: std::sync::mpsc::Sender<usize>,
    bans: Option<BanReporter>,
    observers: Observers,
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
        .uring_builder(
            io_uring::IoUring::builder()
                .setup_coop_taskrun()
                .setup_single_issuer(),
        )
        .start(async move {
            let metrics = observers.metrics.map(|m| m.worker(id));
            let access_log = observers.access_log.map(|l| l.worker());
            let worker = Rc::new(Worker::new(id, published, bans, metrics, access_log));
            if worker.metrics.is_some() {
                tokio_uring::spawn(hand_over_latency(worker.clone(), drain.clone()));
            }
            if worker.access_log.is_some() {
                tokio_uring::spawn(flush_access_log(worker.clone()));
            }
            tokio_uring::spawn(super::parked::resume_parked(worker.clone()));
            debug!(worker = id, core = ?core.map(|c| c.id), "worker started");
            let _ = started.send(id);
            let WorkerListeners {
                sockets,
                mut changes,
            } = listeners;
            let mut accepting: Vec<(SocketAddr, Rc<ListenerLife>)> = Vec::new();
            let mut tasks = Vec::new();
            let start = |socket: StdListener, mode: ListenMode, accepting: &mut Vec<_>| {
                let addr = socket.local_addr().ok()?;
                let life = Rc::new(ListenerLife::default());
                *life.mode.borrow_mut() = mode;
                accepting.push((addr, life.clone()));
                Some(tokio_uring::spawn(accept_loop(
                    worker.clone(),
                    socket,
                    drain.clone(),
                    life,
                )))
            };
            tasks.extend(
                sockets
                    .into_iter()
                    .filter_map(|(s, mode)| start(s, mode, &mut accepting)),
            );
            // Listening addresses change on reload until the drain begins.
            loop {
                tokio::select! {
                    biased;
                    _ = drain.started() => break,
                    change = changes.recv() => match change {
                        Some(ListenerChange::Add(socket, mode)) => {
                            let addr = socket.local_addr();
                            tasks.extend(start(socket, mode, &mut accepting));
                            debug!(worker = id, ?addr, "listener added");
                        }
                        Some(ListenerChange::Mode(addr, mode)) => {
                            if let Some((_, life)) = accepting.iter().find(|(a, _)| *a == addr) {
                                *life.mode.borrow_mut() = mode;
                            }
                        }
                        Some(ListenerChange::Remove(addr)) => {
                            if let Some(i) = accepting.iter().position(|(a, _)| *a == addr) {
                                accepting.swap_remove(i).1.remove();
                                debug!(worker = id, %addr, "listener removed");
                            }
                        }
                        // The set is gone only when the process ends: wait for the drain.
                        None => {
                            drain.started().await;
                            break;
                        }
                    },
                }
            }
            for task in tasks {
                let _ = task.await;
            }
            drain_worker(&worker, drain.mode() == Some(DrainMode::Upgrade)).await;
            if let Some(m) = &worker.metrics {
                m.hand_over();
            }
            if let Some(log) = &worker.access_log {
                log.flush_final();
            }
            debug!(worker = id, "worker stopped");
        });
}

/// What watches the request path, when configured: shared by every worker.
#[derive(Clone, Default)]
pub struct Observers {
    pub metrics: Option<Arc<Metrics>>,
    pub access_log: Option<Arc<AccessLog>>,
}

/// Hands the worker's access-log buffer to the writer at least every
/// [`crate::access_log::FLUSH_INTERVAL`], through the drain too (requests still finish then);
/// the task ends with the worker's runtime, after its final flush.
async fn flush_access_log(worker: Rc<Worker>) {
    let Some(log) = &worker.access_log else {
        return;
    };
    let mut tick = tokio::time::interval(crate::access_log::FLUSH_INTERVAL);
    loop {
        tick.tick().await;
        log.flush();
    }
}

/// Hands the worker's latency histograms to the collector once a second, until the drain.
async fn hand_over_latency(worker: Rc<Worker>, drain: DrainFlag) {
    let Some(metrics) = &worker.metrics else {
        return;
    };
    let mut tick = tokio::time::interval(LATENCY_HAND_OVER);
    loop {
        tokio::select! {
            _ = tick.tick() => metrics.hand_over(),
            _ = drain.started() => return,
        }
    }
}

/// One listening socket's life in a worker: removed by a reload, it stops accepting, and the
/// connections it accepted wind down.
#[derive(Default)]
struct ListenerLife {
    /// Shared with the connections accepted on it.
    removed: Rc<Cell<bool>>,
    stop: tokio::sync::Notify,
    /// How new connections are served (a reload may change it).
    mode: std::cell::RefCell<ListenMode>,
}

impl ListenerLife {
    fn remove(&self) {
        self.removed.set(true);
        // A permit is kept when no accept is pending, so the next one stops at once.
        self.stop.notify_one();
    }

    /// Resolves once the listener is removed or the drain has begun.
    async fn stopped(&self, drain: &DrainFlag) {
        if self.removed.get() {
            return;
        }
        tokio::select! {
            _ = self.stop.notified() => {}
            _ = drain.started() => {}
        }
    }
}

async fn accept_loop(
    worker: Rc<Worker>,
    listener: StdListener,
    drain: DrainFlag,
    life: Rc<ListenerLife>,
) {
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
        let (stream, peer) = match accept_until(fd, life.stopped(&drain)).await {
            Accepted::Connection(stream, peer) => (stream, peer),
            Accepted::Stopped if life.removed.get() && !drain.is_set() => {
                serve_queued(&worker, &listener, &life);
                return;
            }
            Accepted::Stopped => return,
            Accepted::Failed(_) if drain.is_set() || life.removed.get() => return,
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
            if let Some(m) = &worker.metrics {
                m.counters.connections_refused.inc();
            }
            tokio_uring::spawn(refuse(stream));
            continue;
        }
        spawn_connection(&worker, stream, peer, &life);
        // A connection accepted as the drain began (or the listener was removed) is served; no
        // further accept is made, except what a removed listener has queued.
        if drain.is_set() {
            return;
        }
        if life.removed.get() {
            serve_queued(&worker, &listener, &life);
            return;
        }
    }
}

/// Most connections taken from a removed listener's queue.
const MAX_QUEUED_ON_REMOVAL: usize = 4096;

/// A reload removed `listener`: serves the connections already in its accept queue, which
/// closing it would reset (bounded; what arrives in the instant before it closes is still
/// reset: the kernel offers no atomic close of a listening socket).
fn serve_queued(worker: &Rc<Worker>, listener: &StdListener, life: &ListenerLife) {
    if listener.set_nonblocking(true).is_err() {
        return;
    }
    for _ in 0..MAX_QUEUED_ON_REMOVAL {
        let Ok((stream, peer)) = listener.accept() else {
            // WouldBlock: the queue is empty (or accept failed: nothing more to take).
            return;
        };
        if stream.set_nonblocking(false).is_err() {
            continue;
        }
        let _ = stream.set_nodelay(true);
        spawn_connection(worker, TcpStream::from_std(stream), peer, life);
    }
}

/// Serves a connection accepted on the listener of `life`: over TLS when the listener has a
/// profile (the handshake first, bounded by the profile's timeout), else plain.
fn spawn_connection(worker: &Rc<Worker>, stream: TcpStream, peer: SocketAddr, life: &ListenerLife) {
    let worker = worker.clone();
    // One snapshot for the whole decision; the mode is read in place (no copy per connection).
    let snapshot = worker.generation().snapshot.clone();
    let mode = life.mode.borrow();
    let profile = mode
        .tls
        .as_ref()
        .map(|name| snapshot.tls.get(name).cloned());
    let facts = crate::proxy::tracker::ListenerFacts {
        removed: life.removed.clone(),
        redirect_https: mode.redirect_https,
        hsts: profile
            .as_ref()
            .and_then(|p| p.as_ref())
            .and_then(|p| p.hsts.clone()),
    };
    let proxied = mode.proxy_protocol && {
        let ip = peer.ip().to_canonical();
        snapshot
            .server()
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&ip))
    };
    drop(mode);
    if !proxied && profile.is_none() {
        // The common case gets a task of its own: every idle connection holds its task, and
        // this one keeps none of the PROXY and TLS paths' state.
        tokio_uring::spawn(async move {
            let tcp = TcpTransport::new(stream);
            let handle = worker.tracker.register(tcp.raw_fd(), facts);
            if let Some(parked) =
                serve(tcp, peer, &worker, &handle, Start::Accepted(&[]), None).await
            {
                worker.parking.park(parked, handle);
            }
        });
        return;
    }
    tokio_uring::spawn(async move {
        let tcp = TcpTransport::new(stream);
        let handle = worker.tracker.register(tcp.raw_fd(), facts);
        let (peer, initial) = if proxied {
            let deadline = tokio::time::Instant::now() + snapshot.server().header_timeout.get();
            // Boxed (once per connection) so the connection's task is not sized for it.
            match Box::pin(read_proxy_header(&tcp, deadline)).await {
                Ok((source, rest)) => (source.unwrap_or(peer), rest),
                Err(e) => {
                    debug!(%peer, error = %e, "PROXY header refused: closing");
                    let _ = tcp.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        } else {
            (peer, Vec::new())
        };
        let Some(profile) = profile else {
            let start = Start::Accepted(&initial);
            if let Some(parked) = serve(tcp, peer, &worker, &handle, start, None).await {
                worker.parking.park(parked, handle);
            }
            return;
        };
        let Some(profile) = profile else {
            // The profile went away with a reload that also changed this listener.
            let _ = tcp.shutdown(std::net::Shutdown::Both);
            return;
        };
        // The handshake and a TLS session's state are large: their own allocation keeps
        // them out of every plain connection's task.
        Box::pin(serve_tls(tcp, profile, peer, &worker, &handle, &initial)).await;
    });
}

/// Serves a plain connection accepted on a TLS listener: the handshake (bounded by the
/// profile's timeout), the client certificate check, then the requests.
async fn serve_tls(
    tcp: TcpTransport,
    profile: Arc<crate::tls::TlsProfile>,
    peer: SocketAddr,
    worker: &Worker,
    handle: &crate::proxy::tracker::ConnHandle<'_>,
    initial: &[u8],
) {
    let tls = match TlsTransport::new(tcp, profile.server.clone()) {
        Ok(t) => t,
        Err(e) => {
            debug!(%peer, error = %e, "cannot start a TLS session");
            return;
        }
    };
    let deadline = tokio::time::Instant::now() + profile.handshake_timeout;
    let started = match tls.feed_initial(initial) {
        Ok(()) => tls.handshake(deadline).await,
        Err(e) => Err(crate::io::HandshakeError::Tls(e)),
    };
    match started {
        Ok(()) => {
            let admitted = tls.with_peer_chain(|chain, resumed| {
                profile.admit_client_chain(chain, resumed)?;
                let identity =
                    chain.and_then(|c| crate::tls::client_identity::from_certificate(&c[0]));
                Ok::<_, rustls::Error>(identity)
            });
            let identity = match admitted {
                Ok(identity) => identity,
                Err(e) => {
                    let e = crate::io::HandshakeError::Tls(e);
                    debug!(%peer, reason = e.reason(), error = %e, "resumed session refused");
                    if let Some(m) = &worker.metrics {
                        m.counters.tls_handshake_failure(e.reason());
                    }
                    let _ = tls.shutdown(std::net::Shutdown::Both);
                    return;
                }
            };
            let client_cert = match (&profile.identity_header, identity) {
                (Some(header), Some(identity)) => {
                    Some(Rc::new(crate::proxy::context::ClientCert {
                        identity,
                        header: header.clone(),
                    }))
                }
                _ => None,
            };
            // A TLS connection never parks (its session state is its task's).
            let _never_parked =
                serve(tls, peer, worker, handle, Start::Accepted(&[]), client_cert).await;
        }
        Err(e) => {
            debug!(%peer, reason = e.reason(), error = %e, "TLS handshake failed");
            if let Some(m) = &worker.metrics {
                m.counters.tls_handshake_failure(e.reason());
            }
            let _ = tls.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// Why a PROXY header could not be read.
#[derive(Debug, thiserror::Error)]
enum ProxyReadError {
    #[error("{0}")]
    Header(#[from] crate::io::proxy_protocol::ProxyHeaderError),
    #[error("the connection ended before its PROXY header: {0}")]
    Io(crate::io::IoFailure),
}

/// Reads the PROXY header a trusted balancer sends first; returns the client address it names
/// and the bytes read after it.
async fn read_proxy_header(
    tcp: &TcpTransport,
    deadline: tokio::time::Instant,
) -> Result<(Option<SocketAddr>, Vec<u8>), ProxyReadError> {
    use crate::io::proxy_protocol::{decode, MAX_HEADER_BYTES};
    let mut buf = Vec::with_capacity(MAX_HEADER_BYTES + 4096);
    loop {
        if let Some(h) = decode(&buf)? {
            return Ok((h.source, buf[h.len..].to_vec()));
        }
        if buf.len() == buf.capacity() {
            return Err(crate::io::proxy_protocol::ProxyHeaderError::TooLong.into());
        }
        let (res, b) = crate::io::read_before(tcp, buf, deadline).await;
        buf = b;
        match res {
            Ok(0) => return Err(ProxyReadError::Io(crate::io::IoFailure::Closed)),
            Ok(_) => {}
            Err(e) => return Err(ProxyReadError::Io(e)),
        }
    }
}

/// Answers 503 to a connection over `max_connections_per_worker`, then closes it.
async fn refuse(stream: TcpStream) {
    let transport = TcpTransport::new(stream);
    let mut out = Vec::with_capacity(160);
    encode::write_error(
        &mut out,
        503,
        encode::Explanation::Text("connection limit reached"),
        false,
        false,
        b"",
    );
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
