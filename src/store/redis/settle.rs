//! Settling: a batch of outcomes and releases grouped by target and by feature (identical
//! consecutive outcomes merged into one entry with a count), and sent as concurrent script
//! calls (on a single node a feature's first release rides with a target's settle call).

use std::collections::HashMap;

use futures_util::future::{join, join_all};

use super::conn::map_err;
use super::reply;
use super::scripts::{self, Outcome, Release};
use super::RedisStore;
use crate::breaker::{CallOutcome, Transition};
use crate::store::{FeatureSpec, Settle, TargetSpec};
use crate::StoreError;

impl RedisStore {
    /// One target's settle calls (chunks of `settle_batch`, in order, one after the other),
    /// the first carrying `ride` (a feature's release) if any: the transitions of the calls
    /// that succeeded, the error that stopped them, the failure of the release.
    async fn settle_target(
        &self,
        target: &TargetSpec,
        outcomes: &[Outcome],
        mut ride: Option<Release<'_, &str>>,
    ) -> (Vec<Transition>, Option<StoreError>, Option<StoreError>) {
        let (conn, t) = (&self.core.conn, self.core.timeout);
        let mut out = Vec::new();
        let mut release_error = None;
        for chunk in outcomes.chunks(self.core.settle_batch) {
            let inv = match ride.take() {
                Some(r) => scripts::settle_and_release(&target.keys, &target.params, chunk, r),
                None => scripts::settle(&target.keys, &target.params, chunk),
            };
            let r = conn.invoke(&inv).await.map_err(|e| map_err(e, t));
            self.core.note(&r);
            let r = match r {
                Ok(v) => {
                    let (v, e) = reply::split_release_error(v);
                    release_error = release_error.or(e);
                    reply::transitions(v, &target.name, "settle.lua")
                }
                Err(e) => Err(e),
            };
            match r {
                Ok(trs) => out.extend(trs),
                Err(e) => return (out, Some(e), release_error),
            }
        }
        (out, None, release_error)
    }

    /// Runs every script call of one settle batch concurrently.
    ///
    /// On a single node, the first release call of the i-th feature rides along with the
    /// first settle call of the i-th target (one script call: `settle.lua` with a release),
    /// so that a batch of one target and one feature takes one round trip. A release part
    /// that fails does not stop its outcomes from being recorded (as with separate calls).
    pub(super) async fn settle_all(&self, items: &[Settle]) -> SettleResult {
        let batch = self.core.settle_batch;
        let (targets, features) = group(items);
        let conn = &self.core.conn;
        let t = self.core.timeout;

        // Each feature's release calls (id chunks; the first carries the refunds).
        let mut riding: Vec<Option<Release<'_, &str>>> = vec![None; targets.len()];
        let mut alone: Vec<Release<'_, &str>> = Vec::new();
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
                None => alone.push(first),
            }
            alone.extend(calls);
        }

        let target_calls = targets
            .iter()
            .zip(riding)
            .map(|((target, outcomes), ride)| self.settle_target(target, outcomes, ride));
        let feature_calls = alone.into_iter().map(|r| {
            let inv = scripts::release(r.keys, r.emission_us, r.refunds, r.permit_ids);
            async move {
                let r = conn.invoke(&inv).await.map_err(|e| map_err(e, t));
                self.core.note(&r);
                match r {
                    Ok(v) => reply::int(&v, "release.lua").err(),
                    Err(e) => Some(e),
                }
            }
        });
        let work = join(join_all(target_calls), join_all(feature_calls));
        let mut result = SettleResult {
            transitions: Vec::new(),
            outcome_error: None,
            release_error: None,
        };
        match tokio::time::timeout(t, work).await {
            Err(_) => result.outcome_error = Some(StoreError::Timeout(t)),
            Ok((target_results, feature_errors)) => {
                for (trs, outcome_error, release_error) in target_results {
                    result.transitions.extend(trs);
                    result.outcome_error = result.outcome_error.or(outcome_error);
                    result.release_error = result.release_error.or(release_error);
                }
                let more = feature_errors.into_iter().flatten().next();
                result.release_error = result.release_error.or(more);
            }
        }
        result
    }
}

/// What one settle batch did.
pub(super) struct SettleResult {
    /// Transitions made by the outcome calls that succeeded, in order per target.
    pub(super) transitions: Vec<Transition>,
    /// The first failure of an outcome call (or of the batch: a timeout).
    pub(super) outcome_error: Option<StoreError>,
    /// The first failure of a release.
    pub(super) release_error: Option<StoreError>,
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
    let mut targets: Vec<TargetGroup<'_>> = Vec::new();
    let mut target_at: HashMap<&str, usize> = HashMap::new();
    let mut features: Vec<FeatureGroup<'_>> = Vec::new();
    let mut feature_at: HashMap<&str, usize> = HashMap::new();
    // The groups of the previous item: consecutive items mostly share them.
    let (mut last_target, mut last_feature) = (usize::MAX, usize::MAX);
    for s in items {
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
                if s.permit {
                    g.ids.push(s.call_id.as_str());
                }
                g.refunds += usize::from(refund);
            }
        }
    }
    (targets, features)
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
