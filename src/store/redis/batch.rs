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
//! One batch is in flight at a time: the callers that arrive meanwhile queue up, which is
//! what makes the next batch (measured: two or three batches in flight made the batches
//! smaller and the whole slower). The queue is bounded ([`QUEUE`]); when it is full, or the
//! task is gone, a caller makes its own script call.
//!
//! On a single node, a caller that finds no other admission in progress (a lone, sequential
//! caller) skips the queue: it runs its batch of one from its own task ([`admit_alone`]),
//! holding the same "one in flight" lock as the batcher, which saves two task hops per call
//! (to the batcher and back; measured at concurrency 1 on a loaded 2-core machine, p50
//! 129.5 µs with the hops, 76.5 µs without, same run). If it stops waiting, the rest of its
//! call is finished by a task of its own. Split admissions (Cluster) always go through the
//! batcher: their second part must not wait for the caller to poll again.
//!
//! The task holds no reference to the store's sender: it ends when every clone of the store
//! is dropped (the queue closes), after answering what was queued.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use futures_util::future::join_all;
use tokio::sync::{mpsc, oneshot};

use super::admit::{Part, PartResult};
use super::ride::{self, Riding};
use super::scripts::AdmitMode;
use super::Core;
use crate::breaker::Transition;
use crate::store::{Admission, FeatureSpec, TargetSpec};
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
    pub(super) specs: Arc<Specs>,
    pub(super) call_id: String,
    pub(super) reply: oneshot::Sender<Answer>,
    /// When it was queued: a job that waited longer than the store's timeout before its
    /// script call could be sent is answered `Timeout`, unsent.
    pub(super) queued: tokio::time::Instant,
}

/// The target and feature an admission names (shared by the admissions that name the same).
#[derive(Debug, PartialEq)]
pub(super) struct Specs {
    pub(super) target: TargetSpec,
    pub(super) feature: FeatureSpec,
}

/// Most (target, feature) pairs [`SpecCache`] remembers before it starts over.
const SPEC_CACHE_MAX: usize = 1024;

/// Shared copies of the specs admissions name, so that a queued admission carries one `Arc`
/// instead of copies of six strings. Keyed by where the caller's specs live (a coordinator
/// keeps them in `Arc`s, so the same pair comes back at the same addresses) and checked for
/// equality, so a reused address never returns stale specs.
#[derive(Default)]
pub(super) struct SpecCache(Mutex<HashMap<(usize, usize), Arc<Specs>>>);

impl SpecCache {
    pub(super) fn get(&self, target: &TargetSpec, feature: &FeatureSpec) -> Arc<Specs> {
        let key = (
            std::ptr::from_ref(target) as usize,
            std::ptr::from_ref(feature) as usize,
        );
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = map.get(&key) {
            if s.target == *target && s.feature == *feature {
                return Arc::clone(s);
            }
        }
        if map.len() >= SPEC_CACHE_MAX {
            map.clear();
        }
        let s = Arc::new(Specs {
            target: target.clone(),
            feature: feature.clone(),
        });
        map.insert(key, Arc::clone(&s));
        s
    }
}

/// The decisions of one group's script call (member order) and its transition.
type GroupResult = Result<(Vec<Part>, Option<Transition>), StoreError>;

/// The calls of one script call: job indices, in queue order (their ids distinct).
struct Group {
    mode: AdmitMode,
    members: Vec<usize>,
}

