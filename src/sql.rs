//! SQL for engineers: read-only DataFusion queries over the inventory, closed windows (memory
//! and Parquet history as one table), readiness verdicts and the most recent raw flows.
//!
//! Each query gets its own DataFusion session over a snapshot of the history, with a memory
//! pool of `memory_limit` bytes and no spilling, so a runaway query fails alone and the
//! pipeline and `/metrics` go on. Statements that write or create anything (DDL, DML, `COPY`,
//! `CREATE EXTERNAL TABLE`, `SET`) are refused, and no table reads files other than the history.

use std::collections::{HashSet, VecDeque};
use std::ops::ControlFlow;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Float64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, FieldRef, Int64Type, Schema, SchemaRef};
use datafusion::catalog::{MemTable, MemoryCatalogProviderList};
use datafusion::common::ScalarValue;
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::error::DataFusionError;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::memory_pool::{GreedyMemoryPool, MemoryConsumer, MemoryPool};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::{ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Volatility, create_udf};
use datafusion::prelude::{DataFrame, SQLOptions, SessionConfig, SessionContext};
use datafusion::sql::parser::{CopyToSource, Statement as DFStatement};
use datafusion::sql::sqlparser::ast::{Expr, Query, SetExpr, Visit, Visitor};
use futures::StreamExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::history::{History, readable};
use crate::inventory::{Inventory, addr_from_ip};

/// Limits of one query, and of the SQL service as a whole.
#[derive(Debug, Clone)]
pub struct SqlLimits {
    pub max_rows: usize,
    pub timeout: Duration,
    pub memory_bytes: usize,
    /// Queries running at once; the next ones wait up to `queue_timeout`, then get `Busy`.
    pub max_concurrent: usize,
    pub queue_timeout: Duration,
    /// Longest query text, in bytes.
    pub max_query_bytes: usize,
    /// Deepest nesting of expressions (`1+1+…+1` nests one level per term).
    pub max_expression_depth: usize,
    /// Most expression nodes in one statement.
    pub max_expression_nodes: usize,
    /// Most `UNION`/`INTERSECT`/`EXCEPT` operators in one statement.
    pub max_set_operations: usize,
}

impl Default for SqlLimits {
    fn default() -> Self {
        Self::from_config(&crate::config::SqlConfig::default())
    }
}

impl SqlLimits {
    pub fn from_config(c: &crate::config::SqlConfig) -> Self {
        Self {
            max_rows: c.max_rows,
            timeout: Duration::from_secs(c.timeout_secs),
            memory_bytes: c.memory_limit_mb.saturating_mul(1 << 20),
            max_concurrent: c.max_concurrent,
            queue_timeout: Duration::from_millis(c.queue_timeout_ms),
            max_query_bytes: c.max_query_bytes,
            max_expression_depth: c.max_expression_depth,
            max_expression_nodes: c.max_expression_nodes,
            max_set_operations: c.max_set_operations,
        }
    }

    /// Largest output of one call of a function that can grow its input (`repeat`, `lpad`…),
    /// which no memory pool sees: a quarter of the memory limit shared by the queries that may
    /// run at once, at most 256 MiB (Arrow's 32-bit string offsets).
    pub fn max_value_bytes(&self) -> u64 {
        (self.memory_bytes as u64 / 4 / self.max_concurrent.max(1) as u64).min(256 << 20)
    }
}

/// Character pairs one call of `levenshtein` may compare (its time is their number).
pub const MAX_LEVENSHTEIN_PAIRS: u64 = 100_000_000;

/// Stack of the threads that parse, plan and run queries: planning and evaluation recurse once
/// per level of expression nesting, and the AST of the longest allowed query text (up to
/// `sql.max_query_bytes` of `1+1+…`) is dropped recursively.
const SQL_STACK_BYTES: usize = 512 << 20;

/// Why a query failed; each maps to an HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// The SQL does not parse or plan (unknown table or column, type error…).
    #[error("{0}")]
    Invalid(String),
    /// A statement that would write, create, or read outside the history.
    #[error("only read-only queries over siteflow's tables are allowed: {0}")]
    Forbidden(String),
    /// The query is larger or more deeply nested than the limit named by `key`.
    #[error("the query {what} ({key} is {limit}); simplify it")]
    TooComplex { what: String, key: &'static str, limit: usize },
    #[error("the query text is {0} bytes, more than the limit of {1} (sql.max_query_bytes)")]
    TooLong(usize, usize),
    #[error("the query ran longer than the limit of {0:?} (sql.timeout_secs); narrow it (a time range, a LIMIT)")]
    Timeout(Duration),
    #[error("the query returns more than {0} rows (sql.max_rows); add a LIMIT or aggregate")]
    TooManyRows(usize),
    #[error("the query needs more memory than the limit of {limit} bytes (sql.memory_limit_mb): {message}")]
    Memory { limit: usize, message: String },
    /// `sql.max_concurrent` queries are running and none finished within `sql.queue_timeout_ms`.
    #[error("{0} queries are already running (sql.max_concurrent); retry in a moment")]
    Busy(usize),
    #[error("query failed: {0}")]
    Execution(String),
    /// A bug: the query panicked (the service goes on).
    #[error("internal error while running the query: {0}")]
    Internal(String),
}

