//! Configuration: defaults, then a YAML file, then `SITEFLOW_*` environment variables.
//!
//! Every field has a default and a doc comment; `deploy/siteflow.example.yaml` is the commented
//! reference (a test keeps it equal to the defaults). Unknown keys are rejected with the file
//! and key named. Relative paths in a file are relative to that file's directory.
//!
//! Environment: `SITEFLOW_` + the key path joined with `__`, e.g. `SITEFLOW_HTTP__LISTEN=127.0.0.1:9900`
//! or `SITEFLOW_WINDOW__SIZE_SECS=60`. librdkafka properties, whose names have dots, are
//! `SITEFLOW_KAFKA__PROPERTIES__` + the name in capitals with `_` for `.`
//! (`SITEFLOW_KAFKA__PROPERTIES__SASL_PASSWORD` sets `sasl.password`). Secrets (the tokens and
//! every Kafka property) may instead name a file with a `_FILE` suffix
//! (`SITEFLOW_API__TOKEN_FILE=/run/secrets/api-token`): its content, without the final newline.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format as _, Serialized, Yaml};
use figment::value::magic::RelativePathBuf;
use serde::{Deserialize, Serialize};

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub inventory: InventoryConfig,
    pub pipeline: PipelineConfig,
    pub window: WindowConfig,
    pub decode: DecodeConfig,
    pub sampling: SamplingConfig,
    pub source: SourceConfig,
    pub simulator: SimulatorConfig,
    pub kafka: KafkaConfig,
    pub checkpoint: CheckpointConfig,
    pub scale_out: ScaleOutConfig,
    pub readiness: ReadinessConfig,
    pub http: HttpConfig,
    pub api: ApiConfig,
    pub sql: SqlConfig,
    pub history: HistoryConfig,
    pub log: LogConfig,
}

/// Where the sites come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct InventoryConfig {
    /// CSV file of sites (columns as in `pipelines/hagiang/sites.csv`). Unset: the built-in
    /// Hà Giang inventory of 242 sites.
    pub sites_csv: Option<RelativePathBuf>,
}

/// The SQL that aggregates each window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PipelineConfig {
    /// SQL over table `flows`, grouped by `window_start`, `site`, `direction`. Unset: the built-in
    /// `pipelines/hagiang/flows.sql`.
    pub flows_sql: Option<RelativePathBuf>,
    /// SQL over table `probes`, grouped by `window_start`, `site`. Unset: the built-in
    /// `pipelines/hagiang/probes.sql`.
    pub probes_sql: Option<RelativePathBuf>,
    /// SQL over table `interfaces` (byte counts from interface octet counters), grouped by
    /// `window_start`, `site` and optionally `interface`, `device`, `direction`. Unset: the
    /// built-in `pipelines/hagiang/interfaces.sql`.
    pub interfaces_sql: Option<RelativePathBuf>,
    /// SQL over table `flows` per conversation, the source of SQL table `top_talkers`. Unset:
    /// the built-in `pipelines/hagiang/top_talkers.sql`.
    pub top_talkers_sql: Option<RelativePathBuf>,
}

impl PipelineConfig {
    /// The file that replaces the built-in SQL of the table whose `config_key` is `key`.
    pub fn sql_file(&self, key: &str) -> Option<&RelativePathBuf> {
        match key {
            "flows_sql" => self.flows_sql.as_ref(),
            "probes_sql" => self.probes_sql.as_ref(),
            "interfaces_sql" => self.interfaces_sql.as_ref(),
            "top_talkers_sql" => self.top_talkers_sql.as_ref(),
            _ => None,
        }
    }
}

/// Event-time windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowConfig {
    /// Length of each tumbling window, in seconds.
    pub size_secs: u64,
    /// How far behind the newest record of its own exporter a record may be and still count,
    /// in milliseconds (120 s covers a collector that publishes its cache every 60 s plus
    /// NetFlow's 15 s inactive timeout). Records later than this are counted in
    /// `siteflow_records_late_total` and left out.
    pub allowed_lateness_ms: u64,
    /// How long after a window's end (by event time) it is first published, in milliseconds.
    /// Records within the lateness that arrive after that correct the published window.
    pub publish_delay_ms: u64,
    /// An exporter whose clock trails the newest exporter of its partition by more than this
    /// does not hold publication back (its figures arrive as corrections), in seconds.
    pub max_exporter_skew_secs: u64,
    /// Published windows stay correctable this long (by event time, behind each partition's
    /// newest record), in seconds; older records are late. Memory grows with it.
    pub correction_horizon_secs: u64,
    /// An exporter or partition that delivered nothing for this long stops holding windows
    /// open, in seconds.
    pub idle_partition_timeout_secs: u64,
    /// Aggregate and close the tables fed by one batch (`flows` and `top_talkers` read the same
    /// flows) side by side, one thread each (`auto`: when this process may run on two cores or
    /// more; `on`; `off`, the default: on the 2-core benchmark machine it gained nothing next to
    /// `decode.ahead`, BENCHMARKS.md). The results are the same either way.
    pub parallel_tables: SecondCore,
}

impl Default for WindowConfig {
    fn default() -> Self {
        Self {
            size_secs: 10,
            allowed_lateness_ms: 120_000,
            publish_delay_ms: 5_000,
            max_exporter_skew_secs: 15,
            correction_horizon_secs: 600,
            idle_partition_timeout_secs: 30,
            parallel_tables: SecondCore::Off,
        }
    }
}

