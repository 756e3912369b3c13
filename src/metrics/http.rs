//! Request metrics in fixed tables of atomics.
//!
//! Every request costs a handful of relaxed atomic additions and no lock,
//! hash or allocation: its labels are small indices (method, route
//! template, status code), chosen from fixed lists, so the table of series
//! is allocated once at start-up and label values can never grow with what
//! clients send. Values are read at scrape time (`super::encode`).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

/// The `method` label: the methods of the Distribution API and `other`
/// (anything else a client sends, whatever its name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Method(u8);

const METHODS: [&str; 8] = [
    "GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "other",
];

impl Method {
    /// The label of a request method's name.
    pub fn of(name: &str) -> Method {
        let index = METHODS[..METHODS.len() - 1]
            .iter()
            .position(|m| *m == name)
            .unwrap_or(METHODS.len() - 1);
        Method(index as u8)
    }

    pub fn as_str(self) -> &'static str {
        METHODS[self.0 as usize]
    }
}

/// The `route` label: which endpoint a request was for, never its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    /// `/v2/<name>/tags/list`
    Tags,
    /// `/v2/<name>/manifests/<reference>`
    Manifest,
    /// `/v2/<name>/blobs/<digest>`
    Blob,
    /// `/v2/<name>/blobs/uploads/[<id>]`
    Upload,
    /// `/v2/<name>/referrers/<digest>`
    Referrers,
    /// `/login`
    Login,
    /// `/healthz`, `/readyz`, `/readiness`
    Health,
    /// `/metrics`
    Metrics,
    /// `/admin/…`
    Admin,
    /// `/validate-image`, `/mutate-image` (the admission webhooks)
    Admission,
    /// Anything else (answered 404 or 405).
    Other,
}

impl Route {
    pub const ALL: [Route; 13] = [
        Route::Base,
        Route::Catalog,
        Route::Tags,
        Route::Manifest,
        Route::Blob,
        Route::Upload,
        Route::Referrers,
        Route::Login,
        Route::Health,
        Route::Metrics,
        Route::Admin,
        Route::Admission,
        Route::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Tags => "tags",
            Route::Manifest => "manifest",
            Route::Blob => "blob",
            Route::Upload => "upload",
            Route::Referrers => "referrers",
            Route::Login => "login",
            Route::Health => "health",
            Route::Metrics => "metrics",
            Route::Admin => "admin",
            Route::Admission => "admission",
            Route::Other => "other",
        }
    }
}

/// Status codes counted under their own label. Any other code is counted
/// under its class (`2xx` … `5xx`, `other`), so the label stays bounded.
const STATUSES: [(u16, &str); 42] = [
    (100, "100"),
    (101, "101"),
    (200, "200"),
    (201, "201"),
    (202, "202"),
    (203, "203"),
    (204, "204"),
    (206, "206"),
    (301, "301"),
    (302, "302"),
    (303, "303"),
    (304, "304"),
    (307, "307"),
    (308, "308"),
    (400, "400"),
    (401, "401"),
    (403, "403"),
    (404, "404"),
    (405, "405"),
    (406, "406"),
    (408, "408"),
    (409, "409"),
    (411, "411"),
    (412, "412"),
    (413, "413"),
    (414, "414"),
    (415, "415"),
    (416, "416"),
    (417, "417"),
    (421, "421"),
    (422, "422"),
    (425, "425"),
    (426, "426"),
    (428, "428"),
    (429, "429"),
    (431, "431"),
    (500, "500"),
    (501, "501"),
    (502, "502"),
    (503, "503"),
    (504, "504"),
    (505, "505"),
];
const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];
const STATUS_SLOTS: usize = STATUSES.len() + CLASSES.len();

/// The slot of a status code: its own, or its class's.
fn status_slot(code: u16) -> usize {
    match STATUSES.binary_search_by_key(&code, |(c, _)| *c) {
        Ok(i) => i,
        Err(_) => {
            STATUSES.len()
                + match code {
                    100..=599 => usize::from(code / 100 - 1),
                    _ => CLASSES.len() - 1,
                }
        }
    }
}

