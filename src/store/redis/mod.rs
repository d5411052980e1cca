//! The Redis store: one Lua script per operation (`lua/*.lua`), so every replica of a fleet
//! shares one view of breakers, bulkheads and rate limits. Semantics are those of
//! [`MemoryStore`](super::MemoryStore); time is the Redis server's (`TIME`), one clock for the
//! whole fleet.
//!
//! * Admissions go through a batcher ((`batch.rs`)): concurrent `admit`s of one (target,
//!   feature) are decided by ONE `admit.lua` call, exactly as if they had come one after the
//!   other; one admission alone is one call.
//! * Single node: an admission is decided by one `admit.lua` call (breaker + rate + bulkhead,
//!   all or nothing per call).
//! * Redis Cluster: a target's keys and a feature's keys live under different hash tags, so
//!   the breaker part and the feature part are sent concurrently (one round trip on the
//!   multiplexed connection) and compensated in the background when only one part admitted.
//! * `settle` groups outcomes by target and releases by feature and sends every script call
//!   of the batch concurrently.
//!
//! Every operation is bounded by [`RedisConfig::timeout`]. A timed-out script may still have
//! run; see the notes on [`RedisStore::admit`](Store::admit) and `settle` below.

mod batch;
mod conn;
#[cfg(test)]
mod difftest;
mod reply;
mod scripts;

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::{join, join_all};
use redis::aio::ConnectionManagerConfig;
use redis::cluster::ClusterClient;
use redis::{IntoConnectionInfo, ScriptInvocation, Value};
use tokio::sync::{mpsc, oneshot};

use self::conn::{map_err, ClusterHandle, Conn};
use self::scripts::{AdmitMode, Outcome, Release};
use super::{Admission, AdmitRequest, Admitted, FeatureSpec, Settle, Store, TargetSpec};
use crate::breaker::{BreakerSnapshot, CallOutcome, CircuitState, Force, Transition};
use crate::config::RedisConfig;
use crate::{Error, Rejection, StoreError};

/// Reconnect backoff of the single-node connection: delays grow from this...
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(100);
/// ...up to this...
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);
/// ...for this many tries; then the next command starts a new round.
const RECONNECT_TRIES: usize = 3;

/// [`Store`] on Redis (single node or Cluster). Cheap to clone (clones share connections and
/// the admission batcher).
#[derive(Clone)]
pub struct RedisStore {
    core: Arc<Core>,
    /// The admission batcher's queue ((`batch.rs`)); its task ends when every clone is dropped.
    admissions: mpsc::Sender<batch::Job>,
    split_admit: bool,
}

/// What the store and its background tasks (batcher, compensations) share. Holds no sender
/// of the admission queue, so the batcher does not keep itself alive.
struct Core {
    conn: Conn,
    timeout: Duration,
    settle_batch: usize,
    /// Where compensations run (captured at connect, so they can be spawned from anywhere).
    runtime: tokio::runtime::Handle,
    /// The specs queued admissions share.
    specs: batch::SpecCache,
    /// Where transitions go that a store call made but could not return (its caller gave
    /// up, or another part of the same operation failed): the coordinator reports them.
    lost: std::sync::OnceLock<TransitionSink>,
}

/// Receives breaker transitions that a store operation made but could not return.
pub type TransitionSink = Arc<dyn Fn(Transition) + Send + Sync>;

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // No URLs: they may carry passwords.
        f.debug_struct("RedisStore")
            .field(
                "mode",
                &if self.is_cluster() {
                    "cluster"
                } else {
                    "single"
                },
            )
            .field("timeout", &self.core.timeout)
            .field("settle_batch", &self.core.settle_batch)
            .field("split_admit", &self.split_admit)
            .finish()
    }
}

/// What one `admit.lua` call (or part of a split admission) decided.
#[derive(Debug, Clone, PartialEq)]
enum Part {
    Admitted {
        generation: u64,
        probe: bool,
        permit: bool,
    },
    Rejected(Rejection),
}

