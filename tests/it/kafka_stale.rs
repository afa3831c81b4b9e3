//! Stale traffic (docs/metrics.md, "Quiet, silent and stale"): the producers of some sites stop
//! while others go on. A site whose exporter goes on without its flows shows 0 until its flows
//! are as old as the readiness freshness limit, then no series; a site whose own router stopped
//! has no series at once; the busy site keeps its figures. Once every producer has stopped, the
//! last-window gauges are dropped after the freshness limit, when the verdicts turn `unknown`.
//! Counters stay.

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

/// One export per router for each second of `seconds` (event time from `traffic.start_ns`).
/// Before 40 s the shared router carries the quiet and the busy site, and the own router its
/// site; from 40 s on the own router is stopped and the shared router carries the busy site only.
fn produce(broker: &Broker, traffic: &mut Traffic, seconds: std::ops::Range<i64>) {
    let index =
        |traffic: &Traffic, id: &str| traffic.sites.iter().position(|s| s.id == id).unwrap_or_else(|| panic!("{id} not in the inventory"));
    let (quiet, busy, own) = (index(traffic, QUIET_SITE), index(traffic, BUSY_SITE), index(traffic, OWN_ROUTER_SITE.0));
    let producer = broker.producer();
    for second in seconds {
        let t = traffic.start_ns + second * S + S / 2;
        let bytes = 1_000 * (second as u64 + 1);
        let mut flow = |site: usize, inbound: bool, exporter: &str| {
            let f = Flow { site, inbound, t_ns: t, bytes, packets: 10, sampling: 1 };
            traffic.count(&f);
            traffic.goflow2_json_from(&f, exporter)
        };
        let mut shared = flow(busy, true, SHARED_ROUTER);
        if second < 40 {
            shared = format!("{shared}\n{}\n{}", flow(quiet, true, SHARED_ROUTER), flow(quiet, false, SHARED_ROUTER));
            send(&producer, "flows", 0, flow(own, true, OWN_ROUTER_SITE.1).as_bytes());
        }
        send(&producer, "flows", 0, shared.as_bytes());
    }
    flush(&producer);
}

/// Waits until the newest published flows window ends at `end_s` (event time, seconds) and
/// returns /metrics then.
fn metrics_when_published(instance: &Instance, end_s: i64) -> String {
    let published = wait_until(Duration::from_secs(120), || {
        instance.metric("siteflow_last_closed_window_end_timestamp_seconds", "table=\"flows\"") == Some(end_s as f64)
    });
    assert!(published, "no window ending at {end_s} published:\n{}", instance.log_summary());
    crate::support::http_get(instance.http, "/metrics").unwrap().1
}

const RATE: &str = "siteflow_site_throughput_bytes_per_second";

#[test]
fn stopped_producers_turn_their_sites_to_zero_or_absent_while_others_go_on() {
    let dir = test_dir();
    let broker = Broker::start(dir.path());
    broker.create_topic("flows", 1);
    let start_s = start_ns() / S;
    let mut traffic = Traffic::new(5, start_s * S);
    let busy_rate =
        |traffic: &Traffic, window_s: i64| traffic.truth[&(BUSY_SITE.to_string(), "in".to_string(), start_s + window_s)].0 as f64 / 10.0;
    let instance = Instance::start(dir.path(), "stale", &broker, &[("flows", "goflow2_json")], &dir.path().join("ckpt"), "");

    // The shared router reaches 55.5 s: with the 5 s publish delay, window [40 s, 50 s) is the
    // newest published (the own router, 16 s behind, lags by more than the allowed 15 s skew and
    // no longer holds windows back). The quiet site's newest flows are one window old.
    produce(&broker, &mut traffic, 0..56);
    let body = metrics_when_published(&instance, start_s + 50);
    assert_eq!(
        site_series(&body, RATE, BUSY_SITE),
        vec![("in".into(), busy_rate(&traffic, 40)), ("out".into(), 0.0)],
        "the busy site goes on"
    );
    assert_eq!(
        site_series(&body, RATE, QUIET_SITE),
        vec![("in".into(), 0.0), ("out".into(), 0.0)],
        "the quiet site's router reports past the window without its flows: zero"
    );
    assert_eq!(site_series(&body, RATE, OWN_ROUTER_SITE.0), vec![], "the site whose router stopped has no data: no series");
    let own_total: u64 = traffic.truth.iter().filter(|((s, _, _), _)| s == OWN_ROUTER_SITE.0).map(|(_, v)| v.0).sum();
    assert_eq!(
        site_series(&body, "siteflow_site_bytes_total", OWN_ROUTER_SITE.0),
        vec![("in".into(), own_total as f64), ("out".into(), 0.0)],
        "counters keep the stopped site's sum"
    );

    // On to 99.5 s: window [80 s, 90 s) is the newest. The quiet site's flows are now older
    // than the freshness limit (2 windows): stale for readiness, and no series.
    produce(&broker, &mut traffic, 56..100);
    let body = metrics_when_published(&instance, start_s + 90);
    assert_eq!(
        site_series(&body, RATE, BUSY_SITE),
        vec![("in".into(), busy_rate(&traffic, 80)), ("out".into(), 0.0)],
        "the busy site goes on"
    );
    assert_eq!(site_series(&body, RATE, QUIET_SITE), vec![], "the quiet site's flows are stale: no series");
    assert_eq!(site_series(&body, RATE, OWN_ROUTER_SITE.0), vec![]);
    assert!(!freshness_stale(&instance, BUSY_SITE), "while its figures show, the busy site's telemetry is not stale");

    // Every producer has stopped: no window closes any more. After the freshness limit (2
    // windows of 10 s) the last-window gauges go, as the verdicts turn `unknown`.
    let stopped = Instant::now();
    let gone = wait_until(Duration::from_secs(90), || {
        let body = crate::support::http_get(instance.http, "/metrics").unwrap().1;
        site_series(&body, RATE, BUSY_SITE).is_empty()
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