impl SqlError {
    /// HTTP status code of the error (4xx: the query is at fault, the service is fine).
    pub fn status(&self) -> u16 {
        match self {
            SqlError::Invalid(_) | SqlError::Execution(_) | SqlError::TooComplex { .. } => 400,
            SqlError::Forbidden(_) => 403,
            SqlError::Timeout(_) => 408,
            SqlError::TooManyRows(_) | SqlError::Memory { .. } | SqlError::TooLong(..) => 413,
            SqlError::Internal(_) => 500,
            SqlError::Busy(_) => 503,
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            SqlError::Invalid(_) => "invalid_query",
            SqlError::Forbidden(_) => "forbidden",
            SqlError::TooComplex { .. } => "too_complex",
            SqlError::TooLong(..) => "query_too_long",
            SqlError::Timeout(_) => "timeout",
            SqlError::TooManyRows(_) => "too_many_rows",
            SqlError::Memory { .. } => "memory_limit",
            SqlError::Busy(_) => "busy",
            SqlError::Execution(_) => "execution_error",
            SqlError::Internal(_) => "internal",
        }
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

/// The query service: everything a query can read, and the threads queries run on.
///
/// Queries run on a small pool of dedicated threads (at most `sql.max_concurrent`), each with a
/// large stack and its own single-threaded Tokio runtime, created once: parsing, planning,
/// execution and encoding never run on the runtime that serves `/metrics` and the pipeline.
#[derive(Clone)]
pub struct SqlEngine {
    inner: Arc<Inner>,
}

struct Inner {
    history: History,
    recent_flows: Option<Arc<RecentFlows>>,
    limits: SqlLimits,
    /// Functions, settings and rules of every session, built once (building them per query cost
    /// more than a small query).
    template: SessionState,
    sites: RecordBatch,
    /// One memory pool shared by the running queries (and their results): whatever runs at
    /// once, together they stay within `sql.memory_limit_mb`.
    pool: Arc<dyn MemoryPool>,
    admission: Arc<Semaphore>,
    /// Idle query threads; a busy one comes back when its query is over.
    idle: Arc<Mutex<Vec<WorkerHandle>>>,
    stats: SqlStats,
}

type Job = Box<dyn FnOnce(&tokio::runtime::Runtime) + Send>;
type WorkerHandle = std::sync::mpsc::Sender<(Job, OwnedSemaphorePermit)>;

/// Metrics of the SQL service (on `/metrics`).
struct SqlStats {
    registry: prometheus::Registry,
    running: prometheus::IntGauge,
    outcomes: prometheus::IntCounterVec,
}

impl SqlStats {
    fn new() -> Self {
        let registry = prometheus::Registry::new();
        let running =
            prometheus::IntGauge::new("siteflow_sql_queries_running", "SQL queries running on the query threads.").expect("valid metric");
        let outcomes = prometheus::IntCounterVec::new(
            prometheus::Opts::new("siteflow_sql_queries_total", "SQL queries answered, by outcome (ok or the error kind)."),
            &["outcome"],
        )
        .expect("valid metric");
        registry.register(Box::new(running.clone())).expect("registers");
        registry.register(Box::new(outcomes.clone())).expect("registers");
        Self { registry, running, outcomes }
    }
}

impl SqlEngine {
    pub fn new(
        inventory: Arc<Inventory>,
        history: History,
        recent_flows: Option<Arc<RecentFlows>>,
        limits: SqlLimits,
        window_secs: f64,
    ) -> Self {
        let template = session_template(inventory.clone(), window_secs, &limits);
        let sites = sites_table(&inventory);
        let admission = Arc::new(Semaphore::new(limits.max_concurrent.max(1)));
        let pool: Arc<dyn MemoryPool> = Arc::new(GreedyMemoryPool::new(limits.memory_bytes));
        let inner = Inner {
            history,
            recent_flows,
            limits,
            template,
            sites,
            pool,
            admission,
            idle: Arc::new(Mutex::new(Vec::new())),
            stats: SqlStats::new(),
        };
        Self { inner: Arc::new(inner) }
    }

    pub fn limits(&self) -> &SqlLimits {
        &self.inner.limits
    }

    /// The SQL service's metric families.
    pub fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        self.inner.stats.registry.gather()
    }

    /// Per site, its time up and down in the latest month of the `readiness` history (UTC),
    /// counted as `availability_daily` counts it, and the end of its last window: what the
    /// month's availability gauge resumes from after a restart.
    pub async fn month_availability(&self) -> Result<Vec<(String, crate::readiness::connection::Month)>, SqlError> {
        const QUERY: &str = "SELECT site, CAST(date_trunc('month', window_start) AS BIGINT) AS month_ns,
                sum(CASE WHEN state = 'up' THEN seconds ELSE 0 END) AS up_seconds,
                sum(CASE WHEN state = 'down' THEN seconds ELSE 0 END) AS down_seconds,
                CAST(max(window_end) AS BIGINT) AS through_ns
            FROM (SELECT site, window_start, window_end,
                         CASE WHEN maintenance IS NOT NULL THEN 'maintenance' ELSE coalesce(connection, 'unknown') END AS state,
                         date_part('epoch', window_end) - date_part('epoch', window_start) AS seconds
                  FROM readiness)
            WHERE window_start >= (SELECT date_trunc('month', max(window_start)) FROM readiness)
            GROUP BY site, date_trunc('month', window_start)";
        let (_, batches) = self.query(QUERY).await?;
        let mut months = Vec::new();
        for b in &batches {
            let text = b.column(0).as_string::<i32>();
            let int = |c: usize| b.column(c).as_primitive::<Int64Type>().clone();
            let float = |c: usize| b.column(c).as_primitive::<datafusion::arrow::datatypes::Float64Type>().clone();
            let (month, up, down, through) = (int(1), float(2), float(3), int(4));
            for i in 0..b.num_rows() {
                let month = crate::readiness::connection::Month {
                    first_day: month.value(i).div_euclid(86_400_000_000_000),
                    up_secs: up.value(i),
                    down_secs: down.value(i),
                    counted_through_ns: through.value(i),
                };
                months.push((text.value(i).to_string(), month));
            }
        }
        Ok(months)
    }

    /// Runs one read-only query within the limits.
    pub async fn query(&self, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>), SqlError> {
        self.query_then(sql, |schema, batches| Ok((schema, batches))).await
    }

    /// Runs one read-only query within the limits and hands the result to `then` on the query
    /// thread (encoding a large result is work too).
    pub async fn query_then<T, F>(&self, sql: &str, then: F) -> Result<T, SqlError>
    where
        T: Send + 'static,
        F: FnOnce(SchemaRef, Vec<RecordBatch>) -> Result<T, SqlError> + Send + 'static,
    {
        let result = self.admit_and_run(sql, then).await;
        let outcome = result.as_ref().map_or_else(|e| e.kind(), |_| "ok");
        self.inner.stats.outcomes.with_label_values(&[outcome]).inc();
        result
    }

    async fn admit_and_run<T, F>(&self, sql: &str, then: F) -> Result<T, SqlError>
    where
        T: Send + 'static,
        F: FnOnce(SchemaRef, Vec<RecordBatch>) -> Result<T, SqlError> + Send + 'static,
    {
        let limits = &self.inner.limits;
        if sql.len() > limits.max_query_bytes {
            return Err(SqlError::TooLong(sql.len(), limits.max_query_bytes));
        }
        let permit = match tokio::time::timeout(limits.queue_timeout, self.inner.admission.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            _ => return Err(SqlError::Busy(limits.max_concurrent)),
        };
        let (reply_tx, reply_rx) = tokio::sync::oneshot::channel();
        // Dropped when the caller gives up (timeout, client gone): the query stops at its next
        // await point, which every DataFusion operator reaches between batches.
        let (cancel_tx, cancel_rx) = tokio::sync::oneshot::channel::<()>();
        let inner = self.inner.clone();
        let sql = sql.to_string();
        let job: Job = Box::new(move |rt| {
            inner.stats.running.inc();
            let timeout = inner.limits.timeout;
            let result = rt.block_on(async {
                tokio::select! {
                    r = inner.run(&sql) => r.and_then(|(schema, batches)| then(schema, batches)),
                    _ = cancel_rx => Err(SqlError::Timeout(timeout)),
                }
            });
            inner.stats.running.dec();
            let _ = reply_tx.send(result);
        });
        let worker = self.inner.idle.lock().expect("sql workers lock").pop();
        let worker = match worker {
            Some(w) => w,
            None => spawn_worker(self.inner.idle.clone()).map_err(|e| SqlError::Internal(format!("cannot start a SQL thread: {e}")))?,
        };
        worker.send((job, permit)).map_err(|_| SqlError::Internal("the SQL thread is gone".into()))?;
        match tokio::time::timeout(limits.timeout, reply_rx).await {
            Err(_) => {
                drop(cancel_tx);
                Err(SqlError::Timeout(limits.timeout))
            }
            Ok(Err(_)) => Err(SqlError::Internal("the query panicked (see the log); the service goes on".into())),
            Ok(Ok(result)) => result,
        }
    }
}

/// Starts one query thread. It serves queries one at a time and puts itself back in `idle`
/// before it releases the query's admission permit, so there are never more threads than
/// permits. A query that panics takes its thread (and runtime) with it; the next query starts
/// a fresh one.
fn spawn_worker(idle: Arc<Mutex<Vec<WorkerHandle>>>) -> std::io::Result<WorkerHandle> {
    let (tx, rx) = std::sync::mpsc::channel::<(Job, OwnedSemaphorePermit)>();
    let me = tx.clone();
    std::thread::Builder::new().name("siteflow-sql".into()).stack_size(SQL_STACK_BYTES).spawn(move || {
        lower_priority();
        let rt = match tokio::runtime::Builder::new_current_thread().enable_time().thread_stack_size(SQL_STACK_BYTES).build() {
            Ok(rt) => rt,
            Err(e) => return tracing::error!("cannot start a SQL runtime: {e}"),
        };
        while let Ok((job, permit)) = rx.recv() {
            if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(&rt))).is_err() {
                tracing::error!("a SQL query panicked; its thread is replaced");
                return;
            }
            idle.lock().expect("sql workers lock").push(me.clone());
            drop(permit);
        }
    })?;
    Ok(tx)
}

