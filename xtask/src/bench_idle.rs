//! Idle keep-alive connections for `cargo xtask bench`: the file-descriptor limit they need,
//! opening them (each used once, so it sits idle in keep-alive), and the resident memory of a
//! process tree before and after.

use std::{
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{bail, Context};
use socket2::{Domain, Protocol, Socket, Type};

use crate::bench::{framed_end, process_tree};

/// Connections opened from one source address before the next (127.0.0.1, then 127.0.0.2,
/// ...): well under the ~28,000 ephemeral ports of Linux's default range, which the load
/// generator's connections, the proxies' upstream connections and the TIME_WAIT left by
/// earlier targets share.
const PER_SOURCE: usize = 4_000;

/// The request that makes each idle connection used once.
const REQUEST: &[u8] = b"GET /1k HTTP/1.1\r\nHost: bench.local\r\n\r\n";

/// Raises this process's RLIMIT_NOFILE to `want` (soft and hard, which needs root to go past
/// the hard limit), or else the soft limit to the hard one. Children inherit it, so it is done
/// before anything is spawned. Returns the soft limit now in force.
pub(crate) fn raise_nofile(want: u64) -> anyhow::Result<u64> {
    let mut now = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only into the struct passed, which lives across the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) } != 0 {
        return Err(io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if now.rlim_cur >= want {
        return Ok(now.rlim_cur);
    }
    let both = libc::rlimit {
        rlim_cur: want,
        rlim_max: want.max(now.rlim_max),
    };
    // SAFETY: setrlimit only reads the struct passed.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &both) } == 0 {
        return Ok(want);
    }
    let soft = libc::rlimit {
        rlim_cur: now.rlim_max,
        rlim_max: now.rlim_max,
    };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &soft) } != 0 {
        return Err(io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
    }
    Ok(now.rlim_max)
}

/// A TCP connection to `127.0.0.1:port` from `source`, bound before connecting (socket2).
///
/// `IP_BIND_ADDRESS_NO_PORT` leaves the port to `connect`, which needs it unique only per
/// destination: a plain bind to port 0 must pick one unused towards every destination, so the
/// TIME_WAIT of earlier targets' load exhausted it (EADDRINUSE after ~8,400 connections).
fn connect_from(source: Ipv4Addr, port: u16) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `on`, which outlives the call;
    // the descriptor is the socket just created and still owned by `socket`.
    let set = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    socket.bind(&SocketAddr::from((source, 0)).into())?;
    socket.connect(&SocketAddr::from((Ipv4Addr::LOCALHOST, port)).into())?;
    Ok(socket.into())
}

/// then 127.0.0.2, and so on.
fn source_of(i: usize) -> Ipv4Addr {
    let [a, b, c, d] = Ipv4Addr::LOCALHOST.octets();
    Ipv4Addr::new(a, b, c, d + (i / PER_SOURCE) as u8)
}

/// Sends [`REQUEST`] on `s` and reads the whole response (Content-Length framing), leaving the
/// connection idle in keep-alive.
fn use_once(s: &mut TcpStream) -> anyhow::Result<()> {
    s.write_all(REQUEST)?;
    let mut raw = Vec::with_capacity(2048);
    let mut chunk = [0u8; 4096];
    while framed_end(&raw).is_none() {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            bail!("closed before the response ended");
        }
        raw.extend_from_slice(&chunk[..n]);
    }
    if !raw.starts_with(b"HTTP/1.1 200") {
        bail!(
            "answered {:?}",
            String::from_utf8_lossy(raw.split(|&b| b == b'\r').next().unwrap_or(&[]))
        );
    }
    Ok(())
}

/// Opens `n` connections to `127.0.0.1:port`, one after another, each used once by
/// [`use_once`]; they stay open until the returned streams are dropped.
pub(crate) fn open_idle(port: u16, n: usize) -> anyhow::Result<Vec<TcpStream>> {
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let source = source_of(i);
        let mut s = connect_from(source, port)
            .with_context(|| format!("idle connection {i} from {source} to port {port}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        use_once(&mut s).with_context(|| format!("idle connection {i} to port {port}"))?;
        conns.push(s);
    }
    Ok(conns)
}

/// How many of `conns` the server has not closed (a non-blocking peek sees no end of stream).
pub(crate) fn still_open(conns: &[TcpStream]) -> usize {
    let mut byte = [0u8; 1];
    conns
        .iter()
        .filter(|s| {
            if s.set_nonblocking(true).is_err() {
                return false;
            }
            match s.peek(&mut byte) {
                Ok(0) => false,
                Ok(_) => true,
                Err(e) => e.kind() == io::ErrorKind::WouldBlock,
            }
        })
        .count()
}

/// Resident memory, in KiB, of one process: `Rss` from /proc/PID/smaps_rollup, or `VmRSS`
/// from /proc/PID/status where the kernel has no rollup.
fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let field = |file: &str, name: &str| -> Option<u64> {
        let text = std::fs::read_to_string(format!("/proc/{pid}/{file}")).ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    };
    field("smaps_rollup", "Rss:")
        .or_else(|| field("status", "VmRSS:"))
        .with_context(|| format!("no resident memory for process {pid}"))
}

/// Resident memory, in KiB, of `root` and every process under it, each process once (its
/// threads share its memory).
pub(crate) fn tree_rss_kib(root: u32) -> anyhow::Result<u64> {
    process_tree(root)?
        .iter()
        .map(|&(pid, _)| rss_kib(pid))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_move_on_every_per_source_connections() {
        assert_eq!(source_of(0), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(source_of(PER_SOURCE - 1), Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(source_of(PER_SOURCE), Ipv4Addr::new(127, 0, 0, 2));
    }

    #[test]
    fn idle_connections_are_used_once_and_stay_open() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            let mut held = Vec::new();
            for _ in 0..3 {
                let (mut s, _) = listener.accept().unwrap();
                let mut head = [0u8; 256];
                let _ = s.read(&mut head).unwrap();
                s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .unwrap();
                held.push(s);
            }
            held
        });
        let conns = open_idle(port, 3).unwrap();
        let held = server.join().unwrap();
        assert_eq!(conns.len(), 3);
        assert_eq!(still_open(&conns), 3);
        drop(held);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(still_open(&conns), 0, "closed by the server");
    }

    #[test]
    fn own_rss_is_read() {
        assert!(rss_kib(std::process::id()).unwrap() > 0);
    }
}