/// Limits that separate real records from garbage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DecodeConfig {
    /// Messages larger than this are rejected as `oversize`, in bytes.
    pub max_message_bytes: usize,
    /// A record claiming more bytes than this (before sampling correction) is rejected as
    /// `absurd_counter`.
    pub max_bytes_per_record: u64,
    /// Event times further than this in the future are rejected as `bad_timestamp`, in seconds.
    pub max_future_secs: u64,
    /// With `event_time: spread`, most windows one flow is spread over; a flow that started
    /// earlier (a long flow, a broken start time) is spread over the last ones only and counted
    /// in `siteflow_flows_spread_clamped_total`.
    pub max_spread_windows: u32,
    /// Threads that decode one micro-batch of flow messages side by side (0: as many as the
    /// cores this process may run on). The rest of the pipeline stays on one thread. Default 1:
    /// on the 2-core benchmark machine two threads gained nothing (BENCHMARKS.md).
    pub threads: usize,
    /// Prepare the next batches (of any source: the simulator, files, the Kafka consumer's
    /// delivered batches) on other threads while this one aggregates the current one: decode,
    /// enrich, and the flow tables' partial aggregates (windows holding a late record are
    /// aggregated again here). `auto`: when this process may run on two cores or more; `on`;
    /// `off`.
    pub ahead: SecondCore,
}

/// A use of a second core: `auto` (on when this process may run on two cores or more), `on`
/// or `off` (`decode.ahead`, `window.parallel_tables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SecondCore {
    #[default]
    Auto,
    On,
    Off,
}

impl SecondCore {
    /// Whether it is on, with `auto` resolved by the cores this process may run on (its CPU
    /// affinity).
    pub fn enabled(self) -> bool {
        match self {
            SecondCore::On => true,
            SecondCore::Off => false,
            SecondCore::Auto => std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2),
        }
    }
}

impl Default for DecodeConfig {
    fn default() -> Self {
        Self {
            max_message_bytes: 1 << 20,
            max_bytes_per_record: 1 << 40,
            max_future_secs: 86_400,
            max_spread_windows: 360,
            threads: 1,
            ahead: SecondCore::Auto,
        }
    }
}

impl DecodeConfig {
    /// `ahead`, with `auto` resolved.
    pub fn decode_ahead(&self) -> bool {
        self.ahead.enabled()
    }

    /// `threads`, with 0 resolved to the cores this process may run on (its CPU affinity).
    pub fn decode_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

/// Sampling correction: bytes and packets are multiplied by the exporter's sampling rate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingConfig {
    /// Rate applied to records that carry none (counted in
    /// `siteflow_flows_missing_sampling_rate_total`).
    pub default_rate: u32,
    /// Per-exporter rates that replace what the records say, e.g. `{"172.16.2.21": 1000}`.
    pub overrides: BTreeMap<IpAddr, u32>,
}

impl Default for SamplingConfig {
    fn default() -> Self {
        Self { default_rate: 1, overrides: BTreeMap::new() }
    }
}

/// Which source feeds the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// The built-in simulator of the inventory's sites (see `simulator`).
    #[default]
    Simulator,
    /// Kafka topics (see `kafka` and `checkpoint`).
    Kafka,
    /// Recorded files (see `source.files`), replayed once; then the results stay served until
    /// the process is stopped.
    File,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    /// `simulator`, `kafka` or `file`.
    pub kind: SourceKind,
    /// With `kind: file`: the files to replay (plain, gzip or zstd), each with its format
    /// (unset: detected from its first messages) and event time.
    pub files: Vec<FileConfig>,
}

/// One recorded file for `source.kind: file`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub path: RelativePathBuf,
    /// As `kafka.topics[].format` (but not `goflow2_protobuf_plain`); unset: detected.
    #[serde(default)]
    pub format: Option<crate::types::Format>,
    /// As `kafka.topics[].event_time`.
    #[serde(default)]
    pub event_time: crate::types::EventTime,
}

/// One Kafka topic and the format its messages are in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicConfig {
    pub name: String,
    /// `goflow2_json`, `goflow2_protobuf` (varint-length-delimited), `goflow2_protobuf_plain`,
    /// `pmacct_json`, `telegraf_json`, `pmacct_sflow_counters_json` or `siteflow_probe_json`.
    pub format: crate::types::Format,
    /// Which time of a flow places it in a window: `flow_end` (default), `flow_start`, `arrival`
    /// (the collector's receipt) or `spread` (over the windows from the flow's start to its end).
    #[serde(default)]
    pub event_time: crate::types::EventTime,
}

/// The Kafka source: a consumer group over several topics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Consumer group: instances with the same group split the partitions between them.
    pub group_id: String,
    /// Topics to consume, each with its format.
    pub topics: Vec<TopicConfig>,
    /// Any librdkafka property, passed through as is (TLS, SASL, timeouts...), e.g.
    /// `{"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"}`; the list is
    /// librdkafka's configuration reference (<https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md>).
    /// `enable.auto.commit` is always off: offsets are committed after checkpoints.
    pub properties: BTreeMap<String, String>,
    /// Most messages per micro-batch.
    pub batch_max_messages: usize,
    /// Most payload bytes per micro-batch: with many records per message, a batch of
    /// `batch_max_messages` could hold millions of records, and very large batches are slower
    /// to aggregate (BENCHMARKS.md).
    pub batch_max_bytes: usize,
    /// Longest wait to fill a micro-batch, in milliseconds.
    pub batch_linger_ms: u64,
    /// Micro-batches waiting for the pipeline before partitions are paused (back-pressure).
    pub max_queued_batches: usize,
    /// Topic for records that cannot be used, with the original payload and the reason in
    /// headers. Unset: bad records are only counted.
    pub dead_letter_topic: Option<String>,
    /// Compacted topic that holds the meetings posted to `/api/meetings` (key: meeting id),
    /// read by every instance from the beginning: meetings are shared by all instances and
    /// survive restarts. Unset: posted meetings live in this instance's memory only.
    pub meetings_topic: Option<String>,
    /// `/readyz` turns ready once the group has assigned this instance its partitions (none is
    /// fine: a spare replica) and each is at most this many messages behind its end.
    pub ready_lag: u64,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_id: "siteflow".into(),
            topics: Vec::new(),
            properties: BTreeMap::new(),
            batch_max_messages: 10_000,
            batch_max_bytes: 4 << 20,
            batch_linger_ms: 100,
            max_queued_batches: 4,
            dead_letter_topic: None,
            meetings_topic: None,
            ready_lag: 10_000,
        }
    }
}

