//! `[server]`: the proxy's settings (`fusebox serve`): where it listens, the upstream it
//! forwards to, how a request picks its feature, the admin token, the body limit and the
//! shutdown grace. Plain data, compiled with or without the `proxy` feature, checked with the
//! rest of the configuration (errors name the field). Environment overrides:
//! `FUSEBOX_LISTEN`, `FUSEBOX_UPSTREAM`, `FUSEBOX_ADMIN_TOKEN` (and `FUSEBOX_REDIS_URL` for
//! `[redis]`), applied by [`crate::Config::apply_env`].

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::validate::check_range;
use crate::Error;

/// The default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
/// The default upstream: the Anthropic API.
pub const DEFAULT_UPSTREAM: &str = "https://api.anthropic.com";
/// The default feature header.
pub const DEFAULT_FEATURE_HEADER: &str = "x-fusebox-feature";
/// The default body limit: 32 MiB, the Messages API's own request limit.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 32 * 1024 * 1024;
/// The largest `max_body_bytes` allowed: 256 MiB.
const MAX_BODY_LIMIT: u64 = 256 * 1024 * 1024;
/// Most `server.threads`.
const MAX_THREADS: u32 = 1024;

/// The proxy's settings (`[server]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// The address to listen on (`host:port`; port 0 picks a free one). Env:
    /// `FUSEBOX_LISTEN`. Default: `"127.0.0.1:8080"`.
    pub listen: String,
    /// The upstream's base URL (`http://` or `https://`), to which `/v1/messages` is
    /// appended. Env: `FUSEBOX_UPSTREAM`. Default: `"https://api.anthropic.com"`.
    pub upstream: String,
    /// The feature of a request that names none (no feature header, no route matches). A
    /// configured feature. Default: none (such a request is refused with a 400).
    pub default_feature: Option<String>,
    /// The request header that names the feature. Default: `"x-fusebox-feature"`.
    pub feature_header: String,
    /// Feature by route, used when the request has no feature header: a key starting with
    /// `/` is a path prefix (`"/support" = "chat"` serves `/support/v1/messages` as `chat`,
    /// for clients that can set only a base URL); any other key is a requested model
    /// (`"claude-haiku-4-5" = "cheap"`). A path route wins over a model route. Default:
    /// none.
    pub routes: BTreeMap<String, String>,
    /// The bearer token of the admin API. Printed as `***` by `fusebox check`. Env:
    /// `FUSEBOX_ADMIN_TOKEN`. Default: none (the admin API refuses every request).
    pub admin_token: Option<String>,
    /// The largest request body accepted, in bytes; a larger one gets a 413 in the API's
    /// error shape. 1024 to 268,435,456. Default: `33554432` (32 MiB).
    pub max_body_bytes: u64,
    /// On shutdown (SIGTERM, Ctrl-C), how long requests in flight may take to finish after
    /// the listener closed; then the rest are cut and the coordinator's queued settles are
    /// flushed. 0 s to 10 min. Default: `30s`.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How long a client may take to send a request's headers, and then its whole body;
    /// past it the connection is closed (headers) or the request gets a 408 in the API's
    /// error shape (body), so that slow or idle clients cannot hold a replica's connections
    /// and memory. 1 s to 10 min. Default: `30s`.
    #[serde(with = "humantime_serde")]
    pub read_timeout: Duration,
    /// How many threads serve connections. Each connection is served from start to end on
    /// one thread of its own runtime (the listener hands it to the thread with the fewest
    /// open connections), so that a request never waits for a wake-up from another thread.
    /// 1 to 1024. Default: one per core (for `fusebox serve`, `TOKIO_WORKER_THREADS` when
    /// set; this field wins over it).
    pub threads: Option<u32>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: DEFAULT_LISTEN.to_owned(),
            upstream: DEFAULT_UPSTREAM.to_owned(),
            default_feature: None,
            feature_header: DEFAULT_FEATURE_HEADER.to_owned(),
            routes: BTreeMap::new(),
            admin_token: None,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            shutdown_grace: Duration::from_secs(30),
            read_timeout: Duration::from_secs(30),
            threads: None,
        }
    }
}