impl RedisStore {
    /// A store for `config.url` (single node) or `config.cluster` (seed nodes).
    ///
    /// Connects lazily: an unreachable Redis is not an error here (operations fail with
    /// [`StoreError::Connection`] / [`StoreError::Timeout`] until it is back, and the
    /// connection is re-established in the background). Fails only for a configuration that
    /// cannot work: no URL, both `url` and `cluster`, or a URL that does not parse
    /// ([`Error::Config`] naming the field), or outside a Tokio runtime
    /// ([`Error::Store`]).
    pub async fn connect(config: &RedisConfig) -> Result<RedisStore, Error> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // The connection tasks are Tokio tasks: refuse rather than panic in redis-rs.
            return Err(Error::Store(StoreError::Connection(
                "RedisStore::connect must run inside a Tokio runtime".to_owned(),
            )));
        };
        #[cfg(feature = "tls")]
        {
            // Fails only when a provider is already installed, which is just as good.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        // The same checks as `Config::validate`, naming the same fields.
        config.validate()?;
        let conn = match (&config.url, config.cluster.is_empty()) {
            (Some(url), true) => Conn::Single(single_node(url, config)?),
            (None, false) => Conn::Cluster(Arc::new(cluster(config, runtime.clone())?)),
            _ => {
                return Err(Error::config(
                    "redis.url",
                    "set exactly one of redis.url and redis.cluster",
                ))
            }
        };
        // Start connecting now, in the background, so the first call does not pay for it.
        conn.warm_up(&runtime);
        let core = Arc::new(Core {
            conn,
            timeout: config.timeout,
            settle_batch: config.settle_batch.max(1),
            runtime: runtime.clone(),
            specs: batch::SpecCache::default(),
            lost: std::sync::OnceLock::new(),
        });
        let (admissions, queue) = mpsc::channel(batch::QUEUE);
        runtime.spawn(batch::run(Arc::clone(&core), queue));
        Ok(RedisStore {
            core,
            admissions,
            split_admit: false,
        })
    }

    /// Forces (or stops forcing) split admission on a single node: the breaker part and the
    /// feature part as two concurrent script calls with compensation, as on Redis Cluster.
    /// For tests of the compensation path; on Cluster admission is always split.
    pub fn with_split_admit(mut self, on: bool) -> Self {
        self.split_admit = on;
        self
    }

    /// Whether `admit` runs split (always on Cluster, or forced).
    pub fn splits_admit(&self) -> bool {
        self.split_admit || self.is_cluster()
    }

    /// Sets where transitions go that an operation made but could not return (for example a
    /// settle whose outcomes were recorded while a release in the same batch failed). The
    /// coordinator reports them as events, so each transition is still reported once. Only
    /// the first sink set is kept.
    pub fn set_transition_sink(&self, sink: TransitionSink) {
        let _ = self.core.lost.set(sink);
    }

    /// Whether this store talks to Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        matches!(self.core.conn, Conn::Cluster(_))
    }

    /// The bound on every operation ([`RedisConfig::timeout`]).
    pub fn timeout(&self) -> Duration {
        self.core.timeout
    }

    /// PING (every master of a cluster), bounded by the timeout: to probe recovery while in
    /// local mode.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let t = self.core.timeout;
        match tokio::time::timeout(t, self.core.conn.ping()).await {
            Ok(r) => r.map_err(|e| map_err(e, t)),
            Err(_) => Err(StoreError::Timeout(t)),
        }
    }

    /// One call of a script that is safe to repeat: retried once (within the same timeout)
    /// when the connection turned out to be dropped, since the connection manager reconnects
    /// in the background but does not resend the failed command.
    async fn call_idempotent(&self, inv: &ScriptInvocation<'static>) -> Result<Value, StoreError> {
        let conn = &self.core.conn;
        self.core
            .bounded(async move {
                match conn.invoke(inv).await {
                    Err(e) if e.is_connection_dropped() => conn.invoke(inv).await,
                    r => r,
                }
            })
            .await
    }

    /// Admission through the batcher; a direct script call when its queue is full (or gone).
    async fn admit_batched(&self, req: AdmitRequest<'_>) -> Result<Admission, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job = batch::Job {
            split: self.splits_admit(),
            specs: self.core.specs.get(req.target, req.feature),
            call_id: req.call_id.to_owned(),
            reply,
        };
        if self.admissions.try_send(job).is_err() {
            return self.admit_direct(req).await;
        }
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
        let waited = tokio::time::timeout(t, &mut *answer).await;
        let Some(mut answer) = pending.answer.take() else {
            return Err(StoreError::Timeout(t));
        };
        match waited {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => {
                // The batcher went away with the job (its runtime is shutting down): the
                // script may have run.
                self.core.spawn_free_probe(req.target, req.call_id);
                self.core
                    .spawn_release(req.feature, req.call_id, true, false);
                Err(StoreError::Connection(
                    "fusebox: the admission batcher stopped".to_owned(),
                ))
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

    /// Admission by this caller's own script call(s), without the batcher.
    async fn admit_direct(&self, req: AdmitRequest<'_>) -> Result<Admission, StoreError> {
        let core = &self.core;
        let one = [req.call_id];
        if self.splits_admit() {
            let (b, f) = join(
                core.admit_calls(AdmitMode::Breaker, req.target, req.feature, one, 1),
                core.admit_calls(AdmitMode::Feature, req.target, req.feature, one, 1),
            )
            .await;
            core.combine_split(req.target, req.feature, req.call_id, first(b), first(f))
        } else {
            let r = core
                .admit_calls(AdmitMode::Both, req.target, req.feature, one, 1)
                .await;
            core.combine_whole(req.target, req.feature, req.call_id, first(r))
        }
    }

    /// One target's settle calls (chunks of `settle_batch`, in order, one after the other),
    /// the first carrying `ride` (a feature's release) if any: the transitions of the calls
    /// that succeeded, the error that stopped them, the failure of the release.
    async fn settle_target(
        &self,
        target: &TargetSpec,
        outcomes: &[Outcome],
        mut ride: Option<Release<'_, &str>>,
    ) -> (Vec<Transition>, Option<StoreError>, Option<StoreError>) {
        let (conn, t) = (&self.core.conn, self.core.timeout);
        let mut out = Vec::new();
        let mut release_error = None;
        for chunk in outcomes.chunks(self.core.settle_batch) {
            let inv = match ride.take() {
                Some(r) => scripts::settle_and_release(&target.keys, &target.params, chunk, r),
                None => scripts::settle(&target.keys, &target.params, chunk),
            };
            let r = match conn.invoke(&inv).await {
                Ok(v) => {
                    let (v, e) = reply::split_release_error(v);
                    release_error = release_error.or(e);
                    reply::transitions(v, &target.name, "settle.lua")
                }
                Err(e) => Err(map_err(e, t)),
            };
            match r {
                Ok(trs) => out.extend(trs),
                Err(e) => return (out, Some(e), release_error),
            }
        }
        (out, None, release_error)
    }

    /// Runs every script call of one settle batch concurrently.
    ///
    /// On a single node, the first release call of the i-th feature rides along with the
    /// first settle call of the i-th target (one script call: `settle.lua` with a release),
    /// so that a batch of one target and one feature takes one round trip. A release part
    /// that fails does not stop its outcomes from being recorded (as with separate calls).
    async fn settle_all(&self, items: &[Settle]) -> SettleResult {
        let batch = self.core.settle_batch;
        let (targets, features) = group(items);
        let conn = &self.core.conn;
        let t = self.core.timeout;

        // Each feature's release calls (id chunks; the first carries the refunds).
        let mut riding: Vec<Option<Release<'_, &str>>> = vec![None; targets.len()];
        let mut alone: Vec<Release<'_, &str>> = Vec::new();
        for (i, g) in features.iter().enumerate() {
            let emission_us = g.feature.rate.map_or(0, |r| r.emission_us);
            let mut calls = g.ids.chunks(batch).enumerate().map(|(c, ids)| Release {
                keys: &g.feature.keys,
                emission_us,
                refunds: if c == 0 { g.refunds } else { 0 },
                permit_ids: ids,
            });
            let first = calls.next().unwrap_or(Release {
                keys: &g.feature.keys,
                emission_us,
                refunds: g.refunds,
                permit_ids: &[],
            });
            match riding.get_mut(i).filter(|_| !self.is_cluster()) {
                Some(slot) => *slot = Some(first),
                None => alone.push(first),
            }
            alone.extend(calls);
        }

        let target_calls = targets
            .iter()
            .zip(riding)
            .map(|((target, outcomes), ride)| self.settle_target(target, outcomes, ride));
        let feature_calls = alone.into_iter().map(|r| {
            let inv = scripts::release(r.keys, r.emission_us, r.refunds, r.permit_ids);
            async move {
                match conn.invoke(&inv).await {
                    Ok(v) => reply::int(&v, "release.lua").err(),
                    Err(e) => Some(map_err(e, t)),
                }
            }
        });
        let work = join(join_all(target_calls), join_all(feature_calls));
        let mut result = SettleResult {
            transitions: Vec::new(),
            outcome_error: None,
            release_error: None,
        };
        match tokio::time::timeout(t, work).await {
            Err(_) => result.outcome_error = Some(StoreError::Timeout(t)),
            Ok((target_results, feature_errors)) => {
                for (trs, outcome_error, release_error) in target_results {
                    result.transitions.extend(trs);
                    result.outcome_error = result.outcome_error.or(outcome_error);
                    result.release_error = result.release_error.or(release_error);
                }
                let more = feature_errors.into_iter().flatten().next();
                result.release_error = result.release_error.or(more);
            }
        }
        result
    }
}

/// What one settle batch did.
struct SettleResult {
    /// Transitions made by the outcome calls that succeeded, in order per target.
    transitions: Vec<Transition>,
    /// The first failure of an outcome call (or of the batch: a timeout).
    outcome_error: Option<StoreError>,
    /// The first failure of a release.
    release_error: Option<StoreError>,
}

/// The only decision of a one-call script reply.
fn first(
    r: Result<(Vec<Part>, Option<Transition>), StoreError>,
) -> Result<(Part, Option<Transition>), StoreError> {
    let (parts, transition) = r?;
    match parts.into_iter().next() {
        Some(part) => Ok((part, transition)),
        None => Err(StoreError::Reply("admit.lua: no decision".to_owned())),
    }
}

impl Core {
    /// One script call, bounded by the timeout.
    async fn call(&self, inv: &ScriptInvocation<'static>) -> Result<Value, StoreError> {
        self.bounded(self.conn.invoke(inv)).await
    }

    async fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, redis::RedisError>>,
    ) -> Result<T, StoreError> {
        let t = self.timeout;
        match tokio::time::timeout(t, fut).await {
            Ok(r) => r.map_err(|e| map_err(e, t)),
            Err(_) => Err(StoreError::Timeout(t)),
        }
    }

    /// One `admit.lua` call deciding `k` calls (`call_ids`, in order) in `mode`: one decision
    /// per call, and the transition the script made (by the first call).
    async fn admit_calls<S: AsRef<str>>(
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
    /// script may still have run: the probe slot and permit it may have taken are released in
    /// the background (both releases are idempotent). A rate slot it may have taken is not
    /// refunded, since a refund is not safe to repeat.
    fn combine_whole(
        self: &Arc<Self>,
        target: &TargetSpec,
        feature: &FeatureSpec,
        call_id: &str,
        r: Result<(Part, Option<Transition>), StoreError>,
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
                if may_have_run(&e) {
                    self.spawn_free_probe(target, call_id);
                    self.spawn_release(feature, call_id, true, false);
                }
                Err(e)
            }
        }
    }

    /// The answer to a split admission from its breaker part `b` and feature part `f`, with
    /// background compensation of a part that took something the call will not use.
    fn combine_split(
        self: &Arc<Self>,
        target: &TargetSpec,
        feature: &FeatureSpec,
        call_id: &str,
        b: Result<(Part, Option<Transition>), StoreError>,
        f: Result<(Part, Option<Transition>), StoreError>,
    ) -> Result<Admission, StoreError> {
        let took_rate = feature.rate.is_some();
        match (b, f) {
            (Ok((bp, transition)), Ok((fp, _))) => Ok(match (bp, fp) {
                (
                    Part::Admitted {
                        generation, probe, ..
                    },
                    Part::Admitted { permit, .. },
                ) => Admission::Admitted(Admitted {
                    generation,
                    probe,
                    permit,
                    transition,
                }),
                (Part::Rejected(rejection), Part::Admitted { permit, .. }) => {
                    self.spawn_release(feature, call_id, permit, took_rate);
                    Admission::Rejected {
                        rejection,
                        transition,
                    }
                }
                (Part::Admitted { probe, .. }, Part::Rejected(rejection)) => {
                    if probe {
                        self.spawn_free_probe(target, call_id);
                    }
                    Admission::Rejected {
                        rejection,
                        transition,
                    }
                }
                (Part::Rejected(rejection), Part::Rejected(_)) => Admission::Rejected {
                    rejection,
                    transition,
                },
            }),
            (Err(e), f) => {
                if let Ok((Part::Admitted { permit, .. }, _)) = f {
                    self.spawn_release(feature, call_id, permit, took_rate);
                } else if f.as_ref().err().is_some_and(may_have_run) {
                    self.spawn_release(feature, call_id, true, false);
                }
                if may_have_run(&e) {
                    self.spawn_free_probe(target, call_id);
                }
                Err(e)
            }
            (Ok((bp, transition)), Err(e)) => {
                if let Part::Admitted { probe: true, .. } = bp {
                    self.spawn_free_probe(target, call_id);
                }
                if may_have_run(&e) {
                    self.spawn_release(feature, call_id, true, false);
                }
                if let Some(t) = transition {
                    self.lost_transition(&t);
                }
                Err(e)
            }
        }
    }

    /// Frees a probe slot in the background (an Ignored outcome: counts toward nothing).
    fn spawn_free_probe(self: &Arc<Self>, target: &TargetSpec, call_id: &str) {
        let outcome = Outcome {
            generation: 0,
            code: CallOutcome::Ignored.code(),
            elapsed_ms: 0,
            probe_id: call_id.to_owned(),
            count: 1,
        };
        let inv = scripts::settle(&target.keys, &target.params, std::slice::from_ref(&outcome));
        self.spawn_compensation(inv, "free probe slot", target.name.clone());
    }

    /// Releases a permit and/or refunds a rate slot in the background.
    fn spawn_release(
        self: &Arc<Self>,
        feature: &FeatureSpec,
        call_id: &str,
        permit: bool,
        refund: bool,
    ) {
        let emission_us = feature.rate.map_or(0, |r| r.emission_us);
        let refunds = usize::from(refund && emission_us > 0);
        let permit = permit && feature.bulkhead.is_some();
        if !permit && refunds == 0 {
            return;
        }
        let ids: &[&str] = if permit { &[call_id] } else { &[] };
        let inv = scripts::release(&feature.keys, emission_us, refunds, ids);
        self.spawn_compensation(inv, "release permit / refund rate", feature.name.clone());
    }

    fn spawn_compensation(
        self: &Arc<Self>,
        inv: ScriptInvocation<'static>,
        what: &'static str,
        name: String,
    ) {
        let core = Arc::clone(self);
        self.runtime.spawn(async move {
            match core.call(&inv).await {
                Ok(_) => {}
                // Expected while the store is down; the coordinator reports that already.
                Err(e) if e.is_unavailable() => tracing::debug!(
                    error = %e,
                    name = %name,
                    "fusebox: admission compensation ({what}) failed; the lease will expire"
                ),
                Err(e) => tracing::warn!(
                    error = %e,
                    name = %name,
                    "fusebox: admission compensation ({what}) failed; the lease will expire"
                ),
            }
        });
    }
}

