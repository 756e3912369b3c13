//! What Trow counts, and `/metrics` in the Prometheus text format.
//!
//! A leaf: it knows nothing of HTTP, storage or the proxy. The parts of Trow
//! that count things either record into [`Metrics`] (requests, through the
//! `api` layer; garbage-collection passes) or keep their own atomic
//! counters (the pull-through cache per upstream, the failed-login limiter)
//! that the `api` layer reads into a [`Scrape`] when `/metrics` is asked
//! for; values that live in the metadata store (storage use, open uploads)
//! are queried then too, at most every [`STORAGE_TTL`].
//!
//! Every label value comes from a fixed list or from the configuration
//! (upstream hosts), never from a request: a client cannot create series.

pub mod http;

use std::future::Future;
use std::time::{Duration, Instant};

use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

pub use crate::storage::download::DownloadFigures;
pub use http::HttpMetrics;

/// The `Content-Type` of what [`Metrics::encode`] writes.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// How long storage figures read from the metadata store are reused, so
/// that a storm of scrapes costs one query.
pub const STORAGE_TTL: Duration = Duration::from_secs(5);
/// How long a scrape waits for the metadata store's figures before it
/// leaves them out.
pub const STORAGE_TIMEOUT: Duration = Duration::from_secs(2);

/// What one garbage-collection pass did; the collector hands it to
/// [`Metrics::observe_gc`] after each pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct GcPassMetrics {
    pub blobs_deleted: u64,
    pub manifests_deleted: u64,
    pub bytes_freed: u64,
    pub duration: std::time::Duration,
    /// A dry run deletes nothing: it counts as a run, and its duration is
    /// observed, but its would-be deletions are not added to the totals.
    pub dry_run: bool,
}

/// Storage figures from the metadata store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StorageFigures {
    /// Bytes of every stored digest (blobs and manifests).
    pub bytes: u64,
    /// Stored digests.
    pub blobs: u64,
    /// Open upload sessions of clients.
    pub client_uploads: u64,
    /// Open downloads of the pull-through cache.
    pub cache_downloads: u64,
}

/// The pull-through cache's counters for one upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamCacheFigures {
    /// The configured host (`docker.io`), or `unlisted` for upstreams
    /// reached through `allow_any_public`.
    pub upstream: String,
    pub hits: u64,
    pub misses: u64,
    pub stale: u64,
    pub shared: u64,
    pub upstream_errors: u64,
    pub upstream_bytes: u64,
}

/// Failed logins, from the limiter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoginFigures {
    /// Password checks that failed.
    pub bad_credentials: u64,
    /// Password attempts refused unchecked: too many failures from the
    /// address.
    pub rate_limited: u64,
}

/// Values read from other parts of Trow at scrape time.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    /// `None` when the metadata store did not answer in time.
    pub storage: Option<StorageFigures>,
    pub cache: Vec<UpstreamCacheFigures>,
    /// `None` when logins are off.
    pub logins: Option<LoginFigures>,
    /// Blob bytes served, by how they were handed to the socket.
    pub downloads: DownloadFigures,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DryRun {
    dry_run: &'static str,
}

impl DryRun {
    fn of(dry_run: bool) -> DryRun {
        DryRun {
            dry_run: if dry_run { "true" } else { "false" },
        }
    }
}

fn gc_duration_histogram() -> Histogram {
    Histogram::new([0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0])
}

/// Garbage-collection counters. Passes are rare, so prometheus-client's
/// own types (a lock per update) are fine here.
struct GcMetrics {
    runs: Family<DryRun, Counter>,
    bytes_freed: Counter,
    blobs_deleted: Counter,
    manifests_deleted: Counter,
    duration: Family<DryRun, Histogram, fn() -> Histogram>,
}

impl Default for GcMetrics {
    fn default() -> Self {
        let gc = GcMetrics {
            runs: Family::default(),
            bytes_freed: Counter::default(),
            blobs_deleted: Counter::default(),
            manifests_deleted: Counter::default(),
            duration: Family::new_with_constructor(gc_duration_histogram),
        };
        // Both series exist from the start (at 0), so that `rate()` and
        // alerts see the first pass.
        for dry_run in [false, true] {
            let _ = gc.runs.get_or_create(&DryRun::of(dry_run));
            let _ = gc.duration.get_or_create(&DryRun::of(dry_run));
        }
        gc
    }
}

