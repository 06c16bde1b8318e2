//! Quotas over calendar periods (UTC day or month), exact across workers and persisted.
//!
//! Counters are atomics in a lock-free map: a request takes one with `fetch_add`, and gives it
//! back when that overshot the limit, so admission is exact whatever the concurrency.
//! A background thread writes the counters that changed every `flush_interval`: the whole
//! state goes to a temporary file, which is fsynced, renamed over `quotas.state`, and the
//! directory fsynced. A crash (`kill -9`, power loss) therefore loses at most the counting of
//! the last `flush_interval`, and never leaves a torn file. A clean stop writes a final copy.

use std::{
    fmt::Write as _,
    io::Write as _,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use papaya::HashMap;
use sha2::{Digest, Sha256};
use tracing::warn;

use crate::{
    config::{QuotaConfig, QuotaPeriod, QuotasConfig},
    limits::{LimitKey, LimitSubject},
};

const STATE_FILE: &str = "quotas.state";
const STATE_HEADER: &str = "portcullis-quotas 1";
/// Keys longer than this are stored as their SHA-256.
const MAX_KEY_BYTES: usize = 128;
/// Route index, quota index, period kind, period id.
const KEY_PREFIX_BYTES: usize = 2 + 1 + 1 + 4;

/// Days since 1970-01-01 for a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// (year, month) of a day since 1970-01-01.
fn civil_month(days: i64) -> (i64, i64) {
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m)
}