/// Whether a failed script call may nevertheless have run (and changed state).
fn may_have_run(e: &StoreError) -> bool {
    !matches!(e, StoreError::Command(_))
}

/// A queued admission whose caller may stop waiting. Dropped while still armed (the caller's
/// future was cancelled), it closes the answer channel: either the batcher then finds the job
/// abandoned and gives back what it was granted, or the answer had already arrived and is
/// given back here (the call never ran: its probe slot, permit and rate slot).
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
        if let Ok(Ok(Admission::Admitted(a))) = answer.try_recv() {
            if a.probe {
                self.core
                    .spawn_free_probe(self.req.target, self.req.call_id);
            }
            self.core
                .spawn_release(self.req.feature, self.req.call_id, a.permit, true);
            if let Some(t) = &a.transition {
                self.core.lost_transition(t);
            }
        }
    }
}

impl Core {
    /// A transition that happened but whose operation's result is lost: logged, and given
    /// to the transition sink so that it is still reported once.
    fn lost_transition(&self, t: &Transition) {
        tracing::debug!(
            target_name = %t.target,
            from = %t.from,
            to = %t.to,
            generation = t.generation,
            reason = t.reason.as_str(),
            "fusebox: breaker transition made by a store call whose result was lost"
        );
        match self.lost.get() {
            Some(sink) => sink(t.clone()),
            None => tracing::warn!(
                target_name = %t.target,
                from = %t.from,
                to = %t.to,
                generation = t.generation,
                "fusebox: breaker transition not reported (no transition sink)"
            ),
        }
    }
}

