//! Connection status end to end through the real pipeline (fast simulator, scenario
//! `uplink-failures.yaml`): the outages SQL table, daily availability, the readiness verdicts
//! and /metrics agree with the scenario and with each other.

use std::collections::{BTreeMap, BTreeSet};

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type};
use siteflow::inventory::Inventory;
use siteflow::readiness::connection::{Cause, State};
use siteflow::readiness::{Metric, Verdict};
use siteflow::source::simulator::Scenario;

use crate::support::{fast_config, repo, simulate_with_sql};

const S: i64 = 1_000_000_000;

fn column(batches: &[RecordBatch], name: &str, to: &DataType) -> Vec<Option<String>> {
    batches
        .iter()
        .flat_map(|b| {
            let c = cast(b.column_by_name(name).unwrap_or_else(|| panic!("column {name}")), to).unwrap();
            let c = cast(&c, &DataType::Utf8).unwrap();
            let c = c.as_string::<i32>();
            (0..c.len()).map(|i| c.is_valid(i).then(|| c.value(i).to_string())).collect::<Vec<_>>()
        })
        .collect()
}

fn ns(batches: &[RecordBatch], name: &str) -> Vec<Option<i64>> {
    batches
        .iter()
        .flat_map(|b| {
            let c = cast(b.column_by_name(name).unwrap(), &DataType::Int64).unwrap();
            let c = c.as_primitive::<Int64Type>().clone();
            (0..c.len()).map(move |i| c.is_valid(i).then(|| c.value(i))).collect::<Vec<_>>()
        })
        .collect()
}