fn status_label(slot: usize) -> &'static str {
    match STATUSES.get(slot) {
        Some((_, label)) => label,
        None => CLASSES[slot - STATUSES.len()],
    }
}

/// Upper bounds of the duration buckets, in nanoseconds: from half a
/// millisecond (a manifest from memory) to five minutes (a large layer).
const DURATION_BUCKETS_NS: [u64; 17] = [
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
    60_000_000_000,
    300_000_000_000,
];

/// One method and route: its counters.
struct Cell {
    statuses: [AtomicU64; STATUS_SLOTS],
    /// Requests per duration bucket (not cumulative); the last is `+Inf`.
    buckets: [AtomicU64; DURATION_BUCKETS_NS.len() + 1],
    duration_ns: AtomicU64,
    received: AtomicU64,
    sent: AtomicU64,
}

impl Cell {
    fn new() -> Cell {
        Cell {
            statuses: [const { AtomicU64::new(0) }; STATUS_SLOTS],
            buckets: [const { AtomicU64::new(0) }; DURATION_BUCKETS_NS.len() + 1],
            duration_ns: AtomicU64::new(0),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        }
    }
}

/// A request's labels, as an index into the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Labels(u16);

impl Labels {
    pub fn new(method: Method, route: Route) -> Labels {
        Labels(u16::from(method.0) * Route::ALL.len() as u16 + route as u16)
    }

    fn method(self) -> Method {
        Method((self.0 / Route::ALL.len() as u16) as u8)
    }

    fn route(self) -> Route {
        Route::ALL[usize::from(self.0) % Route::ALL.len()]
    }
}

/// The request counters of the whole process.
pub struct HttpMetrics {
    cells: Box<[Cell]>,
    in_flight: AtomicI64,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics {
            cells: (0..METHODS.len() * Route::ALL.len())
                .map(|_| Cell::new())
                .collect(),
            in_flight: AtomicI64::new(0),
        }
    }
}

impl HttpMetrics {
    fn cell(&self, labels: Labels) -> &Cell {
        // Labels are built from the fixed lists, so the index is in range;
        // the modulo keeps this total without a panic path.
        &self.cells[usize::from(labels.0) % self.cells.len()]
    }

    /// A request arrived.
    pub fn started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A request ended without an answer (the client went away first).
    pub fn abandoned(&self) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Request body bytes were read.
    pub fn received(&self, labels: Labels, bytes: u64) {
        self.cell(labels)
            .received
            .fetch_add(bytes, Ordering::Relaxed);
    }

    /// A request was answered with `status`, `sent` body bytes, `elapsed`
    /// after it arrived.
    pub fn finished(&self, labels: Labels, status: u16, elapsed: Duration, sent: u64) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let cell = self.cell(labels);
        cell.statuses[status_slot(status)].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        let bucket = DURATION_BUCKETS_NS
            .iter()
            .position(|&bound| ns <= bound)
            .unwrap_or(DURATION_BUCKETS_NS.len());
        cell.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        cell.duration_ns.fetch_add(ns, Ordering::Relaxed);
        if sent > 0 {
            cell.sent.fetch_add(sent, Ordering::Relaxed);
        }
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.load(Ordering::Relaxed).max(0)
    }

    /// Every (labels, counters) pair that has seen a request.
    pub(super) fn snapshot(&self) -> Vec<CellSnapshot> {
        self.cells
            .iter()
            .enumerate()
            .filter_map(|(i, cell)| {
                let labels = Labels(i as u16);
                let buckets: Vec<u64> = cell
                    .buckets
                    .iter()
                    .map(|b| b.load(Ordering::Relaxed))
                    .collect();
                let received = cell.received.load(Ordering::Relaxed);
                if received == 0 && buckets.iter().all(|&b| b == 0) {
                    return None;
                }
                let statuses = cell
                    .statuses
                    .iter()
                    .enumerate()
                    .filter_map(|(slot, n)| {
                        let n = n.load(Ordering::Relaxed);
                        (n > 0).then(|| (status_label(slot), n))
                    })
                    .collect();
                Some(CellSnapshot {
                    method: labels.method().as_str(),
                    route: labels.route().as_str(),
                    statuses,
                    buckets,
                    duration_seconds: cell.duration_ns.load(Ordering::Relaxed) as f64 / 1e9,
                    received,
                    sent: cell.sent.load(Ordering::Relaxed),
                })
            })
            .collect()
    }
}

