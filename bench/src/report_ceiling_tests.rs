//! Rendering of the machine ceilings: their own table in `trow-bench
//! ceilings`, and their own "Machine ceilings" section in `compare`, kept
//! out of every other table and total.

use super::*;

#[test]
fn ceilings_get_their_own_table() {
    let dir = std::env::temp_dir().join(format!("trow-bench-test-ceil-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let pull = WorkloadResult {
        workload: "pull".into(),
        case: "pull size=1MiB c=1".into(),
        mib_per_s: 300.0,
        headline: "mib_per_s".into(),
        ..Default::default()
    };
    let ceil = |case: &str, headline: &str, v: f64| WorkloadResult {
        workload: ceilings::WORKLOAD.into(),
        case: case.into(),
        mib_per_s: v,
        ops_per_s: v,
        headline: headline.into(),
        ..Default::default()
    };
    let mut push = ceil("push-ceiling", "mib_per_s", 400.0);
    push.extra
        .insert("limited_by".into(), "synced-disk-write".into());
    let lines = |rs: &[WorkloadResult]| {
        rs.iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect::<String>()
    };
    let a = dir.join("a.jsonl");
    let b = dir.join("b.jsonl");
    std::fs::write(
        &a,
        lines(&[
            ceil("sha256-1core", "mib_per_s", 1800.0),
            ceil("synced-small-write", "ops_per_s", 950.0),
            push,
            pull.clone(),
        ]),
    )
    .unwrap();
    std::fs::write(&b, lines(&[pull])).unwrap();
    let md = compare_markdown(
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        ("T", "D"),
        (None, None),
    )
    .unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    let (before, after) = md.split_once("### Machine ceilings").expect(&md);
    let (ceil_table, rest) = after.split_once("### Throughput").expect(&md);
    assert!(
        ceil_table.contains("| sha256-1core | MiB/s | 1800.0 | - |  |"),
        "{md}"
    );
    assert!(
        ceil_table.contains("| synced-small-write | ops/s | 950.0 | - |  |"),
        "{md}"
    );
    assert!(
        ceil_table.contains("| push-ceiling | MiB/s | 400.0 | - | limited_by=synced-disk-write |"),
        "{md}"
    );
    // Not counted as cases, not in the throughput, latency or details tables.
    assert!(before.contains("| cases | 1 | 1 | - |"), "{md}");
    assert!(
        !rest.contains("sha256") && !rest.contains("ceiling"),
        "{md}"
    );
    assert!(
        rest.contains("| pull size=1MiB c=1 | MiB/s | 300.0 | 300.0 | 1.00 |"),
        "{md}"
    );
}

#[test]
fn ceiling_table_lists_each_figure() {
    let r = WorkloadResult {
        workload: ceilings::WORKLOAD.into(),
        case: "synced-small-write".into(),
        ops: 10,
        ops_per_s: 512.31,
        headline: "ops_per_s".into(),
        ..Default::default()
    };
    let mut derived = WorkloadResult {
        workload: ceilings::WORKLOAD.into(),
        case: "push-ceiling".into(),
        mib_per_s: 300.0,
        headline: "mib_per_s".into(),
        ..Default::default()
    };
    derived.extra.insert("limited_by".into(), "x".into());
    let t = ceiling_table(&[r, derived]);
    let lines: Vec<&str> = t.lines().collect();
    assert_eq!(lines.len(), 3, "{t}");
    // Work figures of a derived row are blank, not zero.
    let cells: Vec<&str> = lines[2].split('|').map(str::trim).collect();
    assert_eq!(
        cells,
        [
            "push-ceiling",
            "300.0 MiB/s",
            "-",
            "-",
            "-",
            "-",
            "-",
            "limited_by=x"
        ],
        "{t}"
    );
    assert!(lines[0].starts_with("ceiling"), "{t}");
    assert!(lines[1].starts_with("synced-small-write"), "{t}");
    assert!(lines[1].contains("512.3 ops/s"), "{t}");
    assert!(lines[1].ends_with("| "), "{t}");
}
