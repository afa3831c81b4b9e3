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

    // On /metrics, its RTT row says why (over the threshold) and where it clears.
    let families = siteflow::sink::readiness::collect(&run.readiness);
    let series = |name: &str| -> Vec<(BTreeMap<String, String>, f64)> {
        let f = families.iter().find(|f| f.name() == name).unwrap_or_else(|| panic!("{name}"));
        f.get_metric()
            .iter()
            .map(|m| (m.get_label().iter().map(|l| (l.name().to_string(), l.value().to_string())).collect(), m.get_gauge().get_value()))
            .collect()
    };
    let of = |name: &str| -> Vec<(BTreeMap<String, String>, f64)> {
        series(name).into_iter().filter(|(l, _)| l["site"] == "yen-minh.thang-mo" && l["metric"] == "rtt").collect()
    };
    let reason = of("siteflow_site_readiness_reason");
    assert_eq!(reason.len(), 1, "{reason:?}");
    assert_eq!((reason[0].0["cause"].as_str(), reason[0].1), ("over_threshold", 2.0));
    let clear = of("siteflow_site_readiness_clear_level");
    assert!((clear[0].1 - 0.27).abs() < 1e-9, "not ready clears at 0.3 × 0.9: {clear:?}");

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

/// Every evaluation's verdicts: (window end in seconds after the start, site → (verdict, reasons)).
type Timeline = Vec<(i64, BTreeMap<String, (Verdict, Vec<siteflow::readiness::Reason>)>)>;

#[derive(Clone, Default)]
struct Verdicts(std::sync::Arc<std::sync::Mutex<Timeline>>, i64);

impl siteflow::sink::WindowSink for Verdicts {
    fn on_window(&mut self, _: &'static siteflow::table::TableDef, _: &siteflow::window::ClosedWindow) {}

    fn on_readiness(&mut self, _start_ns: i64, end_ns: i64, sites: &[siteflow::readiness::SiteReadiness]) {
        let row = sites.iter().map(|s| (s.site.clone(), (s.verdict, s.reasons.clone()))).collect();
        self.0.lock().unwrap().push(((end_ns - self.1) / 1_000_000_000, row));
    }
}

/// After RTT, jitter and loss faults at sites of every level clear (60 s to 180 s), every site
/// is `ready` from 180 + period (300 s) + hold (30 s) = 510 s on, with the shipped policy; the
/// recovery times are exact (probe rounds every 5 s from the start, 10 s windows):
/// - a loss row is the period's worst round: the last faulty round (175 s) leaves the period at
///   the window ending 480 s, and the row clears after the 30 s hold, at 510 s;
/// - RTT and jitter rows are p95 and MOS p5 of the period's 60 rounds (nearest rank 57 and 3):
///   they clear once fewer than 4 faulty rounds remain (window ending 470 s), ready at 500 s.
///
/// Before that the faulty sites stay not ready (or degraded) without flapping, and every other
/// site is ready at every evaluation but the first (whose traffic window is partial).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_site_of_every_level_recovers_after_faults_clear() {
    use siteflow::readiness::{Cause, Level};
    let inventory = Inventory::embedded();
    let scenario = Scenario::load(&repo().join("pipelines/hagiang/scenarios/recovery.yaml"), &inventory).unwrap();
    // Starts at 1_764_000_000 (a multiple of the 10 s window: rounds and windows align).
    let config = fast_config(580, 200);
    let start_ns = config.simulator.start_unix_secs.unwrap() as i64 * 1_000_000_000;
    let verdicts = Verdicts(Default::default(), start_ns);
    crate::support::simulate_with_sinks(&config, scenario, vec![Box::new(verdicts.clone())]).await;
    let timeline = verdicts.0.lock().unwrap().clone();
    let ends: Vec<i64> = timeline.iter().map(|(e, _)| *e).collect();
    // The first window ends at the start (records out of order fall just before it).
    assert_eq!(ends.first(), Some(&0), "every window is judged");
    assert!(ends.windows(2).all(|w| w[1] == w[0] + 10), "{ends:?}");
    assert!(*ends.last().unwrap() >= 550, "the run goes past the recovery deadline: {ends:?}");

    // (site, level while faulty, metric, first ready evaluation)
    let faulty: Vec<(&str, Verdict, Metric, i64)> = vec![
        ("tinh.vp-ubnd", Verdict::NotReady, Metric::Rtt, 500),
        ("meo-vac.ubnd", Verdict::NotReady, Metric::Rtt, 500),
        ("yen-minh.thang-mo", Verdict::NotReady, Metric::Rtt, 500),
        ("tinh.ban-to-chuc", Verdict::NotReady, Metric::Jitter, 500),
        ("dong-van.ubnd", Verdict::NotReady, Metric::Jitter, 500),
        ("yen-minh.sung-thai", Verdict::NotReady, Metric::Jitter, 500),
        ("tinh.vp-tinh-uy", Verdict::NotReady, Metric::Loss, 510),
        ("meo-vac.huyen-uy", Verdict::NotReady, Metric::Loss, 510),
        ("yen-minh.huu-vinh", Verdict::NotReady, Metric::Loss, 510),
        ("quan-ba.tam-son", Verdict::Degraded, Metric::Rtt, 500),
        ("quan-ba.can-ty", Verdict::Degraded, Metric::Loss, 510),
    ];
    let levels: std::collections::BTreeSet<&str> =
        faulty.iter().map(|(id, ..)| inventory.site(inventory.by_id(id).unwrap()).level.as_str()).collect();
    assert_eq!(levels.len(), 3, "faults at every level: {levels:?}");

    for (end, sites) in &timeline {
        for s in inventory.sites() {
            let (verdict, reasons) = &sites[&s.id];
            if *end == 0 {
                assert_eq!(*verdict, Verdict::Unknown, "{}: the first window is partial", s.id);
                let r = reasons.last().unwrap();
                assert_eq!(r.cause, Cause::Missing, "{r:?}");
                assert!(!r.to_string().contains("freshness=0"), "{r}");
                continue;
            }
            let Some((_, bad, metric, ready_at)) = faulty.iter().find(|f| f.0 == s.id) else {
                assert_eq!(*verdict, Verdict::Ready, "healthy {} at {end} s: {reasons:?}", s.id);
                continue;
            };
            if *end < 100 {
                continue; // entering: the fault starts at 60 s and must hold 30 s
            }
            if *end < *ready_at {
                assert_eq!(verdict, bad, "{} at {end} s: {reasons:?}", s.id);
                let r = reasons.iter().find(|r| r.metric == *metric).unwrap_or_else(|| panic!("{} at {end} s: {reasons:?}", s.id));
                // Held by the hold time for the last 30 s (the value is past its clear level).
                let expected = if *end >= ready_at - 30 { Cause::Hold } else { Cause::OverThreshold };
                assert_eq!(r.cause, expected, "{} at {end} s: {r}", s.id);
                assert!(r.clear.is_some() && r.level == if *bad == Verdict::NotReady { Level::NotReady } else { Level::Degraded });
            } else {
                assert_eq!(*verdict, Verdict::Ready, "{} at {end} s must have recovered: {reasons:?}", s.id);
            }
        }
    }
}