/// One cell's values at scrape time.
#[derive(Debug)]
pub(super) struct CellSnapshot {
    pub method: &'static str,
    pub route: &'static str,
    pub statuses: Vec<(&'static str, u64)>,
    /// Per bucket, not cumulative; the last is `+Inf`.
    pub buckets: Vec<u64>,
    pub duration_seconds: f64,
    pub received: u64,
    pub sent: u64,
}

impl CellSnapshot {
    /// The histogram as `(upper bound in seconds, count)`, per bucket.
    pub fn histogram(&self) -> (u64, Vec<(f64, u64)>) {
        let count = self.buckets.iter().sum();
        let buckets = DURATION_BUCKETS_NS
            .iter()
            .map(|&ns| ns as f64 / 1e9)
            .chain(std::iter::once(f64::INFINITY))
            .zip(self.buckets.iter().copied())
            .collect();
        (count, buckets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_their_own_or_their_class() {
        assert_eq!(status_label(status_slot(200)), "200");
        assert_eq!(status_label(status_slot(503)), "503");
        assert_eq!(status_label(status_slot(299)), "2xx");
        assert_eq!(status_label(status_slot(599)), "5xx");
        assert_eq!(status_label(status_slot(999)), "other");
        assert_eq!(status_label(status_slot(0)), "other");
        assert!(STATUSES.windows(2).all(|w| w[0].0 < w[1].0), "sorted");
    }

    #[test]
    fn methods_are_bounded() {
        assert_eq!(Method::of("GET").as_str(), "GET");
        assert_eq!(Method::of("PATCH").as_str(), "PATCH");
        assert_eq!(Method::of("BREW").as_str(), "other");
        assert_eq!(Method::of("get").as_str(), "other");
    }

    #[test]
    fn labels_round_trip() {
        for m in METHODS {
            for r in Route::ALL {
                let l = Labels::new(Method::of(m), r);
                assert_eq!(l.method().as_str(), m);
                assert_eq!(l.route(), r);
            }
        }
    }

    #[test]
    fn a_request_lands_in_its_cell_and_bucket() {
        let h = HttpMetrics::default();
        let l = Labels::new(Method::of("PUT"), Route::Manifest);
        h.started();
        assert_eq!(h.in_flight(), 1);
        h.received(l, 100);
        h.finished(l, 201, Duration::from_millis(3), 0);
        h.started();
        h.finished(l, 201, Duration::from_secs(1000), 7);
        assert_eq!(h.in_flight(), 0);
        let cells = h.snapshot();
        assert_eq!(cells.len(), 1);
        let c = &cells[0];
        assert_eq!((c.method, c.route), ("PUT", "manifest"));
        assert_eq!(c.statuses, vec![("201", 2)]);
        assert_eq!((c.received, c.sent), (100, 7));
        let (count, buckets) = c.histogram();
        assert_eq!(count, 2);
        // 3 ms is in the 5 ms bucket; 1000 s only in +Inf.
        assert_eq!(buckets[3], (0.005, 1));
        assert_eq!(buckets.last(), Some(&(f64::INFINITY, 1)));
        assert!((c.duration_seconds - 1000.003).abs() < 1e-6);
    }
}
