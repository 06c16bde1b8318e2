//! The ban map, opened from its pin so the gateway, its ban hook and the `portcullis xdp ban`
//! command all see the same one. Bans expire by themselves: the program compares the expiry with
//! `CLOCK_MONOTONIC`, and expired entries are ignored (and fall out of the LRU map).

use std::{net::IpAddr, path::Path, time::Duration};

use anyhow::Context;
use aya::maps::{Array, HashMap, MapData};
use portcullis_common::{Settings, SourceKey, MAP_BANS, MAP_SETTINGS};

use super::{
    policy::source_key,
    stats::{open_pinned, source_addr},
};
use crate::sys::monotonic_ns;

pub struct BanTable {
    map: HashMap<MapData, SourceKey, u64>,
    ipv6_prefix: u32,
}

impl BanTable {
    pub fn open(pin_path: &Path) -> anyhow::Result<BanTable> {
        let settings: Array<_, Settings> = Array::try_from(open_pinned(pin_path, MAP_SETTINGS)?)?;
        let ipv6_prefix = settings.get(&0, 0)?.ipv6_prefix_len;
        Ok(BanTable {
            map: HashMap::try_from(open_pinned(pin_path, MAP_BANS)?)?,
            ipv6_prefix,
        })
    }

    /// Bans `ip` (its IPv6 prefix, for IPv6) for `duration`.
    pub fn add(&mut self, ip: IpAddr, duration: Duration) -> anyhow::Result<()> {
        let expiry =
            monotonic_ns().saturating_add(duration.as_nanos().min(u128::from(u64::MAX)) as u64);
        self.map
            .insert(source_key(ip, self.ipv6_prefix), expiry, 0)
            .context("cannot write the ban map")?;
        Ok(())
    }

    /// Lifts a ban; false when there was none.
    pub fn remove(&mut self, ip: IpAddr) -> anyhow::Result<bool> {
        match self.map.remove(&source_key(ip, self.ipv6_prefix)) {
            Ok(()) => Ok(true),
            Err(aya::maps::MapError::KeyNotFound) => Ok(false),
            // The kernel says ENOENT through the syscall error for a missing key.
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::ENOENT) =>
            {
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Bans in force, with the time each has left, longest first.
    pub fn list(&self) -> anyhow::Result<Vec<(IpAddr, Duration)>> {
        let now = monotonic_ns();
        let mut out = Vec::new();
        for entry in self.map.iter() {
            let (key, expiry) = entry?;
            if expiry > now {
                out.push((source_addr(&key), Duration::from_nanos(expiry - now)));
            }
        }
        out.sort_by_key(|b| std::cmp::Reverse(b.1));
        Ok(out)
    }
}
