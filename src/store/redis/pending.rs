//! The settle queue: outcomes and releases this replica has not delivered yet.
//!
//! [`Permit::record`](crate::Permit::record) puts a [`Settle`] here and returns. Two parties
//! take from it, whoever comes first, each piece exactly once:
//!
//! * an admission of this replica (the batcher, `batch.rs`) takes every queued outcome of its
//!   target and every queued release of its feature, and sends them in the same script call,
//!   ahead of its decision (`settle_admit.lua`): a replica's own settles always take effect no
//!   later than its next admission on the same keys;
//! * the flusher (`crate::coordinator`'s background task) sends what no admission took within
//!   `redis.settle_delay` of its arrival (at once when it is urgent, when a flush is asked
//!   for, or when [`SMALL`] or more are waiting).
//!
//! A settle is two pieces: its outcome (for the target's breaker) and its release (of the
//! feature's permit / rate slot). An admission on (target T, feature F) takes T's outcomes and
//! F's releases, which may split a settle of (T, G): its release then stays for the flusher
//! or for the next admission on G.
//!
//! Ordering against the flusher: while the flusher's call carrying pieces of a key is in
//! flight, an admission on that key waits for it (at most the store's timeout), so a re-sent
//! call (NOSCRIPT, a reconnect) cannot be overtaken either.
//!
//! When an admission's call fails, the pieces it carried are not lost: if the script surely
//! did not run (Redis refused it), they go back to the front of the queue; if it may have run
//! (timeout, dropped connection), what is safe to repeat goes back (permit releases and probe
//! slots: both idempotent), and what is not (outcome counts, rate refunds) is reported dropped,
//! as a failed flush reports it.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{oneshot, Notify};
use tokio::time::Instant;

use crate::breaker::CallOutcome;
use crate::store::Settle;
use crate::StoreError;

/// A batch this large goes to the flusher without waiting for more.
pub(crate) const SMALL: usize = 16;

/// One queued settle and which of its pieces are still to be delivered.
struct Item {
    settle: Settle,
    outcome: bool,
    release: bool,
    at: Instant,
    urgent: bool,
}

impl Item {
    /// The settle with the pieces already taken cleared (what still has to be sent).
    fn remaining(&self) -> Settle {
        let mut s = self.settle.clone();
        if !self.outcome {
            s.outcome = CallOutcome::Ignored;
            s.probe = false;
        }
        if !self.release {
            s.permit = false;
            s.refund_rate = false;
        }
        s
    }
}

fn has_outcome(s: &Settle) -> bool {
    s.outcome != CallOutcome::Ignored || s.probe
}

fn has_release(s: &Settle) -> bool {
    (s.permit && s.feature.bulkhead.is_some()) || (s.refund_rate && s.feature.rate.is_some())
}

#[derive(Default)]
struct State {
    items: VecDeque<Item>,
    /// An urgent settle was queued since the flusher last took a batch.
    urgent: bool,
    closed: bool,
    /// Flush requests, answered once the queue has been emptied.
    flushes: Vec<oneshot::Sender<()>>,
    /// Keys (breaker / permits) that a flusher call in flight carries pieces of.
    in_flight: HashMap<String, usize>,
    /// Pieces admissions carried whose delivery is unknown: (count, why).
    dropped: Vec<(usize, StoreError)>,
    /// Features whose permits rode with an admission (their waiters are woken by the flusher).
    released: Vec<String>,
}

/// The queue shared by the store (admissions) and the flusher.
pub(crate) struct SettleQueue {
    capacity: usize,
    state: Mutex<State>,
    /// Wakes the flusher.
    wake: Notify,
    /// A flusher call finished (keys left `in_flight`).
    landed: Notify,
}

/// What the flusher takes to send: the settles (pieces still owed), the keys they hold
/// "in flight", the flush requests answered once sent, and what to report.
#[derive(Default)]
pub(crate) struct FlushBatch {
    /// Settles to deliver with [`Store::settle`](crate::store::Store::settle).
    pub(crate) settles: Vec<Settle>,
    keys: Vec<String>,
    acks: Vec<oneshot::Sender<()>>,
    /// Pieces that rode with failed admissions and may or may not have been applied.
    pub(crate) dropped: Vec<(usize, StoreError)>,
    /// Features whose permits were released by admissions (wake one waiter each).
    pub(crate) released: Vec<String>,
}

