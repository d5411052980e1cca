//! The coordinator: admits calls against shared state, runs them, settles their outcomes.
//!
//! It owns the store (Redis, or the embedded in-memory store), a local in-memory store for
//! Redis-down mode, a breaker around Redis itself (`health`) and the background settle
//! queue (`flusher`).

mod alert;
mod cache;
mod fleet;
mod flusher;
mod health;
mod operator;
mod permit;
mod request;
mod retry;
mod skip;
mod tiered;

pub use fleet::Member;
pub use operator::{BudgetStatus, KnownNames, Reading};
pub use permit::{Heartbeat, Permit};
pub use request::{Attempt, Request};
pub use retry::{RetryBudget, Withdrawal};
pub use tiered::Source;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::time::Instant;

use rand::Rng;
use tokio::sync::Notify;

use self::fleet::Fleet;
use self::health::Health;
use self::tiered::{Remote, Reporter, Sink, Tiered, Tried};
use crate::breaker::{BreakerParams, CallOutcome};
use crate::bulkhead::BulkheadParams;
use crate::clock::{Clock, TokioClock};
use crate::config::{check_name, Config, FeatureConfig, StorePolicy};
use crate::keys::{feature_keys, target_keys};
use crate::observer::{Event, Observer};
use crate::ratelimit::RateParams;
use crate::store::{
    Admission, AdmitRequest, FeatureSpec, MemoryStore, RedisStore, Store, TargetSpec,
};
use crate::{CallError, Error, Rejection, StoreError};

/// Most target names remembered (unconfigured targets get the default breaker settings;
/// past this many distinct names, specs are built per call instead of cached).
const TARGET_CACHE_MAX: usize = 10_000;

/// Admits calls to targets on behalf of features, against state shared by the whole fleet.
/// Cheap to clone.
#[derive(Clone)]
pub struct Coordinator {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Coordinator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Coordinator")
            .field("namespace", &self.shared.namespace)
            .field("redis", &self.shared.tiered.remote.is_some())
            .field("degraded", &self.is_degraded())
            .finish_non_exhaustive()
    }
}

pub(crate) struct FeatureRt {
    pub(crate) spec: Arc<FeatureSpec>,
    /// The same feature with limits divided by the fleet size, for local mode (replaced when
    /// the observed fleet size changes).
    local: RwLock<Arc<FeatureSpec>>,
    pub(crate) max_wait: Duration,
    pub(crate) policy: StorePolicy,
    pub(crate) lease: Duration,
    /// One waiter is woken per permit of this feature released (by this replica), so it
    /// retries at once instead of all waiters stampeding Redis.
    pub(crate) released: Notify,
    /// Callers of this feature waiting on this replica (for a permit or a rate slot): while
    /// there are any, this replica's releases of the feature are sent without delay.
    pub(crate) waiting: AtomicUsize,
    /// Shared permits of this feature held by this replica's running calls: local mode
    /// counts them against its share.
    pub(crate) held_shared: AtomicU32,
}

pub(crate) struct Shared {
    namespace: String,
    default_breaker: BreakerParams,
    targets: RwLock<HashMap<String, Arc<TargetSpec>>>,
    /// The targets the configuration names: under `[targets]` or in a feature's `chain`.
    configured_targets: std::collections::HashSet<String>,
    pub(crate) features: Arc<HashMap<String, Arc<FeatureRt>>>,
    /// Shared store, local store, health and reporting: the one routing seam.
    pub(crate) tiered: Tiered,
    /// The operator API's own connection (see [`operator`]).
    pub(crate) operator: operator::OperatorLink,
    replica: String,
    counter: AtomicU64,
    /// The fleet's size as this replica last observed it (local mode divides by it).
    pub(crate) fleet: Fleet,
    /// Every feature's fallback chain.
    pub(crate) plans: HashMap<String, Arc<crate::pipeline::Plan>>,
    /// Targets this replica was told are open, refused without asking (the request API).
    pub(crate) skips: skip::Skips,
    /// Each feature's degraded-response cache settings.
    caches: HashMap<String, Arc<cache::FeatureCache>>,
    /// Retry settings per feature and retry budgets per target.
    retries: retry::Retries,
    /// The fleet health signal's counters.
    alerts: alert::Alerts,
}

