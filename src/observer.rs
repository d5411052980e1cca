//! Observer hook: transitions, rejections and store degradation, as they happen.
//!
//! Every event is also emitted as a `tracing` event under the `fusebox` target with stable
//! field names (see README, "Observability").

use crate::breaker::Transition;
use crate::{Rejection, StoreError};

/// Something worth telling operators about.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// A breaker changed state. Reported once, by the replica whose call made the change.
    Transition(Transition),
    /// A call was refused.
    Rejected {
        /// The call's feature.
        feature: String,
        /// The call's target.
        target: String,
        /// Why.
        rejection: Rejection,
    },
    /// The shared store stopped answering; this replica runs on local state.
    StoreDegraded {
        /// The failure that tipped it.
        error: StoreError,
    },
    /// The shared store answers again; this replica is back on shared state.
    StoreRecovered,
    /// A call's bulkhead permit lease ran out while the call was still running (no heartbeat
    /// got through in time, or the store had already reclaimed it): another call may hold
    /// its slot. The holder sees it on [`crate::Permit::lease_lost`].
    LeaseLost {
        /// The call's feature.
        feature: String,
        /// The call's target.
        target: String,
    },
    /// A guarded call ([`crate::Coordinator::guarded_call`]) answered.
    Answered {
        /// The call's feature.
        feature: String,
        /// Which tier answered.
        tier: crate::pipeline::Tier,
        /// The target that answered (`None`: not a target).
        target: Option<String>,
        /// Attempts sent upstream.
        attempts: u32,
    },
    /// Outcomes or rate refunds could not be delivered to the store and were dropped. (A
    /// permit release that could not reach the store is retried until its lease has passed,
    /// and permits come back when their lease ends in any case.)
    SettleDropped {
        /// How many.
        count: usize,
        /// Why.
        error: StoreError,
    },
    /// A degraded-response cache read or write failed or was skipped (the shared store is
    /// down or answered with something unusable): the read was a miss, the write dropped.
    CacheFailed {
        /// The feature.
        feature: String,
        /// `get` or `put`.
        op: &'static str,
        /// Why ([`StoreError::Unavailable`] when the store was not asked).
        error: StoreError,
    },
    /// The fleet health signal: more than `[fallback_alert] threshold` of `feature`'s
    /// answered guarded calls over the window, fleet-wide, were not answered by its primary
    /// target. Fires once per episode fleet-wide (on the replica whose counts tipped it).
    FallbackAlert {
        /// The feature.
        feature: String,
        /// Answered calls in the window.
        calls: u64,
        /// Those not answered by the primary.
        fallbacks: u64,
    },
    /// The episode of a [`Event::FallbackAlert`] ended: the rate is back at or below the
    /// threshold (once fleet-wide).
    FallbackRecovered {
        /// The feature.
        feature: String,
        /// Answered calls in the window.
        calls: u64,
        /// Those not answered by the primary.
        fallbacks: u64,
    },
    /// A retry was not sent because the target's retry budget is spent (the call falls
    /// through to its next tier).
    RetryBudgetSpent {
        /// The target.
        target: String,
        /// Which store decided ([`crate::Source::Local`]: this replica alone).
        source: crate::Source,
    },
}

/// Receives [`Event`]s. The default for `()` does nothing. Called inline on the hot path:
/// keep it quick (count, or hand off to a channel).
pub trait Observer: Send + Sync + 'static {
    /// One event.
    fn on_event(&self, event: &Event) {
        let _ = event;
    }
}

impl Observer for () {}

pub(crate) fn trace(event: &Event) {
    match event {
        Event::Transition(t) => tracing::info!(
            target: "fusebox",
            event = "transition",
            breaker.target = %t.target,
            from = t.from.as_str(),
            to = t.to.as_str(),
            generation = t.generation,
            reason = t.reason.as_str(),
            "circuit {} -> {}", t.from, t.to
        ),
        Event::Rejected {
            feature,
            target,
            rejection,
        } => tracing::debug!(
            target: "fusebox",
            event = "rejected",
            feature = %feature,
            breaker.target = %target,
            kind = rejection.kind(),
            retry_after_ms = rejection.retry_after().map(|d| d.as_millis() as u64),
            "call rejected"
        ),
        Event::StoreDegraded { error } => tracing::warn!(
            target: "fusebox",
            event = "store_degraded",
            degraded = true,
            error = %error,
            "shared store unavailable: running on local state"
        ),
        Event::Answered {
            feature,
            tier,
            target,
            attempts,
        } => tracing::debug!(
            target: "fusebox",
            event = "answered",
            feature = %feature,
            tier = ?tier,
            breaker.target = target.as_deref().unwrap_or(""),
            attempts = *attempts,
            "guarded call answered"
        ),
        Event::StoreRecovered => tracing::info!(
            target: "fusebox",
            event = "store_recovered",
            degraded = false,
            "shared store reachable again"
        ),
        Event::LeaseLost { feature, target } => tracing::warn!(
            target: "fusebox",
            event = "lease_lost",
            feature = %feature,
            breaker.target = %target,
            "bulkhead permit lease lost while the call ran"
        ),
        Event::SettleDropped { count, error } => tracing::warn!(
            target: "fusebox",
            event = "settle_dropped",
            count = *count,
            error = %error,
            "outcomes not delivered to the store"
        ),
        Event::CacheFailed { feature, op, error } => tracing::debug!(
            target: "fusebox",
            event = "cache_failed",
            feature = %feature,
            op = *op,
            error = %error,
            "degraded-response cache {op} failed"
        ),
        Event::RetryBudgetSpent { target, source } => tracing::debug!(
            target: "fusebox",
            event = "retry_budget_spent",
            breaker.target = %target,
            source = ?source,
            "retry budget spent: retry not sent"
        ),
        Event::FallbackAlert {
            feature,
            calls,
            fallbacks,
        } => tracing::warn!(
            target: "fusebox",
            event = "fallback_alert",
            feature = %feature,
            calls = *calls,
            fallbacks = *fallbacks,
            "fleet fallback rate over the threshold"
        ),
        Event::FallbackRecovered {
            feature,
            calls,
            fallbacks,
        } => tracing::info!(
            target: "fusebox",
            event = "fallback_recovered",
            feature = %feature,
            calls = *calls,
            fallbacks = *fallbacks,
            "fleet fallback rate back under the threshold"
        ),
    }
}
