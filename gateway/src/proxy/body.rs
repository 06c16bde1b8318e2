//! Moving message bodies between connections with bounded memory: a body of any size passes
//! through one fixed buffer, and only the bytes that belong to the body are forwarded, so a
//! pipelined request or stray upstream bytes never reach the wrong peer.

use std::time::Duration;

use tokio::time::Instant;

use crate::{
    http::{
        chunked::{ChunkedDecoder, ChunkedError},
        BodyFraming,
    },
    io::{read_before, write_before, write_pair_before, IoFailure, Transport},
};

/// Why a request body could not be moved.
#[derive(Debug)]
pub enum RequestBodyError {
    /// The client went away, stalled past `body_timeout`, or the request ran past
    /// `request_timeout`.
    Client(IoFailure),
    /// Writing to the upstream failed.
    Upstream(IoFailure),
    /// The chunked framing is invalid (answered 400).
    Framing(ChunkedError),
    /// The body is larger than the route allows (answered 413).
    TooLarge,
}

/// Why a response body could not be moved.
#[derive(Debug)]
pub enum ResponseBodyError {
    Upstream(IoFailure),
    /// The upstream ended the body early or broke its chunked framing.
    UpstreamFraming,
    /// The upstream broke its chunked framing before anything was sent to the client, so the
    /// client can still be told (502).
    UpstreamFramingBeforeHead,
    Client(IoFailure),
}

/// Deadlines for reading a request body.
#[derive(Clone, Copy)]
pub struct BodyDeadlines {
    /// Longest idle gap between two reads.
    pub idle: Duration,
    /// The whole request must have arrived by then.
    pub request: Instant,
    /// Longest wait for one upstream write.
    pub upstream_write: Duration,
}

impl BodyDeadlines {
    fn next_read(&self) -> Instant {
        (Instant::now() + self.idle).min(self.request)
    }
}

/// Moves the request body that starts at `buf[start..]` from `client` to `upstream`, or
/// discards it when `upstream` is `None`. Returns the offset in `buf` where the bytes after the
/// body begin.
pub async fn relay_request_body<C: Transport, U: Transport>(
    client: &C,
    upstream: Option<&U>,
    mut buf: Vec<u8>,
    start: usize,
    framing: BodyFraming,
    limit: Option<u64>,
    deadlines: BodyDeadlines,
) -> (Result<usize, RequestBodyError>, Vec<u8>) {
    let mut decoder = ChunkedDecoder::new();
    let mut remaining = match framing {
        BodyFraming::Length(n) => n,
        BodyFraming::Chunked => u64::MAX,
        BodyFraming::None | BodyFraming::UntilClose => return (Ok(start), buf),
    };
    let mut pos = start;
    loop {
        // Forward what the buffer holds of the body.
        let available = &buf[pos..];
        let (take, done) = match framing {
            BodyFraming::Chunked => match decoder.decode(available, |_| {}) {
                Ok(p) => (p.consumed, p.done),
                Err(e) => return (Err(RequestBodyError::Framing(e)), buf),
            },
            _ => {
                let take = available
                    .len()
                    .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                remaining -= take as u64;
                (take, remaining == 0)
            }
        };
        if framing == BodyFraming::Chunked && limit.is_some_and(|l| decoder.data_bytes() > l) {
            return (Err(RequestBodyError::TooLarge), buf);
        }
        if let Some(up) = upstream {
            let deadline = Instant::now() + deadlines.upstream_write;
            let (res, b) = write_before(up, buf, pos..pos + take, deadline).await;
            buf = b;
            if let Err(e) = res {
                return (Err(RequestBodyError::Upstream(e)), buf);
            }
        }
        pos += take;
        if done {
            return (Ok(pos), buf);
        }
        // Everything after the head was body: reuse that part for the next read. The head
        // stays, for what the response phases read of the request (templates, the cache).
        buf.truncate(start);
        pos = start;
        let (res, b) = read_before(client, buf, deadlines.next_read()).await;
        buf = b;
        match res {
            Ok(0) => return (Err(RequestBodyError::Client(IoFailure::Closed)), buf),
            Ok(_) => {}
            Err(e) => return (Err(RequestBodyError::Client(e)), buf),
        }
    }
}

/// How long, and how far, a response is read on for its usage after its client left.
const READ_ON_FOR_USAGE: Duration = Duration::from_secs(15);
const READ_ON_FOR_USAGE_BYTES: usize = 8 * 1024 * 1024;