/// Which part of a scale-out deployment an instance runs (docs/scale-out.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Everything in one process, without an internal topic.
    #[default]
    All,
    /// Decode, enrich and aggregate each window partially; hand the partial aggregates to
    /// `scale_out.topic`, cut by site, exactly once. Needs `source.kind: kafka`.
    Ingest,
    /// Merge the partial aggregates of `scale_out.topic` for the sites of the internal
    /// partitions this instance is assigned; judge, export and answer SQL for those sites.
    Site,
}

impl Stage {
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "all" => Some(Self::All),
            "ingest" => Some(Self::Ingest),
            "site" => Some(Self::Site),
            _ => None,
        }
    }
}

/// Scale-out in two stages through Kafka (docs/scale-out.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScaleOutConfig {
    /// `all` (default): one process does everything; `ingest`: the first stage only; `site`:
    /// the second stage only.
    pub stage: Stage,
    /// The internal topic between the stages; its partitions split the sites.
    pub topic: String,
    /// The site stage: a compacted topic where each instance writes its sites' verdicts and
    /// reads the others', so that any instance answers `/api/readiness` for every site.
    pub readiness_topic: String,
    /// The site stage: a topic where each instance writes its sites' closed windows and
    /// verdicts and reads the others', so that SQL on any instance covers every site.
    pub windows_topic: String,
}

impl Default for ScaleOutConfig {
    fn default() -> Self {
        Self {
            stage: Stage::All,
            topic: "siteflow.partials".into(),
            readiness_topic: "siteflow.readiness".into(),
            windows_topic: "siteflow.windows".into(),
        }
    }
}

/// Checkpoints: open window state, input offsets and results logs per partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Directory shared by the instances of a consumer group (a partition's checkpoint is read by
    /// whichever instance gets the partition next). Required with `source.kind: kafka`.
    pub dir: Option<RelativePathBuf>,
    /// Seconds between checkpoints; offsets are committed to Kafka right after each one.
    pub interval_secs: u64,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { dir: None, interval_secs: 10 }
    }
}

/// The SQL API (`POST /api/sql`, `siteflow sql`): limits per query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqlConfig {
    /// A query returning more rows than this fails (add a LIMIT or aggregate).
    pub max_rows: usize,
    /// A query running longer than this fails, in seconds.
    pub timeout_secs: u64,
    /// Memory one query may use, in MiB; beyond it the query fails (no spilling to disk).
    pub memory_limit_mb: usize,
    /// When set, `/api/sql` requires `Authorization: Bearer <token>`. Prefer the environment:
    /// `SITEFLOW_SQL__TOKEN`.
    #[serde(deserialize_with = "secret")]
    pub token: Option<String>,
    /// Raw flow records kept for table `flows_recent` (the newest), by count.
    pub recent_flows_max_rows: usize,
    /// ... and by memory, in MiB (whichever bound is hit first).
    pub recent_flows_max_mb: usize,
    /// Conversations kept per site, direction and window in table `top_talkers`; 0 turns the
    /// conversations aggregation off (it costs about as much per record as decoding).
    pub top_talkers: usize,
    /// Queries running at once; more wait up to `queue_timeout_ms`, then get 503.
    pub max_concurrent: usize,
    /// How long a query waits for a free slot, in milliseconds.
    pub queue_timeout_ms: u64,
    /// Longest query text, in bytes.
    pub max_query_bytes: usize,
    /// Deepest expression nesting (`1+1+…+1` nests one level per term).
    pub max_expression_depth: usize,
    /// Most expressions in one query.
    pub max_expression_nodes: usize,
    /// Most UNION / INTERSECT / EXCEPT operators in one query.
    pub max_set_operations: usize,
}

impl Default for SqlConfig {
    fn default() -> Self {
        Self {
            max_rows: 100_000,
            timeout_secs: 30,
            memory_limit_mb: 512,
            token: None,
            recent_flows_max_rows: 200_000,
            recent_flows_max_mb: 64,
            top_talkers: 10,
            max_concurrent: 4,
            queue_timeout_ms: 2_000,
            max_query_bytes: 256 << 10,
            max_expression_depth: 256,
            max_expression_nodes: 20_000,
            max_set_operations: 200,
        }
    }
}

/// Closed windows and readiness verdicts kept for SQL: recent ones in memory, the rest in Parquet.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HistoryConfig {
    /// Directory of the Parquet history (`<table>/date=YYYY-MM-DD/*.parquet`). Unset: memory only.
    pub dir: Option<RelativePathBuf>,
    /// Days of history kept; older dates are deleted.
    pub retention_days: u32,
    /// Seconds between writes of the recent windows to Parquet (also written at shutdown).
    pub flush_interval_secs: u64,
    /// A past date with at least this many files is compacted into one file.
    pub compact_min_files: usize,
    /// Without `dir`: rows kept in memory per table (the oldest go first).
    pub max_memory_rows: usize,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self { dir: None, retention_days: 30, flush_interval_secs: 60, compact_min_files: 24, max_memory_rows: 2_000_000 }
    }
}

/// How the simulator paces its records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Pace {
    /// Event times follow the wall clock; records are spread over each second.
    #[default]
    Realtime,
    /// As fast as possible over simulated time (tests, benchmarks); needs `duration_secs`.
    Fast,
}