/// Gives the calling query thread a lower CPU priority (nice 10) than the pipeline and the HTTP
/// server: when queries keep every core busy, the scheduler still gives `/metrics`, `/healthz`
/// and the pipeline most of the time they ask for. Lowering one's own priority needs no
/// privilege; if it fails, queries just run at the usual priority.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    // SAFETY: plain libc calls on the calling thread's own id.
    unsafe {
        let tid = libc::gettid();
        libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, 10);
    }
}

impl Inner {
    /// A session over a snapshot of the history, with the tables `wanted` registered (all of
    /// them for `None`). Registering a table has a cost (listing its files; `flows_recent`
    /// converts every recent flow), so a query registers only the tables it names.
    async fn session(&self, wanted: Option<&HashSet<String>>) -> Result<SessionContext, DataFusionError> {
        let want = |name: &str| {
            wanted.is_none_or(|w| {
                w.contains(name) || (name == crate::history::READINESS_TABLE && CONNECTION_VIEWS.iter().any(|(v, _)| w.contains(*v)))
            })
        };
        let runtime = RuntimeEnvBuilder::new()
            .with_memory_pool(self.pool.clone())
            .with_disk_manager_builder(
                datafusion::execution::disk_manager::DiskManagerBuilder::default()
                    .with_mode(datafusion::execution::disk_manager::DiskManagerMode::Disabled),
            )
            .build_arc()?;
        let config = self.template.config().clone().with_create_default_catalog_and_schema(true);
        let state = SessionStateBuilder::new_from_existing(self.template.clone())
            .with_config(config)
            .with_catalog_list(Arc::new(MemoryCatalogProviderList::new()))
            .with_runtime_env(runtime)
            .build();
        let ctx = SessionContext::new_with_state(state);
        if want("sites") {
            let sites = self.sites.clone();
            ctx.register_table("sites", Arc::new(MemTable::try_new(sites.schema(), vec![vec![sites]])?))?;
        }
        for (name, snap) in self.history.snapshot().into_iter().filter(|(name, _)| want(name)) {
            let memory = ctx.read_table(Arc::new(MemTable::try_new(snap.schema.clone(), vec![snap.memory])?))?;
            let df = if snap.files.is_empty() { memory } else { listing(&ctx, &snap.files, snap.schema.clone())?.union(memory)? };
            ctx.register_table(name.as_str(), df.into_view())?;
        }
        if let Some(recent) = self.recent_flows.as_ref().filter(|_| want("flows_recent")) {
            let batches: Vec<RecordBatch> = recent.snapshot().iter().map(readable).collect();
            let schema = batches
                .first()
                .map(|b| b.schema())
                .unwrap_or_else(|| readable(&RecordBatch::new_empty(crate::schema::enriched_flow_schema())).schema());
            ctx.register_table("flows_recent", Arc::new(MemTable::try_new(schema, vec![batches])?))?;
        }
        if ctx.table_exist(crate::history::READINESS_TABLE)? {
            for (name, sql) in CONNECTION_VIEWS.iter().filter(|(name, _)| want(name)) {
                let view = ctx.sql(sql).await?.into_view();
                ctx.register_table(*name, view)?;
            }
        }
        Ok(ctx)
    }

