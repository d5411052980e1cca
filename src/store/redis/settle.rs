//! Settling: a batch of outcomes and releases grouped by target and by feature (identical
//! consecutive outcomes merged into one entry with a count), and sent as concurrent script
//! calls (on a single node a feature's first release rides with a target's settle call).

use std::collections::HashMap;
use std::time::Duration;

use futures_util::future::{join, join_all};

use super::reply;
use super::scripts::{self, Outcome, Release};
use super::takeback::Work;
use super::RedisStore;
use crate::breaker::{CallOutcome, Transition};
use crate::store::{FeatureSpec, Settle, TargetSpec};
use crate::StoreError;

impl RedisStore {
    /// One target's settle calls (chunks of `settle_batch`, in order, one after the other,
    /// each bounded by the timeout), the first carrying `ride` (a feature's first release)
    /// if any.
    async fn settle_target(
        &self,
        target: &TargetSpec,
        outcomes: &[Outcome],
        mut ride: Option<Release<'_, &str>>,
    ) -> TargetResult {
        let mut out = TargetResult {
            transitions: Vec::new(),
            entries_done: 0,
            error: None,
            ride: None,
        };
        for chunk in outcomes.chunks(self.core.settle_batch.max(1)) {
            let riding = ride.take();
            let carried = riding.is_some();
            let inv = match riding {
                Some(r) => scripts::settle_and_release(&target.keys, &target.params, chunk, r),
                None => scripts::settle(&target.keys, &target.params, chunk),
            };
            let r = match self.core.call(&inv).await {
                Ok(v) => {
                    let (v, e) = reply::split_release_error(v);
                    if carried {
                        out.ride = Some(e.map_or(Ok(()), Err));
                    }
                    reply::transitions(v, &target.name, "settle.lua")
                }
                Err(e) => {
                    if carried {
                        out.ride = Some(Err(e.clone()));
                    }
                    Err(e)
                }
            };
            match r {
                Ok(trs) => {
                    out.transitions.extend(trs);
                    out.entries_done += chunk.len();
                }
                Err(e) => {
                    out.error = Some(e);
                    return out;
                }
            }
        }
        out
    }

