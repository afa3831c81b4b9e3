//! SQL for engineers: the examples of docs/sql.md against a simulated afternoon with faults,
//! checked against the simulator's own counts and the scenario; safety and limits; history
//! across restarts; the HTTP API and the CLI against a running instance.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type};
use siteflow::enrich::Direction;
use siteflow::inventory::Inventory;
use siteflow::source::simulator::Scenario;
use siteflow::sql::{SqlEngine, SqlError};

use crate::support::{SimRun, fast_config, repo, simulate_with_sql};

/// The numbered examples of docs/sql.md: (number, question, SQL).
pub(crate) fn doc_examples() -> Vec<(usize, String, String)> {
    let text = std::fs::read_to_string(repo().join("docs/sql.md")).unwrap();
    let mut out = Vec::new();
    let mut question = None;
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        if let Some(q) = line.strip_prefix("### ") {
            let (n, q) = q.split_once(". ").expect("examples are numbered: ### N. Question");
            question = Some((n.parse::<usize>().unwrap(), q.to_string()));
        } else if line == "```sql"
            && let Some((n, q)) = question.take()
        {
            let sql: Vec<&str> = lines.by_ref().take_while(|l| *l != "```").collect();
            out.push((n, q, sql.join("\n")));
        }
    }
    out
}

/// Column `name` of the result as strings (any type).
fn strings(batches: &[RecordBatch], name: &str) -> Vec<String> {
    batches
        .iter()
        .flat_map(|b| {
            let c = cast(b.column_by_name(name).unwrap_or_else(|| panic!("no column {name}")), &DataType::Utf8).unwrap();
            let c = c.as_string::<i32>().clone();
            (0..c.len()).map(move |i| c.value(i).to_string()).collect::<Vec<_>>()
        })
        .collect()
}

fn floats(batches: &[RecordBatch], name: &str) -> Vec<f64> {
    batches
        .iter()
        .flat_map(|b| {
            let c = cast(b.column_by_name(name).unwrap(), &DataType::Float64).unwrap();
            c.as_primitive::<Float64Type>().values().to_vec()
        })
        .collect()
}

fn ints(batches: &[RecordBatch], name: &str) -> Vec<i64> {
    batches
        .iter()
        .flat_map(|b| {
            let c = cast(b.column_by_name(name).unwrap(), &DataType::Int64).unwrap();
            c.as_primitive::<Int64Type>().values().to_vec()
        })
        .collect()
}

async fn run_query(engine: &SqlEngine, sql: &str) -> Vec<RecordBatch> {
    match engine.query(sql).await {
        Ok((_, b)) => b,
        Err(e) => panic!("{sql}\n→ {e}"),
    }
}

