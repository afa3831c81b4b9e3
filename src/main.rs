//! The `siteflow` command: CLI → config → run. The only place that prints errors for people.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use figment::value::magic::RelativePathBuf;
use tokio::sync::watch;

use siteflow::app::{App, Running};
use siteflow::config::{Config, LogFormat, Pace, SourceKind, resolve};
use siteflow::history::{History, HistoryOptions};
use siteflow::http::SqlFormat;
use siteflow::pipeline::{Resources, plan_windows, top_talkers_warning};
use siteflow::source::kafka_probe::{self, ProbeOptions};
use siteflow::source::simulator::Scenario;
use siteflow::sql::{SqlEngine, SqlLimits};
use siteflow::types::Format;
use siteflow::window::WindowSpec;

const EXAMPLES: &str = "\
Examples:
  # The whole pipeline on the built-in simulator of the 242 Hà Giang sites:
  siteflow demo
  curl -s localhost:9898/metrics | grep siteflow_site_throughput_bytes_per_second

  # The same with faults injected (congestion, an outage, high RTT, jitter, loss):
  siteflow demo --scenario pipelines/hagiang/scenarios/district-congestion.yaml

  # Validate a configuration, its inventory and its pipeline SQL, then run it:
  siteflow check --config deploy/siteflow.example.yaml
  siteflow run --config deploy/siteflow.example.yaml --listen 0.0.0.0:9898

Every configuration key can be set from the environment: SITEFLOW_ + the key path joined
with __, e.g. SITEFLOW_WINDOW__SIZE_SECS=60 or SITEFLOW_HTTP__LISTEN=127.0.0.1:9900.
The commented reference of every key is deploy/siteflow.example.yaml.";

/// Per-site bandwidth and link quality from flow and probe telemetry, for Prometheus.
#[derive(Parser)]
#[command(name = "siteflow", version, about, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the pipeline on the built-in simulator: no Kafka, no configuration needed.
    #[command(
        after_help = "Example:\n  siteflow demo --listen 127.0.0.1:9900 --rate 20000\n\nThen open http://127.0.0.1:9900/metrics; the first windows are published window.size_secs + window.publish_delay_ms after they start (15 s by default)."
    )]
    Demo(DemoArgs),
    /// Run the pipeline as configured (the simulator, Kafka topics with checkpoints, or recorded files).
    #[command(
        after_help = "Examples:\n  siteflow run --config deploy/siteflow.example.yaml\n\n  # Kafka: topics with their formats, a consumer group, a checkpoint directory:\n  SITEFLOW_SOURCE__KIND=kafka SITEFLOW_KAFKA__BROKERS=kafka:9092 \\\n  SITEFLOW_CHECKPOINT__DIR=/var/lib/siteflow siteflow run --config siteflow.yaml\n\n  # Recorded files through the whole service; replay.yaml has\n  #   source: { kind: file, files: [ { path: flows-2025-11-03.json.gz } ] }\n  siteflow run --config replay.yaml\n\nWith Kafka, SIGTERM checkpoints the open windows and leaves the group; the next start\n(or the instance that gets the partitions) goes on from there. See README: Reading from Kafka.\nWith files, every window is published when they end and the results stay served until SIGTERM."
    )]
    Run(RunArgs),
    /// Validate a configuration, its inventory, scenario and pipeline SQL; exit non-zero on problems.
    #[command(
        after_help = "Examples:\n  siteflow check --config deploy/siteflow.example.yaml --explain\n\n  # Also reach the brokers and decode a sample of each topic's newest messages:\n  siteflow check --config siteflow.yaml --connect"
    )]
    Check(CheckArgs),
    /// Print the version, commit, compiler and target of this binary.
    #[command(after_help = "Example:\n  siteflow version --json")]
    Version(VersionArgs),
    /// Replay recorded messages from files through the pipeline (no Kafka), then print per-site totals.
    #[command(after_help = REPLAY_EXAMPLES)]
    Replay(ReplayArgs),
    /// Ask a running siteflow a read-only SQL question (or query a Parquet history directly).
    #[command(after_help = SQL_EXAMPLES)]
    Sql(SqlArgs),
}

