//! The chain executor behind [`Coordinator::guarded_call`].

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

use super::{metrics, Answered, ChainTarget, Class, Held, Reply, Tier};
use serde_json::Value;

use crate::breaker::CallOutcome;
use crate::cache::{Answer, Caller};
use crate::classify::Classified;
use crate::coordinator::Withdrawal;
use crate::observer::Event;
use crate::retry::BackoffPolicy;
use crate::{CallError, Coordinator, Error, Rejection, Request};

/// When to try the same target again after a retryable failure. [`Coordinator::guarded_call`]
/// uses the feature's `[retry]` backoff ([`BackoffPolicy`]); [`NoRetry`] makes one attempt per
/// target. Whatever the policy, each retry also draws on the target's fleet-wide retry budget.
pub trait Retry: Send + Sync {
    /// The wait before another attempt at `target`, whose last `failed` attempts (in a row)
    /// failed, the last with `class`; `None`: go on to the next target. An attempt that
    /// could not start before the call's deadline is not made.
    fn delay(&self, target: &ChainTarget, failed: u32, class: &Class) -> Option<Duration>;
}

/// One attempt per target: a retryable failure goes on to the next target.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRetry;

impl Retry for NoRetry {
    fn delay(&self, _: &ChainTarget, _: u32, _: &Class) -> Option<Duration> {
        None
    }
}

/// What the degraded-response cache needs from a guarded call
/// ([`Coordinator::guarded_call_cached`]): who calls, the request as JSON (the cache key,
/// model left out), and how to turn a target's answer into a storable [`Answer`] (`None`:
/// not stored).
pub struct CacheUse<'a, T> {
    /// Who calls (the cache's tenant).
    pub caller: Caller<'a>,
    /// The request as a Messages request object.
    pub request: &'a Value,
    /// The storable form of an answer.
    pub answer: &'a (dyn Fn(&T, &ChainTarget) -> Option<Answer> + Send + Sync),
}

impl<T> std::fmt::Debug for CacheUse<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CacheUse")
            .field("caller", &self.caller)
            .finish_non_exhaustive()
    }
}

/// How the chain ended without an answer.
enum End {
    /// Every target was tried (or skipped).
    Exhausted,
    /// The feature refused the request (bulkhead, rate limit, store policy).
    Refused,
    /// `stop_before` reached.
    StopBefore,
    /// A final error whose blame is the request or the caller (not the target's health).
    Final,
    /// The overall deadline passed.
    Deadline,
}

