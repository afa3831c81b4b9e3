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

    // A file no format makes sense of is named, with what each format made of it.
    let dir = tempfile::tempdir().unwrap();
    let mystery = write(dir.path(), "mystery.log", "GET /index.html 200\nGET /favicon.ico 404\n");
    let out = run_siteflow(&["replay", mystery.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains(&format!("{}: cannot tell its format from its first 2 messages", mystery.display())), "{stderr}");
    assert!(stderr.contains("pmacct_json decoded 0 % (mostly not_json)") && stderr.contains("goflow2_protobuf decoded 0 %"), "{stderr}");
}

/// pmacct JSON (nfacctd's Kafka/print plugin) of a flow exported by the router at `exporter`
/// (not a site's): the site is the destination's (inbound) or the source's (outbound).
fn pmacct_json(traffic: &mut Traffic, f: &crate::kafka_support::Flow, exporter: &str) -> String {
    let n = traffic.sites[f.site].net;
    let inside = format!("{}.{}.{}.{}", n[0], n[1], n[2], traffic.rng().u8(2..250));
    let outside = format!("198.51.100.{}", traffic.rng().u8(1..250));
    let (src, dst) = if f.inbound { (outside, inside) } else { (inside, outside) };
    // pmacct writes seconds with microseconds; a window boundary is a whole microsecond, so
    // cutting the nanoseconds never moves a flow to another window.
    let stamp = |t: i64| format!("{}.{:06}", t.div_euclid(S), t.rem_euclid(S) / 1_000);
    format!(
        r#"{{"event_type":"purge","peer_ip_src":"{exporter}","ip_src":"{src}","ip_dst":"{dst}","port_src":443,"port_dst":51000,"ip_proto":"tcp","timestamp_start":"{}","timestamp_end":"{}","packets":{},"bytes":{},"sampling_rate":{}}}"#,
        stamp(f.t_ns - 2 * S),
        stamp(f.t_ns),
        f.packets,
        f.bytes,
        f.sampling
    )
}

/// Per (site, direction): (bytes, records).
type SiteTotals = BTreeMap<(String, String), (u64, u64)>;

fn per_site(truth: &crate::kafka_support::Totals) -> SiteTotals {
    let mut totals = SiteTotals::new();
    for ((site, dir, _), v) in truth {
        let e = totals.entry((site.clone(), dir.clone())).or_default();
        e.0 += v.0;
        e.1 += v.2;
    }
    totals
}

fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

/// A capture from a year ago: goflow2 JSON gzip-compressed and pmacct JSON zstd-compressed (two
/// collectors, two exporters), 20 minutes each, out of order by up to 30 s; both named so that
/// their names tell nothing of their format. Returns the files and the per-site ground truth.
fn compressed_year_old_capture(dir: &std::path::Path) -> (Vec<std::path::PathBuf>, SiteTotals) {
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap();
    let start = (now - 365 * DAY_NS).div_euclid(10 * S) * 10 * S;
    let mut traffic = Traffic::new(17, start);
    let (mut goflow2, mut pmacct) = (String::new(), String::new());
    for i in 0..2_400 {
        let t = start + i * S / 2 - traffic.rng().i64(0..30 * S).min(i * S / 2);
        let flow = traffic.flow(t);
        if i % 2 == 0 {
            goflow2.push_str(&traffic.goflow2_json_from(&flow, "192.0.2.31"));
            goflow2.push('\n');
        } else {
            pmacct.push_str(&pmacct_json(&mut traffic, &flow, "192.0.2.41"));
            pmacct.push('\n');
        }
    }
    let flows = dir.join("collector-a.gz");
    std::fs::write(&flows, gzip(goflow2.as_bytes())).unwrap();
    let nfacctd = dir.join("collector-b.zst");
    std::fs::write(&nfacctd, zstd::stream::encode_all(pmacct.as_bytes(), 3).unwrap()).unwrap();
    (vec![flows, nfacctd], per_site(&traffic.truth))
}

/// Per-site totals from `--output json` (or SQL `--format json`) rows.
fn json_totals(text: &str) -> SiteTotals {
    let rows: Vec<serde_json::Value> = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"));
    let mut totals = SiteTotals::new();
    for r in rows {
        let n = |k: &str| r[k].as_u64().or_else(|| r[k].as_str().and_then(|s| s.parse().ok())).unwrap_or_else(|| panic!("{k} in {r}"));
        let e = totals.entry((r["site"].as_str().unwrap().to_string(), r["direction"].as_str().unwrap().to_string())).or_default();
        e.0 += n("bytes");
        e.1 += n("records");
    }
    totals
}

