//! Consumers managing their own virtual keys, authenticated by the route's `auth`: list,
//! create (within `[vault.self_service]`: providers, models, a budget per key, a number of
//! keys), rotate and revoke. A consumer sees and touches only keys it owns; another's key id
//! is answered as unknown. The audit log names the actor `consumer:ID`.

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{store::Owner, KeySpec, Rotated, Vault, VaultError};
use crate::config::SelfServiceConfig;

/// Largest self-service request body.
pub const MAX_BODY_BYTES: usize = 16 * 1024;

fn error(status: u16, message: &str) -> (u16, Value) {
    (
        status,
        json!({ "error": { "status": status, "message": message } }),
    )
}

fn refused(e: VaultError) -> (u16, Value) {
    error(e.status(), &e.to_string())
}

/// One request of `consumer`: `rest` is the path after the route's prefix.
pub fn handle(
    vault: &Vault,
    policy: &SelfServiceConfig,
    grace: Duration,
    consumer: &str,
    method: &str,
    rest: &str,
    body: &[u8],
) -> (u16, Value) {
    let owner = Owner::Consumer(consumer.to_owned());
    let actor = format!("consumer:{consumer}");
    let segments: Vec<&str> = rest.trim_matches('/').split('/').collect();
    let owned = |id: &str| {
        vault
            .keys()
            .into_iter()
            .any(|k| k.id == id && k.owner == owner)
    };
    match (method, segments.as_slice()) {
        ("GET", ["keys"]) => {
            let keys: Vec<Value> = vault
                .keys()
                .iter()
                .filter(|k| k.owner == owner)
                .map(super::view)
                .collect();
            (200, json!({ "keys": keys }))
        }
        ("POST", ["keys"]) => create(vault, policy, &owner, &actor, body),
        ("POST", ["keys", id, "rotate"]) if owned(id) => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Rotate {
                rotation_id: String,
                grace_secs: Option<u64>,
            }
            let Ok(r) = serde_json::from_slice::<Rotate>(body) else {
                return error(
                    400,
                    "expected {\"rotation_id\": \"...\", \"grace_secs\": 3600}",
                );
            };
            let grace = r.grace_secs.map_or(grace, Duration::from_secs).min(grace);
            match vault.rotate(id, &r.rotation_id, grace, &actor) {
                Ok(Rotated::New {
                    secret,
                    previous_until_ms,
                }) => (
                    200,
                    json!({ "id": id, "key": secret, "previous_valid_until_ms": previous_until_ms }),
                ),
                Ok(Rotated::Already { at_ms }) => {
                    (200, json!({ "id": id, "already_rotated_at_ms": at_ms }))
                }
                Err(e) => refused(e),
            }
        }
        ("POST", ["keys", id, "revoke"]) if owned(id) => match vault.revoke(id, &actor) {
            Ok(()) => (200, json!({ "id": id, "revoked": true })),
            Err(e) => refused(e),
        },
        // Another consumer's key is no key of this one.
        ("POST", ["keys", id, _]) => error(404, &format!("no virtual key {id}")),
        _ => error(
            404,
            "self-service: GET keys, POST keys, POST keys/ID/rotate, POST keys/ID/revoke",
        ),
    }
}

fn create(
    vault: &Vault,
    policy: &SelfServiceConfig,
    owner: &Owner,
    actor: &str,
    body: &[u8],
) -> (u16, Value) {
    #[derive(Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Create {
        providers: Vec<String>,
        models: Vec<String>,
        expires_in_secs: Option<u64>,
        metadata: std::collections::BTreeMap<String, String>,
    }
    let c: Create = if body.is_empty() {
        Create::default()
    } else {
        match serde_json::from_slice(body) {
            Ok(c) => c,
            Err(e) => {
                return error(
                    400,
                    &format!("expected {{\"providers\": [...], \"models\": [...], \"expires_in_secs\": 86400, \"metadata\": {{}}}}: {e}"),
                )
            }
        }
    };
    let providers = if c.providers.is_empty() {
        policy.providers.clone()
    } else {
        c.providers
    };
    if providers.is_empty() || providers.iter().any(|p| !policy.providers.contains(p)) {
        return error(403, &format!("keys may call only {:?}", policy.providers));
    }
    let models = match (c.models.is_empty(), policy.models.is_empty()) {
        (true, _) => policy.models.clone(),
        (false, true) => c.models,
        (false, false) if c.models.iter().all(|m| policy.models.contains(m)) => c.models,
        (false, false) => return error(403, &format!("keys may use only {:?}", policy.models)),
    };
    let spec = KeySpec {
        owner: owner.clone(),
        providers,
        models,
        expires_at_ms: c
            .expires_in_secs
            .map(|s| super::now_ms().saturating_add(s.saturating_mul(1000))),
        metadata: c.metadata,
        budgets: policy
            .key_budget
            .iter()
            .map(|b| super::store::BudgetRecord {
                period: b.period,
                limit_micros: b.limit_micros,
            })
            .collect(),
    };
    let (id, secret) = match vault.create_key(spec, Some(policy.max_keys), actor) {
        Ok(created) => created,
        Err(e) => return refused(e),
    };
    (
        201,
        json!({ "id": id, "key": secret, "note": "the key is shown this once; only its hash is kept" }),
    )
}
