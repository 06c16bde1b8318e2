//! Authenticate phase: who is calling, by the route's access policy (a verified client
//! certificate a consumer lists, an API key of a listed consumer, or a JWT verified against the
//! configured issuers), and which credential to strip before forwarding. Verified tokens are cached per worker until they expire.

use std::cell::RefCell;

use tracing::debug;

use super::Exit;
use crate::{
    auth::{find_credential, AuthError, CredentialSource, JwtError, TokenCache},
    config::AuthMethod,
    http::request::RequestHead,
    proxy::{
        answer::Answer,
        context::{Caller, RequestContext},
        snapshot::ConfigSnapshot,
    },
    routing::Route,
};

/// Establishes `ctx.caller` when the route has an access policy; returns the credential's
/// place when it is to be stripped. `may_await_keys`: whether a JWT naming a key its issuer
/// does not have yet may make the request wait for a refetch (once per request).
pub fn run(
    snapshot: &ConfigSnapshot,
    tokens: &RefCell<TokenCache>,
    route: &Route,
    req: &RequestHead,
    body: &[u8],
    ctx: &mut RequestContext,
    may_await_keys: bool,
) -> Result<Option<CredentialSource>, Exit> {
    if let Some(provider) = &route.vault {
        admit_virtual_key(snapshot, provider, req, body, ctx)?;
        return Ok(None);
    }
    let Some(policy) = &route.auth else {
        return Ok(None);
    };
    let denied = |e| Exit::Answer(Answer::Denied(e));
    let accepts_cert = policy.methods.contains(&AuthMethod::Mtls);
    if accepts_cert {
        // The handshake verified the chain; a certificate no consumer lists falls through to
        // the route's other methods, if any.
        if let Some(cert) = &ctx.client_cert {
            if let Some(consumer) = snapshot.consumers.by_certificate(&cert.identity) {
                let consumer = snapshot
                    .consumers
                    .admit_consumer(policy, consumer)
                    .map_err(denied)?;
                ctx.caller = Some(Caller::Listed(consumer));
                // Any key or token the client also sent is stripped as usual: the upstream
                // must not see another caller's credential beside this consumer's identity.
                let strip = (!policy.keep_credentials)
                    .then(|| find_credential(req, &snapshot.config.auth).map(|c| c.source))
                    .flatten();
                return Ok(strip);
            }
            if policy.methods.len() == 1 {
                debug!(subject = %cert.identity.header_value, "client certificate identifies no consumer");
                return Err(denied(AuthError::Invalid));
            }
        }
    }
    let credential =
        find_credential(req, &snapshot.config.auth).ok_or(denied(AuthError::Missing))?;
    let accepts = |m| policy.methods.contains(&m);
    let strip = (!policy.keep_credentials).then_some(credential.source);
    if accepts(AuthMethod::Jwt)
        && credential.source == CredentialSource::Bearer
        && looks_like_jwt(credential.value)
    {
        let mut tokens = tokens.borrow_mut();
        let keys_epoch = snapshot.issuers.keys_epoch();
        let token = match tokens.get(credential.value) {
            Some(t) => t,
            None if tokens.refused(credential.value, keys_epoch).is_some() => {
                return Err(denied(AuthError::Invalid))
            }
            None => match snapshot.issuers.verify(credential.value) {
                Ok(t) => tokens.insert(credential.value, t),
                Err(JwtError::UnknownKey(issuer)) if may_await_keys => {
                    return Err(Exit::AwaitKeys(issuer))
                }
                Err(e) => {
                    tokens.remember_refusal(credential.value, e, keys_epoch);
                    debug!(error = ?e, "token refused");
                    return Err(denied(AuthError::Invalid));
                }
            },
        };
        if !token.allowed_by(policy) {
            return Err(denied(AuthError::Forbidden));
        }
        ctx.caller = Some(Caller::Token(token));
        return Ok(strip);
    }
    if accepts(AuthMethod::ApiKey) {
        let consumer = snapshot
            .consumers
            .admit(policy, Some(&credential))
            .map_err(denied)?;
        ctx.caller = Some(Caller::Listed(consumer));
        return Ok(strip);
    }
    Err(denied(AuthError::Invalid))
}

/// Whether the request carries a virtual key that works now on the route of `provider` (a
/// cheap look before the gateway reads a body for it).
pub fn virtual_key_works(snapshot: &ConfigSnapshot, provider: &str, req: &RequestHead) -> bool {
    let Some(config) = snapshot.vault_provider(provider) else {
        return false;
    };
    let (Some(vault), Some(key)) = (
        &snapshot.vault,
        crate::vault::provider::presented(config.kind, req.headers),
    ) else {
        return false;
    };
    crate::vault::virtual_key::looks_like(key)
        && vault.index().admit(key, crate::vault::now_ms()).is_ok()
}