const SQL_EXAMPLES: &str = "\
Tables (docs/sql.md has every column and twelve example questions):
  sites              site, name, level, district, parent, prefixes, link_bytes_per_second
  site_windows       window_start, site, district, level, direction, bytes, packets, flows, records
  probe_windows      window_start, site, district, level, results, rtt_seconds, rtt_max_seconds,
                     jitter_seconds, loss_max_ratio
  interface_windows  window_start, site, district, level, interface, direction, bytes,
                     bytes_per_second, samples
  top_talkers        window_start, site, district, level, direction, src_addr, dst_addr, proto,
                     bytes, packets, records, error, rank (bytes within error, docs/sql.md)
  readiness          window_start, window_end, site, district, level, verdict, reasons,
                     connection, connection_cause, connection_since, upstream, maintenance,
                     flow_counter_ratio_in, flow_counter_ratio_out, utilisation_source
  outages            site, district, level, start, end, duration_seconds, cause, upstream,
                     planned (a view over readiness: one row per outage)
  availability_daily site, district, level, day, up_seconds, down_seconds, unknown_seconds,
                     maintenance_seconds, availability (a view over readiness)
  flows_recent       site, district, level, direction, event_time, exporter, src_addr, dst_addr,
                     src_port, dst_port, proto, bytes, packets, sampling_rate, flow_start, ...
                     (a running instance only, not --data)

Examples:
  # The busiest sites inbound over the last hour, from a running instance:
  siteflow sql \"SELECT site, max(bytes) * 8 / 10 AS peak_bps FROM site_windows
                 WHERE direction = 'in' AND window_start > now() - INTERVAL '1 hour'
                 GROUP BY site ORDER BY peak_bps DESC LIMIT 10\"

  # As CSV, from another host, with the API token:
  siteflow sql --url http://siteflow-1:9898 --token \"$TOKEN\" --format csv \"SELECT * FROM sites\"

  # Straight from the Parquet history directory, no server needed:
  siteflow sql --data /var/lib/siteflow/history \"SELECT count(*) FROM site_windows\"";

const REPLAY_EXAMPLES: &str = "\
Files hold one message per line (the JSON formats) or varint length-delimited FlowMessages
(goflow2_protobuf, as `goflow2 -format=bin` writes them), plain or gzip/zstd-compressed (told by
their first bytes). Without --format each file's format is detected from its first 100 messages,
so flows and probes can be replayed together. Each file is its own stream with its own
event-time clocks. Windows follow the data's event time, not the wall clock: a capture from last
year gives last year's windows. At the end every open window is flushed, the per-site totals go
to stdout (or --output-file) and what was left out (rejected by reason, unmatched, late, without
traffic, corrected windows) to stderr. On a terminal a progress bar shows records, records/s, the
event time reached and the ETA; otherwise a log line does every --progress-interval seconds.

Examples:
  # Per-site totals of a compressed goflow2 capture, with the built-in Ha Giang inventory:
  siteflow replay flows-2025-11-03.json.gz

  # Flows and probes together, paced at 60x their own time (an hour in a minute), as CSV:
  siteflow replay --speed 60 --output csv nfacctd.json.zst probes.json > totals.csv

  # The totals as Parquet (--output parquet needs --output-file):
  siteflow replay --output parquet --output-file totals.parquet flows.bin

  # Your own inventory and settings; keep the windows for SQL afterwards:
  siteflow replay --config siteflow.yaml --history-dir /tmp/replay --format pmacct_json nfacctd.json
  siteflow sql --data /tmp/replay \"SELECT site, sum(bytes) FROM site_windows GROUP BY site\"

To replay through the whole service (/metrics, SQL, the API), set source.kind: file and
source.files in a configuration and use `siteflow run` (deploy/siteflow.example.yaml).";

