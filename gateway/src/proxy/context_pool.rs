//! A worker's pool of request contexts: a connection takes one when a request begins and gives
//! it back when it goes idle, so an idle keep-alive connection does not hold the context's
//! couple of KiB (nor the buffers it keeps from one request to the next).
//!
//! Owned by one worker thread (no lock); bounded like the buffer pools.

use std::{
    cell::RefCell,
    ops::{Deref, DerefMut},
    rc::Rc,
};

use tokio::time::Instant;

use super::context::{ClientCert, RequestContext};

/// Free request contexts, reset, with the buffers they keep.
pub struct ContextPool {
    // Boxed in the pool too: a context moves between the pool and its connections as a
    // pointer, never as a couple of KiB copied.
    #[allow(clippy::vec_box)]
    free: RefCell<Vec<Box<RequestContext>>>,
    keep: usize,
}

/// What a context carries over from its connection: set on every take.
pub struct ConnectionFacts {
    pub accepted: Instant,
    pub https: bool,
    pub client_cert: Option<Rc<ClientCert>>,
}

impl ContextPool {
    /// A pool that keeps at most `keep` free contexts.
    pub fn new(keep: usize) -> ContextPool {
        ContextPool {
            free: RefCell::new(Vec::new()),
            keep,
        }
    }

    /// A fresh context for a request on the connection `facts` describes.
    pub fn take(&self, facts: &ConnectionFacts) -> Box<RequestContext> {
        let mut ctx = self
            .free
            .borrow_mut()
            .pop()
            .unwrap_or_else(|| Box::new(RequestContext::new(facts.accepted)));
        ctx.timings.accepted = facts.accepted;
        ctx.https = facts.https;
        ctx.client_cert = facts.client_cert.clone();
        ctx
    }

    /// Takes `ctx` back once its request was logged.
    pub fn give(&self, mut ctx: Box<RequestContext>) {
        let mut free = self.free.borrow_mut();
        if free.len() < self.keep {
            ctx.reset();
            ctx.client_cert = None;
            free.push(ctx);
        }
    }

    #[cfg(test)]
    fn free(&self) -> usize {
        self.free.borrow().len()
    }
}

/// A connection's request context: present while it serves a request, back in the worker's
/// pool while it idles.
#[derive(Default)]
pub struct ContextSlot(Option<Box<RequestContext>>);

impl ContextSlot {
    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub fn fill(&mut self, ctx: Box<RequestContext>) {
        self.0 = Some(ctx);
    }

    pub fn take(&mut self) -> Option<Box<RequestContext>> {
        self.0.take()
    }
}

impl Deref for ContextSlot {
    type Target = RequestContext;

    fn deref(&self) -> &RequestContext {
        // The connection fills the slot before it reads a request and empties it only when it
        // waits for the next one, when nothing reads the context.
        self.0
            .as_deref()
            .expect("the request context is taken before a request is served")
    }
}

impl DerefMut for ContextSlot {
    fn deref_mut(&mut self) -> &mut RequestContext {
        self.0
            .as_deref_mut()
            .expect("the request context is taken before a request is served")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(https: bool) -> ConnectionFacts {
        ConnectionFacts {
            accepted: Instant::now(),
            https,
            client_cert: None,
        }
    }

    #[test]
    fn a_context_comes_back_reset_with_the_connection_facts_of_its_next_taker() {
        let pool = ContextPool::new(2);
        let mut ctx = pool.take(&facts(true));
        assert!(ctx.https);
        ctx.status = 502;
        ctx.log_target.extend_from_slice(b"/kept/capacity");
        ctx.timings.head_started = Some(Instant::now());
        pool.give(ctx);
        assert_eq!(pool.free(), 1);
        let ctx = pool.take(&facts(false));
        assert!(!ctx.https);
        assert_eq!(ctx.status, 0);
        assert!(!ctx.started());
        assert!(ctx.log_target.is_empty());
        assert!(ctx.log_target.capacity() > 0, "buffers keep their capacity");
    }

    #[test]
    fn the_pool_keeps_at_most_its_bound() {
        let pool = ContextPool::new(2);
        let taken: Vec<_> = (0..5).map(|_| pool.take(&facts(false))).collect();
        for ctx in taken {
            pool.give(ctx);
        }
        assert_eq!(pool.free(), 2);
    }

    #[test]
    #[should_panic(expected = "taken before a request is served")]
    fn an_empty_slot_is_a_bug_not_a_default_context() {
        let slot = ContextSlot::default();
        let _ = slot.status;
    }
}
