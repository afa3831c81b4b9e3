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
    let behind: BTreeSet<String> =
        inventory.select(None, None, Some(district_idx)).iter().map(|&s| inventory.site(s).id.clone()).collect();
    assert!(behind.len() >= 15, "Mèo Vạc has its communes behind its office: {behind:?}");

    // The outages table: Lũng Cú's one outage, 60 s to 180 s after the start, each within a
    // window; the district's and its communes' outages from 200 s, still going on.
    let (_, rows) = engine.query("SELECT site, start, \"end\", duration_seconds, cause, upstream FROM outages ORDER BY site").await.unwrap();
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
            assert_eq!((causes[i].as_deref(), upstreams[i].as_deref()), (Some("unreachable"), None));
        } else {
            assert!(near(starts[i], 200), "{site}: starts {:?}", starts[i]);
            assert_eq!((ends[i], durations[i]), (None, None), "{site}: still down at the end");
            let cause = if site == district { (Some("unreachable"), None) } else { (Some("upstream_down"), Some(district)) };
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
    assert_eq!((office.connection.state, office.connection.cause), (State::Down, Cause::Unreachable));
    assert_eq!(office.verdict, Verdict::NotReady);
    assert_eq!(office.reasons[0].metric, Metric::Connection, "{:?}", office.reasons);
    for id in &behind {
        let s = latest(id);
        assert_eq!((s.connection.state, s.connection.cause, s.connection.upstream.as_deref()), (State::Down, Cause::UpstreamDown, Some(district)));
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
}
