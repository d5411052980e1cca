//! The retry budget's arithmetic (Finagle `RetryBudget` semantics), as plain data: the twin
//! of `lua/budget_deposit.lua` and `lua/budget_withdraw.lua`, used by `MemoryStore`.
//!
//! Over a sliding window of `buckets` buckets of `bucket_ms` each, the fleet may retry at most
//! `ratio × requests + min_per_second × window` times: requests deposit a fraction of a retry,
//! each retry withdraws a whole one, and the floor lets a trickle of traffic retry at all.
//! Amounts are kept in millionths of a retry ([`UNIT`]), so Lua (doubles) and Rust (integers)
//! compute the same numbers exactly.

use std::time::Duration;

/// One retry, in the budget's units (millionths).
pub const UNIT: u64 = 1_000_000;
/// Requests counted per window at most (beyond it they add nothing): keeps every product
/// below 2^53, exact in Lua's doubles.
pub const MAX_REQUESTS: u64 = 100_000_000;
/// Retries counted per window at most.
pub const MAX_RETRIES: u64 = 1_000_000_000;
/// Buckets per window.
pub const BUCKETS: u32 = 10;

/// A target's budget settings, in the units the store works in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetParams {
    /// Length of one bucket (ms, at least 1).
    pub bucket_ms: u64,
    /// Buckets in the window (1 to 1024).
    pub buckets: u32,
    /// Retries earned per request, in millionths (`ratio × 1e6`).
    pub ratio_ppm: u64,
    /// Retries always available per window, in millionths (`min_per_second × window`).
    pub reserve: u64,
}

impl BudgetParams {
    /// Settings from the configuration's terms: `ratio` retries per request, over `window`
    /// (split in [`BUCKETS`] buckets), with `min_per_second` retries per second always
    /// available.
    pub fn new(ratio: f64, window: Duration, min_per_second: f64) -> Self {
        let window_ms = (window.as_millis() as u64).max(u64::from(BUCKETS));
        BudgetParams {
            bucket_ms: window_ms / u64::from(BUCKETS),
            buckets: BUCKETS,
            ratio_ppm: (ratio.max(0.0) * UNIT as f64).round() as u64,
            reserve: (min_per_second.max(0.0) * window_ms as f64 * 1000.0).round() as u64,
        }
    }

    /// This replica's share when it decides alone (Redis down): the ratio applies to its own
    /// requests as is; the floor is divided by the fleet size.
    pub fn local_share(&self, replicas: u32) -> Self {
        BudgetParams {
            reserve: self.reserve / u64::from(replicas.max(1)),
            ..*self
        }
    }

    /// The window's length.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.bucket_ms.saturating_mul(u64::from(self.buckets)))
    }
}

/// What a withdrawal found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Withdrawn {
    /// Whether one retry was taken.
    pub granted: bool,
    /// Requests in the window (after the deposit that came with the withdrawal).
    pub requests: u64,
    /// Retries in the window (the one granted included).
    pub retries: u64,
}

/// A budget's window as it stands, read without changing it (for operators).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BudgetTotals {
    /// Requests in the window.
    pub requests: u64,
    /// Retries in the window.
    pub retries: u64,
    /// Retries the window allows in all: `ratio × requests + floor`, whole retries.
    pub allowed: u64,
}

impl BudgetTotals {
    /// Retries still available in the window.
    pub fn available(&self) -> u64 {
        self.allowed.saturating_sub(self.retries)
    }
}