fn single_node(url: &str, config: &RedisConfig) -> Result<redis::aio::ConnectionManager, Error> {
    let client = redis::Client::open(url)
        .map_err(|e| Error::config("redis.url", format!("is not a usable Redis URL: {e}")))?;
    let cm_config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(config.connect_timeout))
        .set_response_timeout(Some(config.timeout))
        .set_min_delay(RECONNECT_MIN_DELAY)
        .set_max_delay(RECONNECT_MAX_DELAY)
        .set_number_of_retries(RECONNECT_TRIES);
    client
        .get_connection_manager_lazy(cm_config)
        .map_err(|e| Error::config("redis.url", e.to_string()))
}

fn cluster(config: &RedisConfig, runtime: tokio::runtime::Handle) -> Result<ClusterHandle, Error> {
    for (i, url) in config.cluster.iter().enumerate() {
        url.as_str().into_connection_info().map_err(|e| {
            Error::config(
                format!("redis.cluster[{i}]"),
                format!("is not a usable Redis URL: {e}"),
            )
        })?;
    }
    let client = ClusterClient::builder(config.cluster.iter().map(String::as_str))
        .connection_timeout(config.connect_timeout)
        .response_timeout(config.timeout)
        // Redirects (MOVED / ASK) need retries; keep their waits well inside the timeout.
        .retries(3)
        .min_retry_wait(5)
        .max_retry_wait(50)
        .build()
        .map_err(|e| Error::config("redis.cluster", e.to_string()))?;
    Ok(ClusterHandle::new(client, config.connect_timeout, runtime))
}

