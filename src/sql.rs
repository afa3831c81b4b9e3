//! SQL for engineers: read-only DataFusion queries over the inventory, closed windows (memory
//! and Parquet history as one table), readiness verdicts and the most recent raw flows.
//!
//! Each query gets its own DataFusion session over a snapshot of the history, with a memory
//! pool of `memory_limit` bytes and no spilling, so a runaway query fails alone and the
//! pipeline and `/metrics` go on. Statements that write or create anything (DDL, DML, `COPY`,
//! `CREATE EXTERNAL TABLE`, `SET`) are refused, and no table reads files other than the history.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::MemTable;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::error::DataFusionError;
use datafusion::execution::memory_pool::GreedyMemoryPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::logical_expr::{ColumnarValue, ScalarUDF, Volatility, create_udf};
use datafusion::prelude::{DataFrame, SQLOptions, SessionConfig, SessionContext};

use crate::history::{History, readable};
use crate::inventory::{Inventory, addr_from_ip};

/// Limits of one query.
#[derive(Debug, Clone)]
pub struct SqlLimits {
    pub max_rows: usize,
    pub timeout: Duration,
    pub memory_bytes: usize,
}

/// Why a query failed; each maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The SQL does not parse or plan (unknown table or column, type error…).
    #[error("{0}")]
    Invalid(String),
    /// A statement that would write, create, or read outside the history.
    #[error("only read-only queries over siteflow's tables are allowed: {0}")]
    Forbidden(String),
    #[error("the query ran longer than the limit of {0:?} (sql.timeout_secs); narrow it (a time range, a LIMIT)")]
    Timeout(Duration),
    #[error("the query returns more than {0} rows (sql.max_rows); add a LIMIT or aggregate")]
    TooManyRows(usize),
    #[error("the query needs more memory than the limit of {limit} bytes (sql.memory_limit_mb): {message}")]
    Memory { limit: usize, message: String },
    #[error("query failed: {0}")]
    Execution(String),
}

impl SqlError {
    /// HTTP status code of the error (4xx: the query is at fault, the service is fine).
    pub fn status(&self) -> u16 {
        match self {
            SqlError::Invalid(_) | SqlError::Execution(_) => 400,
            SqlError::Forbidden(_) => 403,
            SqlError::Timeout(_) => 408,
            SqlError::TooManyRows(_) | SqlError::Memory { .. } => 413,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            SqlError::Invalid(_) => "invalid_query",
            SqlError::Forbidden(_) => "forbidden",
            SqlError::Timeout(_) => "timeout",
            SqlError::TooManyRows(_) => "too_many_rows",
            SqlError::Memory { .. } => "memory_limit",
            SqlError::Execution(_) => "execution_error",
        }
    }
}

impl SqlLimits {
    pub fn from_config(c: &crate::config::SqlConfig) -> Self {
        Self { max_rows: c.max_rows, timeout: Duration::from_secs(c.timeout_secs), memory_bytes: c.memory_limit_mb << 20 }
    }
}

/// The most recent raw flow records (enriched), bounded by rows and bytes.
#[derive(Debug)]
pub struct RecentFlows {
    max_rows: usize,
    max_bytes: usize,
    inner: Mutex<(VecDeque<RecordBatch>, usize, usize)>,
}

impl RecentFlows {
    pub fn new(max_rows: usize, max_bytes: usize) -> Arc<Self> {
        Arc::new(Self { max_rows, max_bytes, inner: Mutex::new((VecDeque::new(), 0, 0)) })
    }

    /// Keeps `batch`, dropping the oldest batches beyond the bounds.
    pub fn push(&self, batch: &RecordBatch) {
        if self.max_rows == 0 || batch.num_rows() == 0 {
            return;
        }
        let batch =
            if batch.num_rows() > self.max_rows { batch.slice(batch.num_rows() - self.max_rows, self.max_rows) } else { batch.clone() };
        let mut inner = self.inner.lock().expect("recent flows lock");
        let (batches, rows, bytes) = &mut *inner;
        *rows += batch.num_rows();
        *bytes += batch.get_array_memory_size();
        batches.push_back(batch);
        while (*rows > self.max_rows || *bytes > self.max_bytes) && batches.len() > 1 {
            let old = batches.pop_front().expect("more than one batch");
            *rows -= old.num_rows();
            *bytes -= old.get_array_memory_size();
        }
    }

    fn snapshot(&self) -> Vec<RecordBatch> {
        self.inner.lock().expect("recent flows lock").0.iter().cloned().collect()
    }
}

/// The query service: everything a query can read.
#[derive(Clone)]
pub struct SqlEngine {
    inventory: Arc<Inventory>,
    history: History,
    recent_flows: Option<Arc<RecentFlows>>,
    limits: SqlLimits,
    window_secs: f64,
}

