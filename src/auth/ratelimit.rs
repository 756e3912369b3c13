//! Failed-login limiting per client address, in bounded memory.
//!
//! Each address (IPv6 addresses by their /64, which one host controls whole)
//! may fail [`FailureLimiter::max_failures`] password checks per window;
//! after that every password attempt from it is refused without being
//! checked until the window ends. Successes are neither counted nor slowed,
//! and bearer tokens are never limited, so clients that are logged in keep
//! working.
//!
//! The addresses live in an LRU list of at most `capacity` entries: a new
//! address on a full list pushes out the one whose last failure (or last
//! refused attempt) is the oldest, in constant time. An address whose window
//! is over was touched longer ago than any address still counting, so
//! finished windows go first. Many addresses (an IPv6 attacker's /64s) thus
//! cost each failure O(1), never a scan of the list.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lru::LruCache;
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
    /// Most recently touched first. Unbounded as far as `lru` knows: the
    /// bound is kept here, so no table of `capacity` slots is allocated
    /// before it is needed.
    entries: Mutex<LruCache<IpAddr, Entry>>,
    /// Failed password checks since start-up (for `/metrics`).
    failures: AtomicU64,
    /// Attempts refused unchecked since start-up.
    refusals: AtomicU64,
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
            entries: Mutex::new(LruCache::unbounded()),
            failures: AtomicU64::new(0),
            refusals: AtomicU64::new(0),
        }
    }

    /// Failed and refused attempts since start-up.
    pub fn figures(&self) -> crate::metrics::LoginFigures {
        crate::metrics::LoginFigures {
            bad_credentials: self.failures.load(Ordering::Relaxed),
            rate_limited: self.refusals.load(Ordering::Relaxed),
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
        let mut entries = self.entries.lock();
        let k = key(ip);
        let e = entries.peek(&k)?;
        let end = e.window_start + self.window;
        let wait = (e.failures >= self.max_failures && now < end).then(|| end - now)?;
        self.refusals.fetch_add(1, Ordering::Relaxed);
        // An address that keeps trying while blocked stays tracked: a flood
        // of new addresses evicts quieter ones first.
        entries.promote(&k);
        Some(wait)
    }

    /// Counts a failed password check from `ip`.
    pub fn record_failure(&self, ip: IpAddr) {
        self.record_failure_at(ip, Instant::now())
    }

    fn record_failure_at(&self, ip: IpAddr, now: Instant) {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let mut entries = self.entries.lock();
        let k = key(ip);
        let fresh = Entry {
            window_start: now,
            failures: 0,
        };
        if !entries.contains(&k) {
            // Full: forget the least recently touched address.
            while entries.len() >= self.capacity && entries.pop_lru().is_some() {}
        }
        // Inserts or, for a known address, moves it to the front.
        let e = entries.get_or_insert_mut(k, || fresh);
        if now >= e.window_start + self.window {
            *e = fresh;
        }
        e.failures = e.failures.saturating_add(1);
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().len()
    }

    /// Failures counted for `ip` in its current window, as of `now`.
    #[cfg(test)]
    fn failures_at(&self, ip: IpAddr, now: Instant) -> u32 {
        self.entries
            .lock()
            .peek(&key(ip))
            .filter(|e| now < e.window_start + self.window)
            .map_or(0, |e| e.failures)
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
        // Every failure and every refusal is counted, for /metrics.
        let figures = l.figures();
        assert_eq!(figures.bad_credentials, 4);
        assert_eq!(figures.rate_limited, 1);
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
        assert_eq!(l.len(), 10);
        // The last ten are the ones kept.
        let now = Instant::now();
        for i in 990..1000u32 {
            assert_eq!(l.failures_at(IpAddr::V4(i.into()), now), 1, "{i}");
        }
        assert_eq!(l.failures_at(IpAddr::V4(989u32.into()), now), 0);
        // IPv6 attackers with many /64s are bounded the same way.
        for i in 0..1000u16 {
            l.record_failure(IpAddr::V6(std::net::Ipv6Addr::new(
                0x2001, 0xdb8, i, 0, 0, 0, 0, 1,
            )));
        }
        assert_eq!(l.len(), 10);
    }

    #[test]
    fn the_least_recently_touched_address_is_forgotten_first() {
        let l = FailureLimiter::new(2, Duration::from_secs(60), 3);
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        let (a, b, c, d, e) = (
            ip("10.0.0.1"),
            ip("10.0.0.2"),
            ip("2001:db8::1"),
            ip("10.0.0.4"),
            ip("10.0.0.5"),
        );
        l.record_failure_at(a, at(0));
        l.record_failure_at(b, at(1));
        l.record_failure_at(c, at(2));
        // a fails again: now b is the least recently touched.
        l.record_failure_at(a, at(3));
        assert!(l.blocked_at(a, at(3)).is_some());
        l.record_failure_at(d, at(4));
        assert_eq!(l.len(), 3);
        assert_eq!(l.failures_at(b, at(4)), 0, "b was evicted");
        assert_eq!(l.failures_at(a, at(4)), 2);
        assert_eq!(l.failures_at(c, at(4)), 1);
        assert_eq!(l.failures_at(d, at(4)), 1);
        // Another address of c's /64 counts as c, and touches it.
        l.record_failure_at(ip("2001:db8::ffff"), at(5));
        assert_eq!(l.failures_at(c, at(5)), 2);
        // Order is now a (3), d (4), c (5). A blocked address that keeps
        // trying is touched too, so a goes to the front and d is next out.
        assert!(l.blocked_at(a, at(6)).is_some());
        l.record_failure_at(e, at(7));
        assert_eq!(l.failures_at(d, at(7)), 0, "d was evicted");
        assert!(l.blocked_at(a, at(7)).is_some(), "a is still blocked");
        assert!(l.blocked_at(c, at(7)).is_some());
        assert_eq!(l.len(), 3);
        // A blocked address's block ends with its window, eviction or not.
        assert!(l.blocked_at(a, at(61)).is_none());
    }

    #[test]
    fn a_full_list_keeps_counting_new_addresses() {
        // With the list full of other addresses, a new attacker is still
        // counted and blocked: eviction never loses the entry being written.
        let l = FailureLimiter::new(3, Duration::from_secs(60), 100);
        let t0 = Instant::now();
        for i in 0..100u32 {
            l.record_failure_at(IpAddr::V4((0x0a00_0000 + i).into()), t0);
        }
        for _ in 0..3 {
            l.record_failure_at(ip("192.0.2.1"), t0);
        }
        assert!(l.blocked_at(ip("192.0.2.1"), t0).is_some());
        assert_eq!(l.len(), 100);
    }

    /// The cost of a failure from a new address once the list is full, for
    /// the record (not a timed assertion):
    /// `cargo test --lib ratelimit::tests::cost_of_new_addresses -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn cost_of_new_addresses() {
        let capacity = super::super::LIMITER_CAPACITY;
        let l = FailureLimiter::new(10, Duration::from_secs(60), capacity);
        let fill = Instant::now();
        for i in 0..capacity as u32 {
            l.record_failure(IpAddr::V4(i.into()));
        }
        eprintln!("filling {capacity} addresses took {:?}", fill.elapsed());
        let n = 100_000u64;
        let start = Instant::now();
        for i in 0..n {
            let s = (i as u16, (i >> 16) as u16);
            l.record_failure(IpAddr::V6(std::net::Ipv6Addr::new(
                0x2001, 0xdb8, s.1, s.0, 0, 0, 0, 1,
            )));
        }
        let took = start.elapsed();
        eprintln!(
            "{n} failures from new addresses on a full list took {took:?} ({:?} each)",
            took / n as u32
        );
    }
}