/// Reads the rest of a response nobody receives any more, into `meter` only, until it ends
/// (then the meter's usage is final) or [`READ_ON_FOR_USAGE`] or its byte bound passes.
async fn read_on_for_usage<U: Transport>(
    upstream: &U,
    mut buf: Vec<u8>,
    framing: BodyFraming,
    decoder: &mut ChunkedDecoder,
    mut remaining: u64,
    meter: &mut crate::vault::usage::UsageMeter,
    read_timeout: Duration,
) -> Vec<u8> {
    let deadline = Instant::now() + READ_ON_FOR_USAGE;
    let mut read = 0;
    loop {
        buf.clear();
        if read > READ_ON_FOR_USAGE_BYTES || Instant::now() >= deadline {
            return buf;
        }
        let until = (Instant::now() + read_timeout).min(deadline);
        let (res, b) = read_before(upstream, buf, until).await;
        buf = b;
        match res {
            Ok(0) => {
                if framing == BodyFraming::UntilClose && !upstream.truncated() {
                    meter.mark_complete();
                }
                return buf;
            }
            Ok(n) => read += n,
            Err(_) => return buf,
        }
        match framing {
            BodyFraming::Chunked => match decoder.decode(&buf, |r| meter.feed(&buf[r])) {
                Ok(p) if p.done => {
                    meter.mark_complete();
                    return buf;
                }
                Ok(_) => {}
                Err(_) => return buf,
            },
            _ => {
                let take = buf
                    .len()
                    .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                meter.feed(&buf[..take]);
                remaining -= take as u64;
                if remaining == 0 {
                    meter.mark_complete();
                    return buf;
                }
            }
        }
    }
}

/// Appends what `fill` writes to `out` as one chunk (`chunked`), or as it is; nothing when it
/// writes nothing (an empty chunk would end the body).
fn frame_filtered(out: &mut Vec<u8>, chunked: bool, fill: impl FnOnce(&mut Vec<u8>)) {
    // Eight hex digits, leading zeros allowed (RFC 9112 §7.1), written once the size is known.
    const SIZE: usize = b"00000000\r\n".len();
    let mark = out.len();
    if chunked {
        out.extend_from_slice(b"00000000\r\n");
    }
    fill(out);
    let data = out.len() - mark - if chunked { SIZE } else { 0 };
    if data == 0 {
        out.truncate(mark);
    } else if chunked {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        for (i, digit) in out[mark..mark + 8].iter_mut().rev().enumerate() {
            *digit = HEX[(data >> (4 * i)) & 0xf];
        }
        out.extend_from_slice(b"\r\n");
    }
}

/// How a response body is relayed.
#[derive(Clone, Copy, Debug)]
pub struct ResponseRelay {
    pub framing: BodyFraming,
    /// Send a chunked body without its framing (for HTTP/1.0 clients, which see its end by the
    /// connection closing).
    pub dechunk: bool,
    /// Longest wait for each upstream read.
    pub read_timeout: Duration,
    /// Longest wait for each client write.
    pub write_timeout: Duration,
}

