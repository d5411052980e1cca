//! What the demo shows: counted from what happened, never scripted. Answers are counted from
//! the proxy's response headers (`x-fusebox-tier`, `x-fusebox-attempts`), breaker
//! transitions and refusals from the coordinator's observer events, upstream calls from the
//! mock upstream's own counters.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Instant;

use fusebox::breaker::CircuitState;
use fusebox::{Event, Observer};
use tokio::sync::mpsc::UnboundedSender;

use super::scenario::{FALLBACK, PRIMARY};

/// What the printer hears about.
pub(super) enum Msg {
    /// An observer event.
    Event(Event),
    /// One answer the proxy gave a client.
    Answer {
        /// `x-fusebox-tier` (`None`: the proxy's own error, or no header).
        tier: Option<String>,
        /// `x-fusebox-attempts`.
        attempts: u32,
        /// The HTTP status.
        status: u16,
    },
    /// The request did not get an answer at all (connection error, timeout).
    Failed,
}

/// Hands every event to the printer (the observer is called inline: a channel send only).
pub(super) struct Forward(pub(super) UnboundedSender<Msg>);

impl Observer for Forward {
    fn on_event(&self, event: &Event) {
        if matches!(event, Event::Transition(_) | Event::Rejected { .. }) {
            let _ = self.0.send(Msg::Event(event.clone()));
        }
    }
}

/// Writes a line to stdout; a closed stdout does not stop the demo.
pub(super) fn line(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
}

/// Counts of one kind, for one second and for the whole run.
#[derive(Debug, Default, Clone)]
pub(super) struct Counts {
    pub(super) tiers: BTreeMap<String, u64>,
    pub(super) errors: u64,
    pub(super) retried: u64,
    pub(super) refused_bulkhead: u64,
    pub(super) refused_breaker: u64,
}

impl Counts {
    fn tier(&self, t: &str) -> u64 {
        self.tiers.get(t).copied().unwrap_or(0)
    }

    pub(super) fn answers(&self) -> u64 {
        self.tiers.values().sum::<u64>() + self.errors
    }

    pub(super) fn degraded(&self) -> u64 {
        self.tier("cache") + self.tier("canned")
    }
}

/// The running tally the printer keeps.
pub(super) struct Tally {
    start: Instant,
    pub(super) second: Counts,
    pub(super) total: Counts,
    pub(super) states: BTreeMap<String, CircuitState>,
    /// (target, opened, closed, half-opened) per target.
    pub(super) opened: BTreeMap<String, u64>,
    pub(super) closed: BTreeMap<String, u64>,
    pub(super) probing: BTreeMap<String, u64>,
    /// Upstream calls per model at the last tick.
    upstream_seen: BTreeMap<String, u64>,
    /// Upstream calls per model at the start of the current phase.
    phase_start: BTreeMap<String, u64>,
    /// Per phase: its name, seconds, and the upstream calls to each model during it.
    phases: Vec<(String, f64, u64, u64)>,
}

impl Tally {
    pub(super) fn new(start: Instant) -> Self {
        Tally {
            start,
            second: Counts::default(),
            total: Counts::default(),
            states: [PRIMARY, FALLBACK]
                .iter()
                .map(|t| ((*t).to_owned(), CircuitState::Closed))
                .collect(),
            opened: BTreeMap::new(),
            closed: BTreeMap::new(),
            probing: BTreeMap::new(),
            upstream_seen: BTreeMap::new(),
            phase_start: BTreeMap::new(),
            phases: Vec::new(),
        }
    }

    pub(super) fn stamp(&self) -> String {
        format!("[{:5.1}s]", self.start.elapsed().as_secs_f64())
    }

    /// Takes in one message; transitions are printed as they happen.
    pub(super) fn take(&mut self, msg: Msg) {
        match msg {
            Msg::Answer {
                tier,
                attempts,
                status,
            } => {
                for c in [&mut self.second, &mut self.total] {
                    match (&tier, status) {
                        (Some(t), 200) => *c.tiers.entry(t.clone()).or_insert(0) += 1,
                        _ => c.errors += 1,
                    }
                    if attempts > 1 {
                        c.retried += 1;
                    }
                }
            }
            Msg::Failed => {
                self.second.errors += 1;
                self.total.errors += 1;
            }
            Msg::Event(Event::Rejected { rejection, .. }) => {
                for c in [&mut self.second, &mut self.total] {
                    match rejection.kind() {
                        "bulkhead_full" => c.refused_bulkhead += 1,
                        "circuit_open" | "not_before" => c.refused_breaker += 1,
                        _ => {}
                    }
                }
            }
            Msg::Event(Event::Transition(t)) => {
                let why = match t.reason.as_str() {
                    "consecutive_failures" => "failures in a row: stop calling it",
                    "open_elapsed" => "open time over: let a probe through",
                    "probe_failed" => "the probe failed: stay away longer",
                    "probes_succeeded" => "the probe succeeded: back in service",
                    "failure_rate" => "too many failures in the window",
                    "slow_call_rate" => "too many slow calls",
                    other => other,
                };
                let bump = |m: &mut BTreeMap<String, u64>| {
                    *m.entry(t.target.clone()).or_insert(0) += 1;
                };
                match t.to {
                    CircuitState::Open => bump(&mut self.opened),
                    CircuitState::Closed => bump(&mut self.closed),
                    CircuitState::HalfOpen => bump(&mut self.probing),
                    _ => {}
                }
                self.states.insert(t.target.clone(), t.to);
                line(&format!(
                    "{}   breaker {}: {} -> {} ({why})",
                    self.stamp(),
                    t.target,
                    t.from,
                    t.to
                ));
            }
            Msg::Event(_) => {}
        }
    }

