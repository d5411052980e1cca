//! The admission batcher: one background task per store that turns concurrent admissions
//! into few script calls.
//!
//! [`Store::admit`](crate::store::Store::admit) queues a [`Job`] (the request and a oneshot
//! for the answer) and waits, at most the store's timeout, for the answer. The task drains
//! whatever is queued (natural batching: one job when idle, up to [`BATCH_MAX`] under load),
//! groups the jobs by what one `admit.lua` call can decide together, sends one script call per
//! group, all groups concurrently on the multiplexed connection, and answers each caller.
//! `admit.lua` decides the k calls of a group exactly as k admissions one after the other at
//! the same instant, so batching changes no decision.
//!
//! * One call (single node): a group is one (target, feature) pair, in `both` mode.
//! * Split (Cluster, or forced): the breaker part is grouped per target and the feature part
//!   per feature; each call's two parts are combined, and compensated, as an unbatched split
//!   admission would be ([`Core::combine_split`]).
//!
//! A caller that stopped waiting (timed out, or its future was dropped) is never left holding
//! anything: a job whose caller is gone before the script call is dropped unsent; a job
//! whose answer cannot be delivered is compensated here (its probe slot freed, its permit
//! released and its rate slot refunded: the call never ran). A script call that failed after
//! it may have run is compensated as the unbatched path does.
//!
//! The task holds no reference to the store's sender: it ends when every clone of the store
//! is dropped (the queue closes), after answering what was queued.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};

use super::scripts::AdmitMode;
use super::{log_lost_transition, Core, Part};
use crate::breaker::Transition;
use crate::store::{Admission, Admitted, FeatureSpec, TargetSpec};
use crate::StoreError;

/// Most admissions one drain of the queue takes (and so one script call decides).
pub(super) const BATCH_MAX: usize = 256;
/// Admissions queued for the task; when full, a caller makes its own script call.
pub(super) const QUEUE: usize = 4096;

/// What a caller gets back.
pub(super) type Answer = Result<Admission, StoreError>;

/// One queued admission.
pub(super) struct Job {
    /// Split admission (Cluster, or forced on a single node).
    pub(super) split: bool,
    pub(super) target: TargetSpec,
    pub(super) feature: FeatureSpec,
    pub(super) call_id: String,
    pub(super) reply: oneshot::Sender<Answer>,
}

/// The decision of one part (or the whole) of one call: what it got, and the transition its
/// script call made if this call is the one that made it.
type PartResult = Result<(Part, Option<Transition>), StoreError>;

/// The calls of one script call: job indices, in queue order.
struct Group {
    mode: AdmitMode,
    members: Vec<usize>,
}

/// Runs until every sender is gone.
pub(super) async fn run(core: Arc<Core>, mut rx: mpsc::Receiver<Job>) {
    let mut jobs = Vec::with_capacity(BATCH_MAX);
    while rx.recv_many(&mut jobs, BATCH_MAX).await > 0 {
        // A caller that already gave up needs no admission (and must not get one).
        jobs.retain(|j| !j.reply.is_closed());
        if !jobs.is_empty() {
            admit_batch(&core, std::mem::take(&mut jobs)).await;
        }
    }
}

/// Groups, runs and answers one drained batch.
async fn admit_batch(core: &Arc<Core>, jobs: Vec<Job>) {
    let groups = group(&jobs);
    let results = join_all(groups.iter().map(|g| run_group(core, &jobs, g))).await;

    // Each call's whole answer, or its breaker / feature part (split).
    let mut whole: Vec<Option<PartResult>> = Vec::new();
    let mut breaker: Vec<Option<PartResult>> = Vec::new();
    let mut feature: Vec<Option<PartResult>> = Vec::new();
    for v in [&mut whole, &mut breaker, &mut feature] {
        v.resize_with(jobs.len(), || None);
    }
    for (g, result) in groups.iter().zip(results) {
        let slots = match g.mode {
            AdmitMode::Both => &mut whole,
            AdmitMode::Breaker => &mut breaker,
            AdmitMode::Feature => &mut feature,
        };
        match result {
            Ok((parts, transition)) => {
                let mut transition = transition;
                for (&i, part) in g.members.iter().zip(parts) {
                    if let Some(slot) = slots.get_mut(i) {
                        // The transition was made by the first call of the group.
                        *slot = Some(Ok((part, transition.take())));
                    }
                }
            }
            Err(e) => {
                for &i in &g.members {
                    if let Some(slot) = slots.get_mut(i) {
                        *slot = Some(Err(e.clone()));
                    }
                }
            }
        }
    }

    let parts = whole.into_iter().zip(breaker).zip(feature);
    for (job, ((w, b), f)) in jobs.into_iter().zip(parts) {
        let answer = if job.split {
            match (b, f) {
                (Some(b), Some(f)) => {
                    core.combine_split(&job.target, &job.feature, &job.call_id, b, f)
                }
                _ => Err(missing()),
            }
        } else {
            match w {
                Some(r) => core.combine_whole(&job.target, &job.feature, &job.call_id, r),
                None => Err(missing()),
            }
        };
        if let Err(answer) = job.reply.send(answer) {
            abandoned(core, &job.target, &job.feature, &job.call_id, answer);
        }
    }
}

