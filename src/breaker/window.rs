//! Time-based sliding window of fixed buckets (resilience4j's `TIME_BASED` window).
//!
//! Bucket `i` covers epoch `e` where `e = now / bucket_ms` and `i = e % buckets`; a bucket
//! whose stored epoch is not within the last `buckets` epochs is stale and counts as empty.
//! The Redis layout mirrors this: hash fields `we<i>`, `wc<i>`, `wf<i>`, `ws<i>`.

/// One bucket's counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bucket {
    /// Which bucket-width epoch these counts belong to.
    pub epoch: u64,
    /// Calls recorded.
    pub calls: u64,
    /// Of which failures.
    pub failures: u64,
    /// Of which slow.
    pub slow: u64,
}

/// Totals over the live part of the window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    /// Calls in the window.
    pub calls: u64,
    /// Failures in the window.
    pub failures: u64,
    /// Slow calls in the window.
    pub slow: u64,
}

/// The ring of buckets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Window {
    /// `buckets` entries once used; empty until the first record.
    pub buckets: Vec<Bucket>,
}

impl Window {
    /// Adds one call at `now_ms`.
    pub fn add(&mut self, now_ms: u64, bucket_ms: u64, n: u32, failure: bool, slow: bool) {
        let n = n.max(1) as usize;
        if self.buckets.len() != n {
            self.buckets = vec![Bucket::default(); n];
        }
        let epoch = now_ms / bucket_ms.max(1);
        let b = &mut self.buckets[(epoch % n as u64) as usize];
        if b.epoch != epoch {
            *b = Bucket {
                epoch,
                ..Bucket::default()
            };
        }
        b.calls += 1;
        b.failures += u64::from(failure);
        b.slow += u64::from(slow);
    }

    /// Totals of the buckets still inside the window at `now_ms`.
    pub fn totals(&self, now_ms: u64, bucket_ms: u64, n: u32) -> Totals {
        let epoch = now_ms / bucket_ms.max(1);
        let oldest = epoch.saturating_sub(u64::from(n.max(1)) - 1);
        self.buckets
            .iter()
            .filter(|b| b.epoch >= oldest && b.epoch <= epoch && b.calls > 0)
            .fold(Totals::default(), |t, b| Totals {
                calls: t.calls + b.calls,
                failures: t.failures + b.failures,
                slow: t.slow + b.slow,
            })
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.buckets.clear();
    }
}
