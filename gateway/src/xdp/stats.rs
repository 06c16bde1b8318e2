//! Reading the program's counters and per-source state from the pinned maps, so
//! `portcullis xdp stats` works from another process against a running gateway.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use anyhow::Context;
use aya::maps::{HashMap, Map, MapData, PerCpuArray};
use portcullis_common::{Counter, SourceKey, SourceState, MAP_COUNTERS, MAP_SOURCES};

/// One source as the program sees it.
#[derive(Debug, Clone, Copy)]
pub struct SourceStats {
    pub addr: IpAddr,
    pub packets: u64,
    pub drops: u64,
}

/// Counters summed over CPUs, and sources, most dropped first.
#[derive(Debug, Default)]
pub struct XdpStats {
    pub counters: Vec<(&'static str, u64)>,
    pub sources: Vec<SourceStats>,
}

pub fn source_addr(key: &SourceKey) -> IpAddr {
    match key.ipv4() {
        Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        None => IpAddr::V6(Ipv6Addr::from(key.addr)),
    }
}

/// Opens a map the gateway pinned under `pin_path`.
pub(super) fn open_pinned(pin_path: &Path, name: &str) -> anyhow::Result<Map> {
    let path = pin_path.join(name);
    let data = MapData::from_pin(&path).with_context(|| {
        format!(
            "cannot open pinned map {} (is the gateway running with [xdp]?)",
            path.display()
        )
    })?;
    Ok(Map::from_map_data(data)?)
}

pub fn read_pinned_stats(pin_path: &Path) -> anyhow::Result<XdpStats> {
    let counters_map: PerCpuArray<_, u64> =
        PerCpuArray::try_from(open_pinned(pin_path, MAP_COUNTERS)?)?;
    let mut stats = XdpStats::default();
    for counter in Counter::ALL {
        let per_cpu = counters_map.get(&(counter as u32), 0)?;
        stats.counters.push((counter.name(), per_cpu.iter().sum()));
    }
    let sources: HashMap<_, SourceKey, SourceState> =
        HashMap::try_from(open_pinned(pin_path, MAP_SOURCES)?)?;
    for entry in sources.iter() {
        let (key, state) = entry?;
        stats.sources.push(SourceStats {
            addr: source_addr(&key),
            packets: state.packets,
            drops: state.drops,
        });
    }
    stats.sources.sort_by(|a, b| {
        b.drops
            .cmp(&a.drops)
            .then(b.packets.cmp(&a.packets))
            .then(a.addr.cmp(&b.addr))
    });
    Ok(stats)
}
