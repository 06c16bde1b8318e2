//! The ban hook: the HTTP layer reports each answer the gateway itself gave with a status in
//! `ban_statuses`; a source reaching `ban_after` of them within `ban_window` is banned in the
//! kernel for `ban_duration`.
//!
//! Workers only push the source address into a bounded channel (no lock on the request path);
//! one thread counts, so counts are exact across workers. When the channel is full (a flood of
//! rejections faster than the counter drains), reports are dropped and counted, never waited for.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    path::PathBuf,
    sync::{
        atomic::{AtomicU64, Ordering},
        mpsc::{sync_channel, Receiver, SyncSender, TrySendError},
        Arc,
    },
    time::{Duration, Instant},
};

use tracing::{info, warn};

use super::bans::BanTable;
use crate::config::XdpConfig;

/// Reports waiting to be counted, at most.
const REPORT_QUEUE: usize = 65_536;
/// Sources tracked at most; beyond it the oldest are forgotten.
const MAX_TRACKED_SOURCES: usize = 100_000;

/// Held by each worker: cheap to clone, never blocks.
#[derive(Clone)]
pub struct BanReporter {
    tx: SyncSender<IpAddr>,
    /// Bit `s - 400` set for each status in `ban_statuses`.
    statuses: [u64; 4],
    dropped: Arc<AtomicU64>,
}

impl BanReporter {
    /// Called for every answer the gateway gives itself.
    #[inline]
    pub fn report(&self, peer: IpAddr, status: u16) {
        let Some(bit) = status.checked_sub(400).filter(|b| *b < 256) else {
            return;
        };
        if self.statuses[usize::from(bit / 64)] & (1 << (bit % 64)) == 0 {
            return;
        }
        if let Err(TrySendError::Full(_)) = self.tx.try_send(peer) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Starts the counting thread; returns the reporter workers use.
pub fn start(config: &XdpConfig) -> Option<BanReporter> {
    let ban_after = config.ban_after?;
    let mut statuses = [0u64; 4];
    for s in &config.ban_statuses {
        let bit = s - 400;
        statuses[usize::from(bit / 64)] |= 1 << (bit % 64);
    }
    let (tx, rx) = sync_channel(REPORT_QUEUE);
    let dropped = Arc::new(AtomicU64::new(0));
    let counter = BanCounter {
        rx,
        ban_after: ban_after as usize,
        window: config.ban_window.get(),
        duration: config.ban_duration.get(),
        pin_path: config.pin_path.clone(),
        events: HashMap::new(),
        dropped: dropped.clone(),
    };
    std::thread::Builder::new()
        .name("portcullis-bans".into())
        .spawn(move || counter.run())
        .ok()?;
    Some(BanReporter {
        tx,
        statuses,
        dropped,
    })
}

struct BanCounter {
    rx: Receiver<IpAddr>,
    ban_after: usize,
    window: Duration,
    duration: Duration,
    pin_path: PathBuf,
    events: HashMap<IpAddr, VecDeque<Instant>>,
    dropped: Arc<AtomicU64>,
}

impl BanCounter {
    fn run(mut self) {
        let mut table: Option<BanTable> = None;
        // Ends when every worker (every sender) is gone.
        while let Ok(peer) = self.rx.recv() {
            let now = Instant::now();
            let window = self.window;
            let times = self.events.entry(peer).or_default();
            times.push_back(now);
            while times
                .front()
                .is_some_and(|t| now.duration_since(*t) > window)
            {
                times.pop_front();
            }
            if times.len() < self.ban_after {
                if self.events.len() > MAX_TRACKED_SOURCES {
                    self.events.retain(|_, t| {
                        t.back()
                            .is_some_and(|last| now.duration_since(*last) <= window)
                    });
                }
                continue;
            }
            self.events.remove(&peer);
            if table.is_none() {
                table = BanTable::open(&self.pin_path)
                    .map_err(|e| warn!("cannot open the ban map: {e:#}"))
                    .ok();
            }
            let Some(t) = table.as_mut() else { continue };
            match t.add(peer, self.duration) {
                Ok(()) => {
                    info!(source = %peer, duration = ?self.duration, rejections = self.ban_after, window = ?self.window, dropped_reports = self.dropped.load(Ordering::Relaxed), "source banned")
                }
                Err(e) => warn!(source = %peer, "cannot ban: {e:#}"),
            }
        }
    }
}
