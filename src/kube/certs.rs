//! The certificates of `trow init`: a CA, serving certificates signed with
//! it, and reading certificates back (validity, names, whether a key
//! matches). Pure: no I/O, and the current time is a parameter.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData as _, SerialNumber,
};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

/// How far back a new certificate's `notBefore` is put, so that a node
/// whose clock is a little behind still accepts it. Small next to any
/// validity, so that renewal times stay where they are computed.
const BACKDATE: Duration = Duration::from_secs(60);

/// Why a certificate could not be made or used. The message names what
/// was wrong, for the log line that `trow init` prints before it exits.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot create a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

/// A CA certificate and its private key (PEM). `Debug` leaves the key out.
#[derive(Clone, PartialEq, Eq)]
pub struct CaPair {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for CaPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaPair")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

/// A serving certificate (PEM) and its private key (PEM, PKCS#8).
#[derive(Clone)]
pub struct ServingPair {
    pub cert_pem: String,
    pub key_pem: String,
    /// When it was issued and when it expires.
    pub issued: SystemTime,
    pub not_after: SystemTime,
}

impl std::fmt::Debug for ServingPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingPair")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl ServingPair {
    /// When it should be replaced: at two thirds of its life, so that a
    /// renewal that fails has a third of the validity to be retried in.
    pub fn renew_at(&self) -> SystemTime {
        renew_at(self.issued, self.not_after)
    }
}

/// Two thirds of the way from `issued` to `not_after`.
pub fn renew_at(issued: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(issued).unwrap_or_default();
    issued + life * 2 / 3
}

/// What `trow init` needs to know about a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub subject: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub is_ca: bool,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    /// SHA-256 of the DER bytes, hex: what `openssl x509 -fingerprint
    /// -sha256` prints (without the colons).
    pub sha256: String,
    /// The public key's bits, to match a private key against.
    public_key: Vec<u8>,
}

impl CertInfo {
    /// Every name the certificate is valid for (DNS names and addresses).
    pub fn names(&self) -> Vec<String> {
        self.dns_names
            .iter()
            .cloned()
            .chain(self.ip_addresses.iter().map(IpAddr::to_string))
            .collect()
    }
}

/// An RFC 3339 time in UTC, to the second, for log lines.
pub fn show_time(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

fn to_offset(t: SystemTime) -> Result<OffsetDateTime, CertError> {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|_| CertError::Invalid("the clock is before 1970".into()))?
        .as_secs();
    i64::try_from(secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .ok_or_else(|| CertError::Invalid(format!("time out of range: {secs} s")))
}

fn from_offset(t: OffsetDateTime) -> SystemTime {
    let secs = t.unix_timestamp();
    match u64::try_from(secs) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

/// A random positive serial number of 16 bytes (RFC 5280 allows 20).
fn random_serial() -> Result<SerialNumber, CertError> {
    let mut bytes = [0u8; 16];
    getrandom::fill(&mut bytes)
        .map_err(|e| CertError::Invalid(format!("no randomness for a serial number: {e}")))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    Ok(SerialNumber::from_slice(&bytes))
}

/// A new CA: ECDSA P-256, valid from now for `validity`, allowed to sign
/// end-entity certificates only (path length 0).
pub fn new_ca(common_name: &str, now: SystemTime, validity: Duration) -> Result<CaPair, CertError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params
        .distinguished_name
        .push(DnType::OrganizationName, "Trow");
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = to_offset(now - BACKDATE)?;
    params.not_after = to_offset(now + validity)?;
    params.serial_number = Some(random_serial()?);
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok(CaPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// The names a serving certificate for Service `service` in `namespace`
/// carries: the Service's DNS names, `localhost`, then `extra` (each once,
/// in that order).
pub fn serving_names(service: &str, namespace: &str, extra: &[String]) -> Vec<String> {
    let mut names = vec![
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
        "localhost".to_string(),
    ];
    for e in extra {
        let e = e.trim().to_ascii_lowercase();
        if !e.is_empty() && !names.contains(&e) {
            names.push(e);
        }
    }
    names
}

/// Signs a new serving certificate (new ECDSA P-256 key) for `names` (DNS
/// names or IP addresses) with `ca`. Valid from now for `validity`, but
/// never beyond the CA's own expiry.
pub fn sign_serving(
    ca: &CaPair,
    names: &[String],
    now: SystemTime,
    validity: Duration,
) -> Result<ServingPair, CertError> {
    let ca_info = parse_one(&ca.cert_pem, "the CA certificate")?;
    let ca_key = KeyPair::from_pem(&ca.key_pem)
        .map_err(|e| CertError::Invalid(format!("the CA key: {e}")))?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key)
        .map_err(|e| CertError::Invalid(format!("the CA certificate: {e}")))?;
    let mut params = CertificateParams::new(names.to_vec())?;
    if let Some(first) = names.first() {
        params.distinguished_name.push(DnType::CommonName, first);
    }
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial()?);
    let not_after = (now + validity).min(ca_info.not_after);
    if not_after <= now {
        return Err(CertError::Invalid(format!(
            "the CA expired at {}",
            show_time(ca_info.not_after)
        )));
    }
    params.not_before = to_offset(now - BACKDATE)?;
    params.not_after = to_offset(not_after)?;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &issuer)?;
    Ok(ServingPair {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        issued: now,
        not_after: from_offset(params.not_after),
    })
}

