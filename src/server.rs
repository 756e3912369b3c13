//! Builds the registry from the configuration and serves it until SIGTERM or
//! Ctrl-C, then drains in-flight requests (until `--shutdown-timeout`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;

use crate::api::health::Health;
use crate::api::{self, AppState};
use crate::cli::GcArgs;
use crate::config::{Config, SyncMode};
use crate::config_file::ConfigFile;
use crate::meta::sqlite::{Durability, SqliteMeta};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::registry::gc::GcSetup;
use crate::registry::quota::Quotas;
use crate::registry::{Limits, Recovered, Registry};
use crate::storage::fs::FsBlobStore;

/// Opens storage and metadata under the data directory (which the caller
/// has locked), and brings them back to a consistent state after a crash.
pub async fn build_registry(
    data_dir: &Path,
    sync: SyncMode,
    limits: Limits,
    quotas: Option<Quotas>,
) -> anyhow::Result<Arc<Registry>> {
    let blobs = FsBlobStore::open(data_dir, true)
        .with_context(|| format!("cannot open blob storage in {}", data_dir.display()))?;
    let db = data_dir.join("trow.db");
    let durability = match sync {
        SyncMode::Normal => Durability::Normal,
        SyncMode::Full => Durability::Full,
    };
    let meta = SqliteMeta::open(&db, durability)
        .await
        .with_context(|| format!("cannot open metadata database {}", db.display()))?;
    let mut registry = Registry::new(Arc::new(blobs), Arc::new(meta), limits);
    let apply_quotas = quotas.is_some();
    if let Some(quotas) = quotas {
        registry = registry.with_quotas(quotas);
    }
    let recovered = registry
        .recover()
        .await
        .context("cannot bring the data directory back to a consistent state")?;
    if recovered != Recovered::default() {
        tracing::info!(
            ?recovered,
            "recovered the data directory after an unclean stop"
        );
    }
    // `trow gc` leaves the quota rules as the server last set them: it
    // only deletes, and the counters follow every delete.
    if apply_quotas {
        let started = std::time::Instant::now();
        let recounted = registry
            .apply_quotas()
            .await
            .context("cannot set up the storage quotas")?;
        if recounted {
            tracing::info!(
                took_ms = started.elapsed().as_millis() as u64,
                "quota rules changed since the last start; usage recounted"
            );
        }
    }
    Ok(Arc::new(registry))
}

/// `trow gc`: one garbage collection pass on a data directory no server is
/// using; the report is printed as JSON.
pub async fn gc_offline(args: GcArgs) -> anyhow::Result<()> {
    let file = match &args.config_file {
        Some(path) => ConfigFile::load(path).map_err(|e| anyhow::anyhow!(e))?,
        None => ConfigFile::default(),
    };
    let _data_dir = crate::data_dir::lock(&args.data_dir).with_context(|| {
        format!(
            "cannot collect garbage in {} (stop the server, or ask it: POST /admin/gc)",
            args.data_dir.display()
        )
    })?;
    let registry = build_registry(
        &args.data_dir,
        SyncMode::Normal,
        Limits {
            max_manifest_size: u64::MAX,
            upload_expiry: Duration::MAX,
        },
        None,
    )
    .await?;
    let setup = GcSetup {
        policies: file.retention(),
        grace: args.gc_grace,
        tag_history: args.tag_history,
    };
    let report = registry
        .collect_garbage(&setup.policies, &setup.options(args.dry_run))
        .await?;
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// Runs a garbage collection pass every `interval` (none when it is zero),
/// for as long as the server runs. The first pass is one interval after
/// start-up, so a restart loop does not collect at every start.
fn spawn_gc(registry: Arc<Registry>, gc: Arc<GcSetup>, metrics: Arc<Metrics>, interval: Duration) {
    if interval.is_zero() {
        tracing::info!("scheduled garbage collection is off (--gc-interval 0)");
        return;
    }
    tokio::spawn(async move {
        let start = tokio::time::Instant::now() + interval;
        let mut tick = tokio::time::interval_at(start, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match registry
                .collect_garbage(&gc.policies, &gc.options(false))
                .await
            {
                Ok(report) => metrics.observe_gc(&report.pass_metrics()),
                Err(e) => {
                    tracing::warn!(error = %e, "garbage collection pass failed; the next one will retry")
                }
            }
        }
    });
}

/// Removes abandoned uploads now and then, for as long as the server runs.
fn spawn_upload_expiry(registry: Arc<Registry>, expiry: Duration) {
    let period = (expiry / 4).clamp(Duration::from_secs(1), Duration::from_secs(600));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            if let Err(e) = registry.expire_uploads().await {
                tracing::warn!(error = %e, "could not expire abandoned uploads; will retry");
            }
        }
    });
}

