//! `[vault]`: the LLM key vault's master key source, rotation grace, and the providers whose
//! real keys it keeps; routes name a provider with `vault = "NAME"`.

use std::{collections::BTreeMap, path::PathBuf};

use serde::{Deserialize, Serialize};

use super::{key_path, ConfigDuration, Invalid};

/// How a provider takes its key and shapes its errors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    /// `Authorization: Bearer KEY`.
    Openai,
    /// Any API that speaks OpenAI's: the same header and error shape.
    OpenaiCompatible,
    /// `x-api-key: KEY` and `anthropic-version`.
    Anthropic,
    /// Azure OpenAI: `api-key: KEY`.
    Azure,
}

/// The period a spend budget counts over (UTC days and months).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum BudgetPeriod {
    /// A UTC minute (fixed windows), as requests- and tokens-per-minute limits count.
    Minute,
    Day,
    Month,
    Total,
}

/// `[vault.prices.MODEL]`: what a million tokens cost, in micro-units of the currency
/// (`input = 150000` is 0.15 per million input tokens).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub input: u64,
    pub output: u64,
    /// Cached prompt tokens read (default: the input price).
    pub cache_read: Option<u64>,
    /// Prompt tokens written to the cache (default: the input price).
    pub cache_write: Option<u64>,
}

/// `[vault.providers.NAME]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub kind: ProviderKind,
    /// Sent as `anthropic-version` when the client sends none (Anthropic only).
    #[serde(default = "default_anthropic_version")]
    pub anthropic_version: String,
    /// Add `stream_options.include_usage` to streamed completions that lack it (and withhold
    /// the usage event from the client). Default: on for `openai`, off for the others (older
    /// Azure API versions and some compatible servers refuse the field).
    pub stream_usage: Option<bool>,
}

impl ProviderConfig {
    pub fn adds_stream_usage(&self) -> bool {
        self.stream_usage
            .unwrap_or(self.kind == ProviderKind::Openai)
    }
}

fn default_anthropic_version() -> String {
    "2023-06-01".to_owned()
}

/// `[vault]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VaultConfig {
    /// A file of 64 hex digits (`openssl rand -hex 32`), mode 0600; or `master_key_env`.
    pub master_key_file: Option<PathBuf>,
    /// An environment variable holding the 64 hex digits.
    pub master_key_env: Option<String>,
    /// How long a rotated key's previous secret keeps working, unless a rotation says.
    #[serde(default = "default_rotation_grace")]
    pub rotation_grace: ConfigDuration,
    pub providers: BTreeMap<String, ProviderConfig>,
    /// Prices by model name, for budgets; a model without a price cannot be used by a key
    /// under a budget.
    #[serde(default)]
    pub prices: BTreeMap<String, ModelPrice>,
    /// The output a request is reserved for when it names no `max_tokens`.
    #[serde(default = "default_output_tokens")]
    pub default_output_tokens: u64,
    /// What consumers may do with their own keys on `vault_self_service` routes.
    #[serde(default)]
    pub self_service: SelfServiceConfig,
}

/// `[vault.self_service]`: the allowance of a consumer managing its own virtual keys.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SelfServiceConfig {
    /// Providers its keys may call; a key asks for some of these (default: all of them).
    pub providers: Vec<String>,
    /// Models its keys may use; empty: any.
    pub models: Vec<String>,
    /// The budget every key it creates gets (it cannot ask for more).
    pub key_budget: Option<SelfServiceBudget>,
    /// Keys it may hold at once (revoked ones do not count).
    pub max_keys: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SelfServiceBudget {
    pub period: BudgetPeriod,
    pub limit_micros: u64,
}

impl Default for SelfServiceConfig {
    fn default() -> Self {
        SelfServiceConfig {
            providers: Vec::new(),
            models: Vec::new(),
            key_budget: None,
            max_keys: 10,
        }
    }
}

fn default_output_tokens() -> u64 {
    4096
}

fn default_rotation_grace() -> ConfigDuration {
    ConfigDuration::from_secs(24 * 60 * 60)
}

impl VaultConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        let at = || key_path("vault");
        match (&self.master_key_file, &self.master_key_env) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(Invalid::new(
                    at().key("master_key_file"),
                    "set exactly one of master_key_file and master_key_env (never the key itself)",
                ))
            }
            _ => {}
        }
        if self.providers.is_empty() {
            return Err(Invalid::new(
                at().key("providers"),
                "needs at least one provider, such as [vault.providers.openai] kind = \"openai\"",
            ));
        }
        for (i, p) in self.self_service.providers.iter().enumerate() {
            if !self.providers.contains_key(p) {
                return Err(Invalid::new(
                    at().key("self_service").key("providers").index(i),
                    format!("no provider named `{p}` in [vault.providers]"),
                ));
            }
        }
        for (name, p) in &self.providers {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(Invalid::new(
                    at().key("providers").key(name),
                    "a provider name is letters, digits, - and _",
                ));
            }
            if !p
                .anthropic_version
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            {
                return Err(Invalid::new(
                    at().key("providers").key(name).key("anthropic_version"),
                    "a version such as \"2023-06-01\"",
                ));
            }
        }
        Ok(())
    }
}
