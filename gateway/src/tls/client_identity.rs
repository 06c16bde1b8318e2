//! The identity a verified client certificate proves: its subject, in RFC 4514 form (as
//! `openssl x509 -noout -subject -nameopt RFC2253` prints it, most specific part first), and
//! its subject alternative names. Read once per connection, after the handshake verified the
//! chain; consumers list the subjects or names that identify them.

use std::net::IpAddr;

use x509_cert::{
    der::Decode,
    ext::pkix::{name::GeneralName, SubjectAltName},
    Certificate,
};

/// Longest subject passed upstream; longer ones are cut (the consumer match uses the whole).
const MAX_HEADER_SUBJECT_BYTES: usize = 1024;

/// What a verified client certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// `CN=client-a,O=Acme,C=DE`.
    pub subject: String,
    /// DNS names, URIs, e-mail addresses and IP addresses, as written in the certificate.
    pub sans: Vec<String>,
    /// `subject`, safe in a header: bytes outside visible ASCII and `%` are percent-encoded.
    pub header_value: String,
}

/// The identity of the leaf certificate `der`; `None` if it cannot be parsed (rustls verified
/// it, so that does not happen for a certificate a handshake accepted).
pub fn from_certificate(der: &[u8]) -> Option<ClientIdentity> {
    let cert = Certificate::from_der(der).ok()?;
    let tbs = &cert.tbs_certificate;
    let subject = tbs.subject.to_string();
    let mut sans = Vec::new();
    if let Ok(Some((_, SubjectAltName(names)))) = tbs.get::<SubjectAltName>() {
        for name in names {
            match name {
                GeneralName::DnsName(n) => sans.push(n.as_str().to_ascii_lowercase()),
                GeneralName::Rfc822Name(n) | GeneralName::UniformResourceIdentifier(n) => {
                    sans.push(n.as_str().to_owned())
                }
                GeneralName::IpAddress(octets) => {
                    let b = octets.as_bytes();
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(b).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(b).ok().map(IpAddr::from),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        sans.push(ip.to_string());
                    }
                }
                _ => {}
            }
        }
    }
    let header_value = header_safe(&subject);
    Some(ClientIdentity {
        subject,
        sans,
        header_value,
    })
}

fn header_safe(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if out.len() >= MAX_HEADER_SUBJECT_BYTES {
            break;
        }
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_never_carry_control_bytes() {
        assert_eq!(header_safe("CN=a,O=Acme"), "CN=a,O=Acme");
        assert_eq!(header_safe("CN=a\r\nX: y"), "CN=a%0D%0AX: y");
        assert_eq!(header_safe("CN=Jörg 100%"), "CN=J%C3%B6rg 100%25");
    }

    #[test]
    fn garbage_is_no_identity() {
        assert_eq!(from_certificate(b"not a certificate"), None);
    }
}
