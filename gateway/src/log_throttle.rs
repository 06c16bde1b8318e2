//! Log lines that clients or upstreams can cause in bulk (an upstream outage fails every
//! request) pass through a per-kind allowance, so they cannot flood the log or keep workers
//! busy formatting; what was held back is reported as a count. Also: URLs that may carry
//! credentials are logged without them.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::sys::monotonic_ns;

/// Lines of one kind let through per second; the rest are counted.
pub const LINES_PER_SECOND: u32 = 20;

/// The kinds of line that are throttled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Noisy {
    /// An upstream failed a request (connect, timeout, invalid response).
    Upstream,
    /// A listener could not accept (such as EMFILE).
    Accept,
    /// A bounded state map refused a new key.
    StateFull,
    /// The access log could not be written.
    AccessLog,
}

impl Noisy {
    pub const ALL: [Noisy; 4] = [
        Noisy::Upstream,
        Noisy::Accept,
        Noisy::StateFull,
        Noisy::AccessLog,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Noisy::Upstream => "upstream failure",
            Noisy::Accept => "accept failure",
            Noisy::StateFull => "state full",
            Noisy::AccessLog => "access log write failure",
        }
    }
}

struct Allowance {
    /// The second (on the monotonic clock) the count belongs to.
    second: AtomicU64,
    lines: AtomicU32,
    suppressed: AtomicU64,
}

static ALLOWANCES: [Allowance; Noisy::ALL.len()] = [const {
    Allowance {
        second: AtomicU64::new(0),
        lines: AtomicU32::new(0),
        suppressed: AtomicU64::new(0),
    }
}; Noisy::ALL.len()];

/// Whether a line of `kind` may be written now; false counts it as suppressed.
pub fn allow(kind: Noisy) -> bool {
    let a = &ALLOWANCES[kind as usize];
    let now = monotonic_ns() / 1_000_000_000;
    let second = a.second.load(Ordering::Relaxed);
    if second != now
        && a.second
            .compare_exchange(second, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        a.lines.store(0, Ordering::Relaxed);
    }
    if a.lines.fetch_add(1, Ordering::Relaxed) < LINES_PER_SECOND {
        true
    } else {
        a.suppressed.fetch_add(1, Ordering::Relaxed);
        false
    }
}

/// Lines of `kind` suppressed since the last call.
pub fn take_suppressed(kind: Noisy) -> u64 {
    ALLOWANCES[kind as usize]
        .suppressed
        .swap(0, Ordering::Relaxed)
}

/// `url` without userinfo, query or fragment, for logs: `https://user:secret@idp/jwks?k=v`
/// becomes `https://idp/jwks`. Text that is not a URL is replaced entirely.
pub fn redacted_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.set_query(None);
            u.set_fragment(None);
            u.to_string()
        }
        Err(_) => "(unparsable URL)".to_owned(),
    }
}

/// Logs at warn level when `kind` is allowed now.
#[macro_export]
macro_rules! throttled_warn {
    ($kind:expr, $($arg:tt)+) => {
        if $crate::log_throttle::allow($kind) {
            tracing::warn!($($arg)+);
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowance_then_count() {
        let allowed = (0..LINES_PER_SECOND * 3)
            .filter(|_| allow(Noisy::Accept))
            .count() as u32;
        // The second may turn during the loop: then a second allowance is given.
        assert!((LINES_PER_SECOND..=LINES_PER_SECOND * 2).contains(&allowed));
        assert_eq!(
            take_suppressed(Noisy::Accept),
            u64::from(LINES_PER_SECOND * 3 - allowed)
        );
        assert_eq!(take_suppressed(Noisy::Accept), 0);
    }

    #[test]
    fn credentials_never_reach_the_log() {
        assert_eq!(
            redacted_url("https://user:s3cret@idp.example/jwks.json?key=abc#x"),
            "https://idp.example/jwks.json"
        );
        assert_eq!(
            redacted_url("redis://:hunter2@10.0.0.5:6379/0"),
            "redis://10.0.0.5:6379/0"
        );
        assert_eq!(redacted_url("not a url"), "(unparsable URL)");
    }
}