/// Which admission webhook answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmissionWebhook {
    Validate,
    Mutate,
}

/// What an admission webhook answered: `allowed` (unchanged), `denied`,
/// `patched` (allowed with a rewrite), `invalid` (a review that could not
/// be read, answered 4xx).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdmissionVerdict {
    Allowed,
    Denied,
    Patched,
    Invalid,
}

impl AdmissionWebhook {
    const ALL: [AdmissionWebhook; 2] = [AdmissionWebhook::Validate, AdmissionWebhook::Mutate];
    pub fn as_str(self) -> &'static str {
        match self {
            AdmissionWebhook::Validate => "validate",
            AdmissionWebhook::Mutate => "mutate",
        }
    }
}

impl AdmissionVerdict {
    const ALL: [AdmissionVerdict; 4] = [
        AdmissionVerdict::Allowed,
        AdmissionVerdict::Denied,
        AdmissionVerdict::Patched,
        AdmissionVerdict::Invalid,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            AdmissionVerdict::Allowed => "allowed",
            AdmissionVerdict::Denied => "denied",
            AdmissionVerdict::Patched => "patched",
            AdmissionVerdict::Invalid => "invalid",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdmissionLabels {
    webhook: &'static str,
    verdict: &'static str,
}

/// Everything Trow records for `/metrics`; one per process.
pub struct Metrics {
    pub http: HttpMetrics,
    gc: GcMetrics,
    /// Admission reviews answered, by webhook and verdict (every pair
    /// exists from the start).
    admission: Family<AdmissionLabels, Counter>,
    /// The last storage figures and when they were read. Scrapes queue on
    /// the lock, so concurrent ones share one query.
    storage: tokio::sync::Mutex<Option<(Instant, StorageFigures)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let admission = Family::<AdmissionLabels, Counter>::default();
        for webhook in AdmissionWebhook::ALL {
            for verdict in AdmissionVerdict::ALL {
                let _ = admission.get_or_create(&AdmissionLabels {
                    webhook: webhook.as_str(),
                    verdict: verdict.as_str(),
                });
            }
        }
        Metrics {
            http: HttpMetrics::default(),
            gc: GcMetrics::default(),
            admission,
            storage: tokio::sync::Mutex::new(None),
        }
    }

    /// Counts one admission review answered.
    pub fn observe_admission(&self, webhook: AdmissionWebhook, verdict: AdmissionVerdict) {
        self.admission
            .get_or_create(&AdmissionLabels {
                webhook: webhook.as_str(),
                verdict: verdict.as_str(),
            })
            .inc();
    }

    /// Records one garbage-collection pass.
    pub fn observe_gc(&self, pass: &GcPassMetrics) {
        let labels = DryRun::of(pass.dry_run);
        self.gc.runs.get_or_create(&labels).inc();
        self.gc
            .duration
            .get_or_create(&labels)
            .observe(pass.duration.as_secs_f64());
        if !pass.dry_run {
            self.gc.bytes_freed.inc_by(pass.bytes_freed);
            self.gc.blobs_deleted.inc_by(pass.blobs_deleted);
            self.gc.manifests_deleted.inc_by(pass.manifests_deleted);
        }
    }

    /// The storage figures: the last ones read if younger than
    /// [`STORAGE_TTL`], else what `read` returns within
    /// [`STORAGE_TIMEOUT`]; `None` if it fails or takes longer.
    pub async fn storage_figures<F, Fut>(&self, read: F) -> Option<StorageFigures>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Option<StorageFigures>>,
    {
        let deadline = tokio::time::Instant::now() + STORAGE_TIMEOUT;
        let mut cached = tokio::time::timeout_at(deadline, self.storage.lock())
            .await
            .ok()?;
        if let Some((at, figures)) = *cached {
            if at.elapsed() < STORAGE_TTL {
                return Some(figures);
            }
        }
        let fresh = tokio::time::timeout_at(deadline, read()).await.ok()??;
        *cached = Some((Instant::now(), fresh));
        Some(fresh)
    }

    /// Everything, in the Prometheus text format (version 0.0.4).
    pub fn encode(&self, scrape: Scrape) -> Result<String, std::fmt::Error> {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ScrapeCollector {
            http: self.http.snapshot(),
            in_flight: self.http.in_flight(),
            scrape,
        }));
        registry.register(
            "trow_gc_runs",
            "Garbage-collection passes run, by whether they were dry runs (which delete nothing).",
            self.gc.runs.clone(),
        );
        registry.register(
            "trow_gc_bytes_freed",
            "Bytes of blobs and manifests that garbage collection deleted (dry runs not included).",
            self.gc.bytes_freed.clone(),
        );
        registry.register(
            "trow_gc_blobs_deleted",
            "Blobs that garbage collection deleted (dry runs not included).",
            self.gc.blobs_deleted.clone(),
        );
        registry.register(
            "trow_gc_manifests_deleted",
            "Manifests that garbage collection deleted (dry runs not included).",
            self.gc.manifests_deleted.clone(),
        );
        registry.register(
            "trow_gc_duration_seconds",
            "How long garbage-collection passes took, by whether they were dry runs.",
            self.gc.duration.clone(),
        );
        registry.register(
            "trow_admission_reviews",
            "Admission reviews answered, by webhook (validate, mutate) and verdict (allowed, denied, patched, invalid).",
            self.admission.clone(),
        );
        let mut text = String::with_capacity(16 * 1024);
        prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)?;
        Ok(text)
    }
}

