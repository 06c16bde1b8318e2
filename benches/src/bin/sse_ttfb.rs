//! `sse_ttfb`: time to first byte of a streamed (server-sent events) response, per target, over
//! sequential requests on one keep-alive connection per target. `cargo xtask bench-vault` runs
//! it against the backend's `/sse` stream directly and through two gateway routes.
//!
//! Every round sends one request to each target, in a freshly shuffled order (so whichever
//! target follows another, and any work a gateway does after a response ends, falls on all
//! alike), with a short idle gap between requests. Each request is written in one write; the
//! time to its first event is from just before that write to the return of the read that
//! brought the first byte of the response body (the first event: the backend sends the head
//! and the first event together, the rest of the stream in two more writes, each at least 1 ms
//! later). Also recorded: the time to the first byte of the response (its head) and to the end
//! of the stream. Every response must be 200, `text/event-stream`, and carry exactly the
//! backend's events; anything else stops the run with an error. A response whose first event
//! came less than [`HELD_BACK`] before its end was held back rather than streamed (the backend
//! spaces its first and last writes at least 2 ms apart): those are counted.
//!
//! Output: one `target` line per target with percentiles in nanoseconds, one `blocks` line per
//! target with the median time to first event in each quarter of the run, and a `summary` line.

use std::{
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context};
use clap::Parser;
use hdrhistogram::Histogram;
use portcullis_benches::backend::SSE_EVENTS;

/// The parts of the run the `blocks` line reports separately.
const BLOCKS: usize = 4;
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// A first event closer than this to the end of its stream was not streamed.
const HELD_BACK: Duration = Duration::from_micros(500);
/// Highest time the histograms track, in nanoseconds (a minute).
const MAX_NS: u64 = 60_000_000_000;
const PERCENTILES: [(f64, &str); 5] = [
    (50.0, "p50"),
    (90.0, "p90"),
    (99.0, "p99"),
    (99.9, "p99.9"),
    (100.0, "max"),
];

#[derive(Parser)]
#[command(about = "Time to first event of server-sent-event responses, per target, sequentially")]
struct Args {
    /// `NAME=HOST:PORT/PATH` (repeatable): a target, such as `plain=127.0.0.1:19580/plain/sse`.
    #[arg(long = "target", required = true)]
    targets: Vec<String>,
    /// Sent as `Authorization: Bearer KEY` to every target (the same request everywhere).
    #[arg(long)]
    bearer: Option<String>,
    /// The JSON request body (sent with Content-Length).
    #[arg(
        long,
        default_value = r#"{"model":"gpt-bench","max_tokens":64,"stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"Say hello to the bench."}]}"#
    )]
    body: String,
    /// Seconds of measured rounds (after the warm-up).
    #[arg(long, default_value_t = 20.0)]
    duration: f64,
    /// Stop after this many measured rounds even if time is left.
    #[arg(long)]
    max_rounds: Option<u64>,
    /// Rounds before measuring, not recorded.
    #[arg(long, default_value_t = 200)]
    warmup_rounds: u64,
    /// Idle microseconds between one response's end and the next request.
    #[arg(long, default_value_t = 500)]
    gap_us: u64,
    /// Pin the client to this core.
    #[arg(long)]
    pin_core: Option<usize>,
    /// Write each target's time-to-first-event distribution here as `<index>-<name>.hgrm`.
    #[arg(long)]
    hgrm_dir: Option<PathBuf>,
    /// Seed of the per-round order.
    #[arg(long, default_value_t = 0x5eed_1234_abcd_9876)]
    seed: u64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid bounds")
}

fn ns(d: Duration) -> u64 {
    (d.as_nanos() as u64).clamp(1, MAX_NS)
}