/// The smaller of two hints.
fn sooner(a: Option<Duration>, b: Option<Duration>) -> Option<Duration> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether `a` lets a call through no later than `b` (no retry-after: not by itself, e.g.
/// forced open).
fn not_later(a: &Rejection, b: &Rejection) -> bool {
    match (a.retry_after(), b.retry_after()) {
        (Some(a), Some(b)) => a <= b,
        (Some(_), None) | (None, None) => true,
        (None, Some(_)) => false,
    }
}

impl Coordinator {
    /// Runs one call of `feature` through its fallback chain (`[features."x"] chain`) and
    /// returns the best answer available, with what answered it (see [`crate::pipeline`]).
    ///
    /// `call(target, n)` makes attempt `n` (1-based, over the whole chain) at `target`;
    /// `classify` says what an error means: a [`Class`], or a
    /// [`Classification`](crate::classify::Classification) that also says what the breaker
    /// records ([`Classified`]). The request holds one permit and rate slot of the feature
    /// throughout; each attempt takes only its target's breaker admission, and reports to it
    /// (success, or the classification's health; a timed-out attempt is a failure).
    ///
    /// Retryable failures are retried on the same target as the feature's `[retry]` backoff
    /// says (`max_attempts`, jitter, `retry-after` as a floor, none over its cap), each retry
    /// drawing on the target's fleet-wide retry budget ([`Coordinator::retry_budget`]): a
    /// spent budget goes on to the next target at once. An attempt (first or retry) is only
    /// started when its whole timeout fits before the call's deadline, checked again once the
    /// feature's permit is granted (after any `max_wait` for it) (a target timeout
    /// longer than the deadline counts as the deadline); a target that does not fit is
    /// passed over.
    ///
    /// With a canned answer configured, every ending but a fusebox error (unknown feature,
    /// invalid name) and a final error that is the request's or the caller's (recorded as
    /// not the target's fault, e.g. a 400 or a 401) gives it; those end with the error.
    pub async fn guarded_call<T, E, F, Fut, C, K>(
        &self,
        feature: &str,
        call: F,
        classify: C,
    ) -> Result<Answered<T>, CallError<E>>
    where
        F: Fn(&ChainTarget, u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Fn(&E) -> K,
        K: Classified,
    {
        let retry = BackoffPolicy::new(self.retry_backoff(feature).map_err(CallError::Fusebox)?);
        self.guarded_call_with(feature, &retry, call, classify)
            .await
    }

    /// [`Self::guarded_call`] with a [`Retry`] policy for retryable failures.
    pub async fn guarded_call_with<T, E, F, Fut, C, K>(
        &self,
        feature: &str,
        retry: &dyn Retry,
        call: F,
        classify: C,
    ) -> Result<Answered<T>, CallError<E>>
    where
        F: Fn(&ChainTarget, u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Fn(&E) -> K,
        K: Classified,
    {
        self.guarded_call_cached(feature, retry, None, call, classify)
            .await
    }

    /// [`Self::guarded_call_with`] with the feature's degraded-response cache: a fresh
    /// answer is stored in the background (the call does not wait), and when the chain ends
    /// without an answer (except after a [`Class::Final`] error, which no earlier answer
    /// should paper over) the cached one is served ([`Reply::Cached`], [`Tier::Cache`])
    /// before the canned text.
    pub async fn guarded_call_cached<T, E, F, Fut, C, K>(
        &self,
        feature: &str,
        retry: &dyn Retry,
        cache: Option<CacheUse<'_, T>>,
        call: F,
        classify: C,
    ) -> Result<Answered<T>, CallError<E>>
    where
        F: Fn(&ChainTarget, u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Fn(&E) -> K,
        K: Classified,
    {
        // `chain` directly, not through `guarded_call_held`: one async layer less keeps the
        // future's type shallow enough for callers' default recursion limit.
        let started = Instant::now();
        let r = self.chain(feature, 0, retry, cache, call, classify).await;
        self.called(feature, started, &r);
        r.map(|(answered, held)| {
            if let Some(h) = held {
                h.finish(CallOutcome::Success);
            }
            answered
        })
    }

    /// The metrics and the fallback-rate count of an ended guarded call.
    fn called<T, E>(
        &self,
        feature: &str,
        started: Instant,
        r: &Result<(Answered<T>, Option<Held>), CallError<E>>,
    ) {
        let outcome = match r {
            Ok((a, _)) => a.tier.as_str(),
            Err(_) => "error",
        };
        metrics::call(feature, outcome, started.elapsed());
        if let Ok((a, _)) = r {
            self.count_call(feature, a.tier != Tier::Primary);
        }
    }

    /// [`Self::guarded_call_cached`] for answers that go on after the call returns (a
    /// stream), starting at target `start` of the chain (0: the primary).
    ///
    /// A fresh answer comes with a [`Held`]: the request's bulkhead permit and the answering
    /// target's breaker admission, neither settled yet. Keep it for as long as the answer
    /// runs ([`Held::guard`] keeps the permit's lease alive), then report how the answer
    /// ended with [`Held::finish`]: a stream that fails after its first event counts against
    /// the target's breaker. Dropping it unreported (the client went away) releases the
    /// permit at once and records nothing on the breaker.
    ///
    /// Starting past the primary: the answering target's tier is [`Tier::Primary`] when it
    /// is `start`, and `stop_before` applies only to targets after `start` (a caller who
    /// asks for a later model by name gets it). A `start` past the chain's end is an error
    /// naming the feature's chain.
    pub async fn guarded_call_held<T, E, F, Fut, C, K>(
        &self,
        feature: &str,
        start: usize,
        retry: &dyn Retry,
        cache: Option<CacheUse<'_, T>>,
        call: F,
        classify: C,
    ) -> Result<(Answered<T>, Option<Held>), CallError<E>>
    where
        F: Fn(&ChainTarget, u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Fn(&E) -> K,
        K: Classified,
    {
        let started = Instant::now();
        let r = self
            .chain(feature, start, retry, cache, call, classify)
            .await;
        self.called(feature, started, &r);
        r
    }

    async fn chain<T, E, F, Fut, C, K>(
        &self,
        feature: &str,
        start: usize,
        retry: &dyn Retry,
        cache: Option<CacheUse<'_, T>>,
        call: F,
        classify: C,
    ) -> Result<(Answered<T>, Option<Held>), CallError<E>>
    where
        F: Fn(&ChainTarget, u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        C: Fn(&E) -> K,
        K: Classified,
    {
        let plan = self.plan(feature)?;
        if plan.targets.is_empty() {
            return Err(CallError::Fusebox(Error::config(
                format!("features.{feature}.chain"),
                "is empty: a guarded call needs at least one target",
            )));
        }
        if start >= plan.targets.len() {
            return Err(CallError::Fusebox(Error::config(
                format!("features.{feature}.chain"),
                format!(
                    "has {} targets: no target {start} to start at",
                    plan.targets.len()
                ),
            )));
        }
        let deadline = Instant::now() + plan.deadline;
        // The longest fleet-wide "not before" an upstream's retry-after may set: one hostile
        // or broken header must not shut a target for the whole fleet for a day.
        let not_before_cap = self
            .retry_backoff(feature)
            .map_err(CallError::Fusebox)?
            .retry_after_cap;
        let mut request: Option<Request> = None;
        let mut attempts = 0u32;
        let mut last_err: Option<E> = None;
        let mut last_rej: Option<Rejection> = None;
        let mut hint: Option<Duration> = None;
        let mut need_context: Option<u32> = None;
        let mut end = End::Exhausted;
        let mut passed_over = false;
        let mut i = start;
        'chain: while let Some(t) = plan.targets.get(i) {
            if plan.stop_before == Some(i) && i > start {
                end = End::StopBefore;
                break;
            }
            if let Some(min) = need_context {
                if t.context_window.is_none_or(|c| c <= min) {
                    i += 1;
                    continue;
                }
            }
            let budget = self
                .retry_budget(feature, &t.name)
                .map_err(CallError::Fusebox)?;
            // No attempt starts that could not finish before the deadline.
            let timeout = t.timeout.min(plan.deadline);
            let mut failed_here = 0u32;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    end = End::Deadline;
                    break 'chain;
                }
                if timeout > left {
                    passed_over = true;
                    i += 1;
                    continue 'chain;
                }
                let admitted = match &request {
                    Some(r) => self.admit_attempt(r, &t.name).await,
                    None => match self.admit_request(feature, &t.name).await {
                        Ok((r, a)) => {
                            request = Some(r);
                            Ok(a)
                        }
                        Err(e) => Err(e),
                    },
                };
                let attempt = match admitted {
                    Ok(a) => a,
                    Err(Error::Rejected(r)) => {
                        let target_level = matches!(
                            r,
                            Rejection::CircuitOpen { .. } | Rejection::NotBefore { .. }
                        );
                        hint = sooner(hint, r.retry_after());
                        // Of the targets refused by their breakers, the one that can be
                        // tried soonest (the better model on a tie) is the refusal to
                        // return, so that its retry-after is when some model may answer
                        // again, not when the last one of the chain does.
                        last_rej = Some(match last_rej.take() {
                            Some(prev) if target_level && not_later(&prev, &r) => prev,
                            _ => r,
                        });
                        if target_level {
                            i += 1;
                            continue 'chain;
                        }
                        end = End::Refused;
                        break 'chain;
                    }
                    Err(e) => return Err(CallError::Fusebox(e)),
                };
                // The first admission may have waited (up to the feature's `max_wait`) for a
                // permit: the attempt starts only if it still fits. A dropped attempt gives
                // its probe slot back and records nothing.
                if timeout > deadline.saturating_duration_since(Instant::now()) {
                    drop(attempt);
                    passed_over = true;
                    i += 1;
                    continue 'chain;
                }
                attempts += 1;
                if failed_here == 0 {
                    budget.deposit();
                }
                metrics::attempt(feature, &t.name, failed_here > 0);
                let sent = Instant::now();
                let run = tokio::time::timeout(timeout, call(t, attempts));
                let result = match &request {
                    Some(r) => r.guard(run).await,
                    None => run.await,
                };
                let class = match result {
                    Ok(Ok(v)) => {
                        metrics::attempt_ended(feature, &t.name, sent.elapsed(), None);
                        let held = Held::new(request, attempt);
                        if let Some(c) = &cache {
                            if let Some(a) = (c.answer)(&v, t) {
                                // Reported as an event when dropped; never fails the call.
                                let _ =
                                    self.cache_put_in_background(feature, c.caller, c.request, &a);
                            }
                        }
                        let tier = if i == start {
                            Tier::Primary
                        } else {
                            Tier::Fallback
                        };
                        if tier == Tier::Fallback {
                            metrics::fallback(feature, &t.name);
                        }
                        self.answered(feature, tier, Some(&t.name), attempts);
                        let answered = Answered {
                            reply: Reply::Fresh(v),
                            target: Some(t.name.clone()),
                            model: Some(t.model.clone()),
                            tier,
                            attempts,
                            degraded: i > start,
                        };
                        return Ok((answered, Some(held)));
                    }
                    Ok(Err(e)) => {
                        let k = classify(&e);
                        let health = k.health();
                        attempt.record(health);
                        last_err = Some(e);
                        let class = k.class();
                        metrics::attempt_ended(
                            feature,
                            &t.name,
                            sent.elapsed(),
                            Some(class.as_str()),
                        );
                        if matches!(class, Class::Final) && health != CallOutcome::Ignored {
                            // Final, yet the target's fault: an availability failure, which
                            // the cache or the canned answer may cover.
                            end = End::Exhausted;
                            break 'chain;
                        }
                        class
                    }
                    Err(_) => {
                        let timeout = Some("timeout");
                        metrics::attempt_ended(feature, &t.name, sent.elapsed(), timeout);
                        // The caller may see only a fallback or degraded answer: say why.
                        tracing::warn!(
                            target: "fusebox",
                            feature = %feature,
                            breaker.target = %t.name,
                            timeout_ms = timeout_ms(t.timeout.min(plan.deadline)),
                            "attempt timed out"
                        );
                        attempt.record(CallOutcome::Failure);
                        Class::Retryable { retry_after: None }
                    }
                };
                failed_here += 1;
                match class {
                    Class::Final => {
                        end = End::Final;
                        break 'chain;
                    }
                    Class::ContextTooLarge => {
                        let here = t.context_window.unwrap_or(0);
                        need_context = Some(need_context.map_or(here, |n| n.max(here)));
                        i += 1;
                        continue 'chain;
                    }
                    Class::Overloaded { retry_after } => {
                        if let Some(d) = retry_after {
                            let d = d.min(not_before_cap);
                            hint = sooner(hint, Some(d));
                            // Fleet-wide, in the background: the fallback does not wait for it.
                            let c = self.clone();
                            let name = t.name.clone();
                            tokio::spawn(async move {
                                let _ = c.set_not_before(&name, d).await;
                            });
                        }
                        i += 1;
                        continue 'chain;
                    }
                    Class::Retryable { .. } => {
                        let Some(d) = retry.delay(t, failed_here, &class) else {
                            i += 1;
                            continue 'chain;
                        };
                        if Instant::now() + d + timeout > deadline {
                            // The retry could not finish before the deadline.
                            passed_over = true;
                            i += 1;
                            continue 'chain;
                        }
                        if let Withdrawal::Spent { .. } = budget.withdraw().await {
                            metrics::budget_spent(feature, &t.name);
                            // Falls through to the next tier instead of waiting.
                            i += 1;
                            continue 'chain;
                        }
                        tokio::time::sleep(d).await;
                    }
                }
            }
        }
        // The request's permit goes back before the last resorts.
        drop(request);
        if passed_over && matches!(end, End::Exhausted) {
            end = End::Deadline;
        }
        // A final error that is the request's or the caller's is theirs to see: a "try
        // later" would hide it, and no later call can fix it.
        if matches!(end, End::Final) {
            if let Some(e) = last_err.take() {
                return Err(CallError::Inner(e));
            }
        }
        if let (Some(c), false) = (&cache, matches!(end, End::Final)) {
            // A cache that cannot be read is a miss (reported as an event by the cache).
            if let Ok(Some(hit)) = self.cache_get(feature, c.caller, c.request).await {
                metrics::degraded(feature, "cache");
                self.answered(feature, Tier::Cache, None, attempts);
                let model = Some(hit.model.clone());
                let answered = Answered {
                    reply: Reply::Cached(hit),
                    target: None,
                    model,
                    tier: Tier::Cache,
                    attempts,
                    degraded: true,
                };
                return Ok((answered, None));
            }
        }
        if let Some(c) = &plan.canned {
            metrics::degraded(feature, "canned");
            self.answered(feature, Tier::Canned, None, attempts);
            let answered = Answered {
                reply: Reply::Canned {
                    text: c.text.clone(),
                    retry_after: hint.or(c.retry_after),
                },
                target: None,
                model: None,
                tier: Tier::Canned,
                attempts,
                degraded: true,
            };
            return Ok((answered, None));
        }
        Err(match (end, last_err, last_rej) {
            (End::StopBefore, _, _) => CallError::RetryLater { retry_after: hint },
            (End::Deadline, None, _) => CallError::TimedOut,
            (End::Final | End::Exhausted | End::Deadline, Some(e), _) => CallError::Inner(e),
            (End::Refused, _, Some(r)) => CallError::Rejected(r),
            (_, Some(e), None) => CallError::Inner(e),
            (_, None, Some(r)) => CallError::Rejected(r),
            (_, None, None) => CallError::TimedOut,
        })
    }

    fn answered(&self, feature: &str, tier: Tier, target: Option<&str>, attempts: u32) {
        self.emit(Event::Answered {
            feature: feature.to_owned(),
            tier,
            target: target.map(str::to_owned),
            attempts,
        });
    }
}

/// A duration in whole milliseconds, for logs.
fn timeout_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
