//! `portcullis vault ...`: the vault's operations from the command line. With the gateway
//! running (its data directory is locked) they go through its control socket, so the
//! running workers see them at once; with it stopped they work on the store directly, under
//! the data directory's lock. Either way the audit log names the actor `cli`. A provider key
//! is read from standard input, never from the arguments (which `ps` shows).

use std::io::Read;

use clap::Subcommand;
use serde_json::{json, Value};

use crate::{config::Config, state::data_dir::DataDirLock};

#[derive(Subcommand, Debug)]
pub enum VaultCommand {
    /// Add a key of PROVIDER, read from standard input; prints its id and fingerprint.
    ProviderAdd { provider: String },
    /// List the provider keys (ids and fingerprints, never the keys).
    ProviderList,
    /// Remove provider key ID of PROVIDER.
    ProviderRemove { provider: String, id: String },
    /// Create a virtual key; prints its id and its secret (shown this once).
    KeyCreate {
        /// `consumer:ID` or `group:NAME`.
        #[arg(long)]
        owner: String,
        /// A provider the key may call (repeatable).
        #[arg(long = "provider", required = true)]
        providers: Vec<String>,
        /// A model the key may use (repeatable; none: every model).
        #[arg(long = "model")]
        models: Vec<String>,
        /// The key stops working this many seconds from now.
        #[arg(long)]
        expires_in_secs: Option<u64>,
    },
    /// List the virtual keys (never their secrets).
    KeyList,
    /// Give key ID a new secret; the old one works for the grace period.
    KeyRotate {
        id: String,
        /// Your id for this rotation: repeating it changes nothing.
        #[arg(long)]
        rotation_id: String,
        #[arg(long)]
        grace_secs: Option<u64>,
    },
    /// Revoke key ID (every secret of it).
    KeyRevoke { id: String },
    /// Set key ID's budget for a period (day, month, total); without --limit-micros, remove it.
    BudgetKey {
        id: String,
        #[arg(long)]
        period: String,
        #[arg(long)]
        limit_micros: Option<u64>,
    },
    /// Set key ID's requests- and tokens-per-minute limits (omitted: no limit).
    KeyLimits {
        id: String,
        #[arg(long)]
        rpm: Option<u64>,
        #[arg(long)]
        tpm: Option<u64>,
    },
    /// Set an owner's budget (`consumer:ID` or `group:NAME`) over all its keys.
    BudgetOwner {
        owner: String,
        #[arg(long)]
        period: String,
        #[arg(long)]
        limit_micros: Option<u64>,
    },
    /// Spend and reservations per budget counter.
    Spend,
}

fn owner_json(owner: &str) -> anyhow::Result<Value> {
    match owner.split_once(':') {
        Some(("consumer", id)) => Ok(json!({ "consumer": id })),
        Some(("group", name)) => Ok(json!({ "group": name })),
        _ => anyhow::bail!("--owner is consumer:ID or group:NAME, not {owner:?}"),
    }
}

/// The operation as the admin API names it: method, path after `/vault/`, JSON body.
fn request(command: VaultCommand) -> anyhow::Result<(&'static str, String, String)> {
    use VaultCommand::*;
    Ok(match command {
        ProviderAdd { provider } => {
            let mut key = String::new();
            std::io::stdin().read_to_string(&mut key)?;
            let key = key.trim();
            anyhow::ensure!(!key.is_empty(), "no key on standard input");
            (
                "POST",
                format!("providers/{provider}/keys"),
                json!({ "key": key }).to_string(),
            )
        }
        ProviderList => ("GET", "providers".into(), String::new()),
        ProviderRemove { provider, id } => (
            "DELETE",
            format!("providers/{provider}/keys/{id}"),
            String::new(),
        ),
        KeyCreate {
            owner,
            providers,
            models,
            expires_in_secs,
        } => (
            "POST",
            "keys".into(),
            json!({
                "owner": owner_json(&owner)?,
                "providers": providers,
                "models": models,
                "expires_in_secs": expires_in_secs,
            })
            .to_string(),
        ),
        KeyList => ("GET", "keys".into(), String::new()),
        KeyRotate {
            id,
            rotation_id,
            grace_secs,
        } => (
            "POST",
            format!("keys/{id}/rotate"),
            json!({ "rotation_id": rotation_id, "grace_secs": grace_secs }).to_string(),
        ),
        KeyRevoke { id } => ("POST", format!("keys/{id}/revoke"), String::new()),
        BudgetKey {
            id,
            period,
            limit_micros,
        } => (
            "POST",
            format!("keys/{id}/budget"),
            json!({ "period": period, "limit_micros": limit_micros }).to_string(),
        ),
        BudgetOwner {
            owner,
            period,
            limit_micros,
        } => (
            "POST",
            "owners/budget".into(),
            json!({ "owner": owner_json(&owner)?, "period": period, "limit_micros": limit_micros })
                .to_string(),
        ),
        KeyLimits { id, rpm, tpm } => (
            "POST",
            format!("keys/{id}/limits"),
            json!({ "rpm": rpm, "tpm": tpm }).to_string(),
        ),
        Spend => ("GET", "spend".into(), String::new()),
    })
}

/// Runs `command` against the vault of `config`; prints the answer, returns whether it
/// succeeded.
pub fn run(config: &Config, command: VaultCommand) -> anyhow::Result<bool> {
    let Some(vault_config) = &config.vault else {
        anyhow::bail!("the config has no [vault]");
    };
    let (method, path, body) = request(command)?;
    let (status, answer) = match DataDirLock::acquire(&config.quotas.data_dir) {
        Ok(_lock) => {
            // Stopped: the store itself, under the lock (held until this returns).
            let vault = crate::vault::open_configured(
                vault_config,
                config.cluster.as_ref(),
                &config.quotas.data_dir,
            )?;
            let segments: Vec<&str> = path.split('/').collect();
            let answer = super::admin::vault_api::dispatch(
                &vault,
                vault_config.rotation_grace.get(),
                method,
                &segments,
                body.as_bytes(),
                "cli",
            );
            vault.flush_spend()?;
            (answer.status, answer.compact_body())
        }
        Err(crate::state::data_dir::DataDirError::Held { .. }) => {
            let socket = super::control::socket_path(config);
            let reply = super::control::send(&socket, &format!("vault {method} {path} {body}"))
                .map_err(|e| {
                    anyhow::anyhow!(
                        "the gateway holds {} but its control socket {} does not answer: {e}",
                        config.quotas.data_dir.display(),
                        socket.display()
                    )
                })?;
            let (status, json) = reply.split_once(' ').unwrap_or(("500", reply.as_str()));
            (status.parse().unwrap_or(500), json.to_owned())
        }
        Err(e) => return Err(e.into()),
    };
    let pretty = serde_json::from_str::<Value>(&answer)
        .map(|v| serde_json::to_string_pretty(&v).unwrap_or_default())
        .unwrap_or(answer);
    println!("{pretty}");
    Ok((200..300).contains(&status))
}
