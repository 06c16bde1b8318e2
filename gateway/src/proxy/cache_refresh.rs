//! `stale-while-revalidate`: the first request to find an entry stale within that window is
//! answered from it at once, and the entry is refreshed upstream in the background, on the
//! worker, with the upstream head the request phases wrote for that request (and the entry's
//! validators): a 304 makes it fresh again, a storable answer replaces it (read whole, within
//! `max_entry_bytes`), anything else leaves it to expire. Nothing waits for the refresh.

use std::{mem::MaybeUninit, rc::Rc, sync::Arc};

use tokio::time::Instant;
use tracing::debug;

use super::{
    answer::Answer,
    connection::{Connection, Next},
    snapshot::UPSTREAM_BUFFER_BYTES,
    worker::Generation,
};
use crate::{
    cache::{Entry, FillGuard},
    http::{
        chunked::ChunkedDecoder,
        response::{parse_response, MAX_RESPONSE_HEADERS, MAX_RESPONSE_HEAD_BYTES},
        BodyFraming,
    },
    io::{read_before, write_before, Transport},
};

/// What a background refresh needs of the request that started it.
struct Refresh {
    generation: Rc<Generation>,
    group: usize,
    server: usize,
    /// The upstream head, with the entry's validators.
    head: Vec<u8>,
    request_head: Vec<u8>,
    route: usize,
    credentials: bool,
    keyed_by_consumer: bool,
    key: Vec<u8>,
    primary_len: usize,
    stale: Arc<Entry>,
    /// Held until the refresh ends: meanwhile others are answered stale, not sent upstream.
    _fill: FillGuard,
}

impl<C: Transport> Connection<'_, C> {
    /// Answers from the stale entry, then refreshes it in the background when this request
    /// holds its fill (`None`: it does not, go on as usual).
    pub(super) async fn serve_stale_and_refresh(
        &mut self,
        group: usize,
        server: usize,
        request_deadline: Instant,
    ) -> Option<Next> {
        let ctx = &mut *self.ctx;
        let c = ctx.cache.as_mut()?;
        if c.status != crate::cache::CacheStatus::Stale {
            return None;
        }
        let fill = c.fill.take()?;
        let stale = c.entry.clone()?;
        let route = ctx.route?;
        let mut head = std::mem::take(&mut self.out);
        // The client's own conditionals and range are not the refresh's: a 304 or 206 to
        // them would say nothing of the entry.
        remove_fields(&mut head, &CLIENT_CONDITIONALS);
        add_validators(&mut head, &stale);
        let refresh = Refresh {
            generation: self.generation.clone(),
            group,
            server,
            head,
            request_head: self.inbuf[..ctx.facts.head_len.min(self.inbuf.len())].to_vec(),
            route,
            credentials: c.credentials,
            keyed_by_consumer: c.keyed_by_consumer,
            key: c.key.clone(),
            primary_len: c.primary_len,
            stale,
            _fill: fill,
        };
        let next = self.answer(Answer::Cached, request_deadline).await;
        tokio_uring::spawn(refresh.run());
        Some(next)
    }
}

/// Request fields that make an upstream answer 304, 206 or 412 for the client's reasons.
const CLIENT_CONDITIONALS: [&[u8]; 6] = [
    b"if-none-match",
    b"if-modified-since",
    b"if-match",
    b"if-unmodified-since",
    b"if-range",
    b"range",
];

/// Removes the field lines named `names` (lower case) from `head`, a whole request head the
/// gateway wrote.
fn remove_fields(head: &mut Vec<u8>, names: &[&[u8]]) {
    let mut out = Vec::with_capacity(head.len());
    for (i, line) in head.split_inclusive(|b| *b == b'\n').enumerate() {
        let name = line.split(|b| *b == b':').next().unwrap_or_default();
        if i > 0 && names.iter().any(|n| name.eq_ignore_ascii_case(n)) {
            continue;
        }
        out.extend_from_slice(line);
    }
    *head = out;
}

