//! Helpers shared by the integration tests.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use siteflow::config::{Config, Pace, SimulatorConfig};
use siteflow::driver::run_source as run;
use siteflow::metrics::PipelineMetrics;
use siteflow::pipeline::{Pipeline, Resources, RunSummary};
use siteflow::sink::CollectSink;
use siteflow::sink::prometheus::SiteMetrics;
use siteflow::source::simulator::{GroundTruth, Scenario, Simulator};
use siteflow::window::{ClosedWindow, WindowSpec};

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn siteflow() -> Command {
    Command::new(env!("CARGO_BIN_EXE_siteflow"))
}

/// Runs `siteflow` with args and extra environment; returns its output.
pub fn run_siteflow(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = siteflow();
    cmd.args(args).current_dir(repo());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run siteflow")
}

pub fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A plain HTTP/1.1 GET; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    http_request(addr, "GET", path, None)
}

/// A plain HTTP/1.1 request with an optional JSON body; returns (status, body).
pub fn http_request(addr: SocketAddr, method: &str, path: &str, json: Option<&str>) -> std::io::Result<(u16, String)> {
    http_request_with(addr, method, path, json, &[])
}

/// As [`http_request`], with extra headers (e.g. `("Authorization", "Bearer ...")`).
pub fn http_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    json: Option<&str>,
    headers: &[(&str, &str)],
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    let extra: String = headers.iter().map(|(k, v)| format!("{k}: {v}\r\n")).collect();
    match json {
        Some(body) => write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )?,
        None => write!(s, "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n")?,
    }
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    // Chunked bodies: keep only the payload lines (chunk sizes are hex-only lines).
    let body = if text.to_ascii_lowercase().contains("transfer-encoding: chunked") { dechunk(&body) } else { body };
    Ok((status, body))
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || tail.len() < n {
            break;
        }
        out.push_str(&tail[..n]);
        rest = tail[n..].trim_start_matches("\r\n");
    }
    out
}

/// A fast, finite simulation starting at a fixed time (deterministic).
pub fn fast_config(duration_secs: u64, records_per_sec: u64) -> Config {
    Config {
        simulator: SimulatorConfig {
            pace: Pace::Fast,
            start_unix_secs: Some(1_764_000_000),
            duration_secs: Some(duration_secs),
            records_per_sec,
            ..SimulatorConfig::default()
        },
        ..Config::default()
    }
}

pub fn window_spec(c: &Config) -> WindowSpec {
    c.window_spec()
}

/// Everything a simulated run produced.
pub struct SimRun {
    pub windows: Vec<ClosedWindow>,
    pub truth: GroundTruth,
    pub metrics: Arc<PipelineMetrics>,
    pub sites: SiteMetrics,
    pub summary: RunSummary,
    pub readiness: Arc<siteflow::readiness::SharedReadiness>,
}

/// Runs the real pipeline over the simulator to the end, collecting every closed window.
pub async fn simulate(config: &Config, scenario: Scenario) -> SimRun {
    simulate_with(config, scenario, &siteflow::table::TABLES, None, Vec::new()).await
}

/// As [`simulate`], also feeding `extra` sinks (e.g. to see every evaluation's verdicts).
pub async fn simulate_with_sinks(config: &Config, scenario: Scenario, extra: Vec<Box<dyn siteflow::sink::WindowSink>>) -> SimRun {
    simulate_with(config, scenario, &siteflow::table::TABLES, None, extra).await
}

/// As [`simulate`], also keeping closed windows, verdicts and recent flows for SQL (memory only).
pub async fn simulate_with_sql(config: &Config, scenario: Scenario) -> (SimRun, siteflow::sql::SqlEngine) {
    simulate_tables_with_sql(config, scenario, &siteflow::table::TABLES).await
}

/// As [`simulate_with_sql`], with the pipeline's tables `tables` instead of the shipped ones.
pub async fn simulate_tables_with_sql(
    config: &Config,
    scenario: Scenario,
    tables: &[&'static siteflow::table::TableDef],
) -> (SimRun, siteflow::sql::SqlEngine) {
    use siteflow::history::{History, HistoryOptions};
    let history =
        History::open(HistoryOptions { dir: None, retention_days: 30, compact_min_files: 24, max_memory_rows: usize::MAX }).unwrap();
    let recent = siteflow::sql::RecentFlows::new(config.sql.recent_flows_max_rows, config.sql.recent_flows_max_mb << 20);
    let run = simulate_with(config, scenario, tables, Some((history.clone(), recent.clone())), Vec::new()).await;
    let inventory = Resources::load(config).unwrap().inventory;
    let limits = siteflow::sql::SqlLimits::from_config(&config.sql);
    (run, siteflow::sql::SqlEngine::new(inventory, history, Some(recent), limits, config.window.size_secs as f64))
}

async fn simulate_with(
    config: &Config,
    scenario: Scenario,
    tables: &[&'static siteflow::table::TableDef],
    sql: Option<(siteflow::history::History, Arc<siteflow::sql::RecentFlows>)>,
    extra: Vec<Box<dyn siteflow::sink::WindowSink>>,
) -> SimRun {
    config.validate("test").unwrap();
    let res = Resources::load_with_tables(config, tables).unwrap();
    let metrics = Arc::new(PipelineMetrics::new(&Pipeline::FORMATS, tables));
    let collect = CollectSink::default();
    let sites = SiteMetrics::new(res.inventory.clone(), config.window.size_secs as f64);
    let mut sinks: Vec<Box<dyn siteflow::sink::WindowSink>> = vec![Box::new(collect.clone()), Box::new(sites.clone())];
    sinks.extend(extra);
    if let Some((history, _)) = &sql {
        sinks.push(Box::new(siteflow::history::HistorySink::new(history.clone(), config.sql.top_talkers)));
    }
    let mut pipeline = Pipeline::build(config, &res, metrics.clone(), sinks).await.unwrap();
    if let Some((history, recent)) = &sql {
        pipeline.keep_recent_flows(recent.clone());
        siteflow::history::declare_tables(history, &pipeline.output_schemas(), config.sql.top_talkers);
    }
    let readiness = pipeline.readiness();
    let mut sim = Simulator::new(config.simulator.clone(), window_spec(config), res.inventory.clone(), scenario);
    let truth = sim.track_truth();
    let (_stop, stop_rx) = tokio::sync::watch::channel(false);
    let summary = run(sim, pipeline, stop_rx).await.unwrap();
    let windows = std::mem::take(&mut *collect.windows.lock().unwrap());
    let truth = truth.lock().unwrap().clone();
    SimRun { windows, truth, metrics, sites, summary, readiness }
}

pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// Percent-encodes a query-string value.
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A child process killed when dropped (tests never leak servers).
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
