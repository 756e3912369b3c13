//! Helpers for the TLS and authentication tests: a private CA issuing
//! server certificates (rcgen), HTTPS clients that trust only that CA, the
//! certificate a server presents, htpasswd files and token requests.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use reqwest::header::{HeaderMap, HeaderValue, AUTHORIZATION};

/// A certificate authority in a temporary directory, like the cluster CA
/// that signs a Kubernetes service's certificate.
pub struct Pki {
    pub dir: tempfile::TempDir,
    issuer: Issuer<'static, KeyPair>,
    pub ca_pem: String,
}

/// A server certificate and its key, as PEM, plus the leaf's DER bytes.
pub struct ServerCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl Pki {
    pub fn new() -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "Trow test CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let pki = Pki {
            dir: tempfile::tempdir().expect("temp dir"),
            issuer: Issuer::new(params, key),
            ca_pem: cert.pem(),
        };
        std::fs::write(pki.ca_path(), &pki.ca_pem).expect("write CA");
        // A directory holding only the CA, as skopeo's and podman's
        // --cert-dir want it.
        std::fs::create_dir_all(pki.cert_dir()).expect("cert dir");
        std::fs::write(pki.cert_dir().join("ca.crt"), &pki.ca_pem).expect("write CA");
        pki
    }

    /// `ca.crt`
    pub fn ca_path(&self) -> PathBuf {
        self.dir.path().join("ca.crt")
    }

    /// A directory with just `ca.crt` in it.
    pub fn cert_dir(&self) -> PathBuf {
        self.dir.path().join("certs.d")
    }

    /// Issues a server certificate for 127.0.0.1 and localhost.
    pub fn issue(&self, serial: u64) -> ServerCert {
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
            .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "trow test server");
        params.serial_number = Some(SerialNumber::from(serial));
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate().expect("server key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign server cert");
        ServerCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// Issues a certificate and writes `tls.crt`/`tls.key` into `dir`;
    /// returns the `--tls` value.
    pub fn write_cert(&self, serial: u64, dir: &Path) -> (ServerCert, String) {
        std::fs::create_dir_all(dir).expect("cert dir");
        let c = self.issue(serial);
        std::fs::write(dir.join("tls.crt"), &c.cert_pem).expect("write cert");
        std::fs::write(dir.join("tls.key"), &c.key_pem).expect("write key");
        let flag = format!(
            "--tls={},{}",
            dir.join("tls.crt").display(),
            dir.join("tls.key").display()
        );
        (c, flag)
    }
}

/// An HTTPS client that trusts only `ca_pem`.
pub fn https_client(ca_pem: &str) -> reqwest::Client {
    https_builder(ca_pem).build().expect("https client")
}

pub fn https_builder(ca_pem: &str) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).expect("CA pem"))
}

/// The leaf certificate (DER) the server on `port` presents to a new
/// connection, verified against `ca_pem`.
pub async fn served_cert(port: u16, ca_pem: &str) -> Result<Vec<u8>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("127.0.0.1").map_err(|e| e.to_string())?;
    let tls = connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, conn) = tls.get_ref();
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.as_ref().to_vec())
        .ok_or_else(|| "no peer certificate".to_string())
}

/// An htpasswd file (bcrypt at the lowest cost, so debug builds stay fast).
pub fn write_htpasswd(path: &Path, users: &[(&str, &str)]) {
    let text: String = users
        .iter()
        .map(|(u, p)| format!("{u}:{}\n", bcrypt::hash(p, 4).expect("bcrypt")))
        .collect();
    std::fs::write(path, text).expect("write htpasswd");
}

/// `Basic <base64(user:password)>`
pub fn basic(user: &str, password: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

/// `Bearer <token>`
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// A client that sends `authorization` on every request.
pub fn client_with(authorization: &str) -> reqwest::Client {
    let mut h = HeaderMap::new();
    h.insert(
        AUTHORIZATION,
        HeaderValue::from_str(authorization).expect("header"),
    );
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .default_headers(h)
        .build()
        .expect("client")
}

/// Asks `/login` for a token as `creds` (user, password) for `scopes`;
/// panics unless the server issues one. Returns the token response JSON.
pub async fn login(base: &str, creds: Option<(&str, &str)>, scopes: &[&str]) -> serde_json::Value {
    let c = super::client();
    let mut req = c.get(format!("{base}/login"));
    let q: Vec<(&str, &str)> = scopes.iter().map(|s| ("scope", *s)).collect();
    req = req.query(&q);
    if let Some((u, p)) = creds {
        req = req.header(AUTHORIZATION, basic(u, p));
    }
    let r = req.send().await.expect("token request");
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    assert_eq!(status, reqwest::StatusCode::OK, "token request: {body}");
    serde_json::from_str(&body).expect("token JSON")
}

/// Just the token of [`login`].
pub async fn token(base: &str, creds: Option<(&str, &str)>, scopes: &[&str]) -> String {
    login(base, creds, scopes).await["token"]
        .as_str()
        .expect("token")
        .to_string()
}

/// The claims of a JWT, without checking anything.
pub fn claims(token: &str) -> serde_json::Value {
    let payload = token.split('.').nth(1).expect("JWT payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&bytes).expect("claims JSON")
}
