//! Result records and their three renderings: a human table, JSON lines (for
//! scripts), and a markdown side-by-side of two JSON-lines files (what
//! `compare.sh` publishes).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

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
    pub server_cpu_s_per_gib: Option<f64>,
    pub server_peak_rss_mib: Option<f64>,
    pub server_rss_mib: Option<f64>,
    /// Whether server_peak_rss_mib is the peak of this workload alone (the
    /// kernel's mark could be reset) or since the server started.
    pub server_peak_rss_reset: Option<bool>,
    /// Either "mib_per_s" or "ops_per_s": the figure the workload is about.
    pub headline: String,
    /// Workload-specific figures (e.g. full-listing time for catalog).
    pub extra: BTreeMap<String, Value>,
}

impl WorkloadResult {
    pub fn headline_value(&self) -> f64 {
        if self.headline == "mib_per_s" {
            self.mib_per_s
        } else {
            self.ops_per_s
        }
    }

    pub fn headline_unit(&self) -> &'static str {
        if self.headline == "mib_per_s" {
            "MiB/s"
        } else {
            "ops/s"
        }
    }
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map(|x| format!("{x:.prec$}")).unwrap_or_else(|| "-".into())
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

/// Markdown tables pairing the cases of `cand` (e.g. Trow) with `base`
/// (e.g. Distribution), with cand/base ratios. Throughput ratios above 1 and
/// latency, CPU and memory ratios below 1 favour the candidate.
pub fn compare_markdown(cand_path: &str, base_path: &str, cn: &str, bn: &str) -> Result<String> {
    let cand = read_jsonl(cand_path)?;
    let base = read_jsonl(base_path)?;
    let base_by_case: BTreeMap<&str, &WorkloadResult> =
        base.iter().map(|r| (r.case.as_str(), r)).collect();
    let mut cases: Vec<&str> = cand.iter().map(|r| r.case.as_str()).collect();
    for r in &base {
        if !cases.contains(&r.case.as_str()) {
            cases.push(r.case.as_str());
        }
    }
    let cand_by_case: BTreeMap<&str, &WorkloadResult> =
        cand.iter().map(|r| (r.case.as_str(), r)).collect();
    let get = |m: &BTreeMap<&str, &WorkloadResult>, c: &str, f: &dyn Fn(&WorkloadResult) -> Option<f64>| {
        m.get(c).and_then(|r| f(r))
    };

    let mut out = String::new();
    let _ = writeln!(out, "### Throughput\n");
    let _ = writeln!(
        out,
        "| case | unit | {cn} | {bn} | {cn}/{bn} | {cn} errors | {bn} errors |"
    );
    let _ = writeln!(out, "|---|---|---:|---:|---:|---:|---:|");
    for c in &cases {
        let any = cand_by_case.get(c).or_else(|| base_by_case.get(c));
        let unit = any.map(|r| r.headline_unit()).unwrap_or("");
        let h = |r: &WorkloadResult| Some(r.headline_value());
        let e = |r: &WorkloadResult| Some(r.errors as f64);
        let (a, b) = (get(&cand_by_case, c, &h), get(&base_by_case, c, &h));
        let _ = writeln!(
            out,
            "| {c} | {unit} | {} | {} | {} | {} | {} |",
            cell(a, 1),
            cell(b, 1),
            ratio(a, b),
            cell(get(&cand_by_case, c, &e), 0),
            cell(get(&base_by_case, c, &e), 0),
        );
    }

    let _ = writeln!(out, "\n### Latency (ms)\n");
    let _ = writeln!(
        out,
        "| case | {cn} p50 | {bn} p50 | {cn} p90 | {bn} p90 | {cn} p99 | {bn} p99 | p99 {cn}/{bn} | {cn} TTFB p50 | {bn} TTFB p50 | {cn} TTFB p99 | {bn} TTFB p99 |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in &cases {
        let p50 = |r: &WorkloadResult| Some(r.p50_ms);
        let p90 = |r: &WorkloadResult| Some(r.p90_ms);
        let p99 = |r: &WorkloadResult| Some(r.p99_ms);
        let t50 = |r: &WorkloadResult| r.ttfb_p50_ms;
        let t99 = |r: &WorkloadResult| r.ttfb_p99_ms;
        let (a99, b99) = (get(&cand_by_case, c, &p99), get(&base_by_case, c, &p99));
        let _ = writeln!(
            out,
            "| {c} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(get(&cand_by_case, c, &p50), 2),
            cell(get(&base_by_case, c, &p50), 2),
            cell(get(&cand_by_case, c, &p90), 2),
            cell(get(&base_by_case, c, &p90), 2),
            cell(a99, 2),
            cell(b99, 2),
            ratio(a99, b99),
            cell(get(&cand_by_case, c, &t50), 2),
            cell(get(&base_by_case, c, &t50), 2),
            cell(get(&cand_by_case, c, &t99), 2),
            cell(get(&base_by_case, c, &t99), 2),
        );
    }

    let _ = writeln!(out, "\n### Server resources\n");
    let _ = writeln!(
        out,
        "| case | {cn} CPU s | {bn} CPU s | CPU {cn}/{bn} | {cn} CPU s/GiB | {bn} CPU s/GiB | {cn} peak RSS MiB | {bn} peak RSS MiB | RSS {cn}/{bn} | client CPU s ({cn} run) | client CPU s ({bn} run) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for c in &cases {
        let cpu = |r: &WorkloadResult| r.server_cpu_s;
        let gib = |r: &WorkloadResult| r.server_cpu_s_per_gib;
        let rss = |r: &WorkloadResult| r.server_peak_rss_mib;
        let cli = |r: &WorkloadResult| Some(r.client_cpu_s);
        let (ac, bc) = (get(&cand_by_case, c, &cpu), get(&base_by_case, c, &cpu));
        let (ar, br) = (get(&cand_by_case, c, &rss), get(&base_by_case, c, &rss));
        let _ = writeln!(
            out,
            "| {c} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            cell(ac, 2),
            cell(bc, 2),
            ratio(ac, bc),
            cell(get(&cand_by_case, c, &gib), 2),
            cell(get(&base_by_case, c, &gib), 2),
            cell(ar, 1),
            cell(br, 1),
            ratio(ar, br),
            cell(get(&cand_by_case, c, &cli), 2),
            cell(get(&base_by_case, c, &cli), 2),
        );
    }

    let extras: Vec<&WorkloadResult> = cand
        .iter()
        .chain(base.iter())
        .filter(|r| !r.extra.is_empty())
        .collect();
    if !extras.is_empty() {
        let _ = writeln!(out, "\n### Workload details\n");
        let _ = writeln!(out, "| case | server | details |");
        let _ = writeln!(out, "|---|---|---|");
        for r in cand.iter().filter(|r| !r.extra.is_empty()) {
            let _ = writeln!(out, "| {} | {cn} | {} |", r.case, fmt_extra(&r.extra));
        }
        for r in base.iter().filter(|r| !r.extra.is_empty()) {
            let _ = writeln!(out, "| {} | {bn} | {} |", r.case, fmt_extra(&r.extra));
        }
    }
    Ok(out)
}

fn fmt_extra(m: &BTreeMap<String, Value>) -> String {
    m.iter()
        .map(|(k, v)| match v.as_f64() {
            Some(f) if f.fract() != 0.0 => format!("{k}={f:.3}"),
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
        let md = compare_markdown(a.to_str().unwrap(), b.to_str().unwrap(), "T", "D").unwrap();
        assert!(md.contains("| pull size=1MiB c=1 | MiB/s | 200.0 | 100.0 | 2.00 |"), "{md}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
