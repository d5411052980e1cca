//! Connections: a single node through `ConnectionManager` (lazy, reconnects in the
//! background, renewed when it cannot recover by itself), or Redis Cluster through a `ClusterConnection` that is (re)established on
//! demand by a background task. Neither fails when Redis is merely unreachable at start.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{ErrorKind, RedisError, ScriptInvocation, Value};

use crate::StoreError;

/// After a failed cluster connect, callers get that failure back for this long before the
/// next attempt starts (so an unreachable cluster is not hammered by every call).
const CLUSTER_RETRY_GAP: Duration = Duration::from_millis(200);

type Connecting = Shared<BoxFuture<'static, Result<ClusterConnection, RedisError>>>;

#[derive(Clone)]
struct Attempt {
    fut: Connecting,
    started: Instant,
}

/// A Redis Cluster connection established on demand.
pub(super) struct ClusterHandle {
    client: ClusterClient,
    connect_timeout: Duration,
    runtime: tokio::runtime::Handle,
    slot: Mutex<Option<Attempt>>,
}

impl ClusterHandle {
    pub(super) fn new(
        client: ClusterClient,
        connect_timeout: Duration,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        ClusterHandle {
            client,
            connect_timeout,
            runtime,
            slot: Mutex::new(None),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Attempt>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current connection, or the attempt in flight; starts an attempt when there is
    /// none, or when the last one failed more than [`CLUSTER_RETRY_GAP`] ago. The attempt
    /// runs as its own task, so a caller that gives up (times out) does not cancel it.
    fn attempt(&self) -> Attempt {
        let mut slot = self.lock();
        if let Some(a) = slot.as_ref() {
            let failed = matches!(a.fut.peek(), Some(Err(_)));
            if !failed || a.started.elapsed() < CLUSTER_RETRY_GAP {
                return a.clone();
            }
        }
        let client = self.client.clone();
        let timeout = self.connect_timeout;
        let fut: Connecting = async move {
            match tokio::time::timeout(timeout, client.get_async_connection()).await {
                Ok(r) => r,
                Err(_) => Err(RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "Redis Cluster connect timed out",
                ))),
            }
        }
        .boxed()
        .shared();
        self.runtime.spawn(fut.clone().map(|_| ()));
        let a = Attempt {
            fut,
            started: Instant::now(),
        };
        *slot = Some(a.clone());
        a
    }

    /// Forgets `used` (if still current) so that the next call connects afresh.
    fn invalidate(&self, used: &Connecting) {
        let mut slot = self.lock();
        if slot.as_ref().is_some_and(|a| a.fut.ptr_eq(used)) {
            *slot = None;
        }
    }
}

/// How long a single-node connection whose connect failed for good (see
/// [`SingleHandle::renew_after`]) keeps answering with that failure before a fresh one is
/// tried: bounds the connect attempts against a Redis that refuses the credentials.
const SINGLE_RENEW_GAP: Duration = Duration::from_secs(1);

/// A single node's connection: a lazy `ConnectionManager`, replaced by a fresh one when its
/// connect failed in a way the manager never retries (it reconnects only after I/O errors,
/// so an authentication or TLS failure would otherwise be its answer until the process
/// restarts, even after the password or certificate was mended).
pub(super) struct SingleHandle {
    client: redis::Client,
    config: ConnectionManagerConfig,
    slot: Mutex<Managed>,
}

#[derive(Clone)]
struct Managed {
    manager: ConnectionManager,
    /// Which manager this is (so a failure renews only the manager it came from).
    generation: u64,
    created: Instant,
}

