//! TLS to upstream servers: a rustls client config per upstream (ring provider, TLS 1.2 and
//! 1.3, ALPN `http/1.1`), verifying servers against a CA file or the Mozilla roots, with an
//! optional client certificate. Each worker clones it with its own resumption cache, so no
//! session lock is shared between cores.

use std::sync::Arc;

use rustls::{
    client::Resumption,
    crypto::ring as provider,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ClientConfig, RootCertStore,
};

use crate::config::UpstreamTlsConfig;

/// Sessions a worker remembers per upstream for resumption.
const RESUMPTION_ENTRIES: usize = 256;

/// Why an upstream's TLS settings could not be used; names the upstream and the file.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamTlsError {
    #[error("upstreams.{upstream}.tls.ca: cannot read {path}: {reason}")]
    Ca {
        upstream: String,
        path: String,
        reason: String,
    },
    #[error("upstreams.{upstream}.tls.key: cannot read {key}: {reason}")]
    ClientKey {
        upstream: String,
        key: String,
        reason: String,
    },
    #[error("upstreams.{upstream}.tls.cert: cannot use {cert} with {key}: {reason}")]
    ClientCert {
        upstream: String,
        cert: String,
        key: String,
        reason: String,
    },
    #[error("upstreams.{upstream}.tls: {reason}")]
    Config {
        upstream: String,
        reason: rustls::Error,
    },
}

/// Builds the client config for upstream `name`.
pub fn build(
    name: &str,
    config: &UpstreamTlsConfig,
) -> Result<Arc<ClientConfig>, UpstreamTlsError> {
    let roots = match &config.ca {
        Some(path) => super::read_ca_file(path).map_err(|reason| UpstreamTlsError::Ca {
            upstream: name.to_owned(),
            path: path.display().to_string(),
            reason,
        })?,
        None => {
            let mut roots = RootCertStore::empty();
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            roots
        }
    };
    let builder = ClientConfig::builder_with_provider(Arc::new(provider::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|reason| UpstreamTlsError::Config {
            upstream: name.to_owned(),
            reason,
        })?
        .with_root_certificates(roots);
    let mut client = match (&config.cert, &config.key) {
        (Some(cert), Some(key)) => {
            let cert_err = |reason: String| UpstreamTlsError::ClientCert {
                upstream: name.to_owned(),
                cert: cert.display().to_string(),
                key: key.display().to_string(),
                reason,
            };
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|e| cert_err(e.to_string()))?;
            let key =
                PrivateKeyDer::from_pem_file(key).map_err(|e| UpstreamTlsError::ClientKey {
                    upstream: name.to_owned(),
                    key: key.display().to_string(),
                    reason: e.to_string(),
                })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| cert_err(e.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    client.enable_early_data = false;
    Ok(Arc::new(client))
}

/// A worker's copy of `shared`, with a resumption cache of its own.
pub fn for_worker(shared: &ClientConfig) -> Arc<ClientConfig> {
    let mut mine = shared.clone();
    mine.resumption = Resumption::in_memory_sessions(RESUMPTION_ENTRIES);
    Arc::new(mine)
}
