//! The PROXY protocol (HAProxy's, versions 1 and 2) as a sans-IO decoder: an L4 balancer in
//! front of the gateway sends the real client address first. Only listeners configured for it
//! read it, and only from trusted source addresses (anything else could claim any address).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Longest header accepted: v1's maximum is 107 bytes; v2 allows TLVs, bounded here.
pub const MAX_HEADER_BYTES: usize = 536;

const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Why a PROXY header was refused (the connection is closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("the connection does not start with a PROXY header")]
    Missing,
    #[error("malformed PROXY header: {0}")]
    Malformed(&'static str),
    #[error("PROXY header longer than {MAX_HEADER_BYTES} bytes")]
    TooLong,
}

/// A decoded header: the client's address (`None` for v1 `UNKNOWN` and v2 `LOCAL`, where the
/// connection's own peer stands), and its length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyHeader {
    pub source: Option<SocketAddr>,
    pub len: usize,
}

/// Decodes the header at the start of `buf`: `Ok(None)` when more bytes are needed.
pub fn decode(buf: &[u8]) -> Result<Option<ProxyHeader>, ProxyHeaderError> {
    let start = &buf[..buf.len().min(V2_SIGNATURE.len())];
    if !start.is_empty() && V2_SIGNATURE.starts_with(start) {
        if buf.len() < 16 {
            return Ok(None);
        }
        return decode_v2(buf);
    }
    if !b"PROXY ".starts_with(&buf[..buf.len().min(6)]) {
        return Err(ProxyHeaderError::Missing);
    }
    // v1 lines are at most 107 bytes, CRLF included.
    let Some(end) = buf.windows(2).take(106).position(|w| w == b"\r\n") else {
        return if buf.len() >= 107 {
            Err(ProxyHeaderError::TooLong)
        } else {
            Ok(None)
        };
    };
    decode_v1(&buf[..end]).map(|source| {
        Some(ProxyHeader {
            source,
            len: end + 2,
        })
    })
}

fn decode_v1(line: &[u8]) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let line = std::str::from_utf8(line).map_err(|_| ProxyHeaderError::Malformed("not ASCII"))?;
    let mut parts = line.split(' ');
    let _proxy = parts.next();
    let v4 = match parts.next() {
        Some("UNKNOWN") => return Ok(None),
        Some("TCP4") => true,
        Some("TCP6") => false,
        _ => {
            return Err(ProxyHeaderError::Malformed(
                "v1 protocol is not TCP4, TCP6 or UNKNOWN",
            ))
        }
    };
    let fields: Vec<&str> = parts.collect();
    let [src, _dst, sport, _dport] = fields[..] else {
        return Err(ProxyHeaderError::Malformed(
            "v1 needs source, destination and both ports",
        ));
    };
    let ip: IpAddr = src
        .parse()
        .map_err(|_| ProxyHeaderError::Malformed("v1 source address"))?;
    if ip.is_ipv4() != v4 {
        return Err(ProxyHeaderError::Malformed(
            "v1 source address of the other family",
        ));
    }
    // Ports are decimal without leading zeros, as the specification says.
    if sport.is_empty() || (sport.len() > 1 && sport.starts_with('0')) {
        return Err(ProxyHeaderError::Malformed("v1 source port"));
    }
    let port: u16 = sport
        .parse()
        .map_err(|_| ProxyHeaderError::Malformed("v1 source port"))?;
    // An IPv4 client behind a dual-stack balancer arrives as ::ffff:a.b.c.d: the same client.
    Ok(Some(SocketAddr::new(ip.to_canonical(), port)))
}

