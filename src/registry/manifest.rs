//! Manifest validation and indexing.
//!
//! Manifests are stored byte for byte as pushed; this module only reads the
//! fields the registry must check (referenced blobs and child manifests) or
//! index (subject, artifact type, annotations). It deliberately parses with a
//! lenient struct of its own rather than the full `oci-spec` types: those
//! reject valid Docker schema 2 documents and artifact manifests with
//! unfamiliar media types, and a registry must accept anything well formed.

use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::RegistryError;
use crate::meta::{ManifestRef, RefKind};
use crate::oci::Digest;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_SCHEMA1: &[&str] = &[
    "application/vnd.docker.distribution.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
];

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: Option<i64>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<RawDescriptor>,
    layers: Option<Vec<RawDescriptor>>,
    manifests: Option<Vec<RawDescriptor>>,
    subject: Option<RawDescriptor>,
    annotations: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawDescriptor {
    media_type: Option<String>,
    digest: String,
    size: i64,
    #[serde(default)]
    urls: Vec<String>,
}

/// Whether a manifest lists layers (an image or artifact) or other manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Image,
    Index,
}

/// What the registry needs to know about a pushed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedManifest {
    pub media_type: String,
    pub kind: Kind,
    /// Blobs (config and layers) that must be in the repository.
    pub blobs: Vec<Digest>,
    /// Child manifests (of an index) that must be in the repository.
    pub children: Vec<Digest>,
    /// `blobs` and `children` with the sizes their descriptors state, as
    /// the metadata store records them.
    pub refs: Vec<ManifestRef>,
    pub subject: Option<Digest>,
    /// `artifactType`, or for an image manifest without one, its config's
    /// media type (what the referrers API reports).
    pub artifact_type: Option<String>,
    /// `annotations`, re-serialised, for the referrers API.
    pub annotations: Option<String>,
}

fn invalid(msg: impl Into<String>) -> RegistryError {
    RegistryError::ManifestInvalid(msg.into())
}

