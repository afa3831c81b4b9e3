//! The hierarchy is data: the post-2025 two-level example inventory (province → commune,
//! pipelines/examples/tuyen-quang) passes `check`, the pipeline over it gives per-site totals
//! equal to the simulator's ground truth, and readiness roll-ups and meeting selectors follow
//! its parents.

use std::collections::BTreeMap;

use datafusion::arrow::array::AsArray;
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Int64Type};
use siteflow::config::Config;
use siteflow::enrich::Direction;
use siteflow::readiness::{MeetingSpec, Verdict};
use siteflow::source::simulator::Scenario;

use crate::support::{fast_config, repo, run_siteflow, simulate};

fn example(path: &str) -> std::path::PathBuf {
    repo().join("pipelines/examples/tuyen-quang").join(path)
}

#[test]
fn check_accepts_the_two_level_inventory() {
    let out = run_siteflow(&["check", "--config", example("siteflow.yaml").to_str().unwrap()], &[]);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("inventory: 11 sites; levels province → commune"), "{stdout}");
    // The Hà Giang inventory keeps its three levels.
    let out = run_siteflow(&["check", "--config", repo().join("deploy/siteflow.example.yaml").to_str().unwrap()], &[]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("inventory: 242 sites; levels province → district → commune"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pipeline_over_the_two_level_inventory_is_exact_and_rolls_up_by_parent() {
    let mut config = Config::load(Some(&example("siteflow.yaml"))).unwrap();
    config.simulator = fast_config(120, 100).simulator;
    let inventory = siteflow::pipeline::Resources::load(&config).unwrap().inventory;
    assert_eq!(inventory.levels(), ["province", "commune"]);
    let scenario = Scenario::load(&example("scenarios/commune-faults.yaml"), &inventory).unwrap();
    let run = simulate(&config, scenario).await;

    // Per (site, direction, window) totals equal the ground truth.
    let mut got: BTreeMap<(String, String, i64), i64> = BTreeMap::new();
    for w in run.windows.iter().filter(|w| &*w.table == "flows") {
        let col = |name: &str| cast(w.rows.column_by_name(name).unwrap(), &DataType::Utf8).unwrap();
        let (sites, dirs) = (col("site"), col("direction"));
        let bytes = cast(w.rows.column_by_name("bytes").unwrap(), &DataType::Int64).unwrap();
        for i in 0..w.rows.num_rows() {
            let key = (sites.as_string::<i32>().value(i).to_string(), dirs.as_string::<i32>().value(i).to_string(), w.start_ns);
            assert!(got.insert(key, bytes.as_primitive::<Int64Type>().value(i)).is_none());
        }
    }
    let expected: BTreeMap<(String, String, i64), i64> = run
        .truth
        .flows
        .iter()
        .map(|((s, d, start), t)| {
            let d = if *d == Direction::In { "in" } else { "out" };
            ((inventory.site(*s).id.clone(), d.to_string(), *start), t.bytes as i64)
        })
        .collect();
    assert_eq!(got, expected);
    let sites_with_traffic: std::collections::BTreeSet<&str> = got.keys().map(|(s, _, _)| s.as_str()).collect();
    assert_eq!(sites_with_traffic.len(), 9, "all but the two communes in outage: {sites_with_traffic:?}");

    // Roll-ups follow the parents: the 9 communes below the People's Committee office.
    let engine = run.readiness.engine.read().unwrap();
    let rollups = engine.rollups();
    assert_eq!(rollups.len(), 1, "{rollups:?}");
    assert_eq!((rollups[0].parent.as_str(), rollups[0].parent_level.as_str()), ("tq.ubnd", "province"));
    let expected = [(Verdict::Ready, 6), (Verdict::Degraded, 0), (Verdict::NotReady, 1), (Verdict::Unknown, 2)];
    assert_eq!(rollups[0].levels, vec![("commune".to_string(), expected)]);
    for s in engine.latest() {
        let want = match s.site.as_str() {
            "tq.lung-cu" | "tq.meo-vac" => Verdict::Unknown,
            "tq.dong-van" => Verdict::NotReady,
            _ => Verdict::Ready,
        };
        assert_eq!(s.verdict, want, "{}: {:?}", s.site, s.reasons);
        assert_eq!(s.district, "province", "no districts: the province's label");
    }
    drop(engine);

    // The same counts on /metrics.
    let families = siteflow::sink::readiness::collect(&run.readiness);
    let f = families.iter().find(|f| f.name() == "siteflow_parent_sites").expect("siteflow_parent_sites");
    let mut counts = BTreeMap::new();
    for m in f.get_metric() {
        let l: BTreeMap<&str, &str> = m.get_label().iter().map(|l| (l.name(), l.value())).collect();
        assert_eq!((l["parent"], l["parent_level"], l["level"]), ("tq.ubnd", "province", "commune"));
        counts.insert(l["state"].to_string(), m.get_gauge().get_value());
    }
    let want: BTreeMap<String, f64> =
        [("ready", 6.0), ("degraded", 0.0), ("not_ready", 1.0), ("unknown", 2.0)].map(|(k, v)| (k.to_string(), v)).into();
    assert_eq!(counts, want);

    // A meeting of every commune below the province office: the faulty three are at risk.
    let spec: MeetingSpec = serde_json::from_value(serde_json::json!({
        "id": "hop", "title": "Họp", "start": "2025-11-24T23:30:00+07:00", "duration_mins": 60,
        "participants": [{"under": "tq.ubnd", "level": "commune"}]
    }))
    .unwrap();
    run.readiness.add_meeting(spec).unwrap();
    let report = run.readiness.meeting_report("hop").unwrap();
    assert_eq!((report.participants.len(), report.at_risk), (9, 3), "{:?}", report.counts);
}
