//! TLS termination profiles: `[tls.NAME]` compiled into a rustls server config (ring
//! provider; TLS 1.2 and 1.3 with rustls's default suites, all AEAD with forward secrecy; no
//! 0-RTT; ALPN `http/1.1`, so a client offering only `h2` gets `no_application_protocol`),
//! with certificates chosen by SNI, a session cache and session tickets whose rotating keys
//! every worker shares (one `ServerConfig` per profile, behind an `Arc`).

pub mod resolver;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use rustls::{
    crypto::ring as provider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    server::ServerSessionMemoryCache,
    sign::CertifiedKey,
    ServerConfig,
};

use crate::config::{CertificateConfig, TlsConfig, TlsVersion};

/// Sessions remembered for resumption by ID (TLS 1.2), per profile.
const SESSION_CACHE_ENTRIES: usize = 4096;

/// Why a profile could not be built; names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("tls.{profile}: cannot read the certificate chain {path}: {reason}")]
    Chain {
        profile: String,
        path: String,
        reason: String,
    },
    #[error("tls.{profile}: cannot read the private key {path}: {reason}")]
    Key {
        profile: String,
        path: String,
        reason: String,
    },
    #[error("tls.{profile}: the key {key} does not match the certificate {cert}, or its type is not supported: {reason}")]
    Mismatch {
        profile: String,
        cert: String,
        key: String,
        reason: String,
    },
    #[error("tls.{profile}: {reason}")]
    Config { profile: String, reason: String },
}

/// A compiled profile.
#[derive(Debug)]
pub struct TlsProfile {
    pub server: Arc<ServerConfig>,
    pub handshake_timeout: Duration,
    /// The Strict-Transport-Security value, when set.
    pub hsts: Option<Arc<str>>,
}

fn certified_key(profile: &str, c: &CertificateConfig) -> Result<CertifiedKey, TlsError> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c.cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Chain {
            profile: profile.to_owned(),
            path: c.cert.display().to_string(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Chain {
            profile: profile.to_owned(),
            path: c.cert.display().to_string(),
            reason: "no CERTIFICATE block in the file".to_owned(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&c.key).map_err(|e| TlsError::Key {
        profile: profile.to_owned(),
        path: c.key.display().to_string(),
        reason: e.to_string(),
    })?;
    let mismatch = |reason: String| TlsError::Mismatch {
        profile: profile.to_owned(),
        cert: c.cert.display().to_string(),
        key: c.key.display().to_string(),
        reason,
    };
    let signing = provider::sign::any_supported_type(&key).map_err(|e| mismatch(e.to_string()))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| mismatch(e.to_string()))?;
    Ok(certified)
}

/// Compiles profile `name`: reads every chain and key now, so a bad file refuses the config
/// (at start, or on reload while the old profile keeps serving). A profile succeeding
/// `previous` (same name, after a reload) keeps its ticket keys and session cache, so clients
/// resume across reloads.
pub fn build(
    name: &str,
    config: &TlsConfig,
    previous: Option<&TlsProfile>,
) -> Result<TlsProfile, TlsError> {
    let mut resolver = resolver::SniResolver::default();
    for c in &config.certificates {
        resolver.add(&c.names, c.default, Arc::new(certified_key(name, c)?));
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match config.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let cfg_err = |e: rustls::Error| TlsError::Config {
        profile: name.to_owned(),
        reason: e.to_string(),
    };
    let mut server = ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_protocol_versions(versions)
        .map_err(cfg_err)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    server.max_early_data_size = 0;
    match previous {
        Some(p) => {
            server.session_storage = p.server.session_storage.clone();
            server.ticketer = p.server.ticketer.clone();
        }
        None => {
            server.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
            server.ticketer = provider::Ticketer::new().map_err(cfg_err)?;
        }
    }
    Ok(TlsProfile {
        server: Arc::new(server),
        handshake_timeout: config.handshake_timeout.get(),
        hsts: config.hsts.as_deref().map(Arc::from),
    })
}

/// Every profile of a config; those `previous` has by name keep their tickets and sessions.
pub fn build_all(
    profiles: &BTreeMap<String, TlsConfig>,
    previous: Option<&BTreeMap<String, Arc<TlsProfile>>>,
) -> Result<BTreeMap<String, Arc<TlsProfile>>, TlsError> {
    profiles
        .iter()
        .map(|(name, c)| {
            let before = previous.and_then(|p| p.get(name)).map(Arc::as_ref);
            Ok((name.clone(), Arc::new(build(name, c, before)?)))
        })
        .collect()
}
