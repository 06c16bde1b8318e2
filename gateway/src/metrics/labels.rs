//! Bounded label values: methods outside the known set are `OTHER`, statuses by class, auth
//! failures by reason, so what a client sends can never grow the series count.

/// The methods counted by name; any other is `OTHER`.
pub const METHODS: [&str; 10] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE", "OTHER",
];

/// Index of `method` in [`METHODS`].
pub fn method_index(method: &str) -> usize {
    METHODS[..METHODS.len() - 1]
        .iter()
        .position(|m| *m == method)
        .unwrap_or(METHODS.len() - 1)
}

/// Status classes; `none` is a request that got no response (the client left, or its head was
/// never complete).
pub const STATUS_CLASSES: [&str; 6] = ["none", "1xx", "2xx", "3xx", "4xx", "5xx"];

pub fn status_class_index(status: u16) -> usize {
    match status {
        100..=599 => usize::from(status / 100),
        _ => 0,
    }
}

/// Why authentication failed, as counted.
pub const AUTH_FAILURES: [&str; 3] = ["missing", "invalid", "forbidden"];

pub fn auth_failure_index(e: crate::auth::AuthError) -> usize {
    match e {
        crate::auth::AuthError::Missing => 0,
        crate::auth::AuthError::Invalid => 1,
        crate::auth::AuthError::Forbidden => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(METHODS[method_index("GET")], "GET");
        assert_eq!(METHODS[method_index("PATCH")], "PATCH");
        assert_eq!(METHODS[method_index("BREW")], "OTHER");
        assert_eq!(METHODS[method_index("get")], "OTHER");
        assert_eq!(STATUS_CLASSES[status_class_index(204)], "2xx");
        assert_eq!(STATUS_CLASSES[status_class_index(599)], "5xx");
        assert_eq!(STATUS_CLASSES[status_class_index(0)], "none");
    }
}
