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

mod admit;
mod alert;
mod attempt;
mod batch;
mod budget;
mod cache;
#[cfg(test)]
mod cache_difftest;
mod compensate;
mod conn;
mod connect;
#[cfg(test)]
mod difftest;
mod membership;
mod pending;
mod reconcile;
mod reply;
mod ride;
mod scripts;
mod settle;
mod takeback;
#[cfg(test)]
mod tests;

pub(crate) use self::pending::SettleQueue;

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redis::{ScriptInvocation, Value};
use tokio::sync::mpsc;

use self::conn::{map_err, Conn};
use super::{Admission, AdmitRequest, FeatureSpec, Settle, Store, TargetSpec};
use crate::breaker::{BreakerSnapshot, Force, Transition};
use crate::config::RedisConfig;
use crate::{Error, StoreError};

/// Bound on loading the scripts (at least the store's timeout).
const SCRIPT_LOAD_TIMEOUT: Duration = Duration::from_secs(1);

/// [`Store`] on Redis (single node or Cluster). Cheap to clone (clones share connections and
/// the admission batcher).
#[derive(Clone)]
pub struct RedisStore {
    core: Arc<Core>,
    /// The admission batcher's queue ((`batch.rs`)); its task ends when every clone is dropped.
    admissions: mpsc::Sender<batch::Job>,
    split_admit: bool,
    /// The degraded-response cache's own connections (`cache.rs`).
    cache: Arc<cache::CachePool>,
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
    /// Settles not delivered yet: taken by this replica's next admission on their keys, or
    /// sent by the flusher ((`pending.rs`)).
    settles: pending::SettleQueue,
    /// Where transitions go that a store call made but could not return (its caller gave
    /// up, or another part of the same operation failed): the coordinator reports them.
    lost: std::sync::OnceLock<TransitionSink>,
    /// Take-backs waiting to be (re)sent (`takeback.rs`).
    takebacks: takeback::TakeBacks,
    /// Whether Redis may have lost the scripts (not loaded yet, or it was unreachable since
    /// they were): the next call that gets an answer loads them again, in the background.
    scripts_stale: Arc<AtomicBool>,
    /// Held by whoever has an admission script call in flight (the batcher for a batch, or
    /// a lone caller for its own): one at a time, so that settles riding with admissions
    /// land in the order they were taken (`batch.rs`).
    admitting: Arc<tokio::sync::Mutex<()>>,
    /// Admissions in progress through [`RedisStore::admit`](Store::admit): a caller that
    /// finds none makes its script call from its own task, without the batcher's task hop.
    admissions_in_progress: std::sync::atomic::AtomicUsize,
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
            (Some(url), true) => Conn::Single(Arc::new(connect::single_node(url, config)?)),
            (None, false) => Conn::Cluster(Arc::new(connect::cluster(config, runtime.clone())?)),
            _ => {
                return Err(Error::config(
                    "redis.url",
                    "set exactly one of redis.url and redis.cluster",
                ))
            }
        };
        let core = Arc::new(Core {
            conn,
            timeout: config.timeout,
            settle_batch: config.settle_batch.max(1),
            runtime: runtime.clone(),
            specs: batch::SpecCache::default(),
            settles: pending::SettleQueue::new(config.settle_queue),
            lost: std::sync::OnceLock::new(),
            takebacks: takeback::TakeBacks::default(),
            scripts_stale: Arc::new(AtomicBool::new(true)),
            admitting: Arc::new(tokio::sync::Mutex::new(())),
            admissions_in_progress: std::sync::atomic::AtomicUsize::new(0),
        });
        // Connect and load the scripts now, in the background, so the first call does not
        // pay for it.
        core.note(&Ok(()));
        let cache = Arc::new(cache::CachePool::new(config)?);
        let (admissions, queue) = mpsc::channel(batch::QUEUE);
        runtime.spawn(batch::run(Arc::clone(&core), queue));
        Ok(RedisStore {
            core,
            admissions,
            split_admit: false,
            cache,
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

    /// The runtime the store's connection and background tasks run on (the one it was
    /// connected from).
    pub(crate) fn runtime(&self) -> &tokio::runtime::Handle {
        &self.core.runtime
    }

    /// The queue of settles this replica has not delivered yet (see `pending.rs`).
    pub(crate) fn settles(&self) -> &SettleQueue {
        &self.core.settles
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
        let r = match tokio::time::timeout(t, self.core.conn.ping()).await {
            Ok(r) => r.map_err(|e| map_err(e, t)),
            Err(_) => Err(StoreError::Timeout(t)),
        };
        self.core.note(&r);
        r
    }

    /// One call of a script that is safe to repeat: retried once (within the same timeout)
    /// when the connection turned out to be dropped, since the connection manager reconnects
    /// in the background but does not resend the failed command.
    async fn call_idempotent(&self, inv: &ScriptInvocation<'static>) -> Result<Value, StoreError> {
        let conn = &self.core.conn;
        let r = self
            .core
            .bounded(async move {
                match conn.invoke(inv).await {
                    Err(e) if e.is_connection_dropped() => conn.invoke(inv).await,
                    r => r,
                }
            })
            .await;
        self.core.note(&r);
        r
    }
}

impl Core {
    /// One script call, bounded by the timeout.
    async fn call(&self, inv: &ScriptInvocation<'static>) -> Result<Value, StoreError> {
        let r = self.bounded(self.conn.invoke(inv)).await;
        self.note(&r);
        r
    }

    /// Notes how a call went: after a failure that may mean Redis restarted (unreachable,
    /// timed out) the scripts are loaded again, in the background, by the next call that
    /// gets an answer, and the take-backs waiting out a backoff are sent at once.
    fn note<T>(&self, r: &Result<T, StoreError>) {
        match r {
            Ok(_) => {
                if self.scripts_stale.load(Ordering::Relaxed)
                    && self.scripts_stale.swap(false, Ordering::AcqRel)
                {
                    self.takebacks.retry_now();
                    let (conn, stale) = (self.conn.clone(), Arc::clone(&self.scripts_stale));
                    let bound = self.timeout.max(SCRIPT_LOAD_TIMEOUT);
                    self.runtime.spawn(async move {
                        let loaded = tokio::time::timeout(bound, conn.load_scripts()).await;
                        if !matches!(loaded, Ok(Ok(()))) {
                            stale.store(true, Ordering::Release);
                        }
                    });
                }
            }
            Err(e) if e.is_unavailable() => self.scripts_stale.store(true, Ordering::Release),
            Err(_) => {}
        }
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
        self.report_transition(t);
    }
}

impl Core {
    /// A transition made by settles that rode with an admission: reported once, through the
    /// transition sink.
    fn report_transition(&self, t: &Transition) {
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

    /// One `admit.lua` call in `breaker` mode, with the target's queued outcomes riding
    /// along (see `attempt.rs`); not batched. A caller that stops waiting holds nothing.
    async fn admit_target(&self, req: AdmitRequest<'_>) -> Result<Admission, StoreError> {
        self.admit_attempt(req).await
    }

    /// One `settle.lua` call per target (chunks of `settle_batch`, in order) and one
    /// `release.lua` call per feature, all sent concurrently, each bounded by the timeout;
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
