//! OCI image layouts (the on-disk format `skopeo copy oci:<dir>:<tag>` reads
//! and writes) and the images, indexes and artifacts the interop tests put in
//! them. Everything is built from deterministic data, so no fixtures are
//! needed and a failure reproduces exactly.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use super::oci::{self, sha256};

/// Layer media type: uncompressed tar, so a layer's digest is its diff_id.
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// A POSIX ustar archive of regular files, as an image layer must be.
pub fn tar(entries: &[(&str, &[u8])]) -> Vec<u8> {
    fn octal(field: &mut [u8], value: u64) {
        // `width - 1` octal digits and a NUL terminator.
        let s = format!("{value:0width$o}", width = field.len() - 1);
        field[..s.len()].copy_from_slice(s.as_bytes());
        field[s.len()] = 0;
    }
    let mut out = Vec::new();
    for (name, content) in entries {
        assert!(name.len() < 100, "tar entry name too long: {name}");
        let mut h = [0u8; 512];
        h[..name.len()].copy_from_slice(name.as_bytes());
        octal(&mut h[100..108], 0o644); // mode
        octal(&mut h[108..116], 0); // uid
        octal(&mut h[116..124], 0); // gid
        octal(&mut h[124..136], content.len() as u64); // size
        octal(&mut h[136..148], 1_700_000_000); // mtime
        h[148..156].copy_from_slice(b"        "); // checksum, as spaces while summing
        h[156] = b'0'; // regular file
        h[257..263].copy_from_slice(b"ustar\0");
        h[263..265].copy_from_slice(b"00");
        h[265..269].copy_from_slice(b"root");
        h[297..301].copy_from_slice(b"root");
        let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
        let s = format!("{sum:06o}\0 ");
        h[148..156].copy_from_slice(s.as_bytes());
        out.extend_from_slice(&h);
        out.extend_from_slice(content);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0); // two zero blocks end the archive
    out
}

/// A single-platform image: config, uncompressed tar layers and manifest.
#[derive(Debug, Clone)]
pub struct Image {
    pub arch: String,
    pub config: Vec<u8>,
    pub layers: Vec<Vec<u8>>,
    /// `rootfs.diff_ids`: the digests of the uncompressed layers.
    pub diff_ids: Vec<String>,
    pub manifest: Vec<u8>,
    pub digest: String,
}

impl Image {
    /// An image for linux/`arch` with `n_layers` layers, each a tar of one
    /// file of deterministic bytes (a few KiB to ~100 KiB).
    pub fn build(seed: u64, arch: &str, n_layers: usize) -> Image {
        let layers: Vec<Vec<u8>> = (0..n_layers)
            .map(|i| {
                let s = seed * 100 + i as u64;
                let content = oci::data(s, 3000 + (s as usize * 7919) % 100_000);
                let name = format!("layer{i}/file-{seed}-{i}.bin");
                let readme = format!("layer {i} of image {seed} for {arch}\n");
                tar(&[(name.as_str(), &content), ("README", readme.as_bytes())])
            })
            .collect();
        let diff_ids: Vec<String> = layers.iter().map(|l| sha256(l)).collect();
        let config = serde_json::to_vec(&json!({
            "created": "2024-01-01T00:00:00Z",
            "architecture": arch,
            "os": "linux",
            "config": { "Env": [format!("IMAGE_SEED={seed}")], "Cmd": ["/bin/true"] },
            "rootfs": { "type": "layers", "diff_ids": diff_ids },
            "history": (0..n_layers).map(|i| json!({ "created": "2024-01-01T00:00:00Z", "created_by": format!("layer {i}") })).collect::<Vec<_>>(),
        }))
        .expect("json");
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": oci::OCI_MANIFEST,
            "config": oci::descriptor(oci::OCI_CONFIG, &config),
            "layers": layers.iter().map(|l| oci::descriptor(OCI_LAYER_TAR, l)).collect::<Vec<_>>(),
            "annotations": { "org.example.seed": seed.to_string() },
        }))
        .expect("json");
        let digest = sha256(&manifest);
        Image {
            arch: arch.to_string(),
            config,
            layers,
            diff_ids,
            manifest,
            digest,
        }
    }

    /// Config and layers (the blobs a registry must hold for the manifest).
    pub fn blobs(&self) -> Vec<&[u8]> {
        std::iter::once(self.config.as_slice())
            .chain(self.layers.iter().map(Vec::as_slice))
            .collect()
    }

    /// This image's descriptor, as an index or a `subject` refers to it.
    pub fn descriptor(&self) -> Value {
        oci::descriptor(oci::OCI_MANIFEST, &self.manifest)
    }
}

/// A multi-platform image index over linux images.
#[derive(Debug, Clone)]
pub struct Index {
    pub images: Vec<Image>,
    pub manifest: Vec<u8>,
    pub digest: String,
}

impl Index {
    pub fn build(images: Vec<Image>) -> Index {
        let manifests: Vec<Value> = images
            .iter()
            .map(|img| {
                let mut d = img.descriptor();
                d["platform"] = json!({ "architecture": img.arch, "os": "linux" });
                d
            })
            .collect();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": oci::OCI_INDEX,
            "manifests": manifests,
        }))
        .expect("json");
        let digest = sha256(&manifest);
        Index {
            images,
            manifest,
            digest,
        }
    }
}

