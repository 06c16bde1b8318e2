//! Choosing a certificate by SNI: exact names first, then one-label wildcards, then the
//! default (also for clients that send no name).

use std::{collections::HashMap, sync::Arc};

use rustls::{server::ClientHello, server::ResolvesServerCert, sign::CertifiedKey};

#[derive(Debug, Default)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the name with its first label removed (`*.example.com` under `example.com`).
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl SniResolver {
    pub fn add(&mut self, names: &[String], default: bool, key: Arc<CertifiedKey>) {
        for name in names {
            let name = name.to_ascii_lowercase();
            match name.strip_prefix("*.") {
                Some(parent) => self.wildcard.insert(parent.to_owned(), key.clone()),
                None => self.exact.insert(name, key.clone()),
            };
        }
        if default {
            self.default = Some(key);
        }
    }

    /// The certificate for `name` (already lower case, as rustls gives it).
    pub fn find(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let found = name.and_then(|n| {
            self.exact.get(n).or_else(|| {
                let (_, parent) = n.split_once('.')?;
                self.wildcard.get(parent)
            })
        });
        found.or(self.default.as_ref()).cloned()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.find(hello.server_name())
    }
}