#[derive(Args)]
struct ReplayArgs {
    /// Files of recorded messages (plain, .gz or .zst).
    #[arg(required = true, value_name = "FILE")]
    files: Vec<PathBuf>,
    /// Their format: goflow2_json, goflow2_protobuf, pmacct_json, siteflow_probe_json,
    /// telegraf_json or pmacct_sflow_counters_json. Unset: detected for each file.
    #[arg(long, value_name = "FORMAT", value_parser = siteflow::replay::parse_format)]
    format: Option<Format>,
    /// Which time of a flow places it in a window: flow_end, flow_start, arrival or spread
    /// (as `kafka.topics[].event_time`).
    #[arg(long, value_name = "MODE", default_value = "flow_end", value_parser = siteflow::replay::parse_event_time)]
    event_time: siteflow::types::EventTime,
    /// Pace the replay at N seconds of event time per second (1: as recorded). Unset: as fast
    /// as possible.
    #[arg(long, value_name = "N", value_parser = siteflow::replay::parse_speed)]
    speed: Option<f64>,
    /// Optional configuration (inventory, pipeline SQL, window, decode limits).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Also write every window to this Parquet history directory (`siteflow sql --data DIR`).
    #[arg(long, value_name = "DIR")]
    history_dir: Option<PathBuf>,
    /// Output of the per-site totals.
    #[arg(long, value_enum, default_value = "table")]
    output: siteflow::replay::Output,
    /// Write the totals to this file instead of stdout (required with --output parquet).
    #[arg(long, value_name = "FILE")]
    output_file: Option<PathBuf>,
    /// Seconds between progress log lines when stderr is not a terminal.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_interval)]
    progress_interval: std::time::Duration,
}

/// A positive number of seconds, fractions allowed.
fn parse_interval(s: &str) -> Result<std::time::Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(std::time::Duration::from_secs_f64(v)),
        _ => Err(format!("a positive number of seconds: {s}")),
    }
}

