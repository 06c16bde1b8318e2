//! TLS termination profiles: `[tls.NAME]` compiled into a rustls server config (ring
//! provider; TLS 1.2 and 1.3 with rustls's default suites, all AEAD with forward secrecy; no
//! 0-RTT; ALPN `http/1.1`, so a client offering only `h2` gets `no_application_protocol`),
//! with certificates chosen by SNI, a session cache and session tickets whose rotating keys
//! every worker shares (one `ServerConfig` per profile, behind an `Arc`), or keys from a file
//! several hosts share; optionally client certificates verified against a CA (and CRLs).

pub mod client;
pub mod client_identity;
pub mod resolver;
pub mod ticket_keys;

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use rustls::{
    crypto::ring as provider,
    pki_types::{pem::PemObject, CertificateDer, CertificateRevocationListDer, PrivateKeyDer},
    server::{ServerSessionMemoryCache, WebPkiClientVerifier},
    sign::CertifiedKey,
    ServerConfig,
};

use crate::config::{CertificateConfig, ClientCertificatesConfig, TlsConfig, TlsVersion};

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
    #[error("tls.{profile}.ticket_keys: {reason}")]
    TicketKeys {
        profile: String,
        reason: ticket_keys::TicketKeyError,
    },
    #[error("tls.{profile}.client_certificates: cannot read {path}: {reason}")]
    ClientCa {
        profile: String,
        path: String,
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
    /// Where a verified client certificate's subject goes upstream, when client certificates
    /// are asked for.
    pub identity_header: Option<Arc<str>>,
    /// Whether the ticket keys are this process's own (random, rotating), kept across reloads.
    own_ticketer: bool,
    /// The client-certificate verifier and whether a certificate is required, when client
    /// certificates are asked for: a resumed session's chain is verified again with them.
    client_verifier: Option<(Arc<dyn rustls::server::danger::ClientCertVerifier>, bool)>,
}

impl TlsProfile {
    /// Judges the client chain of a finished handshake. A full handshake was verified by
    /// rustls; a resumed one carries the chain verified when its session began (maybe under
    /// another CA file or CRL, before a revocation, before expiry), so it is verified again
    /// now, and a session made without a certificate does not pass where one is required.
    pub fn admit_client_chain(
        &self,
        chain: Option<&[CertificateDer<'static>]>,
        resumed: bool,
    ) -> Result<(), rustls::Error> {
        let Some((verifier, required)) = &self.client_verifier else {
            return Ok(());
        };
        if !resumed {
            return Ok(());
        }
        match chain {
            None if *required => Err(rustls::Error::NoCertificatesPresented),
            None => Ok(()),
            Some(chain) => verifier
                .verify_client_cert(&chain[0], &chain[1..], rustls::pki_types::UnixTime::now())
                .map(drop),
        }
    }
}

/// The CAs of a PEM file, for verifying peers (clients here, servers in [`client`]); the
/// reason when it cannot be read or holds no usable certificate.
pub(crate) fn read_ca_file(path: &std::path::Path) -> Result<rustls::RootCertStore, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| e.to_string())?;
    let mut roots = rustls::RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err("no usable CERTIFICATE block in the file".into());
    }
    Ok(roots)
}

/// Verifies client certificates against `c.ca` and its CRLs; optional unless `required`.
fn client_verifier(
    profile: &str,
    c: &ClientCertificatesConfig,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, TlsError> {
    let read_err = |path: &std::path::Path, reason: String| TlsError::ClientCa {
        profile: profile.to_owned(),
        path: path.display().to_string(),
        reason,
    };
    let roots = read_ca_file(&c.ca).map_err(|reason| read_err(&c.ca, reason))?;
    let mut crls = Vec::new();
    for path in &c.crls {
        let list = CertificateRevocationListDer::pem_file_iter(path)
            .and_then(|it| it.collect::<Result<Vec<_>, _>>())
            .map_err(|e| read_err(path, e.to_string()))?;
        if list.is_empty() {
            return Err(read_err(path, "no X509 CRL block in the file".into()));
        }
        crls.extend(list);
    }
    let mut builder = WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        Arc::new(provider::default_provider()),
    )
    .with_crls(crls)
    // The client's own certificate is checked against its issuer's CRL (a chain's
    // intermediates need no CRL of their own), and a CRL past its next update no longer
    // vouches for anyone: renew it (the file is watched).
    .only_check_end_entity_revocation()
    .enforce_revocation_expiration();
    if !c.required {
        builder = builder.allow_unauthenticated();
    }
    builder.build().map_err(|e| TlsError::Config {
        profile: profile.to_owned(),
        reason: format!("client_certificates: {e}"),
    })
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
    let builder = ServerConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_protocol_versions(versions)
        .map_err(cfg_err)?;
    let verifier = config
        .client_certificates
        .as_ref()
        .map(|c| Ok::<_, TlsError>((client_verifier(name, c)?, c.required)))
        .transpose()?;
    let builder = match &verifier {
        None => builder.with_no_client_auth(),
        Some((v, _)) => builder.with_client_cert_verifier(v.clone()),
    };
    let mut server = builder.with_cert_resolver(Arc::new(resolver));
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    server.max_early_data_size = 0;
    server.session_storage = match previous {
        Some(p) => p.server.session_storage.clone(),
        None => ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES),
    };
    server.ticketer = match (&config.ticket_keys, previous) {
        // Read again each time: a reload or a changed file brings rotated keys.
        (Some(path), _) => Arc::new(ticket_keys::FileTicketer::load(path).map_err(|reason| {
            TlsError::TicketKeys {
                profile: name.to_owned(),
                reason,
            }
        })?),
        (None, Some(p)) if p.own_ticketer => p.server.ticketer.clone(),
        (None, _) => provider::Ticketer::new().map_err(cfg_err)?,
    };
    Ok(TlsProfile {
        server: Arc::new(server),
        handshake_timeout: config.handshake_timeout.get(),
        hsts: config.hsts.as_deref().map(Arc::from),
        identity_header: config
            .client_certificates
            .as_ref()
            .map(|c| Arc::from(c.identity_header.to_ascii_lowercase())),
        own_ticketer: config.ticket_keys.is_none(),
        client_verifier: verifier,
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