/// The totals over buckets `(epoch, requests, retries)` at `now_ms`: the buckets whose epoch
/// lies in `(now_epoch - buckets, now_epoch]`, as [`BudgetWindow::withdraw`] and
/// `lua/budget_withdraw.lua` count them. The one computation for both stores' readings.
pub fn totals(
    p: &BudgetParams,
    now_ms: u64,
    buckets: impl IntoIterator<Item = (u64, u64, u64)>,
) -> BudgetTotals {
    let epoch = now_ms / p.bucket_ms.max(1);
    let span = u64::from(p.buckets.clamp(1, 1024));
    let (mut requests, mut retries) = (0u64, 0u64);
    for (e, q, r) in buckets {
        if e <= epoch && e + span > epoch {
            requests = requests.saturating_add(q);
            retries = retries.saturating_add(r);
        }
    }
    let requests = requests.min(MAX_REQUESTS);
    let retries = retries.min(MAX_RETRIES);
    let allowance = requests
        .saturating_mul(p.ratio_ppm)
        .saturating_add(p.reserve);
    BudgetTotals {
        requests,
        retries,
        allowed: allowance / UNIT,
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Bucket {
    epoch: u64,
    requests: u64,
    retries: u64,
}

/// One target's budget window.
#[derive(Debug, Clone, Default)]
pub struct BudgetWindow {
    buckets: Vec<Bucket>,
    /// The latest instant it was written (ms), to forget idle windows.
    pub(crate) touched_ms: u64,
}

impl BudgetWindow {
    fn current(&mut self, p: &BudgetParams, now_ms: u64) -> (u64, &mut Bucket) {
        let n = p.buckets.clamp(1, 1024) as usize;
        if self.buckets.len() != n {
            self.buckets = vec![Bucket::default(); n];
        }
        let epoch = now_ms / p.bucket_ms.max(1);
        let b = &mut self.buckets[(epoch % n as u64) as usize];
        if b.epoch != epoch {
            *b = Bucket {
                epoch,
                requests: 0,
                retries: 0,
            };
        }
        self.touched_ms = now_ms;
        (epoch, b)
    }

    /// The window's totals at `now_ms`, unchanged.
    pub fn totals(&self, p: &BudgetParams, now_ms: u64) -> BudgetTotals {
        totals(
            p,
            now_ms,
            self.buckets
                .iter()
                .map(|b| (b.epoch, b.requests, b.retries)),
        )
    }

    /// Counts `n` requests now.
    pub fn deposit(&mut self, p: &BudgetParams, now_ms: u64, n: u64) {
        let (_, b) = self.current(p, now_ms);
        b.requests = b.requests.saturating_add(n).min(MAX_REQUESTS);
    }

    /// Counts `deposit` requests, then takes one retry if the window allows it.
    pub fn withdraw(&mut self, p: &BudgetParams, now_ms: u64, deposit: u64) -> Withdrawn {
        self.deposit(p, now_ms, deposit);
        let (epoch, _) = self.current(p, now_ms);
        let span = self.buckets.len() as u64;
        let (mut requests, mut retries) = (0u64, 0u64);
        for b in &self.buckets {
            if b.epoch <= epoch && b.epoch + span > epoch {
                requests += b.requests;
                retries += b.retries;
            }
        }
        let requests = requests.min(MAX_REQUESTS);
        let retries = retries.min(MAX_RETRIES);
        let allowance = requests
            .saturating_mul(p.ratio_ppm)
            .saturating_add(p.reserve);
        let granted = (retries + 1) * UNIT <= allowance;
        if granted {
            let (_, b) = self.current(p, now_ms);
            b.retries = (b.retries + 1).min(MAX_RETRIES);
        }
        Withdrawn {
            granted,
            requests,
            retries: retries + u64::from(granted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    #[test]
    fn twenty_percent_of_requests_plus_the_floor() {
        // 20% over 10 s, 1 retry/s floor: 10 retries from the floor alone.
        let p = BudgetParams::new(0.2, Duration::from_secs(10), 1.0);
        let mut w = BudgetWindow::default();
        let granted = (0..100).filter(|_| w.withdraw(&p, T0, 0).granted).count();
        assert_eq!(granted, 10, "the floor alone");
        w.deposit(&p, T0, 50);
        let granted = (0..100).filter(|_| w.withdraw(&p, T0, 0).granted).count();
        assert_eq!(granted, 10, "50 requests earn 10 more retries");
    }

    #[test]
    fn requests_and_retries_leave_the_window() {
        let p = BudgetParams::new(0.5, Duration::from_secs(10), 0.0);
        let mut w = BudgetWindow::default();
        w.deposit(&p, T0, 4);
        assert!(w.withdraw(&p, T0, 0).granted);
        assert!(w.withdraw(&p, T0, 0).granted);
        assert!(!w.withdraw(&p, T0, 0).granted, "2 retries for 4 requests");
        let later = T0 + 10_000;
        let r = w.withdraw(&p, later, 0);
        assert_eq!(
            (r.granted, r.requests, r.retries),
            (false, 0, 0),
            "all aged out"
        );
        let r = w.withdraw(&p, later, 2);
        assert_eq!((r.granted, r.requests, r.retries), (true, 2, 1));
    }

    #[test]
    fn totals_read_the_window_without_changing_it() {
        let p = BudgetParams::new(0.5, Duration::from_secs(10), 0.1);
        let mut w = BudgetWindow::default();
        w.deposit(&p, T0, 4);
        assert!(w.withdraw(&p, T0, 0).granted);
        let t = w.totals(&p, T0);
        // 4 requests x 0.5 + 0.1/s x 10 s = 3 retries allowed, 1 taken.
        assert_eq!(
            (t.requests, t.retries, t.allowed, t.available()),
            (4, 1, 3, 2)
        );
        assert_eq!(w.totals(&p, T0), t, "reading changes nothing");
        let later = w.totals(&p, T0 + 10_000);
        assert_eq!((later.requests, later.retries, later.allowed), (0, 0, 1));
    }

    #[test]
    fn the_local_share_divides_the_floor_only() {
        let p = BudgetParams::new(0.2, Duration::from_secs(10), 3.0);
        assert_eq!(p.reserve, 30 * UNIT);
        let l = p.local_share(4);
        assert_eq!(l.reserve, 30 * UNIT / 4);
        assert_eq!(l.ratio_ppm, p.ratio_ppm);
        assert_eq!(p.window(), Duration::from_secs(10));
    }
}
