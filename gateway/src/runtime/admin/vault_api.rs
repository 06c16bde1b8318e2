//! The vault's admin endpoints: provider keys added and removed (shown by fingerprint only),
//! virtual keys created (the secret shown once), listed, rotated and revoked. Every change is
//! durable and in the audit log before the answer.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use serde::Deserialize;
use serde_json::{json, Value};

use super::api::{AdminResponse, AdminState};
use crate::vault::{store::Owner, KeySpec, Rotated, Vault, VaultError};

/// Who the audit log names for admin-token calls.
const ADMIN_ACTOR: &str = "admin";

fn vault_of(state: &AdminState) -> Result<(Arc<Vault>, Duration), AdminResponse> {
    let snapshot = state.live.snapshot();
    match (&snapshot.vault, &snapshot.config.vault) {
        (Some(v), Some(c)) => Ok((v.clone(), c.rotation_grace.get())),
        _ => Err(AdminResponse::error(404, "no [vault] is configured")),
    }
}

fn refused(e: VaultError) -> AdminResponse {
    AdminResponse::error(e.status(), &e.to_string())
}

fn body<T: for<'de> Deserialize<'de>>(raw: &[u8], shape: &str) -> Result<T, AdminResponse> {
    serde_json::from_slice(raw)
        .map_err(|e| AdminResponse::error(400, &format!("expected {shape}: {e}")))
}

/// The vault endpoints, or `None` when `segments` is not one of them.
pub fn handle(
    state: &AdminState,
    method: &str,
    segments: &[&str],
    raw: &[u8],
) -> Option<AdminResponse> {
    if segments.first() != Some(&"vault") {
        return None;
    }
    let (vault, grace) = match vault_of(state) {
        Ok(v) => v,
        Err(r) => return Some(r),
    };
    Some(dispatch(
        &vault,
        grace,
        method,
        &segments[1..],
        raw,
        ADMIN_ACTOR,
    ))
}

/// One vault operation, `segments` after `/vault`, done as `actor` (the audit log's who):
/// for the admin API, the control socket and `portcullis vault` on a stopped gateway alike.
pub fn dispatch(
    vault: &Vault,
    grace: Duration,
    method: &str,
    segments: &[&str],
    raw: &[u8],
    actor: &str,
) -> AdminResponse {
    match (method, segments) {
        ("GET", ["providers"]) => {
            let keys: Vec<Value> = vault
                .provider_keys()
                .into_iter()
                .map(|(provider, id, fingerprint)| {
                    json!({ "provider": provider, "id": id, "fingerprint": fingerprint })
                })
                .collect();
            AdminResponse::json(200, &json!({ "provider_keys": keys }))
        }
        ("POST", ["providers", provider, "keys"]) => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Add {
                key: String,
            }
            match body::<Add>(raw, "{\"key\": \"sk-...\"}") {
                Err(r) => r,
                Ok(add) => match vault.add_provider_key(provider, &add.key, actor) {
                    Ok((id, fingerprint)) => AdminResponse::json(
                        201,
                        &json!({ "provider": provider, "id": id, "fingerprint": fingerprint }),
                    ),
                    Err(e) => refused(e),
                },
            }
        }
        ("DELETE", ["providers", provider, "keys", id]) => {
            match vault.remove_provider_key(provider, id, actor) {
                Ok(()) => AdminResponse::json(200, &json!({ "removed": id })),
                Err(e) => refused(e),
            }
        }
        ("GET", ["keys"]) => {
            let keys: Vec<Value> = vault.keys().iter().map(crate::vault::view).collect();
            AdminResponse::json(200, &json!({ "keys": keys }))
        }
        ("POST", ["keys"]) => create(vault, raw, actor),
        ("POST", ["keys", id, "rotate"]) => rotate(vault, id, raw, grace, actor),
        ("POST", ["keys", id, "budget"]) => match body::<BudgetIn>(raw, BUDGET_SHAPE) {
            Err(r) => r,
            Ok(b) => match vault.set_key_budget(id, b.period, b.limit_micros, actor) {
                Ok(()) => AdminResponse::json(
                    200,
                    &json!({ "id": id, "period": b.period, "limit_micros": b.limit_micros }),
                ),
                Err(e) => refused(e),
            },
        },
        ("POST", ["keys", id, "limits"]) => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Limits {
                rpm: Option<u64>,
                tpm: Option<u64>,
            }
            match body::<Limits>(raw, "{\"rpm\": 60, \"tpm\": 100000} (null: no limit)") {
                Err(r) => r,
                Ok(l) => match vault.set_key_limits(id, l.rpm, l.tpm, actor) {
                    Ok(()) => {
                        AdminResponse::json(200, &json!({ "id": id, "rpm": l.rpm, "tpm": l.tpm }))
                    }
                    Err(e) => refused(e),
                },
            }
        }
        ("POST", ["owners", "budget"]) => {
            #[derive(Deserialize)]
            #[serde(deny_unknown_fields)]
            struct OwnerBudget {
                owner: OwnerIn,
                period: crate::config::BudgetPeriod,
                limit_micros: Option<u64>,
            }
            match body::<OwnerBudget>(raw, "{\"owner\": {\"consumer\": \"alice\"}, \"period\": \"month\", \"limit_micros\": 100000000}") {
                Err(r) => r,
                Ok(b) => {
                    let owner = b.owner.into_owner();
                    match vault.set_owner_budget(&owner, b.period, b.limit_micros, actor) {
                        Ok(()) => AdminResponse::json(
                            200,
                            &json!({ "owner": owner.scope(), "period": b.period, "limit_micros": b.limit_micros }),
                        ),
                        Err(e) => refused(e),
                    }
                }
            }
        }
        ("GET", ["spend"]) => {
            let snapshot = vault.ledger.snapshot();
            // With a cluster, every host's spend as Redis holds it (null when unreachable).
            let shared = vault.cluster.as_ref().map(|c| {
                let keys: Vec<String> = snapshot
                    .iter()
                    .map(|(k, _, _)| {
                        crate::vault::cluster_ledger::counter_key(&k.scope, k.period, k.instance)
                    })
                    .collect();
                c.store.counter_totals(&keys).ok()
            });
            let counters: Vec<Value> = snapshot
                .into_iter()
                .enumerate()
                .map(|(i, (k, settled, committed))| {
                    let mut counter = json!({
                        "scope": k.scope,
                        "period": k.period,
                        "instance": k.instance,
                        "spent_micros": settled,
                        "reserved_micros": committed.saturating_sub(settled),
                    });
                    if let Some(shared) = &shared {
                        counter["cluster"] = match shared.as_ref().and_then(|t| t.get(i)) {
                            Some((spent, reserved)) => {
                                json!({ "spent_micros": spent, "reserved_micros": reserved })
                            }
                            None => Value::Null,
                        };
                    }
                    counter
                })
                .collect();
            AdminResponse::json(200, &json!({ "spend": counters }))
        }
        ("POST", ["keys", id, "revoke"]) => match vault.revoke(id, actor) {
            Ok(()) => AdminResponse::json(200, &json!({ "id": id, "revoked": true })),
            Err(e) => refused(e),
        },
        _ => AdminResponse::error(404, "no such vault endpoint"),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
