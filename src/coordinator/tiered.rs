//! The one place that decides Redis or local state: "the shared store if health allows, else
//! local, then report health".
//!
//! [`Tiered`] owns the shared store (when one is configured), the local in-memory store (the
//! embedded store, or this replica's state in Redis-down mode), the breaker around Redis
//! ([`Health`]) and the [`Reporter`] of events. Every coordinator operation, the permit's
//! settle and heartbeat, and the background membership task go through [`Tiered::remote`] (or
//! its ungated variant for operations on state that exists only in Redis): it says whether the
//! shared store was asked and what it answered, and reports the answer to health. What to do
//! on local state instead stays with the caller, since it differs per operation (admission
//! has a store policy, an operator read must not pass local state off as the fleet's).

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::flusher;
use super::health::{Change, Health, Route};
use super::FeatureRt;
use crate::observer::{trace, Event, Observer};
use crate::store::{FeatureSpec, MemoryStore, RedisStore, Settle, TargetSpec};
use crate::StoreError;

/// Which store answered an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Source {
    /// The embedded in-process store (no `[redis]` configured): the whole "fleet" is this
    /// process.
    Embedded,
    /// The shared store (Redis): the fleet's state.
    Shared,
    /// This replica's local state, because the shared store is unavailable: not the fleet's.
    Local,
}

/// What asking the shared store came to.
#[derive(Debug)]
pub(crate) enum Tried<T> {
    /// It answered.
    Done(T),
    /// It was asked and failed (already reported to health).
    Failed(StoreError),
    /// Not asked: it is marked down and this is not the call that probes it.
    Skipped,
    /// There is no shared store (embedded mode).
    Embedded,
}

/// Whether a timeout of an operation counts toward local mode (see [`Tiered::remote_side`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Timeouts {
    Count,
    Ignore,
}

/// The shared store (which holds the queue of settles waiting to be delivered to it).
pub(crate) struct Remote {
    pub(crate) store: RedisStore,
    /// What the background flusher needs; it holds no `Shared`, so dropping the last
    /// coordinator closes the queue and ends the task after it delivered what was queued.
    pub(crate) sink: Sink,
}

impl Drop for Remote {
    fn drop(&mut self) {
        self.store.settles().close();
    }
}

/// The flusher's view: the store, the reporter, and the features' release notifiers.
#[derive(Clone)]
pub(crate) struct Sink {
    pub(crate) store: RedisStore,
    pub(crate) reporter: Reporter,
    pub(crate) features: Arc<HashMap<String, Arc<FeatureRt>>>,
    /// What background delivery did since the last [`crate::Coordinator::flush`].
    pub(crate) tally: Arc<flusher::Tally>,
}

/// Sees every breaker transition to open (seeds local state with it).
pub(crate) type OnOpen = Arc<dyn Fn(&crate::Transition) + Send + Sync>;

/// Reports events and store health; shared by the coordinator and the flusher.
#[derive(Clone)]
pub(crate) struct Reporter {
    pub(crate) observer: Arc<dyn Observer>,
    pub(crate) health: Option<Arc<Health>>,
    /// Set once the coordinator exists: local breakers learn of shared opens.
    pub(crate) on_open: Arc<OnceLock<OnOpen>>,
}

impl Reporter {
    pub(crate) fn emit(&self, event: Event) {
        if let Event::Transition(t) = &event {
            crate::pipeline::metrics::transition(t);
            if t.to == crate::CircuitState::Open {
                if let Some(f) = self.on_open.get() {
                    f(t);
                }
            }
        }
        trace(&event);
        self.observer.on_event(&event);
    }

    /// A success of an operation whose start is unknown (see [`Self::store_ok_since`]).
    pub(crate) fn store_ok(&self) {
        self.store_ok_since(None);
    }

    /// A success of an operation that started at `token` ([`Self::token`]).
    pub(crate) fn store_ok_since(&self, token: Option<u64>) {
        if let Some(h) = &self.health {
            if h.success_since(token) == Change::Recovered {
                self.emit(Event::StoreRecovered);
            }
        }
    }

    /// The store is known to be down (it did not answer at start): local mode at once.
    pub(crate) fn store_down(&self, error: &StoreError) {
        if let Some(h) = &self.health {
            if h.down() == Change::Degraded {
                self.emit(Event::StoreDegraded {
                    error: error.clone(),
                });
            }
        }
    }

    pub(crate) fn store_failed(&self, error: &StoreError) {
        if error.is_unavailable() {
            tracing::debug!(target: "fusebox", event = "store_error", error = %error, "store operation failed");
        } else {
            // Redis answered and refused (a key of the wrong type, a reply that does not
            // parse): not an outage, so no local mode is entered, but the operation did not
            // happen on shared state. Loud, since only an operator can mend the key.
            tracing::warn!(target: "fusebox", event = "store_error", error = %error, "store refused the operation (a key of the wrong type? out of memory?); decided without shared state");
        }
        if let Some(h) = &self.health {
            if error.is_unavailable() && h.failure() == Change::Degraded {
                self.emit(Event::StoreDegraded {
                    error: error.clone(),
                });
            }
        }
    }

