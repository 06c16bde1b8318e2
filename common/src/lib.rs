//! Types and constants shared by the Portcullis XDP program (kernel side) and the gateway
//! (userspace side). Everything here is `#[repr(C)]` plain data: the two sides exchange it through
//! BPF maps, so the layout is the contract.
#![no_std]

/// Name of the XDP program inside the BPF object.
pub const XDP_PROGRAM_NAME: &str = "portcullis";

/// Map: protected destination ports (host byte order) -> 1. Traffic to any other port passes
/// untouched and uncounted.
pub const MAP_PORTS: &str = "PORTS";
/// Map: per-source packet counts (per-CPU LRU hash keyed by [`SourceKey`]).
pub const MAP_SOURCE_PACKETS: &str = "SOURCE_PACKETS";
/// Map: per-CPU global counters indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "COUNTERS";

/// Every map the gateway pins under its bpffs pin path.
pub const PINNED_MAPS: [&str; 3] = [MAP_PORTS, MAP_SOURCE_PACKETS, MAP_COUNTERS];

/// Most protected ports the program will consider.
pub const MAX_PORTS: u32 = 64;
/// Default capacity of the per-source LRU map; least recently seen sources are evicted first, so
/// a spoofed flood cannot exhaust memory.
pub const DEFAULT_MAX_SOURCES: u32 = 65_536;

/// A source address as the program keys it: IPv4 addresses are stored IPv4-mapped
/// (`::ffff:a.b.c.d`) so one map serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SourceKey {
    pub addr: [u8; 16],
}

impl SourceKey {
    pub const fn from_ipv4(octets: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        addr[10] = 0xff;
        addr[11] = 0xff;
        addr[12] = octets[0];
        addr[13] = octets[1];
        addr[14] = octets[2];
        addr[15] = octets[3];
        SourceKey { addr }
    }

    pub const fn from_ipv6(octets: [u8; 16]) -> Self {
        SourceKey { addr: octets }
    }

    /// The IPv4 address when this key is IPv4-mapped.
    pub fn ipv4(&self) -> Option<[u8; 4]> {
        let a = &self.addr;
        if a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff {
            Some([a[12], a[13], a[14], a[15]])
        } else {
            None
        }
    }
}

/// Slots of the per-CPU counter array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Packets for a protected port that were passed to the stack.
    Passed = 0,
    /// Packets not addressed to a protected port (passed untouched).
    NotProtected = 1,
    /// Packets the program could not parse (passed: fail open).
    Unparsed = 2,
    /// Non-first IPv4/IPv6 fragments: no transport header to police, passed.
    Fragment = 3,
}

impl Counter {
    pub const ALL: [Counter; 4] = [
        Counter::Passed,
        Counter::NotProtected,
        Counter::Unparsed,
        Counter::Fragment,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Passed => "passed",
            Counter::NotProtected => "not_protected",
            Counter::Unparsed => "unparsed",
            Counter::Fragment => "fragment",
        }
    }
}

/// Number of slots in the counter array.
pub const COUNTER_SLOTS: u32 = 4;

#[cfg(feature = "user")]
mod user {
    // SAFETY: SourceKey is repr(C), made of plain bytes with no padding, valid for any bit pattern.
    unsafe impl aya::Pod for super::SourceKey {}
}
