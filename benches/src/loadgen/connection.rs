//! One load thread: its connections, each with one request outstanding at a time.

use std::{
    cell::RefCell,
    net::SocketAddr,
    rc::Rc,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use tokio_uring::{buf::BoundedBuf, net::TcpStream};

use super::{LoadSpec, ThreadResult, COUNTER_PLACEHOLDER, MAX_LATENCY_US};

/// Width of the per-request counter written over [`COUNTER_PLACEHOLDER`].
const COUNTER_DIGITS: usize = 10;

/// How a connection builds and judges its requests.
#[derive(Clone, Copy)]
struct Shape {
    /// This connection's local address.
    source: Option<std::net::IpAddr>,
    any_status: bool,
    /// Offset of the counter digits in the request, when it has a placeholder.
    counter_at: Option<usize>,
}

const READ_BUFFER_BYTES: usize = 128 * 1024;
/// Waits for a request's due time to the microsecond. tokio's timers have millisecond
/// resolution, which would add up to a millisecond of the generator's own lateness to every
/// latency; spinning instead would keep the thread from parking, and tokio-uring submits its
/// queued operations only when the thread parks. A timerfd (an hrtimer) does neither.
struct DueTimer {
    fd: tokio::io::unix::AsyncFd<timerfd::TimerFd>,
}

impl DueTimer {
    fn new() -> std::io::Result<Self> {
        let timer = timerfd::TimerFd::new_custom(timerfd::ClockId::Monotonic, true, true)?;
        // SAFETY: the TimerFd owns its descriptor and moves into the AsyncFd, so the descriptor
        // stays open exactly as long as it is registered.
        let fd =
            unsafe { tokio::io::unix::AsyncFd::register(timer) }.map_err(|e| e.into_parts().1)?;
        Ok(DueTimer { fd })
    }

    async fn wait_until(&mut self, due: Instant) {
        let now = Instant::now();
        if due <= now {
            return;
        }
        self.fd.get_mut().set_state(
            timerfd::TimerState::Oneshot(due - now),
            timerfd::SetTimeFlags::Default,
        );
        loop {
            let Ok(mut guard) = self.fd.readable_mut().await else {
                return;
            };
            if guard.get_inner_mut().read() > 0 || Instant::now() >= due {
                guard.clear_ready();
                return;
            }
            guard.clear_ready();
        }
    }
}

struct Shared {
    histogram: Histogram<u64>,
    completed: u64,
    errors: u64,
}

pub async fn drive_thread(
    spec: LoadSpec,
    connections: usize,
    // Index of this thread's first connection among all threads' connections.
    first_connection: usize,
    start: Instant,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<ThreadResult> {
    let shared = Rc::new(RefCell::new(Shared {
        histogram: Histogram::new_with_bounds(1, MAX_LATENCY_US, 3)?,
        completed: 0,
        errors: 0,
    }));
    let text = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: portcullis-loadgen\r\n{}\r\n",
        spec.path, spec.host, spec.extra_headers
    );
    let counter_at = text.find(COUNTER_PLACEHOLDER);
    let text = text.replacen(COUNTER_PLACEHOLDER, &"0".repeat(COUNTER_DIGITS), 1);
    let request = Rc::new(text.into_bytes());
    let shape = Shape {
        source: None,
        any_status: spec.any_status,
        counter_at,
    };
    // Interval between requests on one connection, in open loop.
    let interval = spec
        .rate
        .map(|r| Duration::from_secs_f64(spec.connections as f64 / r));
    let mut tasks = Vec::new();
    for i in 0..connections {
        // Stagger the connections' schedules across one interval so they do not fire together.
        let offset = interval
            .map(|iv| iv.mul_f64(i as f64 / connections.max(1) as f64))
            .unwrap_or_default();
        let shape = Shape {
            source: (!spec.sources.is_empty())
                .then(|| spec.sources[(first_connection + i) % spec.sources.len()]),
            ..shape
        };
        tasks.push(tokio_uring::spawn(drive_connection(
            spec.target,
            shape,
            // Counters start far apart so no two connections ever send the same value.
            (i as u64 + 1) * 10_000_000 + start.elapsed().as_nanos() as u64 % 1_000_000,
            request.clone(),
            shared.clone(),
            stop.clone(),
            start + offset,
            interval,
        )));
    }
    for t in tasks {
        let _ = t.await;
    }
    let s = Rc::try_unwrap(shared)
        .map_err(|_| anyhow::anyhow!("connections still running"))?
        .into_inner();
    Ok(ThreadResult {
        histogram: s.histogram,
        completed: s.completed,
        errors: s.errors,
    })
}

#[allow(clippy::too_many_arguments)]
async fn drive_connection(
    target: SocketAddr,
    shape: Shape,
    mut counter: u64,
    request: Rc<Vec<u8>>,
    shared: Rc<RefCell<Shared>>,
    stop: Arc<AtomicBool>,
    first_due: Instant,
    interval: Option<Duration>,
) {
    let mut stream: Option<TcpStream> = None;
    let mut buf = Vec::with_capacity(READ_BUFFER_BYTES);
    let Ok(mut timer) = DueTimer::new() else {
        shared.borrow_mut().errors += 1;
        return;
    };
    let mut due = first_due;
    // This connection's own copy of the request, lent to each write and handed back.
    let mut request_buf = request.to_vec();
    timer.wait_until(first_due).await;
    while !stop.load(Ordering::Relaxed) {
        if interval.is_some() {
            timer.wait_until(due).await;
            if stop.load(Ordering::Relaxed) {
                break;
            }
        }
        // Open loop counts from when the request was due; closed loop from when it was sent.
        let began = if interval.is_some() {
            due
        } else {
            Instant::now()
        };
        if stream.is_none() {
            match connect(target, shape.source).await {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    stream = Some(s);
                }
                Err(_) => {
                    shared.borrow_mut().errors += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    if let Some(iv) = interval {
                        due += iv;
                    }
                    continue;
                }
            }
        }
        let s = stream.as_ref().expect("connected above");
        if let Some(at) = shape.counter_at {
            counter += 1;
            let mut n = counter;
            for digit in request_buf[at..at + COUNTER_DIGITS].iter_mut().rev() {
                *digit = b'0' + (n % 10) as u8;
                n /= 10;
            }
        }
        let (outcome, r) = exchange(s, request_buf, &mut buf, shape.any_status).await;
        let ok = outcome != Outcome::Failed;
        request_buf = r;
        let latency = began.elapsed();
        {
            let mut sh = shared.borrow_mut();
            if ok {
                sh.completed += 1;
                let us = (latency.as_micros() as u64).clamp(1, MAX_LATENCY_US);
                let _ = sh.histogram.record(us);
            } else {
                sh.errors += 1;
            }
        }
        // A server that announced the close (draining, say) gets a new connection next time;
        // that is not an error.
        if outcome != Outcome::KeepAlive {
            stream = None;
            buf.clear();
        }
        if let Some(iv) = interval {
            due += iv;
        }
    }
}

