//! Configuration → runtime objects, in one place: [`App::build`] loads and checks everything a
//! configuration names (inventory, pipeline SQL, policy, meetings, scenario, history, the
//! source's checkpoints and files) and wires the pipeline, its sinks and what the HTTP server
//! shares. Nothing runs yet: `serve` (in `main.rs`) only starts it and stops it.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::checkpoint::{CheckpointError, CheckpointStore};
use crate::config::{Config, SourceKind, Stage, resolve};
use crate::dead_letter::{DeadLetterError, DeadLetters};
use crate::driver::ingest::IngestOutput;
use crate::driver::kafka::KafkaDriver;
use crate::driver::site::SiteDriver;
use crate::history::{History, HistoryError, HistoryOptions, HistorySink};
use crate::http::AppState;
use crate::meetings_topic::{MeetingsTopic, MeetingsTopicError};
use crate::metrics::PipelineMetrics;
use crate::pipeline::{BuildError, Pipeline, PipelineError, Resources, RunSummary};
use crate::readiness_topic::ReadinessTopic;
use crate::sink::prometheus::SiteMetrics;
use crate::source::file::{FileSource, FileSourceError};
use crate::source::kafka::{KafkaError, KafkaSource};
use crate::source::simulator::{Scenario, Simulator};
use crate::sql::{RecentFlows, SqlEngine, SqlLimits};
use crate::windows_topic::WindowsTopic;