/// The built-in simulator: goflow2 JSON flows and probe results for every site of the inventory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatorConfig {
    /// Seed of the random generator: the same seed gives the same records.
    pub seed: u64,
    /// Flow records per second of event time, over all sites.
    pub records_per_sec: u64,
    /// `realtime` or `fast`.
    pub pace: Pace,
    /// Event time of the first record, Unix seconds. Unset: now (realtime) or now minus
    /// `duration_secs` (fast).
    pub start_unix_secs: Option<u64>,
    /// Stop after this much event time, in seconds. Unset: run until stopped.
    pub duration_secs: Option<u64>,
    /// Messages per batch handed to the decoder.
    pub batch_records: usize,
    /// Share of flow records delayed by up to `max_out_of_order_ms` (still within lateness).
    pub out_of_order_ratio: f64,
    /// Largest delay of an out-of-order record, in milliseconds; must be below the lateness.
    pub max_out_of_order_ms: u64,
    /// Share of flow records delayed beyond the lateness (counted as late, never summed).
    pub too_late_ratio: f64,
    /// Share of flow records between addresses of no site (counted as unmatched).
    pub unmatched_ratio: f64,
    /// Seconds between two probe results of a site.
    pub probe_interval_secs: u64,
    /// Fault scenario (YAML, see `pipelines/hagiang/scenarios/`). Unset: all sites healthy.
    pub scenario: Option<RelativePathBuf>,
    /// Which time of its flows is the event time, as `kafka.topics[].event_time`. Its flows last
    /// 2 s and end at the event time the ground truth of tests counts: `flow_end`.
    pub event_time: crate::types::EventTime,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            records_per_sec: 3_000,
            pace: Pace::Realtime,
            start_unix_secs: None,
            duration_secs: None,
            batch_records: 1_000,
            out_of_order_ratio: 0.02,
            max_out_of_order_ms: 3_000,
            too_late_ratio: 0.001,
            unmatched_ratio: 0.005,
            probe_interval_secs: 5,
            scenario: None,
            event_time: crate::types::EventTime::FlowEnd,
        }
    }
}

/// Video-conference readiness.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ReadinessConfig {
    /// Policy file (thresholds, period, hold time, profiles). Unset: the built-in
    /// `pipelines/hagiang/policy.yaml`.
    pub policy: Option<RelativePathBuf>,
    /// Meeting schedule (YAML, `meetings: [...]`). Unset: none; meetings can also be posted to
    /// `/api/meetings`.
    pub meetings: Option<RelativePathBuf>,
    /// Planned maintenance windows (YAML, `maintenance: [...]`, docs/readiness.md): their time
    /// counts for neither up nor down in availability, and their outages are `planned`.
    pub maintenance: Option<RelativePathBuf>,
}

/// The HTTP server: `/metrics`, `/healthz`, `/readyz`, `/api/...`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Address to listen on. Loopback by default; set `0.0.0.0:9898` to be scraped from elsewhere.
    pub listen: SocketAddr,
    /// Connections open at once; more wait in the kernel's backlog. Keep it below the open-file
    /// limit (systemd `LimitNOFILE`).
    pub max_connections: usize,
    /// A client must send its request headers within this many seconds, or is disconnected.
    pub header_timeout_secs: u64,
    /// ... and its request body within this many seconds (408).
    pub body_timeout_secs: u64,
    /// Largest request body, in bytes (413).
    pub max_body_bytes: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9898)),
            max_connections: 4_096,
            header_timeout_secs: 10,
            body_timeout_secs: 30,
            max_body_bytes: 1 << 20,
        }
    }
}

/// The write APIs (`POST /api/meetings`, `DELETE /api/meetings/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// When set, writes require `Authorization: Bearer <token>` (401); unset, writes are
    /// accepted from loopback clients only (403). Prefer `SITEFLOW_API__TOKEN`.
    #[serde(deserialize_with = "secret")]
    pub token: Option<String>,
    /// Meetings kept at once (schedule file and API together).
    pub max_meetings: usize,
    /// Longest meeting id, in bytes.
    pub max_meeting_id_bytes: usize,
    /// Longest meeting title, in bytes.
    pub max_meeting_title_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self { token: None, max_meetings: 1_000, max_meeting_id_bytes: 128, max_meeting_title_bytes: 1_024 }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter such as `siteflow=debug`.
    /// `RUST_LOG`, when set, wins.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
    /// Seconds between two one-line status reports (records/s, sites seen, windows closed, lag).
    pub status_interval_secs: u64,
    /// A source whose records are mostly rejected for this many seconds gets one WARN naming it,
    /// its format and the top reason (repeated at most every 5 minutes while it lasts).
    pub rejection_warn_after_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Text, status_interval_secs: 60, rejection_warn_after_secs: 60 }
    }
}

/// A configuration that cannot be used, with the file or variable and the key named.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0}")]
    Load(String),
    #[error("{file}: {field}: {message}")]
    Invalid { file: String, field: &'static str, message: String },
    #[error("{0}: no such file")]
    Missing(PathBuf),
}

fn describe_figment_error(e: figment::Error) -> String {
    e.into_iter().map(|e| e.to_string()).collect::<Vec<_>>().join("; ")
}

/// Variables of the `siteflow sql` client (after the `SITEFLOW_` prefix), ignored by the server.
const CLIENT_VARIABLES: [&str; 2] = ["sql_url", "sql_token"];

/// Secrets, read from the environment as they are (figment would turn `0123` into a number).
type SecretField = fn(&mut Config) -> &mut Option<String>;
const SECRET_VARIABLES: [(&str, SecretField); 2] =
    [("SITEFLOW_SQL__TOKEN", |c| &mut c.sql.token), ("SITEFLOW_API__TOKEN", |c| &mut c.api.token)];

/// Variables that set one librdkafka property each (see the module doc).
const KAFKA_PROPERTY_PREFIX: &str = "SITEFLOW_KAFKA__PROPERTIES__";

/// The suffix of a variable that names a file holding the value (a mounted secret).
const FILE_SUFFIX: &str = "_FILE";

/// Whether figment must leave `key` (a variable after `SITEFLOW_`, any case) to
/// [`apply_env_secrets`]: the tokens, Kafka properties and their `_FILE` forms.
fn is_read_by_hand(key: &str) -> bool {
    let key = key.to_ascii_uppercase();
    let key = key.strip_suffix(FILE_SUFFIX).unwrap_or(&key);
    key.starts_with(&KAFKA_PROPERTY_PREFIX["SITEFLOW_".len()..]) || SECRET_VARIABLES.iter().any(|(v, _)| v["SITEFLOW_".len()..] == *key)
}

