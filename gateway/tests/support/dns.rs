//! A tiny DNS server on a loopback UDP socket the test controls: it answers A queries from a
//! table the test changes, with the TTL the test sets, or fails (SERVFAIL) on demand. Enough
//! of RFC 1035 for a resolver's queries: one question, answers by name.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr, UdpSocket},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc, Mutex,
    },
    thread,
    time::Duration,
};

#[derive(Default)]
struct Zone {
    records: Mutex<HashMap<String, (Vec<Ipv4Addr>, u32)>>,
    failing: AtomicBool,
    queries: AtomicUsize,
    stop: AtomicBool,
}

pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<Zone>,
    thread: Option<thread::JoinHandle<()>>,
}

impl DnsServer {
    pub fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = socket.local_addr().unwrap();
        let zone = Arc::new(Zone::default());
        let z = zone.clone();
        let thread = thread::spawn(move || {
            let mut buf = [0u8; 512];
            while !z.stop.load(Ordering::Relaxed) {
                let Ok((n, from)) = socket.recv_from(&mut buf) else {
                    continue;
                };
                if let Some(reply) = answer(&z, &buf[..n]) {
                    let _ = socket.send_to(&reply, from);
                }
            }
        });
        DnsServer {
            addr,
            zone,
            thread: Some(thread),
        }
    }

    /// Answers `name` (no trailing dot) with `addrs` and `ttl` seconds from now on.
    pub fn set(&self, name: &str, addrs: &[Ipv4Addr], ttl: u32) {
        self.zone
            .records
            .lock()
            .unwrap()
            .insert(name.to_ascii_lowercase(), (addrs.to_vec(), ttl));
    }

    /// Answers every query with SERVFAIL while `failing`.
    pub fn fail(&self, failing: bool) {
        self.zone.failing.store(failing, Ordering::Relaxed);
    }

    /// Queries received so far.
    pub fn queries(&self) -> usize {
        self.zone.queries.load(Ordering::Relaxed)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.zone.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The reply to `query`, or nothing for what is not a query.
fn answer(zone: &Zone, query: &[u8]) -> Option<Vec<u8>> {
    if query.len() < 12 || query[2] & 0x80 != 0 {
        return None;
    }
    zone.queries.fetch_add(1, Ordering::Relaxed);
    // The question: labels, then type and class.
    let mut i = 12;
    let mut labels = Vec::new();
    loop {
        let len = *query.get(i)? as usize;
        i += 1;
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(query.get(i..i + len)?).to_ascii_lowercase());
        i += len;
    }
    let qtype = u16::from_be_bytes([*query.get(i)?, *query.get(i + 1)?]);
    let question_end = i + 4;
    let question = query.get(12..question_end)?;
    let name = labels.join(".");
    let mut reply = Vec::with_capacity(512);
    reply.extend_from_slice(&query[..2]);
    let found = zone.records.lock().unwrap().get(&name).cloned();
    let (rcode, answers) = if zone.failing.load(Ordering::Relaxed) {
        (2, Vec::new())
    } else {
        match found {
            // A (1) gets the addresses; AAAA and others get an empty answer (NOERROR).
            Some((addrs, ttl)) => (
                0,
                if qtype == 1 {
                    addrs.iter().map(|a| (*a, ttl)).collect()
                } else {
                    Vec::new()
                },
            ),
            None => (3, Vec::new()),
        }
    };
    // QR, opcode 0, AA, RD copied; RA; rcode.
    reply.push(0x84 | (query[2] & 0x01));
    reply.push(0x80 | rcode);
    reply.extend_from_slice(&1u16.to_be_bytes());
    reply.extend_from_slice(&(answers.len() as u16).to_be_bytes());
    reply.extend_from_slice(&[0, 0, 0, 0]);
    reply.extend_from_slice(question);
    for (addr, ttl) in answers {
        // A pointer to the question's name, type A, class IN, TTL, 4 bytes of address.
        reply.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1]);
        reply.extend_from_slice(&ttl.to_be_bytes());
        reply.extend_from_slice(&[0, 4]);
        reply.extend_from_slice(&addr.octets());
    }
    Some(reply)
}
