//! Rate limit per feature: GCRA (generic cell rate algorithm) in one value, the theoretical
//! arrival time (TAT), in microseconds. `lua/admit.lua` runs the same arithmetic.

/// Rate parameters in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateParams {
    /// Emission interval: one request every this many µs on average (>= 1).
    pub emission_us: u64,
    /// Requests allowed at once from rest (>= 1).
    pub burst: u32,
}

/// GCRA's answer for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    /// Whether the request fits.
    pub allowed: bool,
    /// The TAT to store if the request is admitted (unchanged TAT when refused).
    pub new_tat_us: u64,
    /// When refused: µs until the request would fit.
    pub retry_after_us: u64,
    /// Requests still allowed right now after this one (0 when refused).
    pub remaining: u64,
}

impl RateParams {
    /// Judges one request at `now_us` against the stored TAT (`None` if no key). The
    /// arithmetic is done in `i128`, so no valid configuration can overflow it.
    pub fn check(&self, tat_us: Option<u64>, now_us: u64) -> RateDecision {
        let now = i128::from(now_us);
        let emission = i128::from(self.emission_us.max(1));
        let tat = i128::from(tat_us.unwrap_or(now_us)).max(now);
        let new_tat = tat + emission;
        let allow_at = new_tat - emission * i128::from(self.burst);
        let clamp = |v: i128| u64::try_from(v.max(0)).unwrap_or(u64::MAX);
        if now < allow_at {
            RateDecision {
                allowed: false,
                new_tat_us: clamp(tat),
                retry_after_us: clamp(allow_at - now),
                remaining: 0,
            }
        } else {
            RateDecision {
                allowed: true,
                new_tat_us: clamp(new_tat),
                retry_after_us: 0,
                remaining: clamp((now - allow_at) / emission),
            }
        }
    }

    /// The TAT after giving back one admitted request (compensation when another part of
    /// admission refused the call).
    pub fn refund(&self, tat_us: u64, now_us: u64) -> u64 {
        tat_us.saturating_sub(self.emission_us).max(now_us)
    }
}
