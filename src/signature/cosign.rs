//! Cosign's signature format, pure: reading a signature manifest (the
//! `sha256-<hex>.sig` tag's, or a referrer's), and checking one signature
//! layer's payload against an image digest and a set of public keys.
//!
//! A signature manifest's layers of media type
//! `application/vnd.dev.cosign.simplesigning.v1+json` each hold a payload
//! blob (JSON "simple signing": `critical.image.docker-manifest-digest`,
//! `critical.type`) and, in the annotation
//! `dev.cosignproject.cosign/signature`, the base64 of an ASN.1 DER
//! ECDSA P-256 signature over the payload's bytes with SHA-256.
//!
//! Everything here comes from registries and is treated as hostile: sizes
//! are checked before parsing and every list is bounded.

use base64::Engine as _;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use serde::Deserialize;

use crate::oci::Digest;

/// The media type of a cosign signature layer.
pub const SIMPLESIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The annotation holding a layer's signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
/// The `artifactType` of cosign signatures attached as referrers.
pub const SIGNATURE_ARTIFACT: &str = "application/vnd.dev.cosign.artifact.sig.v1+json";
/// The `critical.type` of an image signature's payload.
pub const SIGNATURE_TYPE: &str = "cosign container image signature";
/// Largest signature manifest read.
pub const MAX_MANIFEST: usize = 64 << 10;
/// Largest payload blob read.
pub const MAX_PAYLOAD: u64 = 64 << 10;
/// Signature layers looked at per manifest.
const MAX_LAYERS: usize = 32;
/// Longest base64 signature annotation (a DER P-256 signature is at most
/// 72 bytes, 96 in base64).
const MAX_SIGNATURE_B64: usize = 256;

/// Why a signature does not count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CosignError {
    #[error("signature manifest is {0} bytes, more than the {MAX_MANIFEST} accepted")]
    ManifestTooLarge(usize),
    #[error("signature manifest is not a JSON image manifest: {0}")]
    ManifestInvalid(String),
    #[error("signature manifest has no cosign signature layer ({SIMPLESIGNING} with the {SIGNATURE_ANNOTATION} annotation)")]
    NoSignatureLayer,
    #[error("signature payload {0} is larger than {MAX_PAYLOAD} bytes")]
    PayloadTooLarge(Digest),
    #[error("signature payload does not hash to its descriptor's digest {0}")]
    PayloadDigest(Digest),
    #[error("signature payload is not cosign simple signing JSON: {0}")]
    PayloadInvalid(String),
    #[error("signature payload's critical.type is `{0}`, not `{SIGNATURE_TYPE}`")]
    WrongType(String),
    #[error("signature is for {signed}, not for {image}")]
    OtherImage { signed: String, image: Digest },
    #[error("signature annotation is not base64 of a DER ECDSA signature")]
    SignatureMalformed,
    #[error("signature does not verify with any of the policy's keys")]
    UnknownKey,
}

/// One signature layer of a signature manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignatureLayer {
    /// The payload blob.
    pub payload: Digest,
    pub size: u64,
    /// The annotation as found (base64).
    signature: String,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(default)]
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    annotations: std::collections::HashMap<String, String>,
}

/// The cosign signature layers of a signature manifest (at most 32).
pub fn signature_layers(manifest: &[u8]) -> Result<Vec<SignatureLayer>, CosignError> {
    if manifest.len() > MAX_MANIFEST {
        return Err(CosignError::ManifestTooLarge(manifest.len()));
    }
    let m: Manifest = serde_json::from_slice(manifest)
        .map_err(|e| CosignError::ManifestInvalid(e.to_string()))?;
    let layers: Vec<SignatureLayer> = m
        .layers
        .into_iter()
        .filter(|l| l.media_type == SIMPLESIGNING)
        .filter_map(|l| {
            let signature = l.annotations.get(SIGNATURE_ANNOTATION)?.clone();
            let payload = l.digest.parse::<Digest>().ok()?;
            Some(SignatureLayer {
                payload,
                size: l.size,
                signature,
            })
        })
        .take(MAX_LAYERS)
        .collect();
    if layers.is_empty() {
        return Err(CosignError::NoSignatureLayer);
    }
    Ok(layers)
}

