//! Exponential backoff with jitter, as gRPC's connection backoff defines it:
//! start at `base`, multiply by `factor` after each failure up to `cap`, and
//! spread each delay by ±`jitter` so a fleet that lost its hub at the same
//! moment does not come back at the same moment.

use std::time::Duration;

use rand::Rng;

use crate::error::{Error, Result};

/// Delays between reconnection attempts.
///
/// ```
/// use std::time::Duration;
/// use spoke_client::Backoff;
///
/// let mut backoff = Backoff::new(Duration::from_secs(1), 1.6, 0.2, Duration::from_secs(120))?;
/// let first = backoff.next_delay();
/// assert!(first >= Duration::from_millis(800) && first <= Duration::from_millis(1200));
/// backoff.reset(); // after a healthy connection
/// # Ok::<(), spoke_client::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct Backoff {
    base: Duration,
    factor: f64,
    jitter: f64,
    cap: Duration,
    /// The delay before jitter of the next attempt.
    current: Duration,
}

impl Backoff {
    /// A backoff starting at `base`, growing by `factor` up to `cap`, each
    /// delay spread by ±`jitter` (a fraction, e.g. 0.2) and never above `cap`.
    /// Fails unless `base > 0`, `factor >= 1`, `0 <= jitter < 1` and
    /// `cap >= base`.
    pub fn new(base: Duration, factor: f64, jitter: f64, cap: Duration) -> Result<Self> {
        if base.is_zero() {
            return Err(Error::config("backoff", "base must be positive"));
        }
        if !(factor.is_finite() && factor >= 1.0) {
            return Err(Error::config("backoff", "factor must be at least 1"));
        }
        if !(jitter.is_finite() && (0.0..1.0).contains(&jitter)) {
            return Err(Error::config("backoff", "jitter must be within [0, 1)"));
        }
        if cap < base {
            return Err(Error::config("backoff", "cap must be at least base"));
        }
        Ok(Self {
            base,
            factor,
            jitter,
            cap,
            current: base,
        })
    }

    /// gRPC's defaults: 1 s, ×1.6, ±20 %, at most 120 s.
    pub fn grpc_default() -> Self {
        Self::new(Duration::from_secs(1), 1.6, 0.2, Duration::from_secs(120))
            .expect("the gRPC defaults are valid")
    }

    /// The delay before the next attempt; each call grows the next one.
    pub fn next_delay(&mut self) -> Duration {
        let spread = rand::rng().random_range(-1.0..=1.0);
        self.next_delay_with(spread)
    }

    /// Like [`Backoff::next_delay`] with the jitter's random draw given:
    /// `spread` in `[-1, 1]` scales ±`jitter`.
    pub fn next_delay_with(&mut self, spread: f64) -> Duration {
        let spread = spread.clamp(-1.0, 1.0);
        let delay = self.current.mul_f64(1.0 + self.jitter * spread);
        self.current = self.current.mul_f64(self.factor).min(self.cap);
        delay.min(self.cap)
    }

    /// Back to `base`, after a connection proved healthy.
    pub fn reset(&mut self) {
        self.current = self.base;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::grpc_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(d: Duration) -> f64 {
        (d.as_secs_f64() * 1000.0).round() / 1000.0
    }

    #[test]
    fn grows_by_the_factor_up_to_the_cap_and_resets() {
        let mut b = Backoff::grpc_default();
        let delays: Vec<f64> = (0..13).map(|_| secs(b.next_delay_with(0.0))).collect();
        assert_eq!(
            delays,
            vec![
                1.0, 1.6, 2.56, 4.096, 6.554, 10.486, 16.777, 26.844, 42.95, 68.719, 109.951,
                120.0, 120.0
            ]
        );
        b.reset();
        assert_eq!(b.next_delay_with(0.0), Duration::from_secs(1));
    }

    #[test]
    fn jitter_spreads_by_twenty_percent_and_never_passes_the_cap() {
        let mut low = Backoff::grpc_default();
        let mut high = Backoff::grpc_default();
        assert_eq!(secs(low.next_delay_with(-1.0)), 0.8);
        assert_eq!(secs(high.next_delay_with(1.0)), 1.2);
        for _ in 0..20 {
            high.next_delay_with(1.0);
        }
        assert_eq!(high.next_delay_with(1.0), Duration::from_secs(120));
        let mut random = Backoff::grpc_default();
        for _ in 0..100 {
            let d = random.next_delay();
            assert!(d >= Duration::from_millis(800) && d <= Duration::from_secs(120));
        }
    }

    #[test]
    fn bad_parameters_are_refused_at_construction() {
        let s = Duration::from_secs(1);
        assert!(Backoff::new(Duration::ZERO, 1.6, 0.2, s).is_err());
        assert!(Backoff::new(s, 0.5, 0.2, s).is_err());
        assert!(Backoff::new(s, f64::NAN, 0.2, s).is_err());
        assert!(Backoff::new(s, 1.6, 1.0, s).is_err());
        assert!(Backoff::new(s * 2, 1.6, 0.2, s).is_err());
        assert!(Backoff::new(s, 1.0, 0.0, s).is_ok());
    }
}
