//! A fake Anthropic upstream (feature `server`): a real HTTP server on 127.0.0.1 speaking the
//! Messages API's wire format, programmable per model while it runs. Every pipeline test uses
//! it, and `fusebox mock-upstream` wraps it. Its own port also serves a control API under
//! `/_mock/` (see [`PlanSpec`] and the table below), and it counts per model the requests,
//! those in flight and the peak in flight.
//!
//! | Request | Does |
//! |---|---|
//! | `GET /_mock/stats` | per-model `requests`, `in_flight`, `peak_in_flight`, and `total_requests` |
//! | `PUT /_mock/models/{model}` | sets the model's plan from a [`PlanSpec`] JSON body |
//! | `DELETE /_mock/models/{model}` | the model back to the plan it had at start (or the default) |
//! | `PUT /_mock/default` | the plan of models without one of their own |
//! | `POST /_mock/reset` | every plan back to the start, counts zeroed, peaks restart |
//! | `POST /_mock/reset_counts` | counts zeroed, peaks restart; plans stay |
//!
//! ```no_run
//! # async fn demo() -> std::io::Result<()> {
//! use fusebox::mock::{MockUpstream, Plan, Reply};
//!
//! let mock = MockUpstream::builder()
//!     .model("primary", Plan::always(Reply::overloaded()))
//!     .model("fallback", Plan::answer().latency(std::time::Duration::from_millis(20)))
//!     .seed(7)
//!     .start()
//!     .await?;
//! println!("base URL {}", mock.url());
//! // ... calls ...
//! assert_eq!(mock.requests("primary"), 0);
//! # Ok(()) }
//! ```

mod control;
mod reply;
mod server;
mod spec;
mod state;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::SeedableRng;

pub use self::reply::{ErrorReply, Reply};
pub use self::spec::PlanSpec;
use self::state::{Fixed, Shared, State};

/// How the fake upstream answers one model: queued one-off replies first, then a failure with
/// probability `failure_rate` (seeded), otherwise `reply`; each after `latency`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// The usual reply. Default: [`Reply::Answer`].
    pub reply: Reply,
    /// Wait before answering. Default: none.
    pub latency: Duration,
    /// The share of requests (0.0 to 1.0) answered with `failure` instead. Default: 0.
    pub failure_rate: f64,
    /// The reply of a failed request. Default: [`Reply::overloaded`].
    pub failure: Option<Reply>,
    /// One-off replies, used in order before anything else.
    pub queue: VecDeque<Reply>,
    /// The text of a normal answer. Default: `"<model> says: <last user text>"`.
    pub text: Option<String>,
}

impl Plan {
    /// Answers every request.
    pub fn answer() -> Plan {
        Plan::default()
    }

    /// Answers every request with `reply`.
    pub fn always(reply: Reply) -> Plan {
        Plan {
            reply,
            ..Plan::default()
        }
    }

    /// With a wait before each answer.
    pub fn latency(mut self, latency: Duration) -> Plan {
        self.latency = latency;
        self
    }

    /// Fails a share `rate` of the requests with `failure` (drawn from the seeded generator).
    pub fn failing(mut self, rate: f64, failure: Reply) -> Plan {
        self.failure_rate = rate;
        self.failure = Some(failure);
        self
    }

    /// Normal answers say `text` (instead of echoing the request).
    pub fn text(mut self, text: impl Into<String>) -> Plan {
        self.text = Some(text.into());
        self
    }

    /// With one-off replies used first, in order.
    pub fn then(mut self, replies: impl IntoIterator<Item = Reply>) -> Plan {
        self.queue.extend(replies);
        self
    }
}

/// What one request carried (the headers a pass-through test checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// The body's `model` (empty when the body was not a request).
    pub model: String,
    /// `x-api-key`.
    pub api_key: Option<String>,
    /// `anthropic-version`.
    pub version: Option<String>,
    /// `anthropic-beta`.
    pub beta: Option<String>,
    /// Whether the body asked for a stream.
    pub stream: bool,
    /// The body as JSON (`Null` when it was not JSON).
    pub body: serde_json::Value,
}

/// One model's counters, as [`MockUpstream::stats`] and `GET /_mock/stats` give them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[non_exhaustive]
pub struct ModelStats {
    /// Requests that reached the server.
    pub requests: u64,
    /// Requests being answered now (from arrival until the answer is sent in full or the
    /// client goes away; a stream counts for as long as it lasts).
    pub in_flight: u64,
    /// The most requests in flight at once since start or the last reset.
    pub peak_in_flight: u64,
}

/// Builds a [`MockUpstream`].
#[derive(Debug)]
pub struct MockUpstreamBuilder {
    plans: HashMap<String, Plan>,
    default: Plan,
    seed: u64,
    addr: SocketAddr,
    keep_seen: bool,
    fixed: bool,
}

impl Default for MockUpstreamBuilder {
    fn default() -> Self {
        MockUpstreamBuilder {
            plans: HashMap::new(),
            default: Plan::default(),
            seed: 0,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            keep_seen: true,
            fixed: false,
        }
    }
}