/// Sends the response `head`, then moves the response body that starts at `buf[start..]` from
/// `upstream` to `client`; the head leaves together with the first part of the body. Returns
/// true when the upstream sent nothing beyond the body, so its connection may be reused, and
/// hands back both buffers as `(result, buf, head)`. Adds the bytes written to the client to
/// `sent`. `meter`, when given, sees the body's bytes (transfer coding removed) as they pass.
/// `filter`, when given, withholds the usage event the gateway asked for from a chunked body:
/// what it lets through is framed anew (in the head buffer, once the head is out), since the
/// upstream's chunks no longer fit.
#[allow(clippy::too_many_arguments)]
pub async fn relay_response_body<U: Transport, C: Transport>(
    upstream: &U,
    client: &C,
    mut buf: Vec<u8>,
    start: usize,
    mut head: Vec<u8>,
    relay: ResponseRelay,
    sent: &mut u64,
    mut meter: Option<&mut crate::vault::usage::UsageMeter>,
    mut filter: Option<&mut crate::vault::usage_event::UsageEventFilter>,
    mut recorder: Option<&mut crate::cache::record::Recorder>,
) -> (Result<bool, ResponseBodyError>, Vec<u8>, Vec<u8>) {
    let ResponseRelay {
        framing,
        dechunk,
        read_timeout,
        write_timeout,
    } = relay;
    let mut decoder = ChunkedDecoder::new();
    let mut remaining = match framing {
        BodyFraming::Length(n) => n,
        BodyFraming::Chunked | BodyFraming::UntilClose => u64::MAX,
        BodyFraming::None => {
            let len = head.len();
            let (res, h) = write_before(client, head, 0..len, Instant::now() + write_timeout).await;
            if res.is_ok() {
                *sent += len as u64;
            }
            return (
                res.map(|_| buf.len() == start)
                    .map_err(ResponseBodyError::Client),
                buf,
                h,
            );
        }
    };
    let mut head_len = head.len();
    let mut pos = start;
    // A body of declared length keeps it: what the filter withholds would break it. (Streams
    // come chunked, or framed by the close.)
    if matches!(framing, BodyFraming::Length(_)) {
        filter = None;
    }
    loop {
        let len = buf.len();
        let (send_end, take, done) = match framing {
            BodyFraming::Chunked => {
                let mut data_end = pos;
                let progress = if dechunk || filter.is_some() {
                    // Compact the data runs to the front of the unread part, in place.
                    let base = pos;
                    let mut runs = Vec::new();
                    let r = decoder.decode(&buf[base..len], |range| runs.push(range));
                    for range in runs {
                        buf.copy_within(base + range.start..base + range.end, data_end);
                        data_end += range.end - range.start;
                    }
                    if let Some(m) = meter.as_deref_mut() {
                        m.feed(&buf[base..data_end]);
                    }
                    if let Some(r) = recorder.as_deref_mut() {
                        r.feed(&buf[base..data_end]);
                    }
                    r
                } else {
                    let data = &buf[pos..len];
                    match (meter.as_deref_mut(), recorder.as_deref_mut()) {
                        (None, None) => decoder.decode(data, |_| {}),
                        (m, r) => {
                            let (mut m, mut r) = (m, r);
                            decoder.decode(data, |range| {
                                if let Some(m) = m.as_deref_mut() {
                                    m.feed(&data[range.clone()]);
                                }
                                if let Some(r) = r.as_deref_mut() {
                                    r.feed(&data[range]);
                                }
                            })
                        }
                    }
                };
                if let (Some(f), Ok(p)) = (filter.as_deref_mut(), &progress) {
                    // What passes goes out after the head, in chunks of its own.
                    head.truncate(head_len);
                    frame_filtered(&mut head, !dechunk, |out| f.feed(&buf[pos..data_end], out));
                    if p.done {
                        frame_filtered(&mut head, !dechunk, |out| f.finish(out));
                        if !dechunk {
                            head.extend_from_slice(b"0\r\n\r\n");
                        }
                    }
                    head_len = head.len();
                    data_end = pos;
                }
                match progress {
                    Ok(p) => (
                        if dechunk || filter.is_some() {
                            data_end
                        } else {
                            pos + p.consumed
                        },
                        p.consumed,
                        p.done,
                    ),
                    Err(_) if head_len > 0 => {
                        return (Err(ResponseBodyError::UpstreamFramingBeforeHead), buf, head)
                    }
                    Err(_) => return (Err(ResponseBodyError::UpstreamFraming), buf, head),
                }
            }
            _ => {
                let take = (len - pos).min(usize::try_from(remaining).unwrap_or(usize::MAX));
                remaining -= take as u64;
                if let Some(m) = meter.as_deref_mut() {
                    m.feed(&buf[pos..pos + take]);
                }
                if let Some(r) = recorder.as_deref_mut() {
                    r.feed(&buf[pos..pos + take]);
                }
                match filter.as_deref_mut() {
                    Some(f) => {
                        head.truncate(head_len);
                        f.feed(&buf[pos..pos + take], &mut head);
                        head_len = head.len();
                        (pos, take, remaining == 0)
                    }
                    None => (pos + take, take, remaining == 0),
                }
            }
        };
        let deadline = Instant::now() + write_timeout;
        let (res, h, b) =
            write_pair_before(client, head, 0..head_len, buf, pos..send_end, deadline).await;
        (head, buf) = (h, b);
        if let Err(e) = res {
            if let (Some(m), false) = (meter.as_deref_mut(), done) {
                // The client left mid-response, but the provider bills the whole answer:
                // read on (bounded) for the usage it reports at the end.
                buf = read_on_for_usage(
                    upstream,
                    buf,
                    framing,
                    &mut decoder,
                    remaining,
                    m,
                    read_timeout,
                )
                .await;
            }
            return (Err(ResponseBodyError::Client(e)), buf, head);
        }
        *sent += (head_len + send_end - pos) as u64;
        head_len = 0;
        if done {
            return (Ok(pos + take == buf.len()), buf, head);
        }
        buf.clear();
        pos = 0;
        head.clear();
        let (res, b) = read_before(upstream, buf, Instant::now() + read_timeout).await;
        buf = b;
        match res {
            // Over TLS a body framed by the close is whole only if the close was said
            // (close_notify): anyone on the path can cut the TCP stream.
            Ok(0) if framing == BodyFraming::UntilClose && !upstream.truncated() => {
                if let Some(f) = filter.as_deref_mut() {
                    // What the filter still holds ends the body.
                    f.finish(&mut head);
                    let len = head.len();
                    let (res, h) =
                        write_before(client, head, 0..len, Instant::now() + write_timeout).await;
                    head = h;
                    if let Err(e) = res {
                        return (Err(ResponseBodyError::Client(e)), buf, head);
                    }
                    *sent += len as u64;
                }
                return (Ok(false), buf, head);
            }
            Ok(0) => return (Err(ResponseBodyError::UpstreamFraming), buf, head),
            Ok(_) => {}
            Err(e) => return (Err(ResponseBodyError::Upstream(e)), buf, head),
        }
    }
}
