//! Admission: through the batcher (`batch.rs`) or, when its queue is full, by the caller's
//! own script call(s); the answer to a whole (single node) or split (Cluster) admission; the
//! parsing of `admit.lua`'s reply. What an admission that will not be used gives back is
//! decided and carried out in `compensate.rs`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use redis::Value;
use tokio::sync::{mpsc, oneshot};

use super::batch;
use super::compensate::{Compensation, Taken, Took};
use super::reply;
use super::scripts::{self, AdmitMode};
use super::{Core, RedisStore};
use crate::breaker::{CircuitState, Transition};
use crate::store::{Admission, AdmitRequest, Admitted, FeatureSpec, TargetSpec};
use crate::{Rejection, StoreError};

/// What one `admit.lua` call (or part of a split admission) decided.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Part {
    Admitted {
        generation: u64,
        probe: bool,
        permit: bool,
    },
    Rejected(Rejection),
}

/// The decision of one part (or the whole) of one call, and the transition its script call
/// made if this call is the one that made it.
pub(super) type PartResult = Result<(Part, Option<Transition>), StoreError>;

impl RedisStore {
    /// Admission through the batcher; when its queue is full (or gone), by a task of its own
    /// that makes the script call(s) directly. Either way the caller waits for the answer in
    /// the same way, so a caller that stops waiting is compensated the same way.
    pub(super) async fn admit_batched(
        &self,
        req: AdmitRequest<'_>,
    ) -> Result<Admission, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job = batch::Job {
            split: self.splits_admit(),
            specs: self.core.specs.get(req.target, req.feature),
            call_id: req.call_id.to_owned(),
            reply,
            queued: tokio::time::Instant::now(),
        };
        let in_progress = InProgress::enter(&self.core);
        // Alone (no other admission in progress, none in flight): no batcher hop.
        let admitting = if in_progress.alone && !job.split {
            Arc::clone(&self.core.admitting).try_lock_owned().ok()
        } else {
            None
        };
        let mut alone = match admitting {
            Some(admitting) => Alone::new(
                &self.core.runtime,
                batch::admit_alone(Arc::clone(&self.core), job, admitting),
            ),
            None => {
                if let Err(e) = self.admissions.try_send(job) {
                    let job = match e {
                        mpsc::error::TrySendError::Full(job)
                        | mpsc::error::TrySendError::Closed(job) => job,
                    };
                    self.core
                        .runtime
                        .spawn(admit_direct(Arc::clone(&self.core), job));
                }
                Alone::none(&self.core.runtime)
            }
        };
        let t = self.core.timeout;
        // If this future is dropped while waiting (the caller was cancelled), the guard
        // settles the race with the batcher the same way as a timeout does below.
        let mut pending = Pending {
            core: &self.core,
            req,
            answer: Some(answer),
        };
        let Some(answer) = pending.answer.as_mut() else {
            return Err(StoreError::Timeout(t));
        };
        // The batcher bounds the queue wait (a timeout) and each script call (a timeout
        // each: two on Cluster); this only guards against a stuck batcher.
        let parts = if self.splits_admit() { 2 } else { 1 };
        let waited = tokio::time::timeout(t * (2 + parts), async {
            (&mut alone).await;
            (&mut *answer).await
        })
        .await;
        let Some(mut answer) = pending.answer.take() else {
            return Err(StoreError::Timeout(t));
        };
        match waited {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => {
                // The batcher (or the direct task) went away with the job (its runtime is
                // shutting down): the script may have run.
                let e = StoreError::Connection("fusebox: the admission batcher stopped".to_owned());
                let c = Compensation::give_back(Taken::failed(&e), None);
                self.core
                    .compensate(req.target, req.feature, req.call_id, c);
                Err(e)
            }
            Err(_) => {
                // No answer in time. Closing the channel settles the race with the batcher:
                // either the answer is already here (use it), or the batcher will find the
                // job abandoned and give back whatever it was granted.
                answer.close();
                answer.try_recv().unwrap_or(Err(StoreError::Timeout(t)))
            }
        }
    }
}

/// Counts an admission in progress (see `Core::admissions_in_progress`) until dropped.
struct InProgress<'a> {
    core: &'a Core,
    /// No other admission was in progress when this one entered.
    alone: bool,
}

