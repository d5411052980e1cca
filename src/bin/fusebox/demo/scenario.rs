//! The demo's script: the configuration it runs, and its phases (what the mock upstream
//! does in each, and the sentence that explains it). Nothing here reports a result: what
//! happened is counted from answers and observer events (`report.rs`).

use std::time::Duration;

use fusebox::mock::{Plan, Reply};

pub(super) const PRIMARY: &str = "claude-sonnet-4-6";
pub(super) const FALLBACK: &str = "claude-haiku-4-5";
pub(super) const FEATURE: &str = "chat";

/// Times of the script at speed 1.
const OPEN_MS: u64 = 2_500;
const SLOW_MS: u64 = 1_200;
const TIMEOUT_MS: u64 = 3_000;
pub(super) const BULKHEAD: u32 = 4;
pub(super) const FAILURES_TO_OPEN: u32 = 5;

/// A duration of the script at `speed` (at least 1 ms).
pub(super) fn scaled(ms: u64, speed: f64) -> Duration {
    Duration::from_secs_f64((ms as f64 / 1000.0 / speed).max(0.001))
}

fn toml_ms(ms: u64, speed: f64) -> String {
    format!("\"{}ms\"", scaled(ms, speed).as_millis().max(1))
}

/// The configuration: embedded store, one feature whose chain is primary -> fallback, a
/// degraded cache and a canned answer, and the proxy pointed at the mock upstream.
pub(super) fn config(upstream: &str, speed: f64) -> String {
    format!(
        r#"namespace = "demo"

[breaker]
consecutive_failures = {FAILURES_TO_OPEN}
failure_rate = false
open_duration = {open}
open_duration_multiplier = 1.0
max_open_duration = {open}
half_open_probes = 1
half_open_successes = 1

[targets."{PRIMARY}"]
timeout = {timeout}

[targets."{FALLBACK}"]
timeout = {timeout}

[features.{FEATURE}]
max_concurrent = {BULKHEAD}
max_wait = {wait}
chain = ["{PRIMARY}", "{FALLBACK}"]

[features.{FEATURE}.canned]
text = "The assistant is busy right now. Please try again in a minute."
retry_after = "1m"

[retry]
max_attempts = 3
base = {base}
cap = {cap}
budget = false

[cache]
enabled = true
tenant = "shared"

[server]
listen = "127.0.0.1:0"
upstream = "{upstream}"
default_feature = "{FEATURE}"
"#,
        open = toml_ms(OPEN_MS, speed),
        timeout = toml_ms(TIMEOUT_MS, speed),
        wait = toml_ms(20, speed),
        base = toml_ms(100, speed),
        cap = toml_ms(400, speed),
    )
}

/// One phase: how long, what the upstream does, and what to watch for.
pub(super) struct Phase {
    pub(super) name: &'static str,
    pub(super) seconds: f64,
    pub(super) explain: String,
    /// The plans (model, plan) the mock upstream switches to when the phase starts.
    pub(super) plans: Vec<(&'static str, Plan)>,
}

fn secs(ms: u64, speed: f64) -> String {
    format!("{:.2} s", scaled(ms, speed).as_secs_f64())
}

pub(super) fn phases(speed: f64) -> Vec<Phase> {
    let open = secs(OPEN_MS, speed);
    let slow = secs(SLOW_MS, speed);
    vec![
        Phase {
            name: "steady",
            seconds: 4.0,
            explain: format!(
                "All is well: every request goes to the primary model, {PRIMARY}. Its answers \
                 are kept in the degraded-response cache."
            ),
            plans: vec![(PRIMARY, Plan::answer()), (FALLBACK, Plan::answer())],
        },
        Phase {
            name: "primary overloaded",
            seconds: 8.0,
            explain: format!(
                "{PRIMARY} now answers 529 overloaded. FALLBACK: each request moves on to \
                 {FALLBACK} at once. BREAKER: after {FAILURES_TO_OPEN} failures in a row the \
                 primary's breaker opens and it gets no calls at all; every {open} one probe \
                 tests it (half-open), fails, and the breaker opens again."
            ),
            plans: vec![(PRIMARY, Plan::always(Reply::overloaded()))],
        },
        Phase {
            name: "fallback slow",
            seconds: 6.0,
            explain: format!(
                "{FALLBACK} slows down to {slow} an answer. BULKHEAD: the chat feature lets at \
                 most {BULKHEAD} calls wait on it at once; the rest are not queued but answered \
                 at once, DEGRADED: from the cache (an earlier answer to the same question) or \
                 with the canned reply."
            ),
            plans: vec![(FALLBACK, Plan::answer().latency(scaled(SLOW_MS, speed)))],
        },
        Phase {
            name: "everything fails",
            seconds: 7.0,
            explain: format!(
                "Both models fail now ({FALLBACK}: 503). BACKOFF: a 503 is retried on the same \
                 model after an exponential, jittered wait, a few times, then {FALLBACK}'s \
                 breaker opens too. DEGRADED: clients still get a 200, a cached answer, or the \
                 canned reply for questions never answered before."
            ),
            plans: vec![(FALLBACK, Plan::always(Reply::status(503)))],
        },
        Phase {
            name: "recovery",
            seconds: 8.0,
            explain: format!(
                "Both models are healthy again. When a breaker's open time ends, a probe goes \
                 through, succeeds, and the breaker closes: {PRIMARY} answers again, no \
                 operator needed."
            ),
            plans: vec![(PRIMARY, Plan::answer()), (FALLBACK, Plan::answer())],
        },
    ]
}

/// The questions the clients ask, in turn: a few again and again (their answers are cached),
/// and now and then one never asked before (only the canned reply can cover it).
pub(super) fn question(n: u64) -> String {
    const COMMON: [&str; 6] = [
        "What is a circuit breaker?",
        "Summarise our refund policy.",
        "Translate 'good morning' to French.",
        "Write a haiku about Redis.",
        "How do I reset my password?",
        "What are your opening hours?",
    ];
    if n % 7 == 6 {
        format!("A question never asked before, number {n}.")
    } else {
        COMMON[(n % COMMON.len() as u64) as usize].to_owned()
    }
}