/// The DER bytes of every `CERTIFICATE` block in `pem`, in order.
pub fn certificates(pem: &str) -> Result<Vec<Vec<u8>>, CertError> {
    let mut out = Vec::new();
    for block in Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| CertError::Invalid(format!("not PEM: {e}")))?;
        if block.label == "CERTIFICATE" {
            out.push(block.contents);
        }
    }
    Ok(out)
}

/// Reads one DER certificate.
pub fn info(der: &[u8]) -> Result<CertInfo, CertError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| CertError::Invalid(format!("not an X.509 certificate: {e}")))?;
    let mut dns_names = Vec::new();
    let mut ip_addresses = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(n) => dns_names.push(n.to_string()),
                GeneralName::IPAddress(b) => {
                    if let Ok(a) = <[u8; 4]>::try_from(*b) {
                        ip_addresses.push(IpAddr::from(a));
                    } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                        ip_addresses.push(IpAddr::from(a));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(CertInfo {
        subject: cert.subject().to_string(),
        not_before: from_offset(cert.validity().not_before.to_datetime()),
        not_after: from_offset(cert.validity().not_after.to_datetime()),
        is_ca: cert.is_ca(),
        dns_names,
        ip_addresses,
        sha256: hex::encode(Sha256::digest(der)),
        public_key: cert.public_key().subject_public_key.data.to_vec(),
    })
}

/// The first certificate of a PEM text; `what` names it in errors.
pub fn parse_one(pem: &str, what: &str) -> Result<CertInfo, CertError> {
    let ders = certificates(pem).map_err(|e| CertError::Invalid(format!("{what}: {e}")))?;
    let first = ders
        .first()
        .ok_or_else(|| CertError::Invalid(format!("{what}: no PEM certificate in it")))?;
    info(first).map_err(|e| CertError::Invalid(format!("{what}: {e}")))
}

/// Whether the private key `key_pem` belongs to the certificate `cert`.
pub fn key_matches(cert: &CertInfo, key_pem: &str) -> Result<bool, CertError> {
    let key = KeyPair::from_pem(key_pem)
        .map_err(|e| CertError::Invalid(format!("not a usable private key: {e}")))?;
    Ok(key.der_bytes() == cert.public_key.as_slice())
}

/// Checks a CA read back from its Secret: a CA certificate, the key that
/// goes with it, valid now. Returns what it read.
pub fn check_ca(ca: &CaPair, now: SystemTime) -> Result<CertInfo, CertError> {
    let info = parse_one(&ca.cert_pem, "tls.crt")?;
    if !info.is_ca {
        return Err(CertError::Invalid(
            "tls.crt is not a CA certificate (no basicConstraints CA:TRUE)".into(),
        ));
    }
    if !key_matches(&info, &ca.key_pem).map_err(|e| CertError::Invalid(format!("tls.key: {e}")))? {
        return Err(CertError::Invalid(
            "tls.key is not the key of the certificate in tls.crt".into(),
        ));
    }
    if info.not_after <= now {
        return Err(CertError::Invalid(format!(
            "the CA expired at {}",
            show_time(info.not_after)
        )));
    }
    Ok(info)
}

/// The certificate to hand out as the CA of a TLS Secret without a
/// `ca.crt`: the last certificate of the chain in `tls.crt` (the one
/// closest to the root), or the leaf itself when it comes alone.
pub fn chain_anchor(chain_pem: &str) -> Result<String, CertError> {
    let ders = certificates(chain_pem)?;
    let last = ders
        .last()
        .ok_or_else(|| CertError::Invalid("no PEM certificate in tls.crt".into()))?;
    Ok(der_to_pem(last))
}

