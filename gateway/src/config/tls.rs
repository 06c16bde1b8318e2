//! Listen addresses (plain, or carrying a TLS profile) and `[tls.NAME]` profiles: certificate
//! chains and keys chosen by SNI, protocol versions, the handshake timeout.

use std::{net::SocketAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use super::{key_path, ConfigDuration, Invalid};

/// One listen address: `"127.0.0.1:8080"`, or `{ address = "0.0.0.0:443", tls = "public" }`
/// for a TLS listener using the profile `[tls.public]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Listen {
    pub address: SocketAddr,
    pub tls: Option<String>,
    /// A plaintext listener that answers every request with a 308 to `https://` on this port.
    pub redirect_https: Option<u16>,
    /// Connections from `server.trusted_proxies` start with a PROXY protocol header (v1 or
    /// v2) naming the real client.
    pub proxy_protocol: bool,
}

/// How a listener's connections are served.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListenMode {
    pub tls: Option<String>,
    pub redirect_https: Option<u16>,
    pub proxy_protocol: bool,
}

impl Listen {
    pub fn mode(&self) -> ListenMode {
        ListenMode {
            tls: self.tls.clone(),
            redirect_https: self.redirect_https,
            proxy_protocol: self.proxy_protocol,
        }
    }
}

impl<'de> Deserialize<'de> for Listen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Table {
            address: SocketAddr,
            tls: Option<String>,
            redirect_https: Option<u16>,
            #[serde(default)]
            proxy_protocol: bool,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Plain(SocketAddr),
            Table(Table),
        }
        match Form::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "a listen entry is an address such as \"127.0.0.1:8080\", { address = \"0.0.0.0:443\", tls = \"PROFILE\" }, or { address = \"0.0.0.0:80\", redirect_https = 443 }",
            )
        })? {
            Form::Plain(address) => Ok(Listen::from(address)),
            Form::Table(t) => Ok(Listen {
                address: t.address,
                tls: t.tls,
                redirect_https: t.redirect_https,
                proxy_protocol: t.proxy_protocol,
            }),
        }
    }
}

impl From<SocketAddr> for Listen {
    fn from(address: SocketAddr) -> Listen {
        Listen {
            address,
            tls: None,
            redirect_https: None,
            proxy_protocol: false,
        }
    }
}

/// Lowest TLS version a profile accepts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    #[serde(rename = "1.3")]
    Tls13,
}

/// One certificate chain and its key (PEM files).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// The chain, leaf first.
    pub cert: PathBuf,
    /// Its private key (PKCS#8, PKCS#1 or SEC1; RSA, ECDSA or Ed25519).
    pub key: PathBuf,
    /// The SNI names it answers: exact (`api.example.com`) or wildcard (`*.example.com`, one
    /// label).
    #[serde(default)]
    pub names: Vec<String>,
    /// Answers clients that send no SNI name or one no certificate lists.
    #[serde(default)]
    pub default: bool,
}

/// `[tls.NAME]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub certificates: Vec<CertificateConfig>,
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Longest a client may take to complete the handshake.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout: ConfigDuration,
    /// `Strict-Transport-Security` sent on every answer over this profile, such as
    /// `"max-age=31536000; includeSubDomains"`.
    pub hsts: Option<String>,
    /// Session-ticket keys from a file shared by several hosts (see
    /// [`crate::tls::ticket_keys`]); default: random keys of this process, rotated every six
    /// hours, shared by its workers.
    pub ticket_keys: Option<PathBuf>,
    /// Client certificates (mutual TLS), verified against a CA.
    pub client_certificates: Option<ClientCertificatesConfig>,
}

/// `[tls.NAME.client_certificates]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientCertificatesConfig {
    /// PEM file of the CAs that issue client certificates.
    pub ca: PathBuf,
    /// PEM files of certificate revocation lists; a revoked certificate fails the handshake.
    #[serde(default)]
    pub crls: Vec<PathBuf>,
    /// Whether a client must present a certificate (else the handshake fails); when false a
    /// client without one is served, and routes decide (`auth.methods = ["mtls"]`).
    #[serde(default = "default_true")]
    pub required: bool,
    /// The header that carries the verified subject upstream (`CN=a,O=Acme`); any copy a
    /// client sends is removed on every listener.
    #[serde(default = "default_identity_header")]
    pub identity_header: String,
}

