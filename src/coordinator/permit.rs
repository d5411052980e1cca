//! An admitted call: what it holds, and how its end is reported.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{FeatureRt, Location, Shared};
use crate::breaker::CallOutcome;
use crate::store::{Admitted, Settle, Store, TargetSpec};
use crate::{Error, StoreError};

/// Permission to make one call. Report how it ended with [`Permit::record`] (or
/// [`Permit::success`] / [`Permit::failure`]); dropping it unreported releases what it
/// holds and counts nothing (a cancelled call). Neither waits for Redis.
#[must_use = "a permit holds a bulkhead slot until it is recorded or dropped"]
pub struct Permit {
    shared: Arc<Shared>,
    feature: Arc<FeatureRt>,
    target: Arc<TargetSpec>,
    call_id: String,
    admitted: Admitted,
    location: Location,
    started: Instant,
    /// Set once the outcome is reported: stops any keep-alive task of this permit.
    settled: Arc<AtomicBool>,
}

impl std::fmt::Debug for Permit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Permit")
            .field("feature", &self.feature.spec.name)
            .field("target", &self.target.name)
            .field("generation", &self.admitted.generation)
            .field("probe", &self.admitted.probe)
            .field("local", &(self.location == Location::Local))
            .finish()
    }
}

impl Permit {
    pub(super) fn new(
        shared: Arc<Shared>,
        feature: Arc<FeatureRt>,
        target: Arc<TargetSpec>,
        call_id: String,
        admitted: Admitted,
        location: Location,
    ) -> Self {
        Permit {
            shared,
            feature,
            target,
            call_id,
            admitted,
            location,
            started: Instant::now(),
            settled: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The breaker generation the call was admitted under.
    pub fn generation(&self) -> u64 {
        self.admitted.generation
    }

    /// Whether this call is one of the half-open probes.
    pub fn is_probe(&self) -> bool {
        self.admitted.probe
    }

    /// Whether it was admitted on this replica's local state (store unavailable).
    pub fn is_local(&self) -> bool {
        self.location == Location::Local
    }

    /// The target it was admitted for.
    pub fn target(&self) -> &str {
        &self.target.name
    }

    /// The feature it was admitted for.
    pub fn feature(&self) -> &str {
        &self.feature.spec.name
    }

    /// Reports a success.
    pub fn success(self) {
        self.record(CallOutcome::Success);
    }

    /// Reports a failure.
    pub fn failure(self) {
        self.record(CallOutcome::Failure);
    }

    /// Reports how the call ended and releases its permit. Does not wait for the store.
    pub fn record(mut self, outcome: CallOutcome) {
        self.settle(outcome);
    }

    fn settle(&mut self, outcome: CallOutcome) {
        if self.settled.swap(true, Ordering::AcqRel) {
            return;
        }
        let spec = match self.location {
            Location::Shared => &self.feature.spec,
            Location::Local => &self.feature.local,
        };
        let settle = Settle {
            target: Arc::clone(&self.target),
            feature: Arc::clone(spec),
            call_id: std::mem::take(&mut self.call_id),
            generation: self.admitted.generation,
            probe: self.admitted.probe,
            permit: self.admitted.permit,
            refund_rate: false,
            outcome,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
        };
        if self.location == Location::Local || self.shared.remote.is_none() {
            for t in self.shared.local.settle_now(std::slice::from_ref(&settle)) {
                self.shared.emit(crate::Event::Transition(t));
            }
            if settle.permit {
                self.feature.released.notify_one();
            }
        } else {
            let urgent = settle.permit && self.feature.waiting.load(Ordering::Relaxed) > 0;
            self.shared.enqueue(settle, urgent);
        }
    }

    /// Extends the bulkhead lease to now + lease (for long calls such as streams).
    /// `Ok(false)`: the permit was lost (its lease ran out and it was reclaimed).
    pub async fn heartbeat(&self) -> Result<bool, Error> {
        if !self.admitted.permit {
            return Ok(true);
        }
        match (&self.shared.remote, self.location) {
            (Some(r), Location::Shared) => {
                let res: Result<bool, StoreError> =
                    r.store.heartbeat(&self.feature.spec, &self.call_id).await;
                match &res {
                    Ok(_) => self.shared.reporter.store_ok(),
                    Err(e) => self.shared.reporter.store_failed(e),
                }
                Ok(res?)
            }
            _ => Ok(self
                .shared
                .local
                .heartbeat_now(&self.feature.local, &self.call_id)),
        }
    }

    /// Spawns a task that extends the lease every 0.8 x lease until the returned handle is
    /// dropped or the permit is recorded, whichever comes first. Without a bulkhead there is
    /// no lease, and the task does nothing.
    pub fn keep_alive(&self) -> Heartbeat {
        if !self.admitted.permit {
            return Heartbeat {
                task: tokio::spawn(async {}),
            };
        }
        let settled = Arc::clone(&self.settled);
        let shared = Arc::clone(&self.shared);
        let feature = Arc::clone(&self.feature);
        let call_id = self.call_id.clone();
        let location = self.location;
        let every = self
            .feature
            .lease
            .mul_f64(0.8)
            .max(Duration::from_millis(10));
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            loop {
                tick.tick().await;
                if settled.load(Ordering::Acquire) {
                    break;
                }
                let alive = match (&shared.remote, location) {
                    (Some(r), Location::Shared) => r
                        .store
                        .heartbeat(&feature.spec, &call_id)
                        .await
                        .unwrap_or(true),
                    _ => shared.local.heartbeat_now(&feature.local, &call_id),
                };
                if !alive && !settled.load(Ordering::Acquire) {
                    tracing::warn!(target: "fusebox", event = "lease_lost", feature = %feature.spec.name, "bulkhead permit lease lost");
                    break;
                }
            }
        });
        Heartbeat { task }
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.settle(CallOutcome::Ignored);
    }
}

/// Keeps a permit's lease alive while held; see [`Permit::keep_alive`].
#[derive(Debug)]
pub struct Heartbeat {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}
