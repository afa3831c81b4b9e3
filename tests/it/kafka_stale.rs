//! Stale traffic (docs/metrics.md, "Quiet, silent and stale"): the producers of some sites stop
//! while others go on. A site whose exporter goes on without its flows shows 0, a site whose
//! own router stopped has no series, the busy site keeps its figures; once every producer has
//! stopped, the last-window gauges are dropped after the readiness freshness limit, when the
//! verdicts turn `unknown`. Counters stay.

use std::time::{Duration, Instant};

use super::{S, start_ns, test_dir};
use crate::kafka_support::*;

/// Router exporting for sites it reaches by prefix (not a site's own router).
const SHARED_ROUTER: &str = "192.0.2.1";
/// The site that is its own router, and that router's address (pipelines/hagiang/sites.csv).
const OWN_ROUTER_SITE: (&str, &str) = ("tinh.vp-tinh-uy", "172.16.100.1");
/// Sites reached by prefix through the shared router: one goes quiet, one stays busy.
const QUIET_SITE: &str = "tinh.vp-ubnd";
const BUSY_SITE: &str = "tinh.ban-to-chuc";

/// The series of a metric for one site, by direction (absent directions are not listed).
fn site_series(body: &str, metric: &str, site: &str) -> Vec<(String, f64)> {
    let prefix = format!("{metric}{{");
    let site = format!("site=\"{site}\"");
    let mut out: Vec<(String, f64)> = body
        .lines()
        .filter(|l| l.starts_with(&prefix) && l.contains(&site))
        .map(|l| {
            let direction = l.split("direction=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("").to_string();
            (direction, l.rsplit(' ').next().unwrap().parse().unwrap())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Whether the site's verdict is `unknown` because its telemetry is stale (the freshness row).
fn freshness_stale(instance: &Instance, site: &str) -> bool {
    let body = crate::support::http_get(instance.http, "/metrics").unwrap().1;
    let site = format!("site=\"{site}\"");
    let unknown = body
        .lines()
        .any(|l| l.starts_with("siteflow_site_readiness{") && l.contains(&site) && l.contains("state=\"unknown\"") && l.ends_with(" 1"));
    let stale = body.lines().any(|l| {
        l.starts_with("siteflow_site_readiness_reason{")
            && l.contains(&site)
            && l.contains("metric=\"freshness\"")
            && l.contains("cause=\"stale\"")
    });
    unknown && stale
}

#[test]
fn stopped_producers_turn_their_sites_to_zero_or_absent_while_others_go_on() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    broker.create_topic("flows", 1);
    let start = start_ns();
    let mut traffic = Traffic::new(5, start);
    let index = |id: &str| traffic.sites.iter().position(|s| s.id == id).unwrap_or_else(|| panic!("{id} not in the inventory"));
    let (quiet, busy, own) = (index(QUIET_SITE), index(BUSY_SITE), index(OWN_ROUTER_SITE.0));
    let producer = broker.producer();
    // 100 s of event time, one export per router each second. For the first 40 s the shared
    // router carries the quiet and the busy site and the own router its site; then the own
    // router stops and the shared router carries only the busy site.
    for second in 0..100i64 {
        let t = start + second * S + S / 2;
        let bytes = 1_000 * (second as u64 + 1);
        let flow = |site: usize, inbound: bool, exporter: &str, traffic: &mut Traffic| {
            let f = Flow { site, inbound, t_ns: t, bytes, packets: 10, sampling: 1 };
            traffic.count(&f);
            traffic.goflow2_json_from(&f, exporter)
        };
        let mut shared = flow(busy, true, SHARED_ROUTER, &mut traffic);
        if second < 40 {
            shared = format!(
                "{shared}\n{}\n{}",
                flow(quiet, true, SHARED_ROUTER, &mut traffic),
                flow(quiet, false, SHARED_ROUTER, &mut traffic)
            );
            send(&producer, "flows", 0, flow(own, true, OWN_ROUTER_SITE.1, &mut traffic).as_bytes());
        }
        send(&producer, "flows", 0, shared.as_bytes());
    }
    flush(&producer);

    let instance = Instance::start(dir.path(), "stale", &broker, &[("flows", "goflow2_json")], &dir.path().join("ckpt"), "");
    // The shared router's clock reaches 99.5 s: with the 5 s publish delay, windows up to
    // [80 s, 90 s) are published (the stopped router lags by more than the allowed skew, so
    // it no longer holds them back).
    let newest_end_s = (start / S + 90) as f64;
    let published = wait_until(Duration::from_secs(120), || {
        instance.metric("siteflow_last_closed_window_end_timestamp_seconds", "table=\"flows\"") == Some(newest_end_s)
    });
    assert!(published, "window [80 s, 90 s) not published:\n{}", instance.log_summary());
    let body = crate::support::http_get(instance.http, "/metrics").unwrap().1;
    let rate = "siteflow_site_throughput_bytes_per_second";

    let busy_bytes = traffic.truth[&(BUSY_SITE.to_string(), "in".to_string(), start / S + 80)].0;
    assert_eq!(
        site_series(&body, rate, BUSY_SITE),
        vec![("in".into(), busy_bytes as f64 / 10.0), ("out".into(), 0.0)],
        "the busy site goes on"
    );
    assert_eq!(
        site_series(&body, rate, QUIET_SITE),
        vec![("in".into(), 0.0), ("out".into(), 0.0)],
        "the quiet site's router reports past the window without its flows: zero"
    );
    assert_eq!(site_series(&body, rate, OWN_ROUTER_SITE.0), vec![], "the site whose router stopped has no data: no series");
    assert!(!freshness_stale(&instance, BUSY_SITE), "while its figures show, the busy site's telemetry is not stale");
    let own_total: u64 = traffic.truth.iter().filter(|((s, _, _), _)| s == OWN_ROUTER_SITE.0).map(|(_, v)| v.0).sum();
    assert_eq!(
        site_series(&body, "siteflow_site_bytes_total", OWN_ROUTER_SITE.0),
        vec![("in".into(), own_total as f64), ("out".into(), 0.0)],
        "counters keep the stopped site's sum"
    );

    // Every producer has stopped: no window closes any more. After the freshness limit (2
    // windows of 10 s) the last-window gauges go, as the verdicts turn `unknown`.
    let stopped = Instant::now();
    let gone = wait_until(Duration::from_secs(90), || {
        let body = crate::support::http_get(instance.http, "/metrics").unwrap().1;
        site_series(&body, rate, BUSY_SITE).is_empty() && site_series(&body, rate, QUIET_SITE).is_empty()
    });
    assert!(gone, "the busy site's last figures outlived the freshness limit:\n{}", instance.log_summary());
    eprintln!("throughput series dropped {:.1} s after the last window was seen", stopped.elapsed().as_secs_f64());
    let stale_verdict = wait_until(Duration::from_secs(30), || freshness_stale(&instance, BUSY_SITE));
    assert!(
        stale_verdict,
        "the busy site's figures are gone but its verdict is not `unknown` for stale telemetry:\n{}",
        instance.log_summary()
    );
    let body = crate::support::http_get(instance.http, "/metrics").unwrap().1;
    assert_eq!(site_series(&body, "siteflow_site_bytes_total", BUSY_SITE).len(), 2, "counters stay");
}
