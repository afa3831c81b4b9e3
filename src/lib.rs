//! siteflow: per-site bandwidth and link quality for a provincial network, from flow and probe
//! telemetry, over event-time windows aggregated by DataFusion, exported to Prometheus.
//!
//! The stages, in the order data flows through them:
//! [`source`] (bytes) → [`decode`] (Arrow batches) → [`enrich`] (site, direction, sampling) →
//! [`window`] (event-time windows, DataFusion partial/final aggregates) → [`sink`] (Prometheus).
//! [`pipeline`] wires them together, [`driver`] feeds it from a source; [`http`] serves the results.

pub mod app;
pub mod build_info;
pub mod checkpoint;
pub mod config;
pub mod dead_letter;
pub mod decode;
pub mod driver;
pub mod enrich;
pub mod event_time;
pub mod history;
pub mod http;
pub mod inventory;
pub mod kafka_client;
pub mod meetings_topic;
pub mod metrics;
pub mod notices;
pub mod pipeline;
pub mod rates;
pub mod readiness;
pub mod readiness_topic;
pub mod replay;
pub mod schema;
pub mod shuffle;
pub mod sink;
pub mod source;
pub mod sql;
pub mod table;
pub mod types;
pub mod window;
pub mod windows_topic;