/// A reply that did not cover every call of its group (cannot happen with a well-formed
/// reply, which `parse_admit` checks; here so that a bug answers instead of hanging).
fn missing() -> StoreError {
    StoreError::Reply("admit.lua: no decision for a call of the batch".to_owned())
}

/// One script call for one group: its decisions in member order, and its transition.
async fn run_group(
    core: &Core,
    jobs: &[Job],
    g: &Group,
) -> Result<(Vec<Part>, Option<Transition>), StoreError> {
    let Some(rep) = g.members.first().and_then(|&i| jobs.get(i)) else {
        return Ok((Vec::new(), None));
    };
    let ids = g
        .members
        .iter()
        .filter_map(|&i| jobs.get(i))
        .map(|j| j.call_id.as_str());
    core.admit_calls(g.mode, &rep.target, &rep.feature, ids, g.members.len())
        .await
}

/// Jobs that one `admit.lua` call can decide together: same mode and same specs (the keys
/// and the parameters the script reads), in queue order. Jobs with the same keys but other
/// parameters (a reconfigured target, say) get a group of their own.
fn group(jobs: &[Job]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    let mut at: HashMap<(AdmitMode, &str, &str), Vec<usize>> = HashMap::new();
    let parts = jobs.iter().enumerate().flat_map(|(i, job)| {
        let modes: &[AdmitMode] = if job.split {
            &[AdmitMode::Breaker, AdmitMode::Feature]
        } else {
            &[AdmitMode::Both]
        };
        modes.iter().map(move |&mode| (mode, i, job))
    });
    for (mode, i, job) in parts {
        let (t, f) = (&job.target, &job.feature);
        let key = match mode {
            AdmitMode::Both => (mode, t.keys.breaker.as_str(), f.keys.permits.as_str()),
            AdmitMode::Breaker => (mode, t.keys.breaker.as_str(), ""),
            AdmitMode::Feature => (mode, "", f.keys.permits.as_str()),
        };
        let candidates = at.entry(key).or_default();
        let same = |g: &Group| {
            g.members.first().and_then(|&r| jobs.get(r)).is_some_and(|rep| {
                (mode == AdmitMode::Feature || rep.target == *t)
                    && (mode == AdmitMode::Breaker || rep.feature == *f)
            })
        };
        let found = candidates
            .iter()
            .copied()
            .find(|&gi| groups.get(gi).is_some_and(same));
        match found.and_then(|gi| groups.get_mut(gi)) {
            Some(g) => g.members.push(i),
            None => {
                candidates.push(groups.len());
                groups.push(Group {
                    mode,
                    members: vec![i],
                });
            }
        }
    }
    groups
}

/// Gives back what a call whose caller stopped waiting was granted: it never ran.
fn abandoned(
    core: &Arc<Core>,
    target: &TargetSpec,
    feature: &FeatureSpec,
    call_id: &str,
    answer: Answer,
) {
    match answer {
        Ok(Admission::Admitted(Admitted {
            probe,
            permit,
            transition,
            ..
        })) => {
            if probe {
                core.spawn_free_probe(target, call_id);
            }
            core.spawn_release(feature, call_id, permit, true);
            if let Some(t) = transition {
                log_lost_transition(&t);
            }
        }
        Ok(Admission::Rejected {
            transition: Some(t),
            ..
        }) => log_lost_transition(&t),
        // Nothing taken; an error was compensated where it was made.
        Ok(Admission::Rejected { .. }) | Err(_) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::BreakerParams;
    use crate::keys::{feature_keys, target_keys};
    use crate::BreakerConfig;

    fn job(target: &str, feature: &str, split: bool, open_ms: u64) -> Job {
        let mut params = BreakerParams::from_config(&BreakerConfig::default(), 1000);
        params.open_ms = open_ms;
        Job {
            split,
            target: TargetSpec {
                name: target.to_owned(),
                keys: target_keys("ns", target),
                params,
            },
            feature: FeatureSpec {
                name: feature.to_owned(),
                keys: feature_keys("ns", feature),
                bulkhead: None,
                rate: None,
            },
            call_id: format!("{target}-{feature}"),
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn groups_by_mode_keys_and_parameters_in_queue_order() {
        let jobs = vec![
            job("a", "x", false, 10),
            job("b", "x", false, 10),
            job("a", "x", false, 10),
            job("a", "y", false, 10),
            job("a", "x", false, 99), // same keys, other parameters
            job("a", "x", true, 10),
            job("a", "y", true, 10),
        ];
        let groups: Vec<(AdmitMode, Vec<usize>)> = group(&jobs)
            .into_iter()
            .map(|g| (g.mode, g.members))
            .collect();
        assert_eq!(
            groups,
            vec![
                (AdmitMode::Both, vec![0, 2]),
                (AdmitMode::Both, vec![1]),
                (AdmitMode::Both, vec![3]),
                (AdmitMode::Both, vec![4]),
                (AdmitMode::Breaker, vec![5, 6]),
                (AdmitMode::Feature, vec![5]),
                (AdmitMode::Feature, vec![6]),
            ]
        );
    }
}