    /// Taken when an operation starts: its success then proves recovery only if it started
    /// after the store was marked down.
    pub(crate) fn token(&self) -> Option<u64> {
        self.health.as_ref().map(|h| h.token())
    }
}

/// Shared store, local store, health and reporting: see the module docs.
pub(crate) struct Tiered {
    pub(crate) remote: Option<Remote>,
    /// The embedded store (no Redis configured), or local state for Redis-down mode.
    pub(crate) local: MemoryStore,
    pub(crate) reporter: Reporter,
    /// Reconciliation: set when a permit was granted on local state while a shared store is
    /// configured; the next operation on the shared store first counts the live local
    /// permits there ([`Self::reconcile`]).
    pub(crate) reconcile_pending: AtomicBool,
    /// After Redis refused a registration (a key of the wrong type, OOM...): not before this
    /// instant again, so that a lasting refusal costs one script call (and one warning) a
    /// second rather than one per operation.
    refused_until: Mutex<Option<tokio::time::Instant>>,
    /// Permits granted on local state (shared store configured), by call id.
    grants: Mutex<Grants>,
}

/// A permit granted on local state: what its release in the shared store needs.
#[derive(Clone)]
struct Grant {
    target: Arc<TargetSpec>,
    /// The feature's shared spec.
    feature: Arc<FeatureSpec>,
}

#[derive(Default)]
struct Grants {
    /// Local permits still running.
    live: HashMap<String, Grant>,
    /// Being registered in the shared store right now.
    adopting: HashMap<String, Grant>,
    /// Registered in the shared store: their release goes there too.
    adopted: HashMap<String, Grant>,
}

fn release_of(call_id: String, g: Grant) -> Settle {
    Settle {
        target: g.target,
        feature: g.feature,
        call_id,
        generation: 0,
        probe: false,
        permit: true,
        refund_rate: false,
        // The outcome was counted locally; the shared store only frees the slot.
        outcome: crate::CallOutcome::Ignored,
        elapsed_ms: 0,
    }
}

/// How long after Redis refused a registration it is tried again.
const REFUSED_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// Whether a store call that failed with `e` may still have run in Redis: its command was
/// (maybe) sent and Redis can run it after the caller stopped waiting (a timeout, a connection
/// dropped mid-call), or it ran and its reply was not understood. Not when it cannot have been
/// sent (refused, authentication, DNS, TLS, the store marked down) or Redis refused it
/// (`Command`: the scripts check every key before their first write).
fn may_have_run(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Timeout(_)
            | StoreError::Connection(_)
            | StoreError::Protocol(_)
            | StoreError::Reply(_)
    )
}

impl Tiered {
    pub(crate) fn new(remote: Option<Remote>, local: MemoryStore, reporter: Reporter) -> Self {
        Tiered {
            remote,
            local,
            reporter,
            reconcile_pending: AtomicBool::new(false),
            refused_until: Mutex::new(None),
            grants: Mutex::default(),
        }
    }

    fn grants(&self) -> std::sync::MutexGuard<'_, Grants> {
        self.grants.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A permit was granted on local state while a shared store is configured: remember it,
    /// and have the next shared operation register it there first.
    pub(crate) fn local_granted(
        &self,
        call_id: &str,
        target: &Arc<TargetSpec>,
        feature: &Arc<FeatureSpec>,
    ) {
        if self.remote.is_none() {
            return;
        }
        self.grants().live.insert(
            call_id.to_owned(),
            Grant {
                target: Arc::clone(target),
                feature: Arc::clone(feature),
            },
        );
        self.reconcile_pending.store(true, Ordering::Release);
    }

    /// A local permit ended: if the shared store counts it (or is being told to), release it
    /// there too. Releasing twice is harmless.
    pub(crate) fn local_ended(&self, call_id: &str) {
        if self.remote.is_none() {
            return;
        }
        let release = {
            let mut g = self.grants();
            let grant = g.live.remove(call_id);
            match (g.adopted.remove(call_id), g.adopting.contains_key(call_id)) {
                (Some(a), _) => Some(a),
                (None, true) => grant,
                (None, false) => None,
            }
        };
        if let Some(grant) = release {
            self.enqueue(release_of(call_id.to_owned(), grant), false);
        }
    }