    /// Parses, checks, plans and runs one query (on a query thread).
    async fn run(&self, sql: &str) -> Result<(SchemaRef, Vec<RecordBatch>), SqlError> {
        let memory = self.limits.memory_bytes;
        let started = std::time::Instant::now();
        let dialect = self.template.config().options().sql_parser.dialect.clone();
        let statement = self.template.sql_to_statement(sql, &dialect).map_err(|e| classify_plan_error(e, memory))?;
        check_statement(&statement, &self.limits)?;
        let ctx =
            self.session(referenced_tables(&self.template, &statement).as_ref()).await.map_err(|e| SqlError::Execution(e.to_string()))?;
        let session_ready = started.elapsed();
        let state = ctx.state();
        let plan = state.statement_to_plan(statement).await.map_err(|e| classify_plan_error(e, memory))?;
        let options = SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false);
        options.verify_plan(&plan).map_err(|e| classify_plan_error(e, memory))?;
        let df = ctx.execute_logical_plan(plan).await.map_err(|e| classify_plan_error(e, memory))?;
        let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
        let mut stream = df.execute_stream().await.map_err(|e| classify_run_error(e, memory))?;
        let planned = started.elapsed();
        // The result is held until it is encoded: it counts against the row and memory limits.
        let held = MemoryConsumer::new("query result").register(&self.pool);
        let (mut rows, mut batches) = (0usize, Vec::new());
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(|e| classify_run_error(e, memory))?;
            rows += batch.num_rows();
            if rows > self.limits.max_rows {
                return Err(SqlError::TooManyRows(self.limits.max_rows));
            }
            let bytes = batch.columns().iter().map(|c| c.to_data().get_slice_memory_size().unwrap_or(0)).sum::<usize>();
            held.try_grow(bytes).map_err(|e| classify_run_error(e, memory))?;
            batches.push(batch);
        }
        tracing::debug!(?session_ready, ?planned, total = ?started.elapsed(), rows, "query");
        Ok((schema, batches))
    }
}

/// Views over the `readiness` table's connection columns (docs/sql.md: outages and availability).
///
/// `outages`: one row per outage of a site, from the first lost probe round (`start`) to the
/// first answered round of its recovery (`end`, NULL while it lasts), grouped by the outage's
/// start as every evaluation during it records it (`connection_since`). An outage that ends in
/// silence (`unknown`) ends when siteflow noticed the silence.
///
/// `availability_daily`: per site and UTC day, the time of its evaluation windows by the
/// connection state they closed in, and `availability` = up / (up + down) (NULL without either).
/// Windows in planned maintenance count as `maintenance_seconds` and for neither up nor down
/// (nor unknown); their outages are `planned`.
/// The `siteflow_site_availability_month_ratio` gauge counts the same way.
const CONNECTION_VIEWS: [(&str, &str); 2] = [
    (
        "outages",
        "WITH timeline AS (
            SELECT site, district, level, window_start, connection, connection_cause, connection_since, upstream, maintenance,
                   lead(connection) OVER (PARTITION BY site ORDER BY window_start) AS next_connection,
                   lead(connection_since) OVER (PARTITION BY site ORDER BY window_start) AS next_since
            FROM readiness WHERE connection IS NOT NULL)
        SELECT site, district, level, connection_since AS start,
               max(CASE WHEN next_connection <> 'down' THEN next_since END) AS \"end\",
               date_part('epoch', max(CASE WHEN next_connection <> 'down' THEN next_since END)) - date_part('epoch', connection_since)
                   AS duration_seconds,
               last_value(connection_cause ORDER BY window_start) AS cause,
               last_value(upstream ORDER BY window_start) AS upstream,
               bool_or(maintenance IS NOT NULL) AS planned
        FROM timeline WHERE connection = 'down'
        GROUP BY site, district, level, connection_since",
    ),
    (
        "availability_daily",
        "SELECT site, district, level, date_trunc('day', window_start) AS day,
                sum(CASE WHEN state = 'up' THEN seconds ELSE 0 END) AS up_seconds,
                sum(CASE WHEN state = 'down' THEN seconds ELSE 0 END) AS down_seconds,
                sum(CASE WHEN state = 'unknown' THEN seconds ELSE 0 END) AS unknown_seconds,
                sum(CASE WHEN state = 'maintenance' THEN seconds ELSE 0 END) AS maintenance_seconds,
                sum(CASE WHEN state = 'up' THEN seconds ELSE 0 END)
                    / nullif(sum(CASE WHEN state IN ('up', 'down') THEN seconds ELSE 0 END), 0) AS availability
        FROM (SELECT site, district, level, window_start,
                     CASE WHEN maintenance IS NOT NULL THEN 'maintenance' ELSE coalesce(connection, 'unknown') END AS state,
                     date_part('epoch', window_end) - date_part('epoch', window_start) AS seconds
              FROM readiness)
        GROUP BY site, district, level, date_trunc('day', window_start)",
    ),
];

