//! Growing delays after failed sign-ins, per key (an account, a client IP).
//!
//! The first few failures cost nothing (people mistype); after that each
//! failure doubles the wait before the next attempt is even checked, up to
//! a ceiling. A success clears the key. This slows online guessing from one
//! address or against one account to a crawl without locking anyone out;
//! the per-account lockout (a durable counter on the account) is the
//! backstop. Entries are kept in memory per node: several nodes each apply
//! their own delays, and the durable lockout counter is shared.

use parking_lot::Mutex;
use std::collections::HashMap;

/// Failures allowed before delays start.
pub const FREE_FAILURES: u32 = 3;
/// First delay, doubled per further failure.
pub const BASE_DELAY_SECS: i64 = 1;
/// Longest delay.
pub const MAX_DELAY_SECS: i64 = 300;
/// Keys kept before the oldest are forgotten (memory bound under attack).
const MAX_KEYS: usize = 100_000;

#[derive(Debug, Default)]
pub struct Throttle {
    keys: Mutex<HashMap<String, Entry>>,
}

/// Times are milliseconds since the epoch: a one-second delay must not
/// round away to nothing at a second boundary.
#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    not_before_ms: i64,
    last_ms: i64,
}

impl Throttle {
    pub fn new() -> Throttle {
        Throttle::default()
    }

    /// Whole seconds (rounded up) the caller must still wait before an
    /// attempt for `key` is considered (0 = go ahead). `now_ms` is
    /// milliseconds since the epoch.
    pub fn wait(&self, key: &str, now_ms: i64) -> i64 {
        self.keys
            .lock()
            .get(key)
            .map_or(0, |e| ((e.not_before_ms - now_ms).max(0) + 999) / 1000)
    }

    /// Record a failure; returns the new wait in seconds.
    pub fn fail(&self, key: &str, now_ms: i64) -> i64 {
        let mut m = self.keys.lock();
        if m.len() >= MAX_KEYS && !m.contains_key(key) {
            // Forget entries whose delay has passed and that are older than
            // the longest delay; under a flood this bounds memory.
            m.retain(|_, e| e.not_before_ms > now_ms || now_ms - e.last_ms < MAX_DELAY_SECS * 1000);
            if m.len() >= MAX_KEYS {
                return 0;
            }
        }
        let e = m.entry(key.to_owned()).or_insert(Entry {
            failures: 0,
            not_before_ms: 0,
            last_ms: now_ms,
        });
        e.failures = e.failures.saturating_add(1);
        e.last_ms = now_ms;
        let delay = if e.failures <= FREE_FAILURES {
            0
        } else {
            let exp = (e.failures - FREE_FAILURES - 1).min(20);
            (BASE_DELAY_SECS << exp).min(MAX_DELAY_SECS)
        };
        e.not_before_ms = now_ms + delay * 1000;
        delay
    }

    pub fn succeed(&self, key: &str) {
        self.keys.lock().remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_clear() {
        let t = Throttle::new();
        let waits: Vec<i64> = (0..8).map(|_| t.fail("ip:1", 100_900)).collect();
        assert_eq!(waits, vec![0, 0, 0, 1, 2, 4, 8, 16]);
        assert_eq!(t.wait("ip:1", 100_900), 16);
        // Not rounded away at a second boundary.
        assert_eq!(t.wait("ip:1", 116_000), 1);
        assert_eq!(t.wait("ip:1", 116_900), 0);
        assert_eq!(t.wait("ip:2", 100_900), 0, "keys are separate");
        for _ in 0..30 {
            t.fail("ip:1", 200_000);
        }
        assert_eq!(t.wait("ip:1", 200_000), MAX_DELAY_SECS);
        t.succeed("ip:1");
        assert_eq!(t.wait("ip:1", 200_000), 0);
    }
}