/// A value from the environment: `name` itself, or the content of the file `name_FILE` names
/// (without its final newline). Both set is an error: which one was meant?
fn env_value(vars: &BTreeMap<String, String>, name: &str) -> Result<Option<String>, ConfigError> {
    let file_variable = format!("{name}{FILE_SUFFIX}");
    match (vars.get(name), vars.get(&file_variable)) {
        (Some(_), Some(_)) => Err(ConfigError::Load(format!("{name} and {file_variable} are both set: keep one"))),
        (Some(value), None) => Ok(Some(value.clone())),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| ConfigError::Load(format!("{file_variable}: {path}: cannot read the secret: {e}")))?;
            let text = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(&text);
            Ok(Some(text.to_string()))
        }
        (None, None) => Ok(None),
    }
}

/// Applies the variables figment leaves alone (see [`is_read_by_hand`]) from `vars` (the
/// environment): the tokens and the librdkafka properties, values taken as they are.
fn apply_env_secrets(config: &mut Config, vars: impl IntoIterator<Item = (String, String)>) -> Result<(), ConfigError> {
    let vars: BTreeMap<String, String> = vars.into_iter().filter(|(k, _)| k.starts_with("SITEFLOW_")).collect();
    for (variable, field) in SECRET_VARIABLES {
        if let Some(value) = env_value(&vars, variable)? {
            *field(config) = Some(value);
        }
    }
    let properties: std::collections::BTreeSet<&str> = vars
        .keys()
        .filter_map(|k| k.strip_prefix(KAFKA_PROPERTY_PREFIX))
        .map(|name| name.strip_suffix(FILE_SUFFIX).unwrap_or(name))
        .collect();
    for name in properties {
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_') {
            return Err(ConfigError::Load(format!(
                "{KAFKA_PROPERTY_PREFIX}{name}: a librdkafka property in capitals with _ for . (e.g. {KAFKA_PROPERTY_PREFIX}SASL_PASSWORD for sasl.password)"
            )));
        }
        if let Some(value) = env_value(&vars, &format!("{KAFKA_PROPERTY_PREFIX}{name}"))? {
            config.kafka.properties.insert(name.to_ascii_lowercase().replace('_', "."), value);
        }
    }
    Ok(())
}

/// A secret is a string whatever it looks like (a YAML `token: 12345` too), and is never
/// echoed in an error.
fn secret<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    struct Secret;
    impl<'a> serde::de::Visitor<'a> for Secret {
        type Value = Option<String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a string")
        }
        fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_u128<E>(self, v: u128) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_i128<E>(self, v: i128) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
            Ok(Some(v.to_string()))
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(None)
        }
        fn visit_some<S: serde::Deserializer<'a>>(self, d: S) -> Result<Self::Value, S::Error> {
            d.deserialize_any(Secret)
        }
    }
    d.deserialize_option(Secret)
}