/// The tables a statement names, or `None` when it reads the catalog (`information_schema`,
/// `SHOW TABLES`) and so needs every table.
fn referenced_tables(state: &SessionState, statement: &DFStatement) -> Option<HashSet<String>> {
    let references = state.resolve_table_references(statement).ok()?;
    if references.iter().any(|r| r.schema() == Some("information_schema")) {
        return None;
    }
    Some(references.iter().map(|r| r.table().to_string()).collect())
}

fn sites_table(inventory: &Inventory) -> RecordBatch {
    let sites = inventory.sites();
    let s = |f: &dyn Fn(&crate::inventory::Site) -> String| -> ArrayRef { Arc::new(StringArray::from_iter_values(sites.iter().map(f))) };
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

/// Settings and functions shared by every query's session: siteflow's helpers, and the
/// functions that can grow their input replaced by size-checked versions.
fn session_template(inventory: Arc<Inventory>, window_secs: f64, limits: &SqlLimits) -> SessionState {
    let mut config = SessionConfig::new().with_target_partitions(2).with_information_schema(true);
    // A recursive CTE can double a string per step, beyond any per-call check.
    config.options_mut().execution.enable_recursive_ctes = false;
    let ctx = SessionContext::new_with_config(config);
    for udf in udfs(inventory, window_secs) {
        ctx.register_udf(udf);
    }
    // The pipeline's bounded top-talker aggregate, for ad hoc questions on flows_recent.
    ctx.register_udaf(crate::window::heavy_hitters::udaf());
    for (name, growth) in GROWING {
        if let Some(inner) = ctx.state().scalar_functions().get(*name).cloned() {
            let bounded = Bounded { inner, growth: *growth, max_bytes: limits.max_value_bytes(), max_pairs: MAX_LEVENSHTEIN_PAIRS };
            ctx.register_udf(ScalarUDF::new_from_impl(bounded));
        }
    }
    ctx.state()
}

/// Checks the parsed statement against the size limits before anything recurses over it.
fn check_statement(statement: &DFStatement, limits: &SqlLimits) -> Result<(), SqlError> {
    let mut complexity = Complexity { limits, depth: 0, nodes: 0, set_operations: 0 };
    let flow = match statement {
        DFStatement::Statement(s) => s.visit(&mut complexity),
        DFStatement::Explain(e) => return check_statement(&e.statement, limits),
        DFStatement::CopyTo(c) => match &c.source {
            CopyToSource::Query(q) => q.visit(&mut complexity),
            CopyToSource::Relation(_) => ControlFlow::Continue(()),
        },
        _ => ControlFlow::Continue(()),
    };
    match flow {
        ControlFlow::Break(e) => Err(e),
        ControlFlow::Continue(()) => Ok(()),
    }
}

/// Counts expression depth and nodes and set operations; stops at the first limit passed.
struct Complexity<'a> {
    limits: &'a SqlLimits,
    depth: usize,
    nodes: usize,
    set_operations: usize,
}

impl Visitor for Complexity<'_> {
    type Break = SqlError;

    fn pre_visit_query(&mut self, query: &Query) -> ControlFlow<SqlError> {
        // Counted without recursion: a chain of UNIONs is as deep as it is long.
        let mut stack = vec![query.body.as_ref()];
        while let Some(body) = stack.pop() {
            if let SetExpr::SetOperation { left, right, .. } = body {
                self.set_operations += 1;
                if self.set_operations > self.limits.max_set_operations {
                    return ControlFlow::Break(SqlError::TooComplex {
                        what: format!("has more than {} UNION, INTERSECT or EXCEPT operators", self.limits.max_set_operations),
                        key: "sql.max_set_operations",
                        limit: self.limits.max_set_operations,
                    });
                }
                stack.push(left);
                stack.push(right);
            }
        }
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, _: &Expr) -> ControlFlow<SqlError> {
        self.depth += 1;
        self.nodes += 1;
        if self.depth > self.limits.max_expression_depth {
            return ControlFlow::Break(SqlError::TooComplex {
                what: format!(
                    "nests expressions more than {} deep (a long chain of operators nests one level per term)",
                    self.limits.max_expression_depth
                ),
                key: "sql.max_expression_depth",
                limit: self.limits.max_expression_depth,
            });
        }
        if self.nodes > self.limits.max_expression_nodes {
            return ControlFlow::Break(SqlError::TooComplex {
                what: format!("has more than {} expressions", self.limits.max_expression_nodes),
                key: "sql.max_expression_nodes",
                limit: self.limits.max_expression_nodes,
            });
        }
        ControlFlow::Continue(())
    }

    fn post_visit_expr(&mut self, _: &Expr) -> ControlFlow<SqlError> {
        self.depth -= 1;
        ControlFlow::Continue(())
    }
}

/// How a function's output (or work) grows with its arguments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Growth {
    /// `repeat(s, n)`: `len(s) × n` bytes.
    Repeat,
    /// `lpad(s, n [, fill])`, `rpad`: `n` characters, up to 4 bytes each.
    Pad,
    /// `replace(s, from, to)`: at most a `to` per byte of `s` (an empty `from` matches everywhere).
    Replace,
    /// `regexp_replace(s, pattern, replacement [, flags])`: as `replace`, group references counted twice.
    RegexpReplace,
    /// `levenshtein(a, b)`: time grows with `len(a) × len(b)`.
    Levenshtein,
}

const GROWING: &[(&str, Growth)] = &[
    ("repeat", Growth::Repeat),
    ("lpad", Growth::Pad),
    ("rpad", Growth::Pad),
    ("replace", Growth::Replace),
    ("regexp_replace", Growth::RegexpReplace),
    ("levenshtein", Growth::Levenshtein),
];