/// Builds a [`Coordinator`]: configuration plus optional observer and clock.
pub struct CoordinatorBuilder {
    config: Config,
    observer: Arc<dyn Observer>,
    clock: Arc<dyn Clock>,
    require_store: bool,
}

impl std::fmt::Debug for CoordinatorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatorBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl CoordinatorBuilder {
    /// Receives transitions, rejections and store health changes.
    pub fn observer(mut self, observer: Arc<dyn Observer>) -> Self {
        self.observer = observer;
        self
    }

    /// The clock of the in-memory store (tests; Redis always uses its own `TIME`).
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// For services that must not start without the shared store: [`Self::build`] then
    /// fails with the store's error (refused, authentication, DNS, TLS, timeout...) when
    /// Redis does not answer within `redis.connect_timeout`. Default: off (a degraded start,
    /// visible in [`Coordinator::is_degraded`] and an [`Event::StoreDegraded`]). Without
    /// `[redis]` there is nothing to require.
    pub fn require_store(mut self, required: bool) -> Self {
        self.require_store = required;
        self
    }

    /// Validates the configuration and connects, waiting up to `redis.connect_timeout` for
    /// Redis to answer. Fails on invalid configuration (naming the field); when Redis does
    /// not answer, fails only with [`Self::require_store`], and otherwise starts in local
    /// mode: [`Coordinator::is_degraded`] is true and [`Event::StoreDegraded`] was observed.
    pub async fn build(self) -> Result<Coordinator, Error> {
        let config = self.config;
        config.validate()?;
        let idle_ttl = config
            .redis
            .as_ref()
            .map_or(Duration::from_secs(24 * 3600), |r| r.idle_ttl);
        let idle_ttl_ms = idle_ttl.as_millis() as u64;
        let replicas = config.redis.as_ref().map_or(1, |r| r.replicas);
        let fleet = Fleet::new(
            &config.namespace,
            replicas,
            config
                .redis
                .as_ref()
                .map_or(Duration::from_secs(1), |r| r.retry_interval),
        );
        let ns = config.namespace.clone();
        let ns_cache = ns.clone();

        let mut targets = HashMap::new();
        let configured_targets = config
            .targets
            .keys()
            .chain(config.features.values().flat_map(|f| f.chain.iter()))
            .cloned()
            .collect();
        for name in config.targets.keys() {
            targets.insert(
                name.clone(),
                Arc::new(TargetSpec {
                    name: name.clone(),
                    keys: target_keys(&ns, name),
                    params: BreakerParams::from_config(&config.breaker_for(name), idle_ttl_ms),
                }),
            );
        }
        let features: Arc<HashMap<_, _>> = Arc::new(
            config
                .features
                .iter()
                .map(|(name, f)| (name.clone(), Arc::new(feature_rt(&ns, name, f, replicas))))
                .collect(),
        );

        let local = MemoryStore::new(self.clock).with_idle_ttl(idle_ttl);
        let health = config
            .redis
            .as_ref()
            .map(|rc| Arc::new(Health::new(rc.failure_threshold, rc.retry_interval)));
        let reporter = Reporter {
            observer: self.observer,
            health,
            on_open: Arc::default(),
        };
        let mut flusher = None;
        let remote = match &config.redis {
            None => None,
            Some(rc) => {
                let store = RedisStore::connect(rc).await?;
                let sink_reporter = reporter.clone();
                store.set_transition_sink(Arc::new(move |t| {
                    sink_reporter.emit(Event::Transition(t));
                }));
                let sink = Sink {
                    store: store.clone(),
                    reporter: reporter.clone(),
                    features: Arc::clone(&features),
                    tally: Arc::default(),
                };
                flusher = Some((
                    sink.clone(),
                    flusher::Batching {
                        max: rc.settle_batch,
                        delay: rc.settle_delay,
                    },
                ));
                Some(Remote { store, sink })
            }
        };
        let replica: u64 = rand::rng().random();
        let shared = Arc::new(Shared {
            namespace: ns,
            default_breaker: BreakerParams::from_config(&config.breaker, idle_ttl_ms),
            targets: RwLock::new(targets),
            configured_targets,
            features,
            tiered: Tiered::new(remote, local, reporter),
            operator: operator::OperatorLink::new(config.redis.as_ref()),
            replica: format!("{replica:016x}"),
            counter: AtomicU64::new(0),
            fleet,
            skips: skip::Skips::default(),
            plans: crate::pipeline::Plan::all(&config),
            caches: config
                .features
                .iter()
                .map(|(name, f)| {
                    let c = cache::FeatureCache::new(&ns_cache, name, f.cache(&config.cache));
                    (name.clone(), Arc::new(c))
                })
                .collect(),
            retries: retry::Retries::new(&config),
            alerts: alert::Alerts::new(&config),
        });
        let weak = Arc::downgrade(&shared);
        let _ = shared
            .tiered
            .reporter
            .on_open
            .set(Arc::new(move |t: &crate::Transition| {
                if let Some(s) = weak.upgrade() {
                    s.seed_open(&t.target, None);
                }
            }));
        if let (Some(r), Some(rc)) = (&shared.tiered.remote, &config.redis) {
            if startup_probe(&r.store, rc.connect_timeout).await.is_err() {
                // The hot path's short timeout often ends before a failing connect can tell
                // why: ask over the operator's connection, which names the cause.
                let why = Coordinator {
                    shared: Arc::clone(&shared),
                }
                .check_store()
                .await;
                match why {
                    Ok(_) => {}
                    Err(e) if self.require_store => return Err(e),
                    Err(e) => {
                        let cause = match e {
                            Error::Store(s) => s,
                            other => StoreError::Connection(other.to_string()),
                        };
                        shared.tiered.reporter.store_down(&cause);
                    }
                }
            }
        }
        if let Some((sink, batch)) = flusher {
            tokio::spawn(flusher::run(sink, batch));
        }
        Ok(Coordinator { shared })
    }
}