/// Adds the entry's validators at the end of `head` (a whole request head).
pub(super) fn add_validators(head: &mut Vec<u8>, entry: &Entry) {
    if !entry.has_validator() || !head.ends_with(b"\r\n\r\n") {
        return;
    }
    head.truncate(head.len() - 2);
    // Validators were checked field values when stored.
    if let Some(etag) = &entry.etag {
        head.extend_from_slice(b"if-none-match: ");
        head.extend_from_slice(etag);
        head.extend_from_slice(b"\r\n");
    }
    if let Some(modified) = &entry.last_modified {
        head.extend_from_slice(b"if-modified-since: ");
        head.extend_from_slice(modified);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"\r\n");
}

impl Refresh {
    async fn run(self) {
        let snapshot = self.generation.snapshot.clone();
        let cache = snapshot.cache.clone();
        let group = &self.generation.upstreams[self.group];
        let deadline = || Instant::now() + group.read_timeout;
        let Ok(conn) = group.checkout(self.server).await else {
            return;
        };
        let len = self.head.len();
        let (res, _) = write_before(&conn.transport, self.head, 0..len, deadline()).await;
        if res.is_err() {
            return;
        }
        let mut buf = Vec::with_capacity(UPSTREAM_BUFFER_BYTES);
        // The response head (interim ones skipped).
        let (head_len, framing, keep_alive, mut recorder) = loop {
            let mut fields = [const { MaybeUninit::uninit() }; MAX_RESPONSE_HEADERS];
            let resp = match parse_response(&buf, &mut fields, false) {
                Ok(Some(r)) => r,
                Ok(None) => {
                    if buf.len() == buf.capacity() {
                        if buf.len() > MAX_RESPONSE_HEAD_BYTES {
                            return;
                        }
                        buf.reserve(UPSTREAM_BUFFER_BYTES);
                    }
                    let (res, b) = read_before(&conn.transport, buf, deadline()).await;
                    buf = b;
                    if !matches!(res, Ok(n) if n > 0) {
                        return;
                    }
                    continue;
                }
                Err(_) => return,
            };
            if resp.is_interim() {
                let n = resp.head_len;
                buf.drain(..n);
                continue;
            }
            if resp.status == 304 {
                cache.replace(&self.key, Arc::new(self.stale.refreshed(resp.headers)));
                cache
                    .counters
                    .revalidated
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let clean = resp.keep_alive && buf.len() == resp.head_len;
                if clean {
                    group.release(conn);
                }
                return;
            }
            let Some(recorder) = super::cache_store::start_recording(
                &snapshot,
                &cache,
                self.route,
                (self.credentials, self.keyed_by_consumer),
                &self.key[..self.primary_len],
                &self.request_head,
                &resp,
            ) else {
                return;
            };
            break (resp.head_len, resp.body, resp.keep_alive, recorder);
        };
        buf.drain(..head_len);
        let mut decoder = ChunkedDecoder::new();
        let mut remaining = match framing {
            BodyFraming::Length(n) => n,
            BodyFraming::None => 0,
            _ => u64::MAX,
        };
        loop {
            // Done, and whether nothing followed the body (the connection may serve again).
            let (done, clean) = match framing {
                BodyFraming::None => (true, buf.is_empty()),
                BodyFraming::Length(_) => {
                    let take = buf
                        .len()
                        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    recorder.feed(&buf[..take]);
                    remaining -= take as u64;
                    (remaining == 0, take == buf.len())
                }
                BodyFraming::Chunked => match decoder.decode(&buf, |r| recorder.feed(&buf[r])) {
                    Ok(p) => (p.done, p.consumed == buf.len()),
                    Err(_) => return,
                },
                BodyFraming::UntilClose => {
                    recorder.feed(&buf);
                    (false, false)
                }
            };
            if done {
                recorder.finish(&cache);
                if keep_alive && clean {
                    group.release(conn);
                }
                return;
            }
            buf.clear();
            let (res, b) = read_before(&conn.transport, buf, deadline()).await;
            buf = b;
            match res {
                Ok(0) if framing == BodyFraming::UntilClose && !conn.transport.truncated() => {
                    recorder.finish(&cache);
                    return;
                }
                Ok(n) if n > 0 => {}
                _ => {
                    debug!("background refresh of a cache entry cut short");
                    recorder.abandon(&cache);
                    return;
                }
            }
        }
    }
}
