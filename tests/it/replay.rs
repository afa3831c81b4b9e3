//! `siteflow replay`: a capture from a year ago, replayed from files through the real binary,
//! shows every one of its windows — in the per-site totals it prints and in SQL over the history
//! it wrote — and retention deletes none of it.

use std::collections::BTreeMap;

use crate::kafka_support::{Totals, Traffic, diff};
use crate::support::{run_siteflow, write};

const S: i64 = 1_000_000_000;
const DAY_NS: i64 = 86_400 * S;

/// Parses `siteflow … --output csv` / `--format csv` rows into (header, rows).
fn csv_rows(text: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut lines = text.lines();
    let header = lines.next().unwrap_or_default().split(',').map(str::to_string).collect();
    (header, lines.map(|l| l.split(',').map(str::to_string).collect()).collect())
}

#[test]
fn a_capture_from_a_year_ago_shows_every_window_and_survives_retention() {
    let dir = tempfile::tempdir().unwrap();
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap();
    let start = (now - 365 * DAY_NS).div_euclid(10 * S) * 10 * S;
    let mut traffic = Traffic::new(5, start);
    // Two files (two streams), 20 minutes each, records out of order by up to 30 s, the last
    // windows right at the end of the data (no later record moves the clock past them).
    let mut files = Vec::new();
    for f in 0..2 {
        let mut text = String::new();
        for i in 0..2_400 {
            let t = start + i * S / 2 - traffic.rng().i64(0..30 * S).min(i * S / 2);
            let flow = traffic.flow(t);
            text.push_str(&traffic.goflow2_json_from(&flow, if f == 0 { "192.0.2.31" } else { "192.0.2.32" }));
            text.push('\n');
        }
        files.push(write(dir.path(), &format!("capture-{f}.json"), &text));
    }
    let history = dir.path().join("history");
    let mut args = vec!["replay", "--format", "goflow2_json", "--output", "csv", "--history-dir", history.to_str().unwrap()];
    args.extend(files.iter().map(|p| p.to_str().unwrap()));
    let out = run_siteflow(&args, &[("NO_COLOR", "1")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "replay failed: {stderr}");
    assert!(stderr.contains("0 late"), "nothing of an old capture is late: {stderr}");

    // The printed per-site totals equal the records' totals.
    let (header, rows) = csv_rows(&String::from_utf8_lossy(&out.stdout));
    let col = |name: &str| header.iter().position(|h| h == name).unwrap_or_else(|| panic!("no column {name} in {header:?}"));
    let mut per_site: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    for ((site, dir, _), v) in &traffic.truth {
        let e = per_site.entry((site.clone(), dir.clone())).or_default();
        e.0 += v.0;
        e.1 += v.2;
    }
    let printed: BTreeMap<(String, String), (u64, u64)> = rows
        .iter()
        .map(|r| {
            ((r[col("site")].clone(), r[col("direction")].clone()), (r[col("bytes")].parse().unwrap(), r[col("records")].parse().unwrap()))
        })
        .collect();
    assert_eq!(printed, per_site);

    // SQL over the history it wrote: every window of the capture, one row per key, exact.
    let query = "SELECT site, direction, CAST(window_start AS BIGINT) / 1000000000 AS w, bytes, packets, records FROM site_windows";
    let out = run_siteflow(&["sql", "--data", history.to_str().unwrap(), "--format", "csv", query], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let mut sql = Totals::new();
    for r in csv_rows(&String::from_utf8_lossy(&out.stdout)).1 {
        let prev = sql.insert(
            (r[0].clone(), r[1].clone(), r[2].parse().unwrap()),
            (r[3].parse().unwrap(), r[4].parse().unwrap(), r[5].parse().unwrap()),
        );
        assert!(prev.is_none(), "one row per site, direction and window: {r:?}");
    }
    assert_eq!(sql, traffic.truth, "{}", diff(&traffic.truth, &sql));
    let last_window = traffic.truth.keys().map(|k| k.2).max().unwrap();
    assert!(sql.keys().any(|k| k.2 == last_window), "the last window of the capture is there");

    // An empty history says so.
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let out = run_siteflow(&["sql", "--data", empty.to_str().unwrap(), "SELECT 1"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("the history is empty"), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn replay_names_a_bad_format_and_a_missing_file() {
    let out = run_siteflow(&["replay", "--format", "netflow", "x.json"], &[]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("'netflow'") && stderr.contains("--format"), "{stderr}");
    let out = run_siteflow(&["replay", "--format", "goflow2_json", "/nonexistent/flows.json"], &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/flows.json"), "{}", String::from_utf8_lossy(&out.stderr));
}
