//! Result records and their three renderings: a human table, JSON lines (for
//! scripts), and a markdown side-by-side of two JSON-lines files (what
//! `compare.sh` publishes).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ceilings;

pub const MIB: f64 = 1024.0 * 1024.0;
pub const GIB: f64 = 1024.0 * MIB;

/// The outcome of one workload case (one size, one concurrency, ...).
#[derive(Serialize, Deserialize, Clone, Debug, Default)]
pub struct WorkloadResult {
    pub workload: String,
    /// Unique key of the case within a run, e.g. `pull size=10MiB c=8`; used
    /// to pair rows of two runs.
    pub case: String,
    pub target: String,
    pub params: BTreeMap<String, Value>,
    pub ops: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub mib_per_s: f64,
    pub ops_per_s: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub ttfb_p50_ms: Option<f64>,
    pub ttfb_p90_ms: Option<f64>,
    pub ttfb_p99_ms: Option<f64>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// CPU the benchmark client itself used; on a small machine it competes
    /// with the server, so it belongs next to the server's figures.
    pub client_cpu_s: f64,
    pub server_cpu_s: Option<f64>,
    /// Server CPU per GiB moved; for byte-oriented workloads.
    pub server_cpu_s_per_gib: Option<f64>,
    /// Server CPU per operation; for op-oriented workloads.
    pub server_cpu_ms_per_op: Option<f64>,
    pub server_peak_rss_mib: Option<f64>,
    pub server_rss_mib: Option<f64>,
    /// Whether server_peak_rss_mib is the peak of this workload alone (the
    /// kernel's mark could be reset) or since the server started.
    pub server_peak_rss_reset: Option<bool>,
    /// The figure the workload is about: "mib_per_s", "ops_per_s", or the
    /// name of an `extra` field (catalog: "full_listing_ms", lower is better).
    pub headline: String,
    /// Workload-specific figures (e.g. full-listing time for catalog).
    pub extra: BTreeMap<String, Value>,
}

impl WorkloadResult {
    /// The number the workload is about; see [`WorkloadResult::headline`].
    pub fn headline_value(&self) -> f64 {
        match self.headline.as_str() {
            "mib_per_s" => self.mib_per_s,
            "ops_per_s" => self.ops_per_s,
            other => self.extra.get(other).and_then(Value::as_f64).unwrap_or(0.0),
        }
    }

    pub fn headline_unit(&self) -> &'static str {
        match self.headline.as_str() {
            "mib_per_s" => "MiB/s",
            "ops_per_s" => "ops/s",
            "full_listing_ms" => "ms/listing",
            _ => "",
        }
    }
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}"))
        .unwrap_or_else(|| "-".into())
}

pub const TABLE_HEADER: &str = "case                                    |      ops | err |     figure      |  p50 ms  |  p90 ms  |  p99 ms  | ttfb p50 | ttfb p99 | srv cpu s | srv peak MiB";

/// One row of the human-readable table.
pub fn table_row(r: &WorkloadResult) -> String {
    let figure = format!("{:.1} {}", r.headline_value(), r.headline_unit());
    format!(
        "{:<40}|{:>9} |{:>4} |{:>16} |{:>9.2} |{:>9.2} |{:>9.2} |{:>9} |{:>9} |{:>10} |{:>12}",
        r.case,
        r.ops,
        r.errors,
        figure,
        r.p50_ms,
        r.p90_ms,
        r.p99_ms,
        opt(r.ttfb_p50_ms, 2),
        opt(r.ttfb_p99_ms, 2),
        opt(r.server_cpu_s, 2),
        opt(r.server_peak_rss_mib, 1),
    )
}

