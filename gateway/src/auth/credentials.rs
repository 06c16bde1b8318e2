//! Finding the credential in a request: the API key header, `Authorization: Bearer`, or (when
//! configured) a query parameter. Values are borrowed from the read buffer.

use crate::{config::AuthConfig, http::request::RequestHead};

/// Where the credential was found, so it can be stripped before forwarding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialSource {
    Header,
    Bearer,
    Query,
}

#[derive(Debug, Clone, Copy)]
pub struct Credential<'b> {
    pub value: &'b [u8],
    pub source: CredentialSource,
}

/// The first credential present, in order: API key header, Bearer token, query parameter.
pub fn find_credential<'b>(
    req: &RequestHead<'b, '_>,
    config: &AuthConfig,
) -> Option<Credential<'b>> {
    for h in req.headers {
        if h.name.eq_ignore_ascii_case(&config.api_key_header) {
            return Some(Credential {
                value: crate::http::fields::trim_ows(h.value),
                source: CredentialSource::Header,
            });
        }
    }
    for h in req.headers {
        if h.name.eq_ignore_ascii_case("authorization") {
            let v = crate::http::fields::trim_ows(h.value);
            if v.len() > 7 && v[..7].eq_ignore_ascii_case(b"bearer ") {
                return Some(Credential {
                    value: crate::http::fields::trim_ows(&v[7..]),
                    source: CredentialSource::Bearer,
                });
            }
        }
    }
    let name = config.api_key_query.as_deref()?;
    query_param(req.query, name).map(|value| Credential {
        value,
        source: CredentialSource::Query,
    })
}

/// The value of `name` in `?a=1&name=value`, as written (keys need no percent-decoding).
pub fn query_param<'b>(query: &'b [u8], name: &str) -> Option<&'b [u8]> {
    query
        .strip_prefix(b"?")?
        .split(|b| *b == b'&')
        .find_map(|pair| {
            let (k, v) = match pair.iter().position(|b| *b == b'=') {
                Some(eq) => (&pair[..eq], &pair[eq + 1..]),
                None => (pair, &pair[pair.len()..]),
            };
            (k == name.as_bytes()).then_some(v)
        })
}

#[cfg(test)]
mod tests {
    use super::query_param;

    #[test]
    fn query_params() {
        assert_eq!(
            query_param(b"?a=1&api_key=xyz&b", "api_key"),
            Some(&b"xyz"[..])
        );
        assert_eq!(query_param(b"?api_keyx=1", "api_key"), None);
        assert_eq!(query_param(b"", "api_key"), None);
    }
}