fn args_with<'a>(args: &[&'a str], files: &'a [std::path::PathBuf]) -> Vec<&'a str> {
    let mut all = args.to_vec();
    all.extend(files.iter().map(|p| p.to_str().unwrap()));
    all
}

#[test]
fn compressed_goflow2_and_pmacct_captures_replay_without_a_format_to_the_ground_truth() {
    let dir = tempfile::tempdir().unwrap();
    let (files, truth) = compressed_year_old_capture(dir.path());
    let out = run_siteflow(&args_with(&["replay", "--output", "json"], &files), &[("NO_COLOR", "1")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "replay failed: {stderr}");
    for detected in
        ["format=\"goflow2_json\" how=\"detected\" compression=\"gzip\"", "format=\"pmacct_json\" how=\"detected\" compression=\"zstd\""]
    {
        assert!(stderr.contains(detected), "{detected} in {stderr}");
    }
    assert!(stderr.contains("2400 records decoded, 0 rejected, 0 unmatched, 0 late"), "{stderr}");
    assert_eq!(json_totals(&String::from_utf8_lossy(&out.stdout)), truth);

    // The same totals as Parquet, read back.
    let parquet = dir.path().join("totals.parquet");
    let out = run_siteflow(
        &args_with(&["replay", "--output", "parquet", "--output-file", parquet.to_str().unwrap()], &files),
        &[("NO_COLOR", "1")],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::UInt64Type;
    let reader = datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&parquet).unwrap())
        .unwrap()
        .build()
        .unwrap();
    let mut from_parquet = SiteTotals::new();
    for batch in reader {
        let batch = batch.unwrap();
        let text = |name: &str| {
            datafusion::arrow::compute::cast(batch.column_by_name(name).unwrap(), &datafusion::arrow::datatypes::DataType::Utf8).unwrap()
        };
        let number = |name: &str| {
            datafusion::arrow::compute::cast(batch.column_by_name(name).unwrap(), &datafusion::arrow::datatypes::DataType::UInt64).unwrap()
        };
        let (site, direction, bytes, records) = (text("site"), text("direction"), number("bytes"), number("records"));
        for i in 0..batch.num_rows() {
            assert!(!bytes.is_null(i));
            let key = (site.as_string::<i32>().value(i).to_string(), direction.as_string::<i32>().value(i).to_string());
            from_parquet.insert(key, (bytes.as_primitive::<UInt64Type>().value(i), records.as_primitive::<UInt64Type>().value(i)));
        }
    }
    assert_eq!(from_parquet, truth);
    let out = run_siteflow(&args_with(&["replay", "--output", "parquet"], &files), &[]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--output parquet needs --output-file"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn run_with_a_file_source_serves_the_same_totals_over_sql() {
    let dir = tempfile::tempdir().unwrap();
    let (_, truth) = compressed_year_old_capture(dir.path());
    let http = crate::support::free_addr();
    // Paths relative to the configuration's directory; one format given, one detected.
    let config = write(
        dir.path(),
        "replay.yaml",
        &format!(
            "source:\n  kind: file\n  files:\n    - {{ path: collector-a.gz }}\n    - {{ path: collector-b.zst, format: pmacct_json }}\nhttp: {{ listen: \"{http}\" }}\n"
        ),
    );
    let out = run_siteflow(&["check", "--config", config.to_str().unwrap()], &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("collector-a.gz (goflow2_json, gzip, 1200 messages)"), "{stdout}");
    assert!(stdout.contains("collector-b.zst (pmacct_json, zstd, 1200 messages)"), "{stdout}");

    let log = dir.path().join("run.log");
    let child = crate::support::siteflow()
        .args(["run", "--config", config.to_str().unwrap()])
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut child = crate::support::KillOnDrop(child);
    let finished = crate::kafka_support::wait_until(std::time::Duration::from_secs(120), || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("replay finished")
    });
    assert!(finished, "no end of the replay: {}", std::fs::read_to_string(&log).unwrap_or_default());
    assert!(child.0.try_wait().unwrap().is_none(), "the service keeps serving after the replay");
    let url = format!("http://{http}");
    let out = run_siteflow(&["sql", "--url", &url, "--format", "json", siteflow::replay::TOTALS_SQL], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(json_totals(&String::from_utf8_lossy(&out.stdout)), truth);
    let (status, metrics) = crate::support::http_get(http, "/metrics").unwrap();
    assert_eq!(status, 200);
    for line in
        ["siteflow_records_decoded_total{format=\"goflow2_json\"} 1200", "siteflow_records_decoded_total{format=\"pmacct_json\"} 1200"]
    {
        assert!(metrics.contains(line), "{line} in /metrics");
    }

    // A missing file is named by check and by run.
    let broken = write(dir.path(), "broken.yaml", "source:\n  kind: file\n  files:\n    - { path: gone.json.gz }\n");
    for command in ["check", "run"] {
        let out = run_siteflow(&[command, "--config", broken.to_str().unwrap()], &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains("gone.json.gz: no such file"), "{command}: {stderr}");
    }
}

/// goflow2 JSON flows one a year ago, in order, `secs` seconds of event time at 50 flows/s.
fn paced_capture(dir: &std::path::Path, secs: i64) -> (std::path::PathBuf, i64) {
    let now = chrono::Utc::now().timestamp_nanos_opt().unwrap();
    let start = (now - 365 * DAY_NS).div_euclid(10 * S) * 10 * S;
    let mut traffic = Traffic::new(3, start);
    let mut text = String::new();
    let mut last = start;
    for i in 0..secs * 50 {
        last = start + i * S / 50;
        let flow = traffic.flow(last);
        text.push_str(&traffic.goflow2_json_from(&flow, "192.0.2.31"));
        text.push('\n');
    }
    (write(dir, "paced.json", &text), last)
}

#[test]
fn speed_paces_by_event_time_and_progress_is_logged_without_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = paced_capture(dir.path(), 20);
    let started = std::time::Instant::now();
    let out = run_siteflow(
        &["replay", "--speed", "10", "--progress-interval", "0.2", "--output", "csv", file.to_str().unwrap()],
        &[("NO_COLOR", "1")],
    );
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // 20 s of event time at 10x: 2 s, less the first batch's span (100 flows, 2 s of data).
    assert!(took >= std::time::Duration::from_millis(1_700), "20 s of event time at --speed 10 took {took:?}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains("replay progress")).collect();
    assert!(lines.len() >= 3, "a progress line every 0.2 s: {stderr}");
    assert!(lines.iter().all(|l| l.contains("records_per_sec=") && l.contains("event_time=") && l.contains("eta_secs=")), "{lines:?}");
    assert!(!stderr.contains("ETA"), "no progress bar without a terminal: {stderr}");
}

#[test]
fn progress_is_a_bar_on_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let (file, last) = paced_capture(dir.path(), 20);
    // util-linux `script` runs the command on a pseudo-terminal and copies what it shows.
    let on_a_terminal = |env: &[(&str, &str)]| {
        let command =
            format!("{} replay --speed 20 --progress-interval 0.2 --output csv {}", env!("CARGO_BIN_EXE_siteflow"), file.display());
        let out = std::process::Command::new("script")
            .args(["-qfec", &command, "/dev/null"])
            .env("TERM", "xterm")
            .env_remove("NO_COLOR")
            .envs(env.iter().copied())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("util-linux `script` (Debian bsdutils) runs the replay on a pseudo-terminal");
        let screen = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(out.status.success(), "{screen}{}", String::from_utf8_lossy(&out.stderr));
        screen
    };
    let screen = on_a_terminal(&[]);
    let last_event = chrono::DateTime::from_timestamp_nanos(last).format("event time %Y-%m-%d %H:%M:%S UTC").to_string();
    assert!(screen.contains("records/s"), "{screen}");
    assert!(screen.contains("1000 records, "), "{screen}");
    assert!(screen.contains(&last_event), "{last_event} in {screen}");
    assert!(screen.contains("100% ETA"), "{screen}");
    assert!(!screen.contains("replay progress"), "a bar, not log lines, on a terminal: {screen}");
    // NO_COLOR (or TERM=dumb) hides the bar: log lines then, not nothing.
    let screen = on_a_terminal(&[("NO_COLOR", "1")]);
    assert!(screen.contains("replay progress") && !screen.contains("% ETA"), "{screen}");
}