#[derive(Args)]
struct VersionArgs {
    /// As one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct SqlArgs {
    /// The query (read-only SQL).
    query: String,
    /// The running instance to ask [env: SITEFLOW_SQL_URL] [default: http://127.0.0.1:9898].
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Bearer token, if the instance requires one (sql.token) [env: SITEFLOW_SQL_TOKEN].
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// Query this Parquet history directory (history.dir) directly instead of a server
    /// (SITEFLOW_SQL_URL and SITEFLOW_SQL_TOKEN are then not used).
    // The variables are read by hand: clap counts a value from the environment as given, so
    // an exported SITEFLOW_SQL_URL would make every `--data` query a usage error.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["url", "token"])]
    data: Option<PathBuf>,
    /// Output: an aligned table, CSV or JSON.
    #[arg(long, value_enum, default_value = "table")]
    format: OutputFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OutputFormat {
    Table,
    Csv,
    Json,
}

#[derive(Args)]
struct DemoArgs {
    /// Optional configuration file; the demo forces the simulator source.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address for /metrics, /healthz and /readyz [default: 127.0.0.1:9898].
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Fault scenario to inject (YAML; see pipelines/hagiang/scenarios/).
    #[arg(long, value_name = "FILE")]
    scenario: Option<PathBuf>,
    /// Flow records per second from the simulator [default: 3000].
    #[arg(long, value_name = "N")]
    rate: Option<u64>,
    /// Simulator seed: the same seed gives the same traffic [default: 42].
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
}

#[derive(Args)]
struct RunArgs {
    /// Configuration file (YAML).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Address for /metrics, /healthz and /readyz (overrides http.listen).
    #[arg(long, value_name = "ADDR")]
    listen: Option<SocketAddr>,
    /// Which part of a scale-out to run (overrides scale_out.stage): `all` (everything in this
    /// process), `ingest` (decode, enrich, aggregate partially and hand the partial aggregates
    /// to scale_out.topic) or `site` (merge them for the sites of the internal partitions the
    /// group assigns; judge, export, answer SQL for those sites). See docs/scale-out.md.
    #[arg(long, value_name = "STAGE", value_parser = ["all", "ingest", "site"])]
    stage: Option<String>,
}

#[derive(Args)]
struct CheckArgs {
    /// Configuration file (YAML).
    #[arg(long, value_name = "FILE")]
    config: PathBuf,
    /// Also print the partial and final plans DataFusion will run for each pipeline SQL.
    #[arg(long)]
    explain: bool,
    /// Also contact kafka.brokers: list each topic's partitions, decode a sample of its newest
    /// messages with the configured format and report what siteflow would make of them.
    #[arg(long)]
    connect: bool,
    /// With --connect: messages sampled per topic.
    #[arg(long, value_name = "N", default_value_t = 100, requires = "connect")]
    sample: usize,
    /// With --connect: longest wait for the brokers' answers, in seconds.
    #[arg(long, value_name = "SECS", default_value_t = 5.0, requires = "connect")]
    timeout_secs: f64,
}

fn init_logging(config: &Config) {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    use std::io::IsTerminal;
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

fn window_spec(config: &Config) -> WindowSpec {
    config.window_spec()
}

fn load_scenario(config: &Config, res: &Resources) -> anyhow::Result<Scenario> {
    match &config.simulator.scenario {
        Some(p) => Scenario::load(&p.relative(), &res.inventory).map_err(anyhow::Error::msg),
        None => Ok(Scenario::default()),
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let app = App::build(config).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let listener = siteflow::http::listen(app.config.http.listen, app.config.http.max_connections)
        .with_context(|| format!("cannot listen on {} (http.listen / --listen)", app.config.http.listen))?;
    tracing::info!(
        listen = %app.config.http.listen,
        sites = app.resources.inventory.len(),
        window_secs = app.config.window.size_secs,
        flows_sql = %app.resources.sql_of(&siteflow::table::FLOWS).map_or("none", |s| s.origin.as_str()),
        scenario = %app.scenario,
        "siteflow started: metrics at http://{}/metrics",
        app.config.http.listen
    );
    let (running, pipeline_run) = app.start(stop_rx)?;
    let Running { config, history, state, .. } = running;
    let latency = state.metrics.clone();
    let stopping = state.stopping.clone();
    let flusher = history.clone();
    let flush_every = std::time::Duration::from_secs(config.history.flush_interval_secs);
    let history_task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(flush_every);
        tick.tick().await;
        loop {
            tick.tick().await;
            let h = flusher.clone();
            match tokio::task::spawn_blocking(move || h.flush()).await {
                Ok(Ok(rows)) if rows > 0 => tracing::debug!(rows, "history written to Parquet"),
                Ok(Err(e)) => {
                    tracing::error!("history flush failed (the windows stay in memory; next attempt at the next interval): {e:#}")
                }
                _ => {}
            }
        }
    });

    let (server_stop_tx, mut server_stop_rx) = watch::channel(false);
    let mut server_limits = siteflow::http::ServerLimits::from_config(&config.http);
    let files = raise_open_file_limit();
    // Each connection is a file descriptor: leave room for Kafka, checkpoints and history.
    if files > 0 && server_limits.max_connections as u64 + 256 > files {
        server_limits.max_connections = files.saturating_sub(256).max(16) as usize;
        tracing::warn!(
            open_files = files,
            max_connections = server_limits.max_connections,
            "http.max_connections lowered to fit the open-file limit (raise LimitNOFILE / ulimit -n)"
        );
    }
    let app = siteflow::http::router_with(state, config.api.clone(), &config.http);
    let server = tokio::spawn(siteflow::http::serve(listener, app, server_limits, async move {
        let _ = server_stop_rx.wait_for(|s| *s).await;
    }));
    let mut pipeline_task = pipeline_run;

    // The pipeline ends on a signal, or by itself when a finite simulation is done.
    let summary = tokio::select! {
        _ = wait_for_signal() => {
            stopping.store(true, Ordering::Release);
            let _ = stop_tx.send(true);
            (&mut pipeline_task).await
        }
        done = &mut pipeline_task => {
            if config.source.kind == SourceKind::File {
                // A replay's results are what it is for: keep serving them until stopped.
                tracing::info!("replay finished: every window is published; serving until stopped (SIGTERM / Ctrl-C)");
                wait_for_signal().await;
                stopping.store(true, Ordering::Release);
            }
            done
        }
    };
    let summary = summary.context("pipeline task panicked")??;
    history_task.abort();
    match history.flush() {
        // Without history.dir there is nothing to write: the windows lived in memory only.
        Ok(rows) if config.history.dir.is_some() => tracing::info!(rows, "history written to Parquet at shutdown"),
        Ok(_) => {}
        Err(e) => tracing::error!("history flush at shutdown failed: {e:#}"),
    }
    let _ = server_stop_tx.send(true);
    server.await.context("server task panicked")?.context("HTTP server failed")?;
    if let Some((p50, p99)) = latency.close_latency_quantiles() {
        tracing::info!(windows = summary.windows_closed, p50_seconds = p50, p99_seconds = p99, "window close-to-visible latency");
    }
    Ok(())
}

/// `siteflow sql`: asks a running instance (Arrow IPC over HTTP) or reads a history directory.
async fn sql(args: &SqlArgs) -> anyhow::Result<()> {
    let (schema, batches) = match &args.data {
        Some(dir) => {
            anyhow::ensure!(dir.is_dir(), "{}: no such directory (history.dir of a siteflow configuration)", dir.display());
            let options =
                HistoryOptions { dir: Some(dir.clone()), retention_days: u32::MAX, compact_min_files: usize::MAX, max_memory_rows: 0 };
            let history = History::open(options)?;
            anyhow::ensure!(
                history.snapshot().values().any(|t| !t.files.is_empty()),
                "{}: the history is empty: no window has been written there yet (siteflow writes every history.flush_interval_secs and at shutdown)",
                dir.display()
            );
            let limits = SqlLimits::from_config(&siteflow::config::SqlConfig::default());
            let engine = SqlEngine::new(Arc::new(siteflow::inventory::Inventory::embedded()), history, None, limits, 10.0);
            engine.query(&args.query).await.map_err(|e| anyhow::anyhow!("{e}"))?
        }
        None => {
            let from_env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
            let base = args.url.clone().or_else(|| from_env("SITEFLOW_SQL_URL")).unwrap_or_else(|| "http://127.0.0.1:9898".into());
            let url = format!("{}/api/sql?format=arrow", base.trim_end_matches('/'));
            let query = args.query.clone();
            let token = args.token.clone().or_else(|| from_env("SITEFLOW_SQL_TOKEN"));
            tokio::task::spawn_blocking(move || ask_server(&url, &query, token.as_deref())).await??
        }
    };
    print_batches(args.format, &schema, &batches)
}

/// Prints query results as a table (with a row count), CSV or JSON.
fn print_batches(
    format: OutputFormat,
    schema: &datafusion::arrow::datatypes::SchemaRef,
    batches: &[datafusion::arrow::array::RecordBatch],
) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match format {
        OutputFormat::Table => {
            use std::io::Write;
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            // No rows still shows the columns asked for (an empty batch prints its header).
            let empty = [datafusion::arrow::array::RecordBatch::new_empty(schema.clone())];
            let table = datafusion::arrow::util::pretty::pretty_format_batches(if rows == 0 { &empty } else { batches })?;
            writeln!(out, "{table}")?;
            writeln!(out, "({rows} row{})", if rows == 1 { "" } else { "s" })?;
        }
        OutputFormat::Csv => std::io::Write::write_all(&mut out, &siteflow::http::encode_batches(SqlFormat::Csv, schema, batches)?)?,
        OutputFormat::Json => {
            std::io::Write::write_all(&mut out, &siteflow::http::encode_batches(SqlFormat::Json, schema, batches)?)?;
            std::io::Write::write_all(&mut out, b"\n")?;
        }
    }
    Ok(())
}

