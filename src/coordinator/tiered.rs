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

use std::future::Future;
use std::sync::{Arc, OnceLock};

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

/// Called once each time the replica returns from local mode to the shared store.
pub(crate) type OnRecovered = Arc<dyn Fn() + Send + Sync>;

/// Reports events and store health; shared by the coordinator and the flusher.
#[derive(Clone)]
pub(crate) struct Reporter {
    pub(crate) observer: Arc<dyn Observer>,
    pub(crate) health: Option<Arc<Health>>,
    /// Set once the coordinator exists (reconciliation of local permits on recovery).
    pub(crate) on_recovered: Arc<OnceLock<OnRecovered>>,
}

impl Reporter {
    pub(crate) fn emit(&self, event: Event) {
        trace(&event);
        self.observer.on_event(&event);
    }

    pub(crate) fn store_ok(&self) {
        if let Some(h) = &self.health {
            if h.success() == Change::Recovered {
                self.emit(Event::StoreRecovered);
                if let Some(f) = self.on_recovered.get() {
                    f();
                }
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
}

impl Tiered {
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