fn default_true() -> bool {
    true
}

fn default_identity_header() -> String {
    "x-client-cert-subject".to_owned()
}

impl TlsConfig {
    /// Every file the profile reads (watched for changes).
    pub fn files(&self) -> Vec<&PathBuf> {
        let mut out: Vec<&PathBuf> = self
            .certificates
            .iter()
            .flat_map(|c| [&c.cert, &c.key])
            .collect();
        out.extend(&self.ticket_keys);
        if let Some(c) = &self.client_certificates {
            out.push(&c.ca);
            out.extend(&c.crls);
        }
        out
    }
}

fn default_handshake_timeout() -> ConfigDuration {
    ConfigDuration::from_secs(10)
}

impl TlsConfig {
    pub fn validate(&self, name: &str) -> Result<(), Invalid> {
        let at = || key_path("tls").key(name);
        if self.certificates.is_empty() {
            return Err(Invalid::new(
                at().key("certificates"),
                "needs at least one { cert = \"chain.pem\", key = \"key.pem\", names = [...] }",
            ));
        }
        if self.certificates.iter().filter(|c| c.default).count() > 1 {
            return Err(Invalid::new(
                at().key("certificates"),
                "at most one certificate may be the default",
            ));
        }
        for (i, c) in self.certificates.iter().enumerate() {
            if c.names.is_empty() && !c.default {
                return Err(Invalid::new(
                    at().key("certificates").index(i).key("names"),
                    "list the SNI names this certificate answers, or make it the default",
                ));
            }
            for n in &c.names {
                let bare = n.strip_prefix("*.").unwrap_or(n);
                let ok = !bare.is_empty()
                    && !bare.contains('*')
                    && bare
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
                if !ok {
                    return Err(Invalid::new(
                        at().key("certificates").index(i).key("names"),
                        format!("{n:?} is not a host name or a one-label wildcard such as \"*.example.com\""),
                    ));
                }
            }
        }
        if let Some(h) = &self.hsts {
            let ok = h.starts_with("max-age=") && h.bytes().all(|b| (0x20..0x7f).contains(&b));
            if !ok {
                return Err(Invalid::new(
                    at().key("hsts"),
                    "must be a Strict-Transport-Security value such as \"max-age=31536000; includeSubDomains\"",
                ));
            }
        }
        if let Some(c) = &self.client_certificates {
            let at_header = || at().key("client_certificates").key("identity_header");
            if c.identity_header.is_empty() || !c.identity_header.bytes().all(super::is_token_byte)
            {
                return Err(Invalid::new(
                    at_header(),
                    "must be a header name such as \"x-client-cert-subject\"",
                ));
            }
            // Framing, routing and gateway-owned fields: a second copy would smuggle or lie.
            const RESERVED: [&str; 18] = [
                "host",
                "content-length",
                "transfer-encoding",
                "connection",
                "keep-alive",
                "te",
                "trailer",
                "upgrade",
                "proxy-connection",
                "expect",
                "authorization",
                "cookie",
                "via",
                "x-forwarded-for",
                "x-forwarded-proto",
                "x-request-id",
                "traceparent",
                "tracestate",
            ];
            let lower = c.identity_header.to_ascii_lowercase().replace('_', "-");
            if RESERVED.contains(&lower.as_str()) || lower.starts_with("x-consumer-") {
                return Err(Invalid::new(
                    at_header(),
                    format!(
                        "`{}` is a field HTTP framing or the gateway owns; choose another, such as \"x-client-cert-subject\"",
                        c.identity_header
                    ),
                ));
            }
        }
        if self.handshake_timeout.get().is_zero() {
            return Err(Invalid::new(
                at().key("handshake_timeout"),
                "must be longer than zero, such as \"10s\"",
            ));
        }
        Ok(())
    }
}
