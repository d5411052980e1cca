//! Circuit breaker per target: the state machine as plain data and plain functions.
//!
//! The same transitions run in two places: [`state::BreakerState`] (used by the in-memory store
//! and as the reference model in tests) and `lua/admit.lua` / `lua/settle.lua` (the Redis store).
//! The conformance suite runs both against the same scenarios.

pub mod params;
pub mod state;
pub mod window;

pub use params::BreakerParams;
pub use state::{BreakerSnapshot, BreakerState, Verdict};

use std::fmt;

/// The state of one target's breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CircuitState {
    /// Calls flow; outcomes are counted.
    Closed,
    /// Calls are refused until the open duration ends.
    Open,
    /// A fixed number of probe calls are let through fleet-wide to test the target.
    HalfOpen,
    /// An operator holds the breaker open.
    ForcedOpen,
    /// An operator holds the breaker closed: calls flow and nothing trips it.
    ForcedClosed,
    /// The breaker is switched off: calls flow, nothing is counted.
    Disabled,
}

impl CircuitState {
    /// The numeric code used in the Redis hash (`s` field) and in script replies.
    pub fn code(self) -> u8 {
        match self {
            CircuitState::Closed => 0,
            CircuitState::Open => 1,
            CircuitState::HalfOpen => 2,
            CircuitState::ForcedOpen => 3,
            CircuitState::ForcedClosed => 4,
            CircuitState::Disabled => 5,
        }
    }

    /// The state for a code; `None` for anything else (a corrupted value).
    pub fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            0 => CircuitState::Closed,
            1 => CircuitState::Open,
            2 => CircuitState::HalfOpen,
            3 => CircuitState::ForcedOpen,
            4 => CircuitState::ForcedClosed,
            5 => CircuitState::Disabled,
            _ => return None,
        })
    }

    /// A stable lower-case name (for logs and metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
            CircuitState::ForcedOpen => "forced_open",
            CircuitState::ForcedClosed => "forced_closed",
            CircuitState::Disabled => "disabled",
        }
    }

    /// Whether an operator set this state (it persists until an operator changes it).
    pub fn is_operator_state(self) -> bool {
        matches!(
            self,
            CircuitState::ForcedOpen | CircuitState::ForcedClosed | CircuitState::Disabled
        )
    }
}

impl fmt::Display for CircuitState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What an operator can do to a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Force {
    /// Hold open: refuse every call.
    Open,
    /// Hold closed: admit every call, never trip.
    Closed,
    /// Switch the breaker off.
    Disable,
    /// Back to normal operation, closed with an empty window.
    Reset,
}

impl Force {
    /// The numeric code passed to the Redis script.
    pub fn code(self) -> u8 {
        match self {
            Force::Open => CircuitState::ForcedOpen.code(),
            Force::Closed => CircuitState::ForcedClosed.code(),
            Force::Disable => CircuitState::Disabled.code(),
            Force::Reset => CircuitState::Closed.code(),
        }
    }

    /// The state this command leads to.
    pub fn target_state(self) -> CircuitState {
        match self {
            Force::Open => CircuitState::ForcedOpen,
            Force::Closed => CircuitState::ForcedClosed,
            Force::Disable => CircuitState::Disabled,
            Force::Reset => CircuitState::Closed,
        }
    }
}

/// How a call ended, as far as the breaker is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CallOutcome {
    /// The target worked.
    Success,
    /// The target failed in a way that says something about its health (5xx, 529, timeout…).
    Failure,
    /// Neither: the call was cancelled, or failed for the caller's own reasons (a 400). It
    /// frees a probe slot but counts toward nothing.
    Ignored,
}

impl CallOutcome {
    /// The numeric code passed to the Redis script (0 success, 1 failure, 2 ignored).
    pub fn code(self) -> u8 {
        match self {
            CallOutcome::Success => 0,
            CallOutcome::Failure => 1,
            CallOutcome::Ignored => 2,
        }
    }
}

/// Why a breaker changed state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TransitionReason {
    /// Closed -> open: N consecutive failures.
    ConsecutiveFailures,
    /// Closed -> open: failure rate over the window at or above the threshold.
    FailureRate,
    /// Closed -> open: slow-call rate over the window at or above the threshold.
    SlowCallRate,
    /// Open -> half-open: the open duration ended.
    OpenElapsed,
    /// Half-open -> open: a probe failed.
    ProbeFailed,
    /// Half-open -> closed: enough probes succeeded.
    ProbesSucceeded,
    /// An operator command.
    Operator,
}

impl TransitionReason {
    /// The numeric code used in script replies.
    pub fn code(self) -> u8 {
        match self {
            TransitionReason::ConsecutiveFailures => 1,
            TransitionReason::FailureRate => 2,
            TransitionReason::SlowCallRate => 3,
            TransitionReason::OpenElapsed => 4,
            TransitionReason::ProbeFailed => 5,
            TransitionReason::ProbesSucceeded => 6,
            TransitionReason::Operator => 7,
        }
    }

    /// The reason for a code.
    pub fn from_code(code: i64) -> Option<Self> {
        Some(match code {
            1 => TransitionReason::ConsecutiveFailures,
            2 => TransitionReason::FailureRate,
            3 => TransitionReason::SlowCallRate,
            4 => TransitionReason::OpenElapsed,
            5 => TransitionReason::ProbeFailed,
            6 => TransitionReason::ProbesSucceeded,
            7 => TransitionReason::Operator,
            _ => return None,
        })
    }

    /// A stable lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            TransitionReason::ConsecutiveFailures => "consecutive_failures",
            TransitionReason::FailureRate => "failure_rate",
            TransitionReason::SlowCallRate => "slow_call_rate",
            TransitionReason::OpenElapsed => "open_elapsed",
            TransitionReason::ProbeFailed => "probe_failed",
            TransitionReason::ProbesSucceeded => "probes_succeeded",
            TransitionReason::Operator => "operator",
        }
    }
}

/// One state change of one breaker. Each is reported exactly once, by the replica whose
/// store operation made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The target whose breaker changed.
    pub target: String,
    /// State before.
    pub from: CircuitState,
    /// State after.
    pub to: CircuitState,
    /// Generation after the change (every transition increments it).
    pub generation: u64,
    /// Why.
    pub reason: TransitionReason,
    /// When, in the store's clock (ms since the Unix epoch).
    pub at_ms: u64,
}