/// Serves until SIGTERM or Ctrl-C. `file` is the configuration file that
/// `Config::validate` parsed and checked.
pub async fn run(config: Config, file: ConfigFile) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("cannot create data directory {}", config.data_dir.display()))?;
    let _data_dir = crate::data_dir::lock(&config.data_dir)
        .with_context(|| format!("cannot lock data directory {}", config.data_dir.display()))?;
    let registry = build_registry(
        &config.data_dir,
        config.sync,
        Limits {
            max_manifest_size: config.max_manifest_size,
            upload_expiry: config.upload_expiry,
        },
        Some(Quotas::new(file.quotas(), config.max_blob_size)),
    )
    .await?;
    spawn_upload_expiry(registry.clone(), config.upload_expiry);
    crate::memory::spawn_trimmer();
    let cert_names = config
        .tls
        .as_ref()
        .map(crate::tls::cert_names)
        .unwrap_or_default();
    let own = crate::proxy::OwnNames::new(config.hostname.as_deref(), &cert_names);
    if !own.hosts().is_empty() {
        tracing::info!(names = ?own.hosts(), "mirror requests (?ns=) naming these hosts are served from Trow's own repositories");
    }
    let proxy = Proxy::with_own_names(file.proxies(), registry.clone(), own.clone());
    proxy.spawn_eviction();
    let auth = build_auth(&config, &file)?;
    let tls = config.tls.as_ref().map(build_tls).transpose()?;
    let gc = Arc::new(GcSetup {
        policies: file.retention(),
        grace: config.gc_grace,
        tag_history: config.tag_history,
    });
    let metrics = Arc::new(Metrics::new());
    spawn_gc(
        registry.clone(),
        gc.clone(),
        metrics.clone(),
        config.gc_interval,
    );
    let signatures = file
        .signatures
        .clone()
        .map(|c| crate::signature::SignatureVerifier::new(c, registry.clone(), proxy.clone()))
        .transpose()
        .context("signatures in the configuration file")?
        .map(Arc::new);
    let admission = crate::admission::Admission::new(
        file.image_validation.as_ref(),
        file.image_mutation.as_ref(),
        file.proxies(),
        own,
        config.hostname.as_deref(),
    );
    // Images a signature policy covers need a verified signature to be
    // admitted, and are pinned to its digest when mutation is on.
    let admission = match &signatures {
        Some(verifier) => admission.with_extra_check(Arc::new(
            crate::admission::signatures::SignatureCheck(verifier.clone()),
        )),
        None => admission,
    };
    let admission = Arc::new(admission);
    if file.image_validation.is_some() || file.image_mutation.is_some() {
        tracing::info!(
            validation = file.image_validation.is_some(),
            mutation = admission.mutation_enabled(),
            "admission webhooks: POST /validate-image and /mutate-image apply the image policy"
        );
    }
    let health = Arc::new(Health::new());
    let state = AppState {
        signatures,
        gc,
        proxy,
        registry,
        base_url: config.base_url().into(),
        auth,
        trusted_proxies: Arc::new(crate::api::forwarded::TrustedProxies::new(
            config.trusted_proxies.clone(),
        )),
        metrics,
        health: health.clone(),
        admission,
    };
    let listener = TcpListener::bind(config.bind)
        .await
        .with_context(|| format!("cannot listen on {}", config.bind))?;
    let ops_listener = match config.metrics_bind {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (--metrics-bind)"))?,
        ),
        None => None,
    };
    let addr = listener.local_addr()?;
    tracing::info!(%addr, data_dir = %config.data_dir.display(), tls = tls.is_some(), auth = state.auth.is_some(), "trow is serving the OCI Distribution API");
    let settings = crate::listen::Settings::from_config(&config);
    crate::listen::raise_fd_limit(settings.max_connections.saturating_add(OPS_CONNECTIONS));
    let drained = tokio_util::sync::CancellationToken::new();
    let ops = match ops_listener {
        Some(l) => Some(spawn_ops_listener(l, state.clone(), settings, &drained)?),
        None => None,
    };
    let app = api::router(state, ops.is_none());
    let shutdown = async move {
        shutdown_signal().await;
        health.start_draining();
    };
    let cut = crate::listen::serve(listener, app, tls, settings, shutdown)
        .await
        .context("server failed")?;
    drained.cancel();
    if let Some(ops) = ops {
        match ops.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "the metrics listener failed"),
            Err(e) => tracing::warn!(error = %e, "the metrics listener failed"),
        }
    }
    if cut == 0 {
        tracing::info!("shut down cleanly");
    } else {
        tracing::warn!(
            connections_cut = cut,
            "shut down, with connections cut at the shutdown deadline"
        );
    }
    Ok(())
}