/// Pings Redis until it answers or `within` has passed; errors that waiting cannot cure
/// (authentication, DNS, TLS, a protocol or script error) end it at once.
async fn startup_probe(store: &RedisStore, within: Duration) -> Result<(), StoreError> {
    let deadline = Instant::now() + within;
    loop {
        let err = match store.ping().await {
            Ok(()) => return Ok(()),
            Err(e) => e,
        };
        let transient = matches!(
            err,
            StoreError::Timeout(_) | StoreError::Refused(_) | StoreError::Connection(_)
        );
        if !transient || Instant::now() + Duration::from_millis(20) >= deadline {
            return Err(err);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn feature_rt(ns: &str, name: &str, f: &FeatureConfig, replicas: u32) -> FeatureRt {
    let lease_ms = f.lease.as_millis() as u64;
    let rate = f.rate.as_ref().map(|r| {
        let per_us = r.per.as_micros() as u64;
        let requests = u64::from(r.requests.max(1));
        RateParams {
            emission_us: (per_us / requests).max(1),
            burst: r.burst.unwrap_or(r.requests).max(1),
        }
    });
    let spec = FeatureSpec {
        name: name.to_owned(),
        keys: feature_keys(ns, name),
        bulkhead: f
            .max_concurrent
            .map(|limit| BulkheadParams { limit, lease_ms }),
        rate,
    };
    let local = local_share(&spec, replicas);
    FeatureRt {
        spec: Arc::new(spec),
        local: RwLock::new(Arc::new(local)),
        max_wait: f.max_wait,
        policy: f.on_store_unavailable,
        lease: f.lease,
        released: Notify::new(),
        waiting: AtomicUsize::new(0),
        held_shared: AtomicU32::new(0),
    }
}

/// `spec` with its bulkhead limit and rate divided by the fleet size `replicas` (rounded up).
fn local_share(spec: &FeatureSpec, replicas: u32) -> FeatureSpec {
    let r = replicas.max(1);
    FeatureSpec {
        bulkhead: spec.bulkhead.map(|b| BulkheadParams {
            limit: b.limit.div_ceil(r),
            ..b
        }),
        rate: spec.rate.map(|p| RateParams {
            emission_us: p.emission_us.saturating_mul(u64::from(r)),
            burst: p.burst.div_ceil(r),
        }),
        ..spec.clone()
    }
}

impl FeatureRt {
    /// The feature's local-mode share of its limits.
    pub(crate) fn local(&self) -> Arc<FeatureSpec> {
        Arc::clone(&self.local.read().unwrap_or_else(|p| p.into_inner()))
    }
}

impl Shared {
    /// Recomputes every feature's local share after the fleet size changed.
    pub(crate) fn reshare(&self) {
        let r = self.fleet.divisor();
        for f in self.features.values() {
            let local = Arc::new(local_share(&f.spec, r));
            *f.local.write().unwrap_or_else(|p| p.into_inner()) = local;
        }
    }

    /// Seeds the local breaker of `target` with an open state the shared store reported
    /// (`open_ms`: how long it stays open; `None`: the target's base open duration), so that
    /// a replica that degrades during an outage does not try a dead target again.
    fn seed_open(&self, target: &str, open_ms: Option<u64>) {
        if self.tiered.remote.is_none() {
            return;
        }
        if let Ok(t) = self.target(target) {
            let ms = open_ms.unwrap_or(t.params.open_ms);
            self.tiered.local.seed_open(&t, ms);
        }
    }

    /// Starts renewing this replica's fleet membership (once; with a shared store only).
    fn join_fleet(self: &Arc<Self>) {
        if self.tiered.remote.is_some() && self.fleet.join_once() {
            self.tiered
                .spawn_background(fleet::run(Arc::downgrade(self)));
        }
    }

    pub(crate) fn emit(&self, event: Event) {
        self.tiered.reporter.emit(event);
    }

    fn target(&self, name: &str) -> Result<Arc<TargetSpec>, Error> {
        if let Some(t) = self
            .targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return Ok(Arc::clone(t));
        }
        check_name("target", name)?;
        let spec = Arc::new(TargetSpec {
            name: name.to_owned(),
            keys: target_keys(&self.namespace, name),
            params: self.default_breaker.clone(),
        });
        let mut map = self.targets.write().unwrap_or_else(|p| p.into_inner());
        if map.len() < TARGET_CACHE_MAX {
            map.insert(name.to_owned(), Arc::clone(&spec));
        }
        Ok(spec)
    }

    /// Whether the configuration names `name` (under `[targets]` or in a feature's chain).
    fn is_configured_target(&self, name: &str) -> bool {
        self.configured_targets.contains(name)
    }

    /// Whether this process has a spec for `name` (configured, or used by a call or read).
    fn has_target_spec(&self, name: &str) -> bool {
        self.targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(name)
    }

    fn feature(&self, name: &str) -> Result<Arc<FeatureRt>, Error> {
        self.features
            .get(name)
            .cloned()
            .ok_or_else(|| Error::UnknownFeature(name.to_owned()))
    }

    /// `<replica>-<counter in hex>`: unique fleet-wide, never reused by this replica.
    fn next_call_id(&self) -> String {
        use std::fmt::Write as _;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut id = String::with_capacity(self.replica.len() + 17);
        id.push_str(&self.replica);
        let _ = write!(id, "-{n:x}");
        id
    }
}

/// Where an admitted call's state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Location {
    Shared,
    Local,
}

impl Coordinator {
    /// Validates `config` and connects (see [`CoordinatorBuilder::build`]).
    pub async fn new(config: Config) -> Result<Self, Error> {
        Self::builder(config).build().await
    }

    /// A builder, to add an observer or a clock.
    pub fn builder(config: Config) -> CoordinatorBuilder {
        CoordinatorBuilder {
            config,
            observer: Arc::new(()),
            clock: Arc::new(TokioClock::new()),
            require_store: false,
        }
    }

    pub(crate) fn plan(&self, feature: &str) -> Result<Arc<crate::pipeline::Plan>, Error> {
        self.shared
            .plans
            .get(feature)
            .cloned()
            .ok_or_else(|| Error::UnknownFeature(feature.to_owned()))
    }

    pub(crate) fn emit(&self, event: Event) {
        self.shared.emit(event);
    }

    /// True while Redis is configured but unreachable and this replica runs on local state.
    pub fn is_degraded(&self) -> bool {
        self.shared.tiered.is_degraded()
    }

    /// Asks to run one call of `feature` against `target`. Waits up to the feature's
    /// `max_wait` for a bulkhead permit or rate-limit slot; otherwise answers at once.
    /// The returned [`Permit`] must be given the call's outcome ([`Permit::record`]);
    /// dropping it releases what it holds without counting an outcome.
    pub async fn admit(&self, feature: &str, target: &str) -> Result<Permit, Error> {
        let f = self.shared.feature(feature)?;
        let t = self.shared.target(target)?;
        self.shared.join_fleet();
        let deadline = Instant::now() + f.max_wait;
        let mut attempt: u32 = 0;
        // From the first refusal it waits out until it returns: counted as waiting.
        let mut waiting: Option<Waiting<'_>> = None;
        loop {
            let released = f.released.notified();
            tokio::pin!(released);
            released.as_mut().enable();
            let rejection = match self.try_admit(&f, &t).await {
                Ok(permit) => return Ok(permit),
                Err(r) => r,
            };
            let now = Instant::now();
            let waitable = matches!(
                rejection,
                Rejection::BulkheadFull { .. } | Rejection::RateLimited { .. }
            );
            if !waitable || now >= deadline {
                self.shared.emit(Event::Rejected {
                    feature: f.spec.name.clone(),
                    target: t.name.clone(),
                    rejection: rejection.clone(),
                });
                return Err(Error::Rejected(rejection));
            }
            let left = deadline - now;
            let pause = wait_step(&rejection, attempt).min(left);
            attempt = attempt.saturating_add(1);
            waiting.get_or_insert_with(|| Waiting::new(&f.waiting));
            tokio::select! {
                _ = &mut released => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
    }

    async fn try_admit(
        &self,
        f: &Arc<FeatureRt>,
        t: &Arc<TargetSpec>,
    ) -> Result<Permit, Rejection> {
        let call_id = self.shared.next_call_id();
        let tiered = &self.shared.tiered;
        let req = AdmitRequest {
            target: t,
            feature: &f.spec,
            call_id: &call_id,
        };
        // A timed-out remote admission is given back by RedisStore in the background
        // (whatever the script may have taken under this call id, never reused).
        let tried = tiered.remote(|store| store.admit(req)).await;
        let tried = match tried {
            Tried::Done(admission) => {
                if let Admission::Rejected {
                    rejection: Rejection::CircuitOpen { retry_after, .. },
                    ..
                } = &admission
                {
                    // Forced open (no retry-after): the base open duration, re-seeded by
                    // every refusal while it lasts.
                    let ms = retry_after.map(|d| d.as_millis() as u64);
                    self.shared.seed_open(&t.name, ms);
                }
                if let Admission::Rejected { rejection, .. } = &admission {
                    self.shared.skips.learn(rejection);
                }
                return self.finish(admission, f, t, call_id, Location::Shared);
            }
            Tried::Embedded => {
                let admission = tiered.local.admit_now(req);
                return self.finish(admission, f, t, call_id, Location::Shared);
            }
            other => other,
        };
        if f.policy == StorePolicy::FailClosed {
            return Err(Rejection::StoreUnavailable {
                feature: f.spec.name.clone(),
            });
        }
        // A fresh id for the local grant: the failed remote admission's id may still be
        // taken back in Redis (retried until delivered), and a local permit registered there
        // later under the same id would be removed by that take-back.
        let call_id = match tried {
            Tried::Failed(_) => self.shared.next_call_id(),
            _ => call_id,
        };
        let local = f.local();
        let req = AdmitRequest {
            target: t,
            feature: &local,
            call_id: &call_id,
        };
        // This replica's shared permits still running count against its local share.
        let admission = tiered
            .local
            .admit_holding(req, f.held_shared.load(Ordering::Acquire));
        if matches!(&admission, Admission::Admitted(a) if a.permit) {
            tiered.local_granted(&call_id, t, &f.spec);
        }
        self.finish(admission, f, t, call_id, Location::Local)
    }

    fn finish(
        &self,
        admission: Admission,
        f: &Arc<FeatureRt>,
        t: &Arc<TargetSpec>,
        call_id: String,
        location: Location,
    ) -> Result<Permit, Rejection> {
        match admission {
            Admission::Admitted(a) => {
                if let Some(tr) = a.transition.clone() {
                    self.shared.emit(Event::Transition(tr));
                }
                Ok(Permit::new(
                    Arc::clone(&self.shared),
                    Arc::clone(f),
                    Arc::clone(t),
                    call_id,
                    a,
                    location,
                ))
            }
            Admission::Rejected {
                rejection,
                transition,
            } => {
                if let Some(tr) = transition {
                    self.shared.emit(Event::Transition(tr));
                }
                Err(rejection)
            }
        }
    }

    /// Runs `call` if admitted and records its outcome: `Ok` is a success, `Err` a failure.
    /// A call that was not sent comes back as [`CallError::Rejected`] (or
    /// [`CallError::Fusebox`]); the call's own error as [`CallError::Inner`].
    pub async fn call<T, E, Fut>(
        &self,
        feature: &str,
        target: &str,
        call: impl FnOnce() -> Fut,
    ) -> Result<T, CallError<E>>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        self.call_classified(feature, target, call, |r| match r {
            Ok(_) => CallOutcome::Success,
            Err(_) => CallOutcome::Failure,
        })
        .await
    }

    /// Like [`Self::call`], with `classify` deciding what the result means for the breaker
    /// (e.g. a 400 is [`CallOutcome::Ignored`], a 529 a [`CallOutcome::Failure`]).
    pub async fn call_classified<T, E, Fut>(
        &self,
        feature: &str,
        target: &str,
        call: impl FnOnce() -> Fut,
        classify: impl FnOnce(&Result<T, E>) -> CallOutcome,
    ) -> Result<T, CallError<E>>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        let permit = self.admit(feature, target).await?;
        // The lease is kept alive while the call runs, however long it takes.
        let result = permit.guard(call()).await;
        permit.record(classify(&result));
        result.map_err(CallError::Inner)
    }

    /// Sets a fleet-wide "not before" instant for `target` (from an upstream `retry-after`):
    /// no replica sends to it for `retry_after`. Not a breaker failure.
    pub async fn set_not_before(&self, target: &str, retry_after: Duration) -> Result<(), Error> {
        let t = self.shared.target(target)?;
        let ms = retry_after.as_millis().min(u128::from(u32::MAX)) as u64;
        let tiered = &self.shared.tiered;
        // Local state learns it too, so a replica that degrades later still honours it.
        tiered.local.set_not_before(&t, ms).await?;
        let _ = tiered.remote(|s| s.set_not_before(&t, ms)).await;
        Ok(())
    }

    /// What local mode divides bulkhead limits and rates by: the fleet size this replica last
    /// observed in the shared store's membership, at least `redis.replicas` (1 without Redis).
    pub fn fleet_size(&self) -> u32 {
        self.shared.fleet.divisor()
    }

    /// The fleet's live members as the shared store lists them (every coordinator that has
    /// admitted a call, until its entry expires: about three `redis.retry_interval`s after it
    /// stopped). Without Redis, just this coordinator. Fails with the store's error when the
    /// shared store cannot be read: it never answers from local state.
    pub async fn replicas(&self) -> Result<Vec<Member>, Error> {
        let s = &self.shared;
        let listed = match s.tiered.remote_ungated(|st| st.members(&s.fleet.key)).await {
            Tried::Done(m) => m,
            Tried::Failed(e) => return Err(e.into()),
            Tried::Skipped | Tried::Embedded => {
                vec![(s.replica.clone(), s.fleet.ttl.as_millis() as u64)]
            }
        };
        Ok(listed
            .into_iter()
            .map(|(id, ms)| Member {
                this: id == s.replica,
                id,
                expires_in: Duration::from_millis(ms),
            })
            .collect())
    }

    /// Delivers every queued outcome and release to the store, waiting at most `timeout`
    /// (then what is left is delivered in the background as usual), and says how it went:
    /// see [`FlushReport`]. Call it before a clean shutdown; dropping the coordinator also
    /// delivers the queue if the runtime lives on. Without `[redis]` there is nothing to
    /// deliver (the embedded store applies a settle at once): an empty report.
    pub async fn flush(&self, timeout: Duration) -> FlushReport {
        let Some(remote) = &self.shared.tiered.remote else {
            return FlushReport::default();
        };
        let done = remote.store.settles().flush();
        let timed_out = !matches!(tokio::time::timeout(timeout, done).await, Ok(Ok(())));
        let (delivered, dropped) = remote.sink.tally.take();
        FlushReport {
            delivered,
            dropped,
            timed_out,
        }
    }
}

/// What [`Coordinator::flush`] found: the settles (a call's recorded outcome and its permit
/// release, one per call) that this coordinator's background delivery sent to Redis or gave
/// up on since the previous flush (or the start), including this flush's, and whether the
/// queue was delivered within the timeout.
///
/// Counted per call. Settles that rode along with this replica's own next admission are
/// delivered by that admission and not counted here. Each dropped settle was also reported
/// as an [`Event::SettleDropped`] when it was dropped; its outcome is not counted by the
/// breaker, and its permit (if any) is released by a take-back retried until Redis answers
/// (when Redis could not be reached) or comes back when its lease ends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FlushReport {
    /// Settles Redis confirmed.
    pub delivered: u64,
    /// Settles given up on (Redis unreachable, or a call that may or may not have run).
    pub dropped: u64,
    /// The timeout passed before the queue was delivered: what is left goes out in the
    /// background (or, at shutdown, may be lost).
    pub timed_out: bool,
}

impl FlushReport {
    /// Everything queued was delivered in time and nothing was dropped.
    pub fn is_complete(&self) -> bool {
        !self.timed_out && self.dropped == 0
    }
}

/// How long to wait before retrying a refused admission: the store's hint for rate limits
/// (exact), a jittered exponential step for bulkheads (2 ms doubling to 100 ms, full jitter
/// above 1 ms), so that waiters neither spin on Redis nor sleep through a freed permit. A
/// local release wakes waiters at once.
/// Counts a caller as waiting for as long as it lives (also when its future is dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(n: &'a AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn wait_step(rejection: &Rejection, attempt: u32) -> Duration {
    match rejection {
        Rejection::RateLimited { retry_after, .. } => *retry_after,
        _ => {
            let cap_ms = 2u64.saturating_mul(1 << attempt.min(6)).min(100);
            let hint = rejection
                .retry_after()
                .map_or(cap_ms, |d| d.as_millis() as u64);
            let cap = cap_ms.min(hint.max(1));
            Duration::from_millis(rand::rng().random_range(1..=cap.max(1)))
        }
    }
}
