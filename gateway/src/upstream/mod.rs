//! Upstream groups as one worker sees them: the server choice (see [`balance`]), a keep-alive
//! pool per server, servers by address or by a host name the resolver thread keeps resolved,
//! and TLS to them. Each worker owns its own groups (no lock; only the servers' load counts
//! are shared across cores).

pub mod balance;
pub mod health_check;
pub mod metrics;
pub mod resolve;
mod transport;

use std::{
    cell::{Cell, RefCell},
    net::SocketAddr,
    sync::Arc,
    time::Duration,
};

use rustls::{pki_types::ServerName, ClientConfig};
use tokio::time::Instant;

pub use transport::UpstreamTransport;

use crate::{
    config::{HostPolicy, ServerAddress, UpstreamConfig},
    io::{connect_before, ConnectFailure, HandshakeError, TcpTransport, TlsTransport},
    sys::{peek_idle, IdleSocket},
};
use resolve::ResolvedName;

/// Pooled connections idle at least this long are peeked at before reuse. Upstreams close idle
/// connections after a second or more (Node 5 s, nginx 75 s); below this, a close can only be
/// the rare close right after a response, which the retry rule covers for idempotent requests.
const PEEK_AFTER_IDLE: Duration = Duration::from_millis(100);

/// Addresses of a named server one new connection tries before giving up.
const ADDRESS_ATTEMPTS: usize = 3;

/// Why no connection to an upstream server could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The connection did not complete within `connect_timeout` (answered 504).
    #[error("connect timed out")]
    TimedOut,
    /// Refused, unreachable or otherwise failed (answered 502).
    #[error("connect failed: {0}")]
    Failed(std::io::Error),
    /// A named server whose name has not resolved yet (answered 502).
    #[error("the server's name has no address yet")]
    Unresolved,
    /// The TLS handshake failed, a certificate that does not verify among the reasons
    /// (answered 502; never retried in plaintext).
    #[error("TLS handshake failed: {0}")]
    Tls(HandshakeError),
    /// The upstream's circuit breaker allows no more connections or connects (answered 503
    /// at once; not the server's failure).
    #[error("the upstream's circuit breaker is open: {0}")]
    CircuitOpen(&'static str),
}

/// One server of a group as a worker connects to it.
enum Target {
    Address(SocketAddr),
    Named {
        name: Arc<ResolvedName>,
        /// Which of the name's addresses the next connection uses.
        next: Cell<usize>,
    },
}

/// TLS to a server: the worker's client config and the name verified.
struct ServerTls {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

/// A connection to one server of a group.
pub struct UpstreamConn {
    pub transport: UpstreamTransport,
    pub server: usize,
    /// The address connected to (one of a named server's).
    addr: SocketAddr,
    /// Taken from the keep-alive pool rather than freshly connected: a failure before any
    /// response byte may be the server having closed it while idle.
    pub reused: bool,
    /// Counted among the upstream's open connections while it lives.
    counted: balance::Counted,
}

struct IdleConn {
    transport: UpstreamTransport,
    addr: SocketAddr,
    since: Instant,
    counted: balance::Counted,
}

/// One upstream group, per worker.
pub struct UpstreamGroup {
    pub name: String,
    servers: Vec<Target>,
    /// `ip:port` or `host:port` of each server, as logs and metrics name it.
    labels: Vec<String>,
    /// The Host sent when the client gave none, per server.
    host_values: Vec<String>,
    /// Whether `host_values` replace the client's Host, per server.
    host_fixed: Vec<bool>,
    tls: Vec<Option<ServerTls>>,
    balancer: balance::Balancer,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    idle: Vec<RefCell<Vec<IdleConn>>>,
    config: UpstreamConfig,
}

/// What a snapshot prepared for a group's servers: resolved names and TLS configs.
pub struct GroupShared<'a> {
    /// The resolver's entry for each named server.
    pub names: &'a std::collections::BTreeMap<ServerAddress, Arc<ResolvedName>>,
    /// The upstream's TLS config, when `tls` is set.
    pub tls: Option<&'a ClientConfig>,
    /// The servers' loads, shared by the workers.
    pub loads: Arc<balance::ServerLoads>,
    /// The Maglev table, when the upstream hashes.
    pub maglev: Option<Arc<balance::Maglev>>,
}

/// The Host value of `server`, and whether it replaces the client's.
pub fn host_of(config: &UpstreamConfig, server: &ServerAddress) -> (String, bool) {
    let default_port = if config.tls.is_some() { 443 } else { 80 };
    let name_of = || match server {
        ServerAddress::Name { host, port } if *port == default_port => host.clone(),
        other => other.to_string(),
    };
    let policy = config.host.clone().unwrap_or(match server {
        ServerAddress::Ip(_) => HostPolicy::Client,
        ServerAddress::Name { .. } => HostPolicy::Server,
    });
    match policy {
        HostPolicy::Client => (name_of(), false),
        HostPolicy::Server => (name_of(), true),
        HostPolicy::Literal(v) => (v, true),
    }
}

