//! An admitted call: what it holds, and how its end is reported.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::tiered::Tried;
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
    /// Shared with its keep-alive: settled, lost.
    flags: Arc<Flags>,
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
        if admitted.permit && location == Location::Shared && shared.tiered.remote.is_some() {
            feature.held_shared.fetch_add(1, Ordering::AcqRel);
        }
        Permit {
            shared,
            feature,
            target,
            call_id,
            admitted,
            location,
            started: Instant::now(),
            flags: Arc::default(),
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
        if self.flags.settled.swap(true, Ordering::AcqRel) {
            return;
        }
        let tiered = &self.shared.tiered;
        let spec = match self.location {
            Location::Shared => Arc::clone(&self.feature.spec),
            Location::Local => self.feature.local(),
        };
        let settle = Settle {
            target: Arc::clone(&self.target),
            feature: spec,
            call_id: std::mem::take(&mut self.call_id),
            generation: self.admitted.generation,
            probe: self.admitted.probe,
            permit: self.admitted.permit,
            refund_rate: false,
            outcome,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
        };
        if self.location == Location::Local || tiered.remote.is_none() {
            for t in tiered.local.settle_now(std::slice::from_ref(&settle)) {
                self.shared.emit(crate::Event::Transition(t));
            }
            if settle.permit {
                self.feature.released.notify_one();
            }
            if self.location == Location::Local && settle.permit {
                tiered.local_ended(&settle.call_id);
            }
        } else {
            if settle.permit {
                self.feature.held_shared.fetch_sub(1, Ordering::AcqRel);
            }
            let urgent = settle.permit && self.feature.waiting.load(Ordering::Relaxed) > 0;
            tiered.enqueue(settle, urgent);
        }
    }

    /// Whether this permit's bulkhead lease was lost while the call ran (a heartbeat found it
    /// gone, or none got through before it ran out): another call may hold its slot. Also
    /// reported as [`crate::Event::LeaseLost`].
    pub fn lease_lost(&self) -> bool {
        self.flags.lost.load(Ordering::Acquire)
    }

    /// Extends the bulkhead lease to now + lease, once (for long calls such as streams;
    /// [`Self::keep_alive`] does it for you). `Ok(false)`: the permit was lost (its lease ran
    /// out and it was reclaimed); that is also reported as [`crate::Event::LeaseLost`].
    pub async fn heartbeat(&self) -> Result<bool, Error> {
        if !self.admitted.permit {
            return Ok(true);
        }
        let alive = self.keeper().beat().await?;
        if !alive {
            self.keeper().lost();
        }
        Ok(alive)
    }

    /// Spawns a task that keeps the lease alive until the returned handle is dropped or the
    /// permit is recorded, whichever comes first: a heartbeat every lease / 3, retried every
    /// lease / 20 (10–250 ms) while the store does not answer, so a short stall or refusal
    /// around one tick does not lose the lease. A lost lease is seen on the permit
    /// ([`Self::lease_lost`]), on the handle ([`Heartbeat::is_lost`]) and as
    /// [`crate::Event::LeaseLost`]. Without a bulkhead there is no lease, and the task does
    /// nothing. [`crate::Coordinator::call`] does this by itself.
    pub fn keep_alive(&self) -> Heartbeat {
        let flags = Arc::clone(&self.flags);
        if !self.admitted.permit {
            return Heartbeat {
                task: tokio::spawn(async {}),
                flags,
            };
        }
        let shared = Arc::clone(&self.shared);
        let feature = Arc::clone(&self.feature);
        let target = Arc::clone(&self.target);
        let call_id = self.call_id.clone();
        let location = self.location;
        let task_flags = Arc::clone(&flags);
        let task = tokio::spawn(async move {
            Keeper {
                shared: &shared,
                feature: &feature,
                target: &target.name,
                call_id: &call_id,
                location,
                flags: &task_flags,
            }
            .keep()
            .await;
        });
        Heartbeat { task, flags }
    }

    /// Hands this admission's breaker part (generation, probe slot) to an [`Attempt`] of its
    /// own: from then on this permit holds only the feature's permit and rate slot, and its
    /// settle releases the permit without an outcome.
    pub(super) fn split_attempt(&mut self) -> super::Attempt {
        let probe = std::mem::take(&mut self.admitted.probe);
        super::Attempt::new(
            Arc::clone(&self.shared),
            Arc::clone(&self.feature),
            Arc::clone(&self.target),
            self.call_id.clone(),
            self.admitted.generation,
            probe,
            self.location,
        )
    }

    pub(super) fn feature_rt(&self) -> &Arc<FeatureRt> {
        &self.feature
    }

    /// Runs `call` while keeping this permit's lease alive (in the same task: no spawn, and
    /// nothing at all for a call that finishes before the first heartbeat is due).
    pub(super) async fn guard<T>(&self, call: impl Future<Output = T>) -> T {
        if !self.admitted.permit {
            return call.await;
        }
        let keeper = async {
            self.keeper().keep().await;
            std::future::pending::<()>().await;
        };
        tokio::select! {
            biased;
            out = call => out,
            () = keeper => unreachable!("the keeper never ends"),
        }
    }

    fn keeper(&self) -> Keeper<'_> {
        Keeper {
            shared: &self.shared,
            feature: &self.feature,
            target: &self.target.name,
            call_id: &self.call_id,
            location: self.location,
            flags: &self.flags,
        }
    }
}

