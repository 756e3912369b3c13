//! Download workloads: blob GETs of fixed sizes at several concurrencies, a
//! size mix resembling real image layers, and pulls mixed with pushes.
//!
//! Every pre-pushed blob is hashed in full the first time it is read back,
//! so a registry that serves wrong bytes fails the run instead of looking
//! fast.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use futures_util::future::try_join_all;

use super::{result, run_workers, Ctx, OpOutcome, Probe, FAMILY_MIXED_PUSH, FAMILY_PULL};
use crate::client::{repo_scope, Access, Payload};
use crate::data::mix64;
use crate::params;
use crate::units::format_size;
use crate::Workload;

/// pull-mixed: (size, percent) — many small layers, mostly medium, a few big.
const MIX: [(u64, u64); 3] = [(1 << 20, 20), (10 << 20, 70), (100 << 20, 10)];
/// Percentage of mixed-rw operations that are pulls.
const MIXED_RW_PULL_PCT: u64 = 75;

/// A blob already in the registry.
pub struct PullBlob {
    repo: String,
    digest: String,
    size: u64,
    /// Set by the first reader, which then hashes what it reads.
    claimed: AtomicBool,
}

/// The pre-pushed blobs of one run, shared by pull, pull-mixed and mixed-rw.
pub struct PullSet {
    /// Ascending by size; `--pull-blobs` blobs of each size.
    by_size: Vec<(u64, Vec<Arc<PullBlob>>)>,
}

impl PullSet {
    fn blobs(&self, size: u64) -> Result<&[Arc<PullBlob>]> {
        self.by_size
            .iter()
            .find(|(s, _)| *s == size)
            .map(|(_, b)| b.as_slice())
            .with_context(|| format!("no pre-pushed blobs of {}", format_size(size)))
    }
}

