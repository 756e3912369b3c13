//! Manifest workloads: many distinct manifest PUTs (what CI pipelines tagging
//! builds do) and GET/HEAD by tag at high concurrency (what every node does
//! before deciding whether to pull).

use std::sync::Arc;

use anyhow::{bail, Result};
use bytes::Bytes;
use serde_json::json;

use super::{result, run_workers, Ctx, OpOutcome, Probe, FAMILY_IMAGE};
use crate::client::{repo_scope, Access, Payload, OCI_CONFIG, OCI_LAYER, OCI_MANIFEST};
use crate::params;

/// Size of the one layer of the fixture image.
const LAYER_SIZE: u64 = 4096;

/// A config and a layer already in a repository, to be referenced by
/// manifests.
#[derive(Clone)]
pub struct Image {
    pub repo: String,
    pub config: (String, u64, Payload),
    pub layer: (String, u64, Payload),
}

/// Pushes a small config and layer into `repo` (untimed fixture).
pub async fn seed_image(ctx: &Ctx, repo: &str) -> Result<Image> {
    let layer_spec = ctx.data.blob(FAMILY_IMAGE, 0, LAYER_SIZE);
    let layer_digest = ctx.data.digest(&layer_spec);
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [layer_digest]},
        "config": {},
    });
    let config = Bytes::from(serde_json::to_vec(&config)?);
    let config_digest = crate::data::sha256_digest(&config);
    let config_len = config.len() as u64;
    let config = Payload::Bytes(config);
    let layer = Payload::Blob(layer_spec);
    ctx.reg
        .push_monolithic(repo, &config, &config_digest)
        .await?;
    ctx.reg.push_monolithic(repo, &layer, &layer_digest).await?;
    Ok(Image {
        repo: repo.to_string(),
        config: (config_digest, config_len, config),
        layer: (layer_digest, LAYER_SIZE, layer),
    })
}

/// An OCI image manifest for `img`; `index` goes into an annotation so that
/// every manifest (and so its digest) is distinct.
pub fn manifest(img: &Image, index: u64) -> Bytes {
    let m = json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": img.config.0, "size": img.config.1},
        "layers": [{"mediaType": OCI_LAYER, "digest": img.layer.0, "size": img.layer.1}],
        "annotations": {"org.trow.bench.index": index.to_string()},
    });
    // Serialising a json! value of strings and numbers cannot fail.
    Bytes::from(serde_json::to_vec(&m).unwrap_or_default())
}

/// manifests-push: `--clients` clients PUT distinct manifests under distinct
/// tags.
pub async fn manifests_push(ctx: &Arc<Ctx>) -> Result<()> {
    let repo = ctx.repo("manifests");
    let img = Arc::new(seed_image(ctx, &repo).await?);
    let clients = ctx.args.clients;
    let probe = Probe::start(ctx);
    let c2 = ctx.clone();
    let (tally, elapsed) = run_workers(clients, ctx.limiter(), move |_, i| {
        let (ctx, img) = (c2.clone(), img.clone());
        async move {
            let body = manifest(&img, i);
            ctx.reg
                .put_manifest(&img.repo, &format!("t{i}"), &body)
                .await?;
            Ok(OpOutcome::bytes(body.len() as u64))
        }
    })
    .await;
    let case = format!("manifests-push c={clients}");
    let params = params! {"concurrency" => clients};
    let mut r = result(
        ctx,
        "manifests-push",
        case,
        params,
        &tally,
        elapsed,
        "ops_per_s",
    );
    probe.finish(&mut r);
    ctx.emit(r);
    Ok(())
}

/// manifest-get: GET, then HEAD, of one tag at `--get-concurrency`.
pub async fn manifest_get(ctx: &Arc<Ctx>) -> Result<()> {
    let repo = ctx.repo("manifest-get");
    let img = seed_image(ctx, &repo).await?;
    let body = manifest(&img, 0);
    ctx.reg.put_manifest(&repo, "latest", &body).await?;
    let expected = body.len() as u64;
    let c = ctx.args.get_concurrency;
    ctx.reg.prefetch(&repo_scope(&repo, Access::Pull)).await?;
    let repo = Arc::new(repo);
    for head in [false, true] {
        let probe = Probe::start(ctx);
        let (c2, r2) = (ctx.clone(), repo.clone());
        let (tally, elapsed) = run_workers(c, ctx.limiter(), move |_, _| {
            let (ctx, repo) = (c2.clone(), r2.clone());
            async move {
                let f = ctx.reg.get_manifest(&repo, "latest", head).await?;
                if !head && f.bytes != expected {
                    bail!(
                        "manifest GET returned {} bytes, expected {expected}",
                        f.bytes
                    );
                }
                Ok(OpOutcome {
                    bytes: f.bytes,
                    ttfb: (!head).then_some(f.ttfb),
                    kind: "",
                })
            }
        })
        .await;
        let name = if head {
            "manifest-head"
        } else {
            "manifest-get"
        };
        let case = format!("{name} c={c}");
        let params = params! {"concurrency" => c, "method" => if head { "HEAD" } else { "GET" }};
        let mut r = result(ctx, name, case, params, &tally, elapsed, "ops_per_s");
        probe.finish(&mut r);
        ctx.emit(r);
    }
    Ok(())
}
