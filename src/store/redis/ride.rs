//! Settles riding with an admission: `settle_admit.lua`, built at compile time from the
//! unchanged texts of `settle.lua`, `release.lua` and `admit.lua` (each wrapped in a function
//! whose parameters are named KEYS and ARGV) followed by the driver `settle_admit.lua`. One
//! source per rule, one script call per admission, and no way for the settle to be overtaken
//! by the admission it precedes (a pipelined "settle, then admit" can be reordered when
//! redis-rs re-sends a script after NOSCRIPT; one script cannot).

use std::sync::LazyLock;

use redis::{Script, ScriptInvocation, Value};

use super::reply;
use super::scripts::{self, AdmitMode, Outcome, Release};
use super::settle::group;
use crate::breaker::Transition;
use crate::store::{FeatureSpec, Settle, TargetSpec};
use crate::StoreError;

/// The text Redis runs (see the module docs).
macro_rules! settle_admit_text {
    () => {
        concat!(
            "local settle_part = function(KEYS, ARGV)\n",
            include_str!("../../../lua/settle.lua"),
            "\nend\nlocal release_part = function(KEYS, ARGV)\n",
            include_str!("../../../lua/release.lua"),
            "\nend\nlocal admit_part = function(KEYS, ARGV)\n",
            include_str!("../../../lua/admit.lua"),
            "\nend\n",
            include_str!("../../../lua/settle_admit.lua")
        )
    };
}

/// The combined script's text (also for tests that run it on a clock of their own).
pub(super) const TEXT: &str = settle_admit_text!();

pub(super) static SETTLE_ADMIT: LazyLock<Script> = LazyLock::new(|| Script::new(TEXT));

/// What rides with one admission call: the target's queued outcomes and / or the feature's
/// queued releases, as taken from the settle queue.
#[derive(Default)]
pub(super) struct Riding {
    pub(super) settles: Vec<Settle>,
}

impl Riding {
    pub(super) fn is_empty(&self) -> bool {
        self.settles.is_empty()
    }
}

/// `settle_admit.lua` (or plain `admit.lua` when nothing rides) for `call_ids` in `mode`.
pub(super) fn invocation<S: AsRef<str>>(
    script: &'static Script,
    mode: AdmitMode,
    target: &TargetSpec,
    feature: &FeatureSpec,
    call_ids: impl IntoIterator<Item = S>,
    riding: &Riding,
) -> ScriptInvocation<'static> {
    let (targets, features) = group(&riding.settles);
    // An admission takes only its own target's outcomes and its own feature's releases.
    let outcomes: &[Outcome] = targets.first().map_or(&[], |(_, o)| o.as_slice());
    let release = features.first().map(|g| Release {
        keys: &g.feature.keys,
        emission_us: g.feature.rate.map_or(0, |r| r.emission_us),
        refunds: g.refunds,
        permit_ids: g.ids.as_slice(),
    });
    let what = match (outcomes.is_empty(), &release, mode) {
        (false, Some(_), AdmitMode::Both) => "settle+release",
        (false, _, AdmitMode::Both | AdmitMode::Breaker) => "settle",
        (_, Some(_), AdmitMode::Both | AdmitMode::Feature) => "release",
        _ => "none",
    };
    let mut inv = script.prepare_invoke();
    if mode != AdmitMode::Feature {
        inv.key(&target.keys.breaker).key(&target.keys.probes);
    }
    if mode != AdmitMode::Breaker {
        inv.key(&feature.keys.rate).key(&feature.keys.permits);
    }
    inv.arg(what);
    match what {
        "settle" | "settle+release" => {
            let release = if what == "settle+release" {
                release
            } else {
                None
            };
            let n =
                13 + 5 * outcomes.len() + release.as_ref().map_or(0, |r| 2 + r.permit_ids.len());
            inv.arg(n);
            scripts::push_settle_args(&mut inv, &target.params, outcomes, release);
        }
        "release" => {
            if let Some(r) = release {
                inv.arg(2 + r.permit_ids.len());
                inv.arg(r.emission_us).arg(r.refunds);
                for id in r.permit_ids {
                    inv.arg(*id);
                }
            }
        }
        _ => {
            inv.arg(0);
        }
    }
    scripts::push_admit_args(&mut inv, mode, &target.params, feature, call_ids);
    inv
}

/// A `settle_admit.lua` reply: the admission part (admit.lua's reply, or the error it
/// raised) and the transitions of the riding part (empty for releases only).
pub(super) fn parse(
    v: Value,
    target: &str,
) -> Result<(Result<Value, StoreError>, Vec<Transition>), StoreError> {
    const WHAT: &str = "settle_admit.lua";
    let mut items = reply::array(v, WHAT)?.into_iter();
    let (Some(admission), Some(settled), None) = (items.next(), items.next(), items.next()) else {
        return Err(StoreError::Reply(format!("{WHAT}: expected two elements")));
    };
    let admission = match admission {
        Value::BulkString(b) => Err(StoreError::Command(format!(
            "admit.lua: {}",
            String::from_utf8_lossy(&b)
        ))),
        Value::SimpleString(s) => Err(StoreError::Command(format!("admit.lua: {s}"))),
        other => Ok(other),
    };
    let transitions = match settled {
        Value::Int(_) => Vec::new(),
        v => {
            let (v, release_error) = reply::split_release_error(v);
            if let Some(e) = release_error {
                tracing::warn!(
                    error = %e,
                    "fusebox: a permit release failed; the permit will end with its lease"
                );
            }
            reply::transitions(v, target, "settle.lua")?
        }
    };
    Ok((admission, transitions))
}
