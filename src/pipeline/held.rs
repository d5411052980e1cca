//! What a fresh answer still holds when it goes on after the guarded call returned (a
//! stream): the request's bulkhead permit and the answering target's breaker admission.

use std::future::Future;

use crate::breaker::CallOutcome;
use crate::{Attempt, Request};

/// The request's bulkhead permit and the answering target's breaker admission, kept while a
/// fresh answer is still being delivered (see
/// [`Coordinator::guarded_call_held`](crate::Coordinator::guarded_call_held)).
///
/// [`Held::finish`] reports how the answer ended to the target's breaker and releases the
/// permit; dropping it unreported releases the permit at once and records nothing (the
/// client went away: not the target's fault). Never waits for the store.
#[must_use = "a held answer keeps its feature's bulkhead permit until it is finished or dropped"]
#[derive(Debug)]
pub struct Held {
    request: Option<Request>,
    attempt: Option<Attempt>,
}

impl Held {
    pub(crate) fn new(request: Option<Request>, attempt: Attempt) -> Self {
        Held {
            request,
            attempt: Some(attempt),
        }
    }

    /// The target that answered.
    pub fn target(&self) -> &str {
        self.attempt.as_ref().map_or("", Attempt::target)
    }

    /// Runs `fut` while keeping the permit's bulkhead lease alive (for a long stream).
    pub async fn guard<T>(&self, fut: impl Future<Output = T>) -> T {
        match &self.request {
            Some(r) => r.guard(fut).await,
            None => fut.await,
        }
    }

    /// Spawns a task that keeps the permit's bulkhead lease alive until the handle is
    /// dropped (for a stream polled by someone else; see [`crate::Permit::keep_alive`]).
    /// `None` when the request holds no permit.
    pub fn keep_alive(&self) -> Option<crate::Heartbeat> {
        self.request.as_ref().map(Request::keep_alive)
    }

    /// Reports how the answer ended to the answering target's breaker (a stream cut by the
    /// upstream after its first event is a [`CallOutcome::Failure`]) and releases the permit.
    pub fn finish(mut self, outcome: CallOutcome) {
        if let Some(a) = self.attempt.take() {
            a.record(outcome);
        }
        drop(self.request.take());
    }
}
