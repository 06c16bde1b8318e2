//! The identity a verified client certificate proves: its subject, written exactly as
//! `openssl x509 -noout -subject -nameopt RFC2253` prints it (RFC 2253/4514: most specific
//! part first, OpenSSL's attribute names, bytes beyond ASCII as `\XX`), so operators copy it
//! from there; and its subject alternative names. Read once per connection, after the
//! handshake verified the chain; consumers list the subjects or names that identify them.

use std::{fmt::Write, net::IpAddr};

use x509_cert::{
    der::{asn1::Any, Decode, Encode, Tag, Tagged},
    ext::pkix::{name::GeneralName, SubjectAltName},
    name::Name,
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
    let subject = rfc2253(&tbs.subject);
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

/// OpenSSL's short names for the attributes subjects use (`FN_SN`); others print dotted.
fn attribute_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.4" => "SN",
        "2.5.4.5" => "serialNumber",
        "2.5.4.6" => "C",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.9" => "street",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.12" => "title",
        "2.5.4.15" => "businessCategory",
        "2.5.4.17" => "postalCode",
        "2.5.4.42" => "GN",
        "2.5.4.43" => "initials",
        "2.5.4.44" => "generationQualifier",
        "2.5.4.46" => "dnQualifier",
        "2.5.4.65" => "pseudonym",
        "2.5.4.97" => "organizationIdentifier",
        "1.2.840.113549.1.9.1" => "emailAddress",
        "0.9.2342.19200300.100.1.1" => "UID",
        "0.9.2342.19200300.100.1.25" => "DC",
        "1.3.6.1.4.1.311.60.2.1.3" => "jurisdictionC",
        _ => return None,
    })
}

/// The text of a directory string, or `None` for a type OpenSSL would dump as hex.
fn directory_string(value: &Any) -> Option<String> {
    let bytes = value.value();
    match value.tag() {
        Tag::Utf8String
        | Tag::PrintableString
        | Tag::Ia5String
        | Tag::VisibleString
        | Tag::NumericString => String::from_utf8(bytes.to_vec()).ok(),
        // T.61, read as Latin-1 as OpenSSL does.
        Tag::TeletexString => Some(bytes.iter().map(|&b| b as char).collect()),
        Tag::BmpString if bytes.len().is_multiple_of(2) => {
            char::decode_utf16(bytes.chunks(2).map(|c| u16::from_be_bytes([c[0], c[1]])))
                .collect::<Result<String, _>>()
                .ok()
        }
        _ => None,
    }
}

/// `name` as `openssl x509 -nameopt RFC2253` prints it: RDNs last first, joined by `,`, the
/// values of a multi-valued RDN by `+`; `,+"\<>;` and a leading `#` or space and a trailing
/// space escaped with `\`; control bytes and UTF-8 bytes beyond ASCII as `\XX`; values of
/// unknown string types as `#` and their DER in hex.
pub fn rfc2253(name: &Name) -> String {
    let mut out = String::new();
    for (i, rdn) in name.0.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, atv) in rdn.0.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = atv.oid.to_string();
            out.push_str(attribute_name(&oid).unwrap_or(&oid));
            out.push('=');
            match directory_string(&atv.value) {
                Some(text) => {
                    let bytes = text.as_bytes();
                    for (k, &b) in bytes.iter().enumerate() {
                        let special = b",+\"\\<>;".contains(&b)
                            || (k == 0 && (b == b'#' || b == b' '))
                            || (k == bytes.len() - 1 && b == b' ');
                        if special {
                            out.push('\\');
                            out.push(b as char);
                        } else if !(0x20..0x7f).contains(&b) {
                            let _ = write!(out, "\\{b:02X}");
                        } else {
                            out.push(b as char);
                        }
                    }
                }
                None => {
                    out.push('#');
                    for b in atv.value.to_der().unwrap_or_default() {
                        let _ = write!(out, "{b:02X}");
                    }
                }
            }
        }
    }
    out
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