    /// Registers this replica's live local permits in the shared store, before it decides
    /// anything there again (they were granted while it was unreachable and still run).
    async fn reconcile(&self, r: &Remote) -> Result<(), StoreError> {
        let now = tokio::time::Instant::now();
        {
            let until = self.refused_until.lock().unwrap_or_else(|p| p.into_inner());
            if until.is_some_and(|t| now < t) {
                return Ok(());
            }
        }
        if !self.reconcile_pending.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        let snapshot: Vec<(String, Grant)> = {
            let mut g = self.grants();
            let live: Vec<(String, Grant)> =
                g.live.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
            g.adopting.extend(live.iter().cloned());
            live
        };
        let mut features: HashMap<&str, &Arc<FeatureSpec>> = HashMap::new();
        for (_, grant) in &snapshot {
            features.insert(grant.feature.name.as_str(), &grant.feature);
        }
        // Features whose permits Redis now counts, or may count (a registration that failed
        // after it may have run: Redis can run a script after the caller gave up on it).
        let mut registered: HashSet<&str> = HashSet::new();
        let mut unreachable: Option<StoreError> = None;
        let mut refused = false;
        for feature in features.values() {
            // Lease left per permit, from the local store (same keys as the shared spec).
            let ids: HashSet<&str> = snapshot
                .iter()
                .filter(|(_, g)| g.feature.name == feature.name)
                .map(|(id, _)| id.as_str())
                .collect();
            let live: Vec<(String, u64)> = self
                .local
                .live_permits(feature)
                .into_iter()
                .filter(|(id, _)| ids.contains(id.as_str()))
                .collect();
            match r.store.adopt(feature, &live).await {
                Ok(_) => {
                    registered.insert(feature.name.as_str());
                }
                Err(e) => {
                    if may_have_run(&e) {
                        registered.insert(feature.name.as_str());
                    }
                    if e.is_unavailable() {
                        // Unreachable: the rest waits for the next operation.
                        unreachable = Some(e);
                        break;
                    }
                    // Redis answered and refused this feature (a key of the wrong type, OOM):
                    // the other features, and the operation, go on with shared state; this
                    // one is tried again a second later, until Redis takes it (a refusal
                    // that lasts is the operator's to mend). Seen before: one corrupted
                    // permits key sent every operation of the replica, on every feature, to
                    // local state for as long as a local permit of that feature ran; and,
                    // never retried, local permits stayed uncounted once Redis took writes
                    // again (a limit of 1 ran 3 calls).
                    self.reporter.store_failed(&e);
                    refused = true;
                }
            }
        }
        let ended: Vec<(String, Grant)> = {
            let mut g = self.grants();
            let adopting = std::mem::take(&mut g.adopting);
            let mut ended = Vec::new();
            for (id, grant) in adopting {
                if !registered.contains(grant.feature.name.as_str()) {
                    // Still running: registered by a later reconciliation if the store was
                    // unreachable. Ended meanwhile: `local_ended` sent its release already.
                    continue;
                }
                // (May be) registered: its end sends a release (one of a permit Redis never
                // had changes nothing; a missing one would hold a slot for the whole lease).
                if g.live.contains_key(&id) {
                    g.adopted.insert(id, grant);
                } else {
                    ended.push((id, grant));
                }
            }
            ended
        };
        // Ended while being registered: their release may have reached Redis first.
        for (id, grant) in ended {
            self.enqueue(release_of(id, grant), false);
        }
        *self.refused_until.lock().unwrap_or_else(|p| p.into_inner()) =
            refused.then(|| now + REFUSED_RETRY);
        if refused || unreachable.is_some() {
            self.reconcile_pending.store(true, Ordering::Release);
        }
        if let Some(e) = unreachable {
            return Err(e);
        }
        Ok(())
    }

    /// Spawns a background loop of the coordinator (fleet membership, retry-budget deposits,
    /// fallback alerts: all about the shared store) on the shared store's runtime, where its
    /// connection lives, rather than on whichever runtime first needed the loop: in
    /// `fusebox serve` that was a serving thread, and a loop there stopped with it, or
    /// waited behind its requests. Without a shared store, on the current runtime. False
    /// when there is none to run it on.
    pub(crate) fn spawn_background(&self, work: impl Future<Output = ()> + Send + 'static) -> bool {
        match (&self.remote, tokio::runtime::Handle::try_current()) {
            (Some(r), _) => {
                r.store.runtime().spawn(work);
                true
            }
            (None, Ok(h)) => {
                h.spawn(work);
                true
            }
            (None, Err(_)) => false,
        }
    }

    pub(crate) fn health(&self) -> Option<&Arc<Health>> {
        self.reporter.health.as_ref()
    }

    /// True while a shared store is configured but marked down.
    pub(crate) fn is_degraded(&self) -> bool {
        self.health().is_some_and(|h| h.is_degraded())
    }

