//! The README's demo: the real binary serves throughput for all 242 sites within 60 s, answers
//! health checks, and on SIGTERM flushes its open windows and exits cleanly.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::{KillOnDrop, free_addr, http_get, repo, siteflow};

/// Sites with a positive throughput in both directions.
fn sites_with_throughput(metrics: &str) -> BTreeSet<String> {
    let mut by_site: std::collections::BTreeMap<String, u8> = Default::default();
    for line in metrics.lines().filter(|l| l.starts_with("siteflow_site_throughput_bytes_per_second{")) {
        let value: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
        let site = line.split("site=\"").nth(1).unwrap().split('"').next().unwrap().to_string();
        if value > 0.0 {
            *by_site.entry(site).or_default() += 1;
        }
    }
    by_site.into_iter().filter(|(_, n)| *n == 2).map(|(s, _)| s).collect()
}

#[test]
fn demo_serves_all_242_sites_within_a_minute_and_stops_cleanly() {
    let addr = free_addr();
    let log = tempfile::NamedTempFile::new().unwrap();
    let started = Instant::now();
    // Killed if an assertion fails before the SIGTERM below.
    let mut child = KillOnDrop(
        siteflow()
            .args(["demo", "--listen", &addr.to_string()])
            .current_dir(repo())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap(),
    );

    let mut last = String::new();
    let mut complete = false;
    let mut listening = false;
    while started.elapsed() < Duration::from_secs(60) {
        match http_get(addr, "/metrics") {
            Ok((200, body)) => {
                listening = true;
                if sites_with_throughput(&body).len() == 242 {
                    complete = true;
                    last = body;
                    break;
                }
                last = body;
            }
            // Once the server answers, every scrape must succeed, before and after windows close.
            other if listening => panic!("a scrape failed: {other:?}\n{}", std::fs::read_to_string(log.path()).unwrap()),
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let stderr = || std::fs::read_to_string(log.path()).unwrap();
    if !complete {
        let _ = child.0.kill();
        panic!(
            "after 60 s only {} sites had throughput\n--- metrics excerpt ---\n{}\n--- log ---\n{}",
            sites_with_throughput(&last).len(),
            last.lines().filter(|l| l.starts_with("siteflow_") && !l.starts_with("siteflow_site_")).collect::<Vec<_>>().join("\n"),
            stderr()
        );
    }
    assert!(last.contains("# HELP siteflow_site_throughput_bytes_per_second"));
    assert!(last.contains("level=\"commune\"") && last.contains("district=\"Mèo Vạc\""));
    assert_eq!(http_get(addr, "/healthz").unwrap().0, 200);
    assert_eq!(http_get(addr, "/readyz").unwrap().0, 200);

    // SIGTERM: open windows are flushed, the process exits 0.
    let status = std::process::Command::new("kill").args(["-TERM", &child.0.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let exit = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "siteflow did not stop within 30 s of SIGTERM\n{}", stderr());
        std::thread::sleep(Duration::from_millis(100));
    };
    let log = stderr();
    assert!(exit.success(), "exit {exit:?}\n{log}");
    assert!(log.contains("shutdown requested: flushing open windows"), "{log}");
    let flushed = log.lines().find(|l| l.contains("pipeline stopped")).unwrap_or_else(|| panic!("{log}"));
    assert!(!flushed.contains("flushed=0"), "open windows were flushed: {flushed}");
}
