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
    /// Judges one request at `now_us` against the stored TAT (`None` if no key).
    pub fn check(&self, tat_us: Option<u64>, now_us: u64) -> RateDecision {
        let tat = tat_us.unwrap_or(now_us).max(now_us);
        let new_tat = tat.saturating_add(self.emission_us);
        let tolerance = self.emission_us.saturating_mul(u64::from(self.burst));
        let allow_at = new_tat.saturating_sub(tolerance);
        if now_us < allow_at {
            RateDecision {
                allowed: false,
                new_tat_us: tat,
                retry_after_us: allow_at - now_us,
                remaining: 0,
            }
        } else {
            RateDecision {
                allowed: true,
                new_tat_us: new_tat,
                retry_after_us: 0,
                remaining: (now_us - allow_at) / self.emission_us,
            }
        }
    }

    /// The TAT after giving back one admitted request (compensation when another part of
    /// admission refused the call).
    pub fn refund(&self, tat_us: u64, now_us: u64) -> u64 {
        tat_us.saturating_sub(self.emission_us).max(now_us)
    }
}