    /// Runs `op` on the shared store if health allows (healthy, or this call is the one
    /// that probes a store marked down), and reports its answer to health.
    pub(crate) async fn remote<'a, T, Fut>(
        &'a self,
        op: impl FnOnce(&'a RedisStore) -> Fut,
    ) -> Tried<T>
    where
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let r = match self.gate() {
            Ok(r) => r,
            Err(not) => return not,
        };
        if self.reconcile_pending.load(Ordering::Acquire) {
            if let Err(e) = self.reconcile(r).await {
                self.reporter.store_failed(&e);
                return Tried::Failed(e);
            }
        }
        self.ask(&r.store, op, Timeouts::Count).await
    }

    /// The shared store if there is one and health lets this call ask it; else what the
    /// call comes to without asking.
    fn gate<T>(&self) -> Result<&Remote, Tried<T>> {
        let Some(r) = &self.remote else {
            return Err(Tried::Embedded);
        };
        if self.health().map_or(Route::Remote, |h| h.route()) == Route::Local {
            return Err(Tried::Skipped);
        }
        Ok(r)
    }

    /// Like [`Self::remote`] without asking health first: for state that exists only in the
    /// shared store (a shared permit's lease), where not asking means losing it. The answer
    /// is still reported to health.
    pub(crate) async fn remote_ungated<'a, T, Fut>(
        &'a self,
        op: impl FnOnce(&'a RedisStore) -> Fut,
    ) -> Tried<T>
    where
        Fut: Future<Output = Result<T, StoreError>>,
    {
        match &self.remote {
            None => Tried::Embedded,
            Some(r) => self.ask(&r.store, op, Timeouts::Count).await,
        }
    }

    /// Like [`Self::remote`] for side traffic that does not run on the hot path's connection
    /// (the degraded-response cache, on its own pool, with its own bound and values up to
    /// megabytes): gated by health the same way, but a **timeout** is not reported to health.
    /// A slow 100 KB write says nothing about the admissions' connection, and counting it
    /// would switch the whole replica to local mode; an unreachable Redis (refused, reset,
    /// DNS, auth) is still reported, and the hot path sees a hang on its own connection.
    pub(crate) async fn remote_side<'a, T, Fut>(
        &'a self,
        op: impl FnOnce(&'a RedisStore) -> Fut,
    ) -> Tried<T>
    where
        Fut: Future<Output = Result<T, StoreError>>,
    {
        match self.gate() {
            Ok(r) => self.ask(&r.store, op, Timeouts::Ignore).await,
            Err(not) => not,
        }
    }

    async fn ask<'a, T, Fut>(
        &self,
        store: &'a RedisStore,
        op: impl FnOnce(&'a RedisStore) -> Fut,
        timeouts: Timeouts,
    ) -> Tried<T>
    where
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let token = self.reporter.token();
        let res = op(store).await;
        match &res {
            Ok(_) => self.reporter.store_ok_since(token),
            Err(e @ StoreError::Timeout(_)) if timeouts == Timeouts::Ignore => {
                tracing::debug!(target: "fusebox", event = "store_error", error = %e, "side operation timed out (not counted toward local mode)");
            }
            Err(e) => self.reporter.store_failed(e),
        }
        match res {
            Ok(v) => Tried::Done(v),
            Err(e) => Tried::Failed(e),
        }
    }

    /// Queues a settle for the shared store without waiting: this replica's next admission
    /// on its target or feature takes it along, or the flusher sends it. `urgent`: the
    /// flusher sends it without waiting (someone on this replica waits for its permit).
    pub(crate) fn enqueue(&self, settle: Settle, urgent: bool) {
        let Some(remote) = &self.remote else { return };
        if let Err(s) = remote.store.settles().push(settle, urgent) {
            // Full (or closed): sent on its own.
            let sink = remote.sink.clone();
            if let Ok(handle) = tokio::runtime::Handle::try_current() {
                handle.spawn(async move { flusher::deliver(&sink, &[s]).await });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A registration that cannot have been sent is not treated as registered (its end then
    /// sends no release to retry against a dead Redis for the whole lease); one that may have
    /// run is. Seen by the adversarial review: with Redis down (connection refused), every
    /// local call's end became a release retried until its lease passed.
    #[test]
    fn only_a_call_that_may_have_reached_redis_may_have_run() {
        let s = || "x".to_owned();
        for e in [
            StoreError::Timeout(std::time::Duration::from_millis(50)),
            StoreError::Connection(s()),
            StoreError::Protocol(s()),
            StoreError::Reply(s()),
        ] {
            assert!(may_have_run(&e), "{e}");
        }
        for e in [
            StoreError::Refused(s()),
            StoreError::Auth(s()),
            StoreError::Dns(s()),
            StoreError::Tls(s()),
            StoreError::Command(s()),
            StoreError::Unavailable,
        ] {
            assert!(!may_have_run(&e), "{e}");
        }
    }
}