/// The values of one scrape that prometheus-client's own types do not hold.
#[derive(Debug)]
struct ScrapeCollector {
    http: Vec<http::CellSnapshot>,
    in_flight: i64,
    scrape: Scrape,
}

/// Writes one family: its descriptor, then one sample per label set.
fn family<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, Value)>,
) -> Result<(), std::fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, value) in samples {
        let mut sample = metric.encode_family(&labels)?;
        match value {
            Value::Counter(v) => sample.encode_counter::<L, u64, u64>(&v, None)?,
            Value::Gauge(v) => sample.encode_gauge(&v)?,
            Value::Histogram {
                sum,
                count,
                buckets,
            } => sample.encode_histogram::<L>(sum, count, &buckets, None)?,
        }
    }
    Ok(())
}

enum Value {
    Counter(u64),
    Gauge(i64),
    Histogram {
        sum: f64,
        count: u64,
        buckets: Vec<(f64, u64)>,
    },
}

fn gauge(v: u64) -> Value {
    Value::Gauge(i64::try_from(v).unwrap_or(i64::MAX))
}

type NoLabels = [(&'static str, &'static str); 0];

impl prometheus_client::collector::Collector for ScrapeCollector {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        use MetricType::{Counter as C, Gauge as G, Histogram as H};
        family(
            &mut e,
            "trow_build_info",
            "Always 1; the version of Trow that is running is in the version label.",
            G,
            [([("version", env!("CARGO_PKG_VERSION"))], Value::Gauge(1))],
        )?;
        let http = &self.http;
        family(
            &mut e,
            "trow_http_requests",
            "HTTP requests answered, by method, route template (the endpoint, never the path) and status code.",
            C,
            http.iter().flat_map(|c| {
                c.statuses.iter().map(|&(status, n)| {
                    (
                        [("method", c.method), ("route", c.route), ("status", status)],
                        Value::Counter(n),
                    )
                })
            }),
        )?;
        family(
            &mut e,
            "trow_http_request_duration_seconds",
            "Time from a request's arrival until its response was handed over in full (for streamed blobs, the whole transfer), by method and route template.",
            H,
            http.iter().filter_map(|c| {
                let (count, buckets) = c.histogram();
                (count > 0).then_some((
                    [("method", c.method), ("route", c.route)],
                    Value::Histogram {
                        sum: c.duration_seconds,
                        count,
                        buckets,
                    },
                ))
            }),
        )?;
        family(
            &mut e,
            "trow_http_received_bytes",
            "Request body bytes read from clients (pushed blobs and manifests), by method and route template.",
            C,
            http.iter()
                .map(|c| ([("method", c.method), ("route", c.route)], Value::Counter(c.received))),
        )?;
        family(
            &mut e,
            "trow_http_sent_bytes",
            "Response body bytes sent to clients (pulled blobs and manifests, listings, errors), by method and route template.",
            C,
            http.iter()
                .map(|c| ([("method", c.method), ("route", c.route)], Value::Counter(c.sent))),
        )?;
        family(
            &mut e,
            "trow_http_requests_in_flight",
            "Requests received and not yet answered in full.",
            G,
            [(NoLabels::default(), Value::Gauge(self.in_flight))],
        )?;
        let d = self.scrape.downloads;
        family(
            &mut e,
            "trow_blob_read_bytes",
            "Blob bytes sent to clients from local storage, by path: sendfile (page-cache pages sent by the kernel straight to a plain HTTP/1.1 socket) or copied (read into a buffer first: TLS, HTTP/2, or data not in the page cache).",
            C,
            [
                ([("path", "sendfile")], Value::Counter(d.sendfile_bytes)),
                ([("path", "copied")], Value::Counter(d.copied_bytes)),
            ],
        )?;
        if let Some(s) = self.scrape.storage {
            family(
                &mut e,
                "trow_storage_bytes",
                "Bytes of everything stored: blobs and manifests, pushed or cached, as the metadata store's inventory counts them.",
                G,
                [(NoLabels::default(), gauge(s.bytes))],
            )?;
            family(
                &mut e,
                "trow_storage_blobs",
                "Stored blobs and manifests (each digest once, however many repositories hold it).",
                G,
                [(NoLabels::default(), gauge(s.blobs))],
            )?;
            family(
                &mut e,
                "trow_uploads_in_progress",
                "Upload sessions open (started, not yet finished, cancelled or expired), by kind: client pushes, and cache downloads from upstreams.",
                G,
                [
                    ([("kind", "client")], gauge(s.client_uploads)),
                    ([("kind", "cache")], gauge(s.cache_downloads)),
                ],
            )?;
        }
        let cache = &self.scrape.cache;
        family(
            &mut e,
            "trow_cache_requests",
            "Pulls through the pull-through cache, by upstream and outcome: hit (served from the cache), miss (fetched from upstream), shared (joined a fetch in progress), stale (upstream failed, the cached copy was served).",
            C,
            cache.iter().flat_map(|u| {
                [
                    ("hit", u.hits),
                    ("miss", u.misses),
                    ("shared", u.shared),
                    ("stale", u.stale),
                ]
                .map(|(outcome, n)| {
                    (
                        [("upstream", u.upstream.as_str()), ("outcome", outcome)],
                        Value::Counter(n),
                    )
                })
            }),
        )?;
        family(
            &mut e,
            "trow_cache_upstream_errors",
            "Failed requests to an upstream registry (errors, timeouts, refusals), by upstream.",
            C,
            cache.iter().map(|u| {
                (
                    [("upstream", u.upstream.as_str())],
                    Value::Counter(u.upstream_errors),
                )
            }),
        )?;
        family(
            &mut e,
            "trow_cache_upstream_bytes",
            "Manifest and blob bytes received from an upstream registry, by upstream.",
            C,
            cache.iter().map(|u| {
                (
                    [("upstream", u.upstream.as_str())],
                    Value::Counter(u.upstream_bytes),
                )
            }),
        )?;
        if let Some(l) = self.scrape.logins {
            family(
                &mut e,
                "trow_login_failures",
                "Failed password attempts: bad_credentials (the password check failed) and rate_limited (refused unchecked after too many failures from the client's address).",
                C,
                [
                    ([("reason", "bad_credentials")], Value::Counter(l.bad_credentials)),
                    ([("reason", "rate_limited")], Value::Counter(l.rate_limited)),
                ],
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::http::{Labels, Method, Route};
    use super::*;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn gc_passes_are_counted_and_dry_runs_delete_nothing() {
        let m = Metrics::new();
        m.observe_gc(&GcPassMetrics {
            blobs_deleted: 3,
            manifests_deleted: 2,
            bytes_freed: 1000,
            duration: Duration::from_millis(1500),
            dry_run: false,
        });
        m.observe_gc(&GcPassMetrics {
            blobs_deleted: 5,
            manifests_deleted: 1,
            bytes_freed: 99,
            duration: Duration::from_millis(200),
            dry_run: true,
        });
        let text = m.encode(Scrape::default()).unwrap();
        assert_eq!(
            sample(&text, r#"trow_gc_runs_total{dry_run="false"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"trow_gc_runs_total{dry_run="true"}"#),
            Some(1.0)
        );
        assert_eq!(sample(&text, "trow_gc_bytes_freed_total"), Some(1000.0));
        assert_eq!(sample(&text, "trow_gc_blobs_deleted_total"), Some(3.0));
        assert_eq!(sample(&text, "trow_gc_manifests_deleted_total"), Some(2.0));
        assert_eq!(
            sample(
                &text,
                r#"trow_gc_duration_seconds_bucket{dry_run="false",le="1"}"#
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"trow_gc_duration_seconds_bucket{dry_run="false",le="5"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"trow_gc_duration_seconds_sum{dry_run="false"}"#),
            Some(1.5)
        );
        assert_eq!(
            sample(&text, r#"trow_gc_duration_seconds_count{dry_run="true"}"#),
            Some(1.0)
        );
        assert!(text.contains("# TYPE trow_gc_duration_seconds histogram"));
    }

    #[test]
    fn scrape_values_are_written_with_help_and_type() {
        let m = Metrics::new();
        let labels = Labels::new(Method::of("GET"), Route::Manifest);
        m.http.started();
        m.http
            .finished(labels, 200, Duration::from_micros(300), 1234);
        let text = m
            .encode(Scrape {
                storage: Some(StorageFigures {
                    bytes: 10,
                    blobs: 2,
                    client_uploads: 1,
                    cache_downloads: 0,
                }),
                cache: vec![UpstreamCacheFigures {
                    upstream: "docker.io".into(),
                    hits: 4,
                    upstream_errors: 1,
                    ..Default::default()
                }],
                logins: Some(LoginFigures {
                    bad_credentials: 7,
                    rate_limited: 0,
                }),
                downloads: DownloadFigures {
                    sendfile_bytes: 5,
                    copied_bytes: 6,
                },
            })
            .unwrap();
        let get = r#"{method="GET",route="manifest"}"#;
        assert_eq!(
            sample(
                &text,
                r#"trow_http_requests_total{method="GET",route="manifest",status="200"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, &format!("trow_http_sent_bytes_total{get}")),
            Some(1234.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"trow_http_request_duration_seconds_bucket{method="GET",route="manifest",le="0.0005"}"#
            ),
            Some(1.0)
        );
        assert_eq!(sample(&text, "trow_http_requests_in_flight"), Some(0.0));
        assert_eq!(sample(&text, "trow_storage_bytes"), Some(10.0));
        assert_eq!(
            sample(&text, r#"trow_blob_read_bytes_total{path="sendfile"}"#),
            Some(5.0)
        );
        assert_eq!(sample(&text, "trow_storage_blobs"), Some(2.0));
        assert_eq!(
            sample(&text, r#"trow_uploads_in_progress{kind="client"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"trow_cache_requests_total{upstream="docker.io",outcome="hit"}"#
            ),
            Some(4.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"trow_cache_upstream_errors_total{upstream="docker.io"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"trow_login_failures_total{reason="bad_credentials"}"#
            ),
            Some(7.0)
        );
        // Every family has HELP and TYPE lines, and names carry their units.
        for line in text.lines().filter(|l| l.starts_with("# TYPE")) {
            let name = line.split(' ').nth(2).unwrap();
            assert!(name.starts_with("trow_"), "{line}");
            assert!(
                text.contains(&format!("# HELP {name} ")),
                "no HELP for {name}"
            );
            if line.ends_with(" counter") {
                assert!(name.ends_with("_total"), "{line}");
            }
        }
    }

    #[tokio::test]
    async fn storage_figures_are_reused_for_a_while_and_left_out_on_failure() {
        let m = Metrics::new();
        assert_eq!(m.storage_figures(|| async { None }).await, None);
        let one = StorageFigures {
            blobs: 1,
            ..Default::default()
        };
        assert_eq!(m.storage_figures(|| async { Some(one) }).await, Some(one));
        let two = StorageFigures {
            blobs: 2,
            ..Default::default()
        };
        // Within the TTL the first answer is served without a query.
        let queried = std::sync::atomic::AtomicBool::new(false);
        let again = m
            .storage_figures(|| async {
                queried.store(true, std::sync::atomic::Ordering::Relaxed);
                Some(two)
            })
            .await;
        assert_eq!(again, Some(one));
        assert!(!queried.load(std::sync::atomic::Ordering::Relaxed));
    }
}