/// The state a permit shares with its keep-alive.
#[derive(Debug, Default)]
struct Flags {
    /// Set once the outcome is reported: stops any keep-alive of this permit.
    settled: AtomicBool,
    /// Set when the lease was lost while the call was still running.
    lost: AtomicBool,
}

/// Keeps one permit's lease alive.
struct Keeper<'a> {
    shared: &'a Shared,
    feature: &'a FeatureRt,
    target: &'a str,
    call_id: &'a str,
    location: Location,
    flags: &'a Flags,
}

impl Keeper<'_> {
    /// One heartbeat, where the permit lives.
    async fn beat(&self) -> Result<bool, StoreError> {
        let tiered = &self.shared.tiered;
        match self.location {
            Location::Local => Ok(tiered
                .local
                .heartbeat_now(&self.feature.local(), self.call_id)),
            // The permit exists only in the shared store: ask it even while it is marked
            // down (not asking is losing the lease), and let health hear the answer.
            Location::Shared => match tiered
                .remote_ungated(|s| s.heartbeat(&self.feature.spec, self.call_id))
                .await
            {
                Tried::Done(alive) => Ok(alive),
                Tried::Failed(e) => Err(e),
                Tried::Skipped | Tried::Embedded => {
                    Ok(tiered.local.heartbeat_now(&self.feature.spec, self.call_id))
                }
            },
        }
    }

    /// Marks the lease lost (unless the call already ended) and reports it once.
    fn lost(&self) {
        if self.flags.settled.load(Ordering::Acquire)
            || self.flags.lost.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.shared.emit(crate::Event::LeaseLost {
            feature: self.feature.spec.name.clone(),
            target: self.target.to_owned(),
        });
    }

    /// Heartbeats until the permit is settled or its lease is lost.
    async fn keep(&self) {
        let plan = lease_plan(self.feature.lease);
        let mut last_ok = Instant::now();
        let mut next = last_ok + plan.every;
        loop {
            tokio::time::sleep_until(next).await;
            if self.flags.settled.load(Ordering::Acquire) {
                return;
            }
            // The lease is extended from when the script runs, which is after this instant.
            let sent = Instant::now();
            match self.beat().await {
                Ok(true) => {
                    last_ok = sent;
                    next = sent + plan.every;
                }
                Ok(false) => return self.lost(),
                Err(_) => {
                    let now = Instant::now();
                    if now >= last_ok + self.feature.lease {
                        // No heartbeat got through within one lease: the store has let the
                        // permit go (or will, as soon as it answers again).
                        return self.lost();
                    }
                    next = now + plan.retry;
                }
            }
        }
    }
}

/// When a keep-alive beats: every `every`, and after a failed beat again after `retry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct LeasePlan {
    pub(crate) every: Duration,
    pub(crate) retry: Duration,
}

/// Three beats per lease (so two may fail outright and the third still lands), failed beats
/// retried every lease / 20 within 10–250 ms.
pub(crate) fn lease_plan(lease: Duration) -> LeasePlan {
    LeasePlan {
        every: (lease / 3).max(Duration::from_millis(10)),
        retry: (lease / 20).clamp(Duration::from_millis(10), Duration::from_millis(250)),
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
    flags: Arc<Flags>,
}

impl Heartbeat {
    /// Whether the permit's lease was lost while the call ran.
    pub fn is_lost(&self) -> bool {
        self.flags.lost.load(Ordering::Acquire)
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_beats_per_lease_and_quick_retries() {
        let p = lease_plan(Duration::from_secs(30));
        assert_eq!(p.every, Duration::from_secs(10));
        assert_eq!(p.retry, Duration::from_millis(250));
        let p = lease_plan(Duration::from_millis(600));
        assert_eq!(p.every, Duration::from_millis(200));
        assert_eq!(p.retry, Duration::from_millis(30));
        let p = lease_plan(Duration::from_millis(100));
        assert!(p.every < Duration::from_millis(100) && p.retry >= Duration::from_millis(10));
    }
}