impl<'a> InProgress<'a> {
    fn enter(core: &'a Core) -> Self {
        let before = core.admissions_in_progress.fetch_add(1, Ordering::AcqRel);
        InProgress {
            core,
            alone: before == 0,
        }
    }
}

impl Drop for InProgress<'_> {
    fn drop(&mut self) {
        self.core
            .admissions_in_progress
            .fetch_sub(1, Ordering::AcqRel);
    }
}

/// A lone admission's own script call, run from its caller's task. Dropped before it is
/// done (the caller stopped waiting), the rest runs on a task of its own, which finds the
/// answer channel closed and gives back what the call was granted, as the batcher does.
struct Alone {
    run: Option<Pin<Box<dyn Future<Output = ()> + Send>>>,
    runtime: tokio::runtime::Handle,
}

impl Alone {
    fn new(
        runtime: &tokio::runtime::Handle,
        run: impl Future<Output = ()> + Send + 'static,
    ) -> Self {
        Alone {
            run: Some(Box::pin(run)),
            runtime: runtime.clone(),
        }
    }

    fn none(runtime: &tokio::runtime::Handle) -> Self {
        Alone {
            run: None,
            runtime: runtime.clone(),
        }
    }
}

impl Future for Alone {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let Some(run) = self.run.as_mut() else {
            return Poll::Ready(());
        };
        match run.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.run = None;
                Poll::Ready(())
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for Alone {
    fn drop(&mut self) {
        if let Some(run) = self.run.take() {
            self.runtime.spawn(run);
        }
    }
}

/// One admission by its own script call(s), without the batcher (its queue was full): answers
/// `job` as the batcher would, and gives back what it was granted when its caller is gone.
async fn admit_direct(core: Arc<Core>, job: batch::Job) {
    let batch::Job {
        split,
        specs,
        call_id,
        reply,
        queued: _,
    } = job;
    if reply.is_closed() {
        return; // the caller already gave up: no admission (and none to give back)
    }
    let (target, feature) = (&specs.target, &specs.feature);
    let one = [call_id.as_str()];
    let answer = if split {
        // The feature part only for a call the breaker admitted (as the batcher does).
        let b = first(
            core.admit_calls(AdmitMode::Breaker, target, feature, one, 1)
                .await,
        );
        if matches!(b, Ok((Part::Admitted { .. }, _))) {
            let f = core
                .admit_calls(AdmitMode::Feature, target, feature, one, 1)
                .await;
            core.combine_split(target, feature, &call_id, b, first(f))
        } else {
            core.combine_breaker_refused(target, feature, &call_id, b)
        }
    } else {
        let r = core
            .admit_calls(AdmitMode::Both, target, feature, one, 1)
            .await;
        core.combine_whole(target, feature, &call_id, first(r))
    };
    if let Err(answer) = reply.send(answer) {
        core.unused_answer(target, feature, &call_id, &answer);
    }
}

/// The only decision of a one-call script reply.
fn first(r: Result<(Vec<Part>, Option<Transition>), StoreError>) -> PartResult {
    let (parts, transition) = r?;
    match parts.into_iter().next() {
        Some(part) => Ok((part, transition)),
        None => Err(StoreError::Reply("admit.lua: no decision".to_owned())),
    }
}

impl Core {
    /// One `admit.lua` call deciding `k` calls (`call_ids`, in order) in `mode`: one decision
    /// per call, and the transition the script made (by the first call).
    pub(super) async fn admit_calls<S: AsRef<str>>(
        &self,
        mode: AdmitMode,
        target: &TargetSpec,
        feature: &FeatureSpec,
        call_ids: impl IntoIterator<Item = S>,
        k: usize,
    ) -> Result<(Vec<Part>, Option<Transition>), StoreError> {
        let inv = scripts::admit(mode, (&target.keys, &target.params), feature, call_ids);
        let v = self.call(&inv).await?;
        parse_admit(v, &target.name, feature, k)
    }

