//! `[admin]` (the admin listener: metrics, API, status page) and `[access_log]`.

use std::{net::SocketAddr, path::PathBuf};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::{key_path, ConfigDuration, Invalid};

/// Where the admin listener listens: a TCP address, or `unix:/path`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminListen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

impl Serialize for AdminListen {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AdminListen::Tcp(a) => s.collect_str(a),
            AdminListen::Unix(p) => s.collect_str(&format_args!("unix:{}", p.display())),
        }
    }
}

impl<'de> Deserialize<'de> for AdminListen {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        if let Some(path) = text.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(de::Error::custom(
                    "`unix:` needs a socket path, such as \"unix:/run/portcullis/admin.sock\"",
                ));
            }
            return Ok(AdminListen::Unix(PathBuf::from(path)));
        }
        text.parse().map(AdminListen::Tcp).map_err(|_| {
            de::Error::custom(format!(
                "{text:?} is neither an address such as \"127.0.0.1:9901\" nor \"unix:/path/to/admin.sock\""
            ))
        })
    }
}

/// `[admin]`: metrics, the admin API and the status page, on their own listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    pub listen: AdminListen,
    /// A file holding the bearer token (its first line, trimmed).
    pub token_file: Option<PathBuf>,
    /// An environment variable holding the bearer token.
    pub token_env: Option<String>,
    /// The window the percentile gauges cover.
    #[serde(default = "default_percentile_window")]
    pub percentile_window: ConfigDuration,
}

fn default_percentile_window() -> ConfigDuration {
    ConfigDuration::from_secs(60)
}

/// Where the access log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stdout,
    File(PathBuf),
}

impl Serialize for AccessLogTarget {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AccessLogTarget::Stdout => s.serialize_str("stdout"),
            AccessLogTarget::File(p) => s.collect_str(&p.display()),
        }
    }
}

impl<'de> Deserialize<'de> for AccessLogTarget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match text.as_str() {
            "" => Err(de::Error::custom("needs \"stdout\" or a file path")),
            "stdout" | "-" => Ok(AccessLogTarget::Stdout),
            _ => Ok(AccessLogTarget::File(PathBuf::from(text))),
        }
    }
}

/// `[access_log]`: one JSON object per request.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// `"stdout"` or a file path (reopened on SIGUSR1, for logrotate).
    pub path: AccessLogTarget,
    /// Log the query string too (it may carry personal data; off by default).
    #[serde(default)]
    pub include_query: bool,
    /// Share of requests logged, from 0 (exclusive) to 1.
    #[serde(default = "default_sample")]
    pub sample: f64,
}

fn default_sample() -> f64 {
    1.0
}

impl AdminConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        let at = || key_path("admin");
        if self.token_file.is_some() && self.token_env.is_some() {
            return Err(Invalid::new(
                at().key("token_env"),
                "set either `token_file` or `token_env`, not both",
            ));
        }
        if matches!(self.listen, AdminListen::Tcp(_))
            && self.token_file.is_none()
            && self.token_env.is_none()
        {
            return Err(Invalid::new(
                at().key("listen"),
                "a TCP admin listener needs a bearer token: set `token_file` or `token_env` (only a `unix:` listener may go without one)",
            ));
        }
        let window = self.percentile_window.get();
        if window < std::time::Duration::from_secs(10)
            || window > std::time::Duration::from_secs(3600)
        {
            return Err(Invalid::new(
                at().key("percentile_window"),
                "must be from \"10s\" to \"1h\"",
            ));
        }
        Ok(())
    }
}

impl AccessLogConfig {
    pub fn validate(&self) -> Result<(), Invalid> {
        if !(self.sample > 0.0 && self.sample <= 1.0) {
            return Err(Invalid::new(
                key_path("access_log").key("sample"),
                "must be above 0 and at most 1, such as 0.1 for one request in ten",
            ));
        }
        Ok(())
    }
}
