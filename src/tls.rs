//! HTTPS: `--tls=<cert>,<key>` serves with rustls (ring provider), HTTP/1.1
//! and HTTP/2 negotiated by ALPN.
//!
//! The certificate and key are re-read when their files change: a task
//! polls the files' metadata (following symlinks, so the symlink swap of a
//! Kubernetes Secret volume is seen) and swaps the pair that new handshakes
//! use. A new pair that does not load, or whose key does not match the
//! certificate, is logged and the previous one kept. Established
//! connections are not touched.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::RwLock;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use sha2::{Digest as _, Sha256};

/// How often the certificate files are checked for changes.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// The certificate (chain) and key files of `--tls`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// clap value parser for `--tls=<cert>,<key>`.
pub fn parse_tls_arg(s: &str) -> Result<TlsFiles, String> {
    match s.split_once(',') {
        Some((cert, key)) if !cert.trim().is_empty() && !key.trim().is_empty() => Ok(TlsFiles {
            cert: PathBuf::from(cert.trim()),
            key: PathBuf::from(key.trim()),
        }),
        _ => Err(format!(
            "`{s}`: expected <certificate file>,<key file>, e.g. --tls=/etc/trow/tls.crt,/etc/trow/tls.key"
        )),
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loads and checks a certificate chain and its private key (PEM).
pub fn load(files: &TlsFiles) -> Result<CertifiedKey, String> {
    let cert_err =
        |e: &dyn std::fmt::Display| format!("TLS certificate {}: {e}", files.cert.display());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| cert_err(&e))?
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(&e))?;
    if chain.is_empty() {
        return Err(cert_err(&"no PEM certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("TLS key {}: {e}", files.key.display()))?;
    CertifiedKey::from_der(chain, key, &provider()).map_err(|e| {
        format!(
            "TLS certificate {} with key {}: {e}",
            files.cert.display(),
            files.key.display()
        )
    })
}

/// Checks a certificate chain and its key given as PEM text, as [`load`]
/// checks files: for `trow init --tls-secret`, before it writes them.
pub fn check_pem_pair(cert_pem: &[u8], key_pem: &[u8]) -> Result<(), String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("tls.crt: {e}"))?;
    if chain.is_empty() {
        return Err("tls.crt: no PEM certificate in it".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("tls.key: {e}"))?;
    CertifiedKey::from_der(chain, key, &provider())
        .map(|_| ())
        .map_err(|e| format!("tls.crt with tls.key: {e}"))
}

/// The names (DNS names and IP addresses) of the leaf certificate in a
/// PEM file, for the `?ns=` own-name rule; empty when unreadable.
pub fn cert_names(files: &TlsFiles) -> Vec<String> {
    let Ok(pem) = std::fs::read_to_string(&files.cert) else {
        return Vec::new();
    };
    crate::kube::certs::parse_one(&pem, "tls")
        .map(|info| info.names())
        .unwrap_or_default()
}

/// The SHA-256 fingerprint of the leaf certificate, for logs.
pub fn fingerprint(key: &CertifiedKey) -> String {
    key.cert
        .first()
        .map(|c| hex::encode(Sha256::digest(c.as_ref())))
        .unwrap_or_default()
}

/// The certificate new handshakes get; replaced on reload.
#[derive(Debug)]
pub struct ReloadingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ReloadingCert {
    pub fn new(key: CertifiedKey) -> ReloadingCert {
        ReloadingCert {
            current: RwLock::new(Arc::new(key)),
        }
    }

    pub fn set(&self, key: CertifiedKey) {
        *self.current.write() = Arc::new(key);
    }

    pub fn get(&self) -> Arc<CertifiedKey> {
        self.current.read().clone()
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.get())
    }
}

/// The rustls configuration: TLS 1.2 and 1.3, no client certificates,
/// HTTP/2 preferred over HTTP/1.1.
pub fn server_config(cert: Arc<ReloadingCert>) -> Result<Arc<ServerConfig>, String> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS configuration: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// What identifies a version of a file: follows symlinks.
type FileStamp = Option<(Option<SystemTime>, u64, u64, i64)>;

fn stamp(path: &Path) -> FileStamp {
    let m = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    let (ino, ctime) = {
        use std::os::unix::fs::MetadataExt;
        (
            m.ino(),
            m.ctime().wrapping_mul(1_000_000_000) + m.ctime_nsec(),
        )
    };
    #[cfg(not(unix))]
    let (ino, ctime) = (0, 0);
    Some((m.modified().ok(), m.len(), ino, ctime))
}

fn stamps(files: &TlsFiles) -> (FileStamp, FileStamp) {
    (stamp(&files.cert), stamp(&files.key))
}

/// Watches the files and swaps the certificate when they change.
pub fn spawn_reloader(files: TlsFiles, cert: Arc<ReloadingCert>, every: Duration) {
    tokio::spawn(async move {
        let mut seen = stamps(&files);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            let now = stamps(&files);
            if now == seen {
                continue;
            }
            seen = now;
            let f = files.clone();
            match tokio::task::spawn_blocking(move || load(&f)).await {
                Ok(Ok(key)) => {
                    // Swapped even when the leaf is unchanged: the chain
                    // (intermediates) may have been renewed.
                    let fp = fingerprint(&key);
                    cert.set(key);
                    tracing::info!(sha256 = %fp, "TLS certificate reloaded");
                }
                Ok(Err(e)) => tracing::warn!(
                    error = %e,
                    "TLS certificate files changed but cannot be used; still serving the previous certificate"
                ),
                Err(e) => tracing::warn!(error = %e, "TLS certificate reload failed"),
            }
        }
    });
}

/// Checks `--tls` at start-up (for `Config::validate`).
pub fn validate(files: &TlsFiles) -> Result<(), String> {
    load(files).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_flag() {
        assert_eq!(
            parse_tls_arg("a.crt,b.key").unwrap(),
            TlsFiles {
                cert: "a.crt".into(),
                key: "b.key".into()
            }
        );
        assert!(parse_tls_arg("a.crt").is_err());
        assert!(parse_tls_arg(",b").is_err());
    }

    #[test]
    fn missing_files_are_named() {
        let e = load(&TlsFiles {
            cert: "/nonexistent/tls.crt".into(),
            key: "/nonexistent/tls.key".into(),
        })
        .unwrap_err();
        assert!(e.contains("/nonexistent/tls.crt"), "{e}");
    }
}