/// The name a TLS connection to `server` verifies, when the upstream uses TLS.
pub fn tls_name(config: &UpstreamConfig, server: &ServerAddress) -> Option<ServerName<'static>> {
    let config_tls = config.tls.as_ref()?;
    Some(match (&config_tls.server_name, server) {
        (Some(n), _) => ServerName::try_from(n.clone()).ok()?,
        (None, ServerAddress::Name { host, .. }) => ServerName::try_from(host.clone()).ok()?,
        (None, ServerAddress::Ip(a)) => ServerName::IpAddress(a.ip().into()),
    })
}

impl UpstreamGroup {
    pub fn new(name: &str, config: &UpstreamConfig, shared: &GroupShared) -> Self {
        let servers = config
            .servers
            .iter()
            .map(|s| match s {
                ServerAddress::Ip(a) => Target::Address(*a),
                ServerAddress::Name { .. } => Target::Named {
                    name: shared.names[s].clone(),
                    next: Cell::new(0),
                },
            })
            .collect();
        let worker_tls = shared.tls.map(crate::tls::client::for_worker);
        let tls = config
            .servers
            .iter()
            .map(|s| {
                Some(ServerTls {
                    config: worker_tls.clone()?,
                    name: tls_name(config, s)?,
                })
            })
            .collect();
        let hosts: Vec<(String, bool)> =
            config.servers.iter().map(|s| host_of(config, s)).collect();
        UpstreamGroup {
            name: name.to_owned(),
            servers,
            labels: config.servers.iter().map(|s| s.to_string()).collect(),
            host_values: hosts.iter().map(|(h, _)| h.clone()).collect(),
            host_fixed: hosts.iter().map(|(_, f)| *f).collect(),
            tls,
            balancer: balance::Balancer::new(config, shared.loads.clone(), shared.maglev.clone()),
            connect_timeout: config.connect_timeout.get(),
            read_timeout: config.read_timeout.get(),
            idle_timeout: config.idle_timeout.get(),
            max_idle: config.max_idle_per_server,
            idle: config
                .servers
                .iter()
                .map(|_| RefCell::new(Vec::new()))
                .collect(),
            config: config.clone(),
        }
    }

    /// The configuration the group was built from.
    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// Takes over the idle connections of `old`, a group of the same config in the worker's
    /// previous generation (a reload keeps warm pools).
    pub fn take_idle_from(&self, old: &UpstreamGroup) {
        // TLS connections were verified under the old generation's CA and client certificate,
        // whose files may have changed under the same names: they are not carried over.
        if self.config.tls.is_some() {
            return;
        }
        for (mine, theirs) in self.idle.iter().zip(&old.idle) {
            mine.borrow_mut().append(&mut theirs.borrow_mut());
        }
    }

    /// The server for the next request; `key` is its hash key when the group hashes; `avoid`
    /// holds servers (by index, modulo 64) not to go back to while another is usable.
    pub fn pick(&self, rng: &mut fastrand::Rng, key: Option<&[u8]>, avoid: u64) -> usize {
        self.balancer.pick(rng, key, avoid)
    }

    /// Counts a request to `server` in flight (for least-request and the admin API) until the
    /// guard is dropped.
    pub fn start_request(&self, server: usize) -> balance::InFlight {
        self.balancer.start(server)
    }

    /// The servers' loads, shared by the workers.
    pub fn loads(&self) -> &Arc<balance::ServerLoads> {
        self.balancer.loads()
    }

    /// How many servers the group has.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// `ip:port` or `host:port`, as configured: how logs and metrics name the server.
    pub fn server_label(&self, server: usize) -> &str {
        &self.labels[server]
    }

    /// The Host value for `server`, and whether it replaces the client's Host.
    pub fn host_value(&self, server: usize) -> (&str, bool) {
        (&self.host_values[server], self.host_fixed[server])
    }

    /// A pooled connection to `server` if one is fresh enough, else a new one.
    pub async fn checkout(&self, server: usize) -> Result<UpstreamConn, ConnectError> {
        if let Some((transport, addr, counted)) = self.take_idle(server) {
            return Ok(UpstreamConn {
                transport,
                server,
                addr,
                reused: true,
                counted,
            });
        }
        self.connect(server).await
    }

