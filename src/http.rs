//! HTTP endpoints: `/metrics` (Prometheus text format), `/healthz`, `/readyz`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{Encoder, TextEncoder};

use crate::metrics::PipelineMetrics;
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
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(state)
}

/// Renders the pipeline's own metrics and the per-site snapshot in one response.
pub fn render(state: &AppState) -> String {
    let mut families = state.metrics.registry.gather();
    families.extend(state.sites.collect());
    let mut buf = Vec::new();
    TextEncoder::new().encode(&families, &mut buf).expect("text encoding never fails");
    String::from_utf8(buf).expect("text format is UTF-8")
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], render(&state))
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