impl MockUpstreamBuilder {
    /// How `model` is answered.
    pub fn model(mut self, model: impl Into<String>, plan: Plan) -> Self {
        self.plans.insert(model.into(), plan);
        self
    }

    /// How models without a plan of their own are answered. Default: [`Plan::answer`].
    pub fn default_plan(mut self, plan: Plan) -> Self {
        self.default = plan;
        self
    }

    /// The seed of the failure-rate draws. Default: 0.
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The port on 127.0.0.1. Default: 0 (any free port).
    pub fn port(mut self, port: u16) -> Self {
        self.addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        self
    }

    /// The address to listen on. Default: `127.0.0.1:0` (any free port).
    pub fn listen(mut self, addr: SocketAddr) -> Self {
        self.addr = addr;
        self
    }

    /// Whether to keep every request for [`MockUpstream::seen`]. Default: yes; a
    /// long-running server turns it off so that memory stays flat.
    pub fn keep_seen(mut self, keep: bool) -> Self {
        self.keep_seen = keep;
        self
    }

    /// The fixed-response mode, for measuring what sits in front: every `POST /v1/messages`
    /// gets the same JSON message at once, without parsing the request, without a lock and
    /// without a random draw. Plans are ignored; only the total request count is kept
    /// (`total_requests`), not per-model counters. Default: off.
    pub fn fixed_response(mut self, on: bool) -> Self {
        self.fixed = on;
        self
    }

    /// Binds and serves in a background task until the [`MockUpstream`] is dropped.
    pub async fn start(self) -> std::io::Result<MockUpstream> {
        let listener = tokio::net::TcpListener::bind(self.addr).await?;
        let addr = listener.local_addr()?;
        let fixed = self.fixed.then(|| {
            let asked = reply::Asked::from_body(&serde_json::json!({
                "model": "mock-fixed",
                "messages": [{"role": "user", "content": "fixed"}],
            }));
            Arc::new(Fixed {
                body: bytes::Bytes::from(asked.message("msg_mock_fixed").to_string()),
                requests: std::sync::atomic::AtomicU64::new(0),
            })
        });
        let shared = Shared {
            state: Arc::new(Mutex::new(State {
                start_plans: self.plans.clone(),
                start_default: self.default.clone(),
                plans: self.plans,
                default: self.default,
                counts: HashMap::new(),
                seen: Vec::new(),
                keep_seen: self.keep_seen,
                rng: rand::rngs::StdRng::seed_from_u64(self.seed),
                next_id: 0,
            })),
            fixed,
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = server::app(shared.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(MockUpstream {
            addr,
            shared,
            stop: Some(stop),
            task,
        })
    }
}

/// The running fake upstream. Dropping it stops the server.
#[derive(Debug)]
pub struct MockUpstream {
    addr: SocketAddr,
    shared: Shared,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl MockUpstream {
    /// A builder: every model answers, seed 0, any free port.
    pub fn builder() -> MockUpstreamBuilder {
        MockUpstreamBuilder::default()
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to give a client (`http://127.0.0.1:<port>`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Replaces how `model` is answered from now on.
    pub fn set(&self, model: &str, plan: Plan) {
        self.shared.lock().plans.insert(model.to_owned(), plan);
    }

    /// Queues one-off replies for `model`, used before its plan.
    pub fn push(&self, model: &str, replies: impl IntoIterator<Item = Reply>) {
        let mut s = self.shared.lock();
        let default = s.default.clone();
        let plan = s.plans.entry(model.to_owned()).or_insert(default);
        plan.queue.extend(replies);
    }

    /// How many requests for `model` reached the server.
    pub fn requests(&self, model: &str) -> u64 {
        self.shared
            .lock()
            .counts
            .get(model)
            .map_or(0, |c| c.requests)
    }

    /// How many requests for `model` are being answered now (a stream until it ends or its
    /// client goes away).
    pub fn in_flight(&self, model: &str) -> u64 {
        self.shared
            .lock()
            .counts
            .get(model)
            .map_or(0, |c| c.in_flight)
    }

    /// The most requests for `model` in flight at once since start or [`reset_counts`].
    ///
    /// [`reset_counts`]: MockUpstream::reset_counts
    pub fn peak_in_flight(&self, model: &str) -> u64 {
        self.shared.lock().counts.get(model).map_or(0, |c| c.peak)
    }

    /// Every model's counters, by name.
    pub fn stats(&self) -> BTreeMap<String, ModelStats> {
        self.shared.stats()
    }

    /// How many requests reached the server, all models.
    pub fn total_requests(&self) -> u64 {
        self.shared.total()
    }

    /// Every request so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.lock().seen.clone()
    }

    /// Forgets the counts and seen requests; each peak restarts from what is in flight now
    /// (plans stay).
    pub fn reset_counts(&self) {
        self.shared.reset_counts();
    }

    /// Plans back to those given to the builder, and [`MockUpstream::reset_counts`].
    pub fn reset(&self) {
        self.shared.reset();
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        // Connections held open (a hanging reply) would keep a graceful shutdown waiting.
        self.task.abort();
    }
}
