//! Connections: a single node through `ConnectionManager` (lazy, reconnects in the
//! background), or Redis Cluster through a `ClusterConnection` that is (re)established on
//! demand by a background task. Neither fails when Redis is merely unreachable at start.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::future::{BoxFuture, FutureExt, Shared};
use redis::aio::ConnectionManager;
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

/// Errors after which a cluster connection is rebuilt from the seed nodes.
fn needs_fresh_cluster_connection(e: &RedisError) -> bool {
    e.kind() == ErrorKind::ClusterConnectionNotFound || e.is_connection_dropped()
}

/// The connection a store uses.
#[derive(Clone)]
pub(super) enum Conn {
    /// One Redis node.
    Single(ConnectionManager),
    /// Redis Cluster.
    Cluster(Arc<ClusterHandle>),
}

impl Conn {
    /// Runs one script invocation (EVALSHA, with SCRIPT LOAD + retry on NOSCRIPT).
    pub(super) async fn invoke(
        &self,
        inv: &ScriptInvocation<'static>,
    ) -> Result<Value, RedisError> {
        match self {
            Conn::Single(cm) => inv.invoke_async(&mut cm.clone()).await,
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
            Conn::Single(cm) => {
                let loads = super::scripts::all().map(|s| {
                    let mut cm = cm.clone();
                    async move { s.load_async(&mut cm).await }
                });
                for r in futures_util::future::join_all(loads).await {
                    r?;
                }
                Ok(())
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
            Conn::Single(cm) => cmd.query_async::<Value>(&mut cm.clone()).await.map(drop),
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
