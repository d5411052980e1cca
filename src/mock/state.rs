//! The fake upstream's shared state: plans, per-model counters (requests, in flight, peak in
//! flight), the requests seen, and the seeded generator of the failure draws.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use rand::Rng;

use super::{ModelStats, Plan, Reply, Seen};

/// One model's counters.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Counts {
    pub(super) requests: u64,
    pub(super) in_flight: u64,
    pub(super) peak: u64,
}

#[derive(Debug)]
pub(super) struct State {
    pub(super) plans: HashMap<String, Plan>,
    pub(super) default: Plan,
    /// The plans given at start, which `reset` restores.
    pub(super) start_plans: HashMap<String, Plan>,
    pub(super) start_default: Plan,
    pub(super) counts: HashMap<String, Counts>,
    pub(super) seen: Vec<Seen>,
    pub(super) keep_seen: bool,
    pub(super) rng: rand::rngs::StdRng,
    pub(super) next_id: u64,
}

/// The fixed-response mode: one body for every request, a lock-free count.
#[derive(Debug)]
pub(super) struct Fixed {
    pub(super) body: Bytes,
    pub(super) requests: AtomicU64,
}

#[derive(Debug, Clone)]
pub(super) struct Shared {
    pub(super) state: Arc<Mutex<State>>,
    pub(super) fixed: Option<Arc<Fixed>>,
}

/// What `decide` chose for one request.
pub(super) struct Decision {
    pub(super) reply: Reply,
    pub(super) latency: Duration,
    pub(super) id: String,
    pub(super) text: Option<String>,
    /// Held while the answer is on its way; dropping it ends the request's time in flight.
    pub(super) in_flight: InFlight,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock must not hide the next test's answers.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Counts the request (and its time in flight) and picks its reply, latency and id.
    pub(super) fn decide(&self, seen: Seen) -> Decision {
        let mut s = self.lock();
        let model = seen.model.clone();
        let c = s.counts.entry(model.clone()).or_default();
        c.requests += 1;
        c.in_flight += 1;
        c.peak = c.peak.max(c.in_flight);
        if s.keep_seen {
            s.seen.push(seen);
        }
        s.next_id += 1;
        let id = format!("msg_mock_{:06}", s.next_id);
        let State {
            plans,
            default,
            rng,
            ..
        } = &mut *s;
        let plan = plans.get_mut(&model).unwrap_or(default);
        let reply = if let Some(r) = plan.queue.pop_front() {
            r
        } else if plan.failure_rate > 0.0 && rng.random::<f64>() < plan.failure_rate {
            plan.failure.clone().unwrap_or_else(Reply::overloaded)
        } else {
            plan.reply.clone()
        };
        let (latency, text) = (plan.latency, plan.text.clone());
        drop(s);
        Decision {
            reply,
            latency,
            id,
            text,
            in_flight: InFlight {
                shared: self.clone(),
                model,
            },
        }
    }

    /// Every model's counters, by name.
    pub(super) fn stats(&self) -> BTreeMap<String, ModelStats> {
        self.lock()
            .counts
            .iter()
            .map(|(m, c)| {
                (
                    m.clone(),
                    ModelStats {
                        requests: c.requests,
                        in_flight: c.in_flight,
                        peak_in_flight: c.peak,
                    },
                )
            })
            .collect()
    }

    /// All requests, all models (in the fixed-response mode: its own count).
    pub(super) fn total(&self) -> u64 {
        let fixed = self
            .fixed
            .as_ref()
            .map_or(0, |f| f.requests.load(Ordering::Relaxed));
        fixed + self.lock().counts.values().map(|c| c.requests).sum::<u64>()
    }

    /// Zeroes the request counts and the seen requests; a peak restarts from what is in flight
    /// now.
    pub(super) fn reset_counts(&self) {
        if let Some(f) = &self.fixed {
            f.requests.store(0, Ordering::Relaxed);
        }
        let mut s = self.lock();
        s.counts.retain(|_, c| c.in_flight > 0);
        for c in s.counts.values_mut() {
            c.requests = 0;
            c.peak = c.in_flight;
        }
        s.seen.clear();
    }

    /// Plans back to those given at start, and [`Shared::reset_counts`].
    pub(super) fn reset(&self) {
        {
            let mut s = self.lock();
            s.plans = s.start_plans.clone();
            s.default = s.start_default.clone();
        }
        self.reset_counts();
    }
}

/// A request in flight: counted from its arrival until its answer is sent in full or the
/// client goes away (the guard travels inside the response body).
pub(super) struct InFlight {
    shared: Shared,
    model: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut s = self.shared.lock();
        if let Some(c) = s.counts.get_mut(&self.model) {
            c.in_flight = c.in_flight.saturating_sub(1);
        }
    }
}
