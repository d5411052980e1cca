//! The settle queue: outcomes and releases this replica has not delivered yet.
//!
//! [`Permit::record`](crate::Permit::record) puts a [`Settle`] here and returns. Two parties
//! take from it, whoever comes first, each piece exactly once:
//!
//! * an admission of this replica (the batcher, `batch.rs`) takes every queued release of its
//!   feature and, when one of them must ride (below), every queued outcome of its target, and
//!   sends them in the same script call, ahead of its decision (`settle_admit.lua`): a
//!   replica's own settles take effect no later than its next admission they could change;
//! * the flusher (`crate::coordinator`'s background task) sends what no admission took within
//!   `redis.settle_delay` of its arrival (at once when it is urgent or when a flush is asked
//!   for; when [`SMALL`] or more are waiting, it sends their outcomes at once and leaves their
//!   releases to the next admission on their feature, until their delay is up: a release
//!   the flusher has in flight is one that admission would have to wait for).
//!
//! A settle is two pieces: its outcome (for the target's breaker) and its release (of the
//! feature's permit / rate slot). An admission on (target T, feature F) takes T's outcomes and
//! F's releases, which may split a settle of (T, G): its release then stays for the flusher
//! or for the next admission on G.
//!
//! Which outcomes must ride. A success that is not slow under the target's slow-call rule and
//! held no probe slot cannot change an admission decision, so it is left for the flusher (and
//! many of them then go in one run-length-encoded entry). The argument, from
//! `BreakerState::record` (which `settle.lua` follows):
//!
//! * such a success changes nothing unless the breaker is closed at the call's generation (a
//!   stale generation, an open, half-open or forced breaker ignore it; a call admitted under a
//!   half-open generation is a probe and rides);
//! * on a closed breaker it adds one call to the window and sets the consecutive-failure count
//!   to 0, and never opens it: only a call that counts against the target (a failure, or a
//!   slow call under the slow-call rule) is checked against the rules. Admission reads only
//!   the state (closed stays closed), never the window or the count, so no decision differs;
//! * the window and the count do matter to the next failure or slow call: so as soon as any
//!   outcome of a target must ride (a failure, a slow call, a probe's outcome, an ignored
//!   probe freeing its slot), all queued outcomes of that target ride with it, in queue order,
//!   and the breaker sees the same sequence as `MemoryStore` does.
//!
//! The deferred successes reach Redis within `redis.settle_delay` (the flusher), as every
//! settle did before riding existed; only their window bucket can differ, by that delay.
//! Releases always ride: a permit decides the bulkhead.
//!
//! Ordering against the flusher: while the flusher's call carrying pieces of a key is in
//! flight, an admission on that key waits for it (at most the store's timeout), so a re-sent
//! call (NOSCRIPT, a reconnect) cannot be overtaken either; but only when the order can
//! matter. A flusher call whose pieces for a target are all plain successes (outcomes that
//! need not ride, above) cannot change an admission decision, so an admission on that target
//! waits for it only when the admission itself takes outcomes of the target along (they must
//! land after the successes queued before them). Releases in flight are always waited for:
//! they decide the bulkhead. (Measured at concurrency 64 before this rule: 7,180 of 15,720
//! admission batches waited for a flusher call of successes.)
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

/// Whether the settle's outcome can change an admission decision, so that it must ride with
/// this replica's next admission on its target (see the module docs): a probe's outcome (also
/// an ignored one, which frees its slot), a failure, or a call slow enough to count under the
/// target's slow-call rule. A success that is none of these is left for the flusher, unless
/// another outcome of its target must ride: then all of them ride, in queue order.
fn must_ride(s: &Settle) -> bool {
    let p = &s.target.params;
    s.probe
        || s.outcome == CallOutcome::Failure
        || (s.outcome == CallOutcome::Success
            && p.slow_call_rate_pct > 0.0
            && p.slow_call_ms > 0
            && s.elapsed_ms >= p.slow_call_ms)
}

fn has_release(s: &Settle) -> bool {
    (s.permit && s.feature.bulkhead.is_some()) || (s.refund_rate && s.feature.rate.is_some())
}

