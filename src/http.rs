//! HTTP endpoints: `/metrics` (Prometheus text format), `/healthz`, `/readyz`, and the
//! readiness API: `GET /api/readiness`, `GET|POST /api/meetings`, `GET /api/meetings/{id}/readiness`,
//! and SQL: `POST /api/sql` (see docs/sql.md).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, Extension, Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::TextEncoder;

use crate::config::{ApiConfig, HttpConfig};
use crate::meetings_topic::MeetingsTopic;
use crate::metrics::PipelineMetrics;
use crate::readiness::{Removal, SharedReadiness};
use crate::sink::prometheus::SiteMetrics;
use crate::sql::SqlEngine;

/// What the handlers read.
#[derive(Clone)]
pub struct AppState {
    pub metrics: Arc<PipelineMetrics>,
    pub sites: SiteMetrics,
    /// True once the first window has been published.
    pub ready: Arc<AtomicBool>,
    /// True once shutdown has begun.
    pub stopping: Arc<AtomicBool>,
    pub readiness: Arc<SharedReadiness>,
    /// The SQL API, if enabled, and the bearer token it requires (if any).
    pub sql: Option<(SqlEngine, Option<String>)>,
    /// Where posted meetings are kept when shared by every instance (`kafka.meetings_topic`).
    pub meetings_topic: Option<Arc<MeetingsTopic>>,
}

/// The router with the default API and HTTP limits.
pub fn router(state: AppState) -> Router {
    router_with(state, ApiConfig::default(), &HttpConfig::default())
}

/// The router: every request body is read within `http.body_timeout_secs` and
/// `http.max_body_bytes`; every error is JSON `{"error": …}`.
pub fn router_with(state: AppState, api: ApiConfig, http: &HttpConfig) -> Router {
    let body = BodyLimits { timeout: Duration::from_secs(http.body_timeout_secs), max_bytes: http.max_body_bytes };
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/readiness", get(readiness))
        .route("/api/meetings", get(list_meetings).post(add_meeting))
        .route("/api/meetings/{id}", axum::routing::delete(delete_meeting))
        .route("/api/meetings/{id}/readiness", get(meeting_readiness))
        .route("/api/sql", axum::routing::post(sql_query))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such endpoint; see docs/operations.md".into()) })
        .method_not_allowed_fallback(|| async { error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this endpoint".into()) })
        .layer(axum::extract::DefaultBodyLimit::max(http.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(body, read_body))
        .layer(axum::Extension(Arc::new(api)))
        .with_state(state)
}

#[derive(Debug, Clone, Copy)]
struct BodyLimits {
    timeout: Duration,
    max_bytes: usize,
}

/// Reads the whole request body before any handler runs: a client that trickles its body is
/// cut off after the timeout (408), one that sends too much gets 413. The rest of an oversized
/// body is read and dropped (up to 16 times the limit) so the client gets the answer instead of
/// a reset connection.
async fn read_body(State(limits): State<BodyLimits>, request: Request, next: Next) -> axum::response::Response {
    use futures::StreamExt;
    let (parts, body) = request.into_parts();
    let read = async {
        let (mut kept, mut seen) = (Vec::new(), 0usize);
        let mut frames = body.into_data_stream();
        while let Some(frame) = frames.next().await {
            let frame = frame.map_err(|e| format!("cannot read the request body: {e}"))?;
            seen += frame.len();
            if seen <= limits.max_bytes {
                kept.extend_from_slice(&frame);
            } else if seen > limits.max_bytes.saturating_mul(16) {
                break;
            }
        }
        Ok::<_, String>((kept, seen))
    };
    match tokio::time::timeout(limits.timeout, read).await {
        Err(_) => {
            sql_error(408, "body_timeout", format!("the request body did not arrive within {:?} (http.body_timeout_secs)", limits.timeout))
        }
        Ok(Err(e)) => sql_error(400, "bad_request", e),
        Ok(Ok((_, seen))) if seen > limits.max_bytes => {
            sql_error(413, "body_too_large", format!("the request body is larger than {} bytes (http.max_body_bytes)", limits.max_bytes))
        }
        Ok(Ok((kept, _))) => next.run(Request::from_parts(parts, Body::from(kept))).await,
    }
}

/// Limits of the HTTP server itself.
#[derive(Debug, Clone, Copy)]
pub struct ServerLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

impl ServerLimits {
    pub fn from_config(c: &HttpConfig) -> Self {
        Self { max_connections: c.max_connections, header_timeout: Duration::from_secs(c.header_timeout_secs) }
    }
}

/// Binds the HTTP listener with a backlog of `max_connections` (the kernel caps it at
/// `net.core.somaxconn`). Tokio's default of 1024 let a burst of connects fill the accept queue;
/// the kernel then drops SYNs, and every client connecting at that moment — a Prometheus scrape
/// included — waits a full second for the SYN to be sent again.
pub fn listen(addr: SocketAddr, max_connections: usize) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(u32::try_from(max_connections).unwrap_or(u32::MAX).max(1024))
}

/// Serves `app` until `shutdown` resolves. At most `max_connections` connections are open at
/// once (the next wait in the kernel's backlog, never failing the accept loop for lack of file
/// descriptors); a connection that does not send its request headers within `header_timeout`
/// is closed, idle keep-alive ones included. Each connection is its own task, so `/metrics`
/// is answered whatever the SQL API is doing.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ServerLimits,
    shutdown: impl std::future::Future<Output = ()>,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            _ = &mut shutdown => break,
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors, or a connection reset before accept: wait a little.
                    tracing::warn!("cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |mut request: axum::http::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(axum::extract::ConnectInfo(peer));
                tower::ServiceExt::oneshot(app.clone(), request.map(Body::new))
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .max_buf_size(64 << 10)
                .serve_connection(TokioIo::new(stream), service);
            let _ = connection.await;
            drop(permit);
        });
    }
    Ok(())
}

