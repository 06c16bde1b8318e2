//! A worker built from a config snippet, for the tests of the phases and of the connection
//! loop: one consumer `alice` with an API key, one upstream `u`, and the routes given.

use std::{path::Path, sync::Arc};

use super::{
    snapshot::{ConfigSnapshot, Published},
    worker::Worker,
};
use crate::config::Config;

pub struct Bench {
    pub worker: Worker,
    /// alice's API key.
    pub key: String,
    _data: tempfile::TempDir,
}

/// A worker serving `routes`, with upstream `u` at `upstream` (an address nothing listens on
/// unless a test says otherwise).
pub fn bench_with_upstream(routes: &str, upstream: &str) -> Bench {
    let data = tempfile::tempdir().unwrap();
    let (key, hash) = crate::auth::new_key();
    let src = format!(
        "[quotas]\ndata_dir = \"{}\"\n[upstreams.u]\nservers = [\"{upstream}\"]\n[[consumers]]\nid = \"alice\"\napi_keys = [\"{hash}\"]\n{routes}",
        data.path().display()
    );
    let config = Config::parse(Path::new("t.toml"), &src).unwrap();
    let published: Arc<Published> = Published::new(ConfigSnapshot::new(config).unwrap());
    Bench {
        worker: Worker::new(0, published, None, None, None),
        key,
        _data: data,
    }
}

pub fn bench(routes: &str) -> Bench {
    // Port 9 (discard) on loopback: nothing listens there on a test machine.
    bench_with_upstream(routes, "127.0.0.1:9")
}
