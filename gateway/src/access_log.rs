//! The access log: one JSON object per request, written off the worker threads. Each worker
//! appends lines to its own buffer and hands a full one (or, every [`FLUSH_INTERVAL`], a
//! non-empty one) to the writer thread over a bounded channel; when the writer falls behind,
//! buffers are dropped and counted rather than stalling a worker. SIGUSR1 reopens the file
//! (for logrotate).

use std::{
    cell::RefCell,
    fs::{File, OpenOptions},
    io::Write,
    path::PathBuf,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    time::Duration,
};

use crate::config::{AccessLogConfig, AccessLogTarget};

/// A worker hands its buffer over once it holds this much.
pub const BUFFER_BYTES: usize = 64 * 1024;
/// And at least this often when it holds anything.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);
/// Buffers waiting for the writer, at most; beyond it they are dropped (and counted).
const QUEUED_BUFFERS: usize = 256;

/// Why the access log could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the access log {path}: {source}")]
pub struct OpenError {
    path: String,
    source: std::io::Error,
}

enum Sink {
    Stdout,
    File { path: PathBuf, file: File },
}

impl Sink {
    fn open(target: &AccessLogTarget) -> Result<Sink, OpenError> {
        match target {
            AccessLogTarget::Stdout => Ok(Sink::Stdout),
            AccessLogTarget::File(path) => Ok(Sink::File {
                file: open_append(path)?,
                path: path.clone(),
            }),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout => std::io::stdout().lock().write_all(bytes),
            Sink::File { file, .. } => file.write_all(bytes),
        }
    }

    fn reopen(&mut self) {
        if let Sink::File { path, file } = self {
            match open_append(path) {
                Ok(f) => *file = f,
                Err(e) => tracing::error!("{e}; still writing to the old file"),
            }
        }
    }
}

fn open_append(path: &PathBuf) -> Result<File, OpenError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| OpenError {
            path: path.display().to_string(),
            source,
        })
}

/// The writer's side, shared with the signal thread and the metrics.
pub struct AccessLog {
    tx: mpsc::SyncSender<Vec<u8>>,
    reopen: Arc<AtomicBool>,
    /// Buffers dropped because the writer fell behind.
    pub dropped: Arc<AtomicU64>,
    /// Buffers handed to the writer, and those it has written: equal once it caught up.
    handed: Arc<AtomicU64>,
    written: Arc<AtomicU64>,
    config: AccessLogConfig,
}

impl AccessLog {
    /// Opens the log and starts its writer thread.
    pub fn start(config: &AccessLogConfig) -> Result<Arc<AccessLog>, anyhow::Error> {
        let mut sink = Sink::open(&config.path)?;
        let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(QUEUED_BUFFERS);
        let reopen = Arc::new(AtomicBool::new(false));
        let flag = reopen.clone();
        let written = Arc::new(AtomicU64::new(0));
        let done = written.clone();
        std::thread::Builder::new()
            .name("portcullis-access-log".into())
            .spawn(move || {
                for buf in rx {
                    if flag.swap(false, Ordering::AcqRel) {
                        sink.reopen();
                    }
                    if !buf.is_empty() {
                        if let Err(e) = sink.write(&buf) {
                            crate::throttled_warn!(
                                crate::log_throttle::Noisy::AccessLog,
                                error = %e,
                                "cannot write the access log"
                            );
                        }
                    }
                    done.fetch_add(1, Ordering::Release);
                }
            })?;
        Ok(Arc::new(AccessLog {
            tx,
            reopen,
            dropped: Arc::default(),
            handed: Arc::default(),
            written,
            config: config.clone(),
        }))
    }

    /// Waits (at most `limit`) until the writer has written everything handed to it: at exit,
    /// after every worker's last flush.
    pub fn finish(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        while self.written.load(Ordering::Acquire) < self.handed.load(Ordering::Acquire)
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Reopens the file before the next write (SIGUSR1).
    pub fn reopen(&self) {
        self.reopen.store(true, Ordering::Release);
        // Wake the writer even when no request comes.
        if self.tx.try_send(Vec::new()).is_ok() {
            self.handed.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// A worker's buffer.
    pub fn worker(&self) -> WorkerLog {
        WorkerLog {
            tx: self.tx.clone(),
            dropped: self.dropped.clone(),
            handed: self.handed.clone(),
            buf: RefCell::new(Vec::with_capacity(BUFFER_BYTES + 4096)),
            sample_below: (self.config.sample * f64::from(u32::MAX)) as u64,
            rng: RefCell::new(fastrand::Rng::new()),
            include_query: self.config.include_query,
        }
    }
}

/// One worker's access-log buffer.
pub struct WorkerLog {
    tx: mpsc::SyncSender<Vec<u8>>,
    dropped: Arc<AtomicU64>,
    handed: Arc<AtomicU64>,
    buf: RefCell<Vec<u8>>,
    /// A request is logged when a random u32 falls below this.
    sample_below: u64,
    rng: RefCell<fastrand::Rng>,
    pub include_query: bool,
}

impl WorkerLog {
    /// Whether to log this request (sampling).
    pub fn sampled(&self) -> bool {
        self.sample_below > u64::from(u32::MAX) - 1
            || u64::from(self.rng.borrow_mut().u32(..)) < self.sample_below
    }

    /// Appends one line, written by `line` into the buffer; hands the buffer over when full.
    pub fn append(&self, line: impl FnOnce(&mut Vec<u8>)) {
        let full = {
            let mut buf = self.buf.borrow_mut();
            line(&mut buf);
            buf.push(b'\n');
            buf.len() >= BUFFER_BYTES
        };
        if full {
            self.flush();
        }
    }

    /// Hands what the buffer holds to the writer; dropped (and counted) if the writer is that
    /// far behind, so a stalled disk never stalls the worker.
    pub fn flush(&self) {
        let Some(buf) = self.take() else {
            return;
        };
        match self.tx.try_send(buf) {
            Ok(()) => {
                self.handed.fetch_add(1, Ordering::AcqRel);
            }
            Err(_) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The last flush of a worker that has stopped: waits for room rather than dropping.
    pub fn flush_final(&self) {
        if let Some(buf) = self.take() {
            if self.tx.send(buf).is_ok() {
                self.handed.fetch_add(1, Ordering::AcqRel);
            }
        }
    }

    fn take(&self) -> Option<Vec<u8>> {
        let mut buf = self.buf.borrow_mut();
        if buf.is_empty() {
            return None;
        }
        Some(std::mem::replace(
            &mut *buf,
            Vec::with_capacity(BUFFER_BYTES + 4096),
        ))
    }
}

/// Writes `value` as a JSON string (quoted and escaped), without allocating.
pub fn json_str(out: &mut Vec<u8>, value: &str) {
    let _ = serde_json::to_writer(&mut *out, value);
}

/// Writes bytes that should be text as a JSON string, replacing invalid UTF-8.
pub fn json_bytes(out: &mut Vec<u8>, value: &[u8]) {
    match std::str::from_utf8(value) {
        Ok(s) => json_str(out, s),
        Err(_) => json_str(out, &String::from_utf8_lossy(value)),
    }
}
