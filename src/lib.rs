#![doc = include_str!("../README.md")]

// The crate's unit tests share the integration tests' helpers (`tests/support`), which name
// the crate `fusebox`.
#[cfg(test)]
extern crate self as fusebox;

// The public API: the coordinator and what its methods take and return, the configuration,
// the one error type, the observer hook and the clock seam. Everything else is the crate's
// machinery: the modules below marked `#[doc(hidden)]` are public only so that the crate's own
// integration tests, differential tests and benchmark can reach them; they are not part of
// the API and may change in any release.

#[cfg(feature = "client")]
pub mod anthropic;
pub mod cache;
pub mod classify;
pub mod clock;
pub mod config;
mod coordinator;
mod error;
#[cfg(feature = "server")]
pub mod mock;
mod observer;
pub mod pipeline;
#[cfg(feature = "proxy")]
pub mod proxy;
pub mod retry;

#[doc(hidden)]
pub mod breaker;
#[doc(hidden)]
pub mod bulkhead;
#[doc(hidden)]
pub mod keys;
#[doc(hidden)]
pub mod ratelimit;
#[doc(hidden)]
pub mod store;

pub use breaker::window::Totals;
pub use breaker::{
    BreakerSnapshot, CallOutcome, CircuitState, Force, Transition, TransitionReason,
};
pub use config::{
    BreakerConfig, BreakerOverrides, BudgetConfig, CacheConfig, CacheOverrides, CannedConfig,
    Config, FallbackAlertConfig, FeatureConfig, RateConfig, RedisConfig, RetryConfig,
    RetryOverrides, ServerConfig, StorePolicy, TargetConfig,
};
pub use coordinator::{
    Attempt, BudgetStatus, Coordinator, CoordinatorBuilder, FlushReport, Heartbeat, KnownNames,
    Member, Permit, Reading, Request, RetryBudget, Source, Withdrawal,
};
pub use error::{CallError, Error, Rejection, StoreError, UpstreamError, UpstreamErrorKind};
pub use observer::{Event, Observer};