enum OwnerIn {
    Consumer(String),
    Group(String),
}

impl OwnerIn {
    fn into_owner(self) -> Owner {
        match self {
            OwnerIn::Consumer(id) => Owner::Consumer(id),
            OwnerIn::Group(g) => Owner::Group(g),
        }
    }
}

const BUDGET_SHAPE: &str =
    "{\"period\": \"day\" | \"month\" | \"total\", \"limit_micros\": 5000000} (null removes it)";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BudgetIn {
    period: crate::config::BudgetPeriod,
    limit_micros: Option<u64>,
}

fn create(vault: &Vault, raw: &[u8], actor: &str) -> AdminResponse {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Create {
        owner: OwnerIn,
        providers: Vec<String>,
        #[serde(default)]
        models: Vec<String>,
        /// Seconds from now.
        expires_in_secs: Option<u64>,
        #[serde(default)]
        metadata: BTreeMap<String, String>,
    }
    let shape = "{\"owner\": {\"consumer\": \"alice\"}, \"providers\": [\"openai\"], \"models\": [], \"expires_in_secs\": 86400, \"metadata\": {}}";
    let c: Create = match body(raw, shape) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let spec = KeySpec {
        owner: c.owner.into_owner(),
        providers: c.providers,
        models: c.models,
        expires_at_ms: c
            .expires_in_secs
            .map(|s| crate::vault::now_ms().saturating_add(s.saturating_mul(1000))),
        metadata: c.metadata,
        budgets: Vec::new(),
    };
    match vault.create_key(spec, None, actor) {
        Ok((id, secret)) => AdminResponse::json(
            201,
            &json!({ "id": id, "key": secret, "note": "the key is shown this once; only its hash is kept" }),
        ),
        Err(e) => refused(e),
    }
}

fn rotate(
    vault: &Vault,
    id: &str,
    raw: &[u8],
    default_grace: Duration,
    actor: &str,
) -> AdminResponse {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Rotate {
        rotation_id: String,
        grace_secs: Option<u64>,
    }
    let r: Rotate = match body(
        raw,
        "{\"rotation_id\": \"your-id-for-this-rotation\", \"grace_secs\": 3600}",
    ) {
        Ok(r) => r,
        Err(resp) => return resp,
    };
    let grace = r.grace_secs.map_or(default_grace, Duration::from_secs);
    match vault.rotate(id, &r.rotation_id, grace, actor) {
        Ok(Rotated::New {
            secret,
            previous_until_ms,
        }) => AdminResponse::json(
            200,
            &json!({ "id": id, "key": secret, "previous_valid_until_ms": previous_until_ms }),
        ),
        Ok(Rotated::Already { at_ms }) => AdminResponse::json(
            200,
            &json!({ "id": id, "already_rotated_at_ms": at_ms, "note": "this rotation_id was applied before; nothing changed" }),
        ),
        Err(e) => refused(e),
    }
}