    /// The addresses the next connection to `server` tries, in order: a named server's
    /// addresses in turn from the next one, at most [`ADDRESS_ATTEMPTS`] of them.
    fn addresses(
        &self,
        server: usize,
    ) -> Result<([SocketAddr; ADDRESS_ATTEMPTS], usize), ConnectError> {
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 0));
        let mut out = [unspecified; ADDRESS_ATTEMPTS];
        match &self.servers[server] {
            Target::Address(a) => {
                out[0] = *a;
                Ok((out, 1))
            }
            Target::Named { name, next } => {
                let addresses = name.addresses();
                if addresses.is_empty() {
                    return Err(ConnectError::Unresolved);
                }
                let first = next.get() % addresses.len();
                next.set(first + 1);
                let n = addresses.len().min(ADDRESS_ATTEMPTS);
                for (k, slot) in out.iter_mut().take(n).enumerate() {
                    *slot = addresses[(first + k) % addresses.len()];
                }
                Ok((out, n))
            }
        }
    }

    /// A new connection to `server`, TLS included: the connect timeout bounds the connects
    /// and the handshake together. A named server's next address is tried when one refuses
    /// or is unreachable (an AAAA record on a host without IPv6, a dead instance).
    pub async fn connect(&self, server: usize) -> Result<UpstreamConn, ConnectError> {
        let limits = &self.config.circuit_breaker;
        let loads = self.balancer.loads();
        // Counted first and checked after, so workers connecting at once cannot pass a limit
        // together; connects in progress count as connections, which they become.
        let _pending = loads.count_pending();
        if limits
            .max_connections
            .is_some_and(|m| loads.connections() + loads.pending() > m)
        {
            loads.count_circuit_refusal();
            return Err(ConnectError::CircuitOpen("circuit_breaker.max_connections"));
        }
        if limits.max_pending.is_some_and(|m| loads.pending() > m) {
            loads.count_circuit_refusal();
            return Err(ConnectError::CircuitOpen("circuit_breaker.max_pending"));
        }
        let (candidates, count) = self.addresses(server)?;
        let deadline = Instant::now() + self.connect_timeout;
        let mut connected = None;
        let mut failure = None;
        for &addr in &candidates[..count] {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(ConnectError::TimedOut);
            }
            // A connect that times out is cancelled and its socket closed at once.
            match connect_before(addr, left).await {
                Err(ConnectFailure::TimedOut(_)) => return Err(ConnectError::TimedOut),
                Err(ConnectFailure::Io(e)) => failure = Some(e),
                Ok(stream) => {
                    connected = Some((addr, stream));
                    break;
                }
            }
        }
        let Some((addr, stream)) = connected else {
            return Err(ConnectError::Failed(failure.unwrap_or_else(|| {
                std::io::Error::other("no address to connect to")
            })));
        };
        let _ = stream.set_nodelay(true);
        let tcp = TcpTransport::new(stream);
        let transport = match (&self.tls[server], self.config.tls.is_some()) {
            (None, false) => UpstreamTransport::Plain(tcp),
            // Never plaintext to an upstream configured for TLS (validation makes every
            // server's TLS name valid, so this is only a guard).
            (None, true) => {
                return Err(ConnectError::Tls(HandshakeError::Tls(
                    rustls::Error::General("no TLS name for this server".into()),
                )))
            }
            (Some(tls), _) => {
                let session = TlsTransport::client(tcp, tls.config.clone(), tls.name.clone())
                    .map_err(|e| ConnectError::Tls(HandshakeError::Tls(e)))?;
                match session.handshake(deadline).await {
                    Ok(()) => UpstreamTransport::Tls(Box::new(session)),
                    Err(HandshakeError::TimedOut) => return Err(ConnectError::TimedOut),
                    Err(e) => {
                        let _ = crate::io::Transport::shutdown(&session, std::net::Shutdown::Both);
                        return Err(ConnectError::Tls(e));
                    }
                }
            }
        };
        Ok(UpstreamConn {
            transport,
            server,
            addr,
            reused: false,
            counted: loads.count_connection(),
        })
    }

    fn take_idle(
        &self,
        server: usize,
    ) -> Option<(UpstreamTransport, SocketAddr, balance::Counted)> {
        let mut idle = self.idle[server].borrow_mut();
        let now = Instant::now();
        // Most recently used first: it is the least likely to have been closed by the server.
        while let Some(conn) = idle.pop() {
            if now.duration_since(conn.since) >= self.idle_timeout {
                continue;
            }
            // A named server's address that its name no longer resolves to is not used again.
            if let Target::Named { name, .. } = &self.servers[server] {
                if !name.addresses().contains(&conn.addr) {
                    continue;
                }
            }
            // A connection the server closed while idle (or that received bytes nobody asked
            // for) would fail or desynchronise the request: look before using it. Not after a
            // pause shorter than any server's idle close: the look is a system call, and busy
            // pools hand connections back and forth every millisecond.
            if now.duration_since(conn.since) < PEEK_AFTER_IDLE {
                return Some((conn.transport, conn.addr, conn.counted));
            }
            match peek_idle(conn.transport.raw_fd()) {
                IdleSocket::Quiet => return Some((conn.transport, conn.addr, conn.counted)),
                IdleSocket::Closed | IdleSocket::StrayBytes => {}
            }
        }
        None
    }

    /// Returns a connection whose exchange was completely framed and consumed.
    pub fn release(&self, conn: UpstreamConn) {
        if conn.transport.has_unread() {
            return;
        }
        let mut idle = self.idle[conn.server].borrow_mut();
        let now = Instant::now();
        idle.retain(|c| now.duration_since(c.since) < self.idle_timeout);
        if idle.len() < self.max_idle {
            idle.push(IdleConn {
                transport: conn.transport,
                addr: conn.addr,
                since: now,
                counted: conn.counted,
            });
        }
    }

    /// Closes every pooled connection (on drain).
    pub fn clear_idle(&self) {
        for pool in &self.idle {
            pool.borrow_mut().clear();
        }
    }
}