impl Config {
    /// Defaults, then `file` (if any), then `SITEFLOW_*` variables from the environment.
    pub fn load(file: Option<&Path>) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = file {
            if !path.is_file() {
                return Err(ConfigError::Missing(path.to_path_buf()));
            }
            // Parse once by hand first: YAML syntax errors then name the line and column.
            let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Load(format!("{}: {e}", path.display())))?;
            if let Err(e) = serde_yaml::from_str::<serde_yaml::Value>(&text) {
                return Err(ConfigError::Load(format!("{}: invalid YAML: {e}", path.display())));
            }
            figment = figment.merge(Yaml::file_exact(path));
        }
        // SITEFLOW_SQL_URL and SITEFLOW_SQL_TOKEN belong to the `siteflow sql` client, not here.
        let env =
            Env::prefixed("SITEFLOW_").filter(|k| !CLIENT_VARIABLES.iter().any(|c| k == *c) && !is_read_by_hand(k.as_str())).split("__");
        figment = figment.merge(env);
        let mut config: Config = figment.extract().map_err(|e| ConfigError::Load(describe_figment_error(e)))?;
        apply_env_secrets(&mut config, std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))))?;
        config.validate(&file.map_or_else(|| "configuration".to_string(), |p| p.display().to_string()))?;
        Ok(config)
    }

    /// Checks values that parse but make no sense together.
    pub fn validate(&self, file: &str) -> Result<(), ConfigError> {
        let invalid = |field: &'static str, message: String| Err(ConfigError::Invalid { file: file.to_string(), field, message });
        if self.window.size_secs == 0 {
            return invalid("window.size_secs", "must be at least 1".into());
        }
        if self.window.correction_horizon_secs.saturating_mul(1000) < self.window.allowed_lateness_ms {
            return invalid(
                "window.correction_horizon_secs",
                format!(
                    "must cover window.allowed_lateness_ms ({} ms): published windows are kept that long for on-time records",
                    self.window.allowed_lateness_ms
                ),
            );
        }
        if self.window.idle_partition_timeout_secs == 0 {
            return invalid("window.idle_partition_timeout_secs", "must be at least 1".into());
        }
        if self.sampling.default_rate == 0 {
            return invalid("sampling.default_rate", "must be at least 1".into());
        }
        if let Some((addr, _)) = self.sampling.overrides.iter().find(|(_, r)| **r == 0) {
            return invalid("sampling.overrides", format!("rate for {addr} must be at least 1"));
        }
        if self.decode.max_message_bytes == 0 {
            return invalid("decode.max_message_bytes", "must be at least 1".into());
        }
        if self.decode.max_spread_windows == 0 {
            return invalid("decode.max_spread_windows", "must be at least 1".into());
        }
        let sim = &self.simulator;
        if sim.records_per_sec == 0 {
            return invalid("simulator.records_per_sec", "must be at least 1".into());
        }
        if sim.batch_records == 0 {
            return invalid("simulator.batch_records", "must be at least 1".into());
        }
        if sim.probe_interval_secs == 0 {
            return invalid("simulator.probe_interval_secs", "must be at least 1".into());
        }
        for (field, v) in [
            ("simulator.out_of_order_ratio", sim.out_of_order_ratio),
            ("simulator.too_late_ratio", sim.too_late_ratio),
            ("simulator.unmatched_ratio", sim.unmatched_ratio),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return invalid(field, format!("must be between 0 and 1 (got {v})"));
            }
        }
        if sim.out_of_order_ratio > 0.0 && sim.max_out_of_order_ms >= self.window.allowed_lateness_ms {
            return invalid(
                "simulator.max_out_of_order_ms",
                format!(
                    "must be below window.allowed_lateness_ms ({}), or out-of-order records would be late",
                    self.window.allowed_lateness_ms
                ),
            );
        }
        if self.source.kind == SourceKind::Kafka {
            if self.kafka.topics.is_empty() {
                return invalid("kafka.topics", "list at least one topic with its format when source.kind is kafka".into());
            }
            if self.checkpoint.dir.is_none() {
                return invalid(
                    "checkpoint.dir",
                    "must be set when source.kind is kafka (window totals are exactly-once only with checkpoints)".into(),
                );
            }
            if self.kafka.batch_max_messages == 0 || self.kafka.max_queued_batches == 0 || self.kafka.batch_max_bytes == 0 {
                return invalid(
                    "kafka.batch_max_messages",
                    "batch_max_messages, batch_max_bytes and max_queued_batches must be at least 1".into(),
                );
            }
            if let Some(key) =
                self.kafka.properties.keys().find(|k| ["enable.auto.commit", "group.id", "bootstrap.servers"].contains(&k.as_str()))
            {
                return invalid(
                    "kafka.properties",
                    format!("`{key}` is set by siteflow (use kafka.brokers / kafka.group_id; commits follow checkpoints)"),
                );
            }
        }
        if let stage @ (Stage::Ingest | Stage::Site) = self.scale_out.stage {
            if self.source.kind != SourceKind::Kafka {
                let name = if stage == Stage::Ingest { "ingest" } else { "site" };
                return invalid("scale_out.stage", format!("{name} reads Kafka: set source.kind: kafka"));
            }
            if self.scale_out.topic.trim().is_empty() || self.kafka.topics.iter().any(|t| t.name == self.scale_out.topic) {
                return invalid("scale_out.topic", format!("{:?}: name a topic of its own (not an input)", self.scale_out.topic));
            }
        }
        if let Some(topic) = &self.kafka.meetings_topic {
            let topics = self.kafka.topics.iter().map(|t| t.name.as_str()).chain(self.kafka.dead_letter_topic.as_deref());
            if topic.trim().is_empty() {
                return invalid("kafka.meetings_topic", "name a topic, or leave it unset (null)".into());
            }
            if let Some(same) = topics.into_iter().find(|t| t == topic) {
                return invalid(
                    "kafka.meetings_topic",
                    format!("{same:?} is also an input or the dead-letter topic: use a topic of its own"),
                );
            }
        }
        if self.source.kind == SourceKind::File {
            if self.source.files.is_empty() {
                return invalid("source.files", "list at least one file (`- { path: flows.json.gz }`) when source.kind is file".into());
            }
            if let Some(f) = self.source.files.iter().find(|f| f.format == Some(crate::types::Format::Goflow2ProtobufPlain)) {
                return invalid(
                    "source.files",
                    format!(
                        "{}: goflow2_protobuf_plain cannot be replayed from a file (no delimiter); use goflow2_protobuf",
                        f.path.original().display()
                    ),
                );
            }
            if let Some(f) = self.source.files.iter().find(|f| !f.path.relative().is_file()) {
                return invalid("source.files", format!("{}: no such file", f.path.relative().display()));
            }
        }
        if self.sql.max_rows == 0 || self.sql.timeout_secs == 0 || self.sql.memory_limit_mb == 0 {
            return invalid("sql", "max_rows, timeout_secs and memory_limit_mb must be at least 1".into());
        }
        if self.sql.token.as_deref() == Some("") {
            return invalid("sql.token", "must not be empty (leave it unset for no token)".into());
        }
        if self.history.flush_interval_secs == 0 || self.history.retention_days == 0 {
            return invalid("history", "flush_interval_secs and retention_days must be at least 1".into());
        }
        if self.checkpoint.interval_secs == 0 {
            return invalid("checkpoint.interval_secs", "must be at least 1".into());
        }
        if sim.pace == Pace::Fast && sim.duration_secs.is_none() {
            return invalid("simulator.duration_secs", "must be set when simulator.pace is fast".into());
        }
        if self.api.token.as_deref() == Some("") {
            return invalid("api.token", "must not be empty (leave it unset for no token)".into());
        }
        for (field, value, min, max) in self.numeric_ranges() {
            if !(min..=max).contains(&value) {
                return invalid(field, format!("must be between {min} and {max} (got {value})"));
            }
        }
        Ok(())
    }

    /// Every numeric key with its allowed range: values outside are refused with the key named,
    /// never wrapped or left to overflow later.
    fn numeric_ranges(&self) -> Vec<(&'static str, u64, u64, u64)> {
        const DAY: u64 = 86_400;
        let (w, d, k, q, h, sim, ht, api) =
            (&self.window, &self.decode, &self.kafka, &self.sql, &self.history, &self.simulator, &self.http, &self.api);
        let mut ranges = vec![
            ("window.size_secs", w.size_secs, 1, DAY),
            ("window.allowed_lateness_ms", w.allowed_lateness_ms, 0, DAY * 1_000),
            ("window.idle_partition_timeout_secs", w.idle_partition_timeout_secs, 1, 7 * DAY),
            ("decode.max_message_bytes", d.max_message_bytes as u64, 1, 1 << 30),
            ("decode.max_bytes_per_record", d.max_bytes_per_record, 1, 1 << 50),
            ("decode.max_future_secs", d.max_future_secs, 0, 365 * DAY),
            ("decode.threads", d.threads as u64, 0, 256),
            ("sampling.default_rate", self.sampling.default_rate as u64, 1, 1 << 24),
            ("kafka.batch_max_messages", k.batch_max_messages as u64, 1, 1 << 24),
            ("kafka.batch_max_bytes", k.batch_max_bytes as u64, 1, 1 << 30),
            ("kafka.batch_linger_ms", k.batch_linger_ms, 0, 60_000),
            ("kafka.max_queued_batches", k.max_queued_batches as u64, 1, 1_024),
            ("kafka.ready_lag", k.ready_lag, 0, 1_000_000_000_000),
            ("checkpoint.interval_secs", self.checkpoint.interval_secs, 1, DAY),
            ("sql.max_rows", q.max_rows as u64, 1, 100_000_000),
            ("sql.timeout_secs", q.timeout_secs, 1, DAY),
            ("sql.memory_limit_mb", q.memory_limit_mb as u64, 1, 1 << 20),
            ("sql.recent_flows_max_rows", q.recent_flows_max_rows as u64, 0, 100_000_000),
            ("sql.recent_flows_max_mb", q.recent_flows_max_mb as u64, 0, 1 << 20),
            ("sql.top_talkers", q.top_talkers as u64, 0, 10_000),
            ("sql.max_concurrent", q.max_concurrent as u64, 1, 256),
            ("sql.queue_timeout_ms", q.queue_timeout_ms, 0, 600_000),
            ("sql.max_query_bytes", q.max_query_bytes as u64, 1, 1 << 20),
            ("sql.max_expression_depth", q.max_expression_depth as u64, 1, 2_000),
            ("sql.max_expression_nodes", q.max_expression_nodes as u64, 1, 1_000_000),
            ("sql.max_set_operations", q.max_set_operations as u64, 0, 1_000),
            ("history.retention_days", h.retention_days as u64, 1, 36_500),
            ("history.flush_interval_secs", h.flush_interval_secs, 1, DAY),
            ("history.compact_min_files", h.compact_min_files as u64, 1, 1_000_000),
            ("history.max_memory_rows", h.max_memory_rows as u64, 0, 1 << 40),
            ("simulator.records_per_sec", sim.records_per_sec, 1, 100_000_000),
            ("simulator.start_unix_secs", sim.start_unix_secs.unwrap_or(0), 0, 4_102_444_800),
            ("simulator.duration_secs", sim.duration_secs.unwrap_or(1), 1, 3_650 * DAY),
            ("simulator.batch_records", sim.batch_records as u64, 1, 1 << 24),
            ("simulator.max_out_of_order_ms", sim.max_out_of_order_ms, 0, DAY * 1_000),
            ("simulator.probe_interval_secs", sim.probe_interval_secs, 1, DAY),
            ("http.max_connections", ht.max_connections as u64, 1, 1 << 20),
            ("http.header_timeout_secs", ht.header_timeout_secs, 1, 3_600),
            ("http.body_timeout_secs", ht.body_timeout_secs, 1, 3_600),
            ("http.max_body_bytes", ht.max_body_bytes as u64, 1, 1 << 30),
            ("api.max_meetings", api.max_meetings as u64, 0, 1_000_000),
            ("api.max_meeting_id_bytes", api.max_meeting_id_bytes as u64, 1, 4_096),
            ("api.max_meeting_title_bytes", api.max_meeting_title_bytes as u64, 1, 1 << 20),
            ("log.status_interval_secs", self.log.status_interval_secs, 1, DAY),
            ("log.rejection_warn_after_secs", self.log.rejection_warn_after_secs, 1, DAY),
        ];
        ranges.extend(self.sampling.overrides.values().map(|r| ("sampling.overrides", *r as u64, 1, 1 << 24)));
        ranges
    }

    pub fn window_size(&self) -> Duration {
        Duration::from_secs(self.window.size_secs)
    }

    /// The site stage's consumer: the internal topic, in a group of its own (`<group_id>.site`).
    pub fn site_stage_kafka(&self) -> KafkaConfig {
        KafkaConfig {
            group_id: format!("{}.site", self.kafka.group_id),
            // The consumer only batches the messages; the site stage decodes partials itself.
            topics: vec![TopicConfig {
                name: self.scale_out.topic.clone(),
                format: crate::types::Format::Goflow2Json,
                event_time: Default::default(),
            }],
            dead_letter_topic: None,
            ..self.kafka.clone()
        }
    }

    /// The window stage's timing, from `window.*`.
    pub fn window_spec(&self) -> crate::window::WindowSpec {
        let w = &self.window;
        crate::window::WindowSpec {
            size: Duration::from_secs(w.size_secs),
            allowed_lateness: Duration::from_millis(w.allowed_lateness_ms),
            publish_delay: Duration::from_millis(w.publish_delay_ms),
            max_exporter_skew: Duration::from_secs(w.max_exporter_skew_secs),
            correction_horizon: Duration::from_secs(w.correction_horizon_secs),
            idle_partition_timeout: Duration::from_secs(w.idle_partition_timeout_secs),
        }
    }
}

