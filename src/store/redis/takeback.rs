//! Take-backs that survive a stall: freeing a probe slot and releasing a permit are safe to
//! repeat, so a take-back that fails (Redis stalled, restarted, unreachable) is retried with
//! backoff until it is delivered or its lease has passed (after which the slot or permit has
//! expired by itself and retrying is pointless).
//!
//! Take-backs wait in one bounded queue ([`MAX_PENDING`]; over it the oldest is dropped with
//! a `takeback_dropped` warning: its permit then ends with its lease). One task delivers them
//! while any are queued and ends when the queue is empty, so there is never more than one
//! task however many take-backs fail. Each round sends the due take-backs grouped: one
//! `release.lua` call per feature (many permit ids) and one `settle.lua` call per target
//! (many probe slots), concurrently, each bounded by the store's timeout.
//!
//! A rate-slot refund is NOT safe to repeat: it is sent with the first attempt only; if that
//! attempt fails (it may have run), the refund is given up (logged), never sent twice.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures_util::future::join_all;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::scripts::{self, Outcome};
use super::Core;
use crate::breaker::CallOutcome;
use crate::store::{FeatureSpec, TargetSpec};

/// Most take-backs queued; over it the oldest is dropped (its permit ends with its lease).
pub(super) const MAX_PENDING: usize = 16_384;
/// First retry delay; it doubles per failed attempt, up to [`MAX_BACKOFF`] (plus jitter).
const MIN_BACKOFF: Duration = Duration::from_millis(25);
/// Longest retry delay.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What one take-back gives back.
#[derive(Debug, Clone)]
pub(super) enum Work {
    /// Free the call's probe slot (an Ignored outcome: counts toward nothing).
    FreeProbe(Arc<TargetSpec>),
    /// Release the call's permit and/or refund one rate slot.
    Release {
        feature: Arc<FeatureSpec>,
        permit: bool,
        refund: bool,
    },
}

/// One queued take-back.
#[derive(Debug)]
struct TakeBack {
    work: Work,
    call_id: String,
    /// Give up after this (the slot or permit has expired by itself).
    until: Instant,
    /// Not before this.
    next: Instant,
    /// Failed attempts so far.
    tries: u32,
}

#[derive(Default)]
struct State {
    queue: VecDeque<TakeBack>,
    /// Whether the delivery task runs.
    running: bool,
    /// Dropped over [`MAX_PENDING`] since the store was built.
    dropped: u64,
}

/// The queue of take-backs and the wake-up of its task.
#[derive(Default)]
pub(super) struct TakeBacks {
    state: Mutex<State>,
    wake: Notify,
}

