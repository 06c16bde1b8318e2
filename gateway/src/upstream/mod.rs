//! Upstream groups as one worker sees them: round-robin server choice and a keep-alive pool per
//! server. Each worker owns its own groups (no lock, no sharing across cores).

use std::{
    cell::{Cell, RefCell},
    net::SocketAddr,
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    config::UpstreamConfig,
    io::{connect_before, ConnectFailure, TcpTransport},
    sys::{peek_idle, IdleSocket},
};

/// Pooled connections idle at least this long are peeked at before reuse. Upstreams close idle
/// connections after a second or more (Node 5 s, nginx 75 s); below this, a close can only be
/// the rare close right after a response, which the retry rule covers for idempotent requests.
const PEEK_AFTER_IDLE: Duration = Duration::from_millis(100);

/// Why no connection to an upstream server could be had.
#[derive(Debug)]
pub enum ConnectError {
    /// The connection did not complete within `connect_timeout` (answered 504).
    TimedOut,
    /// Refused, unreachable or otherwise failed (answered 502).
    Failed(std::io::Error),
}

/// A connection to one server of a group.
pub struct UpstreamConn {
    pub transport: TcpTransport,
    pub server: usize,
    /// Taken from the keep-alive pool rather than freshly connected: a failure before any
    /// response byte may be the server having closed it while idle.
    pub reused: bool,
}

struct IdleConn {
    transport: TcpTransport,
    since: Instant,
}

/// One upstream group, per worker.
pub struct UpstreamGroup {
    pub name: String,
    servers: Vec<SocketAddr>,
    /// `ip:port` of each server, the Host sent when the client gave none.
    host_values: Vec<String>,
    next: Cell<usize>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    idle_timeout: Duration,
    max_idle: usize,
    idle: Vec<RefCell<Vec<IdleConn>>>,
    config: UpstreamConfig,
}

impl UpstreamGroup {
    pub fn new(name: &str, config: &UpstreamConfig) -> Self {
        UpstreamGroup {
            name: name.to_owned(),
            servers: config.servers.clone(),
            host_values: config.servers.iter().map(|s| s.to_string()).collect(),
            next: Cell::new(0),
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
        for (mine, theirs) in self.idle.iter().zip(&old.idle) {
            mine.borrow_mut().append(&mut theirs.borrow_mut());
        }
    }

    /// The next server in round-robin order.
    pub fn pick(&self) -> usize {
        let i = self.next.get();
        self.next.set((i + 1) % self.servers.len());
        i
    }

    /// How many servers the group has.
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    pub fn server_addr(&self, server: usize) -> SocketAddr {
        self.servers[server]
    }

    pub fn host_value(&self, server: usize) -> &str {
        &self.host_values[server]
    }

    /// A pooled connection to `server` if one is fresh enough, else a new one.
    pub async fn checkout(&self, server: usize) -> Result<UpstreamConn, ConnectError> {
        if let Some(transport) = self.take_idle(server) {
            return Ok(UpstreamConn {
                transport,
                server,
                reused: true,
            });
        }
        self.connect(server).await
    }

    /// A new connection to `server`.
    pub async fn connect(&self, server: usize) -> Result<UpstreamConn, ConnectError> {
        let addr = self.servers[server];
        // A connect that times out is cancelled and its socket closed at once.
        match connect_before(addr, self.connect_timeout).await {
            Err(ConnectFailure::TimedOut(_)) => Err(ConnectError::TimedOut),
            Err(ConnectFailure::Io(e)) => Err(ConnectError::Failed(e)),
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                Ok(UpstreamConn {
                    transport: TcpTransport::new(stream),
                    server,
                    reused: false,
                })
            }
        }
    }

    fn take_idle(&self, server: usize) -> Option<TcpTransport> {
        let mut idle = self.idle[server].borrow_mut();
        let now = Instant::now();
        // Most recently used first: it is the least likely to have been closed by the server.
        while let Some(conn) = idle.pop() {
            if now.duration_since(conn.since) >= self.idle_timeout {
                continue;
            }
            // A connection the server closed while idle (or that received bytes nobody asked
            // for) would fail or desynchronise the request: look before using it. Not after a
            // pause shorter than any server's idle close: the look is a system call, and busy
            // pools hand connections back and forth every millisecond.
            if now.duration_since(conn.since) < PEEK_AFTER_IDLE {
                return Some(conn.transport);
            }
            match peek_idle(conn.transport.raw_fd()) {
                IdleSocket::Quiet => return Some(conn.transport),
                IdleSocket::Closed | IdleSocket::StrayBytes => {}
            }
        }
        None
    }

    /// Returns a connection whose exchange was completely framed and consumed.
    pub fn release(&self, conn: UpstreamConn) {
        let mut idle = self.idle[conn.server].borrow_mut();
        let now = Instant::now();
        idle.retain(|c| now.duration_since(c.since) < self.idle_timeout);
        if idle.len() < self.max_idle {
            idle.push(IdleConn {
                transport: conn.transport,
                since: now,
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