#[derive(Deserialize)]
struct Payload {
    critical: Critical,
}

#[derive(Deserialize)]
struct Critical {
    image: PayloadImage,
    #[serde(rename = "type")]
    kind: String,
}

#[derive(Deserialize)]
struct PayloadImage {
    #[serde(rename = "docker-manifest-digest")]
    digest: String,
}

/// Checks one signature layer: `payload` (its blob, as read) hashes to the
/// layer's digest, says it signs `image`, and the signature over it
/// verifies with one of `keys`.
pub fn verify(
    layer: &SignatureLayer,
    payload: &[u8],
    image: &Digest,
    keys: &[VerifyingKey],
) -> Result<(), CosignError> {
    if payload.len() as u64 > MAX_PAYLOAD {
        return Err(CosignError::PayloadTooLarge(layer.payload.clone()));
    }
    if !layer.payload.matches(payload) {
        return Err(CosignError::PayloadDigest(layer.payload.clone()));
    }
    let p: Payload =
        serde_json::from_slice(payload).map_err(|e| CosignError::PayloadInvalid(e.to_string()))?;
    if p.critical.kind != SIGNATURE_TYPE {
        return Err(CosignError::WrongType(shorten(&p.critical.kind)));
    }
    if p.critical.image.digest != image.to_string() {
        return Err(CosignError::OtherImage {
            signed: shorten(&p.critical.image.digest),
            image: image.clone(),
        });
    }
    let signature = decode_signature(&layer.signature)?;
    if keys.iter().any(|k| k.verify(payload, &signature).is_ok()) {
        Ok(())
    } else {
        Err(CosignError::UnknownKey)
    }
}

/// The annotation's signature; a high S is normalised (ECDSA accepts s
/// and n - s alike, and Go's signer does not normalise).
fn decode_signature(b64: &str) -> Result<Signature, CosignError> {
    if b64.len() > MAX_SIGNATURE_B64 {
        return Err(CosignError::SignatureMalformed);
    }
    let der = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|_| CosignError::SignatureMalformed)?;
    let sig = Signature::from_der(&der).map_err(|_| CosignError::SignatureMalformed)?;
    Ok(sig.normalize_s().unwrap_or(sig))
}

/// A value from a payload, cut for messages.
fn shorten(s: &str) -> String {
    s.chars().take(100).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifests_are_bounded_and_need_a_signature_layer() {
        let big = vec![b' '; MAX_MANIFEST + 1];
        assert!(matches!(
            signature_layers(&big),
            Err(CosignError::ManifestTooLarge(_))
        ));
        assert!(matches!(
            signature_layers(
                b"{\"layers\":[{\"mediaType\":\"x\",\"digest\":\"sha256:00\",\"size\":1}]}"
            ),
            Err(CosignError::NoSignatureLayer)
        ));
        assert!(matches!(
            signature_layers(b"[1,2"),
            Err(CosignError::ManifestInvalid(_))
        ));
    }

    #[test]
    fn payload_checks_come_before_the_signature() {
        let payload = br#"{"critical":{"identity":{"docker-reference":"x"},"image":{"docker-manifest-digest":"sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"},"type":"cosign container image signature"},"optional":null}"#;
        let layer = SignatureLayer {
            payload: Digest::sha256_of(payload),
            size: payload.len() as u64,
            signature: "not base64!".into(),
        };
        let other = Digest::sha256_of(b"other");
        assert!(matches!(
            verify(&layer, payload, &other, &[]),
            Err(CosignError::OtherImage { .. })
        ));
        assert!(matches!(
            verify(&layer, b"tampered", &other, &[]),
            Err(CosignError::PayloadDigest(_))
        ));
        let image: Digest =
            "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                .parse()
                .unwrap();
        assert_eq!(
            verify(&layer, payload, &image, &[]),
            Err(CosignError::SignatureMalformed)
        );
    }
}
