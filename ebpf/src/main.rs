//! The Portcullis XDP program: parses Ethernet (up to two VLAN tags), IPv4, IPv6 and TCP, and
//! counts packets per source address for the gateway's protected ports. Every packet passes; the
//! policy (limits, lists, bans) is layered on this parser.
#![no_std]
#![no_main]

mod parse;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{HashMap, LruPerCpuHashMap, PerCpuArray},
    programs::XdpContext,
};
use portcullis_common::{Counter, SourceKey, COUNTER_SLOTS, DEFAULT_MAX_SOURCES, MAX_PORTS};

use crate::parse::{parse_packet, Parsed};

#[map(name = "PORTS")]
static PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_PORTS, 0);

/// Per-CPU, so concurrent increments on several CPUs never race; userspace sums the CPUs.
#[map(name = "SOURCE_PACKETS")]
static SOURCE_PACKETS: LruPerCpuHashMap<SourceKey, u64> =
    LruPerCpuHashMap::with_max_entries(DEFAULT_MAX_SOURCES, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[xdp]
pub fn portcullis(ctx: XdpContext) -> u32 {
    match parse_packet(ctx.data(), ctx.data_end()) {
        Parsed::Transport { source, dst_port } => {
            // SAFETY of the lookup: the value is a plain u8 read once.
            if PORTS.get_ptr(dst_port).is_none() {
                count(Counter::NotProtected);
                return xdp_action::XDP_PASS;
            }
            count_source(&source);
            count(Counter::Passed);
        }
        Parsed::Fragment => count(Counter::Fragment),
        Parsed::Other => count(Counter::NotProtected),
        Parsed::Unparsed => count(Counter::Unparsed),
    }
    xdp_action::XDP_PASS
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn count_source(source: &SourceKey) {
    match SOURCE_PACKETS.get_ptr_mut(source) {
        // SAFETY: per-CPU value: no other CPU writes this copy.
        Some(packets) => unsafe { *packets += 1 },
        None => {
            let _ = SOURCE_PACKETS.insert(source, &1, 0);
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