struct Target {
    name: String,
    addr: SocketAddr,
    request: Vec<u8>,
    conn: Option<Conn>,
    requests: u64,
    connections: u64,
    /// Measured responses whose first event came with (or just before) their end.
    held_back: u64,
    /// Time to the first byte of the body (the first event).
    ttfb: Histogram<u64>,
    /// Time to the first byte of the response.
    head: Histogram<u64>,
    /// Time to the end of the stream.
    total: Histogram<u64>,
    blocks: Vec<Histogram<u64>>,
}

impl Target {
    fn parse(spec: &str, bearer: Option<&str>, body: &str) -> anyhow::Result<Target> {
        let (name, rest) = spec
            .split_once('=')
            .with_context(|| format!("target {spec:?}: expected NAME=HOST:PORT/PATH"))?;
        let slash = rest
            .find('/')
            .with_context(|| format!("target {spec:?}: no path"))?;
        let addr: SocketAddr = rest[..slash]
            .parse()
            .with_context(|| format!("target {spec:?}: bad address"))?;
        let path = &rest[slash..];
        let auth = bearer.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: bench.local\r\n{auth}Content-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes();
        Ok(Target {
            name: name.to_owned(),
            addr,
            request,
            conn: None,
            requests: 0,
            connections: 0,
            held_back: 0,
            ttfb: histogram(),
            head: histogram(),
            total: histogram(),
            blocks: (0..BLOCKS).map(|_| histogram()).collect(),
        })
    }

    /// One request on the target's connection (opened if there is none).
    fn exchange(&mut self) -> anyhow::Result<Timing> {
        if self.conn.is_none() {
            self.conn = Some(Conn::open(self.addr)?);
            self.connections += 1;
        }
        let conn = self.conn.as_mut().expect("just opened");
        let result = conn.exchange(&self.request);
        match result {
            Ok((timing, keep)) => {
                if !keep {
                    self.conn = None;
                }
                self.requests += 1;
                Ok(timing)
            }
            Err(e) => Err(e.context(format!("{} ({})", self.name, self.addr))),
        }
    }

    fn record(&mut self, t: &Timing, block: usize) -> anyhow::Result<()> {
        self.ttfb.record(ns(t.first_event))?;
        self.head.record(ns(t.head))?;
        self.total.record(ns(t.total))?;
        self.blocks[block.min(BLOCKS - 1)].record(ns(t.first_event))?;
        if t.total.saturating_sub(t.first_event) < HELD_BACK {
            self.held_back += 1;
        }
        Ok(())
    }
}

struct Timing {
    head: Duration,
    first_event: Duration,
    total: Duration,
}

struct Conn {
    stream: TcpStream,
    /// Bytes read and not yet consumed.
    buf: Vec<u8>,
}

enum Framing {
    Chunked,
    Length(usize),
    Close,
}

/// Where a chunked body's decoding stands.
enum Chunk {
    Size,
    Data(usize),
    DataEnd,
    Trailer,
    Done,
}