/// A configuration that cannot be turned into a running siteflow, naming what is wrong. All of
/// them are the user's input (or the machine's: a directory that cannot be written).
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The simulator's scenario file (the message names it).
    #[error("{0}")]
    Scenario(String),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error("checkpoint.dir must be set when source.kind is kafka")]
    NoCheckpointDir,
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error(transparent)]
    DeadLetters(#[from] DeadLetterError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Files(#[from] FileSourceError),
    #[error(transparent)]
    MeetingsTopic(#[from] MeetingsTopicError),
    #[error(transparent)]
    HandOff(#[from] crate::shuffle::IngestError),
    /// The site stage cannot start (its message names the topic).
    #[error("{0}")]
    ScaleOut(String),
}

/// The source a configuration names, ready to start.
pub enum SourcePlan {
    Simulator(Box<Simulator>),
    /// Kafka: the consumer starts with the pipeline (it joins the group at once).
    Kafka {
        store: CheckpointStore,
        dead_letters: Option<DeadLetters>,
        checkpoints: PathBuf,
    },
    Files(FileSource),
}

/// Everything a configuration names, built and checked.
pub struct App {
    pub config: Config,
    pub resources: Resources,
    /// What the scenario (if any) does, for the start-up log line.
    pub scenario: String,
    pub pipeline: Pipeline,
    pub source: SourcePlan,
    pub history: History,
    /// What the HTTP server reads: metrics, site gauges, readiness, SQL.
    pub state: AppState,
}

impl App {
    /// Loads and checks everything `config` names and wires the pipeline.
    pub async fn build(config: Config) -> Result<Self, AppError> {
        let resources = Resources::load(&config)?;
        let scenario = match &config.simulator.scenario {
            Some(p) => Scenario::load(&p.relative(), &resources.inventory).map_err(AppError::Scenario)?,
            None => Scenario::default(),
        };
        let metrics = Arc::new(PipelineMetrics::new(&Pipeline::FORMATS, &crate::table::TABLES));
        // Last-window gauges go stale with the same limit that turns readiness verdicts `unknown`.
        let stale_after = Duration::from_secs(config.window.size_secs * u64::from(resources.policy.freshness_windows));
        let sites = SiteMetrics::new(resources.inventory.clone(), config.window.size_secs as f64).stale_after(stale_after);
        let history = History::open(HistoryOptions::from_config(&config.history))?;
        let mut history_sink = HistorySink::new(history.clone(), config.sql.top_talkers);
        if config.scale_out.stage == Stage::Site {
            // The windows topic brings this instance's windows back after a restart too.
            history_sink = history_sink.replacing();
        }
        let sinks: Vec<Box<dyn crate::sink::WindowSink>> = vec![Box::new(sites.clone()), Box::new(history_sink)];
        let mut pipeline = Pipeline::build(&config, &resources, metrics.clone(), sinks).await?;
        crate::history::declare_tables(&history, &pipeline.output_schemas(), config.sql.top_talkers);
        let recent_flows = RecentFlows::new(config.sql.recent_flows_max_rows, config.sql.recent_flows_max_mb << 20);
        pipeline.keep_recent_flows(recent_flows.clone());
        let engine = SqlEngine::new(
            resources.inventory.clone(),
            history.clone(),
            Some(recent_flows),
            SqlLimits::from_config(&config.sql),
            config.window.size_secs as f64,
        );
        if config.history.dir.is_some() {
            resume_availability(&engine, &pipeline.readiness()).await;
        }
        let state = AppState {
            metrics: metrics.clone(),
            sites,
            ready: pipeline.ready.clone(),
            stopping: Arc::new(AtomicBool::new(false)),
            readiness: pipeline.readiness(),
            sql: Some((engine, config.sql.token.clone())),
            meetings_topic: None,
        };
        let mut state = state;
        if let Some(topic) = &config.kafka.meetings_topic {
            let rejected = metrics.register_meetings_topic_rejected();
            let shared = MeetingsTopic::start(&config.kafka, topic, state.readiness.clone(), config.api.max_meetings, rejected)?;
            state.meetings_topic = Some(Arc::new(shared));
        }
        let description = scenario.description.clone();
        let source = match config.source.kind {
            SourceKind::Simulator => SourcePlan::Simulator(Box::new(Simulator::new(
                config.simulator.clone(),
                config.window_spec(),
                resources.inventory.clone(),
                scenario,
            ))),
            SourceKind::Kafka => {
                let checkpoints = config.checkpoint.dir.as_ref().map(resolve).ok_or(AppError::NoCheckpointDir)?;
                let store = CheckpointStore::open(&checkpoints, pipeline.table_names())?;
                let dead_letters = match &config.kafka.dead_letter_topic {
                    Some(topic) => Some(DeadLetters::new(&config.kafka, topic, metrics)?),
                    None => None,
                };
                pipeline.keep_results_per_partition();
                SourcePlan::Kafka { store, dead_letters, checkpoints }
            }
            SourceKind::File => SourcePlan::Files(crate::replay::configured_source(&config)?),
        };
        Ok(Self { config, resources, scenario: description, pipeline, source, history, state })
    }

    /// Starts the source and the pipeline task on it; the task ends when the source does or
    /// when `shutdown` turns true. Returns the task and what stays with the caller.
    pub fn start(self, shutdown: watch::Receiver<bool>) -> Result<(Running, JoinHandle<Result<RunSummary, PipelineError>>), AppError> {
        let App { config, resources, pipeline, source, history, state, .. } = self;
        let task = match source {
            SourcePlan::Simulator(sim) => tokio::spawn(crate::driver::run_source(*sim, pipeline, shutdown)),
            SourcePlan::Files(files) => tokio::spawn(crate::driver::run_source(files, pipeline, shutdown)),
            SourcePlan::Kafka { store, checkpoints, .. } if config.scale_out.stage == Stage::Site => {
                let kafka = config.site_stage_kafka();
                let (consumer, events) = KafkaSource::start(&kafka, store.clone(), state.metrics.clone())?;
                tracing::info!(
                    brokers = %kafka.brokers,
                    group = %kafka.group_id,
                    topic = %config.scale_out.topic,
                    checkpoints = %checkpoints.display(),
                    "site stage: consuming the internal topic"
                );
                let interval = Duration::from_secs(config.checkpoint.interval_secs);
                let driver = SiteDriver::new(
                    consumer,
                    events,
                    store,
                    pipeline.state_schemas(),
                    &config.kafka,
                    &config.scale_out.topic,
                    interval,
                    state.metrics.clone(),
                )
                .map_err(AppError::ScaleOut)?
                .readiness(state.ready.clone(), config.kafka.ready_lag);
                let mut pipeline = pipeline;
                let shared = ReadinessTopic::start(&config.kafka, &config.scale_out.readiness_topic, state.readiness.clone())
                    .map_err(AppError::ScaleOut)?;
                pipeline.add_sink(Box::new(shared));
                let windows = WindowsTopic::start(
                    &config.kafka,
                    &config.scale_out.windows_topic,
                    history.clone(),
                    config.sql.top_talkers,
                    state.metrics.register_windows_topic(),
                )
                .map_err(AppError::ScaleOut)?;
                pipeline.add_sink(Box::new(windows));
                tokio::spawn(crate::driver::run(driver, pipeline, shutdown))
            }
            SourcePlan::Kafka { store, dead_letters, checkpoints } => {
                let (consumer, events) = KafkaSource::start(&config.kafka, store.clone(), state.metrics.clone())?;
                tracing::info!(
                    brokers = %config.kafka.brokers,
                    group = %config.kafka.group_id,
                    topics = ?config.kafka.topics.iter().map(|t| format!("{} ({})", t.name, t.format.as_str())).collect::<Vec<_>>(),
                    checkpoints = %checkpoints.display(),
                    "consuming from Kafka"
                );
                let interval = Duration::from_secs(config.checkpoint.interval_secs);
                let mut driver = KafkaDriver::new(consumer, events, store, dead_letters, interval, state.metrics.clone())
                    .readiness(state.ready.clone(), config.kafka.ready_lag);
                if config.scale_out.stage == Stage::Ingest {
                    driver = driver.hand_on(IngestOutput::new(&config.kafka, &config.scale_out.topic, pipeline.state_schemas())?);
                }
                tokio::spawn(crate::driver::run(driver, pipeline, shutdown))
            }
        };
        Ok((Running { config, resources, history, state }, task))
    }
}

/// What stays with `serve` once the pipeline task runs.
pub struct Running {
    pub config: Config,
    pub resources: Resources,
    pub history: History,
    pub state: AppState,
}

/// The month's availability gauge goes on from what the history holds of the month (a restart
/// would otherwise start it again from nothing). Best effort: without that history, or if the
/// query fails, the gauge counts from the start, and SQL's `availability_daily` stays the
/// authoritative figure.
async fn resume_availability(engine: &SqlEngine, readiness: &crate::readiness::SharedReadiness) {
    match engine.month_availability().await {
        Ok(months) if !months.is_empty() => {
            let resumed = readiness.engine.write().expect("readiness lock").resume_months(&months);
            tracing::info!(sites = resumed, "this month's availability read back from the history");
        }
        Ok(_) => {}
        Err(e) => tracing::warn!("could not read this month's availability back from the history (the gauge counts from now): {e}"),
    }
}
