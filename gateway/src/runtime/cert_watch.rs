//! Reloads when a file the TLS settings in force read changes (certificates, keys, CAs, CRLs,
//! ticket keys, of listeners and of upstreams; size or modification time, polled), so a renewed certificate (an ACME client writing new files)
//! is served without anyone running `portcullis reload`. A bad new file is refused as any
//! reload is, and the old certificates keep serving.

use std::{collections::BTreeMap, path::PathBuf, sync::Arc, time::Duration};

use tracing::{info, warn};

use super::live::Live;

/// How often the files are looked at.
pub const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// What a file looked like: (modified, length), or nothing when it could not be read.
type Stamp = Option<(std::time::SystemTime, u64)>;

fn stamps(live: &Live) -> BTreeMap<PathBuf, Stamp> {
    let snapshot = live.snapshot();
    let mut out = BTreeMap::new();
    let upstream_files = snapshot
        .config
        .upstreams
        .values()
        .filter_map(|u| u.tls.as_ref())
        .flat_map(|t| [&t.ca, &t.cert, &t.key])
        .flatten();
    let files = snapshot
        .config
        .tls
        .values()
        .flat_map(|profile| profile.files())
        .chain(upstream_files);
    for path in files {
        let stamp = std::fs::metadata(path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len())));
        out.insert(path.clone(), stamp);
    }
    out
}

/// Starts the watcher thread.
pub fn start(live: Arc<Live>) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("portcullis-certs".into())
        .spawn(move || {
            let mut seen = stamps(&live);
            loop {
                std::thread::sleep(POLL_INTERVAL);
                if live.is_retired() {
                    return;
                }
                let now = stamps(&live);
                // Files of a profile added by a reload are new, not changed.
                let changed = now
                    .iter()
                    .any(|(path, stamp)| seen.get(path).is_some_and(|s| s != stamp));
                if changed {
                    info!("certificate or key files changed: reloading");
                    if let Err(e) = live.reload() {
                        warn!("the changed certificates were not taken: {e}");
                    }
                }
                seen = now;
            }
        })?;
    Ok(())
}