/// The ceilings (see `ceilings.rs`) as a table of their own: they describe
/// the machine, so the server columns of [`table_row`] do not apply.
pub fn ceiling_table(rows: &[WorkloadResult]) -> String {
    let mut out = format!(
        "{:<20}|{:>16} |{:>8} |{:>10} |{:>8} |{:>9} |{:>9} | {}\n",
        "ceiling", "figure", "ops", "MiB", "seconds", "p50 ms", "p99 ms", "note"
    );
    for r in rows {
        let figure = format!("{:.1} {}", r.headline_value(), r.headline_unit());
        // A derived figure (push-ceiling) did no work of its own.
        let measured = r.ops > 0;
        let num = |v: f64, prec: usize| opt(measured.then_some(v), prec);
        let _ = writeln!(
            out,
            "{:<20}|{:>16} |{:>8} |{:>10} |{:>8} |{:>9} |{:>9} | {}",
            r.case,
            figure,
            num(r.ops as f64, 0),
            num(r.bytes as f64 / MIB, 0),
            num(r.seconds, 2),
            num(r.p50_ms, 2),
            num(r.p99_ms, 2),
            fmt_extra(&r.extra),
        );
    }
    out
}

fn read_jsonl(path: &str) -> Result<Vec<WorkloadResult>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .filter(|l| l.trim_start().starts_with('{'))
        .map(|l| serde_json::from_str(l).with_context(|| format!("parsing a line of {path}")))
        .collect()
}

fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => format!("{:.2}", a / b),
        _ => "-".into(),
    }
}

fn cell(v: Option<f64>, prec: usize) -> String {
    opt(v, prec)
}

/// Appends a markdown table; the first column is left-aligned, the rest
/// (figures) right-aligned. Every row must have as many cells as `header`.
fn md_table(out: &mut String, header: &[String], rows: &[Vec<String>]) {
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let mut sep = vec!["---"];
    sep.extend(std::iter::repeat("---:").take(header.len().saturating_sub(1)));
    let _ = writeln!(out, "|{}|", sep.join("|"));
    for r in rows {
        debug_assert_eq!(r.len(), header.len(), "row {r:?}");
        let _ = writeln!(out, "| {} |", r.join(" | "));
    }
}

