//! Retries: exponential backoff with jitter ([`backoff`], pure arithmetic) and the
//! fleet-wide retry budget per target (see [`crate::Coordinator::retry_budget`]).
//!
//! The pieces are separate so that the call pipeline can compose them: the backoff says how
//! long to wait and whether an attempt still fits before the deadline; the budget says
//! whether the fleet may spend a retry on the target at all. A spent budget is an answer
//! ("fall through to the next tier"), never a wait.

pub mod backoff;
pub mod budget;
mod policy;
mod run;

pub use self::backoff::{fits, Backoff, BackoffParams, GiveUp, Jitter, Plan};
pub use self::policy::BackoffPolicy;
pub use self::run::{Attempts, Retried, Stop, Verdict};
pub use crate::coordinator::{RetryBudget, Withdrawal};
