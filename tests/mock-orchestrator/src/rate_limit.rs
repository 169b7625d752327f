//! Per-connection token buckets, as the orchestrator's inbound rate limiter applies them (§1.2).

use std::time::{Duration, Instant};

use crate::config::RateLimits;

/// What to do with one inbound (non-heartbeat) message.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum RateDecision {
    /// Within budget; the tokens were taken.
    Allow,
    /// Over budget: drop it and answer `rate.limit.warning` with this hint.
    Drop { retry_after_ms: u64 },
    /// Close the connection with 4003 and this reason.
    Close(&'static str),
}

/// Message and size buckets of one connection.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    limits: RateLimits,
    msg_tokens: f64,
    byte_tokens: f64,
    last_refill: Instant,
    over_budget_since: Option<Instant>,
}

impl RateLimiter {
    /// Full buckets as of `now`.
    pub(crate) fn new(limits: RateLimits, now: Instant) -> Self {
        RateLimiter {
            msg_tokens: limits.msg_burst,
            byte_tokens: limits.byte_burst,
            limits,
            last_refill: now,
            over_budget_since: None,
        }
    }

    /// Charges one message of `len` UTF-16 code units arriving at `now`.
    pub(crate) fn check(&mut self, len: usize, now: Instant) -> RateDecision {
        if len > self.limits.hard_max_bytes {
            return RateDecision::Close("Message too large");
        }
        let size = len as f64;
        if size > self.limits.byte_burst {
            return RateDecision::Close("Message exceeds byte burst capacity");
        }
        self.refill(now);
        if self.msg_tokens >= 1.0 && self.byte_tokens >= size {
            self.msg_tokens -= 1.0;
            self.byte_tokens -= size;
            self.over_budget_since = None;
            return RateDecision::Allow;
        }
        let since = *self.over_budget_since.get_or_insert(now);
        if now.duration_since(since) > self.limits.sustained_violation {
            return RateDecision::Close("Sustained rate limit violation");
        }
        RateDecision::Drop {
            retry_after_ms: self.retry_after(size).as_millis().max(1) as u64,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.last_refill).as_secs_f64();
        self.last_refill = now;
        self.msg_tokens =
            (self.msg_tokens + elapsed * self.limits.msgs_per_sec).min(self.limits.msg_burst);
        self.byte_tokens =
            (self.byte_tokens + elapsed * self.limits.bytes_per_sec).min(self.limits.byte_burst);
    }

    /// Time until both buckets could pay for a message of `size`.
    fn retry_after(&self, size: f64) -> Duration {
        let wait_for = |missing: f64, rate: f64| {
            if missing <= 0.0 || rate <= 0.0 {
                0.0
            } else {
                missing / rate
            }
        };
        let msg_wait = wait_for(1.0 - self.msg_tokens, self.limits.msgs_per_sec);
        let byte_wait = wait_for(size - self.byte_tokens, self.limits.bytes_per_sec);
        Duration::from_secs_f64(msg_wait.max(byte_wait)).saturating_add(Duration::from_millis(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small_limits() -> RateLimits {
        RateLimits {
            msg_burst: 3.0,
            msgs_per_sec: 10.0,
            byte_burst: 1000.0,
            bytes_per_sec: 100.0,
            hard_max_bytes: 2000,
            sustained_violation: Duration::from_secs(5),
        }
    }

    #[test]
    fn burst_then_drop_then_refill() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(small_limits(), t0);
        for _ in 0..3 {
            assert_eq!(limiter.check(10, t0), RateDecision::Allow);
        }
        match limiter.check(10, t0) {
            RateDecision::Drop { retry_after_ms } => assert!((100..=102).contains(&retry_after_ms)),
            other => panic!("expected a drop, got {other:?}"),
        }
        assert_eq!(
            limiter.check(10, t0 + Duration::from_millis(100)),
            RateDecision::Allow
        );
    }

    #[test]
    fn byte_budget_is_enforced_separately() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(small_limits(), t0);
        assert_eq!(limiter.check(900, t0), RateDecision::Allow);
        assert!(matches!(limiter.check(200, t0), RateDecision::Drop { .. }));
    }

    #[test]
    fn oversized_messages_close() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(small_limits(), t0);
        assert_eq!(
            limiter.check(2001, t0),
            RateDecision::Close("Message too large")
        );
        assert_eq!(
            limiter.check(1001, t0),
            RateDecision::Close("Message exceeds byte burst capacity")
        );
        assert_eq!(limiter.check(1000, t0), RateDecision::Allow);
    }

    #[test]
    fn sustained_violation_closes_and_recovery_resets_it() {
        let t0 = Instant::now();
        let mut limiter = RateLimiter::new(
            RateLimits {
                msgs_per_sec: 0.1,
                ..small_limits()
            },
            t0,
        );
        for _ in 0..3 {
            limiter.check(1, t0);
        }
        assert!(matches!(limiter.check(1, t0), RateDecision::Drop { .. }));
        assert!(matches!(
            limiter.check(1, t0 + Duration::from_secs(5)),
            RateDecision::Drop { .. }
        ));
        assert_eq!(
            limiter.check(1, t0 + Duration::from_millis(5001)),
            RateDecision::Close("Sustained rate limit violation")
        );
    }
}