/// One DER certificate as PEM.
pub fn der_to_pem(der: &[u8]) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: Duration = Duration::from_secs(86_400);

    fn verify(leaf_pem: &str, ca_pem: &str) -> bool {
        let leaf = certificates(leaf_pem).unwrap();
        let ca = certificates(ca_pem).unwrap();
        let (_, leaf) = x509_parser::parse_x509_certificate(&leaf[0]).unwrap();
        let (_, ca) = x509_parser::parse_x509_certificate(&ca[0]).unwrap();
        leaf.verify_signature(Some(ca.public_key())).is_ok()
    }

    #[test]
    fn a_new_ca_signs_serving_certificates_for_the_service_names() {
        let now = SystemTime::now();
        let ca = new_ca("Trow CA", now, 3650 * DAY).unwrap();
        let ca_info = check_ca(&ca, now).unwrap();
        assert!(ca_info.is_ca);
        assert!(ca_info.subject.contains("Trow CA"), "{}", ca_info.subject);
        let names = serving_names(
            "trow",
            "kube-public",
            &[
                "registry.example.com".into(),
                "10.0.0.7".into(),
                "LOCALHOST".into(),
            ],
        );
        assert_eq!(
            names,
            [
                "trow.kube-public",
                "trow.kube-public.svc",
                "trow.kube-public.svc.cluster.local",
                "localhost",
                "registry.example.com",
                "10.0.0.7"
            ]
        );
        let serving = sign_serving(&ca, &names, now, 90 * DAY).unwrap();
        let info = parse_one(&serving.cert_pem, "serving").unwrap();
        assert!(!info.is_ca);
        assert_eq!(info.dns_names, &names[..5]);
        assert_eq!(info.ip_addresses, ["10.0.0.7".parse::<IpAddr>().unwrap()]);
        assert!(key_matches(&info, &serving.key_pem).unwrap());
        assert!(!key_matches(&info, &ca.key_pem).unwrap());
        assert!(verify(&serving.cert_pem, &ca.cert_pem));
        // Valid for 90 days from now (to the second), a minute backdated.
        let secs = |t: SystemTime| t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(secs(info.not_after), secs(now + 90 * DAY));
        assert_eq!(secs(info.not_before), secs(now - BACKDATE));
        assert_eq!(secs(serving.renew_at()), secs(now + 60 * DAY));
        // Each signature is a new key and serial.
        let again = sign_serving(&ca, &names, now, 90 * DAY).unwrap();
        assert_ne!(again.key_pem, serving.key_pem);
        assert_ne!(parse_one(&again.cert_pem, "x").unwrap().sha256, info.sha256);
    }

    #[test]
    fn serving_certificates_never_outlive_their_ca() {
        let now = SystemTime::now();
        let ca = new_ca("short CA", now, 10 * DAY).unwrap();
        let s = sign_serving(&ca, &["a.b".into()], now, 90 * DAY).unwrap();
        let ca_end = parse_one(&ca.cert_pem, "ca").unwrap().not_after;
        assert_eq!(s.not_after, ca_end);
        let e = sign_serving(&ca, &["a.b".into()], now + 11 * DAY, DAY).unwrap_err();
        assert!(e.to_string().contains("the CA expired"), "{e}");
    }

    #[test]
    fn a_ca_read_back_is_checked() {
        let now = SystemTime::now();
        let ca = new_ca("CA", now, DAY).unwrap();
        let other = new_ca("other", now, DAY).unwrap();
        let swapped = CaPair {
            cert_pem: ca.cert_pem.clone(),
            key_pem: other.key_pem.clone(),
        };
        let e = check_ca(&swapped, now).unwrap_err().to_string();
        assert!(e.contains("not the key"), "{e}");
        let e = check_ca(&ca, now + 2 * DAY).unwrap_err().to_string();
        assert!(e.contains("expired"), "{e}");
        let leaf = sign_serving(&ca, &["x".into()], now, DAY).unwrap();
        let not_ca = CaPair {
            cert_pem: leaf.cert_pem,
            key_pem: leaf.key_pem,
        };
        let e = check_ca(&not_ca, now).unwrap_err().to_string();
        assert!(e.contains("not a CA"), "{e}");
        let e = check_ca(
            &CaPair {
                cert_pem: "garbage".into(),
                key_pem: ca.key_pem.clone(),
            },
            now,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("tls.crt"), "{e}");
        assert!(!format!("{ca:?}").contains("PRIVATE KEY"));
    }

    #[test]
    fn the_anchor_of_a_chain_is_its_last_certificate() {
        let now = SystemTime::now();
        let ca = new_ca("CA", now, DAY).unwrap();
        let leaf = sign_serving(&ca, &["x".into()], now, DAY).unwrap();
        let chain = format!("{}{}", leaf.cert_pem, ca.cert_pem);
        let anchor = chain_anchor(&chain).unwrap();
        assert_eq!(
            parse_one(&anchor, "a").unwrap(),
            parse_one(&ca.cert_pem, "ca").unwrap()
        );
        assert_eq!(
            parse_one(&chain_anchor(&leaf.cert_pem).unwrap(), "a")
                .unwrap()
                .sha256,
            parse_one(&leaf.cert_pem, "l").unwrap().sha256
        );
        assert!(chain_anchor("nothing here").is_err());
    }

    #[test]
    fn renewal_is_at_two_thirds() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        assert_eq!(
            renew_at(t0, t0 + Duration::from_secs(9)),
            t0 + Duration::from_secs(6)
        );
        assert_eq!(renew_at(t0, t0), t0);
    }
}
