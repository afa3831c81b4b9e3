//! The pipeline's own health metrics, in one explicit registry shared with the sinks, grouped
//! by the component that updates them: records (decode, enrich), windows, Kafka, checkpoints,
//! dead letters. (Readiness and SQL render their own at scrape time: `sink::readiness`, `sql`.)

use std::sync::Mutex;

use prometheus::{Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

use crate::decode::{DecodeStats, RejectReason};
use crate::table::TableDef;

use crate::types::Format;

/// Counters and gauges about records and windows, not about sites.
pub struct PipelineMetrics {
    pub registry: Registry,
    pub records_received: IntCounterVec,
    pub message_bytes_received: IntCounterVec,
    pub records_decoded: IntCounterVec,
    pub records_rejected: IntCounterVec,
    pub records_unmatched: IntCounterVec,
    pub records_late: IntCounterVec,
    pub flows_missing_sampling_rate: IntCounter,
    pub records_skipped: IntCounterVec,
    pub records_skipped_bytes: IntCounterVec,
    pub flows_event_time_fallback: IntCounterVec,
    pub flows_spread_rows: IntCounter,
    pub flows_spread_clamped: IntCounter,
    pub flows_direction_defaulted: IntCounter,
    pub interface_counter_samples: IntCounterVec,
    pub windows: WindowMetrics,
    pub kafka: KafkaMetrics,
    pub checkpoints: CheckpointMetrics,
    pub dead_letters: DeadLetterMetrics,
}

/// The window stage: watermark, windows closed, corrected and kept, close latency.
pub struct WindowMetrics {
    pub watermark_timestamp: Gauge,
    pub watermark_lag: Gauge,
    pub closed: IntCounterVec,
    /// Published windows corrected by records that were on time for their own exporter.
    pub corrected: IntCounterVec,
    /// Published windows kept for corrections.
    pub correctable: IntGauge,
    pub open: IntGauge,
    pub close_latency: Histogram,
    /// The same latency at full resolution, for exact p50/p99 in logs and benchmarks (µs).
    pub close_latency_exact: Mutex<hdrhistogram::Histogram<u64>>,
    pub late_contributions: IntCounter,
}

/// The Kafka consumer and its driver.
pub struct KafkaMetrics {
    pub consumer_lag: IntGaugeVec,
    pub paused: IntGauge,
    pub pauses: IntCounter,
    pub queued_batches: IntGauge,
    pub rebalances: IntCounterVec,
    pub replayed_skipped: IntCounter,
    pub offset_gaps: IntCounter,
    /// 1 while the consumer has a connection to a broker; registered by the Kafka source only
    /// (see [`PipelineMetrics::register_kafka_broker_up`]), so other sources export no false 0.
    pub broker_up: IntGauge,
}

/// Checkpoints written by the Kafka driver.
pub struct CheckpointMetrics {
    /// By outcome (`ok`, `failed`).
    pub written: IntCounterVec,
    pub duration: Histogram,
    pub last_success: Gauge,
}

/// The dead-letter topic's producer.
pub struct DeadLetterMetrics {
    pub records: IntCounterVec,
    pub errors: IntCounter,
}

fn register<M: prometheus::core::Collector + Clone + 'static>(registry: &Registry, m: M) -> M {
    registry.register(Box::new(m.clone())).expect("registered once");
    m
}

/// A counter's total over all its label sets.
fn sum(c: &IntCounterVec) -> u64 {
    use prometheus::core::Collector;
    c.collect().iter().flat_map(|f| f.get_metric()).map(|m| m.get_counter().get_value() as u64).sum()
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry.register(Box::new(c.clone())).expect("registered once");
    c
}