impl ServerConfig {
    /// The listen address, parsed.
    pub fn listen_addr(&self) -> Result<SocketAddr, Error> {
        self.listen.parse().map_err(|_| {
            Error::config(
                "server.listen",
                format!(
                    "{:?} is not an address and port such as \"127.0.0.1:8080\" or \"[::]:8080\"",
                    self.listen
                ),
            )
        })
    }

    /// How many threads serve connections: `threads`, else one per core.
    pub fn serving_threads(&self) -> usize {
        match self.threads {
            Some(n) => usize::try_from(n.max(1)).unwrap_or(1),
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// A copy with the admin token replaced by `***` (for printing).
    pub fn redacted(&self) -> ServerConfig {
        ServerConfig {
            admin_token: self.admin_token.as_ref().map(|_| "***".to_owned()),
            ..self.clone()
        }
    }

    /// Checks every field; `features` are the configured feature names.
    pub(super) fn validate(&self, features: &dyn Fn(&str) -> bool) -> Result<(), Error> {
        self.listen_addr()?;
        check_upstream(&self.upstream)?;
        if let Some(n) = self.threads {
            if !(1..=MAX_THREADS).contains(&n) {
                return Err(Error::config(
                    "server.threads",
                    format!("{n} is out of range: 1 to {MAX_THREADS} threads (or leave it out: one per core)"),
                ));
            }
        }
        if let Some(f) = &self.default_feature {
            if !features(f) {
                return Err(Error::config(
                    "server.default_feature",
                    format!("{f:?} is not a configured feature (add [features.{f:?}])"),
                ));
            }
        }
        if self.feature_header.is_empty()
            || !self
                .feature_header
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
        {
            return Err(Error::config(
                "server.feature_header",
                format!(
                    "{:?} is not a header name (letters, digits, - and _)",
                    self.feature_header
                ),
            ));
        }
        for (key, feature) in &self.routes {
            let field = format!("server.routes.{key:?}");
            if key.is_empty() || (key.starts_with('/') && key.len() < 2) {
                return Err(Error::config(
                    field,
                    "a route is a path prefix such as \"/support\" or a model name",
                ));
            }
            if key.starts_with('/') && (key.ends_with('/') || key.contains("/v1/")) {
                return Err(Error::config(
                    field,
                    "a path route is the prefix before /v1/messages, without a trailing /",
                ));
            }
            if !features(feature) {
                return Err(Error::config(
                    field,
                    format!("{feature:?} is not a configured feature"),
                ));
            }
        }
        if let Some(t) = &self.admin_token {
            if t.len() < 16 {
                return Err(Error::config(
                    "server.admin_token",
                    "must be at least 16 characters (it guards forcing breakers fleet-wide)",
                ));
            }
            if !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(Error::config(
                    "server.admin_token",
                    "must be printable ASCII without spaces (it travels in a header)",
                ));
            }
        }
        if !(1024..=MAX_BODY_LIMIT).contains(&self.max_body_bytes) {
            return Err(Error::config(
                "server.max_body_bytes",
                format!(
                    "{} is out of range (1024 to {MAX_BODY_LIMIT})",
                    self.max_body_bytes
                ),
            ));
        }
        check_range(
            "server.shutdown_grace",
            self.shutdown_grace,
            Duration::ZERO,
            Duration::from_secs(600),
        )?;
        check_range(
            "server.read_timeout",
            self.read_timeout,
            Duration::from_secs(1),
            Duration::from_secs(600),
        )?;
        Ok(())
    }
}

/// An upstream base URL: `http://` or `https://`, a host, no query or fragment.
fn check_upstream(url: &str) -> Result<(), Error> {
    let field = "server.upstream";
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| {
            Error::config(
                field,
                format!("{url:?} must start with http:// or https://"),
            )
        })?;
    let host = rest.split('/').next().unwrap_or_default();
    if host.is_empty() || host.contains('@') {
        return Err(Error::config(
            field,
            format!("{url:?} needs a host (and no user:password@)"),
        ));
    }
    if url.contains(['?', '#', ' ']) {
        return Err(Error::config(
            field,
            format!("{url:?} must be a base URL without query, fragment or spaces"),
        ));
    }
    Ok(())
}
