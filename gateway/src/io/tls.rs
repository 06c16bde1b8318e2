//! [`Transport`] over TLS: rustls's sans-IO connection (server side for clients, client side
//! for upstreams) driven over the TCP transport's owned io_uring buffers. Copies: received ciphertext is read into `incoming` and handed to
//! rustls, which decrypts in place in its own buffer; the plaintext is copied once into the
//! caller's buffer. Outgoing plaintext is copied once into rustls, which encrypts it into the
//! `outgoing` buffer the socket writes. Timeouts work as on TCP: the caller's deadline shuts the
//! socket down, which completes the pending operation.

use std::{
    cell::RefCell,
    io::{self, BufRead, Write},
    mem::take,
    net::Shutdown,
    ops::Range,
    sync::Arc,
};

use rustls::{
    pki_types::ServerName, ClientConfig, ClientConnection, Connection, ServerConfig,
    ServerConnection,
};
use tokio::time::Instant;

use super::{read_before, tcp::TcpTransport, IoFailure, Transport};

/// Ciphertext read from the socket at a time (a full TLS record and then some).
const INCOMING_BYTES: usize = 18 * 1024;

/// Why a TLS handshake did not complete.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("the handshake did not complete in time")]
    TimedOut,
    #[error("the peer closed the connection during the handshake")]
    Closed,
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("socket: {0}")]
    Io(io::Error),
}

impl HandshakeError {
    /// A short name for the metrics and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::TimedOut => "timeout",
            HandshakeError::Closed => "closed",
            HandshakeError::Tls(rustls::Error::NoApplicationProtocol) => "no_application_protocol",
            HandshakeError::Tls(rustls::Error::PeerIncompatible(_)) => "incompatible",
            HandshakeError::Tls(rustls::Error::InvalidMessage(_)) => "invalid_message",
            HandshakeError::Tls(rustls::Error::NoCertificatesPresented) => "no_certificate",
            HandshakeError::Tls(rustls::Error::InvalidCertificate(_)) => "bad_certificate",
            HandshakeError::Tls(_) => "tls_error",
            HandshakeError::Io(_) => "io",
        }
    }
}

pub struct TlsTransport {
    tcp: TcpTransport,
    conn: RefCell<Connection>,
    /// Ciphertext read from the socket; `incoming[fed..]` is not yet handed to rustls (it
    /// refuses more while its plaintext buffer is full, until the caller reads).
    incoming: RefCell<Vec<u8>>,
    fed: std::cell::Cell<usize>,
    outgoing: RefCell<Vec<u8>>,
    /// Set when the TCP stream ended before the peer's close_notify.
    truncated: std::cell::Cell<bool>,
    /// Held while ciphertext is being written. A read and a write may be in flight at once (a
    /// tunnel pumps both ways), and a read can queue records of its own (the answer to the
    /// peer's KeyUpdate, an alert): two writes on the socket at once could interleave their
    /// bytes or reorder records encrypted under the old and the new key.
    writing: tokio::sync::Mutex<()>,
}

impl TlsTransport {
    /// The server side, for a client's connection.
    pub fn new(tcp: TcpTransport, config: Arc<ServerConfig>) -> Result<Self, rustls::Error> {
        Ok(Self::over(tcp, ServerConnection::new(config)?.into()))
    }