    /// The answer to a one-call (`both` mode) admission. On a timeout or connection error the
    /// script may still have run: what it may have taken is given back
    /// ([`Compensation::give_back`]).
    pub(super) fn combine_whole(
        self: &Arc<Self>,
        target: &TargetSpec,
        feature: &FeatureSpec,
        call_id: &str,
        r: PartResult,
    ) -> Result<Admission, StoreError> {
        match r {
            Ok((
                Part::Admitted {
                    generation,
                    probe,
                    permit,
                },
                transition,
            )) => Ok(Admission::Admitted(Admitted {
                generation,
                probe,
                permit,
                transition,
            })),
            Ok((Part::Rejected(rejection), transition)) => Ok(Admission::Rejected {
                rejection,
                transition,
            }),
            Err(e) => {
                let c = Compensation::give_back(Taken::failed(&e), None);
                self.compensate(target, feature, call_id, c);
                Err(e)
            }
        }
    }

    /// The answer to a split admission from its breaker part `b` and feature part `f`; when
    /// the call is not admitted as a whole, what either part took is given back.
    pub(super) fn combine_split(
        self: &Arc<Self>,
        target: &TargetSpec,
        feature: &FeatureSpec,
        call_id: &str,
        b: PartResult,
        f: PartResult,
    ) -> Result<Admission, StoreError> {
        let took_b = match &b {
            Ok((Part::Admitted { probe, .. }, _)) => Taken {
                probe: Took::when(*probe),
                ..Taken::NOTHING
            },
            Ok((Part::Rejected(_), _)) => Taken::NOTHING,
            Err(e) => Taken::failed(e).breaker_part(),
        };
        let took_f = match &f {
            Ok((Part::Admitted { permit, .. }, _)) => Taken {
                permit: Took::when(*permit),
                rate: Took::Yes,
                ..Taken::NOTHING
            },
            Ok((Part::Rejected(_), _)) => Taken::NOTHING,
            Err(e) => Taken::failed(e).feature_part(),
        };
        // The answer, and a transition that only an error answer would lose.
        let (answer, lost) = match (b, f) {
            (
                Ok((
                    Part::Admitted {
                        generation, probe, ..
                    },
                    transition,
                )),
                Ok((Part::Admitted { permit, .. }, _)),
            ) => {
                return Ok(Admission::Admitted(Admitted {
                    generation,
                    probe,
                    permit,
                    transition,
                }))
            }
            (Ok((Part::Rejected(rejection), transition)), Ok(_))
            | (Ok((Part::Admitted { .. }, transition)), Ok((Part::Rejected(rejection), _))) => (
                Ok(Admission::Rejected {
                    rejection,
                    transition,
                }),
                None,
            ),
            (Err(e), _) => (Err(e), None),
            (Ok((_, transition)), Err(e)) => (Err(e), transition),
        };
        let c = Compensation::give_back(took_b.and(took_f), lost);
        if !c.is_empty() {
            self.compensate(target, feature, call_id, c);
        }
        answer
    }

    /// The answer to a split admission whose breaker part did not admit the call (so its
    /// feature part was never sent): the refusal, or the error, after giving back the probe
    /// slot a script that may have run may have taken.
    pub(super) fn combine_breaker_refused(
        self: &Arc<Self>,
        target: &TargetSpec,
        feature: &FeatureSpec,
        call_id: &str,
        b: PartResult,
    ) -> Result<Admission, StoreError> {
        let (answer, taken, lost) = match b {
            Ok((Part::Rejected(rejection), transition)) => {
                return Ok(Admission::Rejected {
                    rejection,
                    transition,
                })
            }
            // Not reached (the feature part is sent for admitted calls): give it back.
            Ok((Part::Admitted { probe, .. }, transition)) => (
                Err(StoreError::Reply(
                    "admit.lua: no feature decision for an admitted call".to_owned(),
                )),
                Taken {
                    probe: Took::when(probe),
                    ..Taken::NOTHING
                },
                transition,
            ),
            Err(e) => {
                let taken = Taken::failed(&e).breaker_part();
                (Err(e), taken, None)
            }
        };
        let c = Compensation::give_back(taken, lost);
        if !c.is_empty() {
            self.compensate(target, feature, call_id, c);
        }
        answer
    }

