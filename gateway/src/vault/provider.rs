//! What differs between LLM providers at the gateway's edge: where a client puts its key, how
//! the real key is sent upstream, and the shape of an error body, so a client's SDK reads the
//! gateway's refusals as it reads the provider's own.

use crate::config::ProviderKind;

/// Where clients of `kind` put their key: header names, lower case; `authorization` means a
/// Bearer token.
pub fn credential_headers(kind: ProviderKind) -> &'static [&'static str] {
    match kind {
        ProviderKind::Openai | ProviderKind::OpenaiCompatible => &["authorization"],
        ProviderKind::Anthropic => &["x-api-key", "authorization"],
        ProviderKind::Azure => &["api-key", "authorization"],
    }
}

/// Fields a client's copies of never go upstream on a vault route: every header that may carry
/// a provider credential, the ones choosing which organisation or project the gateway's key
/// acts for, and Accept-Encoding (the gateway asks for identity: a compressed body would hide
/// its usage from the meter).
pub const CREDENTIAL_HEADERS: [&str; 7] = [
    "authorization",
    "x-api-key",
    "api-key",
    "proxy-authorization",
    "openai-organization",
    "openai-project",
    "accept-encoding",
];

/// The credential a client of `kind` presented, if any.
pub fn presented<'a>(kind: ProviderKind, headers: &'a [httparse::Header<'a>]) -> Option<&'a [u8]> {
    for name in credential_headers(kind) {
        let Some(h) = headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)) else {
            continue;
        };
        let value = crate::http::fields::trim_ows(h.value);
        if *name == "authorization" {
            let scheme = value.get(..7)?;
            if scheme.eq_ignore_ascii_case(b"bearer ") {
                return Some(crate::http::fields::trim_ows(&value[7..]));
            }
            continue;
        }
        return Some(value);
    }
    None
}

/// The inference endpoints a vault route opens, by method and the path's last segments: a
/// provider's other APIs (files, batches, stored responses, fine-tuning, realtime sessions
/// that mint credentials of their own) act on the organisation's shared account and are not
/// metered, so they are not reachable with a virtual key.
pub fn endpoint_allowed(kind: ProviderKind, method: &str, path: &[u8]) -> bool {
    const OPENAI: [(&str, &str); 6] = [
        ("POST", "/chat/completions"),
        ("POST", "/completions"),
        ("POST", "/embeddings"),
        ("POST", "/responses"),
        ("POST", "/moderations"),
        ("GET", "/models"),
    ];
    const ANTHROPIC: [(&str, &str); 3] = [
        ("POST", "/messages"),
        ("POST", "/messages/count_tokens"),
        ("GET", "/models"),
    ];
    const AZURE: [(&str, &str); 3] = [
        ("POST", "/chat/completions"),
        ("POST", "/completions"),
        ("POST", "/embeddings"),
    ];
    let list: &[(&str, &str)] = match kind {
        ProviderKind::Openai | ProviderKind::OpenaiCompatible => &OPENAI,
        ProviderKind::Anthropic => &ANTHROPIC,
        ProviderKind::Azure => &AZURE,
    };
    list.iter()
        .any(|(m, suffix)| *m == method && path.ends_with(suffix.as_bytes()))
}

/// The header (name, value prefix) that carries the real key upstream.
pub fn upstream_credential(kind: ProviderKind) -> (&'static str, &'static str) {
    match kind {
        ProviderKind::Openai | ProviderKind::OpenaiCompatible => ("authorization", "Bearer "),
        ProviderKind::Anthropic => ("x-api-key", ""),
        ProviderKind::Azure => ("api-key", ""),
    }
}

/// How long to rest a provider key that answered 429: its `Retry-After` (seconds, or an
/// HTTP date) within 1 s and 10 min, else 5 s.
pub fn retry_after(headers: &[httparse::Header]) -> std::time::Duration {
    use std::time::{Duration, SystemTime};
    const DEFAULT: Duration = Duration::from_secs(5);
    let Some(value) = headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("retry-after"))
        .and_then(|h| std::str::from_utf8(h.value).ok())
        .map(str::trim)
    else {
        return DEFAULT;
    };
    let wait = match value.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => match httpdate::parse_http_date(value) {
            Ok(at) => at.duration_since(SystemTime::now()).unwrap_or_default(),
            Err(_) => DEFAULT,
        },
    };
    wait.clamp(Duration::from_secs(1), Duration::from_secs(600))
}