impl SqlEngine {
    pub fn new(
        inventory: Arc<Inventory>,
        history: History,
        recent_flows: Option<Arc<RecentFlows>>,
        limits: SqlLimits,
        window_secs: f64,
    ) -> Self {
        Self { inventory, history, recent_flows, limits, window_secs }
    }

    pub fn limits(&self) -> &SqlLimits {
        &self.limits
    }

    fn sites_table(&self) -> RecordBatch {
        let sites = self.inventory.sites();
        let s =
            |f: &dyn Fn(&crate::inventory::Site) -> String| -> ArrayRef { Arc::new(StringArray::from_iter_values(sites.iter().map(f))) };
        let schema = Arc::new(Schema::new(vec![
            Field::new("site", DataType::Utf8, false),
            Field::new("name", DataType::Utf8, false),
            Field::new("level", DataType::Utf8, false),
            Field::new("district", DataType::Utf8, false),
            Field::new("parent", DataType::Utf8, false),
            Field::new("prefixes", DataType::Utf8, false),
            Field::new("link_bytes_per_second", DataType::Float64, false),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                s(&|x| x.id.clone()),
                s(&|x| x.name.clone()),
                s(&|x| x.level.clone()),
                s(&|x| x.district.clone()),
                s(&|x| x.parent_id.clone()),
                s(&|x| x.prefixes.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" ")),
                Arc::new(Float64Array::from_iter_values(sites.iter().map(|x| x.capacity_bytes_per_sec()))),
            ],
        )
        .expect("sites columns")
    }

    /// A session with the tables registered, over a snapshot of the history.
    async fn session(&self) -> Result<SessionContext, DataFusionError> {
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(Arc::new(GreedyMemoryPool::new(self.limits.memory_bytes)))
            .with_disk_manager_builder(
                datafusion::execution::disk_manager::DiskManagerBuilder::default()
                    .with_mode(datafusion::execution::disk_manager::DiskManagerMode::Disabled),
            )
            .build_arc()?;
        let config = SessionConfig::new().with_target_partitions(2).with_information_schema(true);
        let ctx = SessionContext::new_with_config_rt(config, runtime);
        for udf in udfs(self.inventory.clone(), self.window_secs) {
            ctx.register_udf(udf);
        }
        let sites = self.sites_table();
        ctx.register_table("sites", Arc::new(MemTable::try_new(sites.schema(), vec![vec![sites]])?))?;
        for (name, snap) in self.history.snapshot() {
            let memory = ctx.read_table(Arc::new(MemTable::try_new(snap.schema.clone(), vec![snap.memory])?))?;
            let df = if snap.files.is_empty() { memory } else { listing(&ctx, &snap.files, snap.schema.clone())?.union(memory)? };
            ctx.register_table(name.as_str(), df.into_view())?;
        }
        if let Some(recent) = &self.recent_flows {
            let batches: Vec<RecordBatch> = recent.snapshot().iter().map(readable).collect();
            let schema = batches
                .first()
                .map(|b| b.schema())
                .unwrap_or_else(|| readable(&RecordBatch::new_empty(crate::enrich::enriched_flow_schema())).schema());
            ctx.register_table("flows_recent", Arc::new(MemTable::try_new(schema, vec![batches])?))?;
        }
        Ok(ctx)
    }

    /// Runs one read-only query within the limits.
    pub async fn query(&self, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>), SqlError> {
        let ctx = self.session().await.map_err(|e| SqlError::Execution(e.to_string()))?;
        let options = SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false);
        let df = ctx.sql_with_options(sql, options).await.map_err(classify_plan_error)?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let max = self.limits.max_rows;
        let limited = df.limit(0, Some(max + 1)).map_err(|e| SqlError::Invalid(e.to_string()))?;
        // Run on the SQL runtime's own thread: a heavy query competes with the pipeline for the
        // CPU through the OS scheduler, but never occupies the pipeline's runtime threads.
        let mut task = sql_runtime().spawn(limited.collect());
        let batches = match tokio::time::timeout(self.limits.timeout, &mut task).await {
            Err(_) => {
                task.abort();
                return Err(SqlError::Timeout(self.limits.timeout));
            }
            Ok(Err(e)) => return Err(SqlError::Execution(format!("the query task failed: {e}"))),
            Ok(Ok(Err(e))) => return Err(classify_run_error(e, self.limits.memory_bytes)),
            Ok(Ok(Ok(b))) => b,
        };
        if batches.iter().map(RecordBatch::num_rows).sum::<usize>() > max {
            return Err(SqlError::TooManyRows(max));
        }
        Ok((schema, batches))
    }
}

/// The runtime SQL queries execute on: one worker thread, for the life of the process.
fn sql_runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("siteflow-sql")
            .enable_time()
            .build()
            .expect("the SQL runtime starts")
    })
}

