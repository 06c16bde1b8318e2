//! The vault's lines of `/metrics`: spend and reservations per budget counter, requests,
//! tokens and cost per key id, refusals by reason. Key ids and owners are created by
//! operators, so the label sets are bounded.

use std::{fmt::Write, sync::atomic::Ordering};

use super::{provider::VaultRefusal, Vault};

pub fn render(vault: &Vault, out: &mut String) {
    let (minute, counters): (Vec<_>, Vec<_>) = vault
        .ledger
        .snapshot()
        .into_iter()
        .partition(|(k, _, _)| k.period == crate::config::BudgetPeriod::Minute);
    // Per-minute counters count requests (`rpm:` scopes) or tokens (`tpm:`), not money.
    for (prefix, name, help) in [
        (
            "rpm:",
            "portcullis_vault_minute_requests",
            "Requests counted against a per-minute limit this minute (settled and in flight).",
        ),
        (
            "tpm:",
            "portcullis_vault_minute_tokens",
            "Tokens counted against a per-minute limit this minute (settled and in flight).",
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        let now =
            super::ledger::instance(crate::config::BudgetPeriod::Minute, super::now_ms() / 1000);
        for (k, _, committed) in minute.iter().filter(|(k, _, _)| k.instance == now) {
            if let Some(scope) = k.scope.strip_prefix(prefix) {
                let _ = writeln!(out, "{name}{{scope=\"{scope}\"}} {committed}");
            }
        }
    }
    if let Some(cluster) = &vault.cluster {
        let _ = writeln!(out, "# HELP portcullis_vault_cluster_up Whether the cluster's Redis answered the vault's last exchange.\n# TYPE portcullis_vault_cluster_up gauge\nportcullis_vault_cluster_up {}", u8::from(cluster.ledger.healthy()));
        let _ = writeln!(out, "# HELP portcullis_vault_cluster_fallbacks_total Vault requests admitted by this host's ledger alone, Redis not answering in time.\n# TYPE portcullis_vault_cluster_fallbacks_total counter\nportcullis_vault_cluster_fallbacks_total {}", cluster.ledger.fallbacks.load(Ordering::Relaxed));
    }
    let _ = writeln!(out, "# HELP portcullis_vault_spend_micros Spend settled in the current period, in micro-units.\n# TYPE portcullis_vault_spend_micros gauge");
    for (k, settled, _) in &counters {
        let _ = writeln!(
            out,
            "portcullis_vault_spend_micros{{scope=\"{}\",period=\"{:?}\"}} {settled}",
            k.scope, k.period
        );
    }
    let _ = writeln!(out, "# HELP portcullis_vault_reserved_micros Reservations of requests in flight, in micro-units.\n# TYPE portcullis_vault_reserved_micros gauge");
    for (k, settled, committed) in &counters {
        let _ = writeln!(
            out,
            "portcullis_vault_reserved_micros{{scope=\"{}\",period=\"{:?}\"}} {}",
            k.scope,
            k.period,
            committed.saturating_sub(*settled)
        );
    }
    let usage = vault.ledger.usage();
    for (name, help, read) in [
        (
            "portcullis_vault_requests_total",
            "Requests settled, by key id.",
            (|u: &super::ledger::KeyUsage| u.requests.load(Ordering::Relaxed))
                as fn(&super::ledger::KeyUsage) -> u64,
        ),
        (
            "portcullis_vault_input_tokens_total",
            "Prompt tokens reported, by key id.",
            |u| u.input_tokens.load(Ordering::Relaxed),
        ),
        (
            "portcullis_vault_output_tokens_total",
            "Output tokens reported, by key id.",
            |u| u.output_tokens.load(Ordering::Relaxed),
        ),
        (
            "portcullis_vault_cost_micros_total",
            "Cost settled, by key id, in micro-units.",
            |u| u.cost_micros.load(Ordering::Relaxed),
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for (id, u) in &usage {
            let _ = writeln!(out, "{name}{{key=\"{id}\"}} {}", read(u));
        }
    }
    let _ = writeln!(out, "# HELP portcullis_vault_refusals_total Vault requests refused, by reason.\n# TYPE portcullis_vault_refusals_total counter");
    for r in VaultRefusal::ALL {
        let _ = writeln!(
            out,
            "portcullis_vault_refusals_total{{reason=\"{}\"}} {}",
            r.name(),
            vault.refusals[r.index()].load(Ordering::Relaxed)
        );
    }
}
