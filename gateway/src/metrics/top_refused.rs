//! The keys refused most by rate limits and quotas, per worker: a Space-Saving summary of
//! [`CAPACITY`] entries (the heavy hitters are kept, with their counts overestimated by at most
//! the count of the entry they displaced), recorded on the refusal path without allocating and
//! published for the admin API once a second.

use std::{
    cell::RefCell,
    sync::{Arc, Mutex},
};

use crate::limits::SubjectLabel;

use super::counter::LocalCounter;

/// Entries kept per worker.
pub const CAPACITY: usize = 32;

/// One refused key: the policy (by its refusal counter), what was refused, how often.
#[derive(Debug, Clone)]
pub struct RefusedKey {
    pub policy: Arc<LocalCounter>,
    pub subject: SubjectLabel,
    pub count: u64,
    /// How much of `count` may belong to the keys this entry displaced.
    pub error: u64,
}

/// A worker's summary, written by its thread only.
#[derive(Default)]
pub struct TopRefused {
    entries: RefCell<Vec<RefusedKey>>,
}

impl TopRefused {
    pub fn record(&self, policy: &Arc<LocalCounter>, subject: SubjectLabel) {
        let mut entries = self.entries.borrow_mut();
        if let Some(e) = entries
            .iter_mut()
            .find(|e| Arc::ptr_eq(&e.policy, policy) && e.subject == subject)
        {
            e.count += 1;
            return;
        }
        if entries.len() < CAPACITY {
            entries.push(RefusedKey {
                policy: policy.clone(),
                subject,
                count: 1,
                error: 0,
            });
            return;
        }
        if let Some(min) = entries.iter_mut().min_by_key(|e| e.count) {
            let floor = min.count;
            *min = RefusedKey {
                policy: policy.clone(),
                subject,
                count: floor + 1,
                error: floor,
            };
        }
    }

    /// Copies the summary where the scrape reads it (once a second: one uncontended lock).
    pub fn publish(&self, to: &Mutex<Vec<RefusedKey>>) {
        let entries = self.entries.borrow();
        let mut published = to.lock().unwrap_or_else(|e| e.into_inner());
        published.clone_from(&entries);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heavy_hitters_stay_and_counts_are_bounded() {
        let top = TopRefused::default();
        let policy = Arc::new(LocalCounter::default());
        let subject = |i: u8| {
            let hasher = crate::state::subject::SubjectHasher::from_secret(&[7; 32]);
            let header = |_: &str| None;
            SubjectLabel::of(
                &crate::limits::LimitKey::Client,
                &crate::limits::LimitSubject {
                    client: std::net::IpAddr::from([203, 0, 113, i]),
                    consumer: None,
                    header: &header,
                    hasher: &hasher,
                },
            )
        };
        // One source refused 500 times among 200 others refused twice each.
        for round in 0..500u32 {
            top.record(&policy, subject(250));
            if round < 400 {
                top.record(&policy, subject((round % 200) as u8));
            }
        }
        let out = Mutex::new(Vec::new());
        top.publish(&out);
        let out = out.lock().unwrap();
        assert!(out.len() <= CAPACITY);
        let heavy = out
            .iter()
            .find(|e| e.subject == subject(250))
            .expect("the heavy hitter");
        assert!(
            heavy.count >= 500 && heavy.count - heavy.error <= 500,
            "{heavy:?}"
        );
        assert_eq!(heavy.subject.to_string(), "client:203.0.113.250");
    }
}