    /// Runs every script call of one settle batch concurrently, each bounded by the timeout
    /// on its own (so a slow call does not lose what the others did), and counts the items
    /// that were not delivered.
    ///
    /// On a single node, the first release call of the i-th feature rides along with the
    /// first settle call of the i-th target (one script call: `settle.lua` with a release),
    /// so that a batch of one target and one feature takes one round trip. A release part
    /// that fails does not stop its outcomes from being recorded (as with separate calls).
    pub(super) async fn settle_all(&self, items: &[Settle]) -> SettleResult {
        let batch = self.core.settle_batch.max(1);
        let (targets, features, places) = group_placed(items);

        // Each feature's release calls (id chunks; the first carries the refunds).
        let mut riding: Vec<Option<Release<'_, &str>>> = vec![None; targets.len()];
        let mut alone: Vec<(usize, usize, Release<'_, &str>)> = Vec::new();
        for (i, g) in features.iter().enumerate() {
            let emission_us = g.feature.rate.map_or(0, |r| r.emission_us);
            let mut calls = g.ids.chunks(batch).enumerate().map(|(c, ids)| Release {
                keys: &g.feature.keys,
                emission_us,
                refunds: if c == 0 { g.refunds } else { 0 },
                permit_ids: ids,
            });
            let first = calls.next().unwrap_or(Release {
                keys: &g.feature.keys,
                emission_us,
                refunds: g.refunds,
                permit_ids: &[],
            });
            match riding.get_mut(i).filter(|_| !self.is_cluster()) {
                Some(slot) => *slot = Some(first),
                None => alone.push((i, 0, first)),
            }
            alone.extend(calls.enumerate().map(|(c, r)| (i, c + 1, r)));
        }

        let target_calls = targets
            .iter()
            .zip(riding)
            .map(|((target, outcomes), ride)| self.settle_target(target, outcomes, ride));
        let feature_calls = alone.iter().map(|(_, _, r)| {
            let inv = scripts::release(r.keys, r.emission_us, r.refunds, r.permit_ids);
            async move {
                match self.core.call(&inv).await {
                    Ok(v) => reply::int(&v, "release.lua").map(drop),
                    Err(e) => Err(e),
                }
            }
        });
        let (target_results, feature_results) =
            join(join_all(target_calls), join_all(feature_calls)).await;

        let mut result = SettleResult {
            transitions: Vec::new(),
            outcome_error: None,
            release_error: None,
            dropped: 0,
        };
        // How each release chunk of each feature went.
        let mut released: Vec<Vec<Chunk>> = features
            .iter()
            .map(|g| vec![Chunk::Failed; g.ids.len().div_ceil(batch).max(1)])
            .collect();
        let mut mark = |f: usize, c: usize, r: &Result<(), StoreError>| {
            if let Some(chunk) = released.get_mut(f).and_then(|cs| cs.get_mut(c)) {
                *chunk = match r {
                    Ok(()) => Chunk::Done,
                    Err(e) if e.is_unavailable() => Chunk::Unreachable,
                    Err(_) => Chunk::Failed,
                };
            }
        };
        // Per target: entries recorded, and whether its failure was Redis out of reach.
        let mut entries_done = Vec::with_capacity(target_results.len());
        let mut target_unreachable = Vec::with_capacity(target_results.len());
        for (i, r) in target_results.into_iter().enumerate() {
            result.transitions.extend(r.transitions);
            entries_done.push(r.entries_done);
            target_unreachable.push(r.error.as_ref().is_some_and(StoreError::is_unavailable));
            result.outcome_error = result.outcome_error.take().or(r.error);
            if let Some(ride) = r.ride {
                mark(i, 0, &ride);
                if let Err(e) = ride {
                    result.release_error = result.release_error.take().or(Some(e));
                }
            }
        }
        for ((f, c, _), r) in alone.iter().zip(feature_results) {
            mark(*f, *c, &r);
            if let Err(e) = r {
                result.release_error = result.release_error.take().or(Some(e));
            }
        }
        let chunk = |f: usize, c: usize| {
            released
                .get(f)
                .and_then(|cs| cs.get(c))
                .copied()
                .unwrap_or(Chunk::Failed)
        };
        // A permit release or a probe slot that did not land because Redis could not be
        // reached is safe to repeat: it goes to the take-backs, retried until delivered or
        // its lease has passed, instead of holding the permit (or slot) for its whole lease.
        // (Seen by the adversarial review: a flush on a dropped connection left a bulkhead of
        // 1 full for its lease, 30 of 40 sequential requests refused.) Outcome counts and
        // rate refunds are not safe to repeat: they stay dropped, and reported.
        let mut dropped = 0;
        for (s, p) in items.iter().zip(&places) {
            let outcome_ok = p
                .outcome
                .is_none_or(|(t, entry)| entries_done.get(t).is_some_and(|done| entry < *done));
            let (mut permit_ok, mut refund_ok) = (true, true);
            let mut permit_unreachable = false;
            if let Some((f, id, refund)) = p.release {
                if let Some(id) = id {
                    let c = chunk(f, id / batch);
                    permit_ok = c == Chunk::Done;
                    permit_unreachable = c == Chunk::Unreachable;
                }
                refund_ok = !refund || chunk(f, 0) == Chunk::Done;
            }
            if !permit_ok && permit_unreachable {
                if let Some(b) = &s.feature.bulkhead {
                    let work = Work::Release {
                        feature: std::sync::Arc::clone(&s.feature),
                        permit: true,
                        refund: false,
                    };
                    self.core
                        .take_back(work, &s.call_id, Duration::from_millis(b.lease_ms));
                    permit_ok = true;
                }
            }
            let mut counted_ok = outcome_ok;
            let probe_unreachable = p
                .outcome
                .is_some_and(|(t, _)| target_unreachable.get(t).copied().unwrap_or(false));
            if !outcome_ok && s.probe && probe_unreachable {
                let timeout = Duration::from_millis(s.target.params.probe_timeout_ms);
                self.core.take_back(
                    Work::FreeProbe(std::sync::Arc::clone(&s.target)),
                    &s.call_id,
                    timeout,
                );
                // An ignored probe outcome only frees the slot: handed over, not lost. Any
                // other outcome is lost (its slot is still given back).
                counted_ok = s.outcome == CallOutcome::Ignored;
            }
            if !(counted_ok && permit_ok && refund_ok) {
                dropped += 1;
            }
        }
        result.dropped = dropped;
        result
    }
}

/// How one release call of a settle batch went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    Done,
    /// Not delivered: Redis could not be reached (it may still have run; a release is safe
    /// to repeat).
    Unreachable,
    /// Not delivered for another reason (retrying would fail the same way).
    Failed,
}

/// What one target's settle calls did.
struct TargetResult {
    /// Transitions of the calls that succeeded.
    transitions: Vec<Transition>,
    /// Entries recorded (the calls run in order and stop at the first failure).
    entries_done: usize,
    /// The failure that stopped them.
    error: Option<StoreError>,
    /// How the release riding with the first call went, if one did.
    ride: Option<Result<(), StoreError>>,
}

/// What one settle batch did.
pub(super) struct SettleResult {
    /// Transitions made by the outcome calls that succeeded, in order per target.
    pub(super) transitions: Vec<Transition>,
    /// The first failure of an outcome call.
    pub(super) outcome_error: Option<StoreError>,
    /// The first failure of a release.
    pub(super) release_error: Option<StoreError>,
    /// Items not delivered (or not certainly: a call that timed out may still apply).
    pub(super) dropped: usize,
}

/// What [`RedisStore::settle_report`] tells the flusher about one batch.
#[derive(Debug)]
pub(crate) struct SettleReport {
    /// Transitions made by the calls that completed (each exactly once).
    pub(crate) transitions: Vec<Transition>,
    /// Items not delivered.
    pub(crate) dropped: usize,
    /// The first failure, if any call failed.
    pub(crate) error: Option<StoreError>,
}