/// Markdown tables pairing the cases of `cand` (e.g. Trow) with `base`
/// (e.g. Distribution), with cand/base ratios. Throughput ratios above 1 and
/// latency, CPU and memory ratios below 1 favour the candidate.
/// `idle` is each server's RSS (MiB) after start-up, if known.
pub fn compare_markdown(
    cand_path: &str,
    base_path: &str,
    (cn, bn): (&str, &str),
    idle: (Option<f64>, Option<f64>),
) -> Result<String> {
    // Ceiling rows describe the machine, not a registry: they get a table of
    // their own and stay out of every other table and total.
    let is_ceiling = |r: &WorkloadResult| r.workload == ceilings::WORKLOAD;
    let (cand_ceil, cand): (Vec<_>, Vec<_>) =
        read_jsonl(cand_path)?.into_iter().partition(is_ceiling);
    let (base_ceil, base): (Vec<_>, Vec<_>) =
        read_jsonl(base_path)?.into_iter().partition(is_ceiling);
    let by_case = |rs: &[WorkloadResult]| -> BTreeMap<String, WorkloadResult> {
        rs.iter().map(|r| (r.case.clone(), r.clone())).collect()
    };
    let (cm, bm) = (by_case(&cand), by_case(&base));
    // Cases in run order: the candidate's, then any only the baseline has.
    let mut cases: Vec<String> = cand.iter().map(|r| r.case.clone()).collect();
    for r in &base {
        if !cases.contains(&r.case) {
            cases.push(r.case.clone());
        }
    }
    type Field = fn(&WorkloadResult) -> Option<f64>;
    // (candidate value, baseline value) of a field for a case.
    let pair = |c: &str, f: Field| (cm.get(c).and_then(f), bm.get(c).and_then(f));

    let mut out = String::new();

    let _ = writeln!(out, "### Summary\n");
    let total = |rs: &[WorkloadResult], f: Field| {
        let v: Vec<f64> = rs.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>())
    };
    let peak = |rs: &[WorkloadResult]| {
        rs.iter()
            .filter_map(|r| r.server_peak_rss_mib)
            .reduce(f64::max)
    };
    let cpu: Field = |r| r.server_cpu_s;
    let errs: Field = |r| Some(r.errors as f64);
    let mut rows = Vec::new();
    for (name, a, b, with_ratio) in [
        ("idle RSS after start-up (MiB)", idle.0, idle.1, true),
        (
            "peak RSS over all cases (MiB)",
            peak(&cand),
            peak(&base),
            true,
        ),
        (
            "server CPU over all cases (s)",
            total(&cand, cpu),
            total(&base, cpu),
            true,
        ),
        (
            "cases",
            Some(cand.len() as f64),
            Some(base.len() as f64),
            false,
        ),
        (
            "failed requests",
            total(&cand, errs),
            total(&base, errs),
            false,
        ),
    ] {
        let prec = if with_ratio { 1 } else { 0 };
        let r = if with_ratio { ratio(a, b) } else { "-".into() };
        rows.push(vec![name.to_string(), cell(a, prec), cell(b, prec), r]);
    }
    md_table(
        &mut out,
        &[String::new(), cn.into(), bn.into(), format!("{cn}/{bn}")],
        &rows,
    );

    ceilings_section(&mut out, (&cand_ceil, &base_ceil), (cn, bn));

    let _ = writeln!(out, "\n### Throughput\n");
    let _ = writeln!(
        out,
        "MiB/s and ops/s: higher is better; ms/listing: lower is better.\n"
    );
    let rows: Vec<Vec<String>> = cases
        .iter()
        .map(|c| {
            let any = cm.get(c).or_else(|| bm.get(c));
            let unit = any.map(|r| r.headline_unit()).unwrap_or("");
            let (a, b) = pair(c, |r| Some(r.headline_value()));
            let (ea, eb) = pair(c, errs);
            vec![
                c.clone(),
                unit.to_string(),
                cell(a, 1),
                cell(b, 1),
                ratio(a, b),
                cell(ea, 0),
                cell(eb, 0),
            ]
        })
        .collect();
    md_table(
        &mut out,
        &[
            "case".into(),
            "unit".into(),
            cn.into(),
            bn.into(),
            format!("{cn}/{bn}"),
            format!("{cn} errors"),
            format!("{bn} errors"),
        ],
        &rows,
    );

    let _ = writeln!(out, "\n### Latency (ms)\n");
    let lat_fields: [(&str, Field); 5] = [
        ("p50", |r| Some(r.p50_ms)),
        ("p90", |r| Some(r.p90_ms)),
        ("p99", |r| Some(r.p99_ms)),
        ("TTFB p50", |r| r.ttfb_p50_ms),
        ("TTFB p99", |r| r.ttfb_p99_ms),
    ];
    let mut header = vec!["case".to_string()];
    for (name, _) in &lat_fields {
        header.push(format!("{cn} {name}"));
        header.push(format!("{bn} {name}"));
        if *name == "p99" {
            header.push(format!("p99 {cn}/{bn}"));
        }
    }
    let rows: Vec<Vec<String>> = cases
        .iter()
        .map(|c| {
            let mut row = vec![c.clone()];
            for (name, f) in &lat_fields {
                let (a, b) = pair(c, *f);
                row.push(cell(a, 2));
                row.push(cell(b, 2));
                if *name == "p99" {
                    row.push(ratio(a, b));
                }
            }
            row
        })
        .collect();
    md_table(&mut out, &header, &rows);

    let _ = writeln!(out, "\n### Server resources\n");
    let header = vec![
        "case".to_string(),
        format!("{cn} CPU s"),
        format!("{bn} CPU s"),
        format!("CPU {cn}/{bn}"),
        format!("{cn} CPU s/GiB"),
        format!("{bn} CPU s/GiB"),
        format!("{cn} CPU ms/op"),
        format!("{bn} CPU ms/op"),
        format!("{cn} peak RSS MiB"),
        format!("{bn} peak RSS MiB"),
        format!("RSS {cn}/{bn}"),
        format!("client CPU s ({cn} run)"),
        format!("client CPU s ({bn} run)"),
    ];
    let rows: Vec<Vec<String>> = cases
        .iter()
        .map(|c| {
            let (ac, bc) = pair(c, cpu);
            let (ag, bg) = pair(c, |r| r.server_cpu_s_per_gib);
            let (ao, bo) = pair(c, |r| r.server_cpu_ms_per_op);
            let (ar, br) = pair(c, |r| r.server_peak_rss_mib);
            let (al, bl) = pair(c, |r| Some(r.client_cpu_s));
            vec![
                c.clone(),
                cell(ac, 2),
                cell(bc, 2),
                ratio(ac, bc),
                cell(ag, 2),
                cell(bg, 2),
                cell(ao, 3),
                cell(bo, 3),
                cell(ar, 1),
                cell(br, 1),
                ratio(ar, br),
                cell(al, 2),
                cell(bl, 2),
            ]
        })
        .collect();
    md_table(&mut out, &header, &rows);

    let extras: Vec<Vec<String>> = cand
        .iter()
        .map(|r| (cn, r))
        .chain(base.iter().map(|r| (bn, r)))
        .filter(|(_, r)| !r.extra.is_empty())
        .map(|(who, r)| vec![r.case.clone(), who.to_string(), fmt_extra(&r.extra)])
        .collect();
    if !extras.is_empty() {
        let _ = writeln!(out, "\n### Workload details\n");
        md_table(
            &mut out,
            &["case".into(), "server".into(), "details".into()],
            &extras,
        );
    }
    Ok(out)
}

