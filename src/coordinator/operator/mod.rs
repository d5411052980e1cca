//! The operator API: reads and commands for status pages, the CLI and admin endpoints.
//!
//! Operator reads never pass local state off as the fleet's. With Redis configured they read
//! Redis over their own connection, bounded by `redis.operator_timeout` (default: the
//! connect timeout, not the hot path's `redis.timeout`), and fail with the real cause
//! (refused, authentication, DNS, TLS, timeout, protocol) instead of falling back. Every
//! [`Reading`] says which store answered ([`Source`]).

mod link;

use std::collections::BTreeSet;
use std::time::Duration;

use self::link::Link;
pub(crate) use self::link::OperatorLink;
use super::tiered::Source;
use super::Coordinator;
use crate::breaker::{BreakerSnapshot, Force, Transition};
use crate::observer::Event;
use crate::store::Store;
use crate::{Error, StoreError};

/// An operator read and the store that answered it.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Reading<T> {
    /// What was read.
    pub value: T,
    /// Which store answered.
    pub source: Source,
    /// The answering store's clock at the read (ms since the Unix epoch; Redis `TIME` for
    /// the shared store): compare the value's instants (`open_until_ms`, ...) with it.
    pub now_ms: u64,
}

/// Targets and features that have state in the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct KnownNames {
    /// Targets with breaker state.
    pub targets: BTreeSet<String>,
    /// Features with bulkhead or rate-limit state.
    pub features: BTreeSet<String>,
}

/// One target's fleet-wide retry budget as it stands (see [`Coordinator::read_retry_budget`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct BudgetStatus {
    /// Requests to the target in the window.
    pub requests: u64,
    /// Retries to the target in the window.
    pub retries: u64,
    /// Retries the window allows in all (`ratio × requests + min_per_second × window`).
    pub allowed: u64,
    /// The window's length.
    pub window: Duration,
}

impl BudgetStatus {
    /// Retries still available in the window.
    pub fn available(&self) -> u64 {
        self.allowed.saturating_sub(self.retries)
    }
}

impl Coordinator {
    /// The targets and features the configuration names (targets: under `[targets]` and in
    /// every feature's `chain`). No store is read.
    pub fn configured_names(&self) -> KnownNames {
        KnownNames {
            targets: self.shared.configured_targets.iter().cloned().collect(),
            features: self.shared.features.keys().cloned().collect(),
        }
    }

    /// The bulkhead limit of a configured feature (`None`: no bulkhead).
    pub fn bulkhead_limit(&self, feature: &str) -> Result<Option<u32>, Error> {
        Ok(self.shared.feature(feature)?.spec.bulkhead.map(|b| b.limit))
    }

    /// `target`'s fleet-wide retry budget as it stands (nothing is taken or counted): from
    /// Redis when it is configured (failing with the cause, never falling back), from the
    /// embedded store otherwise. `None`: no budget is configured (`[retry] budget = false`).
    /// Requests this replica counted but has not delivered yet (at most one second's) are
    /// not in a shared reading.
    pub async fn read_retry_budget(
        &self,
        target: &str,
    ) -> Result<Option<Reading<BudgetStatus>>, Error> {
        let Some(p) = self.shared.retries.params else {
            return Ok(None);
        };
        let t = self.shared.target(target)?;
        let key = crate::keys::budget_key(&self.shared.retries.namespace, &t.name);
        let status = |b: crate::retry::budget::BudgetTotals| BudgetStatus {
            requests: b.requests,
            retries: b.retries,
            allowed: b.allowed,
            window: p.window(),
        };
        Ok(Some(match self.shared.operator.get().await? {
            Some(link) => {
                let (key, p) = (&key, &p);
                let (now_ms, buckets) = read_retrying(|| async move {
                    let now_ms = link.time_ms().await?;
                    Ok((now_ms, link.budget_buckets(key, p.buckets).await?))
                })
                .await?;
                Reading {
                    value: status(crate::retry::budget::totals(p, now_ms, buckets)),
                    source: Source::Shared,
                    now_ms,
                }
            }
            None => self.embedded(status(self.shared.tiered.local.budget_read_now(&key, &p))),
        }))
    }

    /// The store operator reads go to: [`Source::Shared`] with Redis configured,
    /// [`Source::Embedded`] without.
    pub fn operator_source(&self) -> Source {
        if self.shared.tiered.remote.is_some() {
            Source::Shared
        } else {
            Source::Embedded
        }
    }

    /// `target`'s breaker as the fleet sees it: read from Redis when it is configured
    /// (failing with the cause when Redis cannot be read, never falling back to local
    /// state), from the embedded store otherwise.
    pub async fn read_breaker(&self, target: &str) -> Result<Reading<BreakerSnapshot>, Error> {
        let t = self.shared.target(target)?;
        match self.shared.operator.get().await? {
            Some(link) => {
                let t = &t;
                read_retrying(|| async move {
                    Ok(Reading {
                        value: link.store.snapshot(t).await?,
                        source: Source::Shared,
                        now_ms: link.time_ms().await?,
                    })
                })
                .await
            }
            None => Ok(self.embedded(self.shared.tiered.local.snapshot(&t).await?)),
        }
    }

