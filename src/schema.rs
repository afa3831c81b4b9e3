//! The Arrow schemas of the data between stages: decoded flows, probe results and interface
//! counters; interface traffic (counters turned into bytes per interval); and the enriched rows
//! (site labels added) that the pipeline's SQL aggregates. Stages build and read batches of
//! these schemas; keeping them in one module below every stage keeps the arrows pointing down.

use std::sync::Arc;

use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};

fn ts_ns() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, None)
}

/// Schema of decoded flows: the raw record, not yet corrected for sampling nor tied to a site.
pub fn flow_schema() -> SchemaRef {
    static SCHEMA: std::sync::OnceLock<SchemaRef> = std::sync::OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("event_time", ts_ns(), false),
                Field::new("exporter", DataType::FixedSizeBinary(16), false),
                Field::new("src_addr", DataType::FixedSizeBinary(16), false),
                Field::new("dst_addr", DataType::FixedSizeBinary(16), false),
                Field::new("src_port", DataType::UInt16, false),
                Field::new("dst_port", DataType::UInt16, false),
                Field::new("proto", DataType::UInt8, false),
                Field::new("in_if", DataType::UInt32, false),
                Field::new("out_if", DataType::UInt32, false),
                Field::new("bytes", DataType::UInt64, false),
                Field::new("packets", DataType::UInt64, false),
                Field::new("flows", DataType::UInt64, false),
                Field::new("sampling_rate", DataType::UInt32, false),
                Field::new("flow_start", ts_ns(), false),
            ]))
        })
        .clone()
}

/// Schema of decoded probe results: site by id, times in seconds, loss as a ratio (0–1).
pub fn probe_schema() -> SchemaRef {
    static SCHEMA: std::sync::OnceLock<SchemaRef> = std::sync::OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("event_time", ts_ns(), false),
                Field::new("site_id", DataType::Utf8, false),
                Field::new("target", DataType::Utf8, false),
                Field::new("rtt_seconds", DataType::Float64, false),
                Field::new("jitter_seconds", DataType::Float64, false),
                Field::new("loss_ratio", DataType::Float64, false),
                Field::new("sent", DataType::Int64, false),
            ]))
        })
        .clone()
}

/// Schema of decoded interface octet counters (one row per metric): cumulative counters as the
/// device reports them, `None` where the metric carries only one direction. `counter_bits` (32
/// or 64) is the counter's width, which tells a wrap from a reset.
pub fn counter_schema() -> SchemaRef {
    static SCHEMA: std::sync::OnceLock<SchemaRef> = std::sync::OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("event_time", ts_ns(), false),
                Field::new("site_id", DataType::Utf8, false),
                Field::new("device", DataType::Utf8, false),
                Field::new("interface", DataType::Utf8, false),
                Field::new("in_octets", DataType::UInt64, true),
                Field::new("out_octets", DataType::UInt64, true),
                Field::new("counter_bits", DataType::UInt8, false),
                Field::new("link_up", DataType::Boolean, true),
                Field::new("speed_bits_per_second", DataType::UInt64, true),
            ]))
        })
        .clone()
}

/// Schema of interface traffic rows (before enrichment): bytes moved through `interface` in
/// `direction` (`in` = received by the interface, RFC 2863 `ifInOctets`) during the `seconds`
/// that end at `event_time`.
pub fn interface_traffic_schema() -> SchemaRef {
    static SCHEMA: std::sync::OnceLock<SchemaRef> = std::sync::OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            Arc::new(Schema::new(vec![
                Field::new("event_time", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
                Field::new("site_id", DataType::Utf8, false),
                Field::new("device", DataType::Utf8, false),
                Field::new("interface", DataType::Utf8, false),
                Field::new("direction", DataType::Utf8, false),
                Field::new("bytes", DataType::UInt64, false),
                Field::new("seconds", DataType::Float64, false),
                // The sample's link state and speed, where the device reports them.
                Field::new("link_up", DataType::Boolean, true),
                Field::new("speed_bits_per_second", DataType::UInt64, true),
            ]))
        })
        .clone()
}

fn dict_type(key: DataType) -> DataType {
    DataType::Dictionary(Box::new(key), Box::new(DataType::Utf8))
}

fn site_label_fields() -> Vec<Field> {
    vec![
        Field::new("site", dict_type(DataType::UInt16), false),
        Field::new("district", dict_type(DataType::UInt16), false),
        Field::new("level", dict_type(DataType::UInt16), false),
    ]
}

/// Schema of enriched flows: site labels, direction, then the decoded columns with `bytes` and
/// `packets` corrected for sampling and `sampling_rate` the rate applied.
pub fn enriched_flow_schema() -> SchemaRef {
    static SCHEMA: std::sync::OnceLock<SchemaRef> = std::sync::OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let mut fields = site_label_fields();
            fields.push(Field::new("direction", dict_type(DataType::UInt8), false));
            fields.extend(flow_schema().fields().iter().map(|f| f.as_ref().clone()));
            Arc::new(Schema::new(fields))
        })
        .clone()
}

/// Schema of enriched probe results: site labels, then the decoded columns without `site_id`.
pub fn enriched_probe_schema() -> SchemaRef {
    static SCHEMA: std::sync::OnceLock<SchemaRef> = std::sync::OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let mut fields = site_label_fields();
            fields.extend(probe_schema().fields().iter().filter(|f| f.name() != "site_id").map(|f| f.as_ref().clone()));
            Arc::new(Schema::new(fields))
        })
        .clone()
}

/// Schema of enriched interface traffic: site labels, then the rows of
/// [`interface_traffic_schema`] without `site_id`.
pub fn enriched_interface_schema() -> SchemaRef {
    static SCHEMA: std::sync::OnceLock<SchemaRef> = std::sync::OnceLock::new();
    SCHEMA
        .get_or_init(|| {
            let mut fields = site_label_fields();
            fields.extend(interface_traffic_schema().fields().iter().filter(|f| f.name() != "site_id").map(|f| f.as_ref().clone()));
            Arc::new(Schema::new(fields))
        })
        .clone()
}
