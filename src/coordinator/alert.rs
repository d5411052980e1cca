//! The fleet health signal per feature: the fallback rate of guarded calls over a window,
//! computed from fleet-wide counters in the store (`lua/fallback_rate.lua`, routed through
//! [`Tiered::remote`](super::tiered::Tiered::remote)), not per replica.
//!
//! **No round trip on a caller's way.** A guarded call adds to in-process counters; a
//! background task delivers them in batches (once per window bucket, at most once a second).
//! The script tells the one delivery that tips the window over the threshold, so exactly one
//! replica emits [`Event::FallbackAlert`] per episode fleet-wide (and the one that ends it,
//! [`Event::FallbackRecovered`]). On the embedded store (no Redis) the counts go to the
//! local window at once. While Redis is down the counts are dropped: the signal is the
//! fleet's, and one replica's share of it would fire per replica.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use super::tiered::Tried;
use super::Shared;
use crate::config::Config;
use crate::keys::fallback_rate_key;
use crate::observer::Event;
use crate::pipeline::alert::{AlertParams, RateReading};

/// One feature's undelivered counts.
#[derive(Debug)]
struct Pending {
    key: String,
    calls: AtomicU64,
    fallbacks: AtomicU64,
}

/// Every configured feature's counters.
pub(crate) struct Alerts {
    params: AlertParams,
    features: HashMap<String, Arc<Pending>>,
    running: AtomicBool,
    every: Duration,
}

impl Alerts {
    pub(crate) fn new(config: &Config) -> Self {
        let a = &config.fallback_alert;
        let params = AlertParams::new(a.threshold, a.window, a.min_calls);
        Alerts {
            params,
            features: config
                .features
                .keys()
                .map(|f| {
                    let p = Pending {
                        key: fallback_rate_key(&config.namespace, f),
                        calls: AtomicU64::new(0),
                        fallbacks: AtomicU64::new(0),
                    };
                    (f.clone(), Arc::new(p))
                })
                .collect(),
            running: AtomicBool::new(false),
            every: Duration::from_millis(params.bucket_ms)
                .clamp(Duration::from_millis(50), Duration::from_secs(1)),
        }
    }
}

impl Shared {
    /// Counts one answered guarded call of `feature` (`fallback`: not its primary's answer).
    pub(crate) fn count_call(self: &Arc<Self>, feature: &str, fallback: bool) {
        let a = &self.alerts;
        let Some(p) = a.features.get(feature) else {
            return;
        };
        if self.tiered.remote.is_none() {
            let r = self
                .tiered
                .local
                .fallback_rate_now(&p.key, &a.params, 1, u64::from(fallback));
            self.report_rate(feature, r);
            return;
        }
        p.calls.fetch_add(1, Ordering::Relaxed);
        if fallback {
            p.fallbacks.fetch_add(1, Ordering::Relaxed);
        }
        if a.running.load(Ordering::Relaxed) || a.running.swap(true, Ordering::AcqRel) {
            return;
        }
        if !self
            .tiered
            .spawn_background(deliver_loop(Arc::downgrade(self)))
        {
            a.running.store(false, Ordering::Release);
        }
    }

    fn report_rate(&self, feature: &str, r: RateReading) {
        if r.fired {
            self.emit(Event::FallbackAlert {
                feature: feature.to_owned(),
                calls: r.calls,
                fallbacks: r.fallbacks,
            });
        } else if r.recovered {
            self.emit(Event::FallbackRecovered {
                feature: feature.to_owned(),
                calls: r.calls,
                fallbacks: r.fallbacks,
            });
        }
    }
}

/// Delivers undelivered counts until the coordinator is dropped.
async fn deliver_loop(shared: Weak<Shared>) {
    loop {
        let every = {
            let Some(s) = shared.upgrade() else { return };
            deliver(&s).await;
            s.alerts.every
        };
        tokio::time::sleep(every).await;
    }
}

async fn deliver(s: &Arc<Shared>) {
    let params = s.alerts.params;
    for (feature, p) in &s.alerts.features {
        let fallbacks = p.fallbacks.swap(0, Ordering::AcqRel);
        let calls = p.calls.swap(0, Ordering::AcqRel).max(fallbacks);
        if calls == 0 {
            continue;
        }
        let key = &p.key;
        match s
            .tiered
            .remote(|st| st.fallback_rate(key, &params, calls, fallbacks))
            .await
        {
            Tried::Done(r) => s.report_rate(feature, r),
            Tried::Embedded => {
                let r = s
                    .tiered
                    .local
                    .fallback_rate_now(key, &params, calls, fallbacks);
                s.report_rate(feature, r);
            }
            // Dropped: not sent again (see the module docs).
            Tried::Failed(_) | Tried::Skipped => {}
        }
    }
}

impl super::Coordinator {
    /// Counts one answered guarded call of `feature` for the fleet health signal.
    pub(crate) fn count_call(&self, feature: &str, fallback: bool) {
        self.shared.count_call(feature, fallback);
    }
}
