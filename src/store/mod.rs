//! The store seam: whole operations on shared state, with two implementations of the same
//! semantics: [`MemoryStore`] (in-process) and [`RedisStore`] (one Lua script per operation).
//!
//! An operation is the unit of atomicity: `admit` checks breaker + rate limit + bulkhead and
//! commits all of them or none; `settle` records outcomes and releases permits. There is no
//! get/compare/set here, because a compare-and-swap closure cannot run inside Redis.

pub mod memory;
pub mod redis;

use std::future::Future;
use std::sync::Arc;

pub use self::memory::MemoryStore;
pub use self::redis::{RedisStore, TransitionSink};

use crate::breaker::{BreakerParams, BreakerSnapshot, CallOutcome, Force, Transition};
use crate::bulkhead::BulkheadParams;
use crate::keys::{FeatureKeys, TargetKeys};
use crate::ratelimit::RateParams;
use crate::{Rejection, StoreError};

/// A target (model or endpoint) as the store sees it: name, keys and breaker parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetSpec {
    /// The target's name.
    pub name: String,
    /// Its Redis keys.
    pub keys: TargetKeys,
    /// Its breaker parameters.
    pub params: BreakerParams,
}

/// A feature as the store sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureSpec {
    /// The feature's name.
    pub name: String,
    /// Its Redis keys.
    pub keys: FeatureKeys,
    /// Its bulkhead, if any.
    pub bulkhead: Option<BulkheadParams>,
    /// Its rate limit, if any.
    pub rate: Option<RateParams>,
}

/// One call asking to be let through.
#[derive(Debug, Clone, Copy)]
pub struct AdmitRequest<'a> {
    /// The target the call goes to.
    pub target: &'a TargetSpec,
    /// The feature the call belongs to.
    pub feature: &'a FeatureSpec,
    /// A fleet-unique id for this call: its bulkhead permit id and probe id.
    pub call_id: &'a str,
}

/// A call that was let through.
#[derive(Debug, Clone, PartialEq)]
pub struct Admitted {
    /// Breaker generation the call was admitted under (its outcome counts only while the
    /// breaker is still in this generation).
    pub generation: u64,
    /// Whether the call holds one of the half-open probe slots.
    pub probe: bool,
    /// Whether the call holds a bulkhead permit (`call_id`).
    pub permit: bool,
    /// A transition this admission made (open -> half-open when the open time was up).
    pub transition: Option<Transition>,
}

/// The store's answer to [`Store::admit`].
#[derive(Debug, Clone, PartialEq)]
pub enum Admission {
    /// Let through; nothing else to do until [`Store::settle`].
    Admitted(Admitted),
    /// Refused; nothing was taken.
    Rejected {
        /// Why.
        rejection: Rejection,
        /// A transition the attempt made anyway (open -> half-open).
        transition: Option<Transition>,
    },
}

/// The end of one admitted call: its outcome for the breaker and the release of what it held.
#[derive(Debug, Clone)]
pub struct Settle {
    /// The target it went to.
    pub target: Arc<TargetSpec>,
    /// Its feature.
    pub feature: Arc<FeatureSpec>,
    /// Its call id (permit and probe id).
    pub call_id: String,
    /// The generation it was admitted under.
    pub generation: u64,
    /// Whether it held a probe slot (freed here).
    pub probe: bool,
    /// Whether it held a bulkhead permit (released here; releasing twice is harmless).
    pub permit: bool,
    /// Give back its rate-limit slot (compensation for a call that never ran).
    pub refund_rate: bool,
    /// How it ended.
    pub outcome: CallOutcome,
    /// How long it took, in ms (for the slow-call rule).
    pub elapsed_ms: u64,
}

/// Shared state operations. Both implementations keep the same semantics; the conformance
/// suite (`tests/conformance.rs`) holds them to it.
pub trait Store: Send + Sync + 'static {
    /// Checks breaker, rate limit and bulkhead for one call and takes what it needs (probe
    /// slot, rate slot, permit) atomically: all or nothing.
    fn admit(
        &self,
        req: AdmitRequest<'_>,
    ) -> impl Future<Output = Result<Admission, StoreError>> + Send;

    /// Checks only the target's breaker for one more attempt of a call that already holds
    /// its feature's permit and rate slot (taken by an earlier [`Store::admit`]), and takes a
    /// half-open probe slot under `call_id` when it needs one. Nothing of the feature is read
    /// or taken (`req.feature` only names the call); an admitted answer has `permit: false`.
    fn admit_target(
        &self,
        req: AdmitRequest<'_>,
    ) -> impl Future<Output = Result<Admission, StoreError>> + Send;

    /// Records outcomes (in order) and releases permits. Returns the transitions these
    /// outcomes caused, each exactly once.
    fn settle(
        &self,
        items: &[Settle],
    ) -> impl Future<Output = Result<Vec<Transition>, StoreError>> + Send;

    /// Extends a held permit's lease to now + lease. `false`: the permit is gone (expired
    /// and reclaimed, or released).
    fn heartbeat(
        &self,
        feature: &FeatureSpec,
        call_id: &str,
    ) -> impl Future<Output = Result<bool, StoreError>> + Send;

    /// Sets the target's fleet-wide "not before" instant to now + `retry_after_ms`, unless a
    /// later one is already set. Not a breaker failure.
    fn set_not_before(
        &self,
        target: &TargetSpec,
        retry_after_ms: u64,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// An operator command on the target's breaker.
    fn force(
        &self,
        target: &TargetSpec,
        cmd: Force,
    ) -> impl Future<Output = Result<Option<Transition>, StoreError>> + Send;

    /// The target's breaker as it stands.
    fn snapshot(
        &self,
        target: &TargetSpec,
    ) -> impl Future<Output = Result<BreakerSnapshot, StoreError>> + Send;

    /// Bulkhead permits held and unexpired for the feature.
    fn in_flight(
        &self,
        feature: &FeatureSpec,
    ) -> impl Future<Output = Result<u32, StoreError>> + Send;
}
