//! Request rate limits per key (a user, a client, an address): a token
//! bucket that refills at `per_minute / 60` a second up to `burst`. A
//! request that finds the bucket empty is refused with the seconds until
//! one token is back (the `Retry-After` of a 429). Kept in memory per
//! node, like [`crate::throttle`]; the number of keys is bounded, so a
//! flood of new keys cannot grow memory without limit.

use parking_lot::Mutex;
use std::collections::HashMap;

/// Keys kept before idle full buckets are forgotten.
const MAX_KEYS: usize = 100_000;

/// One limit: a sustained rate and a burst. `per_minute == 0` is no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub per_minute: u32,
    pub burst: u32,
}

#[derive(Debug, Default)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at_ms: i64,
}

impl RateLimiter {
    pub fn new() -> RateLimiter {
        RateLimiter::default()
    }

    /// Take one token for `key` at `now_ms`: `Ok` to go ahead, or the
    /// whole seconds (at least 1) until a token is back.
    pub fn take(&self, key: &str, limit: Limit, now_ms: i64) -> Result<(), u64> {
        if limit.per_minute == 0 {
            return Ok(());
        }
        let rate_per_ms = f64::from(limit.per_minute) / 60_000.0;
        let burst = f64::from(limit.burst.max(1));
        let mut m = self.buckets.lock();
        if m.len() >= MAX_KEYS && !m.contains_key(key) {
            // Forget buckets that have refilled: they hold no state.
            m.retain(|_, b| b.tokens + (now_ms - b.at_ms).max(0) as f64 * rate_per_ms < burst);
            if m.len() >= MAX_KEYS {
                // Still full of busy keys: refuse newcomers briefly rather
                // than grow (fail closed under a flood of keys).
                return Err(1);
            }
        }
        let b = m.entry(key.to_owned()).or_insert(Bucket {
            tokens: burst,
            at_ms: now_ms,
        });
        let elapsed = (now_ms - b.at_ms).max(0) as f64;
        b.tokens = (b.tokens + elapsed * rate_per_ms).min(burst);
        b.at_ms = now_ms;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            let wait_ms = (1.0 - b.tokens) / rate_per_ms;
            Err(((wait_ms / 1000.0).ceil() as u64).max(1))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_refills_at_the_rate() {
        let r = RateLimiter::new();
        let l = Limit {
            per_minute: 60,
            burst: 3,
        };
        for _ in 0..3 {
            assert_eq!(r.take("u", l, 0), Ok(()));
        }
        assert_eq!(r.take("u", l, 0), Err(1));
        // Another key has its own bucket.
        assert_eq!(r.take("v", l, 0), Ok(()));
        // One a second comes back.
        assert_eq!(r.take("u", l, 999), Err(1));
        assert_eq!(r.take("u", l, 1_000), Ok(()));
        assert_eq!(r.take("u", l, 1_000), Err(1));
        // Never more than the burst, however long it waited.
        for _ in 0..3 {
            assert_eq!(r.take("u", l, 1_000_000), Ok(()));
        }
        assert!(r.take("u", l, 1_000_000).is_err());
        // Slow limits say how long to wait.
        let slow = Limit {
            per_minute: 1,
            burst: 1,
        };
        assert_eq!(r.take("s", slow, 0), Ok(()));
        assert_eq!(r.take("s", slow, 0), Err(60));
        // Zero is no limit.
        let none = Limit {
            per_minute: 0,
            burst: 0,
        };
        for _ in 0..1000 {
            assert_eq!(r.take("n", none, 0), Ok(()));
        }
    }

    #[test]
    fn memory_is_bounded() {
        let r = RateLimiter::new();
        let l = Limit {
            per_minute: 60,
            burst: 1,
        };
        for i in 0..MAX_KEYS {
            assert!(r.take(&i.to_string(), l, 0).is_ok());
        }
        // Full of drained buckets: a newcomer waits.
        assert_eq!(r.take("new", l, 0), Err(1));
        // A minute later they have refilled and are forgotten.
        assert_eq!(r.take("new", l, 60_000), Ok(()));
        assert!(r.buckets.lock().len() < 10);
    }
}