impl PipelineMetrics {
    /// Creates the metrics in a new registry, with every known label combination at zero.
    pub fn new(formats: &[Format], tables: &[&TableDef]) -> Self {
        let registry = Registry::new();
        let r = &registry;
        let records_received =
            counter_vec(r, "siteflow_records_received_total", "Records read from the sources, before decoding.", &["format"]);
        let message_bytes_received =
            counter_vec(r, "siteflow_message_bytes_received_total", "Bytes of messages read from the sources.", &["format"]);
        let records_decoded = counter_vec(r, "siteflow_records_decoded_total", "Records decoded successfully.", &["format"]);
        let records_rejected = counter_vec(
            r,
            "siteflow_records_rejected_total",
            "Records skipped because they could not be decoded, by reason.",
            &["format", "reason"],
        );
        let records_unmatched = counter_vec(
            r,
            "siteflow_records_unmatched_total",
            "Decoded records that belong to no site of the inventory (counted, not aggregated).",
            &["table"],
        );
        let records_late = counter_vec(
            r,
            "siteflow_records_late_total",
            "Records that arrived after their window had closed (counted, not aggregated).",
            &["table"],
        );
        let records_skipped = counter_vec(
            r,
            "siteflow_records_skipped_total",
            "Flow records decoded but counted toward no site, by reason: no_traffic (no bytes nor packets: NAT/firewall events, options records), not_ip (no addresses, from an exporter of no site). Not rejections.",
            &["format", "reason"],
        );
        let records_skipped_bytes = counter_vec(
            r,
            "siteflow_records_skipped_bytes_total",
            "Bytes (corrected for sampling) of the flow records in siteflow_records_skipped_total{reason=\"not_ip\"}.",
            &["format", "reason"],
        );
        let flows_event_time_fallback = counter_vec(
            r,
            "siteflow_flows_event_time_fallback_total",
            "Flow records without the time their source's event_time asks for (or, for spread, a believable start), placed by another of their times.",
            &["format"],
        );
        let flows_spread_rows = register(
            r,
            IntCounter::new("siteflow_flows_spread_rows_total", "Rows added by event_time: spread (a flow over three windows adds two).")
                .expect("valid metric"),
        );
        let flows_spread_clamped = register(
            r,
            IntCounter::new(
                "siteflow_flows_spread_clamped_total",
                "Flows whose start was after their end or more than decode.max_spread_windows windows before it: spread over the last windows only.",
            )
            .expect("valid metric"),
        );
        let flows_direction_defaulted = register(
            r,
            IntCounter::new(
                "siteflow_flows_direction_defaulted_total",
                "Flows of a site's router whose direction neither the site's prefixes nor its uplink_ifindex tell; counted into the site (direction in).",
            )
            .expect("valid metric"),
        );
        let windows_closed = counter_vec(r, "siteflow_windows_closed_total", "Windows closed and published to the sinks.", &["table"]);
        let windows_corrected = counter_vec(
            r,
            "siteflow_windows_corrected_total",
            "Published windows corrected by records on time for their own exporter that arrived after publication (a lagging exporter, records beyond the publish delay).",
            &["table"],
        );
        let windows_correctable = register(
            r,
            IntGauge::new(
                "siteflow_windows_correctable",
                "Published windows kept in memory for corrections (window.correction_horizon_secs).",
            )
            .expect("valid metric"),
        );
        let flows_missing_sampling_rate = IntCounter::new(
            "siteflow_flows_missing_sampling_rate_total",
            "Flow records that carried no sampling rate; scaled by sampling.default_rate.",
        )
        .expect("valid metric");
        let watermark_timestamp =
            Gauge::new("siteflow_watermark_timestamp_seconds", "Event-time watermark of the pipeline (Unix seconds).")
                .expect("valid metric");
        let watermark_lag =
            Gauge::new("siteflow_watermark_lag_seconds", "How far the watermark trails the wall clock.").expect("valid metric");
        let windows_open =
            IntGauge::new("siteflow_windows_open", "Windows holding state, waiting for the watermark.").expect("valid metric");
        let window_close_latency = Histogram::with_opts(
            HistogramOpts::new(
                "siteflow_window_close_latency_seconds",
                "From the arrival of the batch that moved the watermark past a window's end to the window's results being visible.",
            )
            .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]),
        )
        .expect("valid metric");
        for m in [&watermark_timestamp, &watermark_lag] {
            r.register(Box::new(m.clone())).expect("registered once");
        }
        r.register(Box::new(flows_missing_sampling_rate.clone())).expect("registered once");
        r.register(Box::new(windows_open.clone())).expect("registered once");
        r.register(Box::new(window_close_latency.clone())).expect("registered once");
        let window_late_contributions = register(r, IntCounter::new(
            "siteflow_window_late_contributions_total",
            "Partition states that closed after their window left the correction horizon (a partition restored far behind the others); they reach the results logs, not /metrics or SQL.",
        ).expect("valid metric"));
        let kafka_consumer_lag = register(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "siteflow_kafka_consumer_lag",
                    "Messages between the partition's end and this consumer's position (from librdkafka statistics).",
                ),
                &["topic", "partition"],
            )
            .expect("valid metric"),
        );
        let kafka_paused = register(
            r,
            IntGauge::new(
                "siteflow_kafka_backpressure_paused",
                "1 while the consumer has paused its partitions because the pipeline is behind (bounded queue full).",
            )
            .expect("valid metric"),
        );
        let kafka_pauses = register(
            r,
            IntCounter::new(
                "siteflow_kafka_backpressure_pauses_total",
                "Times the consumer paused its partitions because the pipeline was behind.",
            )
            .expect("valid metric"),
        );
        let kafka_queued_batches = register(
            r,
            IntGauge::new(
                "siteflow_kafka_queued_batches",
                "Micro-batches read from Kafka and waiting for the pipeline (bounded by kafka.max_queued_batches).",
            )
            .expect("valid metric"),
        );
        let kafka_rebalances =
            counter_vec(r, "siteflow_kafka_rebalances_total", "Partitions assigned to or revoked from this instance.", &["kind"]);
        let kafka_replayed_skipped = register(
            r,
            IntCounter::new(
                "siteflow_kafka_replayed_skipped_total",
                "Messages delivered again below a partition's checkpointed offset, skipped (they are already counted).",
            )
            .expect("valid metric"),
        );
        let kafka_offset_gaps = register(
            r,
            IntCounter::new(
                "siteflow_kafka_offset_gaps_total",
                "Batches whose first offset was past the partition's next expected one (expected after compaction or transactions only).",
            )
            .expect("valid metric"),
        );
        let kafka_broker_up = IntGauge::new(
            "siteflow_kafka_broker_up",
            "1 while the Kafka consumer has a connection to at least one broker of kafka.brokers, 0 while it cannot reach any.",
        )
        .expect("valid metric");
        let build_info = register(
            r,
            IntGaugeVec::new(
                Opts::new("siteflow_build_info", "Always 1; the labels say which siteflow build is running."),
                &["version", "commit", "rustc", "target"],
            )
            .expect("valid metric"),
        );
        let b = &crate::build_info::BUILD;
        build_info.with_label_values(&[b.version, b.commit, b.rustc, b.target]).set(1);
        let interface_counter_samples = counter_vec(
            r,
            "siteflow_interface_counter_samples_total",
            "Interface octet counter samples by outcome: delta (an increase), wrap (past the counter's width), reset (restarted from zero), baseline (first sample of a counter), stale (not newer than the previous sample; skipped).",
            &["outcome"],
        );
        for outcome in ["delta", "wrap", "reset", "baseline", "stale"] {
            interface_counter_samples.with_label_values(&[outcome]);
        }
        let checkpoints = counter_vec(r, "siteflow_checkpoints_total", "Checkpoints written, by outcome.", &["outcome"]);
        let checkpoint_duration = register(
            r,
            Histogram::with_opts(
                HistogramOpts::new("siteflow_checkpoint_duration_seconds", "Time to write the checkpoints of all owned partitions.")
                    .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            )
            .expect("valid metric"),
        );
        let checkpoint_last_success = register(
            r,
            Gauge::new("siteflow_checkpoint_last_success_timestamp_seconds", "When the last checkpoint was written (Unix seconds).")
                .expect("valid metric"),
        );
        let dead_letter_records = counter_vec(
            r,
            "siteflow_dead_letter_records_total",
            "Rejected records produced to the dead-letter topic, by reason.",
            &["reason"],
        );
        let dead_letter_errors = register(
            r,
            IntCounter::new(
                "siteflow_dead_letter_errors_total",
                "Rejected records that could not be produced to the dead-letter topic (they are still counted as rejected).",
            )
            .expect("valid metric"),
        );
        for kind in ["assigned", "revoked"] {
            kafka_rebalances.with_label_values(&[kind]);
        }
        for outcome in ["ok", "failed"] {
            checkpoints.with_label_values(&[outcome]);
        }
        for reason in RejectReason::ALL {
            dead_letter_records.with_label_values(&[reason.as_str()]);
        }
        #[cfg(target_os = "linux")]
        r.register(Box::new(prometheus::process_collector::ProcessCollector::for_self())).expect("registered once");

        for format in formats {
            let f = format.as_str();
            records_received.with_label_values(&[f]);
            message_bytes_received.with_label_values(&[f]);
            records_decoded.with_label_values(&[f]);
            for reason in RejectReason::ALL {
                records_rejected.with_label_values(&[f, reason.as_str()]);
            }
            if format.is_flows() {
                for reason in ["no_traffic", "not_ip"] {
                    records_skipped.with_label_values(&[f, reason]);
                }
                records_skipped_bytes.with_label_values(&[f, "not_ip"]);
                flows_event_time_fallback.with_label_values(&[f]);
            }
        }
        for t in tables.iter().map(|t| t.name) {
            records_unmatched.with_label_values(&[t]);
            records_late.with_label_values(&[t]);
            windows_closed.with_label_values(&[t]);
            windows_corrected.with_label_values(&[t]);
        }
        Self {
            registry,
            records_received,
            message_bytes_received,
            records_decoded,
            records_rejected,
            records_unmatched,
            records_late,
            flows_missing_sampling_rate,
            records_skipped,
            records_skipped_bytes,
            flows_event_time_fallback,
            flows_spread_rows,
            flows_spread_clamped,
            flows_direction_defaulted,
            interface_counter_samples,
            windows: WindowMetrics {
                watermark_timestamp,
                watermark_lag,
                closed: windows_closed,
                corrected: windows_corrected,
                correctable: windows_correctable,
                open: windows_open,
                close_latency: window_close_latency,
                close_latency_exact: Mutex::new(hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")),
                late_contributions: window_late_contributions,
            },
            kafka: KafkaMetrics {
                consumer_lag: kafka_consumer_lag,
                paused: kafka_paused,
                pauses: kafka_pauses,
                queued_batches: kafka_queued_batches,
                rebalances: kafka_rebalances,
                replayed_skipped: kafka_replayed_skipped,
                offset_gaps: kafka_offset_gaps,
                broker_up: kafka_broker_up,
            },
            checkpoints: CheckpointMetrics { written: checkpoints, duration: checkpoint_duration, last_success: checkpoint_last_success },
            dead_letters: DeadLetterMetrics { records: dead_letter_records, errors: dead_letter_errors },
        }
    }

    /// Exports `siteflow_kafka_broker_up` (at 0 until the consumer reaches a broker). Once per
    /// registry: only the Kafka source calls it.
    pub fn register_kafka_broker_up(&self) {
        if let Err(e) = self.registry.register(Box::new(self.kafka.broker_up.clone())) {
            tracing::debug!("siteflow_kafka_broker_up already registered: {e}");
        }
    }

    /// Exports `siteflow_scale_out_partials_total` and `siteflow_scale_out_owned_partitions`
    /// (the site stage of a scale-out only).
    pub fn register_site_stage(&self) -> (IntCounterVec, IntGauge) {
        let counter = IntCounterVec::new(
            prometheus::Opts::new(
                "siteflow_scale_out_partials_total",
                "Messages of the internal topic read by the site stage, by outcome: merged, duplicate (a replay, dropped), overlap (cannot be merged exactly, dropped), malformed (skipped).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let counter = register(&self.registry, counter);
        for outcome in ["merged", "duplicate", "overlap", "malformed"] {
            counter.with_label_values(&[outcome]);
        }
        let owned = IntGauge::new(
            "siteflow_scale_out_owned_partitions",
            "Partitions of the internal topic this site-stage instance owns (its sites are judged and exported here only).",
        )
        .expect("valid metric");
        (counter, register(&self.registry, owned))
    }

    /// Exports `siteflow_scale_out_windows_written_total` and
    /// `siteflow_scale_out_windows_read_total` (the site stage of a scale-out only).
    pub fn register_windows_topic(&self) -> (prometheus::IntCounter, IntCounterVec) {
        let written = prometheus::IntCounter::new(
            "siteflow_scale_out_windows_written_total",
            "Messages this site-stage instance wrote to the windows topic (its sites' windows and verdicts, for the other instances' SQL).",
        )
        .expect("valid metric");
        let read = IntCounterVec::new(
            prometheus::Opts::new(
                "siteflow_scale_out_windows_read_total",
                "Messages of the windows topic read, by outcome: applied (another instance's sites filed into this instance's SQL tables), own (written here, already filed), rejected (skipped; the log says why).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let read = register(&self.registry, read);
        for outcome in ["applied", "own", "rejected"] {
            read.with_label_values(&[outcome]);
        }
        (register(&self.registry, written), read)
    }

    /// Exports `siteflow_meetings_topic_rejected_total` (with `kafka.meetings_topic` only).
    pub fn register_meetings_topic_rejected(&self) -> prometheus::IntCounter {
        let counter = prometheus::IntCounter::new(
            "siteflow_meetings_topic_rejected_total",
            "Records of the meetings topic skipped (not a meeting, unknown sites, a schedule file's id, over api.max_meetings); the log says why.",
        )
        .expect("valid metric");
        register(&self.registry, counter)
    }

    /// Records rejected, decoded records unmatched to a site, and records too late for their
    /// window, each over all its labels: what the shutdown summary and status line report.
    pub fn lost_records(&self) -> (u64, u64, u64) {
        (sum(&self.records_rejected), sum(&self.records_unmatched), sum(&self.records_late))
    }

    /// Messages behind the partitions' ends over every owned partition (librdkafka statistics).
    pub fn kafka_lag_total(&self) -> i64 {
        use prometheus::core::Collector;
        self.kafka.consumer_lag.collect().iter().flat_map(|f| f.get_metric()).map(|m| m.get_gauge().get_value() as i64).sum()
    }

    /// Records the outcome of decoding one batch.
    pub fn record_decode(&self, format: Format, message_bytes: usize, stats: &DecodeStats) {
        let f = format.as_str();
        self.records_received.with_label_values(&[f]).inc_by(stats.records);
        self.message_bytes_received.with_label_values(&[f]).inc_by(message_bytes as u64);
        self.records_decoded.with_label_values(&[f]).inc_by(stats.decoded);
        for (reason, n) in &stats.rejected {
            self.records_rejected.with_label_values(&[f, reason.as_str()]).inc_by(*n);
        }
        self.flows_missing_sampling_rate.inc_by(stats.missing_sampling_rate);
        if stats.no_traffic > 0 {
            self.records_skipped.with_label_values(&[f, "no_traffic"]).inc_by(stats.no_traffic);
        }
        if stats.event_time_fallback > 0 {
            self.flows_event_time_fallback.with_label_values(&[f]).inc_by(stats.event_time_fallback);
        }
    }

    /// Records what enrichment left out or had to guess, for one table's rows of one batch.
    pub fn record_enrich(&self, format: Format, table: &str, stats: &crate::enrich::EnrichStats) {
        self.records_unmatched.with_label_values(&[table]).inc_by(stats.unmatched);
        if stats.not_ip > 0 {
            self.records_skipped.with_label_values(&[format.as_str(), "not_ip"]).inc_by(stats.not_ip);
            self.records_skipped_bytes.with_label_values(&[format.as_str(), "not_ip"]).inc_by(stats.not_ip_bytes);
        }
        self.flows_direction_defaulted.inc_by(stats.direction_defaulted);
    }

    /// Records what spreading flows over windows did to one batch.
    pub fn record_spread(&self, stats: &crate::event_time::SpreadStats) {
        self.flows_spread_rows.inc_by(stats.extra_rows);
        self.flows_spread_clamped.inc_by(stats.clamped);
    }

    /// Records what happened to interface counter samples.
    pub fn record_counters(&self, stats: &crate::rates::CounterStats) {
        for (outcome, n) in
            [("delta", stats.deltas), ("wrap", stats.wraps), ("reset", stats.resets), ("baseline", stats.baselines), ("stale", stats.stale)]
        {
            self.interface_counter_samples.with_label_values(&[outcome]).inc_by(n);
        }
    }

    /// Records a window close latency.
    pub fn record_close_latency(&self, latency: std::time::Duration) {
        self.windows.close_latency.observe(latency.as_secs_f64());
        let micros = (latency.as_micros() as u64).clamp(1, 600_000_000);
        self.windows.close_latency_exact.lock().expect("latency lock").saturating_record(micros);
    }

    /// p50 and p99 of the window close latency so far, in seconds.
    pub fn close_latency_quantiles(&self) -> Option<(f64, f64)> {
        let h = self.windows.close_latency_exact.lock().expect("latency lock");
        (!h.is_empty()).then(|| (h.value_at_quantile(0.5) as f64 / 1e6, h.value_at_quantile(0.99) as f64 / 1e6))
    }
}
