//! The guarded call: one call of a feature that ends in the best answer available: its
//! primary target, a fallback target, (later) a cached answer, or the feature's canned last
//! resort. See [`crate::Coordinator::guarded_call`].
//!
//! * One request holds **one** feature permit and rate slot for its whole life
//!   ([`crate::Request`]); each target attempt takes only that target's breaker admission
//!   ([`crate::Attempt`]).
//! * Targets whose breaker is open are skipped without an upstream call (and, while this
//!   replica knows they are open, without a store round trip).
//! * A failed attempt is routed by its [`Class`]: retryable -> the same target again while
//!   the [`Retry`] policy (the feature's `[retry]` backoff by default) and the target's
//!   fleet-wide retry budget allow, then the next; overloaded / rate limited
//!   -> the next target (its `retry-after` sets the target's fleet-wide "not before");
//!   context too large -> a later target with a larger `context_window`; final -> the end.
//! * An attempt starts only when its whole timeout fits before the call's deadline.
//! * A final error that is the request's or the caller's ends with the error, never the
//!   cached or canned answer (those are for availability failures).
//! * `stop_before` ends the chain with "retry later" instead of falling to a weaker model.
//! * After the chain: the degraded-response cache (with [`CacheUse`]: a fresh answer is
//!   stored in the background, and an earlier one served when the chain ends without an
//!   answer, except after a final error), then the canned answer, when the feature has one.

pub mod alert;
mod held;
pub(crate) mod metrics;
mod plan;
mod run;
#[cfg(feature = "tower")]
mod tower;

use std::time::Duration;

pub use self::held::Held;
pub use self::plan::ChainTarget;
pub(crate) use self::plan::Plan;
pub use self::run::{CacheUse, NoRetry, Retry};
#[cfg(feature = "tower")]
pub use self::tower::{Guarded, GuardedLayer, Routed};
pub use crate::classify::Class;

/// Which tier answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Tier {
    /// The chain's first target.
    Primary,
    /// A later target of the chain.
    Fallback,
    /// A cached earlier answer (the degraded-response cache).
    Cache,
    /// The feature's canned last resort.
    Canned,
}

impl Tier {
    /// A stable lower-case name (metrics, logs): `primary`, `fallback`, `cache`, `canned`.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Primary => "primary",
            Tier::Fallback => "fallback",
            Tier::Cache => "cache",
            Tier::Canned => "canned",
        }
    }
}

/// The answer's content.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Reply<T> {
    /// A target's own answer.
    Fresh(T),
    /// An earlier answer from the degraded-response cache (with its model, age and match).
    Cached(crate::cache::Cached),
    /// The feature's canned text, with when to try again.
    Canned {
        /// The configured text.
        text: String,
        /// When a new call could get a real answer: the best hint the chain learned (an open
        /// breaker's time left, an upstream's `retry-after`), else the configured one.
        retry_after: Option<Duration>,
    },
}

/// An answer and what answered it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Answered<T> {
    /// The answer.
    pub reply: Reply<T>,
    /// The target that answered (`None` for a canned answer).
    pub target: Option<String>,
    /// Its model.
    pub model: Option<String>,
    /// Which tier answered.
    pub tier: Tier,
    /// Attempts sent upstream (over all targets).
    pub attempts: u32,
    /// Not the primary's fresh answer: a fallback model, a cached or a canned answer.
    pub degraded: bool,
}

impl<T> Answered<T> {
    /// The target's own answer, if one answered.
    pub fn into_fresh(self) -> Option<T> {
        match self.reply {
            Reply::Fresh(v) => Some(v),
            Reply::Cached(_) | Reply::Canned { .. } => None,
        }
    }

    /// The age of a cached answer (`None` for every other tier).
    pub fn cache_age(&self) -> Option<Duration> {
        match &self.reply {
            Reply::Cached(c) => Some(c.age),
            Reply::Fresh(_) | Reply::Canned { .. } => None,
        }
    }
}
