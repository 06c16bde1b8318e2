//! The Portcullis XDP program: drops what must not reach userspace, for the gateway's protected
//! ports only. In order: deny list (drop), allow list (pass, no limits), bans (drop until they
//! expire), then per-source packet and SYN rates (GCRA). Everything else passes untouched, and
//! anything it cannot parse passes and is counted (fail open).
#![no_std]
#![no_main]
// The atomic intrinsics (see `atomic`); the eBPF build runs with RUSTC_BOOTSTRAP for build-std.
#![allow(internal_features)]
#![feature(core_intrinsics)]

mod atomic;
mod limit;
mod parse;

use core::net::{Ipv4Addr, Ipv6Addr};

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{lpm_trie::Key, Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    programs::XdpContext,
};
use aya_log_ebpf::info;
use portcullis_common::{
    Counter, LogBudget, Settings, SourceKey, SourceState, COUNTER_SLOTS, DEFAULT_MAX_SOURCES,
    LOG_EVENTS_PER_SECOND, MAX_BANS, MAX_CIDRS, MAX_PORTS,
};

use crate::{
    limit::{gcra, Gcra},
    parse::{parse_packet, Parsed, Source},
};

#[map(name = "PORTS")]
static PORTS: HashMap<u16, u8> = HashMap::with_max_entries(MAX_PORTS, 0);

#[map(name = "SETTINGS")]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Shared by all CPUs: updated with atomics (see [`limit`]).
#[map(name = "SOURCES")]
static SOURCES: LruHashMap<SourceKey, SourceState> =
    LruHashMap::with_max_entries(DEFAULT_MAX_SOURCES, 0);

#[map(name = "BANS")]
static BANS: LruHashMap<SourceKey, u64> = LruHashMap::with_max_entries(MAX_BANS, 0);

#[map(name = "DENY_V4")]
static DENY_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map(name = "DENY_V6")]
static DENY_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map(name = "ALLOW_V4")]
static ALLOW_V4: LpmTrie<[u8; 4], u8> = LpmTrie::with_max_entries(MAX_CIDRS, 0);
#[map(name = "ALLOW_V6")]
static ALLOW_V6: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(MAX_CIDRS, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

#[map(name = "LOG_BUDGET")]
static LOG_BUDGET: Array<LogBudget> = Array::with_max_entries(1, 0);

#[xdp]
pub fn portcullis(ctx: XdpContext) -> u32 {
    let (source, dst_port, syn) = match parse_packet(ctx.data(), ctx.data_end()) {
        Parsed::Transport {
            source,
            dst_port,
            syn,
        } => (source, dst_port, syn),
        Parsed::Fragment => return pass(Counter::Fragment),
        Parsed::Other => return pass(Counter::NotProtected),
        Parsed::Unparsed => return pass(Counter::Unparsed),
    };
    if PORTS.get_ptr(dst_port).is_none() {
        return pass(Counter::NotProtected);
    }
    let Some(settings) = SETTINGS.get(0) else {
        return pass(Counter::Unparsed);
    };
    let key = match source {
        Source::V4(octets) => {
            if DENY_V4.get(Key::new(32, octets)).is_some() {
                return drop(Counter::DroppedDeny);
            }
            if ALLOW_V4.get(Key::new(32, octets)).is_some() {
                return pass(Counter::Allowed);
            }
            SourceKey::from_ipv4(octets)
        }
        Source::V6(octets) => {
            if DENY_V6.get(Key::new(128, octets)).is_some() {
                return drop(Counter::DroppedDeny);
            }
            if ALLOW_V6.get(Key::new(128, octets)).is_some() {
                return pass(Counter::Allowed);
            }
            SourceKey::from_ipv6(octets, settings.ipv6_prefix_len)
        }
    };
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some(state) = source_state(&key) else {
        return pass(Counter::Passed);
    };
    // SAFETY (field addresses): `state` points into a map value valid for this program run; its
    // fields are only touched through `atomic`.
    let (packets, drops) = unsafe { (&raw mut (*state).packets, &raw mut (*state).drops) };
    atomic::add(packets, 1);

    if let Some(expiry) = BANS.get_ptr(&key) {
        // SAFETY: a plain u64 map value read once.
        if now < unsafe { *expiry } {
            atomic::add(drops, 1);
            return drop(Counter::DroppedBan);
        }
    }
    // SAFETY: as above.
    let tat = unsafe { &raw mut (*state).tat_ns };
    let verdict = match gcra(
        tat,
        now,
        settings.packet_interval_ns,
        settings.packet_tolerance_ns,
    ) {
        Gcra::Allow if syn => {
            // SAFETY: as above.
            let syn_tat = unsafe { &raw mut (*state).syn_tat_ns };
            match gcra(
                syn_tat,
                now,
                settings.syn_interval_ns,
                settings.syn_tolerance_ns,
            ) {
                Gcra::Deny => Some(Counter::DroppedSynRate),
                Gcra::Contended => return pass(Counter::Contended),
                Gcra::Allow => None,
            }
        }
        Gcra::Allow => None,
        Gcra::Deny => Some(Counter::DroppedRate),
        Gcra::Contended => return pass(Counter::Contended),
    };
    match verdict {
        None => pass(Counter::Passed),
        Some(reason) => {
            atomic::add(drops, 1);
            // SAFETY: as above.
            let logged = unsafe { &raw mut (*state).logged };
            if atomic::swap(logged, 1) == 0 && log_allowed(now) {
                match source {
                    Source::V4(o) => info!(
                        &ctx,
                        "source {} crossed its {} limit",
                        Ipv4Addr::from(o),
                        reason_name(reason)
                    ),
                    Source::V6(o) => info!(
                        &ctx,
                        "source {} crossed its {} limit",
                        Ipv6Addr::from(o),
                        reason_name(reason)
                    ),
                }
            }
            drop(reason)
        }
    }
}

fn reason_name(c: Counter) -> &'static str {
    if c == Counter::DroppedSynRate {
        "SYN rate"
    } else {
        "packet rate"
    }
}

/// The source's state, inserting a fresh one for a new source.
#[inline(always)]
fn source_state(key: &SourceKey) -> Option<*mut SourceState> {
    if let Some(p) = SOURCES.get_ptr_mut(key) {
        return Some(p);
    }
    // BPF_NOEXIST: if another CPU inserted it meanwhile, keep theirs.
    let _ = SOURCES.insert(key, &SourceState::default(), 1);
    SOURCES.get_ptr_mut(key)
}

/// The global log budget: at most LOG_EVENTS_PER_SECOND events per second.
#[inline(always)]
fn log_allowed(now: u64) -> bool {
    let Some(budget) = LOG_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: map value valid for this run; only touched through atomics.
    let tat = unsafe { &raw mut (*budget).tat_ns };
    let interval = 1_000_000_000 / LOG_EVENTS_PER_SECOND;
    gcra(tat, now, interval, interval * (LOG_EVENTS_PER_SECOND - 1)) == Gcra::Allow
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot: only this CPU writes it while the program runs.
        unsafe { *slot += 1 };
    }
}

#[inline(always)]
fn pass(counter: Counter) -> u32 {
    count(counter);
    xdp_action::XDP_PASS
}

#[inline(always)]
fn drop(counter: Counter) -> u32 {
    count(counter);
    xdp_action::XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