/// Resolves a configured path (relative to the file that set it).
pub fn resolve(path: &RelativePathBuf) -> PathBuf {
    path.relative()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn kafka_properties_with_dots_and_secrets_from_files_come_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let password = dir.path().join("password");
        std::fs::write(&password, "s3cret 0123\n").unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "000123").unwrap();
        let mut c = Config::default();
        apply_env_secrets(
            &mut c,
            vars(&[
                ("SITEFLOW_KAFKA__PROPERTIES__SECURITY_PROTOCOL", "SASL_SSL"),
                ("SITEFLOW_KAFKA__PROPERTIES__SASL_PASSWORD_FILE", password.to_str().unwrap()),
                ("SITEFLOW_KAFKA__PROPERTIES__SESSION_TIMEOUT_MS", "45000"),
                ("SITEFLOW_API__TOKEN_FILE", token.to_str().unwrap()),
                ("SITEFLOW_SQL__TOKEN", "0042"),
                ("OTHER_KAFKA__PROPERTIES__X", "ignored"),
            ]),
        )
        .unwrap();
        let props: Vec<(&str, &str)> = c.kafka.properties.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(props, [("sasl.password", "s3cret 0123"), ("security.protocol", "SASL_SSL"), ("session.timeout.ms", "45000")]);
        assert_eq!(c.api.token.as_deref(), Some("000123"));
        assert_eq!(c.sql.token.as_deref(), Some("0042"));
        // The variables it reads by hand are the ones figment leaves alone, in any case.
        for k in ["kafka__properties__sasl_password", "KAFKA__PROPERTIES__SASL_PASSWORD_FILE", "api__token_file", "sql__token"] {
            assert!(is_read_by_hand(k), "{k}");
        }
        assert!(!is_read_by_hand("kafka__brokers") && !is_read_by_hand("http__listen"));
    }

    #[test]
    fn bad_secret_variables_are_named() {
        let err = |pairs: &[(&str, &str)]| apply_env_secrets(&mut Config::default(), vars(pairs)).unwrap_err().to_string();
        let e = err(&[("SITEFLOW_API__TOKEN", "a"), ("SITEFLOW_API__TOKEN_FILE", "/x")]);
        assert_eq!(e, "SITEFLOW_API__TOKEN and SITEFLOW_API__TOKEN_FILE are both set: keep one");
        let e = err(&[("SITEFLOW_KAFKA__PROPERTIES__SASL_PASSWORD_FILE", "/no/such/file")]);
        assert!(e.starts_with("SITEFLOW_KAFKA__PROPERTIES__SASL_PASSWORD_FILE: /no/such/file: cannot read the secret"), "{e}");
        let e = err(&[("SITEFLOW_KAFKA__PROPERTIES__sasl.password", "x")]);
        assert!(e.starts_with("SITEFLOW_KAFKA__PROPERTIES__sasl.password: a librdkafka property in capitals"), "{e}");
        let e = err(&[("SITEFLOW_KAFKA__PROPERTIES__", "x")]);
        assert!(e.contains("a librdkafka property in capitals"), "{e}");
    }

    #[test]
    fn every_table_has_its_sql_file_setting() {
        let mut c = Config::default();
        let file = |name: &str| Some(RelativePathBuf::from(std::path::PathBuf::from(name)));
        (c.pipeline.flows_sql, c.pipeline.probes_sql, c.pipeline.interfaces_sql, c.pipeline.top_talkers_sql) =
            (file("f.sql"), file("p.sql"), file("i.sql"), file("t.sql"));
        for table in crate::table::TABLES {
            assert!(c.pipeline.sql_file(table.config_key).is_some(), "pipeline.{} is a setting", table.config_key);
        }
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate("defaults").unwrap();
    }

    #[test]
    fn the_meetings_topic_is_a_topic_of_its_own() {
        let mut c = Config::default();
        c.kafka.meetings_topic = Some(" ".into());
        let err = c.validate("m.yaml").unwrap_err().to_string();
        assert!(err.starts_with("m.yaml: kafka.meetings_topic: name a topic"), "{err}");
        c.kafka.dead_letter_topic = Some("siteflow.dead".into());
        c.kafka.meetings_topic = Some("siteflow.dead".into());
        let err = c.validate("m.yaml").unwrap_err().to_string();
        assert!(err.contains("\"siteflow.dead\" is also an input or the dead-letter topic"), "{err}");
        c.kafka.meetings_topic = Some("siteflow.meetings".into());
        c.validate("m.yaml").unwrap();
    }

    #[test]
    fn a_file_source_needs_replayable_files_that_exist() {
        let mut c = Config::default();
        c.source.kind = SourceKind::File;
        let err = c.validate("f.yaml").unwrap_err().to_string();
        assert!(err.starts_with("f.yaml: source.files: list at least one file"), "{err}");
        let file = |path: &str, format| FileConfig { path: RelativePathBuf::from(path), format, event_time: Default::default() };
        c.source.files = vec![file("Cargo.toml", Some(crate::types::Format::Goflow2ProtobufPlain))];
        assert!(c.validate("f.yaml").unwrap_err().to_string().contains("Cargo.toml: goflow2_protobuf_plain cannot be replayed"));
        c.source.files = vec![file("Cargo.toml", None), file("no/such/capture.json.gz", None)];
        assert!(c.validate("f.yaml").unwrap_err().to_string().ends_with("source.files: no/such/capture.json.gz: no such file"));
        c.source.files.pop();
        c.validate("f.yaml").unwrap();
    }

    #[test]
    fn lateness_must_cover_out_of_order() {
        let mut c = Config::default();
        c.simulator.max_out_of_order_ms = 120_000;
        let e = c.validate("x.yaml").unwrap_err().to_string();
        assert!(e.starts_with("x.yaml: simulator.max_out_of_order_ms: must be below"), "{e}");
    }

    #[test]
    fn log_intervals_are_range_checked_naming_the_key() {
        for (field, set) in [
            ("log.status_interval_secs", (|c: &mut Config, v| c.log.status_interval_secs = v) as fn(&mut Config, u64)),
            ("log.rejection_warn_after_secs", |c: &mut Config, v| c.log.rejection_warn_after_secs = v),
        ] {
            for bad in [0, 86_401] {
                let mut c = Config::default();
                set(&mut c, bad);
                let e = c.validate("x.yaml").unwrap_err().to_string();
                assert_eq!(e, format!("x.yaml: {field}: must be between 1 and 86400 (got {bad})"));
            }
        }
    }

    #[test]
    fn the_correction_horizon_must_cover_the_lateness() {
        let mut c = Config::default();
        c.window.correction_horizon_secs = 60;
        let e = c.validate("x.yaml").unwrap_err().to_string();
        assert!(e.starts_with("x.yaml: window.correction_horizon_secs: must cover window.allowed_lateness_ms"), "{e}");
    }
}
