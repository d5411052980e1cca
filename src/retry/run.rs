//! The sleeping side of retries on one target: attempts, backoff waits (Tokio's clock, so
//! tests run them on paused time), the deadline, and the fleet retry budget.

use std::future::Future;
use std::time::Duration;

use super::backoff::{fits, Backoff, GiveUp, Plan};
use crate::clock::Clock;
use crate::coordinator::{RetryBudget, Withdrawal};

/// What a failed attempt means for the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Verdict {
    /// Worth another attempt, after at least `retry_after` if the upstream gave one.
    Retry {
        /// The upstream's hint (`retry-after-ms` / `retry-after`).
        retry_after: Option<Duration>,
    },
    /// No attempt at this target can succeed (a 400, a 401...).
    Final,
}

/// Why the attempts at a target ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stop {
    /// An attempt succeeded.
    Succeeded,
    /// An attempt failed with a final error.
    Final,
    /// The backoff gave up (attempts, deadline, or a `retry-after` over its cap).
    GaveUp(GiveUp),
    /// The fleet's retry budget for the target is spent.
    BudgetSpent,
    /// Not even the first attempt could finish before the deadline: nothing was sent.
    NoTime,
}

/// The end of the attempts at one target.
#[derive(Debug)]
pub struct Retried<T, E> {
    /// The last attempt's result; `None` when no attempt was made ([`Stop::NoTime`]).
    pub result: Option<Result<T, E>>,
    /// Attempts made.
    pub attempts: u32,
    /// Why they ended.
    pub stop: Stop,
}

/// How to run the attempts at one target.
#[derive(Debug)]
pub struct Attempts<'a> {
    /// The delays (its `max_attempts` bounds the attempts).
    pub backoff: Backoff,
    /// Where "now" comes from: the coordinator's clock ([`crate::clock::TokioClock`]).
    pub clock: &'a dyn Clock,
    /// The call's deadline, in the clock's ms; `None`: none.
    pub deadline_ms: Option<u64>,
    /// The longest one attempt may take: enforced here, and planned for.
    pub attempt_timeout: Duration,
    /// The target's fleet retry budget; `None`: retries bounded by the backoff only.
    pub budget: Option<&'a RetryBudget>,
}

impl Attempts<'_> {
    fn remaining(&self) -> Option<Duration> {
        self.deadline_ms
            .map(|d| Duration::from_millis(d.saturating_sub(self.clock.now_ms())))
    }

    /// Runs `attempt` (given the attempt number, from 1) until it succeeds, `classify` calls
    /// its error final, or the backoff, deadline or budget end it. An attempt that runs past
    /// `attempt_timeout` is dropped and counts as `timed_out()`. The budget is given one
    /// deposit (this request reached the target) and one withdrawal per retry; a spent
    /// budget ends the attempts at once, without waiting.
    pub async fn run<T, E, Fut>(
        mut self,
        mut attempt: impl FnMut(u32) -> Fut,
        classify: impl Fn(&E) -> Verdict,
        timed_out: impl Fn() -> E,
    ) -> Retried<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        if !fits(self.remaining(), self.attempt_timeout) {
            return Retried {
                result: None,
                attempts: 0,
                stop: Stop::NoTime,
            };
        }
        if let Some(b) = self.budget {
            b.deposit();
        }
        let mut n = 1;
        loop {
            let result = match tokio::time::timeout(self.attempt_timeout, attempt(n)).await {
                Ok(r) => r,
                Err(_) => Err(timed_out()),
            };
            let retry_after = match &result {
                Ok(_) => return done(result, n, Stop::Succeeded),
                Err(e) => match classify(e) {
                    Verdict::Final => return done(result, n, Stop::Final),
                    Verdict::Retry { retry_after } => retry_after,
                },
            };
            let remaining = self.remaining();
            let wait = match self
                .backoff
                .plan(retry_after, remaining, self.attempt_timeout)
            {
                Plan::Wait(d) => d,
                Plan::GiveUp(g) => return done(result, n, Stop::GaveUp(g)),
            };
            if let Some(b) = self.budget {
                if let Withdrawal::Spent { .. } = b.withdraw().await {
                    return done(result, n, Stop::BudgetSpent);
                }
            }
            tokio::time::sleep(wait).await;
            n += 1;
        }
    }
}