impl SingleHandle {
    pub(super) fn new(
        client: redis::Client,
        config: ConnectionManagerConfig,
    ) -> redis::RedisResult<Self> {
        let manager = client.get_connection_manager_lazy(config.clone())?;
        Ok(SingleHandle {
            client,
            config,
            slot: Mutex::new(Managed {
                manager,
                generation: 0,
                created: Instant::now(),
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Managed> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current(&self) -> Managed {
        self.lock().clone()
    }

    /// After `e` from the manager of `generation`: when it is a failure the manager does not
    /// recover from by itself (authentication, TLS), replaces it with a fresh lazy manager,
    /// at most once per [`SINGLE_RENEW_GAP`].
    fn renew_after(&self, generation: u64, e: &RedisError) {
        if !matches!(
            crate::error::store_error_from_redis(e, Duration::ZERO),
            StoreError::Auth(_) | StoreError::Tls(_)
        ) {
            return;
        }
        let mut slot = self.lock();
        if slot.generation != generation || slot.created.elapsed() < SINGLE_RENEW_GAP {
            return;
        }
        if let Ok(manager) = self.client.get_connection_manager_lazy(self.config.clone()) {
            *slot = Managed {
                manager,
                generation: generation + 1,
                created: Instant::now(),
            };
        }
    }

    /// Runs `op` on the current manager, renewing it after a failure it cannot recover from.
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, RedisError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = Result<T, RedisError>>,
    {
        let Managed {
            manager,
            generation,
            ..
        } = self.current();
        let r = op(manager).await;
        if let Err(e) = &r {
            self.renew_after(generation, e);
        }
        r
    }
}

/// Errors after which a cluster connection is rebuilt from the seed nodes.
fn needs_fresh_cluster_connection(e: &RedisError) -> bool {
    e.kind() == ErrorKind::ClusterConnectionNotFound || e.is_connection_dropped()
}

/// The connection a store uses.
#[derive(Clone)]
pub(super) enum Conn {
    /// One Redis node.
    Single(Arc<SingleHandle>),
    /// Redis Cluster.
    Cluster(Arc<ClusterHandle>),
}

/// Most invocations of one script call that may end in NOSCRIPT (see [`Conn::invoke`]).
const NOSCRIPT_TRIES: u32 = 3;

impl Conn {
    /// Runs one script invocation (EVALSHA, with SCRIPT LOAD + retry on NOSCRIPT).
    ///
    /// redis-rs loads and retries once; when the scripts are flushed again between its load
    /// and its retry (a `SCRIPT FLUSH` or a restart racing a call), the second NOSCRIPT is
    /// retried here, up to [`NOSCRIPT_TRIES`] times in all: NOSCRIPT means the script did not
    /// run, so trying again cannot apply anything twice. Without this a settle sent alone
    /// (the flusher's) was reported dropped while scripts were being flushed.
    pub(super) async fn invoke(
        &self,
        inv: &ScriptInvocation<'static>,
    ) -> Result<Value, RedisError> {
        let mut tries = 1;
        loop {
            let r = self.invoke_once(inv).await;
            match &r {
                Err(e)
                    if tries < NOSCRIPT_TRIES
                        && e.kind()
                            == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    tries += 1;
                }
                _ => return r,
            }
        }
    }

    async fn invoke_once(&self, inv: &ScriptInvocation<'static>) -> Result<Value, RedisError> {
        match self {
            Conn::Single(h) => {
                h.run(|mut cm| async move { inv.invoke_async(&mut cm).await })
                    .await
            }
            Conn::Cluster(h) => {
                let attempt = h.attempt();
                let mut con = match attempt.fut.clone().await {
                    Ok(con) => con,
                    Err(e) => return Err(e),
                };
                let r = inv.invoke_async(&mut con).await;
                if let Err(e) = &r {
                    if needs_fresh_cluster_connection(e) {
                        h.invalidate(&attempt.fut);
                    }
                }
                r
            }
        }
    }

    /// Loads every script (`SCRIPT LOAD`; on Cluster it goes to every master), so that the
    /// first `EVALSHA` of each after a connect or a restart of Redis finds it. Invocations
    /// fall back to load-and-retry on NOSCRIPT anyway; this spares that round trip, and a
    /// take-back whose caller may not wait for the fallback.
    pub(super) async fn load_scripts(&self) -> Result<(), RedisError> {
        match self {
            Conn::Single(h) => {
                h.run(|cm| async move {
                    let loads = super::scripts::all().map(|s| {
                        let mut cm = cm.clone();
                        async move { s.load_async(&mut cm).await }
                    });
                    for r in futures_util::future::join_all(loads).await {
                        r?;
                    }
                    Ok(())
                })
                .await
            }
            Conn::Cluster(h) => {
                let attempt = h.attempt();
                let con = attempt.fut.clone().await?;
                let loads = super::scripts::all().map(|s| {
                    let mut con = con.clone();
                    async move { s.load_async(&mut con).await }
                });
                for r in futures_util::future::join_all(loads).await {
                    if let Err(e) = r {
                        if needs_fresh_cluster_connection(&e) {
                            h.invalidate(&attempt.fut);
                        }
                        return Err(e);
                    }
                }
                Ok(())
            }
        }
    }

    /// PING (every node of a cluster).
    pub(super) async fn ping(&self) -> Result<(), RedisError> {
        let cmd = redis::cmd("PING");
        match self {
            Conn::Single(h) => {
                h.run(|mut cm| async move { cmd.query_async::<Value>(&mut cm).await.map(drop) })
                    .await
            }
            Conn::Cluster(h) => {
                let attempt = h.attempt();
                let mut con = attempt.fut.clone().await?;
                let r = cmd.query_async::<Value>(&mut con).await.map(drop);
                if let Err(e) = &r {
                    if needs_fresh_cluster_connection(e) {
                        h.invalidate(&attempt.fut);
                    }
                }
                r
            }
        }
    }
}

/// Maps a redis error by its cause (see `crate::error::store_error_from_redis`): unreachable /
/// slow / not serving count toward local mode, anything the server refused to do is
/// `Command`.
pub(super) fn map_err(e: RedisError, timeout: Duration) -> StoreError {
    crate::error::store_error_from_redis(&e, timeout)
}
