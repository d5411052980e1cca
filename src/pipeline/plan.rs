//! A feature's chain as the executor reads it, resolved from the configuration once.

use std::sync::Arc;
use std::time::Duration;

use crate::config::{CannedConfig, Config, DEFAULT_ATTEMPT_TIMEOUT, DEFAULT_DEADLINE};

/// One target of a chain, as handed to the call.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ChainTarget {
    /// The target's name (its breaker).
    pub name: String,
    /// The model to ask (`[targets."x"] model`, default: the name).
    pub model: String,
    /// `max_tokens` to ask for, if configured.
    pub max_tokens: Option<u32>,
    /// One attempt's timeout (default 15 s).
    pub timeout: Duration,
    /// The model's context window in tokens, if configured.
    pub context_window: Option<u32>,
}

/// A feature's chain.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) targets: Vec<ChainTarget>,
    /// Index into `targets` the chain does not reach.
    pub(crate) stop_before: Option<usize>,
    pub(crate) deadline: Duration,
    pub(crate) canned: Option<CannedConfig>,
}

impl Plan {
    /// Every feature's plan (features without a chain get an empty one).
    pub(crate) fn all(config: &Config) -> std::collections::HashMap<String, Arc<Plan>> {
        config
            .features
            .iter()
            .map(|(name, f)| {
                let targets: Vec<ChainTarget> = f
                    .chain
                    .iter()
                    .map(|t| {
                        let tc = config.targets.get(t);
                        ChainTarget {
                            name: t.clone(),
                            model: tc
                                .and_then(|c| c.model.clone())
                                .unwrap_or_else(|| t.clone()),
                            max_tokens: tc.and_then(|c| c.max_tokens),
                            timeout: tc
                                .and_then(|c| c.timeout)
                                .unwrap_or(DEFAULT_ATTEMPT_TIMEOUT),
                            context_window: tc.and_then(|c| c.context_window),
                        }
                    })
                    .collect();
                let stop_before = f
                    .stop_before
                    .as_ref()
                    .and_then(|s| targets.iter().position(|t| &t.name == s));
                let plan = Plan {
                    targets,
                    stop_before,
                    deadline: f.deadline.unwrap_or(DEFAULT_DEADLINE),
                    canned: f.canned.clone(),
                };
                (name.clone(), Arc::new(plan))
            })
            .collect()
    }
}