/// A vault route: the caller's virtual key must work now and may call `provider`; a key of
/// that provider is chosen to replace it upstream (at random: balanced without shared state).
fn admit_virtual_key(
    snapshot: &ConfigSnapshot,
    provider: &str,
    req: &RequestHead,
    body: &[u8],
    ctx: &mut RequestContext,
) -> Result<(), Exit> {
    use crate::vault::provider::{presented, VaultRefusal};
    let Some(config) = snapshot.vault_provider(provider) else {
        return Err(Answer::error(500, "vault route without its provider").into());
    };
    let kind = config.kind;
    let refuse = |refusal: VaultRefusal| {
        debug!(provider, ?refusal, "virtual key refused");
        if let Some(v) = &snapshot.vault {
            v.refusals[refusal.index()].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Exit::Answer(Answer::Vault { kind, refusal })
    };
    let vault = snapshot
        .vault
        .as_ref()
        .ok_or_else(|| refuse(VaultRefusal::NoProviderKey))?;
    if req.upgrade.is_some()
        || !crate::vault::provider::endpoint_allowed(kind, req.method, req.path)
    {
        return Err(refuse(VaultRefusal::EndpointNotAllowed));
    }
    let key = presented(kind, req.headers).ok_or_else(|| refuse(VaultRefusal::MissingKey))?;
    if !crate::vault::virtual_key::looks_like(key) {
        return Err(refuse(VaultRefusal::InvalidKey));
    }
    let index = vault.index();
    let entry = index
        .admit(key, crate::vault::now_ms())
        .map_err(|_| refuse(VaultRefusal::InvalidKey))?;
    if !entry.providers.iter().any(|p| p == provider) {
        return Err(refuse(VaultRefusal::ProviderNotAllowed));
    }
    // The model, and the body it came in: needed when the key is restricted to models,
    // spends under a budget, or counts tokens per minute.
    let mut metered = crate::proxy::context::VaultRequest::default();
    if !entry.models.is_empty() || entry.has_budget() || entry.tpm.is_some() {
        let judged_body = match (kind, req.body) {
            (_, crate::http::BodyFraming::None | crate::http::BodyFraming::Length(0)) => &[][..],
            (_, crate::http::BodyFraming::Length(n)) => {
                let n = usize::try_from(n).unwrap_or(usize::MAX);
                if n > crate::vault::request::MAX_JUDGED_BODY_BYTES {
                    return Err(refuse(VaultRefusal::BodyTooLarge));
                }
                // The route phase read it whole for a working key within the route's limit;
                // short of it here, it is over that limit.
                if body.len() < n {
                    return Err(refuse(VaultRefusal::BodyTooLarge));
                }
                &body[..n]
            }
            // SDKs send JSON with a length; a chunked body cannot be judged before it is
            // forwarded.
            _ => return Err(refuse(VaultRefusal::LengthRequired)),
        };
        let model = match kind {
            // Azure names the model's deployment in the path.
            crate::config::ProviderKind::Azure => {
                crate::vault::request::azure_deployment(req.path).map(std::borrow::Cow::Borrowed)
            }
            _ => crate::vault::request::model_of(judged_body),
        };
        if !entry.models.is_empty()
            && !model
                .as_deref()
                .is_some_and(|m| entry.models.iter().any(|a| a == m))
        {
            return Err(refuse(VaultRefusal::ModelNotAllowed));
        }
        let (prices, default_output) = snapshot
            .config
            .vault
            .as_ref()
            .map(|v| (Some(&v.prices), v.default_output_tokens))
            .unwrap_or((None, 0));
        let reserves = entry.has_budget() || entry.tpm.is_some();
        let max_output = match crate::vault::request::output_allowance(judged_body, default_output)
        {
            Ok(tokens) => tokens,
            // A key that reserves must know what it reserves for.
            Err(_) if reserves => return Err(refuse(VaultRefusal::UnreadableBody)),
            Err(_) => default_output,
        };
        // Bounded: a client's max_tokens of u64::MAX reserves all, never wraps.
        metered.estimated_tokens = (judged_body.len() as u64)
            .div_ceil(4)
            .saturating_add(max_output);
        let price = model.as_deref().and_then(|m| prices.and_then(|p| p.get(m)));
        metered.price = price.cloned();
        metered.model = model.as_deref().unwrap_or("").into();
        if entry.has_budget() {
            let price = price.ok_or_else(|| refuse(VaultRefusal::ModelNotPriced))?;
            let amount = crate::vault::ledger::estimate(price, judged_body.len(), max_output);
            let now = crate::vault::now_ms() / 1000;
            let ledger = &vault.ledger;
            let budgets = entry
                .budgets
                .iter()
                .map(|&(p, limit)| (ledger.counter(&entry.scope, p, now), limit))
                .chain(
                    entry
                        .owner_budgets
                        .iter()
                        .map(|&(p, limit)| (ledger.counter(&entry.owner_scope, p, now), limit)),
                )
                .collect();
            metered.reservation = ledger
                .reserve(amount, budgets)
                .map_err(|_| refuse(VaultRefusal::BudgetExceeded))?;
        }
    }
    // In the context before anything else is taken: a later refusal gives it all back.
    let metered = ctx.vault.insert(metered);
    let now = crate::vault::now_ms() / 1000;
    let minute = crate::config::BudgetPeriod::Minute;
    if let Some(rpm) = entry.rpm {
        let counter = vault.ledger.counter(&entry.rpm_scope, minute, now);
        metered.rpm = Some(
            vault
                .ledger
                .reserve(1, vec![(counter, rpm)])
                .map_err(|_| refuse(VaultRefusal::RateLimited))?,
        );
    }
    if let Some(tpm) = entry.tpm {
        let counter = vault.ledger.counter(&entry.tpm_scope, minute, now);
        metered.tpm = Some(
            vault
                .ledger
                .reserve(metered.estimated_tokens, vec![(counter, tpm)])
                .map_err(|_| refuse(VaultRefusal::RateLimited))?,
        );
    }
    let keys = index
        .provider_keys
        .get(provider)
        .filter(|k| !k.is_empty())
        .ok_or_else(|| refuse(VaultRefusal::NoProviderKey))?;
    if vault.cluster.is_some() {
        metered.shared_claim = shared_claim(entry, metered, now);
    }
    if config.adds_stream_usage() {
        ask_for_stream_usage(kind, req, body, metered);
    }
    ctx.caller = Some(Caller::Virtual(crate::proxy::context::VirtualCaller {
        key: entry.clone(),
        provider_key: crate::vault::index::choose(keys, crate::vault::now_ms()).clone(),
        kind,
    }));
    Ok(())
}

/// An OpenAI-shaped streamed completion whose client did not ask for usage is sent with
/// `stream_options.include_usage` (so it is billed at what it used, not at its reservation),
/// and the usage event that adds is withheld from the client. Only for a body read whole.
fn ask_for_stream_usage(
    kind: crate::config::ProviderKind,
    req: &RequestHead,
    body: &[u8],
    metered: &mut crate::proxy::context::VaultRequest,
) {
    use crate::config::ProviderKind;
    let openai_shaped = matches!(
        kind,
        ProviderKind::Openai | ProviderKind::OpenaiCompatible | ProviderKind::Azure
    );
    if !openai_shaped || req.method != "POST" || !req.path.ends_with(b"/completions") {
        return;
    }
    let crate::http::BodyFraming::Length(n) = req.body else {
        return;
    };
    let Some(whole) = usize::try_from(n).ok().and_then(|n| body.get(..n)) else {
        return;
    };
    let mut rewritten = Vec::new();
    if crate::vault::usage_event::add_include_usage(whole, &mut rewritten) {
        metered.upstream_body = Some((whole.len(), rewritten));
        metered.usage_filter = Some(Default::default());
    }
}

/// What a request reserves in the cluster's counters, the same as on this host's ledger: its
/// estimate on every budget of the key and its owner, one request and its estimated tokens
/// per minute.
fn shared_claim(
    entry: &crate::vault::index::KeyEntry,
    metered: &crate::proxy::context::VaultRequest,
    now: u64,
) -> Vec<crate::vault::cluster_ledger::SharedItem> {
    use crate::{
        config::BudgetPeriod,
        vault::cluster_ledger::{Measure, SharedItem},
    };
    let mut claim = Vec::new();
    if entry.has_budget() {
        let amount = metered.reservation.amount;
        let budgets = entry.budgets.iter().map(|b| (&entry.scope, b));
        let owner = entry.owner_budgets.iter().map(|b| (&entry.owner_scope, b));
        for (scope, &(period, limit)) in budgets.chain(owner) {
            claim.push(SharedItem::new(
                scope,
                period,
                now,
                amount,
                limit,
                Measure::Spend,
            ));
        }
    }
    if let Some(rpm) = entry.rpm {
        let item = SharedItem::new(
            &entry.rpm_scope,
            BudgetPeriod::Minute,
            now,
            1,
            rpm,
            Measure::Requests,
        );
        claim.push(item);
    }
    if let Some(tpm) = entry.tpm {
        let tokens = metered.estimated_tokens;
        let item = SharedItem::new(
            &entry.tpm_scope,
            BudgetPeriod::Minute,
            now,
            tokens,
            tpm,
            Measure::Tokens,
        );
        claim.push(item);
    }
    claim
}

/// A JWT is three base64url parts; API keys never contain a dot.
fn looks_like_jwt(token: &[u8]) -> bool {
    token.iter().filter(|b| **b == b'.').count() == 2
}
