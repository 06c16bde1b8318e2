//! Durable state on the host: the lock that gives one process its data directory, the secret
//! that keys header-derived counts, and the quota journal.

pub mod atomic_file;
pub mod data_dir;
pub mod journal;
pub mod owner_only;
pub mod subject;