    /// `target`'s breaker in this replica's local state (what it decides on while Redis is
    /// unreachable). With Redis configured this is [`Source::Local`], not the fleet's view.
    pub async fn read_local_breaker(
        &self,
        target: &str,
    ) -> Result<Reading<BreakerSnapshot>, Error> {
        let t = self.shared.target(target)?;
        Ok(Reading {
            value: self.shared.tiered.local.snapshot(&t).await?,
            source: self.local_source(),
            now_ms: self.shared.tiered.local.now_ms(),
        })
    }

    /// `target`'s breaker as the fleet sees it; see [`Self::read_breaker`].
    pub async fn snapshot(&self, target: &str) -> Result<BreakerSnapshot, Error> {
        Ok(self.read_breaker(target).await?.value)
    }

    /// Bulkhead permits of `feature` in flight fleet-wide: read from Redis when it is
    /// configured (failing with the cause, never falling back), from the embedded store
    /// otherwise.
    pub async fn read_in_flight(&self, feature: &str) -> Result<Reading<u32>, Error> {
        let f = self.shared.feature(feature)?;
        match self.shared.operator.get().await? {
            Some(link) => {
                let spec = &f.spec;
                read_retrying(|| async move {
                    Ok(Reading {
                        value: link.store.in_flight(spec).await?,
                        source: Source::Shared,
                        now_ms: link.time_ms().await?,
                    })
                })
                .await
            }
            None => Ok(self.embedded(self.shared.tiered.local.in_flight(&f.spec).await?)),
        }
    }

    /// Bulkhead permits of `feature` in flight fleet-wide; see [`Self::read_in_flight`].
    pub async fn in_flight(&self, feature: &str) -> Result<u32, Error> {
        Ok(self.read_in_flight(feature).await?.value)
    }

    /// Targets and features that have state in the store under this namespace. With Redis,
    /// a `SCAN` for the namespace's keys (on Cluster, on every master); embedded, the names
    /// this process has used.
    pub async fn known_names(&self) -> Result<Reading<KnownNames>, Error> {
        match self.shared.operator.get().await? {
            Some(link) => {
                let namespace = &self.shared.namespace;
                read_retrying(|| async move {
                    Ok(Reading {
                        value: link.scan_names(namespace).await?,
                        source: Source::Shared,
                        now_ms: link.time_ms().await?,
                    })
                })
                .await
            }
            None => {
                let targets = self
                    .shared
                    .targets
                    .read()
                    .unwrap_or_else(|p| p.into_inner())
                    .keys()
                    .cloned()
                    .collect();
                Ok(self.embedded(KnownNames {
                    targets,
                    features: self.shared.features.keys().cloned().collect(),
                }))
            }
        }
    }

    /// Reaches the shared store over the operator's connection (bounded by
    /// `redis.operator_timeout`) and fails with the cause: refused, authentication, DNS, TLS,
    /// timeout, protocol. For health checks, and for the reason behind a
    /// [`Event::StoreDegraded`] that says only `Timeout` (the hot path's short timeout often
    /// ends before a failing connect can tell why). `Source::Embedded` without Redis.
    pub async fn check_store(&self) -> Result<Reading<()>, Error> {
        match self.shared.operator.get().await? {
            Some(link) => {
                read_retrying(|| async move {
                    Ok(Reading {
                        value: (),
                        source: Source::Shared,
                        now_ms: link.time_ms().await?,
                    })
                })
                .await
            }
            None => Ok(self.embedded(())),
        }
    }

    /// An operator command on `target`'s breaker, applied fleet-wide in Redis when it is
    /// configured (failing with the cause when Redis cannot be reached), to the embedded
    /// store otherwise. `None`: the breaker was already in the commanded state.
    ///
    /// `target` must be named by the configuration (under `[targets]` or in a feature's
    /// `chain`) or have state in the store (Redis: its
    /// breaker keys exist; embedded: this process has used it); otherwise nothing changes and
    /// the answer is [`Error::UnknownTarget`]. A forced state (open, closed, disabled) does
    /// not expire: an operator's decision lasts until an operator resets it, since an idle
    /// expiry would silently let traffic back to a target someone shut off. So a misspelled
    /// name must not get one: it would be a forced key that never expires and that no call
    /// ever uses. Use [`Self::force_create`] for a target that has no state yet on purpose.
    ///
    /// [`Force::Reset`] and [`Force::Closed`] also clear the target's "not before" (an
    /// upstream's `retry-after`, [`Self::set_not_before`]): an operator who closes a target
    /// wants calls to reach it. [`Force::Open`] and [`Force::Disable`] keep it.
    pub async fn force(&self, target: &str, cmd: Force) -> Result<Option<Transition>, Error> {
        self.force_checked(target, cmd, false).await
    }

