//! The cache's admin operations: `POST /cache/purge` with `{"key": URL}`, `{"prefix":
//! URL-PREFIX}` or `{"tag": TAG}` (also through the control socket, for `portcullis cache
//! purge`), and `GET /cache` for its size and counters. With `[cluster]` a purge is sent to
//! every other host.

use serde_json::{json, Value};

use super::api::AdminResponse;
use crate::{cache::Purge, proxy::snapshot::ConfigSnapshot};

/// The shape a purge body takes.
const PURGE_SHAPE: &str = "expected {\"key\": \"https://host/path?query\"}, {\"prefix\": \"https://host/images/\"} or {\"tag\": \"product-42\"}";

/// One cache operation, `segments` after `/cache`.
pub fn dispatch(
    snapshot: &ConfigSnapshot,
    method: &str,
    segments: &[&str],
    raw: &[u8],
) -> AdminResponse {
    match (method, segments) {
        ("POST", ["purge"]) => {
            let purge: Purge = match serde_json::from_slice(raw) {
                Ok(p) => p,
                Err(e) => return AdminResponse::error(400, &format!("{PURGE_SHAPE}: {e}")),
            };
            let purged = snapshot.cache.apply(&purge);
            let shared = snapshot.purge_bus.as_ref().map(|bus| bus.publish(&purge));
            AdminResponse::json(
                200,
                &json!({ "purged": purged, "sent_to_cluster": shared.map_or(Value::Null, Value::Bool) }),
            )
        }
        ("GET", []) => {
            let (bytes, entries) = snapshot.cache.size();
            AdminResponse::json(
                200,
                &json!({ "entries": entries, "bytes": bytes, "max_bytes": snapshot.config.cache.max_bytes }),
            )
        }
        (_, ["purge"] | []) => AdminResponse::error(405, "method not allowed here"),
        _ => AdminResponse::error(404, "cache: GET /cache, POST /cache/purge"),
    }
}
