//! Reading the program's counters from the pinned maps, so `portcullis xdp stats` works from
//! another process against a running gateway.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use anyhow::Context;
use aya::maps::{Map, MapData, PerCpuArray, PerCpuHashMap};
use portcullis_common::{Counter, SourceKey, MAP_COUNTERS, MAP_SOURCE_PACKETS};

/// Counters summed over CPUs, and packets per source (most first).
#[derive(Debug, Default)]
pub struct XdpStats {
    pub counters: Vec<(&'static str, u64)>,
    pub sources: Vec<(IpAddr, u64)>,
}

pub fn source_addr(key: &SourceKey) -> IpAddr {
    match key.ipv4() {
        Some(v4) => IpAddr::V4(Ipv4Addr::from(v4)),
        None => IpAddr::V6(Ipv6Addr::from(key.addr)),
    }
}

fn open(pin_path: &Path, name: &str) -> anyhow::Result<Map> {
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
    let counters_map: PerCpuArray<_, u64> = PerCpuArray::try_from(open(pin_path, MAP_COUNTERS)?)?;
    let mut stats = XdpStats::default();
    for counter in Counter::ALL {
        let per_cpu = counters_map.get(&(counter as u32), 0)?;
        stats.counters.push((counter.name(), per_cpu.iter().sum()));
    }
    let sources: PerCpuHashMap<_, SourceKey, u64> =
        PerCpuHashMap::try_from(open(pin_path, MAP_SOURCE_PACKETS)?)?;
    for entry in sources.iter() {
        let (key, per_cpu) = entry?;
        stats
            .sources
            .push((source_addr(&key), per_cpu.iter().sum()));
    }
    stats
        .sources
        .sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(stats)
}
