//! Types and constants shared by the Portcullis XDP program (kernel side) and the gateway
//! (userspace side). Everything here is `#[repr(C)]` plain data: the two sides exchange it through
//! BPF maps, so the layout is the contract.
#![no_std]

/// Name of the XDP program inside the BPF object.
pub const XDP_PROGRAM_NAME: &str = "portcullis";

/// Map: protected destination ports (host byte order) -> 1. Traffic to any other port passes
/// untouched.
pub const MAP_PORTS: &str = "PORTS";
/// Map: one [`Settings`] entry, rewritten in place on reload.
pub const MAP_SETTINGS: &str = "SETTINGS";
/// Map: per-source state ([`SourceState`]) in an LRU hash keyed by [`SourceKey`].
pub const MAP_SOURCES: &str = "SOURCES";
/// Map: banned sources ([`SourceKey`]) -> expiry in `CLOCK_MONOTONIC` nanoseconds.
pub const MAP_BANS: &str = "BANS";
/// Maps: CIDR deny and allow lists (LPM tries), IPv4 and IPv6.
pub const MAP_DENY_V4: &str = "DENY_V4";
pub const MAP_DENY_V6: &str = "DENY_V6";
pub const MAP_ALLOW_V4: &str = "ALLOW_V4";
pub const MAP_ALLOW_V6: &str = "ALLOW_V6";
/// Map: per-CPU global counters indexed by [`Counter`].
pub const MAP_COUNTERS: &str = "COUNTERS";

/// Every map the gateway pins under its bpffs pin path.
pub const PINNED_MAPS: [&str; 10] = [
    MAP_PORTS,
    MAP_SETTINGS,
    MAP_SOURCES,
    MAP_BANS,
    MAP_DENY_V4,
    MAP_DENY_V6,
    MAP_ALLOW_V4,
    MAP_ALLOW_V6,
    MAP_COUNTERS,
    MAP_LOG_BUDGET,
];

/// Map: the global budget for log events (one [`LogBudget`]).
pub const MAP_LOG_BUDGET: &str = "LOG_BUDGET";

/// Most protected ports the program will consider.
pub const MAX_PORTS: u32 = 64;
/// Default capacity of the per-source LRU map; least recently seen sources are evicted first, so
/// a spoofed flood cannot exhaust memory.
pub const DEFAULT_MAX_SOURCES: u32 = 65_536;
/// Capacity of the ban map.
pub const MAX_BANS: u32 = 65_536;
/// Capacity of each CIDR list.
pub const MAX_CIDRS: u32 = 16_384;
/// Attempts at a compare-and-swap on a bucket before the packet is let through and counted as
/// contended (several CPUs updating one source in the same instant).
pub const CAS_ATTEMPTS: u32 = 4;
/// Log events the program may emit per second, at most, whatever the traffic.
pub const LOG_EVENTS_PER_SECOND: u64 = 10;

/// A source address as the program keys it: IPv4 addresses are stored IPv4-mapped
/// (`::ffff:a.b.c.d`) so one map serves both families; IPv6 addresses are masked to the
/// configured prefix length.
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

    /// An IPv6 source, masked to its first `prefix_len` bits.
    pub fn from_ipv6(octets: [u8; 16], prefix_len: u32) -> Self {
        let mut addr = octets;
        let mut i = 0;
        while i < 16 {
            let first_bit = (i as u32) * 8;
            addr[i] &= if prefix_len >= first_bit + 8 {
                0xff
            } else if prefix_len <= first_bit {
                0
            } else {
                0xffu8 << (8 - (prefix_len - first_bit))
            };
            i += 1;
        }
        SourceKey { addr }
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

/// Policy the program reads on every packet; the gateway rewrites it on reload.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Nanoseconds between packets at the sustained `rate` (GCRA emission interval); 0: no limit.
    pub packet_interval_ns: u64,
    /// How far ahead of schedule a source may run: (burst - 1) intervals.
    pub packet_tolerance_ns: u64,
    /// The same for TCP SYNs (`syn_rate`, `syn_burst`); 0: no limit.
    pub syn_interval_ns: u64,
    pub syn_tolerance_ns: u64,
    /// IPv6 sources are keyed by their first this-many bits.
    pub ipv6_prefix_len: u32,
    pub _reserved: u32,
}

/// What the program keeps per source.
///
/// Limits are GCRA (a token bucket as a single timestamp): `*_tat_ns` is the theoretical arrival
/// time of the next packet. Updates use compare-and-swap, so several CPUs seeing the same source
/// neither lose nor double-count; counters use atomic adds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SourceState {
    /// Packets seen for protected ports.
    pub packets: u64,
    /// Packets dropped (rate, SYN rate, ban).
    pub drops: u64,
    pub tat_ns: u64,
    pub syn_tat_ns: u64,
    /// Non-zero once a limit crossing was logged for this source.
    pub logged: u64,
}

/// The global log-event budget: a GCRA timestamp like [`SourceState::tat_ns`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LogBudget {
    pub tat_ns: u64,
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
    /// Packets from the allow list (passed without limits).
    Allowed = 4,
    DroppedDeny = 5,
    DroppedBan = 6,
    DroppedRate = 7,
    DroppedSynRate = 8,
    /// Compare-and-swap attempts ran out under contention; the packet passed.
    Contended = 9,
}

impl Counter {
    pub const ALL: [Counter; 10] = [
        Counter::Passed,
        Counter::NotProtected,
        Counter::Unparsed,
        Counter::Fragment,
        Counter::Allowed,
        Counter::DroppedDeny,
        Counter::DroppedBan,
        Counter::DroppedRate,
        Counter::DroppedSynRate,
        Counter::Contended,
    ];

    pub const fn name(self) -> &'static str {
        match self {
            Counter::Passed => "passed",
            Counter::NotProtected => "not_protected",
            Counter::Unparsed => "unparsed",
            Counter::Fragment => "fragment",
            Counter::Allowed => "allowed",
            Counter::DroppedDeny => "dropped_deny",
            Counter::DroppedBan => "dropped_ban",
            Counter::DroppedRate => "dropped_rate",
            Counter::DroppedSynRate => "dropped_syn_rate",
            Counter::Contended => "contended",
        }
    }
}

/// Number of slots in the counter array.
pub const COUNTER_SLOTS: u32 = 10;

#[cfg(feature = "user")]
mod user {
    // SAFETY (all four): repr(C) structs of plain integers and byte arrays with no padding
    // (every field is 8-byte sized or the struct is made of bytes), valid for any bit pattern.
    unsafe impl aya::Pod for super::SourceKey {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::SourceState {}
    unsafe impl aya::Pod for super::LogBudget {}
}