impl RedisStore {
    /// Settles `items` (as [`Store::settle`](crate::store::Store::settle)) and reports what
    /// completed: the transitions made by the calls that completed even when others failed,
    /// and how many items were not delivered.
    pub(crate) async fn settle_report(&self, items: &[Settle]) -> SettleReport {
        let r = self.settle_all(items).await;
        SettleReport {
            transitions: r.transitions,
            dropped: r.dropped,
            error: r.outcome_error.or(r.release_error),
        }
    }
}

/// Where one item of a settle batch went: its outcome (target group, entry) and its release
/// (feature group, position among the permit ids, whether it refunds a rate slot).
#[derive(Debug, Clone, Copy, Default)]
struct Place {
    outcome: Option<(usize, usize)>,
    release: Option<(usize, Option<usize>, bool)>,
}

/// One target's outcomes of a settle batch, in order.
pub(super) type TargetGroup<'a> = (&'a TargetSpec, Vec<Outcome>);

/// One feature's releases of a settle batch.
pub(super) struct FeatureGroup<'a> {
    pub(super) feature: &'a FeatureSpec,
    pub(super) ids: Vec<&'a str>,
    pub(super) refunds: usize,
}

pub(super) fn group(items: &[Settle]) -> (Vec<TargetGroup<'_>>, Vec<FeatureGroup<'_>>) {
    let (targets, features, _) = group_placed(items);
    (targets, features)
}

/// [`group`], and where each item went.
fn group_placed(items: &[Settle]) -> (Vec<TargetGroup<'_>>, Vec<FeatureGroup<'_>>, Vec<Place>) {
    let mut places = Vec::with_capacity(items.len());
    let mut targets: Vec<TargetGroup<'_>> = Vec::new();
    let mut target_at: HashMap<&str, usize> = HashMap::new();
    let mut features: Vec<FeatureGroup<'_>> = Vec::new();
    let mut feature_at: HashMap<&str, usize> = HashMap::new();
    // The groups of the previous item: consecutive items mostly share them.
    let (mut last_target, mut last_feature) = (usize::MAX, usize::MAX);
    for s in items {
        let mut place = Place::default();
        // An ignored outcome of a call without a probe slot changes nothing: not sent.
        if s.outcome != CallOutcome::Ignored || s.probe {
            let same = targets.get(last_target).is_some_and(|(t, _)| {
                std::ptr::eq(*t, &*s.target) || t.keys.breaker == s.target.keys.breaker
            });
            let i = if same {
                last_target
            } else {
                *target_at
                    .entry(s.target.keys.breaker.as_str())
                    .or_insert_with(|| {
                        targets.push((&s.target, Vec::new()));
                        targets.len() - 1
                    })
            };
            last_target = i;
            if let Some((target, outcomes)) = targets.get_mut(i) {
                push_outcome(outcomes, target, s);
                place.outcome = Some((i, outcomes.len().saturating_sub(1)));
            }
        }
        let refund = s.refund_rate && s.feature.rate.is_some();
        if s.permit || refund {
            let same = features.get(last_feature).is_some_and(|g| {
                std::ptr::eq(g.feature, &*s.feature)
                    || g.feature.keys.permits == s.feature.keys.permits
            });
            let i = if same {
                last_feature
            } else {
                *feature_at
                    .entry(s.feature.keys.permits.as_str())
                    .or_insert_with(|| {
                        features.push(FeatureGroup {
                            feature: &s.feature,
                            ids: Vec::new(),
                            refunds: 0,
                        });
                        features.len() - 1
                    })
            };
            last_feature = i;
            if let Some(g) = features.get_mut(i) {
                let mut at = None;
                if s.permit {
                    at = Some(g.ids.len());
                    g.ids.push(s.call_id.as_str());
                }
                g.refunds += usize::from(refund);
                place.release = Some((i, at, refund));
            }
        }
        places.push(place);
    }
    (targets, features, places)
}

/// Appends one settled call to its target's entries, merged into the last entry when it is
/// the same outcome again (same generation and code, both slow or both not, no probe slot):
/// `settle.lua` records an entry of `count` outcomes exactly as that many entries in a row.
fn push_outcome(outcomes: &mut Vec<Outcome>, target: &TargetSpec, s: &Settle) {
    let slow_ms = target.params.slow_call_ms;
    let slow = |elapsed_ms: u64| slow_ms > 0 && elapsed_ms >= slow_ms;
    let code = s.outcome.code();
    if !s.probe {
        if let Some(last) = outcomes.last_mut() {
            if last.probe_id.is_empty()
                && last.generation == s.generation
                && last.code == code
                && slow(last.elapsed_ms) == slow(s.elapsed_ms)
                && last.count < u32::MAX
            {
                last.count += 1;
                return;
            }
        }
    }
    outcomes.push(Outcome {
        generation: s.generation,
        code,
        elapsed_ms: s.elapsed_ms,
        probe_id: if s.probe {
            s.call_id.clone()
        } else {
            String::new()
        },
        count: 1,
    });
}
