//! One request across several targets: it holds **one** feature permit and rate slot for its
//! whole life ([`Request`]), and each target it tries takes only that target's breaker
//! admission ([`Attempt`]: a probe slot in half-open). The first admission decides both
//! parts in one store call, as [`Coordinator::admit`] does; every later attempt is one
//! breaker-only call ([`Store::admit_target`](crate::store::Store::admit_target)). Each
//! attempt's outcome goes to its own target's breaker; the feature permit is released once,
//! when the request ends.

use std::future::Future;
use std::sync::Arc;

use tokio::time::Instant;

use super::tiered::Tried;
use super::{Coordinator, FeatureRt, Location, Permit, Shared};
use crate::breaker::CallOutcome;
use crate::config::StorePolicy;
use crate::observer::Event;
use crate::store::{Admission, AdmitRequest, Settle, Store, TargetSpec};
use crate::{Error, Rejection};

/// A request admitted for its feature: one bulkhead permit and one rate slot, held until it
/// is dropped (or [`Request::finish`]ed), whatever targets it tries. Its attempts are
/// [`Attempt`]s; the first came with it from [`Coordinator::admit_request`], the others come
/// from [`Coordinator::admit_attempt`].
#[must_use = "a request holds its feature's bulkhead permit until it is dropped"]
#[derive(Debug)]
pub struct Request {
    /// The first admission, with its breaker part handed to the first [`Attempt`]: dropping it
    /// only releases the feature permit.
    permit: Permit,
}

impl Request {
    /// The feature it was admitted for.
    pub fn feature(&self) -> &str {
        self.permit.feature()
    }

    /// Whether it was admitted on this replica's local state (store unavailable).
    pub fn is_local(&self) -> bool {
        self.permit.is_local()
    }

    /// Whether its bulkhead lease was lost while it ran (see [`Permit::lease_lost`]).
    pub fn lease_lost(&self) -> bool {
        self.permit.lease_lost()
    }

    /// Runs `fut` while keeping the request's bulkhead lease alive (no task spawned; nothing
    /// at all for work that ends before the first heartbeat is due).
    pub async fn guard<T>(&self, fut: impl Future<Output = T>) -> T {
        self.permit.guard(fut).await
    }

    /// Spawns a task that keeps the request's bulkhead lease alive until the handle is
    /// dropped (for an answer that goes on after the call returned, such as a stream); see
    /// [`Permit::keep_alive`].
    pub fn keep_alive(&self) -> super::Heartbeat {
        self.permit.keep_alive()
    }

    /// Ends the request: releases its permit (the same as dropping it). Does not wait.
    pub fn finish(self) {}

    pub(super) fn feature_rt(&self) -> &Arc<FeatureRt> {
        self.permit.feature_rt()
    }
}

/// One attempt of a [`Request`] at one target: that target's breaker admitted it (with a
/// probe slot in half-open). Report how it ended with [`Attempt::record`]; dropping it
/// unreported frees its probe slot and counts nothing. Never waits for the store.
#[must_use = "an attempt's outcome belongs to its target's breaker"]
pub struct Attempt {
    shared: Arc<Shared>,
    feature: Arc<FeatureRt>,
    target: Arc<TargetSpec>,
    call_id: String,
    generation: u64,
    probe: bool,
    location: Location,
    started: Instant,
    settled: bool,
}

impl std::fmt::Debug for Attempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attempt")
            .field("feature", &self.feature.spec.name)
            .field("target", &self.target.name)
            .field("generation", &self.generation)
            .field("probe", &self.probe)
            .field("local", &(self.location == Location::Local))
            .finish()
    }
}

impl Attempt {
    pub(super) fn new(
        shared: Arc<Shared>,
        feature: Arc<FeatureRt>,
        target: Arc<TargetSpec>,
        call_id: String,
        generation: u64,
        probe: bool,
        location: Location,
    ) -> Self {
        Attempt {
            shared,
            feature,
            target,
            call_id,
            generation,
            probe,
            location,
            started: Instant::now(),
            settled: false,
        }
    }

    /// The target it was admitted for.
    pub fn target(&self) -> &str {
        &self.target.name
    }

    /// Whether it holds one of the target's half-open probe slots.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// The breaker generation it was admitted under.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Reports how the attempt ended to its target's breaker (and frees its probe slot).
    pub fn record(mut self, outcome: CallOutcome) {
        self.settle(outcome);
    }