fn floats(batches: &[RecordBatch], name: &str) -> Vec<Option<f64>> {
    batches
        .iter()
        .flat_map(|b| {
            let c = cast(b.column_by_name(name).unwrap(), &DataType::Float64).unwrap();
            let c = c.as_primitive::<Float64Type>().clone();
            (0..c.len()).map(move |i| c.is_valid(i).then(|| c.value(i))).collect::<Vec<_>>()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_failures_give_outages_availability_and_one_cause() {
    let inventory = Inventory::embedded();
    let scenario = Scenario::load(&repo().join("pipelines/hagiang/scenarios/uplink-failures.yaml"), &inventory).unwrap();
    let config = fast_config(360, 200);
    let t0 = config.simulator.start_unix_secs.unwrap() as i64 * S;
    let window = config.window.size_secs as i64 * S;
    let (run, engine) = simulate_with_sql(&config, scenario).await;

    let district = "meo-vac.ubnd";
    let district_idx = inventory.by_id(district).unwrap();
    let behind: BTreeSet<String> = inventory.select(None, None, Some(district_idx)).iter().map(|&s| inventory.site(s).id.clone()).collect();
    assert!(behind.len() >= 15, "Mèo Vạc has its communes behind its office: {behind:?}");

    // The outages table: Lũng Cú's one outage, 60 s to 180 s after the start, each within a
    // window; the district's and its communes' outages from 200 s, still going on.
    let (_, rows) =
        engine.query("SELECT site, start, \"end\", duration_seconds, cause, upstream FROM outages ORDER BY site").await.unwrap();
    let sites = column(&rows, "site", &DataType::Utf8);
    let (starts, ends) = (ns(&rows, "start"), ns(&rows, "end"));
    let (causes, upstreams) = (column(&rows, "cause", &DataType::Utf8), column(&rows, "upstream", &DataType::Utf8));
    let durations = floats(&rows, "duration_seconds");
    let mut expected: BTreeSet<String> = behind.clone();
    expected.insert(district.into());
    expected.insert("dong-van.lung-cu".into());
    let got: Vec<String> = sites.iter().map(|s| s.clone().unwrap()).collect();
    assert_eq!(got.iter().cloned().collect::<BTreeSet<_>>(), expected, "the sites with an outage");
    assert_eq!(got.len(), expected.len(), "one outage each (no flapping): {got:?}");
    let near = |t: Option<i64>, secs: i64| t.is_some_and(|t| (t - (t0 + secs * S)).abs() <= window);
    for (i, site) in got.iter().enumerate() {
        if site == "dong-van.lung-cu" {
            assert!(near(starts[i], 60) && near(ends[i], 180), "{site}: {:?} – {:?}", starts[i], ends[i]);
            assert!((durations[i].unwrap() - 120.0).abs() <= 10.0, "{:?}", durations[i]);
            assert_eq!((causes[i].as_deref(), upstreams[i].as_deref()), (Some("link_down"), None), "its uplink reports it");
        } else {
            assert!(near(starts[i], 200), "{site}: starts {:?}", starts[i]);
            assert_eq!((ends[i], durations[i]), (None, None), "{site}: still down at the end");
            let cause = if site == district { (Some("link_down"), None) } else { (Some("upstream_down"), Some(district)) };
            assert_eq!((causes[i].as_deref(), upstreams[i].as_deref()), cause, "{site}");
        }
    }

    // Daily availability of Lũng Cú: computed from the scenario, the run's evaluated time
    // minus the fault's two minutes, to within two windows (detection and recovery each take
    // rounds); and exactly the gauge's figure, counted the same way.
    let (_, rows) = engine
        .query("SELECT up_seconds, down_seconds, availability FROM availability_daily WHERE site = 'dong-van.lung-cu'")
        .await
        .unwrap();
    assert_eq!(rows.iter().map(|b| b.num_rows()).sum::<usize>(), 1, "one day");
    let (up, down, sql_availability) =
        (floats(&rows, "up_seconds")[0].unwrap(), floats(&rows, "down_seconds")[0].unwrap(), floats(&rows, "availability")[0].unwrap());
    assert!((down - 120.0).abs() <= 2.0 * window as f64 / 1e9, "down {down} s");
    let expected_availability = 1.0 - 120.0 / (up + down);
    assert!((sql_availability - expected_availability).abs() <= 20.0 / (up + down), "{sql_availability} vs {expected_availability}");
    let engine_state = run.readiness.engine.read().unwrap();
    let latest = |id: &str| engine_state.latest().iter().find(|s| s.site == id).unwrap().clone();
    assert_eq!(latest("dong-van.lung-cu").availability_month, Some(sql_availability), "gauge and SQL agree");

    // Verdicts: the district and its communes are not ready because they are down, naming
    // the cause; Lũng Cú is up again; no other site is down.
    let office = latest(district);
    assert_eq!((office.connection.state, office.connection.cause), (State::Down, Cause::LinkDown));
    assert_eq!(office.verdict, Verdict::NotReady);
    assert_eq!(office.reasons[0].metric, Metric::Connection, "{:?}", office.reasons);
    for id in &behind {
        let s = latest(id);
        assert_eq!(
            (s.connection.state, s.connection.cause, s.connection.upstream.as_deref()),
            (State::Down, Cause::UpstreamDown, Some(district))
        );
        assert_eq!(s.verdict, Verdict::NotReady);
    }
    assert_eq!(latest("dong-van.lung-cu").connection.state, State::Up);
    for s in engine_state.latest() {
        if !expected.contains(&s.site) {
            assert_eq!(s.connection.state, State::Up, "{}: {:?}", s.site, s.connection);
        }
    }
    drop(engine_state);

    // /metrics: one site down on its own (the district), its communes down behind it, and the
    // roll-up "N of N sites below it are down with it".
    let families = siteflow::sink::readiness::collect(&run.readiness);
    let series = |name: &str| -> Vec<(BTreeMap<String, String>, f64)> {
        let f = families.iter().find(|f| f.name() == name).unwrap_or_else(|| panic!("{name}"));
        f.get_metric()
            .iter()
            .map(|m| (m.get_label().iter().map(|l| (l.name().to_string(), l.value().to_string())).collect(), m.get_gauge().get_value()))
            .collect()
    };
    let down_on_their_own: Vec<String> = series("siteflow_site_up")
        .into_iter()
        .filter(|(l, v)| *v == 0.0 && l["cause"] != "upstream_down")
        .map(|(l, _)| l["site"].clone())
        .collect();
    assert_eq!(down_on_their_own, vec![district.to_string()]);
    let upstream_down: BTreeSet<String> = series("siteflow_site_up")
        .into_iter()
        .filter(|(l, v)| *v == 0.0 && l["cause"] == "upstream_down" && l["upstream"] == district)
        .map(|(l, _)| l["site"].clone())
        .collect();
    assert_eq!(upstream_down, behind);
    let rollup: Vec<(String, String, f64)> = series("siteflow_site_down_below")
        .into_iter()
        .filter(|(_, v)| *v > 0.0)
        .map(|(l, v)| (l["site"].clone(), l["below"].clone(), v))
        .collect();
    assert_eq!(rollup, vec![(district.to_string(), behind.len().to_string(), behind.len() as f64)]);
    let since = series("siteflow_site_connection_since_timestamp_seconds");
    let office_since = since.iter().find(|(l, _)| l["site"] == district).unwrap().1;
    assert!((office_since - (t0 / S + 200) as f64).abs() <= (window / S) as f64, "outage start on /metrics: {office_since}");

    // A meeting's report: the cut-off participants are not ready and at risk, with their
    // connection status; Lũng Cú is up again.
    let spec: siteflow::readiness::MeetingSpec = serde_yaml::from_str(
        "id: m\ntitle: giao ban\nstart: 2025-11-24T23:30:00+07:00\nduration_mins: 60\nparticipants: [{under: meo-vac.ubnd}, {sites: [meo-vac.ubnd, dong-van.lung-cu]}]",
    )
    .unwrap();
    run.readiness.add_meeting(spec).unwrap();
    let report = run.readiness.meeting_report("m").unwrap();
    assert_eq!(report.participants.len(), behind.len() + 2);
    for p in &report.participants {
        if p.site == "dong-van.lung-cu" {
            assert_eq!(p.connection.state, State::Up);
        } else {
            assert_eq!((p.status, p.at_risk, p.connection.state), (Verdict::NotReady, true, State::Down), "{}", p.site);
        }
    }

    // docs/sql.md questions 11 and 12, on this run.
    let examples = crate::sql::doc_examples();
    let sql_of = |n: usize| examples.iter().find(|e| e.0 == n).unwrap_or_else(|| panic!("docs/sql.md question {n}")).2.clone();
    // 11: availability per district. From the scenario: each of the district office's and its
    // communes' windows from 200 s on is down; Đồng Văn loses Lũng Cú's two minutes; every
    // other district is always up. Within two windows per site of that.
    let (_, rows) = engine.query(&sql_of(11)).await.unwrap();
    let districts = column(&rows, "district", &DataType::Utf8);
    let availability = floats(&rows, "availability");
    let got: BTreeMap<String, f64> =
        districts.into_iter().map(|d| d.unwrap_or_default()).zip(availability.into_iter().map(Option::unwrap)).collect();
    let (_, known) = engine
        .query("SELECT district, sum(up_seconds) + sum(down_seconds) AS known, count(DISTINCT site) AS sites FROM availability_daily GROUP BY district")
        .await
        .unwrap();
    let known: BTreeMap<String, (f64, f64)> = column(&known, "district", &DataType::Utf8)
        .into_iter()
        .map(|d| d.unwrap_or_default())
        .zip(floats(&known, "known").into_iter().map(Option::unwrap).zip(floats(&known, "sites").into_iter().map(Option::unwrap)))
        .collect();
    let run_end = 360.0;
    for (d, a) in &got {
        let (known_secs, sites) = known[d];
        let down_sites = expected.iter().filter(|id| inventory.site(inventory.by_id(id).unwrap()).district == *d);
        let down_secs: f64 = down_sites.map(|id| if id == "dong-van.lung-cu" { 120.0 } else { run_end - 200.0 }).sum();
        let expected_a = 1.0 - down_secs / known_secs;
        let tolerance = 2.0 * sites * (window / S) as f64 / known_secs;
        assert!((a - expected_a).abs() <= tolerance, "{d}: availability {a}, from the scenario {expected_a} ± {tolerance}");
    }
    let order: Vec<&String> = got.iter().filter(|(_, a)| **a < 1.0).map(|(d, _)| d).collect();
    assert_eq!(order.len(), 2, "Mèo Vạc and Đồng Văn lost time: {got:?}");
    assert!(got["Mèo Vạc"] < got["Đồng Văn"], "{got:?}");
    // 12: outages not caused upstream, ongoing first: the district (with its communes behind
    // it), then Lũng Cú.
    let (_, rows) = engine.query(&sql_of(12)).await.unwrap();
    let sites: Vec<String> = column(&rows, "site", &DataType::Utf8).into_iter().map(Option::unwrap).collect();
    assert_eq!(sites, vec![district.to_string(), "dong-van.lung-cu".to_string()]);
    let behind_counts: Vec<String> = column(&rows, "sites_behind", &DataType::Utf8).into_iter().map(Option::unwrap).collect();
    assert_eq!(behind_counts, vec![behind.len().to_string(), "0".to_string()]);
}

/// A maintenance window over Lũng Cú's outage: its time counts for neither up nor down, the
/// outage is `planned`, and /metrics says so while it lasts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_maintenance_is_left_out_of_availability() {
    let inventory = Inventory::embedded();
    let scenario = Scenario::load(&repo().join("pipelines/hagiang/scenarios/uplink-failures.yaml"), &inventory).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = fast_config(360, 200);
    let t0 = config.simulator.start_unix_secs.unwrap() as i64;
    let at = |secs: i64| chrono::DateTime::from_timestamp(t0 + secs, 0).unwrap().to_rfc3339();
    // From 50 s to the end of the run: the whole outage and more.
    let file = crate::support::write(
        dir.path(),
        "maintenance.yaml",
        &format!(
            "maintenance:\n  - reason: uplink replaced\n    start: {}\n    end: {}\n    sites:\n      - sites: [dong-van.lung-cu]\n",
            at(50),
            at(400)
        ),
    );
    config.readiness.maintenance = Some(figment::value::magic::RelativePathBuf::from(file));
    let (run, engine) = simulate_with_sql(&config, scenario).await;

    let (_, rows) = engine
        .query("SELECT up_seconds, down_seconds, maintenance_seconds, availability FROM availability_daily WHERE site = 'dong-van.lung-cu'")
        .await
        .unwrap();
    let (up, down) = (floats(&rows, "up_seconds")[0].unwrap(), floats(&rows, "down_seconds")[0].unwrap());
    let planned = floats(&rows, "maintenance_seconds")[0].unwrap();
    assert_eq!((down, floats(&rows, "availability")[0]), (0.0, Some(1.0)), "its outage was planned");
    // The windows from 50 s (the one holding it) to the end of the run.
    assert!((planned - 310.0).abs() <= 10.0, "maintenance {planned} s");
    assert!(up > 0.0 && up <= 50.0, "up before the maintenance: {up} s");
    let (_, rows) = engine.query("SELECT site, planned FROM outages ORDER BY site").await.unwrap();
    let planned_by_site: BTreeMap<String, String> = column(&rows, "site", &DataType::Utf8)
        .into_iter()
        .map(Option::unwrap)
        .zip(column(&rows, "planned", &DataType::Utf8).into_iter().map(Option::unwrap))
        .collect();
    assert_eq!(planned_by_site["dong-van.lung-cu"], "true");
    assert_eq!(planned_by_site["meo-vac.ubnd"], "false", "not in the window");

    let state = run.readiness.engine.read().unwrap();
    let lung_cu = state.latest().iter().find(|s| s.site == "dong-van.lung-cu").unwrap();
    assert_eq!((lung_cu.maintenance.as_deref(), lung_cu.availability_month), (Some("uplink replaced"), Some(1.0)), "gauge and SQL agree");
    drop(state);
    let families = siteflow::sink::readiness::collect(&run.readiness);
    let maintenance = families.iter().find(|f| f.name() == "siteflow_site_maintenance").unwrap();
    let sites: Vec<&str> =
        maintenance.get_metric().iter().flat_map(|m| m.get_label().iter().filter(|l| l.name() == "site").map(|l| l.value())).collect();
    assert_eq!(sites, vec!["dong-van.lung-cu"]);

    // A bad file stops the run before it starts, naming the file and the entry.
    let bad = crate::support::write(
        dir.path(),
        "bad.yaml",
        "maintenance:\n  - reason: x\n    start: 2026-12-05T22:00:00+07:00\n    end: 2026-12-05T21:00:00+07:00\n    sites: [{sites: [meo-vac.ubnd]}]\n",
    );
    config.readiness.maintenance = Some(figment::value::magic::RelativePathBuf::from(bad.clone()));
    let e = siteflow::pipeline::Resources::load(&config).err().expect("refused").to_string();
    assert!(e.contains(&format!("{}: maintenance[0]: end", bad.display())), "{e}");
}

/// The rows (CSV lines, header left out) of `sql` asked of the siteflow serving at `http`
/// through `siteflow sql`.
fn sql_rows(http: std::net::SocketAddr, sql: &str) -> Vec<String> {
    let out = crate::support::run_siteflow(&["sql", "--url", &format!("http://{http}"), "--format", "csv", sql], &[]);
    assert!(out.status.success(), "{sql}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().skip(1).map(String::from).collect()
}

/// One `siteflow run` over `text` as a file of `format`, with `dir`'s `sites.csv` and the
/// history in `dir/history`; returns once it has published every window of the file (it keeps
/// serving until SIGTERM), with its HTTP address and log.
fn replay_file(
    dir: &std::path::Path,
    name: &str,
    format: &str,
    text: &str,
) -> (crate::support::KillOnDrop, std::net::SocketAddr, std::path::PathBuf) {
    crate::support::write(dir, &format!("{name}.jsonl"), text);
    let http = crate::support::free_addr();
    let config = crate::support::write(
        dir,
        &format!("{name}.yaml"),
        &format!(
            "inventory:\n  sites_csv: sites.csv\nsource:\n  kind: file\n  files:\n    - {{ path: {name}.jsonl, format: {format} }}\nhttp: {{ listen: \"{http}\" }}\nhistory: {{ dir: history }}\n"
        ),
    );
    let log = dir.join(format!("{name}.log"));
    let child = crate::support::siteflow()
        .args(["run", "--config", config.to_str().unwrap()])
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let child = crate::support::KillOnDrop(child);
    let finished = crate::kafka_support::wait_until(std::time::Duration::from_secs(120), || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("replay finished")
    });
    assert!(finished, "no end of the replay: {}", std::fs::read_to_string(&log).unwrap_or_default());
    (child, http, log)
}

/// Uplink link state end to end: Telegraf SNMP interface samples (`ifOperStatus`) and pings of
/// three sites replayed from a file through `siteflow run`, an inventory with `uplinks`, and the
/// outages read back over SQL. A's only uplink goes down for two minutes: one outage, cause
/// `link_down`, from the first down sample to the first answered round after it. B loses one of
/// its two uplinks: still up, no outage.
#[test]
fn uplinks_reported_down_over_snmp_are_outages() {
    let dir = tempfile::tempdir().unwrap();
    let t0: i64 = 1_764_000_000;
    let sites = "site_id,name,level,kind,parent_id,district,admin_code,link_mbps,prefix,exporter,uplinks\n\
                 hub,Hub,district,office,,D,1,100,10.9.0.0/24,172.16.9.10,Gi0/0\n\
                 a,A,commune,commune,hub,D,2,20,10.9.1.0/24,172.16.9.1,Gi0/0\n\
                 b,B,commune,commune,hub,D,3,20,10.9.2.0/24,172.16.9.2,Gi0/0; Gi0/5@pe-hub\n";
    crate::support::write(dir.path(), "sites.csv", sites);
    // (device, interface, site, probed address) of each uplink.
    let uplinks = [
        ("172.16.9.10", "Gi0/0", "hub", "10.9.0.1"),
        ("172.16.9.1", "Gi0/0", "a", "10.9.1.1"),
        ("172.16.9.2", "Gi0/0", "b", "10.9.2.1"),
        ("pe-hub", "Gi0/5", "b", ""),
    ];
    let a_down = |t: i64| (120..240).contains(&t);
    let b_first_down = |t: i64| (300..360).contains(&t);
    // The samples of `[from, to)` seconds after t0, as Telegraf writes them.
    let telegraf = |from: i64, to: i64| {
        let mut lines = Vec::new();
        for t in (from..to).step_by(5) {
            for (device, interface, site, addr) in uplinks {
                let down = (site == "a" && a_down(t)) || (device == "172.16.9.2" && b_first_down(t));
                if t % 10 == 0 {
                    let octets = t as u64 * 1_000_000;
                    lines.push(format!(
                        r#"{{"fields":{{"ifHCInOctets":{octets},"ifHCOutOctets":{octets},"ifOperStatus":{},"ifHighSpeed":100}},"name":"interface","tags":{{"agent_host":"{device}","ifName":"{interface}"}},"timestamp":{}}}"#,
                        if down { 2 } else { 1 },
                        t0 + t
                    ));
                }
                if !addr.is_empty() {
                    let lost = site == "a" && a_down(t);
                    let fields = if lost {
                        r#""packets_received":0,"packets_transmitted":10,"percent_packet_loss":100"#.to_string()
                    } else {
                        r#""average_response_ms":20.5,"packets_received":10,"packets_transmitted":10,"percent_packet_loss":0,"standard_deviation_ms":1.5"#.to_string()
                    };
                    lines.push(format!(
                        r#"{{"fields":{{{fields}}},"name":"ping","tags":{{"host":"probe-1","url":"{addr}"}},"timestamp":{}}}"#,
                        t0 + t
                    ));
                }
            }
        }
        lines.join("\n") + "\n"
    };
    let replay = |name: &str, text: &str| replay_file(dir.path(), name, "telegraf_json", text);
    let (mut first, http, _) = replay("first", &telegraf(0, 600));
    let outages = "SELECT site, cast(date_part('epoch', start) AS BIGINT) AS s, cast(date_part('epoch', \"end\") AS BIGINT) AS e, cause FROM outages ORDER BY site";
    assert_eq!(sql_rows(http, outages), [format!("a,{},{},link_down", t0 + 120, t0 + 240)]);
    // B is up on its other uplink (a port of another device, placed by the inventory).
    let (_, metrics) = crate::support::http_get(http, "/metrics").unwrap();
    assert!(metrics.contains(r#"siteflow_site_up{site="b",district="D",level="commune",cause="answered",upstream=""} 1"#), "{metrics}");

    // A restart within the month (SIGTERM writes the history), then five healthy minutes: the
    // month's availability gauge goes on from the history, equal to SQL's figure for the
    // month, outage included (counting from the restart alone it would be 1).
    let _ = std::process::Command::new("kill").args(["-TERM", &first.0.id().to_string()]).status();
    assert!(first.0.wait().unwrap().success(), "the first run stops cleanly on SIGTERM");
    let (_second, http, log) = replay("second", &telegraf(600, 900));
    let month = "SELECT sum(up_seconds) / (sum(up_seconds) + sum(down_seconds)) AS a FROM availability_daily WHERE site = 'a'";
    let sql_month: f64 = sql_rows(http, month)[0].parse().unwrap();
    assert!(sql_month < 0.9, "the month holds the first run's outage: {sql_month}");
    let (_, metrics) = crate::support::http_get(http, "/metrics").unwrap();
    let gauge: f64 = metrics
        .lines()
        .find(|l| l.starts_with(r#"siteflow_site_availability_month_ratio{site="a""#))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no availability gauge for a: {metrics}"));
    assert!((gauge - sql_month).abs() < 1e-9, "gauge {gauge}, SQL {sql_month}");
    let log = std::fs::read_to_string(log).unwrap();
    assert!(log.contains("this month's availability read back from the history"), "{log}");
}

/// sFlow's interface state end to end: sfacctd's counter stream (generic interface records, as
/// sfacctd 1.7.7 writes them: `ifStatus` bit 1 is the link) replayed through `siteflow run`,
/// the uplink declared by `ifIndex`. The site's link reports down from 120 s to 240 s: one
/// outage, cause `link_down`, over those two minutes; the counters give its utilisation.
#[test]
fn uplinks_reported_down_over_sflow_are_outages() {
    let dir = tempfile::tempdir().unwrap();
    let t0: i64 = 1_764_000_000;
    let sites = "site_id,name,level,kind,parent_id,district,admin_code,link_mbps,prefix,exporter,uplinks\n\
                 a,A,commune,commune,,D,2,20,10.9.1.0/24,192.0.2.1,3\n";
    crate::support::write(dir.path(), "sites.csv", sites);
    let mut lines = Vec::new();
    for t in (0..600).step_by(10) {
        let status = if (120..240).contains(&t) { 1 } else { 3 };
        // 1 Mbit/s each way on the uplink, ifIndex 3; ifIndex 4 (not an uplink) always down.
        for (index, status) in [(3, status), (4, 1)] {
            let octets = t as u64 * 125_000;
            let stamp = chrono::DateTime::from_timestamp(t0 + t, 0).unwrap().format("%Y-%m-%d %H:%M:%S%.6f");
            lines.push(format!(
                r#"{{"seq": {t}, "timestamp": "{stamp}", "peer_ip_src": "192.0.2.1", "event_type": "log", "source_id_index": {index}, "sflow_seq": {t}, "sflow_cnt_seq": {t}, "sf_cnt_type": "sflow_cnt_generic", "ifIndex": {index}, "ifType": 6, "ifSpeed": 20000000, "ifDirection": 1, "ifStatus": {status}, "ifInOctets": {octets}, "ifInUcastPkts": 0, "ifOutOctets": {octets}, "ifOutUcastPkts": 0}}"#
            ));
        }
    }
    let (_child, http, _) = replay_file(dir.path(), "counters", "pmacct_sflow_counters_json", &(lines.join("\n") + "\n"));
    let outages = "SELECT site, cast(date_part('epoch', start) AS BIGINT) AS s, cast(date_part('epoch', \"end\") AS BIGINT) AS e, cause FROM outages ORDER BY site";
    assert_eq!(sql_rows(http, outages), [format!("a,{},{},link_down", t0 + 120, t0 + 240)]);
    // The counters measure the link: 1 Mbit/s of 20 each way.
    let sql = "SELECT DISTINCT utilisation_source FROM readiness WHERE utilisation_source IS NOT NULL";
    assert_eq!(sql_rows(http, sql), ["counters"]);
    let (_, metrics) = crate::support::http_get(http, "/metrics").unwrap();
    for direction in ["in", "out"] {
        let prefix = format!(r#"siteflow_site_utilisation_ratio{{site="a",district="D",level="commune",direction="{direction}"}} "#);
        let value: f64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix)?.parse().ok())
            .unwrap_or_else(|| panic!("no utilisation {direction} for a: {metrics}"));
        assert!((value - 0.05).abs() < 0.001, "{direction}: {value}");
    }
}

/// Flows against the uplinks' counters (scenario `flows-vs-counters.yaml`): every healthy site's
/// ratio inside the policy's band; Kim Thạch's exporter without its sampling rate at a
/// hundredth, its utilisation still right (from the counters); Tam Sơn's reported speed half
/// its inventory's, its utilisation against the reported speed. Utilisation is checked against
/// the simulator's own bytes; /metrics and SQL show the same ratios.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flows_are_checked_against_the_uplinks_counters() {
    let inventory = Inventory::embedded();
    let scenario = Scenario::load(&repo().join("pipelines/hagiang/scenarios/flows-vs-counters.yaml"), &inventory).unwrap();
    let config = fast_config(360, 600);
    let window_secs = config.window.size_secs as f64;
    let (run, engine) = simulate_with_sql(&config, scenario).await;
    let state = run.readiness.engine.read().unwrap();
    let band = state.policy().flow_counter_band;
    let latest = |id: &str| state.latest().iter().find(|s| s.site == id).unwrap().clone();
    let (kim_thach, tam_son) = ("vi-xuyen.kim-thach", "quan-ba.tam-son");
    for s in state.latest() {
        let traffic = s.traffic.as_ref().unwrap_or_else(|| panic!("{}: no traffic", s.site));
        assert_eq!(traffic.source, "counters", "{}", s.site);
        for r in s.flow_counter_ratio.iter().map(|r| r.unwrap_or_else(|| panic!("{}: no ratio", s.site))) {
            if s.site == kim_thach {
                assert!((r - 0.01).abs() < 0.002, "{}: {r}", s.site);
            } else {
                assert!(r > band.min && r < band.max, "{}: ratio {r} outside the band", s.site);
            }
        }
    }
    // Utilisation from the counters, against the simulator's bytes of the period's windows
    // (but the run's first, partial one) over the reported speed.
    let period_windows: Vec<i64> = {
        let end = state.evaluated_at_ns().unwrap();
        let first = end - state.policy().period_secs as i64 * S;
        let mut w: Vec<i64> = run.truth.flows.keys().map(|(_, _, w)| *w).filter(|w| *w >= first && *w < end).collect();
        w.sort_unstable();
        w.dedup();
        w
    };
    for (id, mbps) in [(kim_thach, 20.0), (tam_son, 25.0), ("dong-van.ta-lung", 20.0)] {
        let idx = inventory.by_id(id).unwrap();
        let site = latest(id);
        let t = site.traffic.as_ref().unwrap();
        assert_eq!(t.capacity_bytes_per_second, mbps * 1e6 / 8.0, "{id}");
        for d in siteflow::enrich::Direction::ALL {
            let bytes: u64 = period_windows.iter().map(|w| run.truth.flows.get(&(idx, d, *w)).map_or(0, |t| t.bytes)).sum();
            let expected = bytes as f64 / (period_windows.len() as f64 * window_secs) / (mbps * 1e6 / 8.0);
            let got = t.utilisation_mean_ratio[d as usize];
            assert!((got - expected).abs() <= 0.05 * expected, "{id} {d:?}: utilisation {got}, from the simulator {expected}");
        }
    }
    assert_eq!(latest(tam_son).link_speed_bits_per_second, Some(25e6));
    drop(state);

    let families = siteflow::sink::readiness::collect(&run.readiness);
    let value = |name: &str, site: &str, extra: Option<(&str, &str)>| -> f64 {
        let f = families.iter().find(|f| f.name() == name).unwrap_or_else(|| panic!("{name}"));
        let m = f.get_metric().iter().find(|m| {
            let has = |k: &str, v: &str| m.get_label().iter().any(|l| l.name() == k && l.value() == v);
            has("site", site) && extra.is_none_or(|(k, v)| has(k, v))
        });
        m.unwrap_or_else(|| panic!("{name} for {site}")).get_gauge().get_value()
    };
    assert_eq!(value("siteflow_site_link_speed_ratio", tam_son, None), 0.5);
    let ratio_in = value("siteflow_site_flow_counter_ratio", kim_thach, Some(("direction", "in")));
    assert!((ratio_in - 0.01).abs() < 0.002, "{ratio_in}");
    // SQL: the readiness table's last evaluation has the same ratio.
    let (_, rows) = engine
        .query(&format!(
            "SELECT flow_counter_ratio_in, utilisation_source FROM readiness WHERE site = '{kim_thach}' ORDER BY window_end DESC LIMIT 1"
        ))
        .await
        .unwrap();
    assert_eq!(floats(&rows, "flow_counter_ratio_in")[0], Some(ratio_in));
    assert_eq!(column(&rows, "utilisation_source", &DataType::Utf8)[0].as_deref(), Some("counters"));
}