    /// The once-a-second line: answers by tier, refusals, upstream calls, breaker states.
    pub(super) fn tick(&mut self, phase: &str, upstream: &BTreeMap<String, u64>) {
        let c = std::mem::take(&mut self.second);
        let mut calls = Vec::new();
        for model in [PRIMARY, FALLBACK] {
            let now = upstream.get(model).copied().unwrap_or(0);
            let before = self
                .upstream_seen
                .insert(model.to_owned(), now)
                .unwrap_or(0);
            let delta = now.saturating_sub(before);
            calls.push(format!("{} {delta}", short(model)));
        }
        let states: Vec<String> = [PRIMARY, FALLBACK]
            .iter()
            .map(|t| {
                let s = self.states.get(*t).copied().unwrap_or(CircuitState::Closed);
                format!("{} {s}", short(t))
            })
            .collect();
        line(&format!(
            "{} {phase:<18} answered: primary {:>3} fallback {:>3} cache {:>3} canned {:>3} \
             errors {:>2} | >1 attempt {:>2} | bulkhead refused {:>3} | open-breaker skips {:>3} \
             | upstream calls: {} | breakers: {}",
            self.stamp(),
            c.tier("primary"),
            c.tier("fallback"),
            c.tier("cache"),
            c.tier("canned"),
            c.errors,
            c.retried,
            c.refused_bulkhead,
            c.refused_breaker,
            calls.join(", "),
            states.join(", "),
        ));
    }

    /// Ends a phase: the upstream calls to each model during it.
    pub(super) fn end_phase(&mut self, name: &str, seconds: f64, upstream: &BTreeMap<String, u64>) {
        let during = |m: &str| {
            upstream
                .get(m)
                .copied()
                .unwrap_or(0)
                .saturating_sub(self.phase_start.get(m).copied().unwrap_or(0))
        };
        self.phases
            .push((name.to_owned(), seconds, during(PRIMARY), during(FALLBACK)));
        self.phase_start = upstream.clone();
    }

    /// The closing summary, from the totals.
    pub(super) fn summary(&self, upstream: &BTreeMap<String, u64>) -> Vec<String> {
        let t = &self.total;
        let get = |m: &BTreeMap<String, u64>, k: &str| m.get(k).copied().unwrap_or(0);
        let mut out = vec![
            String::new(),
            format!(
                "summary: {} requests in {:.1} s",
                t.answers(),
                self.start.elapsed().as_secs_f64()
            ),
            format!("  primary answers:   {}", t.tier("primary")),
            format!(
                "  fallback answers:  {}   (fallback: another model answered)",
                t.tier("fallback")
            ),
            format!(
                "  degraded answers:  {}   (cache {}, canned {}: a 200 when no model could answer)",
                t.degraded(),
                t.tier("cache"),
                t.tier("canned")
            ),
            format!("  errors:            {}", t.errors),
            format!(
                "  more than one attempt: {}   (a failover, or a retry after a backoff wait)",
                t.retried
            ),
            format!(
                "  refused by the bulkhead: {}   (answered degraded instead of queueing)",
                t.refused_bulkhead
            ),
        ];
        for target in [PRIMARY, FALLBACK] {
            out.push(format!(
                "  breaker {target}: opened {}, half-open {}, closed {} (transitions); now {}",
                get(&self.opened, target),
                get(&self.probing, target),
                get(&self.closed, target),
                self.states
                    .get(target)
                    .copied()
                    .unwrap_or(CircuitState::Closed),
            ));
        }
        out.push(format!(
            "  upstream calls: {PRIMARY} {}, {FALLBACK} {}; by phase:",
            get(upstream, PRIMARY),
            get(upstream, FALLBACK),
        ));
        for (name, seconds, primary, fallback) in &self.phases {
            out.push(format!(
                "    {name:<18} {seconds:>5.1} s: {PRIMARY} {primary:>4}, {FALLBACK} {fallback:>4}"
            ));
        }
        out
    }
}

/// `claude-sonnet-4-6` -> `sonnet`, for the narrow per-second line.
fn short(target: &str) -> &str {
    target
        .strip_prefix("claude-")
        .and_then(|t| t.split('-').next())
        .unwrap_or(target)
}
