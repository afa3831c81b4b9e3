//! Integration tests: one binary, one module per concern, shared helpers in `support`.

mod architecture;
mod check_cli;
mod cli_output;
mod connection;
mod demo_binary;
mod deploy;
mod docs;
mod files;
mod golden;
mod hierarchy;
mod kafka;
mod kafka_support;
mod pipeline_sql;
mod prometheus_e2e;
mod quickstart;
mod readiness;
mod records;
mod replay;
mod sql;
mod sql_hostile;
mod support;
mod window_totals;
