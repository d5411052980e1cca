//! Breaker-only admission of one attempt ([`Store::admit_target`](crate::store::Store)): a
//! call that already holds its feature's permit and rate slot tries another target. One
//! `admit.lua` call in `breaker` mode (keys under the target's hash tag only, so it runs on
//! Cluster as one call), carrying the target's queued outcomes as a batched admission does,
//! so this replica's own failures are seen before the decision. Not batched: a fallback is
//! rare next to first attempts, and its caller waits for one round trip either way.
//!
//! Run in a task of its own and answered through a oneshot, like a direct admission: a caller
//! that stops waiting (cancelled) never leaves a probe slot taken.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::admit::{Part, PartResult};
use super::compensate::{Compensation, Taken};
use super::ride::{self, Riding};
use super::scripts::AdmitMode;
use super::{Core, RedisStore};
use crate::breaker::Transition;
use crate::store::{Admission, AdmitRequest, Admitted, FeatureSpec, TargetSpec};
use crate::StoreError;

impl RedisStore {
    /// See the module documentation.
    pub(super) async fn admit_attempt(
        &self,
        req: AdmitRequest<'_>,
    ) -> Result<Admission, StoreError> {
        let (reply, mut answer) = oneshot::channel();
        let core = Arc::clone(&self.core);
        let target = req.target.clone();
        let feature = req.feature.clone();
        let call_id = req.call_id.to_owned();
        self.core.runtime.spawn(async move {
            if reply.is_closed() {
                return;
            }
            let r = breaker_part(&core, &target, &feature, &call_id).await;
            let answer = core.combine_attempt(&target, &feature, &call_id, r);
            if let Err(answer) = reply.send(answer) {
                core.unused_answer(&target, &feature, &call_id, &answer);
            }
        });
        // The script call is bounded by the store's timeout; this guards a stuck task (the
        // queue wait for a flusher call in flight on the same keys is bounded as well).
        let t = self.core.timeout;
        match tokio::time::timeout(t * 3, &mut answer).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(StoreError::Connection(
                "fusebox: the attempt admission task stopped".to_owned(),
            )),
            Err(_) => {
                answer.close();
                answer.try_recv().unwrap_or(Err(StoreError::Timeout(t)))
            }
        }
        // A caller dropped while waiting drops `answer`: the task's send fails and it gives
        // back what it was granted.
    }
}

/// The breaker part for one call, with the target's queued outcomes riding along.
async fn breaker_part(
    core: &Arc<Core>,
    target: &TargetSpec,
    feature: &FeatureSpec,
    call_id: &str,
) -> PartResult {
    let pairs = [(Some(target.keys.breaker.as_str()), None)];
    let riding = core
        .settles
        .take_landed(&pairs, core.settle_batch, core.timeout)
        .await
        .into_iter()
        .next()
        .unwrap_or_default();
    let riding = Riding { settles: riding };
    let one = [call_id];
    if riding.is_empty() {
        let r = core
            .admit_calls(AdmitMode::Breaker, target, feature, one, 1)
            .await;
        return first(r);
    }
    let inv = ride::invocation(
        &ride::SETTLE_ADMIT,
        AdmitMode::Breaker,
        target,
        feature,
        one,
        &riding,
    );
    let parsed = match core.call(&inv).await {
        Ok(v) => ride::parse(v, &target.name).map_err(|e| (e, true)),
        Err(e) => {
            let ran = super::compensate::may_have_run(&e);
            Err((e, ran))
        }
    };
    match parsed {
        Err((e, ran)) => {
            core.settles.give_back(riding.settles, &e, ran);
            Err(e)
        }
        Ok((admission, transitions)) => {
            core.settles.delivered(&riding.settles);
            for t in &transitions {
                core.report_transition(t);
            }
            first(super::admit::parse_admit(
                admission?,
                &target.name,
                feature,
                1,
            ))
        }
    }
}

fn first(r: Result<(Vec<Part>, Option<Transition>), StoreError>) -> PartResult {
    let (parts, transition) = r?;
    match parts.into_iter().next() {
        Some(part) => Ok((part, transition)),
        None => Err(StoreError::Reply("admit.lua: no decision".to_owned())),
    }
}

impl Core {
    /// The answer to a breaker-only admission. It never holds a permit; on an error after
    /// which the script may have run, the probe slot it may have taken is given back.
    fn combine_attempt(
        self: &Arc<Self>,
        target: &TargetSpec,
        feature: &FeatureSpec,
        call_id: &str,
        r: PartResult,
    ) -> Result<Admission, StoreError> {
        match r {
            Ok((
                Part::Admitted {
                    generation, probe, ..
                },
                transition,
            )) => Ok(Admission::Admitted(Admitted {
                generation,
                probe,
                permit: false,
                transition,
            })),
            Ok((Part::Rejected(rejection), transition)) => Ok(Admission::Rejected {
                rejection,
                transition,
            }),
            Err(e) => {
                let taken = Taken::failed(&e).breaker_part();
                let c = Compensation::give_back(taken, None);
                if !c.is_empty() {
                    self.compensate(target, feature, call_id, c);
                }
                Err(e)
            }
        }
    }
}
