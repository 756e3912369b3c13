//! Upload workloads: monolithic and chunked pushes of large blobs (MiB/s),
//! and many tiny blobs at once (ops/s), which stresses per-upload overhead
//! (session bookkeeping, fsyncs, renames) rather than bandwidth.

use std::sync::Arc;

use anyhow::Result;

use super::{
    result, run_workers, Ctx, Limiter, OpOutcome, Probe, FAMILY_PUSH_CHUNKED, FAMILY_PUSH_MONO,
    FAMILY_SMALL,
};
use crate::client::{repo_scope, Access, Payload};
use crate::data::BlobSpec;
use crate::params;
use crate::units::format_size;

/// Pushes per size when `--requests` is not given: enough bytes (about
/// 512 MiB) for a stable figure, at least one push, at most 32.
fn default_push_count(size: u64) -> u64 {
    ((512u64 << 20) / size.max(1)).clamp(1, 32)
}

/// push-mono / push-chunked: for each `--sizes`, push fresh blobs one after
/// another (or `--push-concurrency` at a time) and report MiB/s.
pub async fn push_sizes(ctx: &Arc<Ctx>, chunked: bool) -> Result<()> {
    let (workload, family) = if chunked {
        ("push-chunked", FAMILY_PUSH_CHUNKED)
    } else {
        ("push-mono", FAMILY_PUSH_MONO)
    };
    let repo = Arc::new(ctx.repo(workload));
    for &size in &ctx.args.sizes {
        let size = size.0;
        let count = ctx
            .args
            .requests
            .unwrap_or_else(|| default_push_count(size));
        // Digests first (the first pass over the seeded stream), untimed.
        let fam = family ^ size;
        let blobs: Arc<Vec<(BlobSpec, String)>> = Arc::new(
            (0..count)
                .map(|i| {
                    let s = ctx.data.blob(fam, i, size);
                    let d = ctx.data.digest(&s);
                    (s, d)
                })
                .collect(),
        );
        let chunk = ctx.args.chunk_size.0;
        ctx.reg.prefetch(&repo_scope(&repo, Access::Push)).await?;
        let probe = Probe::start(ctx);
        let (c2, r2, b2) = (ctx.clone(), repo.clone(), blobs.clone());
        let (tally, elapsed) = run_workers(
            ctx.args.push_concurrency,
            Limiter::count(count),
            move |_, i| {
                let (ctx, repo, blobs) = (c2.clone(), r2.clone(), b2.clone());
                async move {
                    let (spec, digest) = &blobs[i as usize];
                    let payload = Payload::Blob(spec.clone());
                    if chunked {
                        ctx.reg.push_chunked(&repo, &payload, digest, chunk).await?;
                    } else {
                        ctx.reg.push_monolithic(&repo, &payload, digest).await?;
                    }
                    Ok(OpOutcome::bytes(size))
                }
            },
        )
        .await;
        let mut params = params! {
            "size" => format_size(size),
            "count" => count,
            "concurrency" => ctx.args.push_concurrency,
        };
        let mut case = format!("{workload} size={}", format_size(size));
        if chunked {
            params.insert("chunk".into(), format_size(chunk).into());
        }
        if ctx.args.push_concurrency > 1 {
            case.push_str(&format!(" c={}", ctx.args.push_concurrency));
        }
        let mut r = result(ctx, workload, case, params, &tally, elapsed, "mib_per_s");
        probe.finish(&mut r);
        ctx.emit(r);
    }
    Ok(())
}

/// small-blobs: `--clients` clients each pushing `--small-size` blobs
/// monolithically (POST + PUT) until the duration or count runs out.
pub async fn small_blobs(ctx: &Arc<Ctx>) -> Result<()> {
    let repo = Arc::new(ctx.repo("small-blobs"));
    let size = ctx.args.small_size.0;
    // Warm the digest cache so that per-blob digests cost only the tail.
    let _ = ctx
        .data
        .digest(&ctx.data.blob(FAMILY_SMALL, u64::MAX, size));
    let clients = ctx.args.clients;
    ctx.reg.prefetch(&repo_scope(&repo, Access::Push)).await?;
    let probe = Probe::start(ctx);
    let c2 = ctx.clone();
    let (tally, elapsed) = run_workers(clients, ctx.limiter(), move |_, i| {
        let (ctx, repo) = (c2.clone(), repo.clone());
        async move {
            let spec = ctx.data.blob(FAMILY_SMALL, i, size);
            let digest = ctx.data.digest(&spec);
            ctx.reg
                .push_monolithic(&repo, &Payload::Blob(spec), &digest)
                .await?;
            Ok(OpOutcome::bytes(size))
        }
    })
    .await;
    let case = format!("small-blobs size={} c={clients}", format_size(size));
    let params = params! {"size" => format_size(size), "concurrency" => clients};
    let mut r = result(
        ctx,
        "small-blobs",
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_counts_are_bounded() {
        assert_eq!(default_push_count(1 << 20), 32);
        assert_eq!(default_push_count(100 << 20), 5);
        assert_eq!(default_push_count(1 << 30), 1);
        assert_eq!(default_push_count(0), 32);
    }
}