/// The current period's id, and seconds until it ends.
pub fn period_now(period: QuotaPeriod, unix_secs: u64) -> (u32, u64) {
    let days = (unix_secs / 86_400) as i64;
    match period {
        QuotaPeriod::Day => (days as u32, 86_400 - unix_secs % 86_400),
        QuotaPeriod::Month => {
            let (y, m) = civil_month(days);
            let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
            let end = days_from_civil(ny, nm, 1) as u64 * 86_400;
            ((y * 12 + m - 1) as u32, end - unix_secs)
        }
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One route's quota.
#[derive(Debug)]
pub struct Quota {
    pub name: String,
    pub limit: u64,
    pub period: QuotaPeriod,
    key: LimitKey,
}

impl Quota {
    pub fn new(index: usize, c: &QuotaConfig) -> Quota {
        Quota {
            name: c.name.clone().unwrap_or_else(|| format!("quota{index}")),
            limit: c.limit,
            period: c.period,
            key: LimitKey::parse(&c.key).expect("validate() checked the key"),
        }
    }

    /// The period's length in seconds, for RateLimit-Policy.
    pub fn window_secs(&self) -> u64 {
        match self.period {
            QuotaPeriod::Day => 86_400,
            QuotaPeriod::Month => 30 * 86_400,
        }
    }
}

/// Every quota counter of this host.
#[derive(Debug)]
pub struct QuotaStore {
    counters: HashMap<Box<[u8]>, AtomicU64>,
    dirty: AtomicBool,
    dir: PathBuf,
}

impl QuotaStore {
    /// Opens the store, loading the counters a previous run saved.
    pub fn open(config: &QuotasConfig) -> anyhow::Result<Arc<QuotaStore>> {
        let store = Arc::new(QuotaStore {
            counters: HashMap::new(),
            dirty: AtomicBool::new(false),
            dir: config.data_dir.clone(),
        });
        let path = config.data_dir.join(STATE_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => store
                .load(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => anyhow::bail!("cannot read {}: {e}", path.display()),
        }
        Ok(store)
    }

    fn load(&self, text: &str) -> Result<(), String> {
        let mut lines = text.lines();
        if lines.next() != Some(STATE_HEADER) {
            return Err("not a quota state file".into());
        }
        let pinned = self.counters.pin();
        for line in lines {
            let (key, count) = line.split_once(' ').ok_or("malformed line")?;
            let key: Vec<u8> = (0..key.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(key.get(i..i + 2).unwrap_or("zz"), 16))
                .collect::<Result<_, _>>()
                .map_err(|_| "malformed key")?;
            let count: u64 = count.parse().map_err(|_| "malformed count")?;
            pinned.insert(key.into(), AtomicU64::new(count));
        }
        Ok(())
    }

    /// Takes one request from the quota; `Err(seconds until the period ends)` when spent.
    pub fn take(
        &self,
        route: usize,
        index: usize,
        quota: &Quota,
        subject: &LimitSubject,
        cluster: Option<&crate::cluster::Cluster>,
    ) -> Result<(), u64> {
        let now = unix_now();
        let (period_id, remaining) = period_now(quota.period, now);
        let mut buf = [0u8; KEY_PREFIX_BYTES + MAX_KEY_BYTES];
        buf[..2].copy_from_slice(&(route as u16).to_le_bytes());
        buf[2] = index as u8;
        buf[3] = quota.period as u8;
        buf[4..8].copy_from_slice(&period_id.to_le_bytes());
        let ip_octets;
        let value: &[u8] = match &quota.key {
            LimitKey::Route => &[],
            LimitKey::Consumer if subject.consumer.is_some() => {
                subject.consumer.unwrap_or_default().as_bytes()
            }
            LimitKey::Header(name) if (subject.header)(name).is_some() => {
                (subject.header)(name).unwrap_or_default()
            }
            _ => {
                ip_octets = match subject.client {
                    std::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
                    std::net::IpAddr::V6(v6) => v6.octets(),
                };
                &ip_octets
            }
        };
        let len = if value.len() <= MAX_KEY_BYTES {
            buf[KEY_PREFIX_BYTES..KEY_PREFIX_BYTES + value.len()].copy_from_slice(value);
            KEY_PREFIX_BYTES + value.len()
        } else {
            buf[KEY_PREFIX_BYTES..KEY_PREFIX_BYTES + 32].copy_from_slice(&Sha256::digest(value));
            KEY_PREFIX_BYTES + 32
        };
        let key = &buf[..len];
        let guard = self.counters.guard();
        let counter = match self.counters.get(key, &guard) {
            Some(c) => c,
            None => self
                .counters
                .get_or_insert(key.into(), AtomicU64::new(0), &guard),
        };
        if counter.fetch_add(1, Ordering::AcqRel) >= quota.limit {
            counter.fetch_sub(1, Ordering::AcqRel);
            return Err(remaining.max(1));
        }
        if let Some(c) = cluster {
            // The same bytes on every host name the same Redis counter.
            let mut shared = [0u8; 6 + KEY_PREFIX_BYTES + MAX_KEY_BYTES];
            shared[..6].copy_from_slice(b"pcl:q:");
            shared[6..6 + len].copy_from_slice(key);
            if !c.admit(&shared[..6 + len], quota.limit, remaining + 60) {
                counter.fetch_sub(1, Ordering::AcqRel);
                return Err(remaining.max(1));
            }
        }
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Writes the counters of current periods if anything changed: temporary file, fsync,
    /// rename, fsync of the directory.
    pub fn flush(&self) -> std::io::Result<()> {
        if !self.dirty.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let now = unix_now();
        let current = [
            period_now(QuotaPeriod::Day, now).0,
            period_now(QuotaPeriod::Month, now).0,
        ];
        let mut text = String::from(STATE_HEADER);
        text.push('\n');
        for (key, count) in self.counters.pin().iter() {
            let period_kind = usize::from(key[3]).min(1);
            let period_id = u32::from_le_bytes(key[4..8].try_into().expect("key prefix"));
            if period_id < current[period_kind] {
                continue;
            }
            for b in key.iter() {
                let _ = write!(text, "{b:02x}");
            }
            let _ = writeln!(text, " {}", count.load(Ordering::Acquire));
        }
        write_atomically(&self.dir, STATE_FILE, text.as_bytes())
            .inspect_err(|_| self.dirty.store(true, Ordering::Release))
    }

    /// Drops counters of past periods from memory.
    pub fn sweep(&self) {
        let now = unix_now();
        let current = [
            period_now(QuotaPeriod::Day, now).0,
            period_now(QuotaPeriod::Month, now).0,
        ];
        self.counters.pin().retain(|key, _| {
            u32::from_le_bytes(key[4..8].try_into().expect("key prefix"))
                >= current[usize::from(key[3]).min(1)]
        });
    }

    /// Starts the flushing thread.
    pub fn start_flusher(self: &Arc<Self>, interval: Duration) -> std::io::Result<()> {
        let store = self.clone();
        std::thread::Builder::new()
            .name("portcullis-quotas".into())
            .spawn(move || loop {
                std::thread::sleep(interval);
                if let Err(e) = store.flush() {
                    warn!("cannot save quota counters: {e}");
                }
                store.sweep();
            })?;
        Ok(())
    }
}

fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = std::fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    std::fs::rename(&tmp, dir.join(name))?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_periods() {
        // 2026-11-26T12:00:00Z
        let t = 1_795_694_400;
        assert_eq!(period_now(QuotaPeriod::Day, t).1, 12 * 3600);
        let (month, left) = period_now(QuotaPeriod::Month, t);
        assert_eq!(month, (2026 * 12 + 10) as u32);
        assert_eq!(left, 4 * 86_400 + 12 * 3600, "until 2026-12-01");
        // December rolls into the next year.
        let dec = 1_796_083_200 + 86_400; // 2026-12-02
        assert_eq!(
            period_now(QuotaPeriod::Month, dec).0,
            (2026 * 12 + 11) as u32
        );
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(civil_month(days_from_civil(2024, 2, 29)), (2024, 2));
    }
}