impl Conn {
    fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let stream =
            TcpStream::connect(addr).with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(Conn {
            stream,
            buf: Vec::with_capacity(16 * 1024),
        })
    }

    /// Reads what is there into `buf`; the instant the read returned. End of stream is `None`.
    fn read_more(&mut self) -> anyhow::Result<Option<Instant>> {
        let mut chunk = [0u8; 16 * 1024];
        let n = self.stream.read(&mut chunk).context("read")?;
        let at = Instant::now();
        if n == 0 {
            return Ok(None);
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(Some(at))
    }

    /// Sends `request` and reads its response: the timings, and whether the connection stays.
    fn exchange(&mut self, request: &[u8]) -> anyhow::Result<(Timing, bool)> {
        ensure!(
            self.buf.is_empty(),
            "{} bytes arrived before the request was sent",
            self.buf.len()
        );
        let start = Instant::now();
        self.stream.write_all(request).context("write")?;
        let head_at = self
            .read_more()?
            .context("the connection closed before a response")?;
        let mut last_read = head_at;
        let (head_len, status, framing, keep, content_type) = loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&self.buf).context("bad response head")? {
                httparse::Status::Complete(n) => {
                    let header = |name: &str| {
                        resp.headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name))
                            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
                    };
                    let framing =
                        if header("transfer-encoding").is_some_and(|v| v.ends_with("chunked")) {
                            Framing::Chunked
                        } else if let Some(len) = header("content-length") {
                            Framing::Length(len.parse().context("bad content-length")?)
                        } else {
                            Framing::Close
                        };
                    let keep = !header("connection").is_some_and(|v| v.contains("close"))
                        && !matches!(framing, Framing::Close);
                    break (
                        n,
                        resp.code.unwrap_or(0),
                        framing,
                        keep,
                        header("content-type").unwrap_or_default(),
                    );
                }
                httparse::Status::Partial => {
                    last_read = self
                        .read_more()?
                        .context("the connection closed inside a response head")?;
                }
            }
        };
        let mut pos = head_len;
        let mut body = Vec::new();
        let mut first_event: Option<Instant> = None;
        let mut state = match framing {
            Framing::Chunked => Chunk::Size,
            Framing::Length(0) => Chunk::Done,
            Framing::Length(n) => Chunk::Data(n),
            Framing::Close => Chunk::Data(usize::MAX),
        };
        loop {
            // Decode what is there; then read more unless done.
            let mut need_more = false;
            while !need_more {
                match state {
                    Chunk::Done => break,
                    Chunk::Size | Chunk::Trailer => {
                        let Some(end) = find_crlf(&self.buf[pos..]) else {
                            need_more = true;
                            continue;
                        };
                        let line = &self.buf[pos..pos + end];
                        pos += end + 2;
                        state = match state {
                            Chunk::Size => {
                                let text = std::str::from_utf8(line).context("bad chunk size")?;
                                let size = usize::from_str_radix(
                                    text.split(';').next().unwrap_or("").trim(),
                                    16,
                                )
                                .with_context(|| format!("bad chunk size {text:?}"))?;
                                if size == 0 {
                                    Chunk::Trailer
                                } else {
                                    Chunk::Data(size)
                                }
                            }
                            _ if line.is_empty() => Chunk::Done,
                            _ => Chunk::Trailer,
                        };
                    }
                    Chunk::Data(left) => {
                        let take = (self.buf.len() - pos).min(left);
                        if take == 0 {
                            need_more = true;
                            continue;
                        }
                        first_event.get_or_insert(last_read);
                        body.extend_from_slice(&self.buf[pos..pos + take]);
                        pos += take;
                        state = match (left - take, &framing) {
                            (0, Framing::Chunked) => Chunk::DataEnd,
                            (0, _) => Chunk::Done,
                            (n, _) => Chunk::Data(n),
                        };
                    }
                    Chunk::DataEnd => {
                        if self.buf.len() - pos < 2 {
                            need_more = true;
                            continue;
                        }
                        ensure!(&self.buf[pos..pos + 2] == b"\r\n", "bad chunk end");
                        pos += 2;
                        state = Chunk::Size;
                    }
                }
            }
            if matches!(state, Chunk::Done) {
                break;
            }
            match self.read_more()? {
                Some(at) => last_read = at,
                None if matches!(framing, Framing::Close) => break,
                None => bail!("the connection closed inside a response body"),
            }
        }
        let end = last_read;
        self.buf.drain(..pos);
        let text = String::from_utf8_lossy(&body);
        ensure!(status == 200, "status {status}: {text}");
        ensure!(
            content_type.starts_with("text/event-stream"),
            "content-type {content_type:?}, not an event stream: {text}"
        );
        let expected = SSE_EVENTS.concat();
        ensure!(
            text == expected,
            "the stream differs from the backend's: {text:?}"
        );
        let first_event = first_event.context("an empty body")?;
        Ok((
            Timing {
                head: head_at - start,
                first_event: first_event - start,
                total: end - start,
            },
            keep,
        ))
    }
}

fn find_crlf(b: &[u8]) -> Option<usize> {
    b.windows(2).position(|w| w == b"\r\n")
}