/// Why the vault refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VaultRefusal {
    /// 401: no virtual key where this provider's clients put theirs.
    MissingKey,
    /// 401: unknown, revoked, expired, or a rotated secret past its grace.
    InvalidKey,
    /// 403: the key may not call this provider.
    ProviderNotAllowed,
    /// 503: the vault holds no key of this provider.
    NoProviderKey,
    /// 403: the key may not use the model asked for (or the request names none).
    ModelNotAllowed,
    /// 413: a body too large to read the model from.
    BodyTooLarge,
    /// 411: a chunked body on a key restricted to some models.
    LengthRequired,
    /// 403: the key spends under a budget and the model has no price.
    ModelNotPriced,
    /// 429: the request's reservation would pass a budget of the key or its owner.
    BudgetExceeded,
    /// 429: the key's requests or tokens per minute are used up.
    RateLimited,
    /// 404: not an inference endpoint (see [`endpoint_allowed`]), or a protocol upgrade.
    EndpointNotAllowed,
    /// 400: a body whose output allowance cannot be read, on a key that reserves for it.
    UnreadableBody,
}

impl VaultRefusal {
    pub const ALL: [VaultRefusal; 12] = [
        VaultRefusal::MissingKey,
        VaultRefusal::InvalidKey,
        VaultRefusal::ProviderNotAllowed,
        VaultRefusal::NoProviderKey,
        VaultRefusal::ModelNotAllowed,
        VaultRefusal::BodyTooLarge,
        VaultRefusal::LengthRequired,
        VaultRefusal::ModelNotPriced,
        VaultRefusal::BudgetExceeded,
        VaultRefusal::RateLimited,
        VaultRefusal::EndpointNotAllowed,
        VaultRefusal::UnreadableBody,
    ];

    /// The metric label.
    pub fn name(self) -> &'static str {
        match self {
            VaultRefusal::MissingKey => "missing_key",
            VaultRefusal::InvalidKey => "invalid_key",
            VaultRefusal::ProviderNotAllowed => "provider_not_allowed",
            VaultRefusal::NoProviderKey => "no_provider_key",
            VaultRefusal::ModelNotAllowed => "model_not_allowed",
            VaultRefusal::BodyTooLarge => "body_too_large",
            VaultRefusal::LengthRequired => "length_required",
            VaultRefusal::ModelNotPriced => "model_not_priced",
            VaultRefusal::BudgetExceeded => "budget_exceeded",
            VaultRefusal::RateLimited => "rate_limited",
            VaultRefusal::EndpointNotAllowed => "endpoint_not_allowed",
            VaultRefusal::UnreadableBody => "unreadable_body",
        }
    }

    pub fn index(self) -> usize {
        Self::ALL.iter().position(|r| *r == self).unwrap_or(0)
    }

    pub fn status(self) -> u16 {
        match self {
            VaultRefusal::MissingKey | VaultRefusal::InvalidKey => 401,
            VaultRefusal::ProviderNotAllowed
            | VaultRefusal::ModelNotAllowed
            | VaultRefusal::ModelNotPriced => 403,
            VaultRefusal::BudgetExceeded | VaultRefusal::RateLimited => 429,
            VaultRefusal::EndpointNotAllowed => 404,
            VaultRefusal::UnreadableBody => 400,
            VaultRefusal::NoProviderKey => 503,
            VaultRefusal::BodyTooLarge => 413,
            VaultRefusal::LengthRequired => 411,
        }
    }

    fn message(self) -> &'static str {
        match self {
            VaultRefusal::MissingKey => "No API key provided.",
            VaultRefusal::InvalidKey => "Invalid API key (unknown, revoked or expired).",
            VaultRefusal::ProviderNotAllowed => "This key may not call this provider.",
            VaultRefusal::NoProviderKey => "The gateway holds no key for this provider.",
            VaultRefusal::ModelNotAllowed => "This key may not use the requested model.",
            VaultRefusal::BodyTooLarge => "The request body is too large for this gateway.",
            VaultRefusal::LengthRequired => "Send the request body with a Content-Length.",
            VaultRefusal::ModelNotPriced => {
                "This model has no price, and this key spends under a budget."
            }
            VaultRefusal::BudgetExceeded => {
                "This request would exceed the budget of this key or its owner."
            }
            VaultRefusal::RateLimited => {
                "Rate limit reached for this key (requests or tokens per minute)."
            }
            VaultRefusal::EndpointNotAllowed => {
                "This endpoint is not available with a virtual key."
            }
            VaultRefusal::UnreadableBody => {
                "The request body must be a JSON object naming each field once."
            }
        }
    }
}

