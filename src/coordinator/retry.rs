//! Retry settings per feature and the fleet-wide retry budget per target, as the coordinator
//! serves them to the call pipeline.
//!
//! **Counting requests costs no round trip.** [`RetryBudget::deposit`] adds one to an
//! in-process counter (and to the local store, which local mode decides on); a background
//! task delivers the counters to the shared store in batches (`lua/budget_deposit.lua`, once
//! per budget bucket, at most once a second), and a withdrawal takes this replica's
//! undelivered count along. A successful first attempt therefore never waits for the store.
//!
//! **Spending costs one.** [`RetryBudget::withdraw`] runs `lua/budget_withdraw.lua` through
//! the routing seam ([`Tiered::remote`](super::tiered::Tiered::remote)), only on the retry
//! path. When the shared store is down (or refuses), the replica decides on its local budget,
//! whose floor (`min_per_second`) is divided by the fleet size as local mode divides limits;
//! the ratio applies to the replica's own requests as is. A spent budget is an answer
//! ([`Withdrawal::Spent`]): the caller falls through to its next tier, it never waits.
//!
//! A deposit or withdrawal that fails in the shared store is not sent again: counted twice,
//! it would allow more retries than configured; lost, it allows fewer.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use super::tiered::Tried;
use super::{Coordinator, Shared, Source};
use crate::config::{Config, RetryConfig};
use crate::keys::budget_key;
use crate::observer::Event;
use crate::retry::budget::BudgetParams;
use crate::retry::BackoffParams;
use crate::Error;

/// Most targets whose budgets are remembered (past it, idle ones are dropped).
const MAX_TARGETS: usize = 10_000;

/// Per-feature retry settings and per-target budget counters of one coordinator.
pub(crate) struct Retries {
    pub(super) namespace: String,
    /// `[retry]`'s budget (`None`: switched off for everyone).
    pub(super) params: Option<BudgetParams>,
    /// Every configured feature's resolved retry settings.
    features: HashMap<String, RetryConfig>,
    /// Features that opted out of the budget.
    off: HashSet<String>,
    /// Unconfigured features (none: a call must name a configured feature) fall back here.
    default: RetryConfig,
    targets: RwLock<HashMap<String, Arc<TargetBudget>>>,
    depositing: AtomicBool,
    /// How often undelivered requests are deposited.
    every: Duration,
}

/// One target's budget key and the requests this replica has not delivered yet.
#[derive(Debug)]
struct TargetBudget {
    key: String,
    pending: AtomicU64,
}

impl Retries {
    pub(crate) fn new(config: &Config) -> Self {
        let params = config.retry.budget.as_ref().map(|b| b.params());
        let features: HashMap<String, RetryConfig> = config
            .features
            .keys()
            .map(|f| (f.clone(), config.retry_for(f)))
            .collect();
        let off = features
            .iter()
            .filter(|(_, r)| r.budget.is_none())
            .map(|(f, _)| f.clone())
            .collect();
        let every = params.map_or(Duration::from_secs(1), |p| {
            Duration::from_millis(p.bucket_ms)
                .clamp(Duration::from_millis(50), Duration::from_secs(1))
        });
        Retries {
            namespace: config.namespace.clone(),
            params,
            features,
            off,
            default: config.retry.clone(),
            targets: RwLock::default(),
            depositing: AtomicBool::new(false),
            every,
        }
    }

    fn target(&self, name: &str) -> Arc<TargetBudget> {
        if let Some(t) = self
            .targets
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return Arc::clone(t);
        }
        let mut map = self.targets.write().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_TARGETS {
            map.retain(|_, t| t.pending.load(Ordering::Relaxed) > 0);
        }
        Arc::clone(map.entry(name.to_owned()).or_insert_with(|| {
            Arc::new(TargetBudget {
                key: budget_key(&self.namespace, name),
                pending: AtomicU64::new(0),
            })
        }))
    }
}

/// What a [`RetryBudget::withdraw`] came to.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Withdrawal {
    /// One retry was taken from the budget: send it.
    Granted {
        /// Which store decided.
        source: Source,
    },
    /// The budget is spent: do not retry this target now, fall through to the next tier.
    Spent {
        /// Which store decided ([`Source::Local`]: this replica alone, Redis being down).
        source: Source,
        /// Requests to the target in the window (as that store counts them).
        requests: u64,
        /// Retries to the target in the window.
        retries: u64,
    },
    /// No budget applies (`[retry] budget = false`, or the feature opted out): retries are
    /// bounded by `max_attempts` only.
    Unlimited,
}

impl Withdrawal {
    /// Whether a retry may be sent.
    pub fn is_granted(&self) -> bool {
        !matches!(self, Withdrawal::Spent { .. })
    }
}

