#![doc = include_str!("../README.md")]

pub mod breaker;
pub mod bulkhead;
pub mod clock;
pub mod config;
mod error;
pub mod keys;
pub mod ratelimit;
pub mod store;

pub use breaker::{CallOutcome, CircuitState, Force, Transition, TransitionReason};
pub use config::{
    BreakerConfig, BreakerOverrides, Config, FeatureConfig, RateConfig, RedisConfig, StorePolicy,
    TargetConfig,
};
pub use error::{Error, Rejection, StoreError};
pub mod coordinator;
pub mod observer;

pub use coordinator::{
    Coordinator, CoordinatorBuilder, Heartbeat, KnownNames, Member, Permit, Reading, Source,
};
pub use observer::{Event, Observer};