/// An OCI artifact manifest (empty config, one layer) referring to a subject.
#[derive(Debug, Clone)]
pub struct Artifact {
    pub artifact_type: String,
    pub config: Vec<u8>,
    pub layer: Vec<u8>,
    pub layer_media_type: String,
    pub manifest: Vec<u8>,
    pub digest: String,
}

impl Artifact {
    pub fn build(
        artifact_type: &str,
        layer_media_type: &str,
        layer: Vec<u8>,
        subject: &Image,
    ) -> Artifact {
        let config = b"{}".to_vec();
        let mut config_desc = oci::descriptor(OCI_EMPTY, &config);
        config_desc["data"] = json!("e30=");
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": oci::OCI_MANIFEST,
            "artifactType": artifact_type,
            "config": config_desc,
            "layers": [oci::descriptor(layer_media_type, &layer)],
            "subject": subject.descriptor(),
            "annotations": { "org.opencontainers.image.created": "2024-01-01T00:00:00Z" },
        }))
        .expect("json");
        let digest = sha256(&manifest);
        Artifact {
            artifact_type: artifact_type.to_string(),
            config,
            layer,
            layer_media_type: layer_media_type.to_string(),
            manifest,
            digest,
        }
    }
}

/// An OCI image layout directory.
pub struct OciLayout {
    pub dir: PathBuf,
}

impl OciLayout {
    /// Creates an empty layout at `dir`.
    pub fn create(dir: &Path) -> OciLayout {
        std::fs::create_dir_all(dir.join("blobs/sha256")).expect("create layout");
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .expect("oci-layout");
        let l = OciLayout {
            dir: dir.to_path_buf(),
        };
        l.write_index(&json!({ "schemaVersion": 2, "manifests": [] }));
        l
    }

    /// A layout some other program wrote (e.g. `skopeo copy ... oci:<dir>`).
    pub fn open(dir: &Path) -> OciLayout {
        assert!(
            dir.join("oci-layout").is_file(),
            "{} is not an OCI layout",
            dir.display()
        );
        OciLayout {
            dir: dir.to_path_buf(),
        }
    }

    /// The argument skopeo takes for `ref_name` in this layout.
    pub fn reference(&self, ref_name: &str) -> String {
        format!("oci:{}:{ref_name}", self.dir.display())
    }

    fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").expect("sha256 digest");
        self.dir.join("blobs/sha256").join(hex)
    }

    pub fn add_blob(&self, bytes: &[u8]) -> String {
        let digest = sha256(bytes);
        std::fs::write(self.blob_path(&digest), bytes).expect("write blob");
        digest
    }

    pub fn add_image(&self, img: &Image) {
        for b in img.blobs() {
            self.add_blob(b);
        }
        self.add_blob(&img.manifest);
    }

    pub fn add_index(&self, index: &Index) {
        for img in &index.images {
            self.add_image(img);
        }
        self.add_blob(&index.manifest);
    }

    pub fn add_artifact(&self, a: &Artifact) {
        self.add_blob(&a.config);
        self.add_blob(&a.layer);
        self.add_blob(&a.manifest);
    }

    fn index(&self) -> Value {
        let bytes = std::fs::read(self.dir.join("index.json")).expect("read index.json");
        serde_json::from_slice(&bytes).expect("index.json is JSON")
    }

    fn write_index(&self, index: &Value) {
        std::fs::write(
            self.dir.join("index.json"),
            serde_json::to_vec(index).expect("json"),
        )
        .expect("index.json");
    }

    /// Names a manifest (already added as a blob) `ref_name` in index.json.
    pub fn tag(&self, media_type: &str, manifest: &[u8], ref_name: &str) {
        assert!(
            self.blob_path(&sha256(manifest)).is_file(),
            "tag a manifest that is in the layout"
        );
        let mut index = self.index();
        let mut d = oci::descriptor(media_type, manifest);
        d["annotations"] = json!({ REF_NAME: ref_name });
        index["manifests"]
            .as_array_mut()
            .expect("manifests array")
            .push(d);
        self.write_index(&index);
    }

    /// The descriptor index.json gives `ref_name`: (mediaType, digest, size).
    pub fn resolve(&self, ref_name: &str) -> Option<(String, String, u64)> {
        let index = self.index();
        index["manifests"].as_array()?.iter().find_map(|d| {
            (d["annotations"][REF_NAME].as_str() == Some(ref_name)).then(|| {
                (
                    d["mediaType"].as_str().unwrap_or_default().to_string(),
                    d["digest"].as_str().unwrap_or_default().to_string(),
                    d["size"].as_u64().unwrap_or_default(),
                )
            })
        })
    }

    pub fn blob(&self, digest: &str) -> Option<Vec<u8>> {
        std::fs::read(self.blob_path(digest)).ok()
    }

    /// Every blob file, by digest (as named on disk).
    pub fn blobs(&self) -> BTreeMap<String, Vec<u8>> {
        let mut out = BTreeMap::new();
        for entry in std::fs::read_dir(self.dir.join("blobs/sha256")).expect("blobs dir") {
            let entry = entry.expect("dir entry");
            let name = entry.file_name().to_string_lossy().to_string();
            out.insert(
                format!("sha256:{name}"),
                std::fs::read(entry.path()).expect("read blob"),
            );
        }
        out
    }
}