/// Renders the pipeline's own metrics and the per-site snapshot in one response.
pub fn render(state: &AppState) -> Result<String, prometheus::Error> {
    render_families(state, None)
}

/// Most `name` parameters one `/metrics` request may give.
const MAX_NAMES: usize = 64;

/// [`render`], only the families `names` lists when it lists some (`GET /metrics?name=…`).
///
/// Why: the whole page is over a megabyte with the 242 example sites, most of it the per-site
/// series, and rendering it costs tens of milliseconds. A watcher that reads one counter often
/// (a progress poll, a dashboard's single stat) asks for it by name: names the pipeline's own
/// registry holds are answered without collecting the per-site snapshot at all.
fn render_families(state: &AppState, names: Option<&[String]>) -> Result<String, prometheus::Error> {
    let wanted = |f: &prometheus::proto::MetricFamily| names.is_none_or(|names| names.iter().any(|n| n == f.name()));
    let mut families = state.metrics.registry.gather();
    families.retain(|f| wanted(f));
    let all_found = names.is_some_and(|names| names.iter().all(|n| families.iter().any(|f| f.name() == n)));
    if !all_found {
        families.extend(state.sites.collect().into_iter().filter(|f| wanted(f)));
        families.extend(crate::sink::readiness::collect(&state.readiness).into_iter().filter(|f| wanted(f)));
        if let Some((engine, _)) = &state.sql {
            families.extend(engine.collect().into_iter().filter(|f| wanted(f)));
        }
    }
    // The text format has no way to say "a family with no series yet" (e.g. no reasons while
    // every site is ready): leave such families out.
    families.retain(|f| !f.get_metric().is_empty());
    let mut buf = String::new();
    TextEncoder::new().encode_utf8(&families, &mut buf)?;
    Ok(buf)
}

/// The `name` parameters of a `/metrics` query: none means every family. Any other parameter,
/// more than [`MAX_NAMES`] names or a name that is not a metric name is refused (a typo would
/// otherwise look like a metric without series).
fn metric_names(query: &[(String, String)]) -> Result<Option<Vec<String>>, String> {
    if query.is_empty() {
        return Ok(None);
    }
    let mut names = Vec::new();
    for (key, value) in query {
        if key != "name" {
            return Err(format!("unknown query parameter {key:?}: /metrics takes only name=<metric family>, repeated"));
        }
        let valid = !value.is_empty()
            && value.len() <= 200
            && value.bytes().enumerate().all(|(i, c)| c.is_ascii_alphabetic() || c == b'_' || c == b':' || (i > 0 && c.is_ascii_digit()));
        if !valid {
            return Err(format!("name={value:?} is not a metric name ([a-zA-Z_:][a-zA-Z0-9_:]*, at most 200 bytes)"));
        }
        if names.len() == MAX_NAMES {
            return Err(format!("at most {MAX_NAMES} name parameters per request"));
        }
        names.push(value.clone());
    }
    Ok(Some(names))
}