/// A built-in function whose every call is checked against the limits before it runs — also
/// while the planner folds constants, which no memory pool sees.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Bounded {
    inner: Arc<ScalarUDF>,
    growth: Growth,
    max_bytes: u64,
    max_pairs: u64,
}

/// Per-row values of one argument (a scalar counts for every row).
enum PerRow {
    One(u64),
    Each(Vec<u64>),
}

impl PerRow {
    fn get(&self, i: usize) -> u64 {
        match self {
            PerRow::One(v) => *v,
            PerRow::Each(v) => v.get(i).copied().unwrap_or(0),
        }
    }

    /// Byte lengths of a string argument (nulls: 0).
    fn lengths(arg: Option<&ColumnarValue>) -> Result<Self, DataFusionError> {
        let Some(arg) = arg else { return Ok(PerRow::One(0)) };
        let array = match arg {
            ColumnarValue::Scalar(s) => s.to_array_of_size(1)?,
            ColumnarValue::Array(a) => a.clone(),
        };
        let array = match array.data_type() {
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View | DataType::Binary | DataType::LargeBinary => array,
            _ => datafusion::arrow::compute::cast(&array, &DataType::Utf8)?,
        };
        let lengths = datafusion::arrow::compute::kernels::length::length(&array)?;
        let lengths = datafusion::arrow::compute::cast(&lengths, &DataType::Int64)?;
        let values: Vec<u64> = lengths.as_primitive::<Int64Type>().iter().map(|v| v.unwrap_or(0).max(0) as u64).collect();
        Ok(match arg {
            ColumnarValue::Scalar(_) => PerRow::One(values.first().copied().unwrap_or(0)),
            ColumnarValue::Array(_) => PerRow::Each(values),
        })
    }

    /// Values of an integer argument (nulls and negatives: 0).
    fn counts(arg: Option<&ColumnarValue>) -> Result<Self, DataFusionError> {
        let Some(arg) = arg else { return Ok(PerRow::One(0)) };
        let array = match arg {
            ColumnarValue::Scalar(s) => s.to_array_of_size(1)?,
            ColumnarValue::Array(a) => a.clone(),
        };
        let array = datafusion::arrow::compute::cast(&array, &DataType::Int64)?;
        let values: Vec<u64> = array.as_primitive::<Int64Type>().iter().map(|v| v.unwrap_or(0).max(0) as u64).collect();
        Ok(match arg {
            ColumnarValue::Scalar(_) => PerRow::One(values.first().copied().unwrap_or(0)),
            ColumnarValue::Array(_) => PerRow::Each(values),
        })
    }
}

impl Bounded {
    /// What the call would cost: (amount, limit, what is counted).
    fn cost(&self, args: &[ColumnarValue], number_rows: usize) -> Result<(u128, u64, &'static str), DataFusionError> {
        let rows = if args.iter().any(|a| matches!(a, ColumnarValue::Array(_))) { number_rows } else { 1 };
        let sum = |f: &dyn Fn(usize) -> u128| (0..rows).map(f).fold(0u128, u128::saturating_add);
        let bytes = self.max_bytes;
        Ok(match self.growth {
            Growth::Repeat => {
                let (s, n) = (PerRow::lengths(args.first())?, PerRow::counts(args.get(1))?);
                (sum(&|i| s.get(i) as u128 * n.get(i) as u128), bytes, "bytes")
            }
            Growth::Pad => {
                let (s, n) = (PerRow::lengths(args.first())?, PerRow::counts(args.get(1))?);
                (sum(&|i| s.get(i) as u128 + 4 * n.get(i) as u128), bytes, "bytes")
            }
            Growth::Replace | Growth::RegexpReplace => {
                let (s, to) = (PerRow::lengths(args.first())?, PerRow::lengths(args.get(2))?);
                let factor = if self.growth == Growth::Replace { 1 } else { 2 };
                (sum(&|i| s.get(i) as u128 + (s.get(i) as u128 + 1) * to.get(i) as u128 * factor), bytes, "bytes")
            }
            Growth::Levenshtein => {
                let (a, b) = (PerRow::lengths(args.first())?, PerRow::lengths(args.get(1))?);
                (sum(&|i| a.get(i) as u128 * b.get(i) as u128), self.max_pairs, "character pairs")
            }
        })
    }
}

impl ScalarUDFImpl for Bounded {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn aliases(&self) -> &[String] {
        self.inner.aliases()
    }

