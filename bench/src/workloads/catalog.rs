//! Listing workloads: full pagination of `/v2/_catalog` over thousands of
//! repositories and of `tags/list` over a repository with many tags, as
//! mirroring tools and UIs do. The figure is the time for a whole listing;
//! per-page latency shows whether pages get slower further in.

use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use reqwest::Url;
use serde_json::Value;

use super::manifest::{manifest, seed_image};
use super::{result, run_workers, Ctx, Limiter, OpOutcome, Probe, Tally};
use crate::client::{repo_scope, Access, CATALOG_SCOPE};
use crate::params;
use crate::report::WorkloadResult;
use crate::stats::Lat;

/// Guard against a registry whose `next` links never end.
const MAX_PAGES: usize = 100_000;

/// Seeds `--repos` repositories (one manifest each) and one repository with
/// `--tags` tags, in parallel and untimed, then times the listings.
pub async fn catalog(ctx: &Arc<Ctx>) -> Result<()> {
    let src = ctx.repo("catalog-src");
    let img = Arc::new(seed_image(ctx, &src).await?);
    let body = manifest(&img, 0);

    // Every repository mounts the same config and layer (falling back to an
    // upload if the registry does not mount) and gets one manifest.
    let repos = ctx.args.repos as u64;
    let t0 = Instant::now();
    let (c2, i2, b2) = (ctx.clone(), img.clone(), body.clone());
    let (repo_seed, _) = run_workers(ctx.args.clients, Limiter::count(repos), move |_, i| {
        let (ctx, img, body) = (c2.clone(), i2.clone(), b2.clone());
        async move {
            let repo = ctx.repo(&format!("cat/r{i:05}"));
            let (cd, _, cp) = &img.config;
            let (ld, _, lp) = &img.layer;
            ctx.reg.mount_or_push(&repo, &img.repo, cp, cd).await?;
            ctx.reg.mount_or_push(&repo, &img.repo, lp, ld).await?;
            ctx.reg.put_manifest(&repo, "v1", &body).await?;
            Ok(OpOutcome::bytes(0))
        }
    })
    .await;
    let repo_seed_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "trow-bench: seeded {} repositories in {repo_seed_s:.1}s ({} errors)",
        repo_seed.ops, repo_seed.errors
    );

    let tag_repo = Arc::new(ctx.repo("tags"));
    let (cd, _, cp) = &img.config;
    let (ld, _, lp) = &img.layer;
    ctx.reg.mount_or_push(&tag_repo, &img.repo, cp, cd).await?;
    ctx.reg.mount_or_push(&tag_repo, &img.repo, lp, ld).await?;
    let tags = ctx.args.tags as u64;
    let t0 = Instant::now();
    let (c2, r2, b2) = (ctx.clone(), tag_repo.clone(), body.clone());
    let (tag_seed, _) = run_workers(ctx.args.clients, Limiter::count(tags), move |_, i| {
        let (ctx, repo, body) = (c2.clone(), r2.clone(), b2.clone());
        async move {
            ctx.reg
                .put_manifest(&repo, &format!("t{i:05}"), &body)
                .await?;
            Ok(OpOutcome::bytes(0))
        }
    })
    .await;
    let tag_seed_s = t0.elapsed().as_secs_f64();
    eprintln!(
        "trow-bench: seeded {} tags in {tag_seed_s:.1}s ({} errors)",
        tag_seed.ops, tag_seed.errors
    );

    let n = ctx.args.page_size;
    ctx.reg.prefetch(CATALOG_SCOPE).await?;
    ctx.reg
        .prefetch(&repo_scope(&tag_repo, Access::Pull))
        .await?;
    let mut r = list_all(
        ctx,
        ("catalog-list", format!("catalog-list repos={repos} n={n}")),
        ctx.reg.catalog_url(n)?,
        CATALOG_SCOPE.to_string(),
        repos as usize,
    )
    .await;
    add_seed(&mut r, &repo_seed, repo_seed_s);
    ctx.emit(r);

    let mut r = list_all(
        ctx,
        ("tags-list", format!("tags-list tags={tags} n={n}")),
        ctx.reg.tags_url(&tag_repo, n)?,
        repo_scope(&tag_repo, Access::Pull),
        tags as usize,
    )
    .await;
    add_seed(&mut r, &tag_seed, tag_seed_s);
    ctx.emit(r);
    Ok(())
}

/// Seeding failures make the listing figures meaningless, so they count as
/// errors of the listing case.
fn add_seed(r: &mut WorkloadResult, seed: &Tally, secs: f64) {
    r.extra.insert("seed_s".into(), secs.into());
    r.errors += seed.errors;
    if r.first_error.is_none() {
        r.first_error = seed.first_error.clone();
    }
}

/// Follows `next` links from `first` until there are none,
/// `--catalog-iterations` times.
async fn list_all(
    ctx: &Ctx,
    (workload, case): (&str, String),
    first: Url,
    scope: String,
    at_least: usize,
) -> WorkloadResult {
    let probe = Probe::start(ctx);
    let mut t = Tally::default();
    let mut listings = Lat::new();
    let (mut items, mut pages) = (0, 0);
    let iterations = ctx.args.catalog_iterations.max(1);
    let t0 = Instant::now();
    for _ in 0..iterations {
        let start = Instant::now();
        let mut url = Some(first.clone());
        (items, pages) = (0, 0);
        while let Some(u) = url.take() {
            if pages >= MAX_PAGES {
                t.error(format!("gave up after {MAX_PAGES} pages"));
                break;
            }
            let s = Instant::now();
            match ctx.reg.list_page(&u, &scope).await {
                Ok(p) => {
                    t.lat.record(s.elapsed());
                    t.ops += 1;
                    pages += 1;
                    items += p.items;
                    if p.next.as_ref() == Some(&u) {
                        t.error(format!("next link points to the same page {u}"));
                        break;
                    }
                    url = p.next;
                }
                Err(e) => {
                    t.error(format!("{e:#}"));
                    break;
                }
            }
        }
        listings.record(start.elapsed());
        if items < at_least {
            t.error(format!(
                "listing returned {items} entries, expected at least {at_least}"
            ));
        }
    }
    let elapsed = t0.elapsed();
    let params = params! {"page_size" => ctx.args.page_size, "iterations" => iterations};
    let mut r = result(ctx, workload, case, params, &t, elapsed, "full_listing_ms");
    let extra = [
        ("full_listing_ms", Value::from(listings.ms(0.5))),
        ("items", items.into()),
        ("pages", pages.into()),
    ];
    r.extra.extend(extra.map(|(k, v)| (k.to_string(), v)));
    probe.finish(&mut r);
    r
}