async fn metrics(
    State(state): State<AppState>,
    query: Result<Query<Vec<(String, String)>>, axum::extract::rejection::QueryRejection>,
) -> axum::response::Response {
    let names = match query.map_err(|e| e.body_text()).and_then(|Query(q)| metric_names(&q)) {
        Ok(names) => names,
        Err(message) => return error(StatusCode::BAD_REQUEST, message),
    };
    match render_families(&state, names.as_deref()) {
        Ok(text) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Err(e) => {
            // A 500 makes Prometheus mark the scrape failed (up == 0) instead of silently empty.
            tracing::error!(error = %e, "cannot encode metrics");
            (StatusCode::INTERNAL_SERVER_ERROR, format!("cannot encode metrics: {e}\n")).into_response()
        }
    }
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    if state.stopping.load(Ordering::Acquire) {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
    } else if state.meetings_topic.as_ref().is_some_and(|t| !t.loaded()) {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: reading the meetings topic (kafka.meetings_topic)\n")
    } else if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready: waiting for the first window to close (Kafka: or to join the group and catch up)\n")
    }
}

/// Filters of `GET /api/readiness`; each optional, all must match.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadinessFilter {
    pub site: Option<String>,
    pub district: Option<String>,
    pub level: Option<String>,
    /// `ready`, `degraded`, `not_ready` or `unknown`.
    pub state: Option<String>,
}

fn error(status: StatusCode, message: String) -> axum::response::Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

async fn readiness(
    State(state): State<AppState>,
    filter: Result<Query<ReadinessFilter>, axum::extract::rejection::QueryRejection>,
) -> axum::response::Response {
    let Query(f) = match filter {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("{e}; filters: site, district, level, state")),
    };
    if let Some(s) = &f.state
        && !crate::readiness::Verdict::ALL.iter().any(|v| v.as_str() == s)
    {
        return error(StatusCode::BAD_REQUEST, format!("state {s:?} is not one of ready, degraded, not_ready, unknown"));
    }
    // In a scale-out, the sites other instances judge come from the readiness topic.
    let sites: Vec<_> = state
        .readiness
        .verdicts()
        .into_iter()
        .filter(|s| f.site.as_ref().is_none_or(|x| &s.site == x))
        .filter(|s| f.district.as_ref().is_none_or(|x| &s.district == x))
        .filter(|s| f.level.as_ref().is_none_or(|x| &s.level == x))
        .filter(|s| f.state.as_ref().is_none_or(|x| s.verdict.as_str() == x))
        .collect();
    let counts: std::collections::BTreeMap<&str, usize> =
        crate::readiness::Verdict::ALL.iter().map(|v| (v.as_str(), sites.iter().filter(|s| s.verdict == *v).count())).collect();
    let evaluated_at = state
        .readiness
        .engine
        .read()
        .expect("readiness lock")
        .evaluated_at_ns()
        .map(|n| chrono::DateTime::from_timestamp_nanos(n).to_rfc3339());
    Json(serde_json::json!({ "evaluated_at": evaluated_at, "counts": counts, "sites": sites })).into_response()
}

async fn list_meetings(State(state): State<AppState>) -> axum::response::Response {
    let engine = state.readiness.engine.read().expect("readiness lock");
    let now = engine.evaluated_at_ns().unwrap_or(i64::MIN);
    let lead = engine.policy().meeting_lead_secs;
    let meetings = state.readiness.meetings.read().expect("meetings lock");
    let list: Vec<_> = meetings
        .iter()
        .map(|m| serde_json::json!({ "meeting": m, "participants": m.participants.len(), "phase": m.phase(now, lead) }))
        .collect();
    Json(serde_json::json!({ "meetings": list })).into_response()
}

/// Who may write: the bearer `api.token` when set, loopback clients when not.
fn may_write(api: &ApiConfig, headers: &axum::http::HeaderMap, peer: Option<SocketAddr>) -> Result<(), axum::response::Response> {
    match &api.token {
        Some(token) => {
            let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
            if given.is_some_and(|g| same_secret(g.as_bytes(), token.as_bytes())) {
                Ok(())
            } else {
                Err(error(StatusCode::UNAUTHORIZED, "writes require `Authorization: Bearer <token>` (api.token)".into()))
            }
        }
        None if peer.is_none_or(|p| p.ip().is_loopback()) => Ok(()),
        None => Err(error(StatusCode::FORBIDDEN, "writes are accepted from loopback only unless api.token is set".into())),
    }
}

