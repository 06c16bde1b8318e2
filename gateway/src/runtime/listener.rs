//! Listening sockets: one SO_REUSEPORT socket per worker per address, so the kernel spreads
//! connections across workers without a shared accept queue.

use std::net::{SocketAddr, TcpListener};

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::{Listen, ListenMode};

/// Accept queue length per socket.
const BACKLOG: i32 = 4096;

/// A TCP socket for `addr` with SO_REUSEADDR and SO_REUSEPORT, not yet bound: several
/// sockets (each worker's, or an upgraded process's beside the old one's) share the address.
pub fn reuse_port_socket(addr: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    Ok(socket)
}

fn bind_one(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = reuse_port_socket(addr)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Binds `workers` sockets to each address. A port of 0 is resolved once, so every worker
/// listens on the same port. Returns, per worker, its listeners, and the bound addresses.
pub fn bind_all(
    addrs: &[SocketAddr],
    workers: usize,
) -> std::io::Result<(Vec<Vec<TcpListener>>, Vec<SocketAddr>)> {
    let mut per_worker: Vec<Vec<TcpListener>> = (0..workers).map(|_| Vec::new()).collect();
    let mut bound = Vec::new();
    for addr in addrs {
        let first = bind_one(*addr)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        let actual = first.local_addr()?;
        per_worker[0].push(first);
        for listeners in per_worker.iter_mut().skip(1) {
            listeners.push(bind_one(actual)?);
        }
        bound.push(actual);
    }
    Ok((per_worker, bound))
}

/// A change to one worker's listening sockets, made by a reload.
#[derive(Debug)]
pub enum ListenerChange {
    /// Start accepting on this socket, served as `ListenMode` says.
    Add(TcpListener, ListenMode),
    /// Connections accepted from now on at this address are served this way.
    Mode(SocketAddr, ListenMode),
    /// Stop accepting on the socket bound to this address; its connections wind down (each
    /// closes after an answer saying `Connection: close`, or at its keep-alive timeout).
    Remove(SocketAddr),
}

/// What a worker starts with: its sockets, and where it hears of changes to them.
pub struct WorkerListeners {
    /// Each socket with how its connections are served.
    pub sockets: Vec<(TcpListener, ListenMode)>,
    pub changes: tokio::sync::mpsc::UnboundedReceiver<ListenerChange>,
}

/// One configured address and its sockets, one per worker.
struct Entry {
    configured: SocketAddr,
    mode: ListenMode,
    bound: SocketAddr,
    /// Clones of the workers' sockets, kept to hand over on an upgrade.
    sockets: Vec<TcpListener>,
}

struct Inner {
    entries: Vec<Entry>,
    links: Vec<tokio::sync::mpsc::UnboundedSender<ListenerChange>>,
}

/// The gateway's listening sockets, worker by worker, and what a reload changes in them. Not on
/// the request path: touched by reloads and hand-overs only.
pub struct ListenerSet {
    inner: std::sync::Mutex<Inner>,
}

/// Sockets bound for a change of listen addresses, not yet in force.
pub struct ListenerPlan {
    configured: Vec<Listen>,
    /// For each configured address, the entry it keeps, or `None` for a fresh socket.
    new_entries: Vec<Option<usize>>,
    /// Fresh sockets: the bound address, one socket per worker, and the workers' copies.
    fresh: Vec<(SocketAddr, Vec<TcpListener>, Vec<TcpListener>)>,
}

/// What a reload changed in the listening addresses.
#[derive(Debug, Default)]
pub struct ListenerDiff {
    pub added: Vec<SocketAddr>,
    pub removed: Vec<SocketAddr>,
}

impl ListenerDiff {
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty()
    }
}

impl ListenerSet {
    /// The set of `per_worker` sockets (as [`bind_all`] returns them) for the `configured`
    /// addresses, in order; returns what each worker starts with.
    pub fn new(
        configured: &[Listen],
        per_worker: Vec<Vec<TcpListener>>,
    ) -> std::io::Result<(std::sync::Arc<ListenerSet>, Vec<WorkerListeners>)> {
        let mut entries: Vec<Entry> = Vec::with_capacity(configured.len());
        for (i, addr) in configured.iter().enumerate() {
            let sockets = per_worker
                .iter()
                .map(|w| w[i].try_clone())
                .collect::<Result<Vec<_>, _>>()?;
            entries.push(Entry {
                configured: addr.address,
                mode: addr.mode(),
                bound: sockets[0].local_addr()?,
                sockets,
            });
        }
        let mut links = Vec::with_capacity(per_worker.len());
        let mut workers = Vec::with_capacity(per_worker.len());
        for sockets in per_worker {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            links.push(tx);
            workers.push(WorkerListeners {
                sockets: sockets
                    .into_iter()
                    .zip(configured)
                    .map(|(s, l)| (s, l.mode()))
                    .collect(),
                changes: rx,
            });
        }
        let set = ListenerSet {
            inner: std::sync::Mutex::new(Inner { entries, links }),
        };
        Ok((std::sync::Arc::new(set), workers))
    }

