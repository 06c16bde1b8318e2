//! Bounds-checked header parsing for the XDP program. Each read is checked against `data_end`
//! the way the verifier requires; anything malformed or truncated is reported as `Unparsed`
//! so the caller can fail open.

use core::mem::size_of;

const ETH_HEADER_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const MAX_VLAN_TAGS: usize = 2;
const IPPROTO_TCP: u8 = 6;
const IPPROTO_UDP: u8 = 17;
const IPV6_HEADER_LEN: usize = 40;
/// Extension headers followed before giving up (fail open) on an IPv6 packet.
const MAX_IPV6_EXT_HEADERS: usize = 6;

/// A packet's source address, unmasked.
#[derive(Clone, Copy)]
pub enum Source {
    V4([u8; 4]),
    V6([u8; 16]),
}

/// What the parser learned about a frame.
pub enum Parsed {
    /// A TCP or UDP packet: its source, destination port (host order), and whether it is a TCP
    /// SYN without ACK (a new connection).
    Transport {
        source: Source,
        dst_port: u16,
        syn: bool,
    },
    /// A non-first fragment: there is no transport header to read.
    Fragment,
    /// Well-formed but not something the policy applies to (ARP, ICMP, ...).
    Other,
    /// Truncated or malformed.
    Unparsed,
}

#[inline(always)]
fn ptr_at<T>(data: usize, data_end: usize, offset: usize) -> Option<*const T> {
    if data + offset + size_of::<T>() > data_end {
        return None;
    }
    Some((data + offset) as *const T)
}

#[inline(always)]
fn read_u8(data: usize, data_end: usize, offset: usize) -> Option<u8> {
    // SAFETY: ptr_at checked the byte lies inside the packet.
    ptr_at::<u8>(data, data_end, offset).map(|p| unsafe { *p })
}

#[inline(always)]
fn read_array<const N: usize>(data: usize, data_end: usize, offset: usize) -> Option<[u8; N]> {
    // SAFETY: ptr_at checked all N bytes lie inside the packet; read_unaligned tolerates any
    // offset.
    ptr_at::<[u8; N]>(data, data_end, offset).map(|p| unsafe { p.read_unaligned() })
}

#[inline(always)]
fn read_be16(data: usize, data_end: usize, offset: usize) -> Option<u16> {
    // SAFETY: ptr_at checked both bytes lie inside the packet; read_unaligned tolerates any offset.
    ptr_at::<[u8; 2]>(data, data_end, offset)
        .map(|p| u16::from_be_bytes(unsafe { p.read_unaligned() }))
}

#[inline(always)]
pub fn parse_packet(data: usize, data_end: usize) -> Parsed {
    let Some(mut ether_type) = read_be16(data, data_end, 12) else {
        return Parsed::Unparsed;
    };
    let mut offset = ETH_HEADER_LEN;
    for _ in 0..MAX_VLAN_TAGS {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let Some(inner) = read_be16(data, data_end, offset + 2) else {
            return Parsed::Unparsed;
        };
        ether_type = inner;
        offset += 4;
    }
    match ether_type {
        ETH_P_IPV4 => parse_ipv4(data, data_end, offset),
        ETH_P_IPV6 => parse_ipv6(data, data_end, offset),
        ETH_P_8021Q | ETH_P_8021AD => Parsed::Unparsed,
        _ => Parsed::Other,
    }
}

#[inline(always)]
fn parse_ipv4(data: usize, data_end: usize, offset: usize) -> Parsed {
    let Some(version_ihl) = read_u8(data, data_end, offset) else {
        return Parsed::Unparsed;
    };
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    if version_ihl >> 4 != 4 || header_len < 20 {
        return Parsed::Unparsed;
    }
    let Some(flags_fragment) = read_be16(data, data_end, offset + 6) else {
        return Parsed::Unparsed;
    };
    let Some(protocol) = read_u8(data, data_end, offset + 9) else {
        return Parsed::Unparsed;
    };
    let Some(src) = ptr_at::<[u8; 4]>(data, data_end, offset + 12) else {
        return Parsed::Unparsed;
    };
    // SAFETY: ptr_at checked the four bytes lie inside the packet.
    let source = Source::V4(unsafe { src.read_unaligned() });
    if flags_fragment & 0x1fff != 0 {
        return Parsed::Fragment;
    }
    transport(data, data_end, offset + header_len, protocol, source)
}

#[inline(always)]
fn parse_ipv6(data: usize, data_end: usize, offset: usize) -> Parsed {
    let Some(version) = read_u8(data, data_end, offset) else {
        return Parsed::Unparsed;
    };
    if version >> 4 != 6 {
        return Parsed::Unparsed;
    }
    let Some(mut next_header) = read_u8(data, data_end, offset + 6) else {
        return Parsed::Unparsed;
    };
    let Some(src) = ptr_at::<[u8; 16]>(data, data_end, offset + 8) else {
        return Parsed::Unparsed;
    };
    // SAFETY: ptr_at checked the sixteen bytes lie inside the packet.
    let source = Source::V6(unsafe { src.read_unaligned() });
    let mut offset = offset + IPV6_HEADER_LEN;
    for _ in 0..MAX_IPV6_EXT_HEADERS {
        match next_header {
            // Hop-by-hop, routing, destination options: length in 8-octet units, not counting
            // the first 8. (Multi-byte reads at a variable offset keep the `ptr + N > end`
            // bound check the verifier understands; a 1-byte one gets rewritten to `ptr >= end`.)
            0 | 43 | 60 => {
                let Some([next, len]) = read_array::<2>(data, data_end, offset) else {
                    return Parsed::Unparsed;
                };
                next_header = next;
                offset += (len as usize + 1) * 8;
            }
            // Fragment header: fixed 8 octets; only the first fragment carries the transport.
            44 => {
                let Some([next, _, hi, lo]) = read_array::<4>(data, data_end, offset) else {
                    return Parsed::Unparsed;
                };
                if u16::from_be_bytes([hi, lo]) & 0xfff8 != 0 {
                    return Parsed::Fragment;
                }
                next_header = next;
                offset += 8;
            }
            // Authentication header: length in 4-octet units, minus 2.
            51 => {
                let Some([next, len]) = read_array::<2>(data, data_end, offset) else {
                    return Parsed::Unparsed;
                };
                next_header = next;
                offset += (len as usize + 2) * 4;
            }
            _ => return transport(data, data_end, offset, next_header, source),
        }
    }
    // Too long a chain of extension headers: fail open.
    Parsed::Unparsed
}

#[inline(always)]
fn transport(data: usize, data_end: usize, offset: usize, protocol: u8, source: Source) -> Parsed {
    if protocol == IPPROTO_UDP {
        return match read_array::<4>(data, data_end, offset) {
            Some([_, _, hi, lo]) => Parsed::Transport {
                source,
                dst_port: u16::from_be_bytes([hi, lo]),
                syn: false,
            },
            None => Parsed::Unparsed,
        };
    }
    if protocol != IPPROTO_TCP {
        return Parsed::Other;
    }
    // Destination port at 2..4, flags at 13 (SYN 0x02, ACK 0x10).
    match read_array::<14>(data, data_end, offset) {
        Some(h) => Parsed::Transport {
            source,
            dst_port: u16::from_be_bytes([h[2], h[3]]),
            syn: h[13] & 0x12 == 0x02,
        },
        None => Parsed::Unparsed,
    }
}
