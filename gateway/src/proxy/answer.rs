//! The gateway's own answers: what a phase that ends a request early hands to the connection's
//! one exit, which writes it, and which the log phase records.

use crate::auth::AuthError;

/// One of the gateway's own answers.
#[derive(Debug, Clone, Copy)]
pub enum Answer {
    /// An error with a short plain-text explanation. `close` means the request's framing cannot
    /// be trusted or its body cannot be skipped, so the connection ends after the answer.
    Error {
        status: u16,
        detail: &'static str,
        close: bool,
    },
    /// The `respond` action of the route with this index.
    Static { route: usize },
    /// The route's access policy refused the request (401 with WWW-Authenticate, or 403).
    Denied(AuthError),
    /// A plaintext listener's 308 to the same URL over HTTPS (the location is in the context).
    RedirectHttps,
    /// The vault refused the request on a route of a provider of this kind: the refusal's
    /// status, with a JSON body in the provider's error shape.
    Vault {
        kind: crate::config::ProviderKind,
        refusal: crate::vault::provider::VaultRefusal,
    },
    /// A vault self-service answer: this status, the JSON body in the context.
    SelfService { status: u16 },
    /// An answer from the cache: the entry is in the context.
    Cached,
    /// An allowed CORS preflight: 204, its fields in the context's response fields.
    Preflight,
    /// A rate limit or quota of route `route` refused the request: 429, retry after that many
    /// seconds.
    TooMany {
        route: usize,
        policy: TrafficPolicy,
        retry_after_secs: u64,
        /// What the refusing policy counted the request as.
        subject: crate::limits::SubjectLabel,
    },
}

/// Which of a route's traffic policies refused a request.
#[derive(Debug, Clone, Copy)]
pub enum TrafficPolicy {
    /// One of the route's pre-auth limits.
    PreAuthLimit(usize),
    Limit(usize),
    Quota(usize),
}

impl Answer {
    /// An error answer after which the connection stays open when the body can be skipped.
    pub const fn error(status: u16, detail: &'static str) -> Answer {
        Answer::Error {
            status,
            detail,
            close: false,
        }
    }

    /// An error answer after which the connection closes.
    pub const fn error_and_close(status: u16, detail: &'static str) -> Answer {
        Answer::Error {
            status,
            detail,
            close: true,
        }
    }
}