fn done<T, E>(result: Result<T, E>, attempts: u32, stop: Stop) -> Retried<T, E> {
    Retried {
        result: Some(result),
        attempts,
        stop,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::TokioClock;
    use crate::retry::{BackoffParams, Jitter};
    use std::sync::Mutex;

    fn backoff(max_attempts: u32) -> Backoff {
        Backoff::seeded(
            BackoffParams {
                base: Duration::from_millis(100),
                cap: Duration::from_secs(2),
                max_attempts,
                jitter: Jitter::Full,
                retry_after_cap: Duration::from_secs(10),
            },
            5,
        )
    }

    #[tokio::test(start_paused = true)]
    async fn waits_honour_retry_after_and_the_deadline_on_paused_time() {
        let clock = TokioClock::new();
        let start = clock.now_ms();
        let starts = Mutex::new(Vec::new());
        let r: Retried<(), &str> = Attempts {
            backoff: backoff(10),
            clock: &clock,
            deadline_ms: Some(start + 5_000),
            attempt_timeout: Duration::from_millis(1_000),
            budget: None,
        }
        .run(
            |_| {
                starts
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(clock.now_ms() - start);
                async {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Err("overloaded")
                }
            },
            |_| Verdict::Retry {
                retry_after: Some(Duration::from_millis(1_500)),
            },
            || "timeout",
        )
        .await;
        let starts = starts.into_inner().unwrap_or_else(|p| p.into_inner());
        // Each attempt takes 50 ms; each wait is at least the 1.5 s hint.
        assert_eq!(
            r.stop,
            Stop::GaveUp(GiveUp::Deadline {
                wait: Duration::from_millis(1_500)
            })
        );
        assert_eq!(r.attempts, 3);
        assert_eq!(starts.len(), 3);
        for pair in starts.windows(2) {
            assert!(pair[1] - pair[0] >= 1_550, "{starts:?}");
        }
        let end = clock.now_ms() - start;
        assert!(end <= 5_000, "ended at {end} ms, past the deadline");
        assert!(*starts.last().unwrap_or(&0) + 1_000 <= 5_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_attempt_times_out_and_a_final_error_stops_at_once() {
        let clock = TokioClock::new();
        let r: Retried<(), &str> = Attempts {
            backoff: backoff(3),
            clock: &clock,
            deadline_ms: None,
            attempt_timeout: Duration::from_millis(200),
            budget: None,
        }
        .run(
            |_| std::future::pending(),
            |_| Verdict::Retry { retry_after: None },
            || "timeout",
        )
        .await;
        assert_eq!((r.attempts, r.stop), (3, Stop::GaveUp(GiveUp::Attempts)));
        assert!(matches!(r.result, Some(Err("timeout"))));

        let r: Retried<(), &str> = Attempts {
            backoff: backoff(3),
            clock: &clock,
            deadline_ms: None,
            attempt_timeout: Duration::from_millis(200),
            budget: None,
        }
        .run(
            |_| async { Err("bad request") },
            |_| Verdict::Final,
            || "timeout",
        )
        .await;
        assert_eq!((r.attempts, r.stop), (1, Stop::Final));

        let r: Retried<(), &str> = Attempts {
            backoff: backoff(3),
            clock: &clock,
            deadline_ms: Some(clock.now_ms() + 100),
            attempt_timeout: Duration::from_millis(200),
            budget: None,
        }
        .run(|_| async { Ok(()) }, |_| Verdict::Final, || "timeout")
        .await;
        assert_eq!((r.attempts, r.stop), (0, Stop::NoTime));
        assert!(r.result.is_none());
    }
}
