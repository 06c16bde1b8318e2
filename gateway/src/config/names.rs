//! Stable names for what carries state: route ids and the names of limits and quotas. Counts
//! (persisted quotas, shared cluster counters) are keyed by these, never by positions in the
//! file, so reordering routes or editing an unrelated one keeps every count.
//!
//! A route's id is its explicit `id`, else derived from what it matches:
//! `{host}{path}` for an exact path, `{host}{prefix}*` for a prefix, `{host}*` without a path,
//! then ` ` and the sorted methods joined with `,` when it lists methods. For example
//! `api.example.com/v1/* GET,POST`, `/healthz`, `*`. A limit's default name is
//! `{key}-{rate}-per-{per}` (such as `client-100-per-1s`), a quota's `{key}-{limit}-per-{period}`
//! (such as `consumer-1000-per-day`), with characters that are not token characters as `-`.

use super::{LimitConfig, QuotaConfig, QuotaPeriod, RouteConfig};

impl RouteConfig {
    /// The route's stable id: explicit, or derived from its match.
    pub fn stable_id(&self) -> String {
        if let Some(id) = &self.id {
            return id.clone();
        }
        let m = &self.matcher;
        let mut id = m.host.clone().unwrap_or_default().to_ascii_lowercase();
        match (&m.path, &m.path_prefix) {
            (Some(p), _) => id.push_str(p),
            (None, Some(p)) => {
                id.push_str(p);
                id.push('*');
            }
            (None, None) => match &m.path_regex {
                Some(r) => {
                    id.push('~');
                    id.push_str(r);
                }
                None => id.push('*'),
            },
        }
        if let Some(methods) = &m.methods {
            let mut methods = methods.clone();
            methods.sort();
            methods.dedup();
            id.push(' ');
            id.push_str(&methods.join(","));
        }
        id
    }
}

fn tokenised(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if super::is_token_byte(b) && b != b'.' {
                b.to_ascii_lowercase() as char
            } else {
                '-'
            }
        })
        .collect()
}

impl LimitConfig {
    /// The limit's name: explicit, or derived from its settings.
    pub fn stable_name(&self) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| tokenised(&format!("{}-{}-per-{}", self.key, self.rate, self.per)))
    }
}

impl QuotaConfig {
    /// The quota's name: explicit, or derived from its settings.
    pub fn stable_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let period = match self.period {
                QuotaPeriod::Day => "day",
                QuotaPeriod::Month => "month",
            };
            tokenised(&format!("{}-{}-per-{period}", self.key, self.limit))
        })
    }
}

/// True for an explicit route id: printable ASCII (spaces allowed), 1 to 200 bytes.
pub fn valid_route_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 200
        && id.bytes().all(|b| (b' '..=b'~').contains(&b))
        // The metrics' label for requests no route matched.
        && id != "(none)"
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    #[test]
    fn derived_names() {
        let c = Config::parse(
            Path::new("t.toml"),
            "[upstreams.u]\nservers = [\"127.0.0.1:9\"]\n\
             [[routes]]\nmatch = { host = \"API.example.com\", path_prefix = \"/v1/\", methods = [\"POST\", \"GET\"] }\nupstream = \"u\"\n\
             limits = [{ key = \"header:X-Tenant\", rate = 100, per = \"1m\" }]\n\
             quotas = [{ limit = 1000, period = \"day\" }]\n\
             [[routes]]\nmatch = { path = \"/healthz\" }\nrespond = { status = 200 }\n\
             [[routes]]\nid = \"everything else\"\nupstream = \"u\"\n",
        )
        .unwrap();
        let ids: Vec<String> = c.routes.iter().map(|r| r.stable_id()).collect();
        assert_eq!(
            ids,
            [
                "api.example.com/v1/* GET,POST",
                "/healthz",
                "everything else"
            ]
        );
        assert_eq!(
            c.routes[0].limits[0].stable_name(),
            "header-x-tenant-100-per-60s"
        );
        assert_eq!(c.routes[0].quotas[0].stable_name(), "consumer-1000-per-day");
    }
}
