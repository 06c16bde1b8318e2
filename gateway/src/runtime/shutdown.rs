//! SIGTERM/SIGINT handling: the first signal starts a drain (listeners stop accepting, in-flight
//! requests finish within `drain_timeout`); a second one exits at once.

use std::{
    net::{Shutdown, TcpListener},
    os::fd::AsRawFd,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
};

use signal_hook::{
    consts::{SIGINT, SIGTERM},
    iterator::Signals,
};

/// Set once a drain has begun; read by every worker.
#[derive(Clone, Default)]
pub struct DrainFlag(Arc<AtomicBool>);

impl DrainFlag {
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
    pub fn set(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// Starts the signal thread. `listeners` are clones of every worker's listening sockets: shutting
/// one down makes the worker's pending accept fail, which is how a worker learns to drain.
pub fn watch_signals(flag: DrainFlag, listeners: Vec<TcpListener>) -> std::io::Result<()> {
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
                flag.set();
                for l in &listeners {
                    crate::sys::shutdown_fd(l.as_raw_fd(), Shutdown::Read);
                }
            }
        })?;
    Ok(())
}