/// xorshift64*: the per-round order, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn shuffle(&mut self, v: &mut [usize]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

fn pause(gap: Duration) {
    if !gap.is_zero() {
        std::thread::sleep(gap);
    }
}

fn percentile(h: &Histogram<u64>, p: f64) -> u64 {
    if p >= 100.0 {
        h.max()
    } else {
        h.value_at_quantile(p / 100.0)
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if let Some(core) = a.pin_core {
        let ids = core_affinity::get_core_ids().unwrap_or_default();
        let id = ids
            .into_iter()
            .find(|c| c.id == core)
            .with_context(|| format!("no core {core}"))?;
        ensure!(
            core_affinity::set_for_current(id),
            "cannot pin to core {core}"
        );
    }
    let mut targets: Vec<Target> = a
        .targets
        .iter()
        .map(|t| Target::parse(t, a.bearer.as_deref(), &a.body))
        .collect::<anyhow::Result<_>>()?;
    let gap = Duration::from_micros(a.gap_us);
    let mut rng = Rng(a.seed | 1);
    let mut order: Vec<usize> = (0..targets.len()).collect();
    for _ in 0..a.warmup_rounds {
        rng.shuffle(&mut order);
        for &i in &order {
            targets[i].exchange()?;
            pause(gap);
        }
    }
    let warmup_requests: Vec<u64> = targets.iter().map(|t| t.requests).collect();
    let duration = Duration::from_secs_f64(a.duration);
    let start = Instant::now();
    let mut rounds = 0u64;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= duration || a.max_rounds.is_some_and(|m| rounds >= m) {
            break;
        }
        let block = match a.max_rounds {
            Some(m) => (rounds as usize * BLOCKS) / m.max(1) as usize,
            None => (elapsed.as_secs_f64() / duration.as_secs_f64() * BLOCKS as f64) as usize,
        }
        .min(BLOCKS - 1);
        rng.shuffle(&mut order);
        for &i in &order {
            let t = targets[i].exchange()?;
            targets[i].record(&t, block)?;
            pause(gap);
        }
        rounds += 1;
    }
    let elapsed = start.elapsed();
    for (i, t) in targets.iter().enumerate() {
        let mut line = format!(
            "target index={i} requests={} warmup_requests={} all_requests={} connections={} held_back={}",
            t.ttfb.len(),
            warmup_requests[i],
            t.requests,
            t.connections,
            t.held_back
        );
        for (kind, h) in [("ttfb", &t.ttfb), ("head", &t.head), ("total", &t.total)] {
            for (p, name) in PERCENTILES {
                let _ = write!(line, " {kind}_{name}_ns={}", percentile(h, p));
            }
            let _ = write!(line, " {kind}_mean_ns={:.0}", h.mean());
        }
        println!("{line}");
        let blocks: Vec<String> = t
            .blocks
            .iter()
            .map(|b| {
                if b.is_empty() {
                    "0".into()
                } else {
                    b.value_at_quantile(0.5).to_string()
                }
            })
            .collect();
        println!("blocks index={i} ttfb_p50_ns={}", blocks.join(","));
        if let Some(dir) = &a.hgrm_dir {
            std::fs::create_dir_all(dir)?;
            // In microseconds, as the loadgen's files (HdrHistogram's tools read them as ms).
            let mut us = Histogram::<u64>::new_with_bounds(1, MAX_NS / 1000, 3)?;
            for v in t.ttfb.iter_recorded() {
                us.record_n((v.value_iterated_to() / 1000).max(1), v.count_at_value())?;
            }
            let slug: String = t
                .name
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .collect();
            portcullis_benches::loadgen::write_hgrm(&us, &dir.join(format!("{i}-{slug}.hgrm")))?;
        }
    }
    println!(
        "summary rounds={rounds} warmup_rounds={} elapsed_s={:.3}",
        a.warmup_rounds,
        elapsed.as_secs_f64()
    );
    Ok(())
}