fn decode_v2(buf: &[u8]) -> Result<Option<ProxyHeader>, ProxyHeaderError> {
    let ver_cmd = buf[12];
    if ver_cmd >> 4 != 2 {
        return Err(ProxyHeaderError::Malformed("v2 version is not 2"));
    }
    let family = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    let total = 16 + len;
    if total > MAX_HEADER_BYTES {
        return Err(ProxyHeaderError::TooLong);
    }
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[16..total];
    let source = match (ver_cmd & 0x0f, family) {
        // LOCAL: a health check by the balancer itself.
        (0x0, _) => None,
        // PROXY over TCP/IPv4 and TCP/IPv6.
        (0x1, 0x11) if body.len() >= 12 => {
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            Some(SocketAddr::new(
                ip.into(),
                u16::from_be_bytes([body[8], body[9]]),
            ))
        }
        (0x1, 0x21) if body.len() >= 36 => {
            let octets: [u8; 16] = body[..16].try_into().expect("16 bytes");
            Some(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(octets)).to_canonical(),
                u16::from_be_bytes([body[32], body[33]]),
            ))
        }
        (0x1, 0x11 | 0x21) => {
            return Err(ProxyHeaderError::Malformed("v2 address block too short"))
        }
        // UNSPEC or non-TCP families: the connection's own peer stands.
        (0x1, _) => None,
        _ => {
            return Err(ProxyHeaderError::Malformed(
                "v2 command is neither LOCAL nor PROXY",
            ))
        }
    };
    Ok(Some(ProxyHeader { source, len: total }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1() {
        let h = decode(b"PROXY TCP4 203.0.113.7 198.51.100.1 40000 443\r\nGET /")
            .unwrap()
            .unwrap();
        assert_eq!(h.source, Some("203.0.113.7:40000".parse().unwrap()));
        assert_eq!(h.len, 47);
        let h = decode(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.source, Some("[2001:db8::1]:1".parse().unwrap()));
        assert_eq!(decode(b"PROXY UNKNOWN\r\n").unwrap().unwrap().source, None);
        assert_eq!(
            decode(b"PROXY TCP4 203.0.113.7").unwrap(),
            None,
            "incomplete"
        );
        assert_eq!(decode(b"PRO").unwrap(), None, "incomplete");
        assert_eq!(
            decode(b"GET / HTTP/1.1\r\n"),
            Err(ProxyHeaderError::Missing)
        );
        assert!(decode(b"PROXY TCP4 nonsense 1.2.3.4 1 2\r\n").is_err());
        assert!(decode(b"PROXY TCP4 203.0.113.7 198.51.100.1 040000 443\r\n").is_err());
        assert!(decode(b"PROXY UDP4 203.0.113.7 198.51.100.1 1 2\r\n").is_err());
        assert!(
            decode(b"PROXY TCP4 2001:db8::1 2001:db8::2 1 2\r\n").is_err(),
            "family"
        );
        let mapped = decode(b"PROXY TCP6 ::ffff:203.0.113.9 ::1 5 6\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(mapped.source, Some("203.0.113.9:5".parse().unwrap()));
        assert_eq!(
            decode(&[b'P', b'R', b'O', b'X', b'Y', b' ', b'x'].repeat(20)),
            Err(ProxyHeaderError::TooLong)
        );
    }

    #[test]
    fn v2() {
        let mut h = V2_SIGNATURE.to_vec();
        h.extend_from_slice(&[
            0x21, 0x11, 0, 12, 203, 0, 113, 7, 198, 51, 100, 1, 0x9c, 0x40, 1, 187,
        ]);
        h.extend_from_slice(b"GET /");
        let d = decode(&h).unwrap().unwrap();
        assert_eq!(d.source, Some("203.0.113.7:40000".parse().unwrap()));
        assert_eq!(d.len, 28);
        assert_eq!(decode(&h[..20]).unwrap(), None, "incomplete");
        let mut local = V2_SIGNATURE.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert_eq!(decode(&local).unwrap().unwrap().source, None);
        let mut bad = V2_SIGNATURE.to_vec();
        bad.extend_from_slice(&[0x31, 0x11, 0, 12]);
        assert!(decode(&bad).is_err(), "version 3");
        let mut short = V2_SIGNATURE.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(decode(&short).is_err());
    }
}
