//! Background delivery of outcomes and releases to the shared store.
//!
//! The caller of [`crate::Permit::record`] never waits for Redis: its settle goes into the
//! store's settle queue (`store/redis/pending.rs`). This replica's next admission on the same
//! target or feature takes the queued pieces along in its own script call (so a replica always
//! sees its own writes); this task sends what no admission took: a batch once its oldest
//! settle has waited `redis.settle_delay`; the outcomes at once when 16 or more are queued
//! (under load the queue batches by itself, and holding a batch back then only makes the
//! script call that carries it longer, in front of the admissions Redis runs next: measured,
//! a 2 ms wait for every batch cost 10–14% of throughput at concurrency 64), their releases
//! left for the next admission on their feature (a release in flight here is one that
//! admission would wait for: measured at concurrency 64, half the admission batches did);
//! when a flush is asked for, or when an item is urgent (a release of a feature that has
//! callers waiting on this replica). When the queue is full the caller's settle is sent by a
//! spawned task instead, so nothing blocks and nothing is silently lost; on
//! [`crate::Coordinator::flush`] the queue is delivered.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::Sink;
use crate::store::Settle;

/// How the flusher batches.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Batching {
    /// Most settles in one delivery.
    pub(crate) max: usize,
    /// Longest wait of a settle for an admission to take it along.
    pub(crate) delay: Duration,
}

/// Settles (outcomes and releases) that background delivery handed to the store or gave up
/// on, since the last flush took the counts.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    delivered: AtomicU64,
    dropped: AtomicU64,
}

impl Tally {
    fn delivered(&self, n: usize) {
        self.delivered.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn dropped(&self, n: usize) {
        self.dropped.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// The counts so far, reset to zero: (delivered, dropped).
    pub(crate) fn take(&self) -> (u64, u64) {
        (
            self.delivered.swap(0, Ordering::AcqRel),
            self.dropped.swap(0, Ordering::AcqRel),
        )
    }
}

/// Runs until the store's settle queue is closed (the last coordinator dropped) and empty.
pub(crate) async fn run(sink: Sink, batching: Batching) {
    let queue = sink.store.settles();
    while let Some(batch) = queue.next_batch(batching.max, batching.delay).await {
        for (count, error) in &batch.dropped {
            sink.tally.dropped(*count);
            sink.reporter.emit(crate::Event::SettleDropped {
                count: *count,
                error: error.clone(),
            });
        }
        for name in &batch.released {
            if let Some(f) = sink.features.get(name) {
                f.released.notify_one();
            }
        }
        if !batch.settles.is_empty() {
            deliver(&sink, &batch.settles).await;
        }
        queue.finish(batch);
    }
}

/// Sends one batch to the shared store and reports what it caused: the transitions of the
/// calls that completed (even when others failed), and the items not delivered.
pub(crate) async fn deliver(sink: &Sink, batch: &[Settle]) {
    let report = sink.store.settle_report(batch).await;
    match &report.error {
        None => sink.reporter.store_ok(),
        Some(error) => sink.reporter.store_failed(error),
    }
    for t in report.transitions {
        sink.reporter.emit(crate::Event::Transition(t));
    }
    sink.tally
        .delivered(batch.len().saturating_sub(report.dropped));
    sink.tally.dropped(report.dropped.min(batch.len()));
    if report.dropped < batch.len() {
        for s in batch.iter().filter(|s| s.permit) {
            if let Some(f) = sink.features.get(&s.feature.name) {
                f.released.notify_one();
            }
        }
    }
    if let (Some(error), true) = (report.error, report.dropped > 0) {
        sink.reporter.emit(crate::Event::SettleDropped {
            count: report.dropped,
            error,
        });
    }
}
