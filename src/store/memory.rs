//! The in-process store: the embedded default for a single replica, the local state in
//! Redis-down mode, and the reference model the Redis scripts are tested against.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::{Admission, AdmitRequest, Admitted, FeatureSpec, Settle, Store, TargetSpec};
use crate::breaker::{BreakerSnapshot, BreakerState, Force, Transition, Verdict};
use crate::bulkhead::Permits;
use crate::clock::{Clock, SystemClock};
use crate::pipeline::alert::{AlertParams, RateReading, RateWindow};
use crate::retry::budget::{BudgetParams, BudgetTotals, BudgetWindow, Withdrawn};
use crate::{Rejection, StoreError};
use std::time::Duration;

#[derive(Debug, Default)]
struct FeatureState {
    permits: Permits,
    tat_us: Option<u64>,
}

#[derive(Debug, Default)]
struct Inner {
    breakers: HashMap<String, (BreakerState, u64)>,
    features: HashMap<String, FeatureState>,
    /// Fleet membership (the twin of `lua/member.lua`): key -> replica id -> expiry (ms).
    members: HashMap<String, HashMap<String, u64>>,
    /// Retry budgets (the twin of `lua/budget_*.lua`): key -> window.
    budgets: HashMap<String, BudgetWindow>,
    /// Fallback rate windows (the twin of `lua/fallback_rate.lua`): key -> window.
    rates: HashMap<String, RateWindow>,
    ops: u64,
}

/// In-process [`Store`]. Cheap to clone (clones share state).
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    clock: Arc<dyn Clock>,
    idle_ttl_ms: u64,
    /// The degraded-response cache (`crate::cache::memory`).
    cache: Arc<crate::cache::memory::MemoryCache>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(Arc::new(SystemClock))
    }
}

const SWEEP_EVERY: u64 = 4096;

impl MemoryStore {
    /// The store's clock now (ms since the Unix epoch), for operator reads.
    pub(crate) fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// A store reading time from `clock`.
    pub fn new(clock: Arc<dyn Clock>) -> Self {
        MemoryStore {
            inner: Arc::new(Mutex::new(Inner::default())),
            clock,
            idle_ttl_ms: 24 * 3600 * 1000,
            cache: Arc::default(),
        }
    }

    /// Stores a cache entry under `key` (the twin of `lua/cache_put.lua`); returns how many
    /// entries the feature's cap evicted.
    pub fn cache_put(
        &self,
        spec: &crate::cache::CacheSpec,
        key: &str,
        model: &str,
        exact: &str,
        body: &str,
    ) -> u32 {
        let now = self.clock.now_ms();
        self.cache.put(spec, key, model, exact, body, now)
    }

    /// The unexpired cache entry under `key` (the twin of `lua/cache_get.lua`).
    pub fn cache_get(
        &self,
        spec: &crate::cache::CacheSpec,
        key: &str,
    ) -> Option<crate::cache::StoredEntry> {
        self.cache.get(spec, key, self.clock.now_ms())
    }

    /// Cache entries held for the feature (expired ones not yet dropped by a put included).
    pub fn cache_len(&self, spec: &crate::cache::CacheSpec) -> usize {
        self.cache.len(spec)
    }