/// Connects, from `source` when given (bound before connecting).
async fn connect(
    target: SocketAddr,
    source: Option<std::net::IpAddr>,
) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(target).await;
    };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(target),
        socket2::Type::STREAM,
        None,
    )?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    // A loopback connect completes at once; blocking here is brief.
    socket.connect(&target.into())?;
    Ok(TcpStream::from_std(socket.into()))
}

/// How an exchange ended.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    KeepAlive,
    /// Answered, with `Connection: close`.
    Closed,
    /// Any error, or a non-2xx status unless `any_status`.
    Failed,
}

/// Sends one request and reads its response.
async fn exchange(
    stream: &TcpStream,
    request: Vec<u8>,
    buf: &mut Vec<u8>,
    any_status: bool,
) -> (Outcome, Vec<u8>) {
    let (res, request) = stream.write_all(request).await;
    if res.is_err() {
        return (Outcome::Failed, request);
    }
    (read_response(stream, buf, any_status).await, request)
}

async fn read_response(stream: &TcpStream, buf: &mut Vec<u8>, any_status: bool) -> Outcome {
    let mut need: Option<usize> = None;
    let mut status_ok = false;
    let mut close = false;
    loop {
        if let Some(total) = need {
            if buf.len() >= total {
                buf.drain(..total);
                return match (status_ok, close) {
                    (false, _) => Outcome::Failed,
                    (true, true) => Outcome::Closed,
                    (true, false) => Outcome::KeepAlive,
                };
            }
        } else {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(buf) {
                Ok(httparse::Status::Complete(head)) => {
                    status_ok = any_status || resp.code.is_some_and(|c| (200..300).contains(&c));
                    close = resp.headers.iter().any(|h| {
                        h.name.eq_ignore_ascii_case("connection")
                            && h.value.eq_ignore_ascii_case(b"close")
                    });
                    let length = resp
                        .headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                        .and_then(|h| {
                            std::str::from_utf8(h.value)
                                .ok()?
                                .trim()
                                .parse::<usize>()
                                .ok()
                        });
                    let Some(length) = length else {
                        return Outcome::Failed;
                    };
                    need = Some(head + length);
                    continue;
                }
                Ok(httparse::Status::Partial) => {}
                Err(_) => return Outcome::Failed,
            }
        }
        // Bodies larger than the buffer are consumed as they arrive.
        if buf.len() == buf.capacity() {
            let Some(total) = need.as_mut() else {
                return Outcome::Failed;
            };
            *total -= buf.len();
            buf.clear();
        }
        let start = buf.len();
        let (res, slice) = stream.read(std::mem::take(buf).slice(start..)).await;
        *buf = slice.into_inner();
        match res {
            Ok(0) | Err(_) => return Outcome::Failed,
            Ok(_) => {}
        }
    }
}
