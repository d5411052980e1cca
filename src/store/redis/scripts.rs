//! The Lua scripts (`lua/*.lua`) and the argument layouts they expect. Keys are passed only
//! through KEYS. The hot-path scripts (`admit.lua`, `settle.lua`, `release.lua`) are
//! self-contained; the others are prefixed with the shared prelude `lua/lib.lua`.

use std::sync::LazyLock;

use redis::{Script, ScriptInvocation};

use crate::breaker::{BreakerParams, Force};
use crate::keys::{FeatureKeys, TargetKeys};
use crate::store::FeatureSpec;

/// A script run after the `lib.lua` prelude.
macro_rules! script {
    ($file:literal) => {
        LazyLock::new(|| {
            Script::new(concat!(
                include_str!("../../../lua/lib.lua"),
                "\n",
                include_str!(concat!("../../../lua/", $file))
            ))
        })
    };
}

/// A self-contained script (no prelude).
macro_rules! standalone_script {
    ($file:literal) => {
        LazyLock::new(|| Script::new(include_str!(concat!("../../../lua/", $file))))
    };
}

pub(super) static ADMIT: LazyLock<Script> = standalone_script!("admit.lua");
pub(super) static SETTLE: LazyLock<Script> = standalone_script!("settle.lua");
pub(super) static RELEASE: LazyLock<Script> = standalone_script!("release.lua");
pub(super) static HEARTBEAT: LazyLock<Script> = script!("heartbeat.lua");
pub(super) static NOT_BEFORE: LazyLock<Script> = script!("not_before.lua");
pub(super) static FORCE: LazyLock<Script> = script!("force.lua");
pub(super) static SNAPSHOT: LazyLock<Script> = script!("snapshot.lua");
pub(super) static IN_FLIGHT: LazyLock<Script> = script!("in_flight.lua");

/// Every script, to load on connect and after a reconnect.
pub(super) fn all() -> [&'static Script; 15] {
    [
        &ADMIT,
        &super::ride::SETTLE_ADMIT,
        &SETTLE,
        &RELEASE,
        &HEARTBEAT,
        &NOT_BEFORE,
        &FORCE,
        &SNAPSHOT,
        &IN_FLIGHT,
        &super::membership::MEMBER,
        &super::membership::MEMBERS,
        &super::reconcile::ADOPT,
        &super::budget::DEPOSIT,
        &super::budget::WITHDRAW,
        &super::alert::FALLBACK_RATE,
    ]
}

/// Which part of admission one `admit.lua` call runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum AdmitMode {
    /// Breaker, rate and bulkhead in one call (single node).
    Both,
    /// The target's breaker only (its own hash tag).
    Breaker,
    /// The feature's rate limit and bulkhead only (its own hash tag).
    Feature,
}

impl AdmitMode {
    fn as_str(self) -> &'static str {
        match self {
            AdmitMode::Both => "both",
            AdmitMode::Breaker => "breaker",
            AdmitMode::Feature => "feature",
        }
    }
}

/// `admit.lua` with its keys and arguments: `call_ids` (at least one) are decided in order,
/// as that many admissions one after the other.
pub(super) fn admit<S: AsRef<str>>(
    mode: AdmitMode,
    target: (&TargetKeys, &BreakerParams),
    feature: &FeatureSpec,
    call_ids: impl IntoIterator<Item = S>,
) -> ScriptInvocation<'static> {
    admit_with(&ADMIT, mode, target, feature, call_ids)
}

/// [`admit`] of another text of the script (tests run it on a clock of their own).
pub(super) fn admit_with<S: AsRef<str>>(
    script: &'static Script,
    mode: AdmitMode,
    target: (&TargetKeys, &BreakerParams),
    feature: &FeatureSpec,
    call_ids: impl IntoIterator<Item = S>,
) -> ScriptInvocation<'static> {
    let (keys, p) = target;
    let mut inv = script.prepare_invoke();
    if mode != AdmitMode::Feature {
        inv.key(&keys.breaker).key(&keys.probes);
    }
    if mode != AdmitMode::Breaker {
        inv.key(&feature.keys.rate).key(&feature.keys.permits);
    }
    push_admit_args(&mut inv, mode, p, feature, call_ids);
    inv
}

/// `admit.lua`'s ARGV (also the tail of `settle_admit.lua`'s).
pub(super) fn push_admit_args<S: AsRef<str>>(
    inv: &mut ScriptInvocation<'static>,
    mode: AdmitMode,
    p: &BreakerParams,
    feature: &FeatureSpec,
    call_ids: impl IntoIterator<Item = S>,
) {
    let (emission_us, burst) = feature.rate.map_or((0, 0), |r| (r.emission_us, r.burst));
    let (limit, lease_ms) = feature.bulkhead.map_or((0, 0), |b| (b.limit, b.lease_ms));
    inv.arg(mode.as_str())
        .arg(p.half_open_probes)
        .arg(p.probe_timeout_ms)
        .arg(p.idle_ttl_ms)
        .arg(emission_us)
        .arg(burst)
        .arg(limit)
        .arg(lease_ms);
    for id in call_ids {
        inv.arg(id.as_ref());
    }
}

/// One entry for `settle.lua`: `count` identical outcomes in a row.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Outcome {
    pub(super) generation: u64,
    pub(super) code: u8,
    pub(super) elapsed_ms: u64,
    /// Empty when the call held no probe slot.
    pub(super) probe_id: String,
    /// How many outcomes this entry stands for (at least 1).
    pub(super) count: u32,
}

