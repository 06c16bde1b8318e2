//! The data directory belongs to one process at a time: a lock file held with `flock` for the
//! process's life, holding its pid, so a second gateway on the same directory refuses to start
//! (two writers would overwrite each other's counts) and says who holds it.

use std::{
    fs::{File, OpenOptions, TryLockError},
    io::{Read, Seek, Write},
    path::{Path, PathBuf},
};

const LOCK_FILE: &str = "lock";

/// Why the data directory cannot be had.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("{dir}: cannot create or open it: {source}")]
    Io {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("{dir} is in use by another Portcullis process (pid {holder}, lock file {lock}); give each gateway its own `quotas.data_dir`")]
    Held {
        dir: PathBuf,
        lock: PathBuf,
        holder: String,
    },
}

/// Holds the directory until dropped (the kernel releases the lock when the process ends, also
/// on `kill -9`).
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
}

impl DataDirLock {
    pub fn acquire(dir: &Path) -> Result<DataDirLock, DataDirError> {
        let io = |source| DataDirError::Io {
            dir: dir.to_owned(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(io)?;
        let path = dir.join(LOCK_FILE);
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                let holder = holder.trim();
                return Err(DataDirError::Held {
                    dir: dir.to_owned(),
                    lock: path,
                    holder: if holder.is_empty() {
                        "unknown".into()
                    } else {
                        holder.to_owned()
                    },
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        writeln!(file, "{}", std::process::id()).map_err(io)?;
        Ok(DataDirLock { _file: file })
    }
}
