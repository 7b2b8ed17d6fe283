//! [`RetryPolicy`]: how long a failed message waits before its next attempt, and how many
//! attempts it gets.

use std::time::Duration;

use crate::{Error, Result};

/// Exponential backoff with jitter for messages whose handler failed transiently.
///
/// After attempt `n` (the delivery count) fails, the message is nacked with a delay of
/// `base × 2^(n-1)`, at most `cap`, minus a random part of up to `jitter` of it (so that
/// messages that failed together do not come back together). When attempt `max_attempts`
/// fails, the message is dead-lettered with reason
/// [`RETRIES_EXHAUSTED`](super::RETRIES_EXHAUSTED) instead.
///
/// The delivery count is kept by the broker, so the schedule survives restarts and
/// spreads over every consumer instance. Keep `max_attempts` at or below the transport's
/// own maximum delivery count (`max_deliveries`, SQS `maxReceiveCount`, Service Bus
/// `MaxDeliveryCount`); otherwise the transport dead-letters first, with its own reason.
///
/// ```
/// use std::time::Duration;
/// use cloudbus_core::consumer::RetryPolicy;
///
/// let policy = RetryPolicy::exponential(Duration::from_secs(1))
///     .cap(Duration::from_secs(60))
///     .max_attempts(5)
///     .jitter(0.0);
/// assert_eq!(policy.delay(1), Duration::from_secs(1));
/// assert_eq!(policy.delay(3), Duration::from_secs(4));
/// assert_eq!(policy.delay(10), Duration::from_secs(60));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RetryPolicy {
    base: Duration,
    cap: Duration,
    max_attempts: u32,
    jitter: f64,
}

impl Default for RetryPolicy {
    /// Base 1 s, cap 60 s, 5 attempts, jitter 0.2.
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(60),
            max_attempts: 5,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// The default policy with the given base delay (the delay after the first attempt).
    pub fn exponential(base: Duration) -> Self {
        RetryPolicy {
            base,
            ..RetryPolicy::default()
        }
    }

    /// The longest delay between attempts.
    pub fn cap(mut self, cap: Duration) -> Self {
        self.cap = cap;
        self
    }

    /// Attempts (deliveries) before the message is dead-lettered; 1 means no retry.
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts;
        self
    }

    /// The largest fraction (0 to 1) randomly taken off each delay: 0 gives exact delays,
    /// 1 gives "full jitter" (anywhere from zero to the delay).
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// Attempts before dead-lettering.
    pub fn attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay after attempt `attempt` (1-based) failed, before jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(1).min(31);
        self.base
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.cap)
            .min(self.cap)
    }

    /// The delay after attempt `attempt` failed, with jitter.
    pub fn delay_with_jitter(&self, attempt: u32) -> Duration {
        jittered(self.delay(attempt), self.jitter, fastrand::f64())
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.max_attempts == 0 {
            return Err(Error::config(
                "retry policy: max_attempts must be at least 1 (1 means no retry)",
            ));
        }
        if !(0.0..=1.0).contains(&self.jitter) {
            return Err(Error::config(format!(
                "retry policy: jitter must be between 0 and 1, not {}",
                self.jitter
            )));
        }
        if self.base > self.cap {
            return Err(Error::config(format!(
                "retry policy: base {:?} is larger than cap {:?}",
                self.base, self.cap
            )));
        }
        Ok(())
    }
}

/// `delay` minus `jitter × random` of it, `random` in `[0, 1)`. Out-of-range inputs are
/// clamped, so this never panics.
fn jittered(delay: Duration, jitter: f64, random: f64) -> Duration {
    let factor = 1.0 - jitter * random;
    if factor.is_nan() {
        return delay;
    }
    delay.mul_f64(factor.clamp(0.0, 1.0))
}

/// Exponential backoff for failing receive calls: doubles from `base` up to `cap` and
/// starts again after a success.
#[derive(Debug)]
pub(crate) struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    pub(crate) fn new(base: Duration, cap: Duration) -> Self {
        Backoff {
            base,
            cap,
            failures: 0,
        }
    }

    /// The pause after one more failure (with a little jitter).
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let policy = RetryPolicy {
            base: self.base,
            cap: self.cap,
            max_attempts: u32::MAX,
            jitter: 0.1,
        };
        policy.delay_with_jitter(self.failures)
    }

    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap() {
        let policy =
            RetryPolicy::exponential(Duration::from_millis(100)).cap(Duration::from_secs(1));
        let delays: Vec<u128> = (1..=6).map(|n| policy.delay(n).as_millis()).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(policy.delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_only_shortens_and_by_at_most_its_fraction() {
        let delay = Duration::from_secs(10);
        assert_eq!(jittered(delay, 0.2, 0.0), delay);
        let most_jitter = jittered(delay, 0.2, 0.999_999_999);
        assert!(
            most_jitter >= Duration::from_secs(8) && most_jitter < Duration::from_millis(8001),
            "{most_jitter:?}"
        );
        assert_eq!(jittered(delay, f64::NAN, 0.5), delay, "never panics");
        assert_eq!(jittered(delay, 5.0, 0.9), Duration::ZERO, "clamped");
        let policy = RetryPolicy::exponential(delay).jitter(0.2);
        for _ in 0..1000 {
            let d = policy.delay_with_jitter(1);
            assert!(d <= delay && d >= Duration::from_secs(8), "{d:?}");
        }
    }

    #[test]
    fn invalid_policies_are_config_errors() {
        assert!(RetryPolicy::default().validate().is_ok());
        assert!(RetryPolicy::default().max_attempts(0).validate().is_err());
        assert!(RetryPolicy::default().jitter(1.5).validate().is_err());
        assert!(
            RetryPolicy::exponential(Duration::from_secs(10))
                .cap(Duration::from_secs(1))
                .validate()
                .is_err()
        );
    }

    #[test]
    fn receive_backoff_grows_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let first = backoff.next_delay();
        let _ = backoff.next_delay();
        let third = backoff.next_delay();
        assert!(first <= Duration::from_millis(100) && third > Duration::from_millis(300));
        for _ in 0..10 {
            assert!(backoff.next_delay() <= Duration::from_secs(1));
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }
}