    /// [`Self::force`] without the check that the target is configured or known: to hold
    /// off a target before its first call (CLI: `force --create`). The forced state lasts
    /// until a reset, like every forced state, and `status` lists it.
    pub async fn force_create(
        &self,
        target: &str,
        cmd: Force,
    ) -> Result<Option<Transition>, Error> {
        self.force_checked(target, cmd, true).await
    }

    async fn force_checked(
        &self,
        target: &str,
        cmd: Force,
        create: bool,
    ) -> Result<Option<Transition>, Error> {
        let embedded = self.shared.tiered.remote.is_none();
        let known_here = self.shared.is_configured_target(target)
            || (embedded && self.shared.has_target_spec(target));
        if embedded && !create && !known_here {
            // Refused before a spec is made for it (that would make it known).
            crate::config::check_name("target", target)?;
            return Err(Error::UnknownTarget(target.to_owned()));
        }
        let t = self.shared.target(target)?;
        let tr = match self.shared.operator.get().await? {
            Some(link) => {
                let keys = &t.keys;
                if !create
                    && !known_here
                    && !read_retrying(|| async move { Ok(link.has_state(keys).await?) }).await?
                {
                    return Err(Error::UnknownTarget(target.to_owned()));
                }
                match link.store.force(&t, cmd).await {
                    Err(e) if surely_not_sent(&e) => link.store.force(&t, cmd).await?,
                    r => r?,
                }
            }
            None => {
                if !create && !known_here {
                    return Err(Error::UnknownTarget(target.to_owned()));
                }
                self.shared.tiered.local.force(&t, cmd).await?
            }
        };
        // This replica sees its own command at once (others within the skip's hold).
        self.shared.skips.forget(target);
        if let Some(tr) = &tr {
            self.shared.emit(Event::Transition(tr.clone()));
        }
        Ok(tr)
    }

    fn embedded<T>(&self, value: T) -> Reading<T> {
        Reading {
            value,
            source: Source::Embedded,
            now_ms: self.shared.tiered.local.now_ms(),
        }
    }

    fn local_source(&self) -> Source {
        if self.shared.tiered.remote.is_some() {
            Source::Local
        } else {
            Source::Embedded
        }
    }
}

impl OperatorLink {
    /// The operator's connection, established on first use (`None`: no Redis configured).
    /// A failure is returned with its cause and not remembered: the next call tries again.
    async fn get(&self) -> Result<Option<&Link>, Error> {
        let Some(config) = &self.config else {
            return Ok(None);
        };
        self.cell
            .get_or_try_init(|| Link::connect(config))
            .await
            .map(Some)
    }
}

/// Runs an operator read, and once more when it failed because the operator's connection
/// had been dropped (Redis restarted or the connection was cut while idle: the first use
/// finds it dead, and the connection reconnects after that failure). Reads change nothing,
/// so repeating one is safe. A timeout is not retried: the read would wait out the bound
/// twice, and a slow Redis is the answer.
async fn read_retrying<T, F, Fut>(mut read: F) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    match read().await {
        Err(Error::Store(e)) if dropped(&e) => read().await,
        r => r,
    }
}

/// A failure of a connection that was dropped under the operator link (as opposed to a
/// timeout, a refused credential or a bad reply): refused (nothing listens now, or not yet
/// again), broken pipe, reset, aborted, closed by the peer.
fn dropped(e: &StoreError) -> bool {
    match e {
        StoreError::Refused(_) => true,
        StoreError::Connection(m) => {
            let m = m.to_ascii_lowercase();
            surely_not_sent(e)
                || [
                    "connection reset",
                    "connection aborted",
                    "connection closed",
                    "unexpected end of file",
                    "unexpected eof",
                    "not connected",
                ]
                .iter()
                .any(|s| m.contains(s))
        }
        _ => false,
    }
}

/// A failure that proves a command never reached Redis, so that sending it again cannot
/// apply it twice (what an operator *write* may be retried on):
/// * refused: there was no connection to send it on;
/// * broken pipe (`EPIPE`): the write of the command itself failed, because the peer had
///   already closed the connection (a restarted Redis); the bytes were not accepted, and a
///   Redis that closed the connection runs nothing more from it.
///
/// A reset or a closed connection is not enough: it may come after the command was written
/// and run, only its reply lost; a force retried then would report "already in that state"
/// (no transition) for a command that did change it. Neither is a timeout.
fn surely_not_sent(e: &StoreError) -> bool {
    match e {
        StoreError::Refused(_) => true,
        StoreError::Connection(m) => m.to_ascii_lowercase().contains("broken pipe"),
        _ => false,
    }
}