/// One target's fleet-wide retry budget, as one feature draws on it. Cheap to clone.
///
/// The pipeline calls [`Self::deposit`] once per request that reaches the target (its first
/// attempt there, not its retries), and [`Self::withdraw`] before each retry.
#[derive(Clone)]
pub struct RetryBudget {
    shared: Arc<Shared>,
    target: String,
    budget: Arc<TargetBudget>,
    /// `None`: no budget applies.
    params: Option<BudgetParams>,
}

impl std::fmt::Debug for RetryBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RetryBudget")
            .field("target", &self.target)
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl RetryBudget {
    /// The target.
    pub fn target(&self) -> &str {
        &self.target
    }

    /// Counts one request to the target. No I/O: delivered to the shared store in the
    /// background (see the module docs).
    pub fn deposit(&self) {
        let Some(p) = &self.params else { return };
        let tiered = &self.shared.tiered;
        tiered.local.budget_deposit_now(&self.budget.key, p, 1);
        if tiered.remote.is_some() {
            self.budget.pending.fetch_add(1, Ordering::Relaxed);
            self.shared.start_depositing();
        }
    }

    /// Takes one retry from the budget if the window allows it (one script call on the
    /// shared store, or a local decision when it is down). Never waits for the budget.
    pub async fn withdraw(&self) -> Withdrawal {
        let Some(p) = &self.params else {
            return Withdrawal::Unlimited;
        };
        let tiered = &self.shared.tiered;
        let key = &self.budget.key;
        let pending = self.budget.pending.swap(0, Ordering::AcqRel);
        let (w, source) = match tiered.remote(|s| s.budget_withdraw(key, p, pending)).await {
            Tried::Done(w) => (w, Source::Shared),
            Tried::Embedded => (
                tiered.local.budget_withdraw_now(key, p, 0),
                Source::Embedded,
            ),
            Tried::Failed(_) | Tried::Skipped => {
                let local = p.local_share(self.shared.fleet.divisor());
                (
                    tiered.local.budget_withdraw_now(key, &local, 0),
                    Source::Local,
                )
            }
        };
        if w.granted {
            Withdrawal::Granted { source }
        } else {
            self.shared.emit(Event::RetryBudgetSpent {
                target: self.target.clone(),
                source,
            });
            Withdrawal::Spent {
                source,
                requests: w.requests,
                retries: w.retries,
            }
        }
    }
}

impl Shared {
    /// Starts the background deposits (once; with a shared store only).
    fn start_depositing(self: &Arc<Self>) {
        let r = &self.retries;
        if r.depositing.load(Ordering::Relaxed) || r.depositing.swap(true, Ordering::AcqRel) {
            return;
        }
        // Outside a runtime: counted, delivered with the next withdrawal.
        if !self
            .tiered
            .spawn_background(deposit_loop(Arc::downgrade(self)))
        {
            r.depositing.store(false, Ordering::Release);
        }
    }
}

/// Delivers undelivered request counts until the coordinator is dropped.
async fn deposit_loop(shared: Weak<Shared>) {
    loop {
        let every = {
            let Some(s) = shared.upgrade() else { return };
            deposit_pending(&s).await;
            s.retries.every
        };
        tokio::time::sleep(every).await;
    }
}

async fn deposit_pending(s: &Arc<Shared>) {
    let Some(p) = s.retries.params else { return };
    let targets: Vec<Arc<TargetBudget>> = s
        .retries
        .targets
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .values()
        .cloned()
        .collect();
    for t in targets {
        let n = t.pending.swap(0, Ordering::AcqRel);
        if n > 0 {
            // Skipped or failed: the local store has them already; not sent again.
            let _ = s.tiered.remote(|st| st.budget_deposit(&t.key, &p, n)).await;
        }
    }
}

impl Coordinator {
    /// The backoff settings of `feature` (`[retry]` with `[features."<name>".retry]` over
    /// it).
    pub fn retry_backoff(&self, feature: &str) -> Result<BackoffParams, Error> {
        let r = &self.shared.retries;
        match r.features.get(feature) {
            Some(c) => Ok(c.backoff()),
            None if self.shared.features.contains_key(feature) => Ok(r.default.backoff()),
            None => Err(Error::UnknownFeature(feature.to_owned())),
        }
    }

    /// `target`'s fleet-wide retry budget as `feature` draws on it: call
    /// [`RetryBudget::deposit`] once per request that reaches the target and
    /// [`RetryBudget::withdraw`] before each retry. A feature that opted out (or a
    /// configuration without a budget) gets a budget that always answers
    /// [`Withdrawal::Unlimited`].
    pub fn retry_budget(&self, feature: &str, target: &str) -> Result<RetryBudget, Error> {
        let s = &self.shared;
        if !s.features.contains_key(feature) {
            return Err(Error::UnknownFeature(feature.to_owned()));
        }
        let t = s.target(target)?;
        let params = s
            .retries
            .params
            .filter(|_| !s.retries.off.contains(feature));
        Ok(RetryBudget {
            shared: Arc::clone(s),
            budget: s.retries.target(&t.name),
            target: t.name.clone(),
            params,
        })
    }
}