type Batches = (datafusion::arrow::datatypes::SchemaRef, Vec<datafusion::arrow::array::RecordBatch>);

fn ask_server(url: &str, query: &str, token: Option<&str>) -> anyhow::Result<Batches> {
    let agent: ureq::Agent = ureq::Agent::config_builder().http_status_as_error(false).build().into();
    let mut request = agent.post(url).header("Content-Type", "text/plain; charset=utf-8");
    if let Some(t) = token {
        request = request.header("Authorization", &format!("Bearer {t}"));
    }
    let mut response = request.send(query).with_context(|| format!("cannot reach {url} (is siteflow running there? --url)"))?;
    let status = response.status().as_u16();
    let body = response.body_mut().with_config().limit(u64::MAX).read_to_vec()?;
    if status != 200 {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).to_string());
        anyhow::bail!("{message} (HTTP {status})");
    }
    let reader = datafusion::arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(body), None)?;
    let schema = reader.schema();
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    Ok((schema, batches))
}

async fn check(args: &CheckArgs) -> anyhow::Result<()> {
    let config = Config::load(Some(&args.config))?;
    let res = Resources::load(&config)?;
    let scenario = load_scenario(&config, &res)?;
    let windows = plan_windows(window_spec(&config), &res).await?;
    println!("{}: ok", args.config.display());
    let sites = res.inventory.sites();
    let by_exporter = sites.iter().filter(|s| s.prefixes.is_empty()).count();
    let guessing = sites.iter().filter(|s| s.prefixes.is_empty() && s.exporter_ifindex.is_none() && s.uplink_ifindex.is_none()).count();
    print!("  inventory: {} sites; levels {}", res.inventory.len(), res.inventory.levels().join(" → "));
    if by_exporter > 0 {
        print!(" ({by_exporter} by exporter alone; {guessing} without uplink_ifindex count their router's flows as `in`)");
    }
    println!();
    for (id, (table, sql)) in res.sql.iter().enumerate() {
        println!("  {} SQL: {} → columns {}", table.name, sql.origin, column_list(&windows, id));
    }
    let w = &config.window;
    println!(
        "  windows: {} s, published after {} ms, allowed lateness {} ms per exporter, corrections for {} s, exporter skew {} s",
        w.size_secs, w.publish_delay_ms, w.allowed_lateness_ms, w.correction_horizon_secs, w.max_exporter_skew_secs
    );
    println!("  source: {:?}; scenario: {} fault(s)", config.source.kind, scenario.faults.len());
    if config.source.kind == SourceKind::Kafka {
        let topics: Vec<String> = config
            .kafka
            .topics
            .iter()
            .map(|t| match t.event_time {
                siteflow::types::EventTime::FlowEnd => format!("{} ({})", t.name, t.format.as_str()),
                e => format!("{} ({}, event_time {})", t.name, t.format.as_str(), e.as_str()),
            })
            .collect();
        println!("  kafka: {} group {}: {}", config.kafka.brokers, config.kafka.group_id, topics.join(", "));
        if !config.kafka.properties.is_empty() {
            // Names only: values are often secrets.
            let names: Vec<&str> = config.kafka.properties.keys().map(String::as_str).collect();
            println!("  kafka properties: {}", names.join(", "));
        }
        if let Some(dir) = &config.checkpoint.dir {
            println!("  checkpoints: {} every {} s", resolve(dir).display(), config.checkpoint.interval_secs);
        }
    }
    if config.source.kind == SourceKind::File {
        let source = siteflow::replay::configured_source(&config)?;
        let files: Vec<String> = source
            .describe_files()
            .iter()
            .map(|(path, format, compression, messages)| {
                format!("{} ({}, {}, {messages} messages)", path.display(), format.as_str(), compression.as_str())
            })
            .collect();
        println!("  files: {}", files.join(", "));
    }
    println!(
        "  readiness: period {} s, hold {} s; {} meeting(s); {} maintenance window(s)",
        res.policy.period_secs,
        res.policy.hold_secs,
        res.meetings.len(),
        res.maintenance.len()
    );
    if let Some(topic) = &config.kafka.meetings_topic {
        println!("  meetings API: shared through topic {topic} (kafka.meetings_topic)");
    }
    println!("  http: {}", config.http.listen);
    if let Some(warning) = top_talkers_warning(&config, &res, &windows) {
        println!("  warning: {warning}");
    }
    if args.explain {
        for (id, (table, _)) in res.sql.iter().enumerate() {
            println!("\n{}:\n{}", table.name, windows.describe(id));
        }
    }
    if args.connect {
        anyhow::ensure!(!config.kafka.topics.is_empty(), "check --connect: kafka.topics lists no topic to sample");
        anyhow::ensure!(
            args.timeout_secs.is_finite() && args.timeout_secs > 0.0 && args.timeout_secs <= 600.0,
            "--timeout-secs {}: must be between 0 and 600",
            args.timeout_secs
        );
        println!("connecting to {} ...", config.kafka.brokers);
        let options = ProbeOptions { sample: args.sample.max(1), timeout: std::time::Duration::from_secs_f64(args.timeout_secs) };
        let inventory = res.inventory.clone();
        let report = tokio::task::spawn_blocking(move || kafka_probe::probe(&config, inventory, options))
            .await
            .context("check --connect panicked")?
            .map_err(anyhow::Error::msg)?;
        print!("{report}");
        let problems = report.problems();
        anyhow::ensure!(problems.is_empty(), "check --connect found {} problem(s): {}", problems.len(), problems.join("; "));
    }
    Ok(())
}

