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

use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use super::flusher;
use super::health::{Change, Health, Route};
use super::FeatureRt;
use crate::observer::{trace, Event, Observer};
use crate::store::{MemoryStore, RedisStore, Settle};
use crate::StoreError;
use std::collections::HashMap;

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
            if t.to == crate::CircuitState::Open {
                if let Some(f) = self.on_open.get() {
                    f(t);
                }
            }
        }
        trace(&event);
        self.observer.on_event(&event);
    }

    pub(crate) fn store_ok(&self) {
        if let Some(h) = &self.health {
            if h.success() == Change::Recovered {
                self.emit(Event::StoreRecovered);
            }
        }
    }

    pub(crate) fn store_failed(&self, error: &StoreError) {
        tracing::debug!(target: "fusebox", event = "store_error", error = %error, "store operation failed");
        if let Some(h) = &self.health {
            if error.is_unavailable() && h.failure() == Change::Degraded {
                self.emit(Event::StoreDegraded {
                    error: error.clone(),
                });
            }
        }
    }

    pub(crate) fn observe<T>(&self, res: &Result<T, StoreError>) {
        match res {
            Ok(_) => self.store_ok(),
            Err(e) => self.store_failed(e),
        }
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
    /// Local permits counted in the shared store: their release goes there too.
    adopted: Mutex<HashSet<String>>,
    any_adopted: AtomicBool,
}

impl Tiered {
    pub(crate) fn new(remote: Option<Remote>, local: MemoryStore, reporter: Reporter) -> Self {
        Tiered {
            remote,
            local,
            reporter,
            reconcile_pending: AtomicBool::new(false),
            adopted: Mutex::default(),
            any_adopted: AtomicBool::new(false),
        }
    }

    /// Counts this replica's live local permits in the shared store, before it decides
    /// anything there again (they were granted while it was unreachable and still run).
    async fn reconcile(&self, r: &Remote) -> Result<(), StoreError> {
        if !self.reconcile_pending.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        for f in r.sink.features.values() {
            if f.spec.bulkhead.is_none() {
                continue;
            }
            let live = self.local.live_permits(&f.local());
            if live.is_empty() {
                continue;
            }
            if let Err(e) = r.store.adopt(&f.spec, &live).await {
                self.reconcile_pending.store(true, Ordering::Release);
                return Err(e);
            }
            let mut adopted = self.adopted.lock().unwrap_or_else(|p| p.into_inner());
            adopted.extend(live.into_iter().map(|(id, _)| id));
            self.any_adopted.store(true, Ordering::Release);
        }
        Ok(())
    }

    /// A local permit ended: if the shared store counts it, release it there too.
    pub(crate) fn release_adopted(
        &self,
        settle: &Settle,
        shared_spec: &Arc<crate::store::FeatureSpec>,
    ) {
        if !settle.permit || !self.any_adopted.load(Ordering::Acquire) {
            return;
        }
        let was_adopted = {
            let mut adopted = self.adopted.lock().unwrap_or_else(|p| p.into_inner());
            let hit = adopted.remove(&settle.call_id);
            if adopted.is_empty() {
                self.any_adopted.store(false, Ordering::Release);
            }
            hit
        };
        if was_adopted {
            self.enqueue(
                Settle {
                    feature: Arc::clone(shared_spec),
                    // The outcome was counted locally; the shared store only frees the slot.
                    outcome: crate::CallOutcome::Ignored,
                    probe: false,
                    ..settle.clone()
                },
                false,
            );
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
        let Some(r) = &self.remote else {
            return Tried::Embedded;
        };
        if self.health().map_or(Route::Remote, |h| h.route()) == Route::Local {
            return Tried::Skipped;
        }
        if self.reconcile_pending.load(Ordering::Acquire) {
            if let Err(e) = self.reconcile(r).await {
                self.reporter.store_failed(&e);
                return Tried::Failed(e);
            }
        }
        self.ask(&r.store, op).await
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
            Some(r) => self.ask(&r.store, op).await,
        }
    }

    async fn ask<'a, T, Fut>(
        &self,
        store: &'a RedisStore,
        op: impl FnOnce(&'a RedisStore) -> Fut,
    ) -> Tried<T>
    where
        Fut: Future<Output = Result<T, StoreError>>,
    {
        let res = op(store).await;
        self.reporter.observe(&res);
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
