//! Readiness end to end through the real pipeline (fast simulator, fault scenario): exactly the
//! faulty sites get the expected verdicts and reasons; every other site is ready; a meeting
//! with faulty participants reports them at risk.

use std::collections::BTreeMap;

use siteflow::inventory::Inventory;
use siteflow::readiness::{MeetingSpec, Metric, Verdict};
use siteflow::source::simulator::Scenario;

use crate::support::{fast_config, repo, simulate};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fault_scenario_gives_exactly_the_expected_verdicts() {
    let inventory = Inventory::embedded();
    let scenario = Scenario::load(&repo().join("pipelines/hagiang/scenarios/district-congestion.yaml"), &inventory).unwrap();
    // 10:00 in Hà Giang (03:00 UTC), the busiest hour of the daily shape; 6 minutes.
    let mut config = fast_config(360, 600);
    config.simulator.start_unix_secs = Some(1_764_385_200);
    let run = simulate(&config, scenario).await;
    let engine = run.readiness.engine.read().unwrap();

    let mut expected: BTreeMap<String, (Verdict, Option<Metric>)> = BTreeMap::new();
    for s in inventory.sites().iter().filter(|s| s.district == "Mèo Vạc" && s.level == "commune") {
        expected.insert(s.id.clone(), (Verdict::NotReady, Some(Metric::Utilisation)));
    }
    expected.insert("dong-van.ta-lung".into(), (Verdict::Unknown, Some(Metric::Freshness)));
    expected.insert("yen-minh.thang-mo".into(), (Verdict::NotReady, Some(Metric::Rtt)));
    expected.insert("yen-minh.sung-thai".into(), (Verdict::NotReady, Some(Metric::Jitter)));
    expected.insert("yen-minh.huu-vinh".into(), (Verdict::NotReady, Some(Metric::Loss)));

    for s in engine.latest() {
        match expected.get(&s.site) {
            Some((verdict, reason)) => {
                assert_eq!(s.verdict, *verdict, "{}: {:?}", s.site, s.reasons);
                if let Some(metric) = reason {
                    assert!(s.reasons.iter().any(|r| r.metric == *metric), "{} should name {metric:?}: {:?}", s.site, s.reasons);
                }
            }
            None => assert_eq!(s.verdict, Verdict::Ready, "healthy site {} ({}): {:?}", s.site, s.level, s.reasons),
        }
    }

    // The high-RTT commune: quantiles measured, MOS below the not-ready band.
    let thang_mo = engine.latest().iter().find(|s| s.site == "yen-minh.thang-mo").unwrap();
    let probes = thang_mo.probes.as_ref().unwrap();
    assert!(probes.rtt_p95_seconds > 0.4 && probes.rtt_p50_seconds > 0.4, "{probes:?}");
    assert!(probes.mos_p5 < 3.6, "{probes:?}");
    drop(engine);

    // A meeting of the whole of Mèo Vạc plus the province's office: the communes are at risk.
    let spec: MeetingSpec = serde_json::from_value(serde_json::json!({
        "id": "giao-ban", "title": "Giao ban", "start": "2025-11-29T10:10:00+07:00", "duration_mins": 60,
        "participants": [{"sites": ["tinh.vp-ubnd"]}, {"district": "Mèo Vạc"}]
    }))
    .unwrap();
    run.readiness.add_meeting(spec).unwrap();
    let report = run.readiness.meeting_report("giao-ban").unwrap();
    let communes = inventory.sites().iter().filter(|s| s.district == "Mèo Vạc" && s.level == "commune").count();
    assert_eq!(report.at_risk, communes, "{:?}", report.counts);
    assert_eq!(report.participants.len(), communes + 3, "communes + the district's two offices + the province office");
    assert!(report.participants.iter().filter(|p| !p.at_risk).all(|p| p.status == Verdict::Ready));
}