async fn add_meeting(
    State(state): State<AppState>,
    Extension(api): Extension<Arc<ApiConfig>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: axum::http::HeaderMap,
    body: Result<Json<crate::readiness::MeetingSpec>, axum::extract::rejection::JsonRejection>,
) -> axum::response::Response {
    if let Err(refused) = may_write(&api, &headers, peer.map(|Extension(ConnectInfo(p))| p)) {
        return refused;
    }
    let Json(spec) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if spec.id.len() > api.max_meeting_id_bytes {
        return error(StatusCode::BAD_REQUEST, format!("id: longer than {} bytes (api.max_meeting_id_bytes)", api.max_meeting_id_bytes));
    }
    if spec.title.len() > api.max_meeting_title_bytes {
        return error(
            StatusCode::BAD_REQUEST,
            format!("title: longer than {} bytes (api.max_meeting_title_bytes)", api.max_meeting_title_bytes),
        );
    }
    if state.readiness.meetings.read().expect("meetings lock").len() >= api.max_meetings {
        return error(
            StatusCode::CONFLICT,
            format!("already {} meetings (api.max_meetings); delete past ones with DELETE /api/meetings/{{id}}", api.max_meetings),
        );
    }
    let Some(topic) = &state.meetings_topic else {
        return match state.readiness.add_meeting(spec) {
            Ok(m) => (StatusCode::CREATED, Json(serde_json::json!({ "meeting": m, "participants": m.participants.len() }))).into_response(),
            Err(e) => error(StatusCode::BAD_REQUEST, e),
        };
    };
    // Shared: checked here, written to the topic, and added once read back from it.
    let meeting = match state.readiness.check_new_meeting(spec) {
        Ok(m) => m,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if let Err(e) = topic.put(&meeting.spec).await {
        return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    }
    if !state.readiness.meetings.read().expect("meetings lock").iter().any(|m| m.spec == meeting.spec) {
        // Another instance's write of the same id came first, or the store filled up meanwhile.
        return error(
            StatusCode::CONFLICT,
            format!("meeting {:?} was not kept when read back from the topic (see the log)", meeting.spec.id),
        );
    }
    (StatusCode::CREATED, Json(serde_json::json!({ "meeting": meeting, "participants": meeting.participants.len() }))).into_response()
}

async fn delete_meeting(
    State(state): State<AppState>,
    Extension(api): Extension<Arc<ApiConfig>>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: axum::http::HeaderMap,
    Path(id): Path<String>,
) -> axum::response::Response {
    if let Err(refused) = may_write(&api, &headers, peer.map(|Extension(ConnectInfo(p))| p)) {
        return refused;
    }
    let scheduled = match state.readiness.meetings.read().expect("meetings lock").iter().find(|m| m.spec.id == id) {
        None => return error(StatusCode::NOT_FOUND, format!("no meeting {id:?}")),
        Some(m) => m.scheduled,
    };
    if scheduled {
        return error(StatusCode::CONFLICT, format!("meeting {id:?} comes from the schedule file (readiness.meetings): edit the file"));
    }
    let Some(topic) = &state.meetings_topic else {
        return match state.readiness.remove_meeting(&id) {
            Removal::Removed => StatusCode::NO_CONTENT.into_response(),
            _ => error(StatusCode::NOT_FOUND, format!("no meeting {id:?}")),
        };
    };
    match topic.delete(&id).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

async fn meeting_readiness(State(state): State<AppState>, Path(id): Path<String>) -> axum::response::Response {
    match state.readiness.meeting_report(&id) {
        Some(r) => Json(r).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no meeting {id:?}")),
    }
}
/// Result encodings of `POST /api/sql`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlFormat {
    Json,
    Csv,
    Arrow,
}

impl SqlFormat {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "json" | "application/json" => Some(Self::Json),
            "csv" | "text/csv" => Some(Self::Csv),
            "arrow" | "application/vnd.apache.arrow.stream" => Some(Self::Arrow),
            _ => None,
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Json => "application/json",
            Self::Csv => "text/csv; charset=utf-8",
            Self::Arrow => "application/vnd.apache.arrow.stream",
        }
    }
}