impl SettleQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        SettleQueue {
            capacity: capacity.max(1),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            landed: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a settle; `urgent`: the flusher sends it without waiting for more. Gives it
    /// back when the queue is full or closed.
    pub(crate) fn push(&self, settle: Settle, urgent: bool) -> Result<(), Settle> {
        let (outcome, release) = (has_outcome(&settle), has_release(&settle));
        if !outcome && !release {
            return Ok(()); // nothing to deliver
        }
        let wake = {
            let mut st = self.lock();
            if st.closed || st.items.len() >= self.capacity {
                return Err(settle);
            }
            st.items.push_back(Item {
                settle,
                outcome,
                release,
                at: Instant::now(),
                urgent,
            });
            st.urgent |= urgent;
            // The flusher needs waking only to arm its timer (first item), to send a batch
            // that has grown to SMALL, or for an urgent item; otherwise its timer wakes it.
            urgent || st.items.len() == 1 || st.items.len() == SMALL
        };
        if wake {
            self.wake.notify_one();
        }
        Ok(())
    }

    /// Asks the flusher to send everything queued now; the receiver completes when it has.
    pub(crate) fn flush(&self) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.lock().flushes.push(tx);
        self.wake.notify_one();
        rx
    }

    /// No more settles are accepted; the flusher sends what is queued and then ends.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    /// Waits (at most `limit`) until no flusher call in flight carries pieces of `keys`.
    pub(crate) async fn wait_landed(&self, keys: &[&str], limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let landed = self.landed.notified();
            tokio::pin!(landed);
            landed.as_mut().enable();
            let busy = {
                let st = self.lock();
                !st.in_flight.is_empty() && keys.iter().any(|k| st.in_flight.contains_key(*k))
            };
            if !busy {
                return;
            }
            if tokio::time::timeout_at(deadline, landed).await.is_err() {
                return;
            }
        }
    }

    /// Takes, in queue order, the outcomes queued for the target whose breaker key is
    /// `breaker` and the releases queued for the feature whose permits key is `permits`
    /// (either may be `None`), at most `max` settles. Each returned settle carries only the
    /// pieces taken.
    pub(crate) fn take_for(
        &self,
        breaker: Option<&str>,
        permits: Option<&str>,
        max: usize,
    ) -> Vec<Settle> {
        let mut st = self.lock();
        let mut taken = Vec::new();
        if st.items.is_empty() {
            return taken;
        }
        st.items.retain_mut(|item| {
            if taken.len() >= max {
                return true;
            }
            let outcome =
                item.outcome && breaker.is_some_and(|b| item.settle.target.keys.breaker == b);
            let release =
                item.release && permits.is_some_and(|p| item.settle.feature.keys.permits == p);
            if !outcome && !release {
                return true;
            }
            let mut s = item.settle.clone();
            if !outcome {
                s.outcome = CallOutcome::Ignored;
                s.probe = false;
            }
            if !release {
                s.permit = false;
                s.refund_rate = false;
            }
            taken.push(s);
            item.outcome &= !outcome;
            item.release &= !release;
            item.outcome || item.release
        });
        taken
    }

    /// Settles an admission carried: delivered (their permits' waiters are woken).
    pub(crate) fn delivered(&self, settles: &[Settle]) {
        let mut st = self.lock();
        let mut any = false;
        for s in settles.iter().filter(|s| s.permit) {
            st.released.push(s.feature.name.clone());
            any = true;
        }
        drop(st);
        if any {
            self.wake.notify_one();
        }
    }

    /// Settles an admission carried whose call failed with `error`: back to the front of the
    /// queue when the script surely did not run (`ran == false`); otherwise only what is safe
    /// to repeat goes back, and the rest is reported dropped.
    pub(crate) fn give_back(&self, settles: Vec<Settle>, error: &StoreError, may_have_run: bool) {
        if settles.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut st = self.lock();
        let mut dropped = 0;
        for mut s in settles.into_iter().rev() {
            if may_have_run {
                if s.outcome != CallOutcome::Ignored || (s.refund_rate && s.feature.rate.is_some())
                {
                    dropped += 1;
                }
                // Freeing a probe slot and releasing a permit are safe to repeat.
                s.outcome = CallOutcome::Ignored;
                s.refund_rate = false;
            }
            let (outcome, release) = (has_outcome(&s), has_release(&s));
            if outcome || release {
                st.items.push_front(Item {
                    settle: s,
                    outcome,
                    release,
                    // Not waiting again: the flusher sends it with its next batch.
                    at: now.checked_sub(Duration::from_secs(3600)).unwrap_or(now),
                    urgent: false,
                });
            }
        }
        if dropped > 0 {
            st.dropped.push((dropped, error.clone()));
        }
        drop(st);
        self.wake.notify_one();
    }

    /// The flusher's next batch (at most `max` settles): waits for work, and while fewer
    /// than [`SMALL`] settles wait and none is urgent, until the oldest has waited `delay`.
    /// `None`: the queue is closed and empty.
    pub(crate) async fn next_batch(&self, max: usize, delay: Duration) -> Option<FlushBatch> {
        let max = max.max(1);
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let until = {
                let mut st = self.lock();
                let now = Instant::now();
                let oldest = st.items.front().map(|i| i.at + delay);
                let due = !st.flushes.is_empty()
                    || st.closed
                    || st.items.len() >= max.min(SMALL)
                    || st.urgent
                    || oldest.is_some_and(|t| t <= now);
                let reports = !st.dropped.is_empty() || !st.released.is_empty();
                if (due && !st.items.is_empty()) || reports || !st.flushes.is_empty() {
                    return Some(Self::take_batch(&mut st, max));
                }
                if st.closed {
                    return None;
                }
                oldest
            };
            match until {
                Some(t) => {
                    let _ = tokio::time::timeout_at(t, woken).await;
                }
                None => woken.await,
            }
        }
    }

    fn take_batch(st: &mut State, max: usize) -> FlushBatch {
        let n = st.items.len().min(max);
        st.urgent = st.items.iter().skip(n).any(|i| i.urgent);
        let settles: Vec<Settle> = st.items.drain(..n).map(|i| i.remaining()).collect();
        let mut keys = Vec::new();
        for s in &settles {
            if has_outcome(s) {
                keys.push(s.target.keys.breaker.clone());
            }
            if has_release(s) {
                keys.push(s.feature.keys.permits.clone());
            }
        }
        keys.sort_unstable();
        keys.dedup();
        for k in &keys {
            *st.in_flight.entry(k.clone()).or_insert(0) += 1;
        }
        let acks = if st.items.is_empty() {
            std::mem::take(&mut st.flushes)
        } else {
            Vec::new()
        };
        FlushBatch {
            settles,
            keys,
            acks,
            dropped: std::mem::take(&mut st.dropped),
            released: std::mem::take(&mut st.released),
        }
    }

    /// The flusher is done with `batch` (delivered or not): its keys are no longer in flight
    /// and its flush requests are answered.
    pub(crate) fn finish(&self, batch: FlushBatch) {
        {
            let mut st = self.lock();
            for k in &batch.keys {
                if let Some(n) = st.in_flight.get_mut(k) {
                    *n -= 1;
                    if *n == 0 {
                        st.in_flight.remove(k);
                    }
                }
            }
        }
        self.landed.notify_waiters();
        for ack in batch.acks {
            let _ = ack.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::breaker::BreakerParams;
    use crate::bulkhead::BulkheadParams;
    use crate::keys::{feature_keys, target_keys};
    use crate::ratelimit::RateParams;
    use crate::store::{FeatureSpec, TargetSpec};

    fn settle(target: &str, feature: &str, id: &str, outcome: CallOutcome) -> Settle {
        Settle {
            target: Arc::new(TargetSpec {
                name: target.to_owned(),
                keys: target_keys("q", target),
                params: BreakerParams::from_config(&crate::BreakerConfig::default(), 1000),
            }),
            feature: Arc::new(FeatureSpec {
                name: feature.to_owned(),
                keys: feature_keys("q", feature),
                bulkhead: Some(BulkheadParams {
                    limit: 1,
                    lease_ms: 1000,
                }),
                rate: Some(RateParams {
                    emission_us: 1000,
                    burst: 1,
                }),
            }),
            call_id: id.to_owned(),
            generation: 0,
            probe: false,
            permit: true,
            refund_rate: false,
            outcome,
            elapsed_ms: 0,
        }
    }

    fn keys(s: &Settle) -> (String, String) {
        (
            s.target.keys.breaker.clone(),
            s.feature.keys.permits.clone(),
        )
    }

    #[test]
    fn an_admission_takes_its_targets_outcomes_and_its_features_releases() {
        let q = SettleQueue::new(16);
        let tf = settle("t", "f", "a", CallOutcome::Failure);
        let tg = settle("t", "g", "b", CallOutcome::Success);
        let uf = settle("u", "f", "c", CallOutcome::Failure);
        let (t, f) = keys(&tf);
        for s in [tf, tg, uf] {
            q.push(s, false).expect("room");
        }
        let taken = q.take_for(Some(&t), Some(&f), 100);
        let got: Vec<_> = taken
            .iter()
            .map(|s| (s.call_id.as_str(), s.outcome, s.permit))
            .collect();
        assert_eq!(
            got,
            [
                ("a", CallOutcome::Failure, true),
                ("b", CallOutcome::Success, false), // g's release stays queued
                ("c", CallOutcome::Ignored, true),  // u's outcome stays queued
            ]
        );
        // What is left: b's release, c's outcome; taken again by nobody else.
        assert!(q.take_for(Some(&t), Some(&f), 100).is_empty());
        let st = q.lock();
        let left: Vec<_> = st
            .items
            .iter()
            .map(|i| (i.settle.call_id.as_str(), i.outcome, i.release))
            .collect();
        assert_eq!(left, [("b", false, true), ("c", true, false)]);
    }

    #[tokio::test]
    async fn a_failed_admission_gives_its_settles_back_or_reports_them() {
        let q = SettleQueue::new(16);
        let mut s = settle("t", "f", "a", CallOutcome::Failure);
        s.refund_rate = true;
        let (t, f) = keys(&s);
        q.push(s, false).expect("room");

        // Redis refused the script: nothing ran, everything goes back as it was.
        let taken = q.take_for(Some(&t), Some(&f), 100);
        q.give_back(taken, &StoreError::Command("ERR".into()), false);
        let again = q.take_for(Some(&t), Some(&f), 100);
        assert_eq!(again.len(), 1);
        assert_eq!(
            (again[0].outcome, again[0].permit, again[0].refund_rate),
            (CallOutcome::Failure, true, true)
        );

        // A timeout: it may have run. The release goes back; the failure and the refund are
        // not repeated but reported dropped.
        q.give_back(again, &StoreError::Timeout(Duration::from_millis(5)), true);
        let batch = q
            .next_batch(100, Duration::from_secs(3600))
            .await
            .expect("a batch");
        assert_eq!(batch.dropped.len(), 1);
        assert_eq!(batch.dropped[0].0, 1);
        assert_eq!(batch.settles.len(), 1);
        let s = &batch.settles[0];
        assert_eq!(
            (s.outcome, s.permit, s.refund_rate),
            (CallOutcome::Ignored, true, false)
        );
        q.finish(batch);
    }

    #[tokio::test(start_paused = true)]
    async fn the_flusher_waits_for_an_admission_then_sends_what_none_took() {
        let q = Arc::new(SettleQueue::new(16));
        let delay = Duration::from_millis(2);
        q.push(settle("t", "f", "a", CallOutcome::Success), false)
            .expect("room");
        let started = Instant::now();
        let batch = q.next_batch(100, delay).await.expect("a batch");
        assert!(started.elapsed() >= delay);
        assert_eq!(batch.settles.len(), 1);
        // Its keys are in flight until finished: an admission on them waits.
        let (t, _) = keys(&batch.settles[0]);
        let waiter = {
            let q = Arc::clone(&q);
            tokio::spawn(async move {
                q.wait_landed(&[t.as_str()], Duration::from_secs(10)).await;
                Instant::now()
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let finished = Instant::now();
        q.finish(batch);
        assert!(waiter.await.expect("task") >= finished);

        // A flush is answered once the queue is empty.
        q.push(settle("t", "f", "b", CallOutcome::Success), false)
            .expect("room");
        let done = q.flush();
        let batch = q
            .next_batch(100, Duration::from_secs(3600))
            .await
            .expect("a batch");
        assert_eq!(batch.settles.len(), 1);
        q.finish(batch);
        done.await.expect("flush answered");

        q.close();
        assert!(q.next_batch(100, delay).await.is_none());
    }
}