/// Reads the history's Parquet files (only those: no directory listing, no other paths).
fn listing(ctx: &SessionContext, files: &[std::path::PathBuf], schema: SchemaRef) -> Result<DataFrame, DataFusionError> {
    let urls = files.iter().map(|f| ListingTableUrl::parse(f.to_string_lossy())).collect::<Result<Vec<_>, _>>()?;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls).with_listing_options(options).with_schema(schema);
    ctx.read_table(Arc::new(ListingTable::try_new(config)?))
}

fn classify_plan_error(e: DataFusionError) -> SqlError {
    let message = e.to_string();
    let lower = message.to_lowercase();
    if lower.contains("not supported") && (lower.contains("ddl") || lower.contains("dml") || lower.contains("statement")) {
        SqlError::Forbidden(message)
    } else {
        SqlError::Invalid(message)
    }
}

fn classify_run_error(e: DataFusionError, limit: usize) -> SqlError {
    let message = e.to_string();
    if message.contains("Resources exhausted") || message.contains("ResourcesExhausted") {
        SqlError::Memory { limit, message }
    } else {
        SqlError::Execution(message)
    }
}

fn string_arg(args: &[ColumnarValue], i: usize, n: usize) -> Result<ArrayRef, DataFusionError> {
    let a = args[i].clone().into_array(n)?;
    datafusion::arrow::compute::cast(&a, &DataType::Utf8).map_err(Into::into)
}

/// The helper functions: `bits_per_second(bytes, seconds)`, `window_bits_per_second(bytes)`,
/// `in_prefix(address, prefix)` and `site_of(address)`.
pub fn udfs(inventory: Arc<Inventory>, window_secs: f64) -> Vec<ScalarUDF> {
    let rows = |args: &[ColumnarValue]| {
        args.iter()
            .map(|a| match a {
                ColumnarValue::Array(a) => a.len(),
                ColumnarValue::Scalar(_) => 1,
            })
            .max()
            .unwrap_or(1)
    };
    let bps = create_udf(
        "bits_per_second",
        vec![DataType::Float64, DataType::Float64],
        DataType::Float64,
        Volatility::Immutable,
        Arc::new(move |args: &[ColumnarValue]| {
            let n = rows(args);
            let (bytes, secs) = (args[0].clone().into_array(n)?, args[1].clone().into_array(n)?);
            let (bytes, secs) = (
                bytes.as_primitive::<datafusion::arrow::datatypes::Float64Type>(),
                secs.as_primitive::<datafusion::arrow::datatypes::Float64Type>(),
            );
            let out: Float64Array = bytes.iter().zip(secs.iter()).map(|(b, s)| Some(b? * 8.0 / s.filter(|s| *s > 0.0)?)).collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    );
    let window_bps = create_udf(
        "window_bits_per_second",
        vec![DataType::Float64],
        DataType::Float64,
        Volatility::Immutable,
        Arc::new(move |args: &[ColumnarValue]| {
            let n = rows(args);
            let bytes = args[0].clone().into_array(n)?;
            let out: Float64Array =
                bytes.as_primitive::<datafusion::arrow::datatypes::Float64Type>().iter().map(|b| Some(b? * 8.0 / window_secs)).collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    );
    let in_prefix = create_udf(
        "in_prefix",
        vec![DataType::Utf8, DataType::Utf8],
        DataType::Boolean,
        Volatility::Immutable,
        Arc::new(move |args: &[ColumnarValue]| {
            let n = rows(args);
            let (addrs, prefixes) = (string_arg(args, 0, n)?, string_arg(args, 1, n)?);
            let (addrs, prefixes) = (addrs.as_string::<i32>(), prefixes.as_string::<i32>());
            let out: BooleanArray = addrs
                .iter()
                .zip(prefixes.iter())
                .map(|(a, p)| {
                    let a: std::net::IpAddr = a?.parse().ok()?;
                    let p: ipnet::IpNet = p?.parse().ok()?;
                    Some(p.contains(&a))
                })
                .collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    );
    let site_of = create_udf(
        "site_of",
        vec![DataType::Utf8],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(move |args: &[ColumnarValue]| {
            let n = rows(args);
            let addrs = string_arg(args, 0, n)?;
            let out: StringArray = addrs
                .as_string::<i32>()
                .iter()
                .map(|a| {
                    let ip: std::net::IpAddr = a?.parse().ok()?;
                    inventory.site_of_addr(addr_from_ip(ip)).map(|s| inventory.site(s).id.clone())
                })
                .collect();
            Ok(ColumnarValue::Array(Arc::new(out)))
        }),
    );
    vec![bps, window_bps, in_prefix, site_of]
}
