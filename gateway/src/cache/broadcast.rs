//! Purges shared by the hosts of a `[cluster]`: a purge made on one host is published on a
//! Redis channel and applied by every other host as it arrives (one Redis round trip while
//! they are subscribed). A host whose subscription is down misses the purges made meanwhile
//! (it says so in the log); its entries then end at their freshness.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Purge, ResponseCache};

const CHANNEL: &str = "portcullis:cache:purge";
const RETRY_INTERVAL: Duration = Duration::from_millis(500);

#[derive(Serialize, Deserialize)]
struct Message {
    /// The host that purged (it applied the purge itself).
    origin: String,
    purge: Purge,
}

/// This host's side of the purge channel.
pub struct PurgeBus {
    client: redis::Client,
    conn: Mutex<Option<redis::Connection>>,
    origin: String,
}

impl std::fmt::Debug for PurgeBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PurgeBus")
            .field("origin", &self.origin)
            .finish()
    }
}

impl PurgeBus {
    /// Subscribes (on its own thread) to purges of other hosts, applied to `cache`.
    pub fn start(redis_url: &str, cache: Arc<ResponseCache>) -> anyhow::Result<PurgeBus> {
        let client = redis::Client::open(redis_url).map_err(|e| {
            anyhow::anyhow!(
                "cluster.redis ({}): {e}",
                crate::log_throttle::redacted_url(redis_url)
            )
        })?;
        let origin = format!("{:016x}", fastrand::u64(..));
        let (listener, me) = (client.clone(), origin.clone());
        std::thread::Builder::new()
            .name("cache-purges".into())
            .spawn(move || subscribe(listener, me, cache))?;
        Ok(PurgeBus {
            client,
            conn: Mutex::new(None),
            origin,
        })
    }

    /// Tells the other hosts about `purge` (applied here already); false when Redis could not
    /// be reached.
    pub fn publish(&self, purge: &Purge) -> bool {
        let payload = serde_json::to_string(&Message {
            origin: self.origin.clone(),
            purge: purge.clone(),
        })
        .expect("a purge serialises");
        let mut slot = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let sent = (|| {
            if slot.is_none() {
                *slot = Some(crate::cluster::connect(&self.client)?);
            }
            let conn = slot.as_mut().expect("connected above");
            redis::cmd("PUBLISH")
                .arg(CHANNEL)
                .arg(&payload)
                .query::<u64>(conn)
        })();
        if let Err(e) = &sent {
            *slot = None;
            warn!("cache purge not sent to the other hosts: {e}");
        }
        sent.is_ok()
    }
}

fn subscribe(client: redis::Client, origin: String, cache: Arc<ResponseCache>) {
    let mut failing = false;
    loop {
        let result = (|| -> redis::RedisResult<()> {
            let mut conn = client.get_connection_with_timeout(Duration::from_millis(500))?;
            let mut pubsub = conn.as_pubsub();
            pubsub.subscribe(CHANNEL)?;
            if failing {
                info!("cache purges from other hosts are received again");
                failing = false;
            }
            loop {
                let message = pubsub.get_message()?;
                let payload: Vec<u8> = message.get_payload()?;
                match serde_json::from_slice::<Message>(&payload) {
                    Ok(m) if m.origin != origin => {
                        cache.apply(&m.purge);
                    }
                    Ok(_) => {}
                    Err(e) => warn!("a cache purge message that is none: {e}"),
                }
            }
        })();
        if let Err(e) = result {
            if !failing {
                warn!("cache purges from other hosts are missed until Redis answers: {e}");
                failing = true;
            }
        }
        std::thread::sleep(RETRY_INTERVAL);
    }
}