/// Pushes (once per run, untimed) the blobs the pull workloads read.
async fn pull_set(ctx: &Arc<Ctx>) -> Result<Arc<PullSet>> {
    ctx.pull_set
        .get_or_try_init(|| async {
            let mut sizes: BTreeSet<u64> = ctx.args.pull_sizes.iter().map(|s| s.0).collect();
            // The mix's sizes only when a mixed workload is part of this run.
            let mixed = ctx
                .args
                .workload
                .iter()
                .any(|w| matches!(w, Workload::All | Workload::PullMixed | Workload::MixedRw));
            if mixed {
                sizes.extend(MIX.iter().map(|(s, _)| *s));
            }
            let repo = ctx.repo("pull");
            let n = ctx.args.pull_blobs.max(1);
            eprintln!(
                "trow-bench: pre-pushing {n} blob(s) each of {} for pulls",
                sizes
                    .iter()
                    .map(|s| format_size(*s))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let mut by_size = Vec::new();
            for size in sizes {
                let fam = FAMILY_PULL ^ size;
                let pushes = (0..n).map(|i| {
                    let repo = repo.clone();
                    async move {
                        let spec = ctx.data.blob(fam, i, size);
                        let digest = ctx.data.digest(&spec);
                        ctx.reg
                            .push_monolithic(&repo, &Payload::Blob(spec), &digest)
                            .await
                            .with_context(|| format!("pre-pushing {}", format_size(size)))?;
                        Ok::<_, anyhow::Error>(Arc::new(PullBlob {
                            repo,
                            digest,
                            size,
                            claimed: AtomicBool::new(false),
                        }))
                    }
                });
                by_size.push((size, try_join_all(pushes).await?));
            }
            ctx.reg.prefetch(&repo_scope(&repo, Access::Pull)).await?;
            Ok(Arc::new(PullSet { by_size }))
        })
        .await
        .cloned()
}

/// GETs one blob, checking its length always and its digest on first read.
async fn fetch(ctx: &Ctx, b: &PullBlob) -> Result<OpOutcome> {
    let verify = !b.claimed.swap(true, Ordering::Relaxed);
    let f = ctx.reg.get_blob(&b.repo, &b.digest, verify).await?;
    if f.bytes != b.size {
        bail!(
            "blob {} returned {} bytes, expected {}",
            b.digest,
            f.bytes,
            b.size
        );
    }
    if let Some(d) = f.digest {
        if d != b.digest {
            bail!("blob {} read back with digest {d}", b.digest);
        }
    }
    Ok(OpOutcome {
        bytes: f.bytes,
        ttfb: Some(f.ttfb),
        kind: "pull",
    })
}

/// Picks a blob size per [`MIX`] from a roll in 0..100.
fn mix_size(roll: u64) -> u64 {
    let mut acc = 0;
    for (size, pct) in MIX {
        acc += pct;
        if roll < acc {
            return size;
        }
    }
    MIX[MIX.len() - 1].0
}

/// pull: each `--pull-sizes` at each `--concurrency`.
pub async fn pull(ctx: &Arc<Ctx>) -> Result<()> {
    let set = pull_set(ctx).await?;
    for size in ctx.args.pull_sizes.iter().map(|s| s.0) {
        for &c in &ctx.args.concurrency {
            let blobs: Arc<Vec<Arc<PullBlob>>> = Arc::new(set.blobs(size)?.to_vec());
            let probe = Probe::start(ctx);
            let c2 = ctx.clone();
            let (tally, elapsed) = run_workers(c, ctx.limiter(), move |w, i| {
                let (ctx, blobs) = (c2.clone(), blobs.clone());
                async move {
                    let b = &blobs[(w as u64 + i) as usize % blobs.len()];
                    fetch(&ctx, b).await
                }
            })
            .await;
            let case = format!("pull size={} c={c}", format_size(size));
            let params = params! {"size" => format_size(size), "concurrency" => c};
            let mut r = result(ctx, "pull", case, params, &tally, elapsed, "mib_per_s");
            probe.finish(&mut r);
            ctx.emit(r);
        }
    }
    Ok(())
}

/// pull-mixed: sizes drawn 20/70/10 from 1/10/100 MiB at each concurrency.
pub async fn pull_mixed(ctx: &Arc<Ctx>) -> Result<()> {
    let set = pull_set(ctx).await?;
    for &c in &ctx.args.concurrency {
        let probe = Probe::start(ctx);
        let (c2, s2) = (ctx.clone(), set.clone());
        let seed = ctx.args.seed;
        let (tally, elapsed) = run_workers(c, ctx.limiter(), move |_, i| {
            let (ctx, set) = (c2.clone(), s2.clone());
            async move {
                let r = mix64(seed ^ i);
                let blobs = set.blobs(mix_size(r % 100))?;
                let b = &blobs[((r >> 32) % blobs.len() as u64) as usize];
                fetch(&ctx, b).await
            }
        })
        .await;
        let case = format!("pull-mixed c={c}");
        let params = params! {"mix" => "20% 1MiB, 70% 10MiB, 10% 100MiB", "concurrency" => c};
        let mut r = result(
            ctx,
            "pull-mixed",
            case,
            params,
            &tally,
            elapsed,
            "mib_per_s",
        );
        probe.finish(&mut r);
        ctx.emit(r);
    }
    Ok(())
}

/// mixed-rw: 75 % pulls (sizes as pull-mixed) and 25 % monolithic pushes of
/// fresh `--mixed-push-size` blobs, at `--mixed-concurrency`.
pub async fn mixed_rw(ctx: &Arc<Ctx>) -> Result<()> {
    let set = pull_set(ctx).await?;
    let c = ctx.args.mixed_concurrency;
    let push_size = ctx.args.mixed_push_size.0;
    let push_repo = Arc::new(ctx.repo("mixed-rw"));
    let fam = FAMILY_MIXED_PUSH ^ push_size;
    // Warm the digest cache: each push then hashes only its tail.
    let _ = ctx.data.digest(&ctx.data.blob(fam, u64::MAX, push_size));
    ctx.reg
        .prefetch(&repo_scope(&push_repo, Access::Push))
        .await?;
    let seed = ctx.args.seed;
    let probe = Probe::start(ctx);
    let (c2, s2) = (ctx.clone(), set.clone());
    let (tally, elapsed) = run_workers(c, ctx.limiter(), move |_, i| {
        let (ctx, set, repo) = (c2.clone(), s2.clone(), push_repo.clone());
        async move {
            let r = mix64(seed ^ i ^ 0x5eed_0f4d);
            if r % 100 < MIXED_RW_PULL_PCT {
                let blobs = set.blobs(mix_size((r >> 8) % 100))?;
                let b = &blobs[((r >> 32) % blobs.len() as u64) as usize];
                fetch(&ctx, b).await
            } else {
                let spec = ctx.data.blob(fam, i, push_size);
                let digest = ctx.data.digest(&spec);
                ctx.reg
                    .push_monolithic(&repo, &Payload::Blob(spec), &digest)
                    .await?;
                Ok(OpOutcome {
                    bytes: push_size,
                    ttfb: None,
                    kind: "push",
                })
            }
        }
    })
    .await;
    let case = format!("mixed-rw c={c}");
    let params = params! {
        "pull_pct" => MIXED_RW_PULL_PCT,
        "push_size" => format_size(push_size),
        "concurrency" => c,
    };
    let mut r = result(ctx, "mixed-rw", case, params, &tally, elapsed, "mib_per_s");
    for (kind, lat) in &tally.by_kind {
        r.extra.insert(format!("{kind}_ops"), lat.count().into());
        r.extra.insert(format!("{kind}_p50_ms"), lat.ms(0.5).into());
        r.extra
            .insert(format!("{kind}_p99_ms"), lat.ms(0.99).into());
    }
    probe.finish(&mut r);
    ctx.emit(r);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_follows_percentages() {
        let mut counts = [0u64; 3];
        for i in 0..10_000u64 {
            let s = mix_size(mix64(i) % 100);
            let idx = MIX.iter().position(|(m, _)| *m == s).unwrap();
            counts[idx] += 1;
        }
        assert!((1800..2200).contains(&counts[0]), "{counts:?}");
        assert!((6700..7300).contains(&counts[1]), "{counts:?}");
        assert!((800..1200).contains(&counts[2]), "{counts:?}");
    }
}