    /// The client side, to an upstream server verified as `name`.
    pub fn client(
        tcp: TcpTransport,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<Self, rustls::Error> {
        Ok(Self::over(tcp, ClientConnection::new(config, name)?.into()))
    }

    fn over(tcp: TcpTransport, conn: Connection) -> Self {
        TlsTransport {
            tcp,
            conn: RefCell::new(conn),
            incoming: RefCell::new(Vec::with_capacity(INCOMING_BYTES)),
            fed: std::cell::Cell::new(0),
            outgoing: RefCell::new(Vec::with_capacity(INCOMING_BYTES)),
            truncated: std::cell::Cell::new(false),
            writing: tokio::sync::Mutex::new(()),
        }
    }

    /// Reads the peer's certificate chain (after the handshake), leaf first, and whether the
    /// session was resumed: then the chain is the one verified when the session began, which
    /// the caller may have to verify again.
    pub fn with_peer_chain<T>(
        &self,
        read: impl FnOnce(Option<&[rustls::pki_types::CertificateDer<'static>]>, bool) -> T,
    ) -> T {
        let conn = self.conn.borrow();
        let resumed = conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
        read(conn.peer_certificates().filter(|c| !c.is_empty()), resumed)
    }

    /// Whether anything the peer sent is still unread here (ciphertext not yet processed,
    /// decrypted bytes, or its close_notify): such a connection must not go back to a pool,
    /// where a look at the socket would not see it.
    pub fn has_unread(&self) -> bool {
        if self.unfed() {
            return true;
        }
        match self.conn.borrow_mut().process_new_packets() {
            Ok(state) => state.plaintext_bytes_to_read() > 0 || state.peer_has_closed(),
            Err(_) => true,
        }
    }

    pub fn raw_fd(&self) -> std::os::fd::RawFd {
        self.tcp.raw_fd()
    }

    /// Hands bytes already read from the socket (after a PROXY header) to rustls.
    pub fn feed_initial(&self, bytes: &[u8]) -> Result<(), rustls::Error> {
        self.incoming.borrow_mut().extend_from_slice(bytes);
        self.feed()
    }

    /// Completes the handshake before `deadline` (its reads and its writes).
    pub async fn handshake(&self, deadline: Instant) -> Result<(), HandshakeError> {
        while self.conn.borrow().is_handshaking() {
            self.flush_before(deadline).await?;
            if !self.conn.borrow().is_handshaking() {
                break;
            }
            let buf = self.take_incoming();
            let (res, buf) = read_before(&self.tcp, buf, deadline).await;
            *self.incoming.borrow_mut() = buf;
            match res {
                Ok(0) | Err(IoFailure::Closed) => return Err(HandshakeError::Closed),
                Ok(_) => {}
                Err(IoFailure::TimedOut) => return Err(HandshakeError::TimedOut),
                Err(IoFailure::Io(e)) => return Err(HandshakeError::Io(e)),
            }
            if let Err(e) = self.feed() {
                // Tell the client why (the alert rustls queued), then give up.
                let _ = self.flush_before(deadline).await;
                return Err(HandshakeError::Tls(e));
            }
        }
        self.flush_before(deadline).await
    }

    /// Writes what rustls queued, before `deadline` (else the socket is shut down).
    async fn flush_before(&self, deadline: Instant) -> Result<(), HandshakeError> {
        let mut op = std::pin::pin!(self.flush());
        tokio::select! {
            biased;
            res = &mut op => res.map_err(HandshakeError::Io),
            _ = super::reused_timer::sleep_until(deadline) => {
                let _ = self.tcp.shutdown(Shutdown::Both);
                let _ = op.await;
                Err(HandshakeError::TimedOut)
            }
        }
    }

    /// The incoming buffer, with room to read into after what is not yet fed.
    fn take_incoming(&self) -> Vec<u8> {
        let mut buf = take(&mut *self.incoming.borrow_mut());
        if buf.capacity() - buf.len() < INCOMING_BYTES / 2 {
            buf.reserve(INCOMING_BYTES);
        }
        buf
    }

    /// Hands rustls what it has not seen of `incoming` and processes it; stops early while
    /// rustls's plaintext buffer is full (the rest stays for after the caller has read).
    fn feed(&self) -> Result<(), rustls::Error> {
        let mut conn = self.conn.borrow_mut();
        let mut incoming = self.incoming.borrow_mut();
        let mut fed = self.fed.get();
        while fed < incoming.len() {
            let mut rest = &incoming[fed..];
            match conn.read_tls(&mut rest) {
                Ok(0) => break,
                Ok(n) => fed += n,
                // "received plaintext buffer full": not an error of the peer's.
                Err(_) => break,
            }
            conn.process_new_packets()?;
        }
        if fed == incoming.len() {
            incoming.clear();
            fed = 0;
        }
        self.fed.set(fed);
        Ok(())
    }

    /// Whether ciphertext is waiting for rustls.
    fn unfed(&self) -> bool {
        self.fed.get() < self.incoming.borrow().len()
    }

    /// Encrypts `plain` and writes it; rustls takes as much as its buffer limit allows at a
    /// time, each piece written before the next.
    async fn send(&self, mut plain: &[u8]) -> io::Result<()> {
        while !plain.is_empty() {
            let n = self.conn.borrow_mut().writer().write(plain)?;
            if n == 0 && !self.conn.borrow().wants_write() {
                // Nothing taken with nothing queued: rustls can take no more.
                return Err(io::ErrorKind::WriteZero.into());
            }
            plain = &plain[n..];
            self.flush().await?;
        }
        self.flush().await
    }

    /// Writes whatever rustls has queued (handshake messages, records, alerts), after any
    /// write already under way.
    async fn flush(&self) -> io::Result<()> {
        let _writing = self.writing.lock().await;
        self.write_queued().await
    }

    /// For the read side: writes what rustls has queued unless a write is under way, whose
    /// loop then takes it (it writes until rustls has nothing queued). Waiting for that write
    /// instead could deadlock a tunnel whose peer reads only after it has written.
    async fn flush_unless_writing(&self) -> io::Result<()> {
        match self.writing.try_lock() {
            Ok(_writing) => self.write_queued().await,
            Err(_) => Ok(()),
        }
    }

    /// The body of [`flush`](Self::flush), with the write lock held.
    async fn write_queued(&self) -> io::Result<()> {
        loop {
            let mut out = take(&mut *self.outgoing.borrow_mut());
            out.clear();
            {
                let mut conn = self.conn.borrow_mut();
                while conn.wants_write() {
                    conn.write_tls(&mut out)?;
                }
            }
            if out.is_empty() {
                *self.outgoing.borrow_mut() = out;
                return Ok(());
            }
            let len = out.len();
            let (res, out) = self.tcp.write_all(out, 0..len).await;
            *self.outgoing.borrow_mut() = out;
            res?;
        }
    }
}

impl Transport for TlsTransport {
    async fn read(&self, mut buf: Vec<u8>) -> (io::Result<usize>, Vec<u8>) {
        loop {
            {
                let mut conn = self.conn.borrow_mut();
                let mut reader = conn.reader();
                match reader.fill_buf() {
                    Ok(plain) if !plain.is_empty() => {
                        let n = plain.len().min(buf.capacity() - buf.len());
                        buf.extend_from_slice(&plain[..n]);
                        reader.consume(n);
                        return (Ok(n), buf);
                    }
                    // close_notify: a clean end of stream.
                    Ok(_) => return (Ok(0), buf),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return (Err(e), buf),
                }
            }
            // Ciphertext rustls refused while its plaintext was full goes first.
            if self.unfed() {
                if let Err(e) = self.feed() {
                    let _ = self.flush_unless_writing().await;
                    return (Err(io::Error::new(io::ErrorKind::InvalidData, e)), buf);
                }
                if !self.unfed() || self.conn.borrow_mut().reader().fill_buf().is_ok() {
                    continue;
                }
            }
            if let Err(e) = self.flush_unless_writing().await {
                return (Err(e), buf);
            }
            let incoming = self.take_incoming();
            let (res, incoming) = self.tcp.read(incoming).await;
            *self.incoming.borrow_mut() = incoming;
            match res {
                // The peer closed without close_notify: a truncation, reported as end of
                // stream (framing decides whether a message was cut; see `truncated`).
                Ok(0) => {
                    self.truncated.set(true);
                    return (Ok(0), buf);
                }
                Ok(_) => {}
                Err(e) => return (Err(e), buf),
            }
            if let Err(e) = self.feed() {
                let _ = self.flush_unless_writing().await;
                return (Err(io::Error::new(io::ErrorKind::InvalidData, e)), buf);
            }
        }
    }

    async fn write_all(&self, buf: Vec<u8>, range: Range<usize>) -> (io::Result<()>, Vec<u8>) {
        let res = self.send(&buf[range]).await;
        (res, buf)
    }

    async fn write_all_pair(
        &self,
        head: Vec<u8>,
        head_range: Range<usize>,
        body: Vec<u8>,
        body_range: Range<usize>,
    ) -> (io::Result<()>, Vec<u8>, Vec<u8>) {
        // The head is queued without a write of its own, so it leaves with the body.
        let queued = self
            .conn
            .borrow_mut()
            .writer()
            .write(&head[head_range.clone()]);
        let rest = match queued {
            Ok(n) => head_range.start + n..head_range.end,
            Err(e) => return (Err(e), head, body),
        };
        if !rest.is_empty() {
            if let Err(e) = self.send(&head[rest]).await {
                return (Err(e), head, body);
            }
        }
        let res = self.send(&body[body_range]).await;
        (res, head, body)
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.tcp.shutdown(how)
    }

    fn is_tls(&self) -> bool {
        true
    }

    fn truncated(&self) -> bool {
        self.truncated.get()
    }

    async fn close_notify(&self, deadline: Instant) {
        self.conn.borrow_mut().send_close_notify();
        let _ = self.flush_before(deadline).await;
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        process::Command,
        time::Duration,
    };

    use rustls::{
        crypto::ring::default_provider,
        pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
        version::TLS13,
        RootCertStore,
    };
    use tokio_uring::net::TcpStream;

    use super::*;

    /// Far more than loopback's socket buffers hold, so the write waits on a full buffer.
    const LARGE_WRITE: usize = 32 << 20;

    /// A record the read side finds queued (bytes the pattern never holds in this order).
    const INJECTED: &[u8] = b"INJECTED";

    /// A self-signed certificate for `localhost`, made with the openssl CLI.
    fn certificate(dir: &std::path::Path) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let (key, cert) = (dir.join("key.pem"), dir.join("cert.pem"));
        let made = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args([
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost",
            ])
            // An end entity's, which the verifier requires (not the CA default of `-x509`).
            .args(["-addext", "basicConstraints=critical,CA:FALSE"])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("the openssl CLI (`.ci/run` installs it)");
        assert!(made.status.success(), "openssl req: {made:?}");
        (
            CertificateDer::from_pem_file(&cert).unwrap(),
            PrivateKeyDer::from_pem_file(&key).unwrap(),
        )
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    /// A tunnel's two directions at once: while a large write is under way, the read side
    /// finds a record queued (as rustls queues its refusal of a TLS 1.2 renegotiation the
    /// moment it reads the request; it holds a KeyUpdate's answer for the next write itself)
    /// and flushes before it reads. That record must follow the write's records, not go out
    /// beside them. The peer (plain rustls over a std socket) must decrypt everything.
    #[test]
    fn a_record_queued_by_the_read_side_waits_for_the_write_under_way() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = certificate(dir.path());
        let provider = Arc::new(default_provider());
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&TLS13])
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = Arc::new(
            ClientConfig::builder_with_provider(provider)
                .with_protocol_versions(&[&TLS13])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        );

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut peer = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        // A small send buffer keeps the write waiting on the ring in short pieces, so another
        // write could go out ahead of it or between its pieces.
        socket2::SockRef::from(&ours)
            .set_send_buffer_size(4096)
            .unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let expected = LARGE_WRITE + INJECTED.len();
        let peer = std::thread::spawn(move || -> Result<Vec<u8>, String> {
            let mut conn = ClientConnection::new(client, "localhost".try_into().unwrap())
                .map_err(|e| e.to_string())?;
            let mut stream = rustls::Stream::new(&mut conn, &mut peer);
            let mut got = Vec::with_capacity(expected);
            let mut chunk = vec![0u8; 1 << 16];
            while got.len() < expected {
                match stream.read(&mut chunk) {
                    Ok(0) => return Err(format!("ended after {} bytes", got.len())),
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                    Err(e) => return Err(format!("after {} bytes: {e}", got.len())),
                }
            }
            stream.write_all(b"done").map_err(|e| e.to_string())?;
            Ok(got)
        });

        let (wrote, read) = tokio_uring::start(async {
            let tls = TlsTransport::new(
                TcpTransport::new(TcpStream::from_std(ours)),
                Arc::new(server),
            )
            .unwrap();
            tls.handshake(Instant::now() + Duration::from_secs(10))
                .await
                .unwrap();
            let write = async {
                let body = pattern(LARGE_WRITE);
                tls.write_all(body, 0..LARGE_WRITE).await.0
            };
            let read = async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                tls.conn.borrow_mut().writer().write_all(INJECTED).unwrap();
                let (res, buf) = tls.read(Vec::with_capacity(64)).await;
                res.map(|n| buf[..n].to_vec())
            };
            tokio::join!(write, read)
        });
        let got = peer.join().unwrap();
        let got = got.expect("the peer could not read the stream");
        let at = got
            .windows(INJECTED.len())
            .position(|w| w == INJECTED)
            .expect("the queued record arrived");
        let mut rest = got[..at].to_vec();
        rest.extend_from_slice(&got[at + INJECTED.len()..]);
        assert!(
            at > 0,
            "the queued record went out ahead of the write under way"
        );
        assert!(
            rest == pattern(LARGE_WRITE),
            "the write's bytes arrived out of order"
        );
        wrote.unwrap();
        assert_eq!(read.unwrap(), b"done");
    }
}