/// The error body a client of `kind` expects for `refusal` (JSON).
pub fn error_body(kind: ProviderKind, refusal: VaultRefusal) -> String {
    let message = refusal.message();
    match kind {
        ProviderKind::Openai | ProviderKind::OpenaiCompatible => {
            let (kind, code) = match refusal {
                VaultRefusal::MissingKey | VaultRefusal::InvalidKey => {
                    ("invalid_request_error", "invalid_api_key")
                }
                VaultRefusal::ProviderNotAllowed => ("invalid_request_error", "permission_denied"),
                VaultRefusal::ModelNotAllowed | VaultRefusal::ModelNotPriced => {
                    ("invalid_request_error", "model_not_allowed")
                }
                VaultRefusal::BudgetExceeded => ("insufficient_quota", "insufficient_quota"),
                VaultRefusal::RateLimited => ("requests", "rate_limit_exceeded"),
                VaultRefusal::EndpointNotAllowed => ("invalid_request_error", "unknown_url"),
                VaultRefusal::UnreadableBody => ("invalid_request_error", "invalid_request"),
                VaultRefusal::BodyTooLarge | VaultRefusal::LengthRequired => {
                    ("invalid_request_error", "invalid_request")
                }
                VaultRefusal::NoProviderKey => ("server_error", "service_unavailable"),
            };
            serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
                .to_string()
        }
        ProviderKind::Anthropic => {
            let kind = match refusal {
                VaultRefusal::MissingKey | VaultRefusal::InvalidKey => "authentication_error",
                VaultRefusal::ProviderNotAllowed
                | VaultRefusal::ModelNotAllowed
                | VaultRefusal::ModelNotPriced => "permission_error",
                VaultRefusal::BudgetExceeded | VaultRefusal::RateLimited => "rate_limit_error",
                VaultRefusal::EndpointNotAllowed => "not_found_error",
                VaultRefusal::UnreadableBody => "invalid_request_error",
                VaultRefusal::BodyTooLarge => "request_too_large",
                VaultRefusal::LengthRequired => "invalid_request_error",
                VaultRefusal::NoProviderKey => "api_error",
            };
            serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
                .to_string()
        }
        ProviderKind::Azure => serde_json::json!({"error": {
            "code": refusal.status().to_string(), "message": message}})
        .to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_read_where_each_provider_puts_them() {
        let h = |name: &'static str, value: &'static [u8]| httparse::Header { name, value };
        let bearer = [h("Authorization", b"Bearer  pcvk_x ")];
        assert_eq!(
            presented(ProviderKind::Openai, &bearer),
            Some(&b"pcvk_x"[..])
        );
        assert_eq!(
            presented(ProviderKind::Anthropic, &bearer),
            Some(&b"pcvk_x"[..])
        );
        let basic = [h("authorization", b"Basic abc")];
        assert_eq!(presented(ProviderKind::Openai, &basic), None);
        let anthropic = [
            h("X-Api-Key", b"pcvk_a"),
            h("authorization", b"Bearer pcvk_b"),
        ];
        assert_eq!(
            presented(ProviderKind::Anthropic, &anthropic),
            Some(&b"pcvk_a"[..])
        );
        assert_eq!(
            presented(ProviderKind::Azure, &[h("api-key", b"pcvk_z")]),
            Some(&b"pcvk_z"[..])
        );
    }

    #[test]
    fn errors_take_each_providers_shape() {
        let openai: serde_json::Value =
            serde_json::from_str(&error_body(ProviderKind::Openai, VaultRefusal::InvalidKey))
                .unwrap();
        assert_eq!(openai["error"]["code"], "invalid_api_key");
        let anthropic: serde_json::Value = serde_json::from_str(&error_body(
            ProviderKind::Anthropic,
            VaultRefusal::ProviderNotAllowed,
        ))
        .unwrap();
        assert_eq!(anthropic["type"], "error");
        assert_eq!(anthropic["error"]["type"], "permission_error");
    }
}