    fn inner(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The addresses listened on now, in config order.
    pub fn bound(&self) -> Vec<SocketAddr> {
        self.inner().entries.iter().map(|e| e.bound).collect()
    }

    /// Forgets every socket (once an upgrade handed them over): this process no longer holds
    /// them open, so an address the new process removes closes for good. Workers keep theirs
    /// until their accept loops end.
    pub fn release(&self) {
        self.inner().entries.clear();
    }

    /// Clones of every worker's sockets, worker by worker, in config order: what an upgrade
    /// hands to the new process.
    pub fn per_worker(&self) -> std::io::Result<Vec<Vec<TcpListener>>> {
        let inner = self.inner();
        (0..inner.links.len())
            .map(|w| {
                inner
                    .entries
                    .iter()
                    .map(|e| e.sockets[w].try_clone())
                    .collect()
            })
            .collect()
    }

    /// Listens on exactly `configured`: addresses kept keep their sockets, new ones are bound
    /// (all of them before anything changes, so a failure changes nothing), removed ones stop
    /// accepting. Workers start and stop accepting at once.
    pub fn change_to(&self, configured: &[Listen]) -> std::io::Result<ListenerDiff> {
        let plan = self.prepare(configured)?;
        Ok(self.commit(plan))
    }

    /// The fallible half of [`ListenerSet::change_to`]: binds what is new, changes nothing.
    /// A reload publishes its snapshot between the two halves, so a worker that hears of a
    /// new listener or mode already has the config it names. Plans are made and committed
    /// one at a time (reloads are).
    pub fn prepare(&self, configured: &[Listen]) -> std::io::Result<ListenerPlan> {
        let inner = self.inner();
        let workers = inner.links.len();
        let mut kept = vec![false; inner.entries.len()];
        let mut new_entries: Vec<Option<usize>> = Vec::with_capacity(configured.len());
        let mut to_bind = Vec::new();
        // An address matches an entry configured the same, or, for port 0 (any port), one bound
        // on the same IP: after an upgrade the entries are known by their bound addresses.
        let matches = |e: &Entry, addr: &SocketAddr| {
            e.configured == *addr || (addr.port() == 0 && e.bound.ip() == addr.ip())
        };
        for listen in configured {
            let addr = &listen.address;
            let exact = (0..inner.entries.len())
                .find(|&i| !kept[i] && inner.entries[i].configured == *addr);
            match exact.or_else(|| {
                (0..inner.entries.len()).find(|&i| !kept[i] && matches(&inner.entries[i], addr))
            }) {
                Some(i) => {
                    kept[i] = true;
                    new_entries.push(Some(i));
                }
                None => {
                    to_bind.push(*addr);
                    new_entries.push(None);
                }
            }
        }
        let (bound_sockets, bound_addrs) = bind_all(&to_bind, workers)?;
        // The workers' copies are made before anything changes; nothing fails after this.
        let mut per_worker: Vec<_> = bound_sockets.into_iter().map(Vec::into_iter).collect();
        let mut fresh = Vec::with_capacity(bound_addrs.len());
        for addr in &bound_addrs {
            let sockets: Vec<TcpListener> = per_worker
                .iter_mut()
                .map(|w| w.next().expect("one socket per worker per address"))
                .collect();
            let copies = sockets
                .iter()
                .map(TcpListener::try_clone)
                .collect::<Result<Vec<_>, _>>()?;
            fresh.push((*addr, sockets, copies));
        }
        Ok(ListenerPlan {
            configured: configured.to_vec(),
            new_entries,
            fresh,
        })
    }

    /// Puts a prepared plan in force: workers start and stop accepting at once.
    pub fn commit(&self, plan: ListenerPlan) -> ListenerDiff {
        let ListenerPlan {
            configured,
            new_entries,
            fresh,
        } = plan;
        let mut inner = self.inner();
        let mut fresh = fresh.into_iter();
        let mut diff = ListenerDiff::default();
        let mut old: Vec<Option<Entry>> = inner.entries.drain(..).map(Some).collect();
        let mut entries = Vec::with_capacity(configured.len());
        for (slot, listen) in new_entries.into_iter().zip(&configured) {
            match slot {
                Some(i) => {
                    let mut entry = old[i].take().expect("matched once");
                    entry.configured = listen.address;
                    if entry.mode != listen.mode() {
                        entry.mode = listen.mode();
                        for link in &inner.links {
                            let _ =
                                link.send(ListenerChange::Mode(entry.bound, entry.mode.clone()));
                        }
                    }
                    entries.push(entry);
                }
                None => {
                    let (bound, sockets, copies) = fresh.next().expect("bound above");
                    for (link, copy) in inner.links.iter().zip(copies) {
                        let _ = link.send(ListenerChange::Add(copy, listen.mode()));
                    }
                    diff.added.push(bound);
                    entries.push(Entry {
                        configured: listen.address,
                        mode: listen.mode(),
                        bound,
                        sockets,
                    });
                }
            }
        }
        for entry in old.into_iter().flatten() {
            for link in &inner.links {
                let _ = link.send(ListenerChange::Remove(entry.bound));
            }
            diff.removed.push(entry.bound);
        }
        inner.entries = entries;
        diff
    }
}
