//! `fusebox serve`: the proxy ([`fusebox::proxy`]) on `[server] listen` (or `--listen`),
//! until SIGTERM or Ctrl-C; then a graceful shutdown (`server.shutdown_grace`) and a flush
//! of the coordinator's queued settles.

use fusebox::proxy::{serve, ProxyState};
use fusebox::{Config, Coordinator};

use crate::exit::Failure;

pub(crate) async fn run(mut config: Config, listen: Option<&str>) -> Result<(), Failure> {
    init_logging();
    if let Some(l) = listen {
        config.server.listen = l.to_owned();
    }
    // TOKIO_WORKER_THREADS when server.threads is unset (the file wins, as it says).
    if config.server.threads.is_none() {
        if let Ok(v) = std::env::var("TOKIO_WORKER_THREADS") {
            match v.trim().parse::<u32>() {
                Ok(n) if (1..=1024).contains(&n) => config.server.threads = Some(n),
                _ => {
                    return Err(Failure::config(format!(
                        "TOKIO_WORKER_THREADS: {v:?} is not a number of serving threads, 1 to \
                         1024 (or set [server] threads, which wins over it)"
                    )))
                }
            }
        }
    }
    let addr = config.server.listen_addr().map_err(|e| {
        Failure::config(match listen {
            Some(_) => format!("--listen: {e}"),
            None => e.to_string(),
        })
    })?;
    let server = config.server.clone();
    let config_threads = server.serving_threads();
    let chainless: Vec<String> = config
        .features
        .iter()
        .filter(|(_, f)| f.chain.is_empty())
        .map(|(name, _)| name.clone())
        .collect();
    let store = match &config.redis {
        None => "embedded (in this process)",
        Some(r) if r.cluster.is_empty() => "Redis",
        Some(_) => "Redis Cluster",
    };
    let coordinator = Coordinator::new(config)
        .await
        .map_err(|e| Failure::config(e.to_string()))?;
    let metrics = fusebox::proxy::prom::install()
        .map_err(|e| Failure::internal(format!("cannot install the metrics recorder: {e}")))?;
    let state = ProxyState::new(coordinator, server.clone())
        .map_err(|e| Failure::config(e.to_string()))?
        .with_metrics(metrics);
    if server.admin_token.is_some() {
        tracing::info!("admin API on: /admin/... needs the bearer token");
    } else {
        tracing::warn!(
            "admin API off: no [server] admin_token (or FUSEBOX_ADMIN_TOKEN) is configured; \
             /admin/... answers 403"
        );
    }
    let (shutdown, again) = shutdown_signals();
    let cutter = state.clone();
    tokio::spawn(async move {
        again.await;
        tracing::warn!("second shutdown signal: ending the requests still in flight now");
        cutter.end_requests_now();
    });
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| Failure::internal(format!("cannot listen on {addr}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| Failure::internal(format!("cannot read the listen address: {e}")))?;
    // The line scripts wait for (with the real port when --listen asked for port 0).
    crate::print(&format!("fusebox serve: listening on {bound}\n"))?;
    tracing::info!(
        listen = %bound,
        upstream = %server.upstream,
        threads = config_threads,
        store,
        "serving"
    );
    for name in &chainless {
        tracing::warn!(
            feature = %name,
            "feature has no chain: requests for it get a 500 (set [features.{name:?}] chain)"
        );
    }
    serve(listener, state, shutdown)
        .await
        .map_err(|e| Failure::internal(format!("server failed: {e}")))?;
    tracing::info!("stopped");
    Ok(())
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
fn init_logging() {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Ctrl-C, or SIGTERM on Unix. The handlers are installed when this is called (before the
/// `listening on` line, which scripts wait for: a SIGTERM right after it must be a graceful
/// stop, not the default action; seen by the adversarial review, exit 143). The first
/// returned future completes on the first signal (a graceful stop), the second on the next
/// one (the requests still in flight end at once instead of running out
/// `server.shutdown_grace`).
fn shutdown_signals() -> (
    impl std::future::Future<Output = ()> + Send + 'static,
    impl std::future::Future<Output = ()> + Send + 'static,
) {
    let (count, seen) = tokio::sync::watch::channel(0u32);
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let term = signal(SignalKind::terminate()).ok();
        let int = signal(SignalKind::interrupt()).ok();
        tokio::spawn(async move {
            let (mut term, mut int) = (term, int);
            loop {
                let next = async {
                    match &mut term {
                        Some(s) => s.recv().await,
                        None => std::future::pending().await,
                    }
                };
                let other = async {
                    match &mut int {
                        Some(s) => s.recv().await,
                        None => std::future::pending().await,
                    }
                };
                let got = tokio::select! {
                    g = next => g,
                    g = other => g,
                };
                if got.is_none() {
                    return;
                }
                count.send_modify(|n| *n = n.saturating_add(1));
            }
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            count.send_modify(|n| *n = n.saturating_add(1));
        }
    });
    let at_least = |n: u32, mut seen: tokio::sync::watch::Receiver<u32>| async move {
        if seen.wait_for(|c| *c >= n).await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    let first = at_least(1, seen.clone());
    let second = at_least(2, seen);
    (
        async move {
            first.await;
            tracing::info!("shutdown signal received");
        },
        second,
    )
}