#[derive(Default)]
struct State {
    items: VecDeque<Item>,
    /// An urgent settle was queued since the flusher last took a batch.
    urgent: bool,
    /// A queued outcome must ride ([`must_ride`]): the flusher sends the queued outcomes at
    /// once (their releases stay for admissions, as when the queue has grown to [`SMALL`]).
    ride_now: bool,
    closed: bool,
    /// Flush requests, answered once the queue has been emptied.
    flushes: Vec<oneshot::Sender<()>>,
    /// Keys (breaker / permits) that a flusher call in flight carries pieces of that an
    /// admission on them must wait for: releases, and outcomes that must ride.
    in_flight: HashMap<String, usize>,
    /// Breaker keys that a flusher call in flight carries only plain successes of (see
    /// [`must_ride`]): an admission waits for them only when it takes outcomes of the target.
    in_flight_plain: HashMap<String, usize>,
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
    /// Keys held in `in_flight`, and in `in_flight_plain`.
    keys: Vec<String>,
    plain_keys: Vec<String>,
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
    ///
    /// A settle whose outcome can change an admission decision ([`must_ride`]: a failure, a
    /// probe's outcome, a slow call) has its outcome sent at once too: until it reaches
    /// Redis, other replicas admit calls it may be about to refuse (a failure that trips the
    /// breaker), or keep refusing calls it is about to admit (the probe's success that
    /// closes it). Measured with `cargo bench --bench outage` before this: 3 of the 20 calls
    /// that reached the failing primary were admitted while the failures that would open it
    /// waited for `settle_delay`. Such settles are rare (a healthy target's calls are plain
    /// successes), so this costs the hot path nothing. Only the outcome goes: the release
    /// stays for this replica's next admission on its feature, which carries it in its own
    /// script call (a release sent apart can be overtaken when redis-rs re-sends a script
    /// after NOSCRIPT; `tests/conformance.rs` `the_loop_holds_when_scripts_are_flushed`).
    pub(crate) fn push(&self, settle: Settle, urgent: bool) -> Result<(), Settle> {
        let (outcome, release) = (has_outcome(&settle), has_release(&settle));
        if !outcome && !release {
            return Ok(()); // nothing to deliver
        }
        let ride_now = outcome && must_ride(&settle);
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
            st.ride_now |= ride_now;
            // The flusher needs waking only to arm its timer (first item), to send a batch
            // that has grown to SMALL, or for an urgent item or outcome; otherwise its timer
            // wakes it.
            urgent || ride_now || st.items.len() == 1 || st.items.len() == SMALL
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

    /// Whether an admission on `key` (a breaker key if `breaker`, else a permits key) must
    /// wait for a flusher call in flight (see the module docs).
    fn busy(st: &State, key: &str, breaker: bool) -> bool {
        if st.in_flight.contains_key(key) {
            return true;
        }
        // Plain successes in flight: wait only if the admission takes outcomes along.
        breaker
            && st.in_flight_plain.contains_key(key)
            && st
                .items
                .iter()
                .any(|i| i.outcome && i.settle.target.keys.breaker == key && must_ride(&i.settle))
    }

    /// For each `(breaker, permits)` pair, what [`take_for`](Self::take_for) would take, taken
    /// once no flusher call in flight carries pieces of any of these keys (waiting at most
    /// `limit`, then taking anyway). Checking and taking under one lock matters: a flusher
    /// batch taken between a separate check and the take would go out concurrently with the
    /// admission, and a later outcome riding with the admission could overtake an earlier
    /// one in the flusher's call (a re-send after NOSCRIPT reorders them).
    pub(crate) async fn take_landed(
        &self,
        pairs: &[(Option<&str>, Option<&str>)],
        max: usize,
        limit: Duration,
    ) -> Vec<Vec<Settle>> {
        let deadline = Instant::now() + limit;
        loop {
            let landed = self.landed.notified();
            tokio::pin!(landed);
            landed.as_mut().enable();
            {
                let mut st = self.lock();
                let nothing_in_flight = st.in_flight.is_empty() && st.in_flight_plain.is_empty();
                // Which keys of each pair wait for a flusher call in flight.
                let busy: Vec<(bool, bool)> = pairs
                    .iter()
                    .map(|(b, p)| {
                        if nothing_in_flight {
                            return (false, false);
                        }
                        (
                            b.is_some_and(|k| Self::busy(&st, k, true)),
                            p.is_some_and(|k| Self::busy(&st, k, false)),
                        )
                    })
                    .collect();
                if busy.iter().all(|(b, p)| !b && !p) {
                    return pairs
                        .iter()
                        .map(|(b, p)| Self::take_locked(&mut st, *b, *p, max))
                        .collect();
                }
                if Instant::now() >= deadline {
                    // Waited long enough: the admission goes without what the busy keys
                    // have queued (the flusher sends it after its call in flight, in
                    // order), rather than next to that call, where it could overtake it.
                    return pairs
                        .iter()
                        .zip(busy)
                        .map(|((b, p), (bb, pb))| {
                            let (b, p) = (b.filter(|_| !bb), p.filter(|_| !pb));
                            Self::take_locked(&mut st, b, p, max)
                        })
                        .collect();
                }
            }
            let _ = tokio::time::timeout_at(deadline, landed).await;
        }
    }

    /// Takes, in queue order, the outcomes queued for the target whose breaker key is
    /// `breaker` and the releases queued for the feature whose permits key is `permits`
    /// (either may be `None`), at most `max` settles. Each returned settle carries only the
    /// pieces taken.
    #[cfg(test)]
    pub(crate) fn take_for(
        &self,
        breaker: Option<&str>,
        permits: Option<&str>,
        max: usize,
    ) -> Vec<Settle> {
        Self::take_locked(&mut self.lock(), breaker, permits, max)
    }

    fn take_locked(
        st: &mut State,
        breaker: Option<&str>,
        permits: Option<&str>,
        max: usize,
    ) -> Vec<Settle> {
        let mut taken = Vec::new();
        if st.items.is_empty() {
            return taken;
        }
        // The target's outcomes ride only when one of them must (then all of them, in order).
        let breaker = breaker.filter(|b| {
            st.items
                .iter()
                .any(|i| i.outcome && i.settle.target.keys.breaker == *b && must_ride(&i.settle))
        });
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
                let timed = !st.flushes.is_empty()
                    || st.closed
                    || st.urgent
                    || oldest.is_some_and(|t| t <= now);
                // Grown to SMALL: the outcomes go now, the releases stay for this replica's
                // next admission on their feature (until their delay is up). A release the
                // flusher has in flight is one that admission would wait for.
                // An admission may have taken the outcome that set `ride_now` along.
                if st.ride_now && !st.items.iter().any(|i| i.outcome && must_ride(&i.settle)) {
                    st.ride_now = false;
                }
                let sized = !timed
                    && (st.ride_now
                        || (st.items.len() >= max.min(SMALL)
                            && st.items.iter().any(|i| i.outcome)));
                let due = timed || sized;
                let reports = !st.dropped.is_empty() || !st.released.is_empty();
                if (due && !st.items.is_empty()) || reports || !st.flushes.is_empty() {
                    // Reports alone (a release rode with an admission) send no settles:
                    // what waits in the queue keeps waiting for its delay.
                    let max = if due { max } else { 0 };
                    return Some(Self::take_batch(&mut st, max, timed));
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

    /// Takes the first `max` queued settles (`all`), or only the outcome pieces of the
    /// first `max` that have one (their releases stay queued).
    fn take_batch(st: &mut State, max: usize, all: bool) -> FlushBatch {
        let settles: Vec<Settle> = if all {
            let n = st.items.len().min(max);
            st.urgent = st.items.iter().skip(n).any(|i| i.urgent);
            st.items.drain(..n).map(|i| i.remaining()).collect()
        } else {
            let mut taken = Vec::new();
            st.items.retain_mut(|item| {
                if taken.len() >= max || !item.outcome {
                    return true;
                }
                let mut s = item.remaining();
                s.permit = false;
                s.refund_rate = false;
                taken.push(s);
                item.outcome = false;
                item.release
            });
            taken
        };
        st.ride_now = st.items.iter().any(|i| i.outcome && must_ride(&i.settle));
        let mut keys = Vec::new();
        let mut plain_keys = Vec::new();
        for s in &settles {
            if has_outcome(s) {
                let k = s.target.keys.breaker.clone();
                if must_ride(s) {
                    keys.push(k);
                } else {
                    plain_keys.push(k);
                }
            }
            if has_release(s) {
                keys.push(s.feature.keys.permits.clone());
            }
        }
        keys.sort_unstable();
        keys.dedup();
        // A target with an outcome that must ride is waited for as a whole.
        plain_keys.sort_unstable();
        plain_keys.dedup();
        plain_keys.retain(|k| keys.binary_search(k).is_err());
        for k in &keys {
            *st.in_flight.entry(k.clone()).or_insert(0) += 1;
        }
        for k in &plain_keys {
            *st.in_flight_plain.entry(k.clone()).or_insert(0) += 1;
        }
        let acks = if st.items.is_empty() {
            std::mem::take(&mut st.flushes)
        } else {
            Vec::new()
        };
        FlushBatch {
            settles,
            keys,
            plain_keys,
            acks,
            dropped: std::mem::take(&mut st.dropped),
            released: std::mem::take(&mut st.released),
        }
    }

    /// The flusher is done with `batch` (delivered or not): its keys are no longer in flight
    /// and its flush requests are answered.
    pub(crate) fn finish(&self, batch: FlushBatch) {
        {
            let mut guard = self.lock();
            let st = &mut *guard;
            for (keys, map) in [
                (&batch.keys, &mut st.in_flight),
                (&batch.plain_keys, &mut st.in_flight_plain),
            ] {
                for k in keys {
                    if let Some(n) = map.get_mut(k) {
                        *n -= 1;
                        if *n == 0 {
                            map.remove(k);
                        }
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

    #[test]
    fn successes_wait_for_the_flusher_until_a_failure_takes_them_along() {
        let q = SettleQueue::new(16);
        let a = settle("t", "f", "a", CallOutcome::Success);
        let (t, f) = keys(&a);
        q.push(a, false).expect("room");
        q.push(settle("t", "f", "b", CallOutcome::Success), false)
            .expect("room");
        // Only the releases ride: the successes cannot change a decision.
        let taken = q.take_for(Some(&t), Some(&f), 100);
        let got: Vec<_> = taken
            .iter()
            .map(|s| (s.call_id.as_str(), s.outcome, s.permit))
            .collect();
        assert_eq!(
            got,
            [
                ("a", CallOutcome::Ignored, true),
                ("b", CallOutcome::Ignored, true)
            ]
        );
        // A failure arrives: it rides, with both successes ahead of it, in order.
        q.push(settle("t", "f", "c", CallOutcome::Failure), false)
            .expect("room");
        let taken = q.take_for(Some(&t), Some(&f), 100);
        let got: Vec<_> = taken
            .iter()
            .map(|s| (s.call_id.as_str(), s.outcome))
            .collect();
        assert_eq!(
            got,
            [
                ("a", CallOutcome::Success),
                ("b", CallOutcome::Success),
                ("c", CallOutcome::Failure)
            ]
        );
        assert!(q.lock().items.is_empty());

        // A probe's success rides, and so does a success slow under the slow-call rule.
        let mut probe = settle("t", "f", "p", CallOutcome::Success);
        probe.probe = true;
        assert!(must_ride(&probe));
        let mut slow = settle("t", "f", "s", CallOutcome::Success);
        let mut spec = (*slow.target).clone();
        spec.params.slow_call_ms = 100;
        spec.params.slow_call_rate_pct = 50.0;
        slow.target = Arc::new(spec);
        slow.elapsed_ms = 99;
        assert!(!must_ride(&slow));
        slow.elapsed_ms = 100;
        assert!(must_ride(&slow));
        let mut ignored_probe = settle("t", "f", "i", CallOutcome::Ignored);
        ignored_probe.probe = true;
        assert!(must_ride(&ignored_probe));
    }

    /// A failure (or a probe's outcome) goes to the flusher at once, not after the settle
    /// delay: other replicas must see it before they admit calls it would refuse. A plain
    /// success waits for the delay. On paused time: the clock moves only when the flusher
    /// waits.
    #[tokio::test(start_paused = true)]
    async fn an_outcome_that_can_change_a_decision_is_sent_at_once() {
        let delay = Duration::from_millis(100);
        let q = SettleQueue::new(16);
        q.push(settle("t", "f", "ok", CallOutcome::Success), false)
            .expect("room");
        let t0 = tokio::time::Instant::now();
        let batch = q.next_batch(256, delay).await.expect("a batch");
        assert_eq!(batch.settles.len(), 1);
        assert_eq!(t0.elapsed(), delay, "a plain success waits for the delay");

        for (id, outcome, probe) in [
            ("failure", CallOutcome::Failure, false),
            ("probe", CallOutcome::Success, true),
            ("ignored-probe", CallOutcome::Ignored, true),
        ] {
            let mut s = settle("t", "f", id, outcome);
            s.probe = probe;
            s.permit = true;
            let (t, f) = keys(&s);
            q.push(s, false).expect("room");
            let t0 = tokio::time::Instant::now();
            let batch = q.next_batch(256, delay).await.expect("a batch");
            assert_eq!(t0.elapsed(), Duration::ZERO, "{id} waited for the delay");
            assert_eq!(batch.settles.len(), 1, "{id}");
            assert_eq!(batch.settles[0].outcome, outcome, "{id}");
            assert!(!batch.settles[0].permit, "{id}: the release went with it");
            q.finish(batch);
            // The release stays for this replica's next admission on the feature.
            let taken = q.take_for(Some(&t), Some(&f), 100);
            assert_eq!(taken.len(), 1, "{id}");
            assert!(taken[0].permit, "{id}");
            assert_eq!(taken[0].outcome, CallOutcome::Ignored, "{id}");
            assert!(!taken[0].probe, "{id}");
        }
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
        // Its release is in flight until finished: an admission on its feature waits.
        let (t, f) = keys(&batch.settles[0]);
        let waiter = {
            let q = Arc::clone(&q);
            tokio::spawn(async move {
                q.take_landed(&[(Some(&t), Some(&f))], 100, Duration::from_secs(10))
                    .await;
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

    #[tokio::test(start_paused = true)]
    async fn plain_successes_in_flight_hold_back_only_an_admission_that_takes_outcomes() {
        let q = Arc::new(SettleQueue::new(16));
        // Two plain successes whose releases rode already: the flusher sends the outcomes.
        let mut a = settle("t", "f", "a", CallOutcome::Success);
        a.permit = false;
        let mut b = settle("t", "f", "b", CallOutcome::Success);
        b.permit = false;
        let (t, f) = keys(&a);
        q.push(a, false).expect("room");
        q.push(b, false).expect("room");
        let batch = q.next_batch(100, Duration::ZERO).await.expect("a batch");
        assert_eq!(batch.settles.len(), 2);

        // An admission on the target that takes no outcomes does not wait for them: they
        // cannot change its decision.
        let started = Instant::now();
        let taken = q
            .take_landed(&[(Some(&t), Some(&f))], 100, Duration::from_secs(10))
            .await;
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert!(taken.iter().all(Vec::is_empty));

        // A failure queued behind them must land after them: that admission waits.
        q.push(settle("t", "f", "c", CallOutcome::Failure), false)
            .expect("room");
        let waiter = {
            let q = Arc::clone(&q);
            let (t, f) = (t.clone(), f.clone());
            tokio::spawn(async move {
                let taken = q
                    .take_landed(&[(Some(&t), Some(&f))], 100, Duration::from_secs(10))
                    .await;
                (Instant::now(), taken)
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let finished = Instant::now();
        q.finish(batch);
        let (at, taken) = waiter.await.expect("task");
        assert!(at >= finished);
        let got: Vec<_> = taken
            .iter()
            .flatten()
            .map(|s| (s.call_id.as_str(), s.outcome))
            .collect();
        assert_eq!(got, [("c", CallOutcome::Failure)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_grown_queue_sends_its_outcomes_and_leaves_the_releases_to_admissions() {
        let q = SettleQueue::new(64);
        for i in 0..SMALL {
            q.push(
                settle("t", "f", &format!("c{i}"), CallOutcome::Success),
                false,
            )
            .expect("room");
        }
        let (_, f) = keys(&settle("t", "f", "x", CallOutcome::Success));
        // SMALL queued: the flusher goes at once, with the outcomes only.
        let started = Instant::now();
        let batch = q
            .next_batch(100, Duration::from_secs(3600))
            .await
            .expect("a batch");
        assert_eq!(started.elapsed(), Duration::ZERO);
        assert_eq!(batch.settles.len(), SMALL);
        assert!(batch
            .settles
            .iter()
            .all(|s| s.outcome == CallOutcome::Success && !s.permit));
        q.finish(batch);
        // The releases wait for this replica's next admission on the feature.
        let taken = q.take_for(None, Some(&f), 100);
        assert_eq!(taken.len(), SMALL);
        assert!(taken.iter().all(|s| s.permit));
    }
}