    /// Forget a closed breaker nobody touched for this long (default 24 h), as Redis expires
    /// idle keys: arbitrary target names cannot grow memory without bound.
    pub fn with_idle_ttl(mut self, idle_ttl: Duration) -> Self {
        self.idle_ttl_ms = idle_ttl.as_millis() as u64;
        self
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the plain data half-written in a way
        // that matters more than refusing all further calls would.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Synchronous admit (the trait method wraps it).
    pub fn admit_now(&self, req: AdmitRequest<'_>) -> Admission {
        self.admit_holding(req, 0)
    }

    /// [`Self::admit_now`] with `held` more permits of the feature counted as in flight
    /// (held elsewhere: a replica's shared permits still running while it decides on local
    /// state). A refusal still names the feature's whole limit.
    pub fn admit_holding(&self, req: AdmitRequest<'_>, held: u32) -> Admission {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        inner.sweep(now, self.idle_ttl_ms);
        let p = &req.target.params;
        let (verdict, transition) = {
            let entry = inner
                .breakers
                .entry(req.target.keys.breaker.clone())
                .or_default();
            entry.1 = now;
            entry.0.evaluate(p, &req.target.name, now)
        };
        let probe = match verdict {
            Verdict::Allow => false,
            Verdict::Probe => true,
            Verdict::Reject {
                state,
                retry_after_ms,
            } => {
                return Admission::Rejected {
                    rejection: Rejection::CircuitOpen {
                        target: req.target.name.clone(),
                        state,
                        retry_after: retry_after_ms.map(Duration::from_millis),
                    },
                    transition,
                }
            }
            Verdict::NotBefore { retry_after_ms } => {
                return Admission::Rejected {
                    rejection: Rejection::NotBefore {
                        target: req.target.name.clone(),
                        retry_after: Duration::from_millis(retry_after_ms),
                    },
                    transition,
                }
            }
        };
        let f = req.feature;
        let fs = inner.features.entry(f.keys.permits.clone()).or_default();
        let now_us = now * 1000;
        let rate = f.rate.map(|r| r.check(fs.tat_us, now_us));
        if let Some(d) = rate {
            if !d.allowed {
                return Admission::Rejected {
                    rejection: Rejection::RateLimited {
                        feature: f.name.clone(),
                        retry_after: Duration::from_micros(d.retry_after_us),
                    },
                    transition,
                };
            }
        }
        if let Some(b) = &f.bulkhead {
            fs.permits.reclaim(now);
            let free = crate::bulkhead::BulkheadParams {
                limit: b.limit.saturating_sub(held),
                ..*b
            };
            if let Err(wait_ms) = fs.permits.check(&free, now) {
                return Admission::Rejected {
                    rejection: Rejection::BulkheadFull {
                        feature: f.name.clone(),
                        limit: b.limit,
                        retry_after: Some(Duration::from_millis(wait_ms)),
                    },
                    transition,
                };
            }
            fs.permits.insert(b, req.call_id, now);
        }
        if let Some(d) = rate {
            fs.tat_us = Some(d.new_tat_us);
        }
        let generation = {
            let entry = inner
                .breakers
                .entry(req.target.keys.breaker.clone())
                .or_default();
            if probe {
                entry.0.take_probe(p, req.call_id, now);
            }
            entry.0.generation
        };
        Admission::Admitted(Admitted {
            generation,
            probe,
            permit: f.bulkhead.is_some(),
            transition,
        })
    }

    /// Synchronous [`Store::admit_target`]: the breaker part of [`Self::admit_now`] alone (a
    /// probe slot taken at once in half-open), nothing of the feature.
    pub fn admit_target_now(&self, req: AdmitRequest<'_>) -> Admission {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        inner.sweep(now, self.idle_ttl_ms);
        let p = &req.target.params;
        let entry = inner
            .breakers
            .entry(req.target.keys.breaker.clone())
            .or_default();
        entry.1 = now;
        let (verdict, transition) = entry.0.evaluate(p, &req.target.name, now);
        let rejection = match verdict {
            Verdict::Allow | Verdict::Probe => {
                let probe = verdict == Verdict::Probe;
                if probe {
                    entry.0.take_probe(p, req.call_id, now);
                }
                return Admission::Admitted(Admitted {
                    generation: entry.0.generation,
                    probe,
                    permit: false,
                    transition,
                });
            }
            Verdict::Reject {
                state,
                retry_after_ms,
            } => Rejection::CircuitOpen {
                target: req.target.name.clone(),
                state,
                retry_after: retry_after_ms.map(Duration::from_millis),
            },
            Verdict::NotBefore { retry_after_ms } => Rejection::NotBefore {
                target: req.target.name.clone(),
                retry_after: Duration::from_millis(retry_after_ms),
            },
        };
        Admission::Rejected {
            rejection,
            transition,
        }
    }

    /// Synchronous settle.
    pub fn settle_now(&self, items: &[Settle]) -> Vec<Transition> {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        let mut out = Vec::new();
        for s in items {
            if let Some(entry) = inner.breakers.get_mut(&s.target.keys.breaker) {
                entry.1 = now;
                let probe_id = s.probe.then_some(s.call_id.as_str());
                if let Some(t) = entry.0.record(
                    &s.target.params,
                    &s.target.name,
                    now,
                    s.generation,
                    s.outcome,
                    s.elapsed_ms,
                    probe_id,
                ) {
                    out.push(t);
                }
            }
            if let Some(fs) = inner.features.get_mut(&s.feature.keys.permits) {
                if s.permit {
                    fs.permits.release(&s.call_id);
                }
                if let (true, Some(r), Some(tat)) = (s.refund_rate, s.feature.rate, fs.tat_us) {
                    fs.tat_us = Some(r.refund(tat, now * 1000));
                }
            }
        }
        out
    }

    /// Synchronous heartbeat.
    pub fn heartbeat_now(&self, feature: &FeatureSpec, call_id: &str) -> bool {
        let now = self.clock.now_ms();
        let Some(b) = &feature.bulkhead else {
            return false;
        };
        let mut inner = self.lock();
        inner
            .features
            .get_mut(&feature.keys.permits)
            .is_some_and(|fs| fs.permits.heartbeat(b, call_id, now))
    }

    /// Enters (or renews) replica `id` in the membership at `key` for `ttl_ms` (at least
    /// 1 ms); returns the number of live members. The model of `lua/member.lua`.
    pub fn join_now(&self, key: &str, id: &str, ttl_ms: u64) -> u32 {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        let members = inner.members.entry(key.to_owned()).or_default();
        members.retain(|_, expiry| *expiry > now);
        members.insert(id.to_owned(), now + ttl_ms.max(1));
        members.len() as u32
    }

    /// The live members at `key`: (id, ms until the entry expires), soonest first, ties by
    /// id. The model of `lua/members.lua`.
    pub fn members_now(&self, key: &str) -> Vec<(String, u64)> {
        let now = self.clock.now_ms();
        let inner = self.lock();
        let mut out: Vec<(String, u64)> = inner
            .members
            .get(key)
            .map(|m| {
                m.iter()
                    .filter(|(_, e)| **e > now)
                    .map(|(id, e)| (id.clone(), *e - now))
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// Counts permits granted elsewhere and still running: (id, ms of lease left), without
    /// checking the limit; ids already present are left alone. Returns how many were added.
    /// The model of `lua/adopt.lua`.
    pub fn adopt_now(&self, feature: &FeatureSpec, permits: &[(String, u64)]) -> u32 {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        let fs = inner
            .features
            .entry(feature.keys.permits.clone())
            .or_default();
        permits
            .iter()
            .filter(|(id, left)| fs.permits.adopt(id, *left, now))
            .count() as u32
    }

    /// Releases one permit of the feature (idempotent).
    pub fn release_now(&self, feature: &FeatureSpec, call_id: &str) {
        if let Some(fs) = self.lock().features.get_mut(&feature.keys.permits) {
            fs.permits.release(call_id);
        }
    }

    /// The feature's live permits: (id, ms of lease left), soonest expiry first.
    pub fn live_permits(&self, feature: &FeatureSpec) -> Vec<(String, u64)> {
        let now = self.clock.now_ms();
        let inner = self.lock();
        let mut out: Vec<(String, u64)> = inner
            .features
            .get(&feature.keys.permits)
            .map(|fs| {
                fs.permits
                    .live(now)
                    .map(|(id, left)| (id.to_owned(), left))
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| a.1.cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
        out
    }

    /// Opens the target's local breaker for at least `open_ms` from now: local state seeded
    /// from what the shared store said (an open breaker), so that a replica that degrades
    /// during an outage does not try the dead target again on an empty local breaker. An
    /// operator state, or a local breaker already open for longer, is left as it is.
    pub fn seed_open(&self, target: &TargetSpec, open_ms: u64) {
        self.with_breaker(target, |b, now| {
            let until = now.saturating_add(open_ms);
            if b.state.is_operator_state()
                || (b.state == crate::breaker::CircuitState::Open && b.open_until >= until)
            {
                return;
            }
            b.state = crate::breaker::CircuitState::Open;
            b.open_until = until;
            b.generation += 1;
            b.probes.clear();
            b.half_open_successes = 0;
            b.consecutive_failures = 0;
        });
    }

    fn with_breaker<R>(
        &self,
        target: &TargetSpec,
        f: impl FnOnce(&mut BreakerState, u64) -> R,
    ) -> R {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        let entry = inner
            .breakers
            .entry(target.keys.breaker.clone())
            .or_default();
        entry.1 = now;
        f(&mut entry.0, now)
    }
}

impl Inner {
    /// Forgets idle state so that arbitrary target names cannot grow memory without bound
    /// (the in-memory twin of Redis key expiry).
    fn sweep(&mut self, now: u64, idle_ttl_ms: u64) {
        self.ops += 1;
        if !self.ops.is_multiple_of(SWEEP_EVERY) {
            return;
        }
        self.breakers.retain(|_, (b, touched)| {
            b.state.is_operator_state()
                || b.state != crate::breaker::CircuitState::Closed
                || now.saturating_sub(*touched) < idle_ttl_ms
        });
        self.features.retain(|_, f| {
            f.permits.reclaim(now);
            !f.permits.is_empty() || f.tat_us.is_some_and(|t| t > now * 1000)
        });
    }
}

impl Store for MemoryStore {
    async fn admit(&self, req: AdmitRequest<'_>) -> Result<Admission, StoreError> {
        Ok(self.admit_now(req))
    }

    async fn admit_target(&self, req: AdmitRequest<'_>) -> Result<Admission, StoreError> {
        Ok(self.admit_target_now(req))
    }

    async fn settle(&self, items: &[Settle]) -> Result<Vec<Transition>, StoreError> {
        Ok(self.settle_now(items))
    }

    async fn heartbeat(&self, feature: &FeatureSpec, call_id: &str) -> Result<bool, StoreError> {
        Ok(self.heartbeat_now(feature, call_id))
    }

    async fn set_not_before(
        &self,
        target: &TargetSpec,
        retry_after_ms: u64,
    ) -> Result<(), StoreError> {
        self.with_breaker(target, |b, now| b.set_not_before(now, retry_after_ms));
        Ok(())
    }

    async fn force(
        &self,
        target: &TargetSpec,
        cmd: Force,
    ) -> Result<Option<Transition>, StoreError> {
        Ok(self.with_breaker(target, |b, now| b.force(&target.name, cmd, now)))
    }

    async fn snapshot(&self, target: &TargetSpec) -> Result<BreakerSnapshot, StoreError> {
        Ok(self.with_breaker(target, |b, now| b.snapshot(&target.params, now)))
    }

    async fn in_flight(&self, feature: &FeatureSpec) -> Result<u32, StoreError> {
        let now = self.clock.now_ms();
        let inner = self.lock();
        Ok(inner
            .features
            .get(&feature.keys.permits)
            .map_or(0, |f| f.permits.in_flight(now)))
    }
}

/// Budgets kept at most before idle ones are forgotten (as Redis expires their hashes).
const MAX_BUDGETS: usize = 10_000;

impl MemoryStore {
    fn budget<R>(
        &self,
        key: &str,
        p: &BudgetParams,
        f: impl FnOnce(&mut BudgetWindow, u64) -> R,
    ) -> R {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        if inner.budgets.len() >= MAX_BUDGETS && !inner.budgets.contains_key(key) {
            let window = p.window().as_millis() as u64 + p.bucket_ms;
            inner
                .budgets
                .retain(|_, w| w.touched_ms.saturating_add(window) > now);
        }
        let w = inner.budgets.entry(key.to_owned()).or_default();
        f(w, now)
    }

    /// Counts `n` requests in the retry budget at `key` (`lua/budget_deposit.lua`).
    pub fn budget_deposit_now(&self, key: &str, p: &BudgetParams, n: u64) {
        self.budget(key, p, |w, now| w.deposit(p, now, n));
    }

    /// Counts `n` requests, then takes one retry from the budget at `key` if it allows one
    /// (`lua/budget_withdraw.lua`).
    pub fn budget_withdraw_now(&self, key: &str, p: &BudgetParams, n: u64) -> Withdrawn {
        self.budget(key, p, |w, now| w.withdraw(p, now, n))
    }

    /// The retry budget at `key` as it stands (nothing changes; an unknown key is empty).
    pub fn budget_read_now(&self, key: &str, p: &BudgetParams) -> BudgetTotals {
        let now = self.clock.now_ms();
        let inner = self.lock();
        match inner.budgets.get(key) {
            Some(w) => w.totals(p, now),
            None => crate::retry::budget::totals(p, now, []),
        }
    }

    /// Counts `calls` guarded calls of which `fallbacks` fell back in the window at `key`
    /// (`lua/fallback_rate.lua`). One window per feature: configured features only.
    pub fn fallback_rate_now(
        &self,
        key: &str,
        p: &AlertParams,
        calls: u64,
        fallbacks: u64,
    ) -> RateReading {
        let now = self.clock.now_ms();
        let mut inner = self.lock();
        inner
            .rates
            .entry(key.to_owned())
            .or_default()
            .add(p, now, calls, fallbacks)
    }
}
