//! One observer for every test: it records each event a coordinator reports, in order, and
//! answers the questions tests ask of them.

use std::sync::Mutex;

use fusebox::{Event, Observer, Rejection, Transition};

/// Records every event it observes. Give it to `Coordinator::builder(..).observer(..)`.
#[derive(Default)]
pub struct Recorder(Mutex<Vec<Event>>);

impl Observer for Recorder {
    fn on_event(&self, event: &Event) {
        if let Event::StoreDegraded { error } = event {
            // Printed at once: a test that fails because its store degraded under load says
            // why in its output.
            eprintln!("store degraded: {error}");
        }
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(event.clone());
    }
}

impl Recorder {
    /// Every event so far, in order.
    pub fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn count(&self, pick: impl Fn(&Event) -> bool) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|e| pick(e))
            .count()
    }

    /// The breaker transitions reported, in order.
    pub fn transitions(&self) -> Vec<Transition> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Transition(t) => Some(t),
                _ => None,
            })
            .collect()
    }

    /// The refusals reported: (feature, target, rejection).
    pub fn rejections(&self) -> Vec<(String, String, Rejection)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e {
                Event::Rejected {
                    feature,
                    target,
                    rejection,
                } => Some((feature, target, rejection)),
                _ => None,
            })
            .collect()
    }

    /// How many times the store was reported degraded.
    pub fn degraded(&self) -> usize {
        self.count(|e| matches!(e, Event::StoreDegraded { .. }))
    }

    /// How many times the store was reported recovered.
    pub fn recovered(&self) -> usize {
        self.count(|e| matches!(e, Event::StoreRecovered))
    }

    /// How many `SettleDropped` events were reported.
    pub fn settle_dropped(&self) -> usize {
        self.count(|e| matches!(e, Event::SettleDropped { .. }))
    }

    /// How many settle items the `SettleDropped` events counted in all.
    pub fn settle_dropped_items(&self) -> usize {
        self.events()
            .iter()
            .map(|e| match e {
                Event::SettleDropped { count, .. } => *count,
                _ => 0,
            })
            .sum()
    }

    /// The kind of every event except refusals, in order (for failure messages).
    pub fn log(&self) -> Vec<&'static str> {
        self.events()
            .iter()
            .filter_map(|e| match e {
                Event::StoreDegraded { .. } => Some("degraded"),
                Event::StoreRecovered => Some("recovered"),
                Event::SettleDropped { .. } => Some("settle_dropped"),
                Event::Transition(_) => Some("transition"),
                Event::LeaseLost { .. } => Some("lease_lost"),
                _ => None,
            })
            .collect()
    }
}