/// The 12 breaker parameters in the order `settle.lua` reads them (ARGV[1..12]).
fn push_params(inv: &mut ScriptInvocation<'static>, p: &BreakerParams) {
    inv.arg(p.consecutive_failures)
        .arg(p.failure_rate_pct.to_string())
        .arg(p.minimum_calls)
        .arg(p.bucket_ms)
        .arg(p.buckets)
        .arg(p.slow_call_ms)
        .arg(p.slow_call_rate_pct.to_string())
        .arg(p.open_ms)
        .arg(p.open_multiplier.to_string())
        .arg(p.max_open_ms)
        .arg(p.half_open_successes)
        .arg(p.idle_ttl_ms);
}

/// `settle.lua` for one target and a run of its entries (in order).
pub(super) fn settle(
    keys: &TargetKeys,
    p: &BreakerParams,
    outcomes: &[Outcome],
) -> ScriptInvocation<'static> {
    settle_with(&SETTLE, keys, p, outcomes, None::<Release<'_, &str>>)
}

/// What `settle.lua` also releases for one feature (single node only: other hash tags).
#[derive(Debug, Clone, Copy)]
pub(super) struct Release<'a, S> {
    pub(super) keys: &'a FeatureKeys,
    pub(super) emission_us: u64,
    pub(super) refunds: usize,
    pub(super) permit_ids: &'a [S],
}

/// [`settle`] of another text of the script, with release.lua's work for one feature.
pub(super) fn settle_with<S: AsRef<str>>(
    script: &'static Script,
    keys: &TargetKeys,
    p: &BreakerParams,
    outcomes: &[Outcome],
    release: Option<Release<'_, S>>,
) -> ScriptInvocation<'static> {
    let mut inv = script.prepare_invoke();
    inv.key(&keys.breaker).key(&keys.probes);
    if let Some(r) = &release {
        inv.key(&r.keys.rate).key(&r.keys.permits);
    }
    push_settle_args(&mut inv, p, outcomes, release);
    inv
}

/// `settle.lua`'s ARGV (13 + 5 per entry, + 2 + ids with a release).
pub(super) fn push_settle_args<S: AsRef<str>>(
    inv: &mut ScriptInvocation<'static>,
    p: &BreakerParams,
    outcomes: &[Outcome],
    release: Option<Release<'_, S>>,
) {
    push_params(inv, p);
    inv.arg(outcomes.len());
    for o in outcomes {
        inv.arg(o.generation)
            .arg(o.code)
            .arg(o.elapsed_ms)
            .arg(o.probe_id.as_str())
            .arg(o.count);
    }
    if let Some(r) = release {
        inv.arg(r.emission_us).arg(r.refunds);
        for id in r.permit_ids {
            inv.arg(id.as_ref());
        }
    }
}

/// `settle.lua` for one target's entries and one feature's releases (single node).
pub(super) fn settle_and_release<S: AsRef<str>>(
    keys: &TargetKeys,
    p: &BreakerParams,
    outcomes: &[Outcome],
    release: Release<'_, S>,
) -> ScriptInvocation<'static> {
    settle_with(&SETTLE, keys, p, outcomes, Some(release))
}

/// `release.lua` for one feature: permit ids to release, rate slots to refund.
pub(super) fn release<S: AsRef<str>>(
    keys: &FeatureKeys,
    emission_us: u64,
    refunds: usize,
    permit_ids: &[S],
) -> ScriptInvocation<'static> {
    release_with(&RELEASE, keys, emission_us, refunds, permit_ids)
}

/// [`release`] of another text of the script.
pub(super) fn release_with<S: AsRef<str>>(
    script: &'static Script,
    keys: &FeatureKeys,
    emission_us: u64,
    refunds: usize,
    permit_ids: &[S],
) -> ScriptInvocation<'static> {
    let mut inv = script.prepare_invoke();
    inv.key(&keys.rate).key(&keys.permits);
    inv.arg(emission_us).arg(refunds);
    for id in permit_ids {
        inv.arg(id.as_ref());
    }
    inv
}

/// `heartbeat.lua`.
pub(super) fn heartbeat(
    keys: &FeatureKeys,
    call_id: &str,
    lease_ms: u64,
) -> ScriptInvocation<'static> {
    let mut inv = HEARTBEAT.prepare_invoke();
    inv.key(&keys.permits).arg(call_id).arg(lease_ms);
    inv
}

/// `not_before.lua`.
pub(super) fn not_before(
    keys: &TargetKeys,
    retry_after_ms: u64,
    idle_ttl_ms: u64,
) -> ScriptInvocation<'static> {
    let mut inv = NOT_BEFORE.prepare_invoke();
    inv.key(&keys.breaker).arg(retry_after_ms).arg(idle_ttl_ms);
    inv
}

/// `force.lua`.
pub(super) fn force(keys: &TargetKeys, cmd: Force, idle_ttl_ms: u64) -> ScriptInvocation<'static> {
    let mut inv = FORCE.prepare_invoke();
    inv.key(&keys.breaker)
        .key(&keys.probes)
        .arg(cmd.code())
        .arg(idle_ttl_ms);
    inv
}

/// `snapshot.lua`.
pub(super) fn snapshot(keys: &TargetKeys) -> ScriptInvocation<'static> {
    let mut inv = SNAPSHOT.prepare_invoke();
    inv.key(&keys.breaker).key(&keys.probes);
    inv
}

/// `in_flight.lua`.
pub(super) fn in_flight(keys: &FeatureKeys) -> ScriptInvocation<'static> {
    let mut inv = IN_FLIGHT.prepare_invoke();
    inv.key(&keys.permits);
    inv
}