impl TakeBacks {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl TakeBacks {
    /// Makes every queued take-back due now (Redis answers again: no need to wait out the
    /// backoff).
    pub(super) fn retry_now(&self) {
        let now = Instant::now();
        let mut st = self.lock();
        if st.queue.is_empty() {
            return;
        }
        for tb in &mut st.queue {
            tb.next = tb.next.min(now);
        }
        drop(st);
        self.wake.notify_one();
    }
}

impl Core {
    /// Queues a take-back for `call_id`, to be sent at once and retried until delivered or
    /// `lease` has passed.
    pub(super) fn take_back(self: &Arc<Self>, work: Work, call_id: &str, lease: Duration) {
        let now = Instant::now();
        let item = TakeBack {
            work,
            call_id: call_id.to_owned(),
            until: now + lease,
            next: now,
            tries: 0,
        };
        let start = {
            let mut st = self.takebacks.lock();
            if st.queue.len() >= MAX_PENDING {
                if let Some(old) = st.queue.pop_front() {
                    st.dropped += 1;
                    tracing::warn!(
                        target: "fusebox",
                        event = "takeback_dropped",
                        call_id = %old.call_id,
                        count = st.dropped,
                        "fusebox: too many take-backs pending ({MAX_PENDING}); the oldest is \
                         dropped and ends with its lease"
                    );
                }
            }
            st.queue.push_back(item);
            !std::mem::replace(&mut st.running, true)
        };
        if start {
            self.runtime.spawn(deliver_all(Arc::clone(self)));
        } else {
            self.takebacks.wake.notify_one();
        }
    }
}

/// The delivery task: runs while take-backs are queued.
async fn deliver_all(core: Arc<Core>) {
    loop {
        let now = Instant::now();
        let (due, next) = {
            let mut st = core.takebacks.lock();
            let mut due = Vec::new();
            let mut rest = VecDeque::with_capacity(st.queue.len());
            for tb in st.queue.drain(..) {
                if tb.tries > 0 && tb.until <= now {
                    tracing::debug!(
                        call_id = %tb.call_id,
                        tries = tb.tries,
                        "fusebox: take-back not delivered before its lease ended"
                    );
                } else if tb.next <= now {
                    due.push(tb);
                } else {
                    rest.push_back(tb);
                }
            }
            let next = rest.iter().map(|tb| tb.next).min();
            st.queue = rest;
            if due.is_empty() && next.is_none() {
                st.running = false;
                return;
            }
            (due, next)
        };
        if due.is_empty() {
            if let Some(next) = next {
                tokio::select! {
                    () = tokio::time::sleep_until(next) => {}
                    () = core.takebacks.wake.notified() => {}
                }
            }
            continue;
        }
        let failed = deliver(&core, due).await;
        if !failed.is_empty() {
            let now = Instant::now();
            let mut st = core.takebacks.lock();
            for mut tb in failed {
                tb.tries = tb.tries.saturating_add(1);
                tb.next = now + backoff(tb.tries);
                if let Work::Release { refund, .. } = &mut tb.work {
                    if std::mem::take(refund) {
                        tracing::debug!(
                            call_id = %tb.call_id,
                            "fusebox: a rate refund failed and may have run: not repeated"
                        );
                    }
                }
                if matches!(tb.work, Work::Release { permit: false, .. }) {
                    continue; // nothing left that is safe to repeat
                }
                st.queue.push_back(tb);
            }
        }
    }
}

/// `MIN_BACKOFF * 2^(tries-1)`, at most [`MAX_BACKOFF`], times a jitter of 0.5..1.5.
fn backoff(tries: u32) -> Duration {
    let base = MIN_BACKOFF
        .saturating_mul(1u32 << tries.saturating_sub(1).min(16))
        .min(MAX_BACKOFF);
    base.mul_f64(rand::random_range(0.5..1.5))
}

/// Sends one round of take-backs, grouped per feature and per target; returns those not
/// delivered for a reason that may pass (Redis unavailable). A take-back that Redis refused
/// to run (a key of the wrong type, say) is logged and dropped.
async fn deliver(core: &Arc<Core>, due: Vec<TakeBack>) -> Vec<TakeBack> {
    let mut releases: HashMap<&str, Vec<usize>> = HashMap::new();
    let mut probes: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, tb) in due.iter().enumerate() {
        match &tb.work {
            Work::Release { feature, .. } => releases
                .entry(feature.keys.permits.as_str())
                .or_default()
                .push(i),
            Work::FreeProbe(target) => probes
                .entry(target.keys.breaker.as_str())
                .or_default()
                .push(i),
        }
    }
    let chunk = core.settle_batch.max(1);
    let mut calls = Vec::new();
    for members in releases.values() {
        for part in members.chunks(chunk) {
            let Some(Work::Release { feature, .. }) = part.first().map(|&i| &due[i].work) else {
                continue;
            };
            let mut ids = Vec::new();
            let mut refunds = 0;
            for &i in part {
                if let Work::Release { permit, refund, .. } = &due[i].work {
                    if *permit && feature.bulkhead.is_some() {
                        ids.push(due[i].call_id.as_str());
                    }
                    refunds += usize::from(*refund);
                }
            }
            let emission_us = feature.rate.map_or(0, |r| r.emission_us);
            if emission_us == 0 {
                refunds = 0;
            }
            let inv = scripts::release(&feature.keys, emission_us, refunds, &ids);
            calls.push((part.to_vec(), inv, feature.name.clone()));
        }
    }
    for members in probes.values() {
        for part in members.chunks(chunk) {
            let Some(Work::FreeProbe(target)) = part.first().map(|&i| &due[i].work) else {
                continue;
            };
            let outcomes: Vec<Outcome> = part
                .iter()
                .map(|&i| Outcome {
                    generation: 0,
                    code: CallOutcome::Ignored.code(),
                    elapsed_ms: 0,
                    probe_id: due[i].call_id.clone(),
                    count: 1,
                })
                .collect();
            let inv = scripts::settle(&target.keys, &target.params, &outcomes);
            calls.push((part.to_vec(), inv, target.name.clone()));
        }
    }
    let results = join_all(calls.iter().map(|(_, inv, _)| core.call(inv))).await;
    let mut retry = vec![false; due.len()];
    for ((members, _, name), r) in calls.iter().zip(results) {
        match r {
            Ok(_) => {}
            Err(e) if e.is_unavailable() => {
                tracing::debug!(error = %e, name = %name, "fusebox: take-back failed; will retry");
                for &i in members {
                    if let Some(flag) = retry.get_mut(i) {
                        *flag = true;
                    }
                }
            }
            Err(e) => tracing::warn!(
                error = %e,
                name = %name,
                "fusebox: take-back refused by Redis; the lease will expire"
            ),
        }
    }
    due.into_iter()
        .zip(retry)
        .filter_map(|(tb, again)| again.then_some(tb))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_bounded() {
        for tries in 1..40 {
            let d = backoff(tries);
            assert!(d >= MIN_BACKOFF / 2, "{tries}: {d:?}");
            assert!(d <= MAX_BACKOFF.mul_f64(1.5), "{tries}: {d:?}");
        }
        assert!(backoff(20) > backoff(1));
    }
}