    /// Gives back what an answer that its caller will never see took (the call never ran):
    /// probe slot, permit, rate slot, and reports the transition it made.
    pub(super) fn unused_answer(
        self: &Arc<Self>,
        target: &TargetSpec,
        feature: &FeatureSpec,
        call_id: &str,
        answer: &Result<Admission, StoreError>,
    ) {
        let (taken, transition) = Taken::of_answer(answer);
        let c = Compensation::give_back(taken, transition);
        if !c.is_empty() {
            self.compensate(target, feature, call_id, c);
        }
    }
}

/// A queued admission whose caller may stop waiting. Dropped while still armed (the caller's
/// future was cancelled), it closes the answer channel: either the batcher then finds the job
/// abandoned and gives back what it was granted, or the answer had already arrived and is
/// given back here (the call never ran: its probe slot, permit and rate slot; a transition it
/// made is reported).
struct Pending<'a> {
    core: &'a Arc<Core>,
    req: AdmitRequest<'a>,
    answer: Option<oneshot::Receiver<Result<Admission, StoreError>>>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let Some(mut answer) = self.answer.take() else {
            return;
        };
        answer.close();
        if let Ok(a) = answer.try_recv() {
            let req = &self.req;
            self.core
                .unused_answer(req.target, req.feature, req.call_id, &a);
        }
    }
}

/// An `admit.lua` reply for `k` calls: `{now, t_from, t_to, t_generation, t_reason, m,
/// generation, probe, permit, code, a, b}`: the first `m` calls admitted alike, the others
/// refused alike.
pub(super) fn parse_admit(
    v: Value,
    target: &str,
    feature: &FeatureSpec,
    k: usize,
) -> Result<(Vec<Part>, Option<Transition>), StoreError> {
    const WHAT: &str = "admit.lua";
    let xs = reply::ints(v, WHAT)?;
    let [now, t_from, t_to, t_gen, t_reason, m, generation, probe, permit, code, a, b] = xs[..]
    else {
        return Err(StoreError::Reply(format!(
            "{WHAT}: expected 12 integers, got {}",
            xs.len()
        )));
    };
    let now = reply::unsigned(now, WHAT)?;
    let transition = if t_from < 0 {
        None
    } else {
        Some(reply::transition(
            target,
            &[t_from, t_to, t_gen, t_reason],
            now,
        )?)
    };
    let m = usize::try_from(m)
        .ok()
        .filter(|m| *m <= k)
        .ok_or_else(|| StoreError::Reply(format!("{WHAT}: {m} admitted of {k}")))?;
    let mut parts = Vec::with_capacity(k);
    if m > 0 {
        let admitted = Part::Admitted {
            generation: reply::unsigned(generation, WHAT)?,
            probe: probe != 0,
            permit: permit != 0,
        };
        parts.resize(m, admitted);
    }
    if m < k {
        let refused = parse_refusal([code, a, b], target, feature)?;
        parts.resize(k, refused);
    }
    Ok((parts, transition))
}

/// How `admit.lua` refused a call: `{code, a, b}`.
fn parse_refusal(
    [code, a, b]: [i64; 3],
    target: &str,
    feature: &FeatureSpec,
) -> Result<Part, StoreError> {
    const WHAT: &str = "admit.lua";
    let ms = |n: i64| reply::unsigned(n, WHAT).map(Duration::from_millis);
    let rejection = match code {
        1 => Rejection::CircuitOpen {
            target: target.to_owned(),
            state: CircuitState::from_code(a)
                .ok_or_else(|| StoreError::Reply(format!("{WHAT}: unknown state code {a}")))?,
            retry_after: if b < 0 { None } else { Some(ms(b)?) },
        },
        2 => Rejection::NotBefore {
            target: target.to_owned(),
            retry_after: ms(a)?,
        },
        3 => Rejection::RateLimited {
            feature: feature.name.clone(),
            retry_after: Duration::from_micros(reply::unsigned(a, WHAT)?),
        },
        4 => Rejection::BulkheadFull {
            feature: feature.name.clone(),
            limit: feature.bulkhead.map_or(0, |b| b.limit),
            retry_after: Some(ms(a)?),
        },
        other => {
            return Err(StoreError::Reply(format!(
                "{WHAT}: unknown refusal code {other}"
            )))
        }
    };
    Ok(Part::Rejected(rejection))
}
