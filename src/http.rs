//! HTTP endpoints: `/metrics` (Prometheus text format), `/healthz`, `/readyz`, and the
//! readiness API: `GET /api/readiness`, `GET|POST /api/meetings`, `GET /api/meetings/{id}/readiness`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::TextEncoder;

use crate::metrics::PipelineMetrics;
use crate::readiness::SharedReadiness;
use crate::sink::prometheus::SiteMetrics;

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
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/api/readiness", get(readiness))
        .route("/api/meetings", get(list_meetings).post(add_meeting))
        .route("/api/meetings/{id}/readiness", get(meeting_readiness))
        .with_state(state)
}

/// Renders the pipeline's own metrics and the per-site snapshot in one response.
pub fn render(state: &AppState) -> Result<String, prometheus::Error> {
    let mut families = state.metrics.registry.gather();
    families.extend(state.sites.collect());
    families.extend(crate::sink::readiness::collect(&state.readiness));
    // The text format has no way to say "a family with no series yet" (e.g. no reasons while
    // every site is ready): leave such families out.
    families.retain(|f| !f.get_metric().is_empty());
    let mut buf = String::new();
    TextEncoder::new().encode_utf8(&families, &mut buf)?;
    Ok(buf)
}

async fn metrics(State(state): State<AppState>) -> axum::response::Response {
    match render(&state) {
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
    } else if state.ready.load(Ordering::Acquire) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "waiting for the first window to close\n")
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
    let engine = state.readiness.engine.read().expect("readiness lock");
    let sites: Vec<_> = engine
        .latest()
        .iter()
        .filter(|s| f.site.as_ref().is_none_or(|x| &s.site == x))
        .filter(|s| f.district.as_ref().is_none_or(|x| &s.district == x))
        .filter(|s| f.level.as_ref().is_none_or(|x| &s.level == x))
        .filter(|s| f.state.as_ref().is_none_or(|x| s.verdict.as_str() == x))
        .collect();
    let counts: std::collections::BTreeMap<&str, usize> =
        crate::readiness::Verdict::ALL.iter().map(|v| (v.as_str(), sites.iter().filter(|s| s.verdict == *v).count())).collect();
    let evaluated_at = engine.evaluated_at_ns().map(|n| chrono::DateTime::from_timestamp_nanos(n).to_rfc3339());
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

async fn add_meeting(
    State(state): State<AppState>,
    body: Result<Json<crate::readiness::MeetingSpec>, axum::extract::rejection::JsonRejection>,
) -> axum::response::Response {
    let Json(spec) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    match state.readiness.add_meeting(spec) {
        Ok(m) => (StatusCode::CREATED, Json(serde_json::json!({ "meeting": m, "participants": m.participants.len() }))).into_response(),
        Err(e) => error(StatusCode::BAD_REQUEST, e),
    }
}

async fn meeting_readiness(State(state): State<AppState>, Path(id): Path<String>) -> axum::response::Response {
    match state.readiness.meeting_report(&id) {
        Some(r) => Json(r).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no meeting {id:?}")),
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
        let inventory = Arc::new(Inventory::embedded());
        let state = AppState {
            metrics: Arc::new(PipelineMetrics::new(&crate::pipeline::Pipeline::FORMATS, &crate::pipeline::Pipeline::TABLES)),
            sites: SiteMetrics::new(inventory.clone(), 10.0),
            ready: Default::default(),
            stopping: Default::default(),
            readiness: SharedReadiness::new(ReadinessEngine::new(inventory, Policy::default(), 10_000_000_000), Vec::new()),
        };
        let text = render(&state).unwrap();
        assert!(text.contains("siteflow_records_received_total{format=\"goflow2_json\"} 0"), "{text}");
        assert!(text.contains("siteflow_site_link_capacity_bytes_per_second{"));
    }
}