/// A 10-minute simulated afternoon of the 242 sites with the district-congestion faults.
async fn faulty_afternoon() -> (SimRun, SqlEngine, Arc<Inventory>) {
    let inventory = Arc::new(Inventory::embedded());
    let scenario =
        Scenario::load(&repo().join("pipelines/hagiang/scenarios/district-congestion.yaml"), &inventory).expect("scenario loads");
    let mut config = fast_config(600, 400);
    config.sql.recent_flows_max_rows = 1_000_000;
    config.sql.recent_flows_max_mb = 1024;
    config.sql.max_rows = 10_000_000;
    let (run, engine) = simulate_with_sql(&config, scenario).await;
    (run, engine, inventory)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_example_of_the_sql_guide_gives_the_independently_computed_answer() {
    // Not alongside the tests that time /metrics (sql_hostile).
    let _serial = crate::sql_hostile::serial();
    let (run, engine, inv) = faulty_afternoon().await;
    let examples = doc_examples();
    assert_eq!(examples.iter().map(|e| e.0).collect::<Vec<_>>(), (1..=12).collect::<Vec<_>>(), "docs/sql.md has twelve numbered examples");
    // 11 and 12 (outages, availability) run in tests/it/connection.rs, on their own scenario.
    let examples: Vec<_> = examples.into_iter().filter(|e| e.0 <= 10).collect();
    let site_id = |s: u16| inv.site(s).id.clone();
    let window_secs = 10.0;
    // Ground truth from the simulator, per site and direction: bytes per window.
    let mut per_site_windows: BTreeMap<(String, Direction), Vec<u64>> = BTreeMap::new();
    for ((s, d, _), t) in &run.truth.flows {
        per_site_windows.entry((site_id(*s), *d)).or_default().push(t.bytes);
    }
    let mbps_peak =
        |site: &str, d: Direction| per_site_windows.get(&(site.to_string(), d)).into_iter().flatten().max().copied().unwrap_or(0);
    for (n, question, sql) in examples {
        let got = run_query(&engine, &sql).await;
        match n {
            1 => {
                // Congested by the scenario: every commune of Mèo Vạc; and only those exceed 80 %.
                let expected: BTreeSet<String> = inv
                    .sites()
                    .iter()
                    .filter(|s| s.district == "Mèo Vạc" && s.level == "commune")
                    .filter(|s| Direction::ALL.iter().any(|d| mbps_peak(&s.id, *d) as f64 / window_secs / s.capacity_bytes_per_sec() > 0.8))
                    .map(|s| s.id.clone())
                    .collect();
                let communes = inv.sites().iter().filter(|s| s.district == "Mèo Vạc" && s.level == "commune").count();
                assert_eq!(expected.len(), communes, "the scenario congests every commune of Mèo Vạc");
                assert_eq!(strings(&got, "site").into_iter().collect::<BTreeSet<_>>(), expected, "{question}");
                assert!(floats(&got, "peak_utilisation").iter().all(|u| *u > 0.8 && *u < 1.5), "{question}");
            }
            2 => {
                let mut expected: BTreeMap<(String, String), i64> = BTreeMap::new();
                for ((s, d, _), t) in &run.truth.flows {
                    *expected.entry((inv.site(*s).district.clone(), d.as_str().to_string())).or_default() += t.bytes as i64;
                }
                let got: BTreeMap<(String, String), i64> = strings(&got, "district")
                    .into_iter()
                    .zip(strings(&got, "direction"))
                    .zip(ints(&got, "bytes"))
                    .map(|((a, b), c)| ((a, b), c))
                    .collect();
                assert_eq!(got, expected, "{question}");
            }
            3 => {
                let with_traffic: BTreeSet<String> =
                    run.truth.flows.iter().filter(|(_, t)| t.bytes > 0).map(|((s, _, _), _)| site_id(*s)).collect();
                let expected: BTreeSet<String> = inv.sites().iter().map(|s| s.id.clone()).filter(|s| !with_traffic.contains(s)).collect();
                assert_eq!(expected, BTreeSet::from(["dong-van.ta-lung".to_string()]), "the scenario's outage");
                assert_eq!(strings(&got, "site").into_iter().collect::<BTreeSet<_>>(), expected, "{question}");
            }
            4 => {
                let sites = strings(&got, "site");
                assert_eq!(sites.first().map(String::as_str), Some("yen-minh.thang-mo"), "{question}: the scenario's 450 ms site first");
                assert!(floats(&got, "worst_rtt_seconds")[0] >= 0.4, "{question}");
            }
            5 => assert_eq!(strings(&got, "site"), vec!["yen-minh.sung-thai".to_string()], "{question}: the scenario's 80 ms jitter"),
            6 => assert_eq!(strings(&got, "site"), vec!["yen-minh.huu-vinh".to_string()], "{question}: the scenario's 8 % loss"),
            7 => {
                // The same verdicts as the engine's latest evaluation (what /api/readiness serves).
                let engine = run.readiness.engine.read().unwrap();
                let expected: BTreeMap<String, String> = engine
                    .latest()
                    .iter()
                    .filter(|s| s.verdict != siteflow::readiness::Verdict::Ready)
                    .map(|s| (s.site.clone(), s.verdict.as_str().to_string()))
                    .collect();
                let got_map: BTreeMap<String, String> = strings(&got, "site").into_iter().zip(strings(&got, "verdict")).collect();
                assert_eq!(got_map, expected, "{question}");
                for must in ["dong-van.ta-lung", "yen-minh.thang-mo"] {
                    assert!(got_map.contains_key(must), "{question}: {must} is faulty in the scenario");
                }
                assert!(strings(&got, "reasons").iter().any(|r| r.contains("rtt=")), "{question}: reasons name the metric");
            }
            8 => {
                // The scenario's talker: half of Pải Lủng's records go to 203.0.113.250.
                let (sites, peers, bytes) = (strings(&got, "site"), strings(&got, "peer"), ints(&got, "bytes"));
                assert_eq!((sites[0].as_str(), peers[0].as_str()), ("meo-vac.pai-lung", "203.0.113.250"), "{question}");
                let pai_lung = inv.by_id("meo-vac.pai-lung").unwrap();
                let total: u64 = run.truth.flows.iter().filter(|((s, _, _), _)| *s == pai_lung).map(|(_, t)| t.bytes).sum();
                let share = bytes[0] as f64 / total as f64;
                assert!((0.4..0.6).contains(&share), "{question}: the talker's share of Pải Lủng's bytes is {share}");
                talker_within_its_error(&run, &engine, &inv, 100).await;
            }
            9 => {
                let mut peaks: Vec<(i64, String)> =
                    inv.sites().iter().map(|s| (-(mbps_peak(&s.id, Direction::In) as i64), s.id.clone())).collect();
                peaks.sort();
                let expected: Vec<String> = peaks.into_iter().take(5).map(|(_, s)| s).collect();
                assert_eq!(strings(&got, "site"), expected, "{question}");
                let top = mbps_peak(&expected[0], Direction::In) as f64 * 8.0 / window_secs / 1e6;
                assert!((floats(&got, "peak_in_mbps")[0] - top).abs() < 1e-9, "{question}");
            }
            10 => {
                // Recomputed from the raw rows of flows_recent, outside SQL.
                let raw = run_query(&engine, "SELECT * FROM flows_recent").await;
                let mut expected: BTreeMap<String, i64> = BTreeMap::new();
                let (district, level, dir) = (strings(&raw, "district"), strings(&raw, "level"), strings(&raw, "direction"));
                let (src, dst, bytes) = (strings(&raw, "src_addr"), strings(&raw, "dst_addr"), ints(&raw, "bytes"));
                for i in 0..district.len() {
                    if district[i] == "Mèo Vạc" && level[i] == "commune" {
                        let peer = if dir[i] == "in" { &src[i] } else { &dst[i] };
                        *expected.entry(peer.clone()).or_default() += bytes[i];
                    }
                }
                let mut ranked: Vec<(i64, String)> = expected.into_iter().map(|(p, b)| (-b, p)).collect();
                ranked.sort();
                let expected: Vec<(String, i64)> = ranked.into_iter().take(10).map(|(b, p)| (p, -b)).collect();
                let got: Vec<(String, i64)> = strings(&got, "peer").into_iter().zip(ints(&got, "bytes")).collect();
                assert!(!got.is_empty(), "{question}");
                assert_eq!(got, expected, "{question}");
            }
            _ => unreachable!(),
        }
    }
}

/// The scenario's talker, window by window and direction by direction, in table `top_talkers`:
/// listed, with `bytes - error <= true bytes <= bytes` and `error <= window bytes / capacity`
/// (the guarantee of `heavy_hitters`).
async fn talker_within_its_error(run: &SimRun, engine: &SqlEngine, inv: &Inventory, capacity: u64) {
    let pai_lung = inv.by_id("meo-vac.pai-lung").unwrap();
    let got = run_query(
        engine,
        "SELECT window_start, direction, bytes, error FROM top_talkers \
         WHERE site = 'meo-vac.pai-lung' AND (src_addr = '203.0.113.250' OR dst_addr = '203.0.113.250')",
    )
    .await;
    let mut listed: BTreeMap<(i64, String), (u64, u64)> = BTreeMap::new();
    let (starts, directions, bytes, errors) =
        (ints(&got, "window_start"), strings(&got, "direction"), ints(&got, "bytes"), ints(&got, "error"));
    for i in 0..starts.len() {
        let before = listed.insert((starts[i], directions[i].clone()), (bytes[i] as u64, errors[i] as u64));
        assert!(before.is_none(), "the talker is one conversation per window and direction");
    }
    let talker_windows: Vec<_> = run.truth.talkers.iter().filter(|((s, _, _), _)| *s == pai_lung).collect();
    assert!(talker_windows.len() > 10, "the scenario plants the talker in many windows");
    for ((s, direction, start), truth) in talker_windows {
        let d = if *direction == Direction::In { "in" } else { "out" };
        let n = run.truth.flows[&(*s, *direction, *start)].bytes;
        let Some(&(bytes, error)) = listed.get(&(*start, d.to_string())) else {
            panic!("window {start} {d}: the talker ({} of {n} bytes) is not listed", truth.bytes);
        };
        assert!(bytes - error <= truth.bytes && truth.bytes <= bytes, "window {start} {d}: {bytes} - {error} against true {}", truth.bytes);
        assert!(error * capacity <= n, "window {start} {d}: error {error} above {n} bytes / {capacity}");
    }
}

/// A capacity below the conversations per site and window (the bounded regime): the talker is
/// still found in every window, within the stated error, and the site totals are untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_heavy_hitters_capacity_still_finds_the_talker_within_its_error() {
    let _serial = crate::sql_hostile::serial();
    let inventory = Arc::new(Inventory::embedded());
    let scenario =
        Scenario::load(&repo().join("pipelines/hagiang/scenarios/district-congestion.yaml"), &inventory).expect("scenario loads");
    let dir = tempfile::tempdir().unwrap();
    let sql = std::fs::read_to_string(repo().join("pipelines/hagiang/top_talkers.sql")).unwrap();
    let path = dir.path().join("top_talkers.sql");
    std::fs::write(&path, sql.replace("heavy_hitters(100,", "heavy_hitters(3,")).unwrap();
    let mut config = fast_config(300, 3000);
    config.pipeline.top_talkers_sql = Some(figment::value::magic::RelativePathBuf::from(path));
    config.sql.max_rows = 10_000_000;
    // The ad hoc question below reads the recent flows: 20,000 of them answer it well inside
    // sql.timeout_secs in a debug build on a loaded machine (200,000 took over 30 s in CI).
    config.sql.recent_flows_max_rows = 20_000;
    let (run, engine) = simulate_with_sql(&config, scenario).await;
    talker_within_its_error(&run, &engine, &inventory, 3).await;
    // Every row, the talker's or not: at most 3 per group, and an error within N / 3.
    let rows = run_query(&engine, "SELECT window_start, site, direction, error FROM top_talkers").await;
    let (starts, sites, directions, errors) =
        (ints(&rows, "window_start"), strings(&rows, "site"), strings(&rows, "direction"), ints(&rows, "error"));
    let mut per_group: BTreeMap<(i64, &str, &str), usize> = BTreeMap::new();
    for i in 0..starts.len() {
        *per_group.entry((starts[i], &sites[i], &directions[i])).or_default() += 1;
        let d = if directions[i] == "in" { Direction::In } else { Direction::Out };
        let n = run.truth.flows[&(inventory.by_id(&sites[i]).unwrap(), d, starts[i])].bytes;
        assert!(errors[i] as u64 * 3 <= n, "{} {} {}: error {} above {n} / 3", starts[i], sites[i], directions[i], errors[i]);
    }
    assert!(per_group.values().all(|n| *n <= 3), "at most 3 conversations per site, direction and window");
    // The aggregate answers ad hoc questions too, and a bad call is the caller's error.
    let recent = run_query(
        &engine,
        "SELECT site, t.src_addr AS src_addr, t.bytes AS bytes FROM \
         (SELECT site, unnest(heavy_hitters(5, bytes, packets, src_addr)) AS t FROM flows_recent GROUP BY site)",
    )
    .await;
    assert!(!recent.is_empty() && recent.iter().map(RecordBatch::num_rows).sum::<usize>() <= 5 * 242);
    let e = engine.query("SELECT heavy_hitters(0, bytes, packets, src_addr) FROM flows_recent").await.expect_err("capacity 0");
    assert_eq!(e.status(), 400, "{e}");
    assert!(e.to_string().contains("capacity"), "{e}");
    let approximate = errors.iter().filter(|e| **e > 0).count();
    assert!(
        approximate > errors.len() / 4,
        "3 counters for dozens of conversations: most estimates carry an error ({approximate} of {})",
        errors.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_and_file_access_are_refused_and_limits_give_clear_errors() {
    // Not alongside the tests that time /metrics (sql_hostile).
    let _serial = crate::sql_hostile::serial();
    let mut config = fast_config(60, 200);
    config.sql.max_rows = 50;
    let (_, engine) = simulate_with_sql(&config, Scenario::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("out.csv");
    let refused = [
        "CREATE TABLE t AS SELECT 1".to_string(),
        "CREATE VIEW v AS SELECT * FROM sites".to_string(),
        "INSERT INTO sites VALUES ('x','x','x','x','x','x',1.0)".to_string(),
        "DELETE FROM sites".to_string(),
        "DROP TABLE sites".to_string(),
        format!("COPY (SELECT * FROM sites) TO '{}'", target.display()),
        format!("CREATE EXTERNAL TABLE etc STORED AS CSV LOCATION '{}'", dir.path().display()),
        "SET datafusion.execution.batch_size = 1".to_string(),
    ];
    for sql in &refused {
        match engine.query(sql).await {
            Err(e @ SqlError::Forbidden(_)) => assert_eq!(e.status(), 403),
            other => panic!("{sql}: expected a refusal, got {other:?}"),
        }
    }
    assert!(!target.exists(), "COPY wrote nothing");
    // Files by path are not tables.
    for sql in ["SELECT * FROM '/etc/passwd'", "SELECT * FROM read_csv('/etc/passwd')"] {
        let e = engine.query(sql).await.expect_err(sql);
        assert_eq!(e.status(), 400, "{sql}: {e}");
    }
    // Row limit.
    let e = engine.query("SELECT * FROM site_windows").await.expect_err("more rows than max_rows");
    assert!(matches!(e, SqlError::TooManyRows(50)) && e.to_string().contains("sql.max_rows"), "{e}");
    assert_eq!(engine.query("SELECT * FROM site_windows LIMIT 50").await.unwrap().1.iter().map(|b| b.num_rows()).sum::<usize>(), 50);
    // Memory limit: a large aggregation in a 1 MiB pool.
    let mut small = config.clone();
    small.sql.memory_limit_mb = 1;
    small.sql.max_rows = 10_000_000;
    let (_, tight) = simulate_with_sql(&small, Scenario::default()).await;
    let e = tight
        .query("SELECT value % 3000000 AS k, count(*) AS n FROM range(6000000) GROUP BY value % 3000000")
        .await
        .expect_err("over 1 MiB");
    assert!(matches!(e, SqlError::Memory { .. }) && e.to_string().contains("sql.memory_limit_mb"), "{e}");
    // Time limit.
    let mut quick = config.clone();
    quick.sql.timeout_secs = 1;
    quick.sql.max_rows = 10_000_000;
    quick.sql.memory_limit_mb = 4096;
    let (_, quick) = simulate_with_sql(&quick, Scenario::default()).await;
    let e = quick
        .query("SELECT count(*) FROM range(200000000) a WHERE a.value % 7 = 3 AND sqrt(CAST(a.value AS DOUBLE)) > 1")
        .await
        .expect_err("over 1 s");
    assert!(matches!(e, SqlError::Timeout(_)) && e.status() == 408, "{e}");
    // A bad query names the problem.
    let e = engine.query("SELECT nope FROM sites").await.expect_err("unknown column");
    assert!(e.to_string().contains("nope") && e.status() == 400, "{e}");
}

/// A demo instance with a Parquet history directory and an API token.
struct Demo {
    child: crate::support::KillOnDrop,
    addr: std::net::SocketAddr,
    log: std::path::PathBuf,
}

const TOKEN: &str = "s3cret-token";

impl Demo {
    fn start(dir: &std::path::Path, name: &str) -> Self {
        let addr = crate::support::free_addr();
        let log = dir.join(format!("{name}.log"));
        let child = crate::support::siteflow()
            .args(["demo", "--listen", &addr.to_string()])
            .env("SITEFLOW_HISTORY__DIR", dir.join("history"))
            .env("SITEFLOW_HISTORY__FLUSH_INTERVAL_SECS", "2")
            .env("SITEFLOW_SQL__TOKEN", TOKEN)
            // Long enough that the memory limit below is always reached first, even in a debug
            // build on a loaded machine; the timeout case then runs a query without an end.
            .env("SITEFLOW_SQL__TIMEOUT_SECS", "30")
            .env("SITEFLOW_SQL__MEMORY_LIMIT_MB", "16")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Self { child: crate::support::KillOnDrop(child), addr, log }
    }

    /// POSTs a query; returns (status, content type, body).
    fn post(&self, sql: &str, format: Option<&str>, accept: Option<&str>, token: Option<&str>) -> (u16, String, Vec<u8>) {
        let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
        let url = match format {
            Some(f) => format!("http://{}/api/sql?format={f}", self.addr),
            None => format!("http://{}/api/sql", self.addr),
        };
        let mut req = agent.post(&url).header("Content-Type", "text/plain");
        if let Some(a) = accept {
            req = req.header("Accept", a);
        }
        if let Some(t) = token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let Ok(mut resp) = req.send(sql) else { return (0, String::new(), Vec::new()) };
        let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        (resp.status().as_u16(), ct, resp.body_mut().read_to_vec().unwrap())
    }

    fn csv(&self, sql: &str) -> String {
        let (status, _, body) = self.post(sql, Some("csv"), None, Some(TOKEN));
        assert_eq!(status, 200, "{sql}: {}\n{}", String::from_utf8_lossy(&body), self.log_text());
        String::from_utf8(body).unwrap()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops with SIGTERM (the history is written at shutdown) and waits.
    fn stop(mut self) {
        let pid = self.child.0.id().to_string();
        std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let status = self.child.0.wait().unwrap();
        assert!(status.success(), "siteflow exits cleanly on SIGTERM\n{}", self.log_text());
    }
}

const NO_DUPLICATES: &str =
    "SELECT count(*) AS n, count(DISTINCT concat(site, '/', direction, '/', CAST(window_start AS VARCHAR))) AS keys FROM site_windows";

#[test]
fn history_survives_a_restart_without_duplicates_and_the_api_serves_every_format() {
    // Not alongside the tests that time /metrics (sql_hostile).
    let _serial = crate::sql_hostile::serial();
    let dir = tempfile::tempdir().unwrap();
    let demo = Demo::start(dir.path(), "first");
    // Wait for three closed windows: by then some are on disk (flushed every 2 s), some in memory.
    let windows = "SELECT count(DISTINCT window_start) AS w FROM site_windows";
    let ok = crate::kafka_support::wait_until(std::time::Duration::from_secs(90), || {
        let (_, _, body) = demo.post(windows, Some("csv"), None, Some(TOKEN));
        String::from_utf8_lossy(&body).lines().nth(1).and_then(|l| l.parse::<u32>().ok()).is_some_and(|w| w >= 3)
    });
    assert!(ok, "three windows closed\n{}", demo.log_text());
    let on_disk = walk_parquet(&dir.path().join("history/site_windows"));
    assert!(on_disk > 0, "some windows are already in Parquet");
    let counts = demo.csv(NO_DUPLICATES);
    let (n, keys) = counts.lines().nth(1).unwrap().split_once(',').unwrap();
    assert_eq!(n, keys, "each (site, direction, window) once across memory and disk");

    // Formats and errors over HTTP.
    let (status, ct, body) = demo.post("SELECT site, level FROM sites ORDER BY site LIMIT 2", None, None, Some(TOKEN));
    assert_eq!((status, ct.as_str()), (200, "application/json"));
    let rows: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(rows.as_array().unwrap().len(), 2);
    assert!(rows[0]["site"].is_string() && rows[0]["level"].is_string());
    let (status, ct, body) = demo.post("SELECT site FROM sites ORDER BY site", None, Some("text/csv"), Some(TOKEN));
    assert_eq!((status, ct.as_str()), (200, "text/csv; charset=utf-8"));
    assert_eq!(String::from_utf8(body).unwrap().lines().count(), 243, "header + 242 sites");
    let (status, ct, body) = demo.post("SELECT count(*) AS n FROM sites", None, Some("application/vnd.apache.arrow.stream"), Some(TOKEN));
    assert_eq!((status, ct.as_str()), (200, "application/vnd.apache.arrow.stream"));
    let batches: Vec<RecordBatch> =
        datafusion::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None).unwrap().map(|b| b.unwrap()).collect();
    assert_eq!(ints(&batches, "n"), vec![242]);
    let error = |status: u16, body: &[u8], kind: &str| {
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["kind"], kind, "{status}: {v}");
        v["error"].as_str().unwrap().to_string()
    };
    let (status, _, body) = demo.post("SELECT 1", None, None, None);
    assert_eq!(status, 401);
    error(status, &body, "unauthorized");
    let (status, _, body) = demo.post("SELECT 1", None, None, Some("wrong"));
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));
    let (status, _, body) = demo.post("SELEC nonsense", None, None, Some(TOKEN));
    assert_eq!(status, 400);
    assert!(error(status, &body, "invalid_query").contains("SELEC"));
    let (status, _, body) = demo.post("DROP TABLE sites", None, None, Some(TOKEN));
    assert_eq!(status, 403);
    error(status, &body, "forbidden");
    let (status, _, _) = demo.post("SELECT 1", Some("xml"), None, Some(TOKEN));
    assert_eq!(status, 400);
    // Past the limits: clear errors, 4xx.
    let (status, _, body) = demo.post("SELECT * FROM range(200000)", None, None, Some(TOKEN));
    assert_eq!(status, 413);
    assert!(error(status, &body, "too_many_rows").contains("sql.max_rows"));
    let (status, _, body) =
        // 200-byte keys: 16 MiB is reached within about 80,000 groups, quickly even in a debug build on a loaded machine.
        demo.post(
            "SELECT count(*) FROM (SELECT concat(repeat('k', 200), CAST(value AS VARCHAR)) AS k, count(*) FROM range(400000) GROUP BY 1)",
            None,
            None,
            Some(TOKEN),
        );
    assert_eq!(status, 413, "{}", String::from_utf8_lossy(&body));
    assert!(error(status, &body, "memory_limit").contains("sql.memory_limit_mb"));
    let (status, _, body) =
        demo.post("SELECT count(*) FROM range(9000000000000000000) WHERE sqrt(CAST(value AS DOUBLE)) > 1", None, None, Some(TOKEN));
    assert_eq!(status, 408, "{}", String::from_utf8_lossy(&body));
    assert!(error(status, &body, "timeout").contains("sql.timeout_secs"));
    // After refused and failed queries, the service still serves.
    let (status, metrics) = crate::support::http_get(demo.addr, "/metrics").unwrap();
    assert!(status == 200 && metrics.contains("siteflow_windows_closed_total"));

    // The CLI: same answer as the API, as a table, CSV and JSON.
    let cli = |args: &[&str]| {
        let out = crate::support::siteflow()
            .args(["sql", "--url", &format!("http://{}", demo.addr), "--token", TOKEN])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "siteflow sql {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let q = "SELECT site, level FROM sites WHERE district = 'Mèo Vạc' ORDER BY site";
    assert_eq!(cli(&["--format", "csv", q]), demo.csv(q));
    let table = cli(&[q]);
    assert!(table.contains("| site ") && table.contains("meo-vac.") && table.trim_end().ends_with("rows)"), "{table}");
    let json: serde_json::Value = serde_json::from_str(&cli(&["--format", "json", q])).unwrap();
    assert_eq!(json.as_array().unwrap().len(), demo.csv(q).lines().count() - 1);
    let out = crate::support::siteflow().args(["sql", "--url", &format!("http://{}", demo.addr), "SELECT 1"]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Bearer"), "no token: a clear error");

    // Restart on the same history: the windows seen before are the same rows.
    // The newest window first, then the rows up to it (a window may close in between).
    let last: String = demo.csv("SELECT max(window_start) AS m FROM site_windows").lines().nth(1).unwrap().to_string();
    let up_to_last =
        format!("SELECT * FROM site_windows WHERE window_start <= CAST('{last}' AS TIMESTAMP) ORDER BY window_start, site, direction");
    let before = demo.csv(&up_to_last);
    demo.stop();
    let offline = crate::support::siteflow()
        .args(["sql", "--data", dir.path().join("history").to_str().unwrap(), "--format", "csv", NO_DUPLICATES])
        .output()
        .unwrap();
    assert!(offline.status.success(), "{}", String::from_utf8_lossy(&offline.stderr));
    let offline = String::from_utf8(offline.stdout).unwrap();
    let (n, keys) = offline.lines().nth(1).unwrap().split_once(',').unwrap();
    assert_eq!(n, keys, "history on disk has no duplicates");
    let again = Demo::start(dir.path(), "second");
    let ok = crate::kafka_support::wait_until(std::time::Duration::from_secs(30), || {
        crate::support::http_get(again.addr, "/healthz").is_ok_and(|(s, _)| s == 200)
    });
    assert!(ok, "{}", again.log_text());
    let after = again.csv(&up_to_last);
    if after != before {
        let (b, a): (BTreeSet<&str>, BTreeSet<&str>) = (before.lines().collect(), after.lines().collect());
        let lost: Vec<_> = b.difference(&a).take(5).collect();
        let new: Vec<_> = a.difference(&b).take(5).collect();
        panic!(
            "history after a restart differs: {} rows before, {} after; lost {lost:?}; new {new:?}\n{}",
            before.lines().count(),
            after.lines().count(),
            again.log_text()
        );
    }
    assert!(before.lines().count() > 484, "at least one full window compared");
}

fn walk_parquet(dir: &std::path::Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            n += walk_parquet(&p);
        } else if p.extension().is_some_and(|x| x == "parquet") {
            n += 1;
        }
    }
    n
}