/// One target's outcomes of a settle batch, in order.
type TargetGroup<'a> = (&'a TargetSpec, Vec<Outcome>);

/// One feature's releases of a settle batch.
struct FeatureGroup<'a> {
    feature: &'a FeatureSpec,
    ids: Vec<&'a str>,
    refunds: usize,
}

fn group(items: &[Settle]) -> (Vec<TargetGroup<'_>>, Vec<FeatureGroup<'_>>) {
    let mut targets: Vec<TargetGroup<'_>> = Vec::new();
    let mut target_at: HashMap<&str, usize> = HashMap::new();
    let mut features: Vec<FeatureGroup<'_>> = Vec::new();
    let mut feature_at: HashMap<&str, usize> = HashMap::new();
    // The groups of the previous item: consecutive items mostly share them.
    let (mut last_target, mut last_feature) = (usize::MAX, usize::MAX);
    for s in items {
        // An ignored outcome of a call without a probe slot changes nothing: not sent.
        if s.outcome != CallOutcome::Ignored || s.probe {
            let same = targets.get(last_target).is_some_and(|(t, _)| {
                std::ptr::eq(*t, &*s.target) || t.keys.breaker == s.target.keys.breaker
            });
            let i = if same {
                last_target
            } else {
                *target_at
                    .entry(s.target.keys.breaker.as_str())
                    .or_insert_with(|| {
                        targets.push((&s.target, Vec::new()));
                        targets.len() - 1
                    })
            };
            last_target = i;
            if let Some((target, outcomes)) = targets.get_mut(i) {
                push_outcome(outcomes, target, s);
            }
        }
        let refund = s.refund_rate && s.feature.rate.is_some();
        if s.permit || refund {
            let same = features.get(last_feature).is_some_and(|g| {
                std::ptr::eq(g.feature, &*s.feature)
                    || g.feature.keys.permits == s.feature.keys.permits
            });
            let i = if same {
                last_feature
            } else {
                *feature_at
                    .entry(s.feature.keys.permits.as_str())
                    .or_insert_with(|| {
                        features.push(FeatureGroup {
                            feature: &s.feature,
                            ids: Vec::new(),
                            refunds: 0,
                        });
                        features.len() - 1
                    })
            };
            last_feature = i;
            if let Some(g) = features.get_mut(i) {
                if s.permit {
                    g.ids.push(s.call_id.as_str());
                }
                g.refunds += usize::from(refund);
            }
        }
    }
    (targets, features)
}