    fn settle(&mut self, outcome: CallOutcome) {
        if std::mem::replace(&mut self.settled, true) {
            return;
        }
        let tiered = &self.shared.tiered;
        let feature = match self.location {
            Location::Shared => Arc::clone(&self.feature.spec),
            Location::Local => self.feature.local(),
        };
        let settle = Settle {
            target: Arc::clone(&self.target),
            feature,
            call_id: std::mem::take(&mut self.call_id),
            generation: self.generation,
            probe: self.probe,
            permit: false,
            refund_rate: false,
            outcome,
            elapsed_ms: self.started.elapsed().as_millis() as u64,
        };
        if self.location == Location::Local || tiered.remote.is_none() {
            for t in tiered.local.settle_now(std::slice::from_ref(&settle)) {
                self.shared.emit(Event::Transition(t));
            }
        } else {
            tiered.enqueue(settle, false);
        }
    }
}

impl Drop for Attempt {
    fn drop(&mut self) {
        self.settle(CallOutcome::Ignored);
    }
}

impl Coordinator {
    /// Admits a request of `feature` with its first attempt at `target`: the feature's
    /// bulkhead permit and rate slot (waiting up to its `max_wait`, as [`Self::admit`]) and
    /// the target's breaker, in one store call. Refused at once, without asking the store,
    /// while this replica knows `target` is open (see [`Self::admit_attempt`]); a refusal by
    /// the target's breaker takes nothing of the feature, so the caller can try its next
    /// target with this method again.
    pub async fn admit_request(
        &self,
        feature: &str,
        target: &str,
    ) -> Result<(Request, Attempt), Error> {
        if let Some(r) = self.shared.skips.check(target) {
            let f = self.shared.feature(feature)?;
            return Err(self.refused(&f.spec.name, target, r));
        }
        let mut permit = self.admit(feature, target).await?;
        let attempt = permit.split_attempt();
        Ok((Request { permit }, attempt))
    }

    /// Admits one more attempt of `request` at `target`: that target's breaker only (a probe
    /// slot in half-open), in one store call; nothing more of the feature is taken.
    ///
    /// Once the store has said that `target` is open until T (or forced open, or not before
    /// T), this replica refuses it by itself, without a store call, until T or for at most
    /// about a second, whichever is first (so an operator's forced close is seen within
    /// about a second).
    pub async fn admit_attempt(&self, request: &Request, target: &str) -> Result<Attempt, Error> {
        let f = Arc::clone(request.feature_rt());
        let t = self.shared.target(target)?;
        if let Some(r) = self.shared.skips.check(target) {
            return Err(self.refused(&f.spec.name, target, r));
        }
        let call_id = self.shared.next_call_id();
        let tiered = &self.shared.tiered;
        let req = AdmitRequest {
            target: &t,
            feature: &f.spec,
            call_id: &call_id,
        };
        let (admission, call_id, location) =
            match tiered.remote(|store| store.admit_target(req)).await {
                Tried::Done(a) => {
                    if let Admission::Rejected {
                        rejection: Rejection::CircuitOpen { retry_after, .. },
                        ..
                    } = &a
                    {
                        let ms = retry_after.map(|d| d.as_millis() as u64);
                        self.shared.seed_open(&t.name, ms);
                    }
                    if let Admission::Rejected { rejection, .. } = &a {
                        // Only a shared store's answer is worth skipping round trips for.
                        self.shared.skips.learn(rejection);
                    }
                    (a, call_id, Location::Shared)
                }
                Tried::Embedded => (
                    tiered.local.admit_target_now(req),
                    call_id,
                    Location::Shared,
                ),
                tried @ (Tried::Failed(_) | Tried::Skipped) => {
                    if f.policy == StorePolicy::FailClosed {
                        let r = Rejection::StoreUnavailable {
                            feature: f.spec.name.clone(),
                        };
                        return Err(self.refused(&f.spec.name, target, r));
                    }
                    // A fresh id, as for a local grant after a failed remote admission.
                    let call_id = match tried {
                        Tried::Failed(_) => self.shared.next_call_id(),
                        _ => call_id,
                    };
                    let req = AdmitRequest {
                        target: &t,
                        feature: &f.spec,
                        call_id: &call_id,
                    };
                    (tiered.local.admit_target_now(req), call_id, Location::Local)
                }
            };
        match admission {
            Admission::Admitted(a) => {
                if let Some(tr) = a.transition {
                    self.shared.emit(Event::Transition(tr));
                }
                Ok(Attempt::new(
                    Arc::clone(&self.shared),
                    f,
                    t,
                    call_id,
                    a.generation,
                    a.probe,
                    location,
                ))
            }
            Admission::Rejected {
                rejection,
                transition,
            } => {
                if let Some(tr) = transition {
                    self.shared.emit(Event::Transition(tr));
                }
                Err(self.refused(&f.spec.name, target, rejection))
            }
        }
    }

    /// Reports a refusal and turns it into the error.
    fn refused(&self, feature: &str, target: &str, rejection: Rejection) -> Error {
        self.shared.emit(Event::Rejected {
            feature: feature.to_owned(),
            target: target.to_owned(),
            rejection: rejection.clone(),
        });
        Error::Rejected(rejection)
    }
}
