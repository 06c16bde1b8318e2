//! A fixed HTTP/1.1 backend: thread per core on io_uring, keep-alive, precomputed responses.
//!
//! Paths: `/1k` and `/64k` answer bodies of that size; any other path answers a short greeting.
//! Request bodies framed by Content-Length are read and discarded. It is deliberately minimal
//! so that it is never the bottleneck of a benchmark.

use std::{net::SocketAddr, rc::Rc};

use tokio_uring::{buf::BoundedBuf, net::TcpListener};

const READ_BUFFER_BYTES: usize = 16 * 1024;
const MAX_HEADERS: usize = 64;

/// The precomputed responses.
pub struct Responses {
    greeting: Vec<u8>,
    one_k: Vec<u8>,
    sixty_four_k: Vec<u8>,
}

fn response(body: &[u8]) -> Vec<u8> {
    let mut r = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

impl Default for Responses {
    fn default() -> Self {
        Responses {
            greeting: response(b"Hello from the Portcullis demo upstream.\n"),
            one_k: response(&[b'a'; 1024]),
            sixty_four_k: response(&vec![b'b'; 64 * 1024]),
        }
    }
}

impl Responses {
    fn for_path(&self, path: &str) -> &[u8] {
        match path {
            "/1k" => &self.one_k,
            "/64k" => &self.sixty_four_k,
            _ => &self.greeting,
        }
    }
}

/// Binds one SO_REUSEPORT listener per worker thread and serves forever.
pub fn run(addr: SocketAddr, workers: usize, pin_from_core: Option<usize>) -> std::io::Result<()> {
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let mut handles = Vec::new();
    for i in 0..workers {
        let listener = bind(addr)?;
        let core =
            pin_from_core.and_then(|first| cores.get((first + i) % cores.len().max(1)).copied());
        handles.push(std::thread::spawn(move || {
            if let Some(core) = core {
                core_affinity::set_for_current(core);
            }
            tokio_uring::start(async move {
                let responses = Rc::new(Responses::default());
                let listener = TcpListener::from_std(listener);
                while let Ok((stream, _)) = listener.accept().await {
                    let _ = stream.set_nodelay(true);
                    tokio_uring::spawn(serve(stream, responses.clone()));
                }
            })
        }));
    }
    for h in handles {
        let _ = h.join();
    }
    Ok(())
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

async fn serve(stream: tokio_uring::net::TcpStream, responses: Rc<Responses>) {
    let mut buf = Vec::with_capacity(READ_BUFFER_BYTES);
    let mut out: Vec<u8> = Vec::with_capacity(64 * 1024 + 256);
    let mut skip_body: u64 = 0;
    loop {
        if buf.len() == buf.capacity() {
            return;
        }
        let start = buf.len();
        let (res, slice) = stream.read(buf.slice(start..)).await;
        buf = slice.into_inner();
        match res {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        out.clear();
        let mut pos = 0;
        loop {
            if skip_body > 0 {
                let take = (buf.len() - pos).min(skip_body as usize);
                pos += take;
                skip_body -= take as u64;
                if skip_body > 0 {
                    break;
                }
            }
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            match req.parse(&buf[pos..]) {
                Ok(httparse::Status::Complete(n)) => {
                    let length = req
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse::<u64>().ok())
                        .unwrap_or(0);
                    out.extend_from_slice(responses.for_path(req.path.unwrap_or("/")));
                    pos += n;
                    skip_body = length;
                }
                Ok(httparse::Status::Partial) => break,
                Err(_) => return,
            }
        }
        buf.drain(..pos);
        if !out.is_empty() {
            let (res, o) = stream.write_all(out).await;
            out = o;
            if res.is_err() {
                return;
            }
        }
    }
}