/// The media type part of a `Content-Type` header, without parameters.
pub fn essence(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

fn descriptor_digest(d: &RawDescriptor, field: &str) -> Result<Digest, RegistryError> {
    descriptor(d, field).map(|(digest, _)| digest)
}

/// A descriptor's digest and size, checked.
fn descriptor(d: &RawDescriptor, field: &str) -> Result<(Digest, u64), RegistryError> {
    let size = u64::try_from(d.size)
        .map_err(|_| invalid(format!("{field} descriptor has a negative size")))?;
    let digest = d
        .digest
        .parse()
        .map_err(|e| invalid(format!("{field} descriptor: {e}")))?;
    Ok((digest, size))
}

/// Parses and checks a manifest body. `content_type` is the request's
/// `Content-Type` header, if any.
pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<ParsedManifest, RegistryError> {
    let raw: RawManifest = serde_json::from_slice(bytes).map_err(|e| {
        invalid(format!(
            "the body is not a valid manifest JSON document: {e}"
        ))
    })?;
    let header_type = content_type.map(essence).filter(|t| !t.is_empty());

    if raw.schema_version == Some(1) || header_type.is_some_and(|t| DOCKER_SCHEMA1.contains(&t)) {
        return Err(invalid(
            "Docker schema 1 manifests are not supported; push with a current client, which \
             sends schema 2 or OCI manifests",
        ));
    }
    if raw.schema_version != Some(2) {
        return Err(invalid("schemaVersion must be 2"));
    }

    let media_type = match (raw.media_type.as_deref(), header_type) {
        (Some(body), Some(header)) if body != header => {
            return Err(invalid(format!(
                "Content-Type `{header}` does not match the manifest's mediaType `{body}`"
            )))
        }
        (Some(body), _) => body.to_string(),
        (None, Some(header)) => header.to_string(),
        // The OCI spec lets mediaType be omitted; infer it from the shape.
        (None, None) if raw.manifests.is_some() => OCI_INDEX.to_string(),
        (None, None) => OCI_MANIFEST.to_string(),
    };

    let kind = match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => Kind::Image,
        OCI_INDEX | DOCKER_MANIFEST_LIST => Kind::Index,
        other => {
            return Err(invalid(format!(
                "unsupported manifest media type `{other}`; use {OCI_MANIFEST}, {OCI_INDEX}, \
                 {DOCKER_MANIFEST} or {DOCKER_MANIFEST_LIST}"
            )))
        }
    };

    let subject = raw
        .subject
        .as_ref()
        .map(|s| descriptor_digest(s, "subject"))
        .transpose()?;
    let annotations = raw
        .annotations
        .as_ref()
        .map(|a| serde_json::to_string(a).unwrap_or_default());

    let mut blobs = Vec::new();
    let mut children = Vec::new();
    let artifact_type = match kind {
        Kind::Image => {
            let config = raw
                .config
                .as_ref()
                .ok_or_else(|| invalid("an image manifest must have a config descriptor"))?;
            blobs.push(descriptor(config, "config")?);
            let layers = raw
                .layers
                .as_ref()
                .ok_or_else(|| invalid("an image manifest must have a layers array"))?;
            for layer in layers {
                let layer_ref = descriptor(layer, "layer")?;
                // Foreign (non-distributable) layers are fetched from their
                // URLs, not from us, so they need not be pushed.
                if layer.urls.is_empty() {
                    blobs.push(layer_ref);
                }
            }
            raw.artifact_type
                .clone()
                .or_else(|| config.media_type.clone())
        }
        Kind::Index => {
            let manifests = raw
                .manifests
                .as_ref()
                .ok_or_else(|| invalid("an index must have a manifests array"))?;
            for m in manifests {
                children.push(descriptor(m, "manifests")?);
            }
            raw.artifact_type.clone()
        }
    };
    let mut refs: Vec<ManifestRef> = Vec::new();
    for (descriptors, kind) in [
        (&mut blobs, RefKind::Blob),
        (&mut children, RefKind::Manifest),
    ] {
        descriptors.sort_by_key(|(d, _)| d.to_string());
        descriptors.dedup_by(|a, b| a.0 == b.0);
        refs.extend(descriptors.iter().map(|(digest, size)| ManifestRef {
            digest: digest.clone(),
            size: *size,
            kind,
        }));
    }
    let blobs = blobs.into_iter().map(|(d, _)| d).collect();
    let children = children.into_iter().map(|(d, _)| d).collect();

    Ok(ParsedManifest {
        media_type,
        kind,
        blobs,
        children,
        refs,
        subject,
        artifact_type,
        annotations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn image(extra: &str) -> String {
        format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}",
               "config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{D1}","size":2}},
               "layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{D2}","size":3}}]{extra}}}"#
        )
    }

    #[test]
    fn image_manifest() {
        let m = parse(image("").as_bytes(), Some(OCI_MANIFEST)).unwrap();
        assert_eq!(m.kind, Kind::Image);
        assert_eq!(m.blobs.len(), 2);
        assert!(m.subject.is_none());
        assert_eq!(
            m.artifact_type.as_deref(),
            Some("application/vnd.oci.image.config.v1+json")
        );
    }

    #[test]
    fn artifact_with_subject() {
        let extra = format!(
            r#","artifactType":"application/x.sig","subject":{{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":10}},"annotations":{{"a":"b"}}"#
        );
        let m = parse(image(&extra).as_bytes(), None).unwrap();
        assert_eq!(m.subject.unwrap().to_string(), D1);
        assert_eq!(m.artifact_type.as_deref(), Some("application/x.sig"));
        assert_eq!(m.annotations.as_deref(), Some(r#"{"a":"b"}"#));
    }

    #[test]
    fn index() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[{{"mediaType":"{OCI_MANIFEST}","digest":"{D1}","size":5}}]}}"#
        );
        let m = parse(body.as_bytes(), Some(OCI_INDEX)).unwrap();
        assert_eq!(m.kind, Kind::Index);
        assert_eq!(m.children.len(), 1);
        assert!(m.blobs.is_empty());
    }

    #[test]
    fn content_type_must_match() {
        assert!(parse(image("").as_bytes(), Some(DOCKER_MANIFEST)).is_err());
        assert!(parse(
            image("").as_bytes(),
            Some(&format!("{OCI_MANIFEST}; charset=utf-8"))
        )
        .is_ok());
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            "not json",
            "[]",
            r#"{"schemaVersion":1}"#,
            r#"{"schemaVersion":2}"#,
            r#"{"schemaVersion":2,"mediaType":"application/x.unknown"}"#,
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"digest":"sha256:zz","size":1},"layers":[]}"#,
        ] {
            assert!(parse(bad.as_bytes(), None).is_err(), "{bad}");
        }
    }
}
