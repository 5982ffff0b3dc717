//! A key's rate limits: token buckets from `governor`, one for requests and one for texts
//! per key and replica (a key used on N replicas may reach N times its rate). The bucket
//! holds one second's worth (at least one), refilled continuously.

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};

type Bucket = RateLimiter<NotKeyed, InMemoryState, DefaultClock, StateInformationMiddleware>;

/// What a bucket is named in the `RateLimit` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    Requests,
    Texts,
}

impl Unit {
    pub fn as_str(self) -> &'static str {
        match self {
            Unit::Requests => "requests",
            Unit::Texts => "texts",
        }
    }
}

/// One token bucket and the rate it was made for.
pub struct Limit {
    unit: Unit,
    rate: f64,
    burst: u32,
    bucket: Bucket,
    clock: DefaultClock,
}

/// The state of a bucket after a request, for the `RateLimit` headers
/// (draft-ietf-httpapi-ratelimit-headers): quota `burst` per `window_secs`, `remaining`
/// of it now, full again in `reset_secs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateState {
    pub unit: Unit,
    pub burst: u32,
    pub window_secs: u64,
    pub remaining: u32,
    pub reset_secs: u64,
}

/// A request refused by a bucket: retry after `retry_after` (at least a second, as
/// `Retry-After` counts), or never when `over_burst` (more texts at once than the bucket
/// holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub state: RateState,
    pub retry_after_secs: u64,
    pub over_burst: bool,
}

impl Limit {
    /// A bucket for `rate` per second (> 0), holding one second's worth.
    pub fn new(unit: Unit, rate: f64) -> Limit {
        let burst = (rate.ceil() as u32).max(1);
        let period = Duration::from_secs_f64(1.0 / rate).max(Duration::from_nanos(1));
        let burst_nz = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(burst_nz))
            .allow_burst(burst_nz);
        Limit {
            unit,
            rate,
            burst,
            bucket: RateLimiter::direct(quota).with_middleware::<StateInformationMiddleware>(),
            clock: DefaultClock::default(),
        }
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Seconds a full bucket lasts at the rate (the policy's window).
    fn window_secs(&self) -> u64 {
        ((f64::from(self.burst) / self.rate).ceil() as u64).max(1)
    }

    fn state(&self, remaining: u32) -> RateState {
        let missing = self.burst.saturating_sub(remaining);
        RateState {
            unit: self.unit,
            burst: self.burst,
            window_secs: self.window_secs(),
            remaining,
            reset_secs: (f64::from(missing) / self.rate).ceil() as u64,
        }
    }

    /// Takes `n` tokens, or says when to come back.
    pub fn take(&self, n: u32) -> Result<RateState, Limited> {
        let Some(n) = NonZeroU32::new(n) else {
            return Ok(self.state(self.burst));
        };
        match self.bucket.check_n(n) {
            Ok(Ok(snapshot)) => Ok(self.state(snapshot.remaining_burst_capacity())),
            Ok(Err(not_until)) => {
                let wait = not_until.wait_time_from(self.clock.now());
                Err(Limited {
                    state: self.state(0),
                    retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64,
                    over_burst: false,
                })
            }
            Err(_) => Err(Limited {
                state: self.state(0),
                retry_after_secs: 1,
                over_burst: true,
            }),
        }
    }
}

impl RateState {
    /// `RateLimit-Policy` and `RateLimit` header values.
    pub fn headers(&self) -> (String, String) {
        let name = self.unit.as_str();
        (
            format!("\"{name}\";q={};w={}", self.burst, self.window_secs),
            format!("\"{name}\";r={};t={}", self.remaining, self.reset_secs),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_holds_one_seconds_worth_then_refuses_with_a_delay() {
        let limit = Limit::new(Unit::Requests, 5.0);
        for left in (0..5).rev() {
            assert_eq!(limit.take(1).unwrap().remaining, left);
        }
        let refused = limit.take(1).unwrap_err();
        assert_eq!(refused.retry_after_secs, 1);
        assert!(!refused.over_burst);
        assert_eq!(
            refused.state.headers(),
            (
                "\"requests\";q=5;w=1".to_string(),
                "\"requests\";r=0;t=1".to_string()
            )
        );
    }

    #[test]
    fn more_texts_than_the_bucket_holds_can_never_pass() {
        let limit = Limit::new(Unit::Texts, 10.0);
        assert!(limit.take(11).unwrap_err().over_burst);
        assert_eq!(limit.take(10).unwrap().remaining, 0);
        let slow = Limit::new(Unit::Requests, 0.5);
        assert_eq!(slow.take(1).unwrap().remaining, 0);
        let refused = slow.take(1).unwrap_err();
        assert_eq!(refused.retry_after_secs, 2);
        assert_eq!(refused.state.headers().0, "\"requests\";q=1;w=2");
    }
}
