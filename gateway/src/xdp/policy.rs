//! Translation of the `[xdp]` section into what the program reads: its settings, source keys and
//! CIDR lists.

use std::{net::IpAddr, str::FromStr};

use ipnet::IpNet;
use portcullis_common::{Settings, SourceKey};

use crate::config::XdpConfig;

const NANOS_PER_SECOND: u64 = 1_000_000_000;

/// Parses `203.0.113.0/24`, `2001:db8::/32` or a bare address (a /32 or /128); host bits are
/// cleared.
pub fn parse_cidr(text: &str) -> Option<IpNet> {
    let text = text.trim();
    if let Ok(net) = IpNet::from_str(text) {
        return Some(net.trunc());
    }
    IpAddr::from_str(text).ok().map(IpNet::from)
}

/// GCRA parameters for `rate` packets per second with bursts of `burst` packets.
fn gcra(rate: Option<u64>, burst: Option<u64>) -> (u64, u64) {
    match rate {
        None => (0, 0),
        Some(rate) => {
            let interval = (NANOS_PER_SECOND / rate).max(1);
            let burst = burst.unwrap_or(rate).max(1);
            (interval, interval.saturating_mul(burst - 1))
        }
    }
}

/// The destination ports the program polices: the configured `ports`, or else the ports of the
/// addresses the gateway listens on.
pub fn policed_ports(config: &XdpConfig, listening: &[std::net::SocketAddr]) -> Vec<u16> {
    if let Some(ports) = &config.ports {
        return ports.clone();
    }
    let mut ports: Vec<u16> = listening.iter().map(|a| a.port()).collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// The `[xdp]` settings that cannot change in place (the program and its attachment, its maps'
/// sizes and pins, the ban hook's rules), by name, when they differ between `old` and `new`.
pub fn fixed_changes(old: &XdpConfig, new: &XdpConfig) -> Vec<&'static str> {
    let mut fixed = Vec::new();
    let mut check = |same: bool, name| {
        if !same {
            fixed.push(name);
        }
    };
    check(old.interface == new.interface, "xdp.interface");
    check(old.mode == new.mode, "xdp.mode");
    check(old.optional == new.optional, "xdp.optional");
    check(old.max_sources == new.max_sources, "xdp.max_sources");
    check(old.pin_path == new.pin_path, "xdp.pin_path");
    check(old.object == new.object, "xdp.object");
    check(old.ban_after == new.ban_after, "xdp.ban_after");
    check(old.ban_window == new.ban_window, "xdp.ban_window");
    check(old.ban_statuses == new.ban_statuses, "xdp.ban_statuses");
    check(old.ban_duration == new.ban_duration, "xdp.ban_duration");
    fixed
}

pub fn settings(config: &XdpConfig) -> Settings {
    let (packet_interval_ns, packet_tolerance_ns) = gcra(config.rate, config.burst);
    let (syn_interval_ns, syn_tolerance_ns) = gcra(config.syn_rate, config.syn_burst);
    Settings {
        packet_interval_ns,
        packet_tolerance_ns,
        syn_interval_ns,
        syn_tolerance_ns,
        ipv6_prefix_len: config.ipv6_prefix,
        _reserved: 0,
    }
}

/// The key the program uses for `ip`: IPv4-mapped, or the IPv6 prefix.
pub fn source_key(ip: IpAddr, ipv6_prefix: u32) -> SourceKey {
    match ip {
        IpAddr::V4(v4) => SourceKey::from_ipv4(v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SourceKey::from_ipv4(v4.octets()),
            None => SourceKey::from_ipv6(v6.octets(), ipv6_prefix),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_and_keys() {
        assert_eq!(
            parse_cidr("203.0.113.7/24").unwrap().to_string(),
            "203.0.113.0/24"
        );
        assert_eq!(
            parse_cidr("2001:db8::1").unwrap().to_string(),
            "2001:db8::1/128"
        );
        assert!(parse_cidr("203.0.113.0/33").is_none());
        assert!(parse_cidr("nonsense").is_none());
        let a = source_key("2001:db8:1:2:aaaa::1".parse().unwrap(), 64);
        let b = source_key("2001:db8:1:2:bbbb::2".parse().unwrap(), 64);
        let c = source_key("2001:db8:1:3::1".parse().unwrap(), 64);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(
            source_key("::ffff:203.0.113.9".parse().unwrap(), 64),
            source_key("203.0.113.9".parse().unwrap(), 64)
        );
    }

    #[test]
    fn gcra_parameters() {
        assert_eq!(gcra(None, None), (0, 0));
        assert_eq!(gcra(Some(1000), Some(10)), (1_000_000, 9_000_000));
        assert_eq!(gcra(Some(2), None), (500_000_000, 500_000_000));
    }
}