/// The "Machine ceilings" table: each ceiling as measured before the
/// candidate's and the baseline's workloads (either may be missing). No
/// ratio: the machine is the same.
fn ceilings_section(
    out: &mut String,
    (cand, base): (&[WorkloadResult], &[WorkloadResult]),
    (cn, bn): (&str, &str),
) {
    if cand.is_empty() && base.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n### Machine ceilings\n");
    let _ = writeln!(
        out,
        "What this machine does without a registry in the way (`trow-bench ceilings`), \
         measured before the workloads: no push can beat `push-ceiling` (the slower of \
         hashing on one core and writing with fdatasync), no single-connection transfer \
         `loopback-tcp`, and each small-blob commit costs at least one `synced-small-write`.\n"
    );
    let mut names: Vec<&str> = cand.iter().map(|r| r.case.as_str()).collect();
    for r in base {
        if !names.contains(&r.case.as_str()) {
            names.push(&r.case);
        }
    }
    let find = |rs: &[WorkloadResult], n: &str| {
        rs.iter().find(|r| r.case == n).map(|r| r.headline_value())
    };
    let rows: Vec<Vec<String>> = names
        .iter()
        .map(|&n| {
            let any = cand.iter().chain(base).find(|r| r.case == n);
            let unit = any.map(|r| r.headline_unit()).unwrap_or("");
            let note = any.map(|r| fmt_extra(&r.extra)).unwrap_or_default();
            vec![
                n.to_string(),
                unit.to_string(),
                cell(find(cand, n), 1),
                cell(find(base, n), 1),
                note,
            ]
        })
        .collect();
    md_table(
        out,
        &[
            "ceiling".into(),
            "unit".into(),
            format!("before {cn} run"),
            format!("before {bn} run"),
            "note".into(),
        ],
        &rows,
    );
}

fn fmt_extra(m: &BTreeMap<String, Value>) -> String {
    m.iter()
        .map(|(k, v)| match (v.as_f64(), v.as_str()) {
            (Some(f), _) if f.fract() != 0.0 => format!("{k}={f:.3}"),
            (_, Some(s)) => format!("{k}={s}"),
            _ => format!("{k}={v}"),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markdown_pairs_cases() {
        let dir = std::env::temp_dir().join(format!("trow-bench-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mk = |v: f64| WorkloadResult {
            workload: "pull".into(),
            case: "pull size=1MiB c=1".into(),
            mib_per_s: v,
            headline: "mib_per_s".into(),
            server_cpu_s: Some(v / 100.0),
            ..Default::default()
        };
        let a = dir.join("a.jsonl");
        let b = dir.join("b.jsonl");
        std::fs::write(&a, serde_json::to_string(&mk(200.0)).unwrap() + "\n").unwrap();
        std::fs::write(&b, serde_json::to_string(&mk(100.0)).unwrap() + "\n").unwrap();
        let md = compare_markdown(
            a.to_str().unwrap(),
            b.to_str().unwrap(),
            ("T", "D"),
            (Some(10.0), None),
        )
        .unwrap();
        assert!(
            md.contains("| pull size=1MiB c=1 | MiB/s | 200.0 | 100.0 | 2.00 |"),
            "{md}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

#[cfg(test)]
#[path = "report_ceiling_tests.rs"]
mod ceiling_tests;