fn column_list(windows: &siteflow::window::WindowOperator, table: usize) -> String {
    windows.output_schema(table).fields().iter().map(|f| f.name().as_str()).collect::<Vec<_>>().join(", ")
}

/// Raises the soft open-file limit to the hard one (as Go programs do) and returns it (0: unknown).
fn raise_open_file_limit() -> u64 {
    #[cfg(unix)]
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    unsafe {
        let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 0;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit.rlim_cur = limit.rlim_max;
            }
        }
        limit.rlim_cur as u64
    }
    #[cfg(not(unix))]
    0
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Run(_) | Command::Demo(_)) {
        // Every command but the servers (whose sockets must see EPIPE as an error, not a
        // signal): a closed pipe (`siteflow check … | head -1`) ends it quietly, as it ends
        // `cat`, instead of a panic in println!.
        #[cfg(unix)]
        // SAFETY: restores the default disposition of SIGPIPE before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Check(args) => check(&args).await,
            Command::Sql(args) => sql(&args).await,
            Command::Replay(args) => {
                let config = Config::load(args.config.as_deref())?;
                init_logging(&config);
                let options = siteflow::replay::ReplayOptions {
                    files: args.files,
                    format: args.format,
                    event_time: args.event_time,
                    speed: args.speed,
                    history_dir: args.history_dir,
                    output: args.output,
                    output_file: args.output_file,
                    progress_interval: args.progress_interval,
                };
                Ok(siteflow::replay::replay(&options, &config).await?)
            }
            Command::Version(args) => {
                let build = &siteflow::build_info::BUILD;
                if args.json {
                    println!("{}", serde_json::to_string(build)?);
                } else {
                    println!("{build}");
                }
                Ok(())
            }
            Command::Run(args) => {
                let mut config = Config::load(Some(&args.config))?;
                if let Some(listen) = args.listen {
                    config.http.listen = listen;
                }
                if let Some(stage) = args.stage.as_deref().and_then(siteflow::config::Stage::parse) {
                    config.scale_out.stage = stage;
                    config.validate(&args.config.display().to_string())?;
                }
                init_logging(&config);
                serve(config).await
            }
            Command::Demo(args) => {
                let mut config = Config::load(args.config.as_deref())?;
                config.source.kind = siteflow::config::SourceKind::Simulator;
                if let Some(listen) = args.listen {
                    config.http.listen = listen;
                }
                if let Some(path) = args.scenario {
                    config.simulator.scenario = Some(RelativePathBuf::from(path));
                }
                if let Some(rate) = args.rate {
                    config.simulator.records_per_sec = rate;
                }
                if let Some(seed) = args.seed {
                    config.simulator.seed = seed;
                }
                if config.simulator.pace == Pace::Fast && config.simulator.duration_secs.is_none() {
                    config.simulator.pace = Pace::Realtime;
                }
                config.validate("command line")?;
                init_logging(&config);
                serve(config).await
            }
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("siteflow: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
