//! Active health checks: one thread per upstream with `health_check`, per host (not per
//! worker), asks each server for a configured path on an interval, off the request path, and
//! marks it unhealthy after `unhealthy_threshold` failed checks in a row and healthy again after
//! `healthy_threshold` good ones. The balancers skip unhealthy servers (see
//! [`super::balance`]). A check over TLS verifies the server as requests do.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use rustls::{pki_types::ServerName, ClientConfig};
use tracing::{info, warn};

use super::{balance::ServerLoads, resolve::ResolvedName};
use crate::config::{HealthCheckConfig, ServerAddress};

/// Most bytes of a check's answer read, for its status line.
const STATUS_LINE_BYTES: usize = 1024;
/// Addresses of a named server one check tries, as a request's connect does.
const ADDRESS_ATTEMPTS: usize = 3;

/// One server as the checker reaches it.
pub struct CheckTarget {
    pub label: String,
    pub address: ServerAddress,
    /// The resolver's entry for a named server.
    pub name: Option<Arc<ResolvedName>>,
    /// The Host sent.
    pub host: String,
    /// TLS to the server: the upstream's client config and the name verified.
    pub tls: Option<(Arc<ClientConfig>, ServerName<'static>)>,
}

/// A running checker; dropping it stops the thread (at its next wake-up).
pub struct HealthChecker {
    stop: Arc<AtomicBool>,
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl HealthChecker {
    /// Starts checking `targets` of upstream `upstream`, marking `loads`.
    pub fn start(
        upstream: &str,
        config: &HealthCheckConfig,
        targets: Vec<CheckTarget>,
        loads: Arc<ServerLoads>,
        token: u64,
    ) -> std::io::Result<HealthChecker> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let config = config.clone();
        let upstream = upstream.to_owned();
        std::thread::Builder::new()
            .name(format!("health-{upstream}"))
            .spawn(move || run(&upstream, &config, &targets, &loads, &flag, token))?;
        Ok(HealthChecker { stop })
    }
}

fn run(
    upstream: &str,
    config: &HealthCheckConfig,
    targets: &[CheckTarget],
    loads: &ServerLoads,
    stop: &AtomicBool,
    token: u64,
) {
    // Stopped by its config being dropped, or by a newer config's checker taking over.
    let stop = || stop.load(Ordering::Relaxed) || !loads.is_current_checker(token);
    let mut good = vec![0u32; targets.len()];
    let mut bad = vec![0u32; targets.len()];
    let interval = config.interval.get();
    let mut next = Instant::now();
    while !stop() {
        for (i, target) in targets.iter().enumerate() {
            if stop() {
                return;
            }
            let outcome = check(config, target);
            let healthy = loads.is_healthy(i);
            match outcome {
                Ok(()) => {
                    bad[i] = 0;
                    good[i] = good[i].saturating_add(1);
                    if !healthy && good[i] >= config.healthy_threshold {
                        loads.set_healthy(i, true);
                        info!(upstream, server = %target.label, "upstream server passes its health checks again");
                    }
                }
                Err(why) => {
                    good[i] = 0;
                    bad[i] = bad[i].saturating_add(1);
                    if healthy && bad[i] >= config.unhealthy_threshold {
                        loads.set_healthy(i, false);
                        warn!(upstream, server = %target.label, reason = %why, "upstream server fails its health checks");
                    }
                }
            }
        }
        next += interval;
        // Sleep in short steps so a reload stops the thread soon.
        while Instant::now() < next {
            if stop() {
                return;
            }
            std::thread::sleep((next - Instant::now()).min(Duration::from_millis(50)));
        }
    }
}

/// Why a check failed.
#[derive(Debug, thiserror::Error)]
enum CheckFailure {
    #[error("no address")]
    Unresolved,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("answered {0}")]
    Status(u16),
    #[error("not an HTTP answer")]
    Invalid,
}

fn check(config: &HealthCheckConfig, target: &CheckTarget) -> Result<(), CheckFailure> {
    // A named server's addresses in turn, as requests try them (an AAAA record on a host
    // without IPv6 must not fail the check).
    let addresses: Vec<SocketAddr> = match (&target.address, &target.name) {
        (ServerAddress::Ip(a), _) => vec![*a],
        (ServerAddress::Name { .. }, Some(name)) => name
            .addresses()
            .iter()
            .take(ADDRESS_ATTEMPTS)
            .copied()
            .collect(),
        (ServerAddress::Name { .. }, None) => Vec::new(),
    };
    let timeout = config.timeout.get();
    let deadline = Instant::now() + timeout;
    let mut connected = Err(CheckFailure::Unresolved);
    for address in addresses {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        match TcpStream::connect_timeout(&address, left) {
            Ok(s) => {
                connected = Ok(s);
                break;
            }
            Err(e) => connected = Err(e.into()),
        }
    }
    let stream = connected?;
    let left = || {
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1))
    };
    stream.set_read_timeout(Some(left()))?;
    stream.set_write_timeout(Some(left()))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: portcullis-health-check\r\nConnection: close\r\n\r\n",
        config.path, target.host
    );
    let mut answer = Vec::with_capacity(STATUS_LINE_BYTES);
    match &target.tls {
        None => {
            let mut stream = stream;
            stream.write_all(request.as_bytes())?;
            read_status_line(&mut stream, &mut answer)?;
        }
        Some((tls, name)) => {
            let conn = rustls::ClientConnection::new(tls.clone(), name.clone())?;
            let mut tls_stream = rustls::StreamOwned::new(conn, stream);
            tls_stream.write_all(request.as_bytes())?;
            read_status_line(&mut tls_stream, &mut answer)?;
        }
    }
    let mut headers = [httparse::EMPTY_HEADER; 0];
    let mut resp = httparse::Response::new(&mut headers);
    // Only the status line is needed: more fields than fit are fine.
    let status = match resp.parse(&answer) {
        Ok(_) | Err(httparse::Error::TooManyHeaders) => resp.code.ok_or(CheckFailure::Invalid)?,
        Err(_) => return Err(CheckFailure::Invalid),
    };
    if config.expects(status) {
        Ok(())
    } else {
        Err(CheckFailure::Status(status))
    }
}

/// Reads until the status line is in `out` (or the answer ends or exceeds its bound).
fn read_status_line(r: &mut impl Read, out: &mut Vec<u8>) -> std::io::Result<()> {
    let mut buf = [0u8; 512];
    while !out.windows(2).any(|w| w == b"\r\n") && out.len() < STATUS_LINE_BYTES {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    Ok(())
}