/// Serves `/metrics` and the health endpoints on the `--metrics-bind`
/// listener until `drained` is cancelled: after the registry's drain, so
/// that probes see `/readyz` answer 503 during it and `/metrics` can watch
/// it.
fn spawn_ops_listener(
    listener: TcpListener,
    state: AppState,
    settings: crate::listen::Settings,
    drained: &tokio_util::sync::CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<usize>>> {
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    let settings = crate::listen::Settings {
        max_connections: OPS_CONNECTIONS,
        shutdown_timeout: OPS_SHUTDOWN_TIMEOUT,
        ..settings
    };
    Ok(tokio::spawn(crate::listen::serve(
        listener,
        api::ops_router(state),
        None,
        settings,
        drained.clone().cancelled_owned(),
    )))
}

/// Connections the `--metrics-bind` listener serves at once (scrapers and
/// probes need a few).
const OPS_CONNECTIONS: u32 = 64;
/// How long the `--metrics-bind` listener lets requests finish once the
/// registry has drained.
const OPS_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

/// Users, permissions and the token key, when authentication is on.
fn build_auth(
    config: &Config,
    file: &ConfigFile,
) -> anyhow::Result<Option<Arc<crate::auth::Auth>>> {
    let Some(setup) =
        crate::auth::AuthSetup::load(config.user_sources(), file.permissions.as_ref())
            .map_err(|e| anyhow::anyhow!(e))?
    else {
        return Ok(None);
    };
    for w in &setup.warnings {
        tracing::warn!("{w}");
    }
    let key = crate::auth::token::load_or_create_key(&config.data_dir, config.token_key.as_deref())
        .map_err(|e| anyhow::anyhow!(e))?;
    tracing::info!(
        users = setup.users.len(),
        token_lifetime = %humantime::format_duration(config.token_lifetime),
        "authentication is on"
    );
    Ok(Some(Arc::new(crate::auth::Auth::new(
        setup,
        &key,
        config.token_lifetime,
        config.hostname.clone(),
        config.tls.is_some(),
    ))))
}

/// The TLS configuration, with the certificate reloaded when its files
/// change.
fn build_tls(files: &crate::tls::TlsFiles) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let key = crate::tls::load(files).map_err(|e| anyhow::anyhow!(e))?;
    tracing::info!(sha256 = %crate::tls::fingerprint(&key), cert = %files.cert.display(), "TLS is on");
    let cert = Arc::new(crate::tls::ReloadingCert::new(key));
    crate::tls::spawn_reloader(files.clone(), cert.clone(), crate::tls::RELOAD_INTERVAL);
    crate::tls::server_config(cert).map_err(|e| anyhow::anyhow!(e))
}

/// Resolves on SIGTERM (Kubernetes stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    crate::shutdown::requested().await;
    tracing::info!("shutdown requested; draining in-flight requests");
}
