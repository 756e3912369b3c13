//! Failed-login limiting per client address, in bounded memory.
//!
//! Each address (IPv6 addresses by their /64, which one host controls whole)
//! may fail [`FailureLimiter::max_failures`] password checks per window;
//! after that every password attempt from it is refused without being
//! checked until the window ends. Successes are neither counted nor slowed,
//! and bearer tokens are never limited, so clients that are logged in keep
//! working.

use std::collections::HashMap;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

#[derive(Debug, Clone, Copy)]
struct Entry {
    window_start: Instant,
    failures: u32,
}

#[derive(Debug)]
pub struct FailureLimiter {
    max_failures: u32,
    window: Duration,
    capacity: usize,
    entries: Mutex<HashMap<IpAddr, Entry>>,
}

/// The key an address is counted under.
fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl FailureLimiter {
    /// At most `max_failures` per `window` per address, tracking at most
    /// `capacity` addresses.
    pub fn new(max_failures: u32, window: Duration, capacity: usize) -> FailureLimiter {
        FailureLimiter {
            max_failures: max_failures.max(1),
            window,
            capacity: capacity.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    pub fn max_failures(&self) -> u32 {
        self.max_failures
    }

    /// `Some(wait)` when `ip` has used up its failures: refuse, and tell the
    /// client to retry after `wait`.
    pub fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        self.blocked_at(ip, Instant::now())
    }

    fn blocked_at(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        let entries = self.entries.lock();
        let e = entries.get(&key(ip))?;
        let end = e.window_start + self.window;
        (e.failures >= self.max_failures && now < end).then(|| end - now)
    }

    /// Counts a failed password check from `ip`.
    pub fn record_failure(&self, ip: IpAddr) {
        self.record_failure_at(ip, Instant::now())
    }

    fn record_failure_at(&self, ip: IpAddr, now: Instant) {
        let mut entries = self.entries.lock();
        let k = key(ip);
        if !entries.contains_key(&k) && entries.len() >= self.capacity {
            // Forget windows that are over; if the map is still full, forget
            // the oldest window, so memory stays bounded whatever the
            // number of addresses.
            let window = self.window;
            entries.retain(|_, e| now < e.window_start + window);
            if entries.len() >= self.capacity {
                if let Some(oldest) = entries
                    .iter()
                    .min_by_key(|(_, e)| e.window_start)
                    .map(|(k, _)| *k)
                {
                    entries.remove(&oldest);
                }
            }
        }
        let e = entries.entry(k).or_insert(Entry {
            window_start: now,
            failures: 0,
        });
        if now >= e.window_start + self.window {
            *e = Entry {
                window_start: now,
                failures: 0,
            };
        }
        e.failures = e.failures.saturating_add(1);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn blocks_after_the_limit_until_the_window_ends() {
        let l = FailureLimiter::new(3, Duration::from_secs(60), 100);
        let t0 = Instant::now();
        for _ in 0..2 {
            l.record_failure_at(ip("10.0.0.1"), t0);
            assert!(l.blocked_at(ip("10.0.0.1"), t0).is_none());
        }
        l.record_failure_at(ip("10.0.0.1"), t0);
        let wait = l.blocked_at(ip("10.0.0.1"), t0 + Duration::from_secs(10));
        assert_eq!(wait, Some(Duration::from_secs(50)));
        assert!(l.blocked_at(ip("10.0.0.2"), t0).is_none());
        assert!(l
            .blocked_at(ip("10.0.0.1"), t0 + Duration::from_secs(61))
            .is_none());
        // A new window starts from zero.
        l.record_failure_at(ip("10.0.0.1"), t0 + Duration::from_secs(61));
        assert!(l
            .blocked_at(ip("10.0.0.1"), t0 + Duration::from_secs(62))
            .is_none());
    }

    #[test]
    fn ipv6_counts_per_64() {
        let l = FailureLimiter::new(2, Duration::from_secs(60), 100);
        l.record_failure(ip("2001:db8::1"));
        l.record_failure(ip("2001:db8::2"));
        assert!(l.blocked(ip("2001:db8::3")).is_some());
        assert!(l.blocked(ip("2001:db8:0:1::3")).is_none());
        l.record_failure(ip("::ffff:10.1.1.1"));
        l.record_failure(ip("10.1.1.1"));
        assert!(l.blocked(ip("10.1.1.1")).is_some());
    }

    #[test]
    fn memory_is_bounded() {
        let l = FailureLimiter::new(2, Duration::from_secs(60), 10);
        for i in 0..1000u32 {
            l.record_failure(IpAddr::V4(i.into()));
        }
        assert!(l.len() <= 10);
    }
}
