//! A fake Anthropic upstream (feature `server`): a real HTTP server on 127.0.0.1 speaking the
//! Messages API's wire format, programmable per model while it runs. Every pipeline test uses
//! it, and `fusebox mock-upstream` will wrap it.
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

mod reply;
mod server;

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use rand::{Rng, SeedableRng};

pub use self::reply::{ErrorReply, Reply};

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

#[derive(Debug)]
struct State {
    plans: HashMap<String, Plan>,
    default: Plan,
    counts: HashMap<String, u64>,
    seen: Vec<Seen>,
    rng: rand::rngs::StdRng,
    next_id: u64,
}

#[derive(Debug, Clone)]
struct Shared(Arc<Mutex<State>>);

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock must not hide the next test's answers.
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts the request and picks its reply, latency and message id.
    fn decide(&self, seen: Seen) -> (Reply, Duration, String) {
        let mut s = self.lock();
        *s.counts.entry(seen.model.clone()).or_insert(0) += 1;
        let model = seen.model.clone();
        s.seen.push(seen);
        s.next_id += 1;
        let id = format!("msg_mock_{:06}", s.next_id);
        let mut plan = s
            .plans
            .get(&model)
            .cloned()
            .unwrap_or_else(|| s.default.clone());
        let reply = if let Some(r) = plan.queue.pop_front() {
            if let Some(p) = s.plans.get_mut(&model) {
                p.queue.pop_front();
            } else {
                s.default.queue.pop_front();
            }
            r
        } else if plan.failure_rate > 0.0 && s.rng.random::<f64>() < plan.failure_rate {
            plan.failure.clone().unwrap_or_else(Reply::overloaded)
        } else {
            plan.reply.clone()
        };
        (reply, plan.latency, id)
    }
}

/// Builds a [`MockUpstream`].
#[derive(Debug, Default)]
pub struct MockUpstreamBuilder {
    plans: HashMap<String, Plan>,
    default: Plan,
    seed: u64,
    port: u16,
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
        self.port = port;
        self
    }

    /// Binds 127.0.0.1 and serves in a background task until the [`MockUpstream`] is dropped.
    pub async fn start(self) -> std::io::Result<MockUpstream> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", self.port)).await?;
        let addr = listener.local_addr()?;
        let shared = Shared(Arc::new(Mutex::new(State {
            plans: self.plans,
            default: self.default,
            counts: HashMap::new(),
            seen: Vec::new(),
            rng: rand::rngs::StdRng::seed_from_u64(self.seed),
            next_id: 0,
        })));
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
        self.shared.lock().counts.get(model).copied().unwrap_or(0)
    }

    /// How many requests reached the server, all models.
    pub fn total_requests(&self) -> u64 {
        self.shared.lock().counts.values().sum()
    }

    /// Every request so far, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.shared.lock().seen.clone()
    }

    /// Forgets the counts and seen requests (plans stay).
    pub fn reset_counts(&self) {
        let mut s = self.shared.lock();
        s.counts.clear();
        s.seen.clear();
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
