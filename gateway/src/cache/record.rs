//! A response recorded for the cache while it streams to the client: the stored head is
//! written once from the upstream's, the body (transfer coding removed) is copied as it
//! passes, and the entry is stored only when the body's framing completed; a body cut short
//! or larger than `max_entry_bytes` is dropped, never stored in part.

use std::{mem::MaybeUninit, sync::atomic::Ordering, time::Instant};

use bytes::BytesMut;
use httparse::Header;

use super::{policy::StorePlan, Entry, ResponseCache};

/// The most request fields read back when storing (the request head limit allows no more).
const MAX_REQUEST_FIELDS: usize = 256;

/// A response on its way into the cache.
#[derive(Debug)]
pub struct Recorder {
    /// The request's primary key; the resource is its first line.
    primary: Box<[u8]>,
    /// The entry's key: the primary key and the variant the response's `Vary` selects.
    key: Box<[u8]>,
    status: u16,
    head: Box<[u8]>,
    plan: StorePlan,
    body: BytesMut,
    limit: usize,
    too_large: bool,
}

impl Recorder {
    /// Starts recording a response of `status` whose stored head is `head`, to the request
    /// whose head (as received) is `request_head`; `None` when its declared length already
    /// passes `limit`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        primary: &[u8],
        request_head: &[u8],
        status: u16,
        head: Box<[u8]>,
        plan: StorePlan,
        limit: usize,
        declared: Option<u64>,
    ) -> Option<Recorder> {
        if declared.is_some_and(|n| n > limit as u64) {
            return None;
        }
        let capacity = declared.map_or(0, |n| n as usize);
        let mut key = primary.to_vec();
        with_request_fields(request_head, |fields| {
            super::key::variant(&mut key, &plan.vary, fields)
        });
        Some(Recorder {
            primary: primary.into(),
            key: key.into(),
            status,
            head,
            plan,
            body: BytesMut::with_capacity(capacity),
            limit,
            too_large: false,
        })
    }

    /// Takes the next bytes of the body.
    pub fn feed(&mut self, data: &[u8]) {
        if self.too_large {
            return;
        }
        if self.body.len() + data.len() > self.limit {
            self.too_large = true;
            self.body = BytesMut::new();
            return;
        }
        self.body.extend_from_slice(data);
    }

    /// The body arrived whole: stores the entry.
    pub fn finish(self, cache: &ResponseCache) {
        if self.too_large {
            cache.counters.too_large.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let url_len = self
            .primary
            .iter()
            .position(|b| *b == b'\n')
            .unwrap_or(self.primary.len());
        let plan = self.plan;
        let entry = Entry {
            status: self.status,
            head: self.head,
            body: self.body.freeze(),
            stored_at: Instant::now(),
            initial_age: plan.initial_age,
            fresh_for: plan.fresh_for,
            stale_while_revalidate: plan.stale_while_revalidate,
            stale_if_error: plan.stale_if_error,
            must_revalidate: plan.must_revalidate,
            etag: plan.etag,
            last_modified: plan.last_modified,
            url: self.primary[..url_len].into(),
            tags: plan.tags,
        };
        cache.store(&self.primary, self.key, plan.vary, entry);
    }

    /// The body was cut short: nothing is stored.
    pub fn abandon(self, cache: &ResponseCache) {
        cache.counters.incomplete.fetch_add(1, Ordering::Relaxed);
    }
}

/// Runs `f` with the fields of `head`, a request head already decoded once (so valid).
pub fn with_request_fields<R>(head: &[u8], f: impl FnOnce(&[Header]) -> R) -> R {
    let mut fields = [const { MaybeUninit::uninit() }; MAX_REQUEST_FIELDS];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, &mut fields) {
        Ok(_) => f(req.headers),
        Err(_) => f(&[]),
    }
}