/// Appends one settled call to its target's entries, merged into the last entry when it is
/// the same outcome again (same generation and code, both slow or both not, no probe slot):
/// `settle.lua` records an entry of `count` outcomes exactly as that many entries in a row.
fn push_outcome(outcomes: &mut Vec<Outcome>, target: &TargetSpec, s: &Settle) {
    let slow_ms = target.params.slow_call_ms;
    let slow = |elapsed_ms: u64| slow_ms > 0 && elapsed_ms >= slow_ms;
    let code = s.outcome.code();
    if !s.probe {
        if let Some(last) = outcomes.last_mut() {
            if last.probe_id.is_empty()
                && last.generation == s.generation
                && last.code == code
                && slow(last.elapsed_ms) == slow(s.elapsed_ms)
                && last.count < u32::MAX
            {
                last.count += 1;
                return;
            }
        }
    }
    outcomes.push(Outcome {
        generation: s.generation,
        code,
        elapsed_ms: s.elapsed_ms,
        probe_id: if s.probe {
            s.call_id.clone()
        } else {
            String::new()
        },
        count: 1,
    });
}

/// An `admit.lua` reply for `k` calls: `{now, t_from, t_to, t_generation, t_reason, m,
/// generation, probe, permit, code, a, b}`: the first `m` calls admitted alike, the others
/// refused alike.
fn parse_admit(
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

impl Store for RedisStore {
    /// Decided by the batcher ((`batch.rs`)) together with the admissions queued at the same
    /// time: one `admit.lua` call per (target, feature) on a single node; per target (breaker
    /// part) and per feature (feature part), with background compensation, on Cluster (or
    /// when forced with [`RedisStore::with_split_admit`]). When the batcher's queue is full,
    /// the caller makes its own script call(s) instead.
    ///
    /// The wait is bounded by the timeout. A caller that stops waiting holds nothing: the
    /// batcher gives back what its call was granted (probe slot, permit, rate slot). On a
    /// timeout or connection error of the script call itself the script may still have run:
    /// the probe slot and permit it may have taken are released in the background
    /// (idempotent); a rate slot it may have taken is not refunded.
    async fn admit(&self, req: AdmitRequest<'_>) -> Result<Admission, StoreError> {
        self.admit_batched(req).await
    }

    /// One `settle.lua` call per target (chunks of `settle_batch`, in order) and one
    /// `release.lua` call per feature, all sent concurrently, bounded together by the timeout;
    /// on a single node a target's first call also carries a feature's first release.
    ///
    /// When every outcome was recorded but a release was refused by Redis (a key of the wrong
    /// type), the transitions are returned (they happened, and this is the only report of
    /// them) and the release failure is logged: that permit ends with its lease, as after any
    /// lost release. Otherwise, on error, some of the calls may have been applied (and a
    /// timed-out call may still apply): re-sending the same items can count outcomes and
    /// refunds twice (permit releases are idempotent). Transitions made by calls that
    /// succeeded are then logged.
    async fn settle(&self, items: &[Settle]) -> Result<Vec<Transition>, StoreError> {
        let r = self.settle_all(items).await;
        match (r.outcome_error, r.release_error) {
            (None, None) => Ok(r.transitions),
            (None, Some(e)) if !e.is_unavailable() => {
                tracing::warn!(
                    error = %e,
                    "fusebox: a permit release failed; the permit will end with its lease"
                );
                Ok(r.transitions)
            }
            (Some(e), _) | (None, Some(e)) => {
                for t in &r.transitions {
                    self.core.lost_transition(t);
                }
                Err(e)
            }
        }
    }

    async fn heartbeat(&self, feature: &FeatureSpec, call_id: &str) -> Result<bool, StoreError> {
        let Some(b) = &feature.bulkhead else {
            return Ok(false);
        };
        let v = self
            .call_idempotent(&scripts::heartbeat(&feature.keys, call_id, b.lease_ms))
            .await?;
        Ok(reply::int(&v, "heartbeat.lua")? == 1)
    }

    async fn set_not_before(
        &self,
        target: &TargetSpec,
        retry_after_ms: u64,
    ) -> Result<(), StoreError> {
        let inv = scripts::not_before(&target.keys, retry_after_ms, target.params.idle_ttl_ms);
        let v = self.call_idempotent(&inv).await?;
        match reply::ints(v, "not_before.lua")?[..] {
            [_, _] => Ok(()),
            ref other => Err(StoreError::Reply(format!(
                "not_before.lua: expected 2 integers, got {}",
                other.len()
            ))),
        }
    }

    async fn force(
        &self,
        target: &TargetSpec,
        cmd: Force,
    ) -> Result<Option<Transition>, StoreError> {
        let inv = scripts::force(&target.keys, cmd, target.params.idle_ttl_ms);
        let v = self.call_idempotent(&inv).await?;
        let mut trs = reply::transitions(v, &target.name, "force.lua")?;
        if trs.len() > 1 {
            return Err(StoreError::Reply(format!(
                "force.lua: {} transitions for one command",
                trs.len()
            )));
        }
        Ok(trs.pop())
    }

    async fn snapshot(&self, target: &TargetSpec) -> Result<BreakerSnapshot, StoreError> {
        let v = self
            .call_idempotent(&scripts::snapshot(&target.keys))
            .await?;
        let (now, state) = reply::snapshot_state(v)?;
        Ok(state.snapshot(&target.params, now))
    }

    async fn in_flight(&self, feature: &FeatureSpec) -> Result<u32, StoreError> {
        let v = self
            .call_idempotent(&scripts::in_flight(&feature.keys))
            .await?;
        let n = reply::int(&v, "in_flight.lua")?;
        u32::try_from(n).map_err(|_| StoreError::Reply(format!("in_flight.lua: count {n}")))
    }
}
