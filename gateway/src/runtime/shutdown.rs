//! Stopping: SIGTERM/SIGINT start a drain (listeners stop accepting, in-flight requests finish
//! within `drain_timeout`), a second signal exits at once; a binary upgrade starts a drain that
//! leaves the listening sockets to the new process.

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use signal_hook::{
    consts::{SIGINT, SIGTERM},
    iterator::Signals,
};

/// Why the process is draining.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DrainMode {
    /// Stopping: idle connections close at once.
    Stop,
    /// A new process took the listening sockets: connections close only after an answer
    /// carrying `Connection: close`, or at the end of the drain, so no request is cut.
    Upgrade,
}

/// Set once a drain has begun; read by every worker, and awaited by their accept loops.
#[derive(Clone)]
pub struct DrainFlag {
    set: Arc<AtomicBool>,
    mode: Arc<tokio::sync::watch::Sender<Option<DrainMode>>>,
}

impl Default for DrainFlag {
    fn default() -> Self {
        DrainFlag {
            set: Arc::default(),
            mode: Arc::new(tokio::sync::watch::Sender::new(None)),
        }
    }
}

impl DrainFlag {
    pub fn is_set(&self) -> bool {
        self.set.load(Ordering::Acquire)
    }

    pub fn mode(&self) -> Option<DrainMode> {
        *self.mode.borrow()
    }

    /// Starts the drain (the first call decides the mode).
    pub fn set(&self, mode: DrainMode) {
        if !self.set.swap(true, Ordering::AcqRel) {
            self.mode.send_replace(Some(mode));
        }
    }

    /// Resolves once a drain has begun.
    pub async fn started(&self) {
        let mut rx = self.mode.subscribe();
        let _ = rx.wait_for(Option::is_some).await;
    }
}

/// Starts the signal thread. The workers' accept loops see the drain flag and cancel their own
/// pending accepts; the listening sockets are never shut down, since after an upgrade another
/// process accepts on them.
pub fn watch_signals(flag: DrainFlag) -> std::io::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    std::thread::Builder::new()
        .name("portcullis-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if flag.is_set() {
                    tracing::warn!(signal, "second shutdown signal: exiting without waiting");
                    std::process::exit(1);
                }
                tracing::info!(signal, "shutdown signal: draining");
                // The accept loops cancel their own pending accepts. The listening sockets are
                // never shut down: during an upgrade they are shared with the new process.
                flag.set(DrainMode::Stop);
            }
        })?;
    Ok(())
}
