//! Compensation: what an admission that will not be used gives back, decided in ONE place
//! ([`Compensation::give_back`]) from what it is known to have taken ([`Taken`]), and carried
//! out by ONE executor ([`Core::compensate`]).
//!
//! An admission goes unused when its caller stopped waiting (timed out, cancelled) after the
//! store granted it, when one part of a split admission refused while the other granted, or
//! when its script call failed after it may have run. The rule:
//!
//! * a probe slot or permit that was, or may have been, taken is given back (freeing and
//!   releasing are idempotent, so giving back what was never taken is harmless);
//! * a rate slot is refunded only when it was certainly taken (a refund is not safe to
//!   repeat, and refunding a slot never taken would let the fleet exceed its rate);
//! * a transition the admission made that no caller will see is reported through the
//!   transition sink (so that it is still reported once).

use std::sync::Arc;

use std::time::Duration;

use super::takeback::Work;
use super::Core;
use crate::breaker::Transition;
use crate::store::{Admission, Admitted, FeatureSpec, TargetSpec};
use crate::StoreError;

/// Whether (part of) an admission took one thing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Took {
    /// Certainly not.
    No,
    /// Certainly.
    Yes,
    /// Unknown: its script call failed after it may have run.
    Maybe,
}

impl Took {
    /// `Yes` or `No`.
    pub(super) fn when(b: bool) -> Took {
        if b {
            Took::Yes
        } else {
            Took::No
        }
    }
}

/// What an admission that will not be used took, as far as this replica knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Taken {
    pub(super) probe: Took,
    pub(super) permit: Took,
    pub(super) rate: Took,
}

impl Taken {
    /// Nothing.
    pub(super) const NOTHING: Taken = Taken {
        probe: Took::No,
        permit: Took::No,
        rate: Took::No,
    };

    /// A script call that failed with `e` (for both parts, or the part it ran): whatever it
    /// could take may have been taken, unless Redis refused to run it.
    pub(super) fn failed(e: &StoreError) -> Taken {
        if may_have_run(e) {
            Taken {
                probe: Took::Maybe,
                permit: Took::Maybe,
                rate: Took::Maybe,
            }
        } else {
            Taken::NOTHING
        }
    }

    /// Everything that admission granted (the store's answer was `Admitted`): its probe slot
    /// and permit if it holds them, and its rate slot.
    pub(super) fn granted(a: &Admitted) -> Taken {
        Taken {
            probe: Took::when(a.probe),
            permit: Took::when(a.permit),
            rate: Took::Yes,
        }
    }

    /// What a store answer that will not be used took: an admission (and the transition it
    /// made), a refusal (only its transition), or an error (nothing: compensated where it
    /// was made).
    pub(super) fn of_answer(answer: &Result<Admission, StoreError>) -> (Taken, Option<Transition>) {
        match answer {
            Ok(Admission::Admitted(a)) => (Taken::granted(a), a.transition.clone()),
            Ok(Admission::Rejected { transition, .. }) => (Taken::NOTHING, transition.clone()),
            Err(_) => (Taken::NOTHING, None),
        }
    }

    /// The breaker part of a split admission (only the probe slot is its to take).
    pub(super) fn breaker_part(self) -> Taken {
        Taken {
            permit: Took::No,
            rate: Took::No,
            ..self
        }
    }

    /// The feature part of a split admission (permit and rate slot).
    pub(super) fn feature_part(self) -> Taken {
        Taken {
            probe: Took::No,
            ..self
        }
    }

    /// Both parts of a split admission.
    pub(super) fn and(self, other: Taken) -> Taken {
        let or = |a: Took, b: Took| match (a, b) {
            (Took::Yes, _) | (_, Took::Yes) => Took::Yes,
            (Took::Maybe, _) | (_, Took::Maybe) => Took::Maybe,
            _ => Took::No,
        };
        Taken {
            probe: or(self.probe, other.probe),
            permit: or(self.permit, other.permit),
            rate: or(self.rate, other.rate),
        }
    }
}

/// What an unused admission gives back. Data: decided by [`Compensation::give_back`],
/// carried out by [`Core::compensate`].
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Compensation {
    /// Free the call's probe slot (idempotent).
    pub(super) free_probe: bool,
    /// Release the call's permit (idempotent).
    pub(super) release_permit: bool,
    /// Refund one rate slot (NOT idempotent: only for a slot certainly taken).
    pub(super) refund_rate: bool,
    /// A transition no caller will see: reported through the transition sink.
    pub(super) transition: Option<Transition>,
}

impl Compensation {
    /// THE decision: what an admission that took `taken` and will not be used gives back.
    pub(super) fn give_back(taken: Taken, transition: Option<Transition>) -> Compensation {
        Compensation {
            free_probe: taken.probe != Took::No,
            release_permit: taken.permit != Took::No,
            refund_rate: taken.rate == Took::Yes,
            transition,
        }
    }

    /// Whether there is nothing to do.
    pub(super) fn is_empty(&self) -> bool {
        !self.free_probe && !self.release_permit && !self.refund_rate && self.transition.is_none()
    }
}

impl Core {
    /// THE executor: carries out `c` for call `call_id` of `target` / `feature` in the
    /// background: the transition is reported at once; the probe slot and permit are given
    /// back by take-backs that are retried until delivered or their lease has passed
    /// (`takeback.rs`); a refund is tried once.
    pub(super) fn compensate(
        self: &Arc<Self>,
        target: &TargetSpec,
        feature: &FeatureSpec,
        call_id: &str,
        c: Compensation,
    ) {
        if let Some(t) = &c.transition {
            self.lost_transition(t);
        }
        if c.free_probe {
            let lease = Duration::from_millis(target.params.probe_timeout_ms);
            let work = Work::FreeProbe(Arc::new(target.clone()));
            self.take_back(work, call_id, lease);
        }
        let refund = c.refund_rate && feature.rate.is_some_and(|r| r.emission_us > 0);
        let permit = c.release_permit && feature.bulkhead.is_some();
        if permit || refund {
            let lease = Duration::from_millis(feature.bulkhead.map_or(0, |b| b.lease_ms));
            let work = Work::Release {
                feature: Arc::new(feature.clone()),
                permit,
                refund,
            };
            self.take_back(work, call_id, lease);
        }
    }
}

/// Whether a failed script call may nevertheless have run (and changed state).
pub(super) fn may_have_run(e: &StoreError) -> bool {
    !matches!(e, StoreError::Command(_))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certain_grant_is_given_back_whole() {
        let c = Compensation::give_back(
            Taken::granted(&Admitted {
                generation: 3,
                probe: true,
                permit: true,
                transition: None,
            }),
            None,
        );
        assert!(c.free_probe && c.release_permit && c.refund_rate);
    }

    #[test]
    fn a_maybe_is_released_but_never_refunded() {
        let c = Compensation::give_back(
            Taken::failed(&StoreError::Timeout(Default::default())),
            None,
        );
        assert!(c.free_probe && c.release_permit && !c.refund_rate);
        let c = Compensation::give_back(Taken::failed(&StoreError::Command("x".into())), None);
        assert!(c.is_empty());
    }

    #[test]
    fn split_parts_combine() {
        let breaker = Taken::granted(&Admitted {
            generation: 0,
            probe: true,
            permit: false,
            transition: None,
        })
        .breaker_part();
        let feature = Taken::failed(&StoreError::Timeout(Default::default())).feature_part();
        let c = Compensation::give_back(breaker.and(feature), None);
        assert_eq!(
            (c.free_probe, c.release_permit, c.refund_rate),
            (true, true, false)
        );
    }
}