/// Encodes query results in `format`.
pub fn encode_batches(
    format: SqlFormat,
    schema: &datafusion::arrow::datatypes::SchemaRef,
    batches: &[datafusion::arrow::array::RecordBatch],
) -> Result<Vec<u8>, datafusion::arrow::error::ArrowError> {
    let mut out = Vec::new();
    match format {
        SqlFormat::Json => {
            let mut w = datafusion::arrow::json::ArrayWriter::new(&mut out);
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
            if batches.iter().all(|b| b.num_rows() == 0) {
                out = b"[]".to_vec();
            }
        }
        SqlFormat::Csv => {
            let mut w = datafusion::arrow::csv::WriterBuilder::new().with_header(true).build(&mut out);
            if batches.is_empty() {
                w.write(&datafusion::arrow::array::RecordBatch::new_empty(schema.clone()))?;
            }
            for b in batches {
                w.write(b)?;
            }
        }
        SqlFormat::Arrow => {
            let mut w = datafusion::arrow::ipc::writer::StreamWriter::try_new(&mut out, schema)?;
            for b in batches {
                w.write(b)?;
            }
            w.finish()?;
        }
    }
    Ok(out)
}

/// Query and options of `POST /api/sql`: the SQL as the body (text) or as JSON
/// `{"query": …, "format": …}`; the format also as `?format=` or by `Accept`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqlRequest {
    pub query: Option<String>,
    pub format: Option<String>,
}

fn sql_error(status: u16, kind: &str, message: String) -> axum::response::Response {
    let status = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST);
    (status, Json(serde_json::json!({ "error": message, "kind": kind }))).into_response()
}