    fn signature(&self) -> &datafusion::logical_expr::Signature {
        self.inner.signature()
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType, DataFusionError> {
        self.inner.return_type(arg_types)
    }

    fn return_field_from_args(&self, args: ReturnFieldArgs) -> Result<FieldRef, DataFusionError> {
        self.inner.return_field_from_args(args)
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>, DataFusionError> {
        self.inner.coerce_types(arg_types)
    }

    fn documentation(&self) -> Option<&datafusion::logical_expr::Documentation> {
        self.inner.documentation()
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue, DataFusionError> {
        let (cost, limit, unit) = self.cost(&args.args, args.number_rows)?;
        if cost > limit as u128 {
            return Err(DataFusionError::ResourcesExhausted(format!(
                "{}() would need {cost} {unit} in one call, more than the limit of {limit} ({})",
                self.name(),
                if self.growth == Growth::Levenshtein {
                    "levenshtein compares at most 100 million character pairs per call"
                } else {
                    "sql.memory_limit_mb / 4 / sql.max_concurrent, at most 256 MiB"
                }
            )));
        }
        let args = if self.growth == Growth::Pad { non_negative_pad_lengths(args)? } else { args };
        self.inner.invoke_with_args(args)
    }
}

/// `lpad`/`rpad` treat a negative length as 0, but DataFusion 55 first sizes its buffer from
/// the sum of the lengths cast to `usize` and panics on a negative one (found by the SQL fuzz
/// target: `rpad('x', -1)`). Passes 0 in their place, which gives the same answer.
fn non_negative_pad_lengths(mut args: ScalarFunctionArgs) -> Result<ScalarFunctionArgs, DataFusionError> {
    let Some(length) = args.args.get_mut(1) else { return Ok(args) };
    let replacement = match &*length {
        ColumnarValue::Scalar(ScalarValue::Int64(Some(v))) if *v < 0 => ColumnarValue::Scalar(ScalarValue::Int64(Some(0))),
        ColumnarValue::Array(a) if a.data_type() == &DataType::Int64 => {
            let lengths = a.as_primitive::<Int64Type>();
            if !lengths.iter().flatten().any(|v| v < 0) {
                return Ok(args);
            }
            ColumnarValue::Array(Arc::new(lengths.unary::<_, Int64Type>(|v| v.max(0))))
        }
        _ => return Ok(args),
    };
    *length = replacement;
    Ok(args)
}

/// Reads the history's Parquet files (only those: no directory listing, no other paths).
fn listing(ctx: &SessionContext, files: &[std::path::PathBuf], schema: SchemaRef) -> Result<DataFrame, DataFusionError> {
    let urls = files.iter().map(|f| ListingTableUrl::parse(f.to_string_lossy())).collect::<Result<Vec<_>, _>>()?;
    let options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
    let config = ListingTableConfig::new_with_multi_paths(urls).with_listing_options(options).with_schema(schema);
    ctx.read_table(Arc::new(ListingTable::try_new(config)?))
}

fn classify_plan_error(e: DataFusionError, limit: usize) -> SqlError {
    let message = e.to_string();
    let lower = message.to_lowercase();
    if lower.contains("not supported") && (lower.contains("ddl") || lower.contains("dml") || lower.contains("statement")) {
        SqlError::Forbidden(message)
    } else if message.contains("Resources exhausted") {
        // A size-checked function refused while the planner folded constants.
        SqlError::Memory { limit, message }
    } else {
        SqlError::Invalid(message)
    }
}

fn classify_run_error(e: DataFusionError, limit: usize) -> SqlError {
    let message = e.to_string();
    if message.contains("Resources exhausted") || message.contains("ResourcesExhausted") {
        SqlError::Memory { limit, message }
    } else if message.contains("panicked") {
        SqlError::Internal(message)
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

/// Hostile SQL for the property test and the fuzz target (`fuzz/fuzz_targets/sql_query.rs`):
/// bytes become a query (random expressions, long operator chains, nesting, set operations,
/// functions with extreme arguments), and the engine must answer it or refuse it with a typed
/// error — never crash, never panic.
pub mod fuzz {
    use std::sync::{Arc, OnceLock};
    use std::time::Duration;

    use super::{SqlEngine, SqlError, SqlLimits};

    const LITERALS: &[&str] = &[
        "0",
        "1",
        "-1",
        "2147483647",
        "-2147483648",
        "9223372036854775807",
        "(-9223372036854775807 - 1)",
        "1000000000",
        "1e308",
        "-0.0",
        "'x'",
        "''",
        "'ab'",
        "NULL",
        "true",
        "'10.0.0.1'",
        "'10.0.0.0/8'",
        "'2026-01-01T00:00:00'",
        "'NaN'",
    ];
    const OPERATORS: &[&str] = &["+", "-", "*", "/", "%", "||", " AND ", " OR ", "=", "<", "<>", " IS DISTINCT FROM "];
    const FUNCTIONS: &[(&str, usize)] = &[
        ("repeat", 2),
        ("lpad", 2),
        ("rpad", 3),
        ("replace", 3),
        ("regexp_replace", 4),
        ("levenshtein", 2),
        ("substr", 3),
        ("left", 2),
        ("right", 2),
        ("concat", 3),
        ("concat_ws", 3),
        ("length", 1),
        ("upper", 1),
        ("reverse", 1),
        ("translate", 3),
        ("split_part", 3),
        ("strpos", 2),
        ("to_hex", 1),
        ("chr", 1),
        ("abs", 1),
        ("power", 2),
        ("sqrt", 1),
        ("ln", 1),
        ("round", 2),
        ("factorial", 1),
        ("gcd", 2),
        ("date_trunc", 2),
        ("to_timestamp", 1),
        ("coalesce", 2),
        ("nullif", 2),
        ("site_of", 1),
        ("in_prefix", 2),
        ("bits_per_second", 2),
        ("window_bits_per_second", 1),
        ("encode", 2),
        ("md5", 1),
        ("sha256", 1),
        ("initcap", 1),
        ("btrim", 2),
        ("overlay", 3),
    ];
    const TYPES: &[&str] = &["INT", "BIGINT", "DOUBLE", "VARCHAR", "BOOLEAN", "TIMESTAMP", "DECIMAL(38, 10)", "SMALLINT"];

    /// Turns bytes into a query, deterministically.
    pub fn sql_from_bytes(data: &[u8]) -> String {
        if let Some(text) = data.strip_prefix(b"!") {
            return String::from_utf8_lossy(text).into_owned();
        }
        let mut g = Gen { data, pos: 0 };
        g.statement()
    }

    struct Gen<'a> {
        data: &'a [u8],
        pos: usize,
    }

    impl Gen<'_> {
        fn byte(&mut self) -> usize {
            let b = self.data.get(self.pos).copied().unwrap_or(0);
            self.pos += 1;
            b as usize
        }

        fn pick<'s>(&mut self, from: &[&'s str]) -> &'s str {
            from[self.byte() % from.len()]
        }

        fn statement(&mut self) -> String {
            match self.byte() % 6 {
                0 => {
                    let n = 2 + self.byte() * 2;
                    let op = self.pick(&[" UNION ALL ", " UNION ", " INTERSECT ", " EXCEPT "]);
                    let branch = format!("SELECT {} AS a", self.expr(3));
                    format!("SELECT count(*) AS n FROM ({})", vec![branch; n].join(op))
                }
                1 => format!("SELECT {} AS a FROM sites", self.expr(0)),
                2 => format!("EXPLAIN SELECT {} AS a", self.expr(0)),
                _ => format!("SELECT {} AS a", self.expr(0)),
            }
        }

        fn expr(&mut self, depth: usize) -> String {
            if depth > 6 || self.pos >= self.data.len() {
                return self.pick(LITERALS).to_string();
            }
            match self.byte() % 9 {
                0 => self.pick(LITERALS).to_string(),
                1 => {
                    let op = self.pick(OPERATORS);
                    format!("({} {op} {})", self.expr(depth + 1), self.expr(depth + 1))
                }
                2 => {
                    // A long chain: up to 255 × 40 terms, past the depth limit.
                    let n = 1 + self.byte() * 40;
                    let op = self.pick(OPERATORS);
                    let term = self.pick(LITERALS);
                    format!("({})", vec![term; n].join(op))
                }
                3 | 4 => {
                    let (name, arity) = FUNCTIONS[self.byte() % FUNCTIONS.len()];
                    let args: Vec<String> = (0..arity).map(|_| self.expr(depth + 1)).collect();
                    format!("{name}({})", args.join(", "))
                }
                5 => format!("CASE WHEN {} THEN {} ELSE {} END", self.expr(depth + 1), self.expr(depth + 1), self.expr(depth + 1)),
                6 => format!("CAST({} AS {})", self.expr(depth + 1), self.pick(TYPES)),
                7 => format!("(SELECT {})", self.expr(depth + 1)),
                _ => {
                    let n = 1 + self.byte() % 64;
                    format!("{}{}{}", "(".repeat(n), self.expr(depth + 1), ")".repeat(n))
                }
            }
        }
    }

