//! Small OCI client helpers over reqwest, for building test content.

use reqwest::{Client, StatusCode};
use sha2::{Digest as _, Sha256};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";

pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// Deterministic pseudo-random bytes (xorshift), so tests need no data files.
pub fn data(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A request body streamed in frames of `frame` bytes, without a
/// Content-Length (as clients stream uploads of unknown size).
pub fn streamed_body(bytes: &[u8], frame: usize) -> reqwest::Body {
    let frames: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(frame).map(|f| Ok(f.to_vec())).collect();
    reqwest::Body::wrap_stream(futures_util::stream::iter(frames))
}

/// Pushes a blob with the POST-then-PUT flow every registry supports;
/// returns its digest.
pub async fn push_blob(c: &Client, base: &str, repo: &str, bytes: &[u8]) -> String {
    let digest = sha256(bytes);
    let r = c
        .post(format!("{base}/v2/{repo}/blobs/uploads/"))
        .send()
        .await
        .expect("start upload");
    assert_eq!(
        r.status(),
        StatusCode::ACCEPTED,
        "start upload: {}",
        r.text().await.unwrap_or_default()
    );
    let location = r
        .headers()
        .get("location")
        .and_then(|v| v.to_str().ok())
        .expect("upload location")
        .to_string();
    // Follow the path of the Location on the registry we talk to, even when
    // it names the registry by a public hostname this test cannot resolve.
    let path = match location.find("://") {
        Some(i) => location[i + 3..]
            .find('/')
            .map_or("/", |j| &location[i + 3 + j..])
            .to_string(),
        None => location,
    };
    let location = format!("{base}{path}");
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = c
        .put(format!("{location}{sep}digest={digest}"))
        .header("Content-Type", "application/octet-stream")
        .body(bytes.to_vec())
        .send()
        .await
        .expect("push blob");
    assert_eq!(
        r.status(),
        StatusCode::CREATED,
        "push blob: {}",
        r.text().await.unwrap_or_default()
    );
    digest
}

pub fn descriptor(media_type: &str, bytes: &[u8]) -> serde_json::Value {
    serde_json::json!({ "mediaType": media_type, "digest": sha256(bytes), "size": bytes.len() })
}

/// An image manifest over a config and layers (which must be pushed).
pub fn image_manifest(config: &[u8], layers: &[&[u8]]) -> Vec<u8> {
    let layers: Vec<_> = layers.iter().map(|l| descriptor(OCI_LAYER, l)).collect();
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": layers,
    }))
    .expect("json")
}

/// Pushes a small image (config + one layer + manifest) under `reference`;
/// returns the manifest bytes and digest.
pub async fn push_image(
    c: &Client,
    base: &str,
    repo: &str,
    reference: &str,
    seed: u64,
) -> (Vec<u8>, String) {
    let config = format!("{{\"seed\":{seed}}}").into_bytes();
    let layer = data(seed, 1000 + seed as usize % 100);
    push_blob(c, base, repo, &config).await;
    push_blob(c, base, repo, &layer).await;
    let manifest = image_manifest(&config, &[&layer]);
    let digest = put_manifest(c, base, repo, reference, OCI_MANIFEST, &manifest).await;
    (manifest, digest)
}

/// PUTs a manifest and expects 201; returns the digest the server reports.
pub async fn put_manifest(
    c: &Client,
    base: &str,
    repo: &str,
    reference: &str,
    media_type: &str,
    body: &[u8],
) -> String {
    let r = c
        .put(format!("{base}/v2/{repo}/manifests/{reference}"))
        .header("Content-Type", media_type)
        .body(body.to_vec())
        .send()
        .await
        .expect("put manifest");
    let status = r.status();
    let digest = r
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        status,
        StatusCode::CREATED,
        "put manifest: {}",
        r.text().await.unwrap_or_default()
    );
    assert_eq!(digest, sha256(body));
    digest
}

/// A response read whole: status, headers and body.
pub struct Fetched {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Vec<u8>,
}

impl Fetched {
    /// A header's value, or "" when absent.
    pub fn header(&self, name: &str) -> &str {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    /// The first OCI error code of an error envelope, or "" when none.
    pub fn error_code(&self) -> String {
        serde_json::from_slice::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["errors"][0]["code"].as_str().map(str::to_string))
            .unwrap_or_default()
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Sends a request and reads the whole response.
pub async fn fetch(req: reqwest::RequestBuilder) -> Fetched {
    let r = req.send().await.expect("request");
    let status = r.status();
    let headers = r.headers().clone();
    let body = r.bytes().await.expect("response body").to_vec();
    Fetched {
        status,
        headers,
        body,
    }
}

/// `GET /v2/<repo>/manifests/<reference>`, accepting every manifest type.
pub async fn get_manifest(c: &Client, base: &str, repo: &str, reference: &str) -> Fetched {
    let accept = [
        OCI_MANIFEST,
        OCI_INDEX,
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    ]
    .join(", ");
    fetch(
        c.get(format!("{base}/v2/{repo}/manifests/{reference}"))
            .header("Accept", accept),
    )
    .await
}

/// `GET /v2/<repo>/blobs/<digest>`.
pub async fn get_blob(c: &Client, base: &str, repo: &str, digest: &str) -> Fetched {
    fetch(c.get(format!("{base}/v2/{repo}/blobs/{digest}"))).await
}