/// Runs until every sender is gone.
pub(super) async fn run(core: Arc<Core>, mut rx: mpsc::Receiver<Job>) {
    let mut jobs = Vec::with_capacity(BATCH_MAX);
    while rx.recv_many(&mut jobs, BATCH_MAX).await > 0 {
        // One admission call in flight at a time: wait for a lone caller's own call (at most
        // the timeout: a caller that stopped polling its admission does not stall the rest),
        // then take what queued up meanwhile.
        let _admitting = tokio::time::timeout(core.timeout, core.admitting.lock())
            .await
            .ok();
        while jobs.len() < BATCH_MAX {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        // A caller that already gave up needs no admission (and must not get one).
        jobs.retain(|j| !j.reply.is_closed());
        if jobs.is_empty() {
            continue;
        }
        // The queue wait is bounded on its own (by the timeout): a job that could not be
        // sent in time is answered unsent; one that is sent gets a whole timeout for its
        // script call(s).
        let now = tokio::time::Instant::now();
        let (late, ready): (Vec<Job>, Vec<Job>) = std::mem::take(&mut jobs)
            .into_iter()
            .partition(|j| now.saturating_duration_since(j.queued) > core.timeout);
        for j in late {
            let _ = j.reply.send(Err(StoreError::Timeout(core.timeout)));
        }
        if !ready.is_empty() {
            admit_batch(&core, ready).await;
        }
    }
}

/// One admission decided from its caller's own task (no other admission was in progress):
/// the same grouping, riding and answering as a batch of one, holding `admitting` so that
/// no batch is in flight at the same time. Owns what it needs, so that a caller that stops
/// waiting can hand it to a task of its own to finish (`admit.rs`).
pub(super) async fn admit_alone(
    core: Arc<Core>,
    job: Job,
    admitting: tokio::sync::OwnedMutexGuard<()>,
) {
    if !job.reply.is_closed() {
        admit_batch(&core, vec![job]).await;
    }
    drop(admitting);
}

/// Groups, runs and answers one drained batch.
///
/// First the whole admissions (single node) and the breaker parts (split), concurrently;
/// then the feature parts of the split calls whose breaker part admitted them, so that a
/// call the breaker refuses never takes a rate slot or a permit of its feature ahead of
/// calls to healthy targets (single node and Cluster decide alike; Cluster pays a second
/// round trip for it).
async fn admit_batch(core: &Arc<Core>, jobs: Vec<Job>) {
    let n = jobs.len();
    // Each call's whole answer, or its breaker / feature part (split).
    let mut whole: Vec<Option<PartResult>> = Vec::new();
    let mut breaker: Vec<Option<PartResult>> = Vec::new();
    let mut feature: Vec<Option<PartResult>> = Vec::new();
    for v in [&mut whole, &mut breaker, &mut feature] {
        v.resize_with(n, || None);
    }

    let first = group(&jobs, |_, mode| mode != AdmitMode::Feature);
    let results = run_groups(core, &jobs, &first).await;
    fill(&first, results, &mut whole, &mut breaker, &mut feature);

    let passed: Vec<bool> = jobs
        .iter()
        .zip(&breaker)
        .map(|(j, b)| j.split && matches!(b, Some(Ok((Part::Admitted { .. }, _)))))
        .collect();
    if passed.iter().any(|p| *p) {
        let second = group(&jobs, |i, mode| {
            mode == AdmitMode::Feature && passed.get(i).copied().unwrap_or(false)
        });
        let results = run_groups(core, &jobs, &second).await;
        fill(&second, results, &mut whole, &mut breaker, &mut feature);
    }

    let parts = whole.into_iter().zip(breaker).zip(feature);
    for (job, ((w, b), f)) in jobs.into_iter().zip(parts) {
        let Specs { target, feature } = &*job.specs;
        let answer = if job.split {
            match (b, f) {
                (Some(b), Some(f)) => core.combine_split(target, feature, &job.call_id, b, f),
                (Some(b), None) => core.combine_breaker_refused(target, feature, &job.call_id, b),
                _ => Err(missing()),
            }
        } else {
            match w {
                Some(r) => core.combine_whole(target, feature, &job.call_id, r),
                None => Err(missing()),
            }
        };
        if let Err(answer) = job.reply.send(answer) {
            abandoned(core, &job.specs, &job.call_id, answer);
        }
    }
}

/// Spreads each group's decisions over its members' slots.
fn fill(
    groups: &[Group],
    results: Vec<GroupResult>,
    whole: &mut [Option<PartResult>],
    breaker: &mut [Option<PartResult>],
    feature: &mut [Option<PartResult>],
) {
    for (g, result) in groups.iter().zip(results) {
        let slots = match g.mode {
            AdmitMode::Both => &mut *whole,
            AdmitMode::Breaker => &mut *breaker,
            AdmitMode::Feature => &mut *feature,
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
}

/// A reply that did not cover every call of its group (cannot happen with a well-formed
/// reply, which `parse_admit` checks; here so that a bug answers instead of hanging).
fn missing() -> StoreError {
    StoreError::Reply("admit.lua: no decision for a call of the batch".to_owned())
}

/// The keys a group's call touches that settles can ride on: (breaker, permits).
fn ride_keys<'a>(jobs: &'a [Job], g: &Group) -> (Option<&'a str>, Option<&'a str>) {
    let Some(rep) = g.members.first().and_then(|&i| jobs.get(i)) else {
        return (None, None);
    };
    let Specs { target, feature } = &*rep.specs;
    let b = (g.mode != AdmitMode::Feature).then_some(target.keys.breaker.as_str());
    let f = (g.mode != AdmitMode::Breaker).then_some(feature.keys.permits.as_str());
    (b, f)
}

/// Runs the script calls of some groups concurrently, each carrying the queued settles of
/// its keys (after any flusher call in flight on those keys has landed).
async fn run_groups(core: &Arc<Core>, jobs: &[Job], groups: &[Group]) -> Vec<GroupResult> {
    let pairs: Vec<_> = groups.iter().map(|g| ride_keys(jobs, g)).collect();
    let riding: Vec<Riding> = core
        .settles
        .take_landed(&pairs, core.settle_batch, core.timeout)
        .await
        .into_iter()
        .map(|settles| Riding { settles })
        .collect();
    join_all(
        groups
            .iter()
            .zip(riding)
            .map(|(g, r)| run_group(core, jobs, g, r)),
    )
    .await
}

/// One script call for one group: its decisions in member order, and its transition.
async fn run_group(
    core: &Arc<Core>,
    jobs: &[Job],
    g: &Group,
    riding: Riding,
) -> Result<(Vec<Part>, Option<Transition>), StoreError> {
    let Some(rep) = g.members.first().and_then(|&i| jobs.get(i)) else {
        core.settles.give_back(
            riding.settles,
            &StoreError::Reply("empty admission group".to_owned()),
            false,
        );
        return Ok((Vec::new(), None));
    };
    let ids = g
        .members
        .iter()
        .filter_map(|&i| jobs.get(i))
        .map(|j| j.call_id.as_str());
    let Specs { target, feature } = &*rep.specs;
    if riding.is_empty() {
        return core
            .admit_calls(g.mode, target, feature, ids, g.members.len())
            .await;
    }
    let inv = ride::invocation(&ride::SETTLE_ADMIT, g.mode, target, feature, ids, &riding);
    let parsed = match core.call(&inv).await {
        Ok(v) => ride::parse(v, &target.name).map_err(|e| (e, true)),
        Err(e) => {
            let ran = super::compensate::may_have_run(&e);
            Err((e, ran))
        }
    };
    match parsed {
        Err((e, ran)) => {
            core.settles.give_back(riding.settles, &e, ran);
            Err(e)
        }
        Ok((admission, transitions)) => {
            core.settles.delivered(&riding.settles);
            for t in &transitions {
                core.report_transition(t);
            }
            super::admit::parse_admit(admission?, &target.name, feature, g.members.len())
        }
    }
}

/// Jobs that one `admit.lua` call can decide together: same mode and same specs (the keys
/// and the parameters the script reads), in queue order, with distinct call ids. Jobs with
/// the same keys but other parameters (a reconfigured target, say) get a group of their own;
/// so does a call id seen twice (sent after the first, on the same connection).
fn group(jobs: &[Job], wanted: impl Fn(usize, AdmitMode) -> bool) -> Vec<Group> {
    // Call ids are unique by contract: check once, cheaply, that this batch keeps it.
    let distinct = {
        let mut seen: HashSet<&str, BuildHasherDefault<Fnv>> =
            HashSet::with_capacity_and_hasher(jobs.len(), BuildHasherDefault::default());
        jobs.iter().all(|j| seen.insert(j.call_id.as_str()))
    };
    let mut groups: Vec<Group> = Vec::new();
    let mut at: HashMap<(AdmitMode, &str, &str), Vec<usize>> = HashMap::new();
    // The group the last job of each mode went to: consecutive jobs mostly share it.
    let mut last: [Option<usize>; 3] = [None; 3];
    let parts = jobs.iter().enumerate().flat_map(|(i, job)| {
        let modes: &[AdmitMode] = if job.split {
            &[AdmitMode::Breaker, AdmitMode::Feature]
        } else {
            &[AdmitMode::Both]
        };
        modes.iter().map(move |&mode| (mode, i, job))
    });
    let parts = parts.filter(|&(mode, i, _)| wanted(i, mode));
    for (mode, i, job) in parts {
        let slot = mode as usize;
        let fits = |g: &Group| {
            let Some(rep) = g.members.first().and_then(|&r| jobs.get(r)) else {
                return false;
            };
            let (a, b) = (&*rep.specs, &*job.specs);
            let same = Arc::ptr_eq(&rep.specs, &job.specs)
                || ((mode == AdmitMode::Feature || a.target == b.target)
                    && (mode == AdmitMode::Breaker || a.feature == b.feature));
            same && (distinct
                || !g
                    .members
                    .iter()
                    .any(|&m| jobs.get(m).is_some_and(|o| o.call_id == job.call_id)))
        };
        let prev = last.get(slot).copied().flatten();
        if let Some(g) = prev.and_then(|gi| groups.get_mut(gi)).filter(|g| fits(g)) {
            g.members.push(i);
            continue;
        }
        let (t, f) = (&job.specs.target, &job.specs.feature);
        let key = match mode {
            AdmitMode::Both => (mode, t.keys.breaker.as_str(), f.keys.permits.as_str()),
            AdmitMode::Breaker => (mode, t.keys.breaker.as_str(), ""),
            AdmitMode::Feature => (mode, "", f.keys.permits.as_str()),
        };
        let candidates = at.entry(key).or_default();
        let found = candidates
            .iter()
            .copied()
            .find(|&gi| groups.get(gi).is_some_and(fits));
        let gi = match found {
            Some(gi) => {
                if let Some(g) = groups.get_mut(gi) {
                    g.members.push(i);
                }
                gi
            }
            None => {
                candidates.push(groups.len());
                groups.push(Group {
                    mode,
                    members: vec![i],
                });
                groups.len() - 1
            }
        };
        if let Some(l) = last.get_mut(slot) {
            *l = Some(gi);
        }
    }
    groups
}

/// FNV-1a: a cheap hash for the duplicate-id check (the ids are the store's own).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// Gives back what a call whose caller stopped waiting was granted: it never ran.
fn abandoned(core: &Arc<Core>, specs: &Specs, call_id: &str, answer: Answer) {
    core.unused_answer(&specs.target, &specs.feature, call_id, &answer);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::breaker::BreakerParams;
    use crate::keys::{feature_keys, target_keys};
    use crate::BreakerConfig;

    fn job(id: &str, target: &str, feature: &str, split: bool, open_ms: u64) -> Job {
        let mut params = BreakerParams::from_config(&BreakerConfig::default(), 1000);
        params.open_ms = open_ms;
        Job {
            split,
            specs: Arc::new(Specs {
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
            }),
            call_id: id.to_owned(),
            reply: oneshot::channel().0,
            queued: tokio::time::Instant::now(),
        }
    }

    #[tokio::test]
    async fn the_task_ends_when_the_store_is_dropped() {
        // Nothing listens there: connecting is lazy, so this needs no Redis.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let config = crate::RedisConfig {
            url: Some(format!("redis://127.0.0.1:{port}/")),
            ..crate::RedisConfig::default()
        };
        let store = super::super::RedisStore::connect(&config)
            .await
            .expect("lazy connect");
        let clone = store.clone();
        let core = Arc::downgrade(&store.core);
        drop(store);
        drop(clone);
        for _ in 0..100 {
            if core.upgrade().is_none() {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the admission batcher outlived its store");
    }

    #[test]
    fn groups_by_mode_keys_and_parameters_in_queue_order() {
        let jobs = vec![
            job("c0", "a", "x", false, 10),
            job("c1", "b", "x", false, 10),
            job("c2", "a", "x", false, 10),
            job("c3", "a", "y", false, 10),
            job("c4", "a", "x", false, 99), // same keys, other parameters
            job("c5", "a", "x", true, 10),
            job("c6", "a", "y", true, 10),
            job("c1", "b", "x", false, 10), // the same call id as job 1
        ];
        let groups: Vec<(AdmitMode, Vec<usize>)> = group(&jobs, |_, _| true)
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
                (AdmitMode::Both, vec![7]),
            ]
        );
    }
}