    /// An engine over the embedded inventory and an empty history, small limits.
    fn engine() -> &'static (tokio::runtime::Runtime, SqlEngine) {
        static ENGINE: OnceLock<(tokio::runtime::Runtime, SqlEngine)> = OnceLock::new();
        ENGINE.get_or_init(|| {
            let options = crate::history::HistoryOptions { dir: None, retention_days: 1, compact_min_files: 24, max_memory_rows: 1000 };
            let history = crate::history::History::open(options).expect("memory history");
            let limits = SqlLimits {
                timeout: Duration::from_secs(5),
                memory_bytes: 64 << 20,
                queue_timeout: Duration::from_secs(60),
                ..SqlLimits::default()
            };
            let engine = SqlEngine::new(Arc::new(crate::inventory::Inventory::embedded()), history, None, limits, 10.0);
            let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().expect("runtime");
            (rt, engine)
        })
    }

    /// Runs `sql` on the fuzz engine: rows of the result, or the error.
    pub fn answer(sql: &str) -> Result<usize, SqlError> {
        let (rt, engine) = engine();
        rt.block_on(engine.query(sql)).map(|(_, batches)| batches.iter().map(|b| b.num_rows()).sum())
    }

    /// Runs `sql`; panics if the engine did not answer with a result or a typed error.
    pub fn check(sql: &str) {
        match answer(sql) {
            Err(SqlError::Internal(m)) => panic!("{sql}\n→ internal error: {m}"),
            Err(SqlError::Busy(_)) => panic!("{sql}\n→ busy with no other query running"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::fuzz;

    #[test]
    fn hostile_shapes_get_typed_answers() {
        let chain = |op: &str, n: usize| format!("SELECT {}", vec!["1"; n].join(op));
        let union = |n: usize| format!("SELECT count(*) FROM ({})", vec!["SELECT 1"; n].join(" UNION ALL "));
        let kind = |sql: &str| fuzz::answer(sql).map_err(|e| e.kind());
        assert_eq!(kind(&chain("+", 100_000)), Err("too_complex"));
        assert_eq!(kind(&chain("+", 250)), Ok(1), "deep but allowed");
        assert_eq!(kind(&chain(" AND ", 250).replace('1', "true")), Ok(1));
        assert_eq!(kind(&union(5_000)), Err("too_complex"));
        assert_eq!(kind(&union(150)), Ok(1), "many but allowed");
        assert_eq!(kind(&"x".repeat(300_000)), Err("query_too_long"));
        for sql in [
            "SELECT length(repeat('x', 1000000000))",
            "SELECT repeat('x', 2147483647)",
            "SELECT lpad('x', 2000000000)",
            "SELECT replace(repeat('x', 100000), '', repeat('y', 1000))",
            "SELECT levenshtein(repeat('a', 100000), repeat('b', 100000))",
        ] {
            assert_eq!(kind(sql), Err("memory_limit"), "{sql}");
        }
        assert_eq!(kind("SELECT length(repeat('ab', 1000))"), Ok(1));
        // Negative pad lengths (DataFusion panics on them; found by the fuzz target).
        assert_eq!(kind("SELECT rpad('x', -1), lpad('x', -9223372036854775807 - 1, 'y')"), Ok(1));
        assert_eq!(kind("SELECT rpad(CAST(v AS VARCHAR), v, '-') FROM (VALUES (-3), (4)) AS t(v)"), Ok(2));
        assert_eq!(kind("EXPLAIN SELECT 1"), Ok(2), "the logical and the physical plan");
        assert_eq!(kind("WITH RECURSIVE t(s) AS (SELECT 'x' UNION ALL SELECT s || s FROM t) SELECT * FROM t"), Err("invalid_query"));
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        /// The fuzz target's invariant on generated queries: an answer or a typed error.
        #[test]
        fn generated_sql_gets_an_answer_or_a_typed_error(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            fuzz::check(&fuzz::sql_from_bytes(&data));
        }
    }
}