/// Compares without returning early on the first difference (token checks).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn sql_query(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    params: Result<Query<SqlRequest>, axum::extract::rejection::QueryRejection>,
    body: axum::body::Bytes,
) -> axum::response::Response {
    let Query(params) = match params {
        Ok(p) => p,
        Err(e) => return sql_error(400, "bad_request", format!("{}; parameters: query, format", e.body_text())),
    };
    let Ok(body) = String::from_utf8(body.to_vec()) else {
        return sql_error(400, "bad_request", "the body is not valid UTF-8".into());
    };
    let Some((engine, token)) = &state.sql else {
        return sql_error(404, "disabled", "the SQL API is not enabled on this instance".into());
    };
    if let Some(token) = token {
        let given = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|g| same_secret(g.as_bytes(), token.as_bytes())) {
            return sql_error(401, "unauthorized", "this instance requires `Authorization: Bearer <token>` (sql.token)".into());
        }
    }
    let is_json = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|c| c.starts_with("application/json"));
    let request = if is_json {
        match serde_json::from_str::<SqlRequest>(&body) {
            Ok(r) => r,
            Err(e) => {
                return sql_error(
                    400,
                    "bad_request",
                    format!("body: {e}; expected {{\"query\": \"SELECT …\", \"format\": \"json|csv|arrow\"}}"),
                );
            }
        }
    } else {
        SqlRequest { query: Some(body), format: None }
    };
    let query = params.query.or(request.query).unwrap_or_default();
    if query.trim().is_empty() {
        return sql_error(400, "bad_request", "no query: send the SQL as the request body (or JSON {\"query\": …})".into());
    }
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    let format = match params.format.or(request.format) {
        Some(f) => match SqlFormat::parse(&f) {
            Some(f) => f,
            None => return sql_error(400, "bad_request", format!("format {f:?} is not one of json, csv, arrow")),
        },
        None => {
            accept.split(',').filter_map(|a| SqlFormat::parse(a.split(';').next().unwrap_or("").trim())).next().unwrap_or(SqlFormat::Json)
        }
    };
    let started = std::time::Instant::now();
    // Encoded on the query thread: a large result is work too.
    let encoded = engine
        .query_then(&query, move |schema, batches| {
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            encode_batches(format, &schema, &batches)
                .map(|bytes| (rows, bytes))
                .map_err(|e| crate::sql::SqlError::Invalid(format!("cannot encode the result as {format:?}: {e}")))
        })
        .await;
    match encoded {
        Ok((rows, bytes)) => {
            tracing::info!(rows, seconds = started.elapsed().as_secs_f64(), "sql query answered");
            ([(header::CONTENT_TYPE, format.content_type())], bytes).into_response()
        }
        Err(e) => {
            tracing::info!(kind = e.kind(), error = %e, "sql query refused or failed");
            let mut response = sql_error(e.status(), e.kind(), e.to_string());
            if matches!(e, crate::sql::SqlError::Busy(_)) {
                response.headers_mut().insert(header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
            }
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Inventory;
    use crate::readiness::{Policy, ReadinessEngine};

    /// Before the first window closes, several families have no series: the scrape must still
    /// succeed (the text encoder refuses empty families).
    #[test]
    fn renders_before_any_window_closes() {
        let state = state();
        let text = render(&state).unwrap();
        assert!(text.contains("siteflow_records_received_total{format=\"goflow2_json\"} 0"), "{text}");
        assert!(text.contains("siteflow_site_link_capacity_bytes_per_second{"));
    }

    fn state() -> AppState {
        let inventory = Arc::new(Inventory::embedded());
        AppState {
            metrics: Arc::new(PipelineMetrics::new(&crate::pipeline::Pipeline::FORMATS, &crate::table::TABLES)),
            sites: SiteMetrics::new(inventory.clone(), 10.0),
            ready: Default::default(),
            stopping: Default::default(),
            readiness: SharedReadiness::new(ReadinessEngine::new(inventory, Policy::default(), 10_000_000_000), Vec::new()),
            sql: None,
            meetings_topic: None,
        }
    }

    async fn get(state: AppState, uri: &str) -> (StatusCode, String) {
        use tower::ServiceExt as _;
        let response = router(state).oneshot(Request::get(uri).body(Body::empty()).unwrap()).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 24).await.unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    /// Families by name: the pipeline's own, a per-site one, both; an unknown name has no series.
    #[tokio::test]
    async fn metrics_by_name_lists_only_those_families() {
        let family_names = |text: &str| {
            let mut names: Vec<String> =
                text.lines().filter_map(|l| l.strip_prefix("# TYPE ")).map(|l| l.split(' ').next().unwrap().to_string()).collect();
            names.sort();
            names
        };
        let (status, text) = get(state(), "/metrics?name=siteflow_records_received_total").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(family_names(&text), ["siteflow_records_received_total"], "{text}");
        assert!(text.contains("siteflow_records_received_total{format=\"goflow2_json\"} 0"), "{text}");

        let uri = "/metrics?name=siteflow_site_link_capacity_bytes_per_second&name=siteflow_records_received_total";
        let (_, text) = get(state(), uri).await;
        assert_eq!(family_names(&text), ["siteflow_records_received_total", "siteflow_site_link_capacity_bytes_per_second"]);
        assert_eq!(text.lines().filter(|l| l.starts_with("siteflow_site_link_capacity_bytes_per_second{")).count(), 242);

        let (status, text) = get(state(), "/metrics?name=siteflow_no_such_metric").await;
        assert_eq!((status, text.as_str()), (StatusCode::OK, ""));
        let (_, whole) = get(state(), "/metrics").await;
        assert_eq!(family_names(&whole), family_names(&render(&state()).unwrap()));
    }

    /// Anything but metric names in `name`, other parameters or too many names: 400, named.
    #[tokio::test]
    async fn metrics_refuses_a_bad_query_and_names_it() {
        for (uri, says) in [
            ("/metrics?nmae=siteflow_records_received_total", "unknown query parameter \"nmae\""),
            ("/metrics?name=", "name=\"\" is not a metric name"),
            ("/metrics?name=1abc", "name=\"1abc\" is not a metric name"),
            ("/metrics?name=a%20b", "name=\"a b\" is not a metric name"),
            ("/metrics?name=%FF", "is not a metric name"),
        ] {
            let (status, body) = get(state(), uri).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{uri}: {body}");
            let error: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert!(error["error"].as_str().unwrap().contains(says), "{uri}: {body}");
        }
        let many: Vec<String> = (0..=MAX_NAMES).map(|i| format!("name=m{i}")).collect();
        let (status, body) = get(state(), &format!("/metrics?{}", many.join("&"))).await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(body.contains("at most 64 name parameters"), "{body}");
        let long = format!("/metrics?name={}", "a".repeat(201));
        assert_eq!(get(state(), &long).await.0, StatusCode::BAD_REQUEST);
    }
}
