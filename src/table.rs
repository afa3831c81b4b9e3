//! The pipeline's tables: one declaration each says what a table aggregates, which SQL does it,
//! what that SQL must output, where its windows go and what reads them. Every stage asks the
//! declaration instead of matching a table's name, so a new table is one more [`TableDef`] in
//! [`TABLES`] plus its SQL file (CONTRIBUTING.md shows one).

use datafusion::arrow::datatypes::SchemaRef;

use crate::schema::{enriched_flow_schema, enriched_interface_schema, enriched_probe_schema};

/// The enriched rows a table aggregates. Its SQL reads them as the table [`Input::name`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Input {
    /// Flow records, with site, direction and sampling-corrected bytes.
    Flows,
    /// Probe results (latency, jitter, loss), with site.
    Probes,
    /// Interface traffic from octet counters, with site.
    Interfaces,
}

impl Input {
    /// The table name the SQL reads.
    pub fn name(self) -> &'static str {
        match self {
            Input::Flows => "flows",
            Input::Probes => "probes",
            Input::Interfaces => "interfaces",
        }
    }

    /// The schema of the rows.
    pub fn schema(self) -> SchemaRef {
        match self {
            Input::Flows => enriched_flow_schema(),
            Input::Probes => enriched_probe_schema(),
            Input::Interfaces => enriched_interface_schema(),
        }
    }
}

/// How the Prometheus sink shows a table's windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gauges {
    /// One series per site and direction: last-window gauges, running totals, and which sites
    /// are quiet or stale (docs/metrics.md). Its families have fixed names
    /// (`siteflow_site_throughput_bytes_per_second`, `siteflow_site_<column>_total`, …): one
    /// table only may be shown this way.
    SiteDirection,
    /// One series per site: each numeric column `c` is the gauge `<prefix>c` of the last window.
    Site { prefix: &'static str },
    /// One series per output row (several rows per site): each numeric column `c` is the gauge
    /// `<prefix>c`, labelled also with the text columns `labels` where the SQL outputs them.
    Rows { prefix: &'static str, labels: &'static [&'static str] },
    /// Not exported (its windows reach SQL only).
    None,
}

/// What the readiness engine takes from a table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadinessFeed {
    /// Each closed window's rows (site throughput).
    Windows,
    /// Each on-time input record (probe results, judged over the readiness period).
    OnTimeRecords,
    /// Each on-time interface sample's link state (the uplinks' connection status).
    LinkStates,
    /// Nothing.
    None,
}

/// One pipeline table.
#[derive(Debug)]
pub struct TableDef {
    /// Its name in metrics' `table` label, results logs and checkpoints (changing it makes old
    /// checkpoints unreadable).
    pub name: &'static str,
    /// The rows it aggregates.
    pub input: Input,
    /// The built-in SQL and the file it comes from.
    pub embedded_sql: &'static str,
    pub embedded_path: &'static str,
    /// The configuration key under `pipeline:` that replaces the built-in SQL with a file.
    pub config_key: &'static str,
    /// The SQL table that keeps its published windows (history).
    pub sql_table: &'static str,
    /// Columns its SQL must output (sinks label rows with them).
    pub required_columns: &'static [&'static str],
    /// The GROUP BY keys its SQL may use: at most one row per site (and what else is listed)
    /// per window.
    pub allowed_keys: &'static [&'static str],
    /// How `/metrics` shows it.
    pub gauges: Gauges,
    /// What readiness takes from it.
    pub readiness: ReadinessFeed,
    /// A second aggregation of rows another table already counts: its input is not counted
    /// again (records, late records, sites seen).
    pub second_view: bool,
    /// Whether each partition's share of its windows goes to the results logs (Kafka source);
    /// it is checkpointed either way.
    pub results_log: bool,
    /// A top-talker table: fed only while `sql.top_talkers` > 0 (it costs about as much as
    /// decoding), and SQL keeps the `sql.top_talkers` largest rows by bytes per site, direction
    /// and window, ranked in an added `rank` column.
    pub top_talkers: bool,
}

impl PartialEq for TableDef {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for TableDef {}

/// Per site and direction: throughput, packets, flows (`pipelines/hagiang/flows.sql`).
pub static FLOWS: TableDef = TableDef {
    name: "flows",
    input: Input::Flows,
    embedded_sql: include_str!("../pipelines/hagiang/flows.sql"),
    embedded_path: "pipelines/hagiang/flows.sql",
    config_key: "flows_sql",
    sql_table: "site_windows",
    required_columns: &["site", "direction", "bytes"],
    allowed_keys: &["window_start", "site", "district", "level", "direction"],
    gauges: Gauges::SiteDirection,
    readiness: ReadinessFeed::Windows,
    second_view: false,
    results_log: true,
    top_talkers: false,
};

/// Per conversation: the source of SQL table `top_talkers`; aggregates the flows' rows.
pub static CONVERSATIONS: TableDef = TableDef {
    name: "conversations",
    input: Input::Flows,
    embedded_sql: include_str!("../pipelines/hagiang/top_talkers.sql"),
    embedded_path: "pipelines/hagiang/top_talkers.sql",
    config_key: "top_talkers_sql",
    sql_table: "top_talkers",
    required_columns: &["site", "bytes"],
    allowed_keys: &[
        "window_start",
        "site",
        "district",
        "level",
        "direction",
        "src_addr",
        "dst_addr",
        "proto",
        "src_port",
        "dst_port",
        "exporter",
    ],
    gauges: Gauges::None,
    readiness: ReadinessFeed::None,
    second_view: true,
    // Conversations are many: checkpointed, not logged per partition.
    results_log: false,
    top_talkers: true,
};

/// Per site and interface: traffic from octet counters (`pipelines/hagiang/interfaces.sql`).
pub static INTERFACES: TableDef = TableDef {
    name: "interfaces",
    input: Input::Interfaces,
    embedded_sql: include_str!("../pipelines/hagiang/interfaces.sql"),
    embedded_path: "pipelines/hagiang/interfaces.sql",
    config_key: "interfaces_sql",
    sql_table: "interface_windows",
    required_columns: &["site"],
    allowed_keys: &["window_start", "site", "district", "level", "interface", "device", "direction"],
    gauges: Gauges::Rows { prefix: "siteflow_site_interface_", labels: &["interface", "device", "direction"] },
    readiness: ReadinessFeed::LinkStates,
    second_view: false,
    results_log: true,
    top_talkers: false,
};

/// Per site: latency, jitter, loss from probes (`pipelines/hagiang/probes.sql`).
pub static PROBES: TableDef = TableDef {
    name: "probes",
    input: Input::Probes,
    embedded_sql: include_str!("../pipelines/hagiang/probes.sql"),
    embedded_path: "pipelines/hagiang/probes.sql",
    config_key: "probes_sql",
    sql_table: "probe_windows",
    required_columns: &["site"],
    allowed_keys: &["window_start", "site", "district", "level"],
    gauges: Gauges::Site { prefix: "siteflow_site_probe_" },
    readiness: ReadinessFeed::OnTimeRecords,
    second_view: false,
    results_log: true,
    top_talkers: false,
};

/// Every table, in the window operator's order (the checkpoints' layout: append, never reorder).
pub static TABLES: [&TableDef; 4] = [&FLOWS, &CONVERSATIONS, &INTERFACES, &PROBES];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_table_at_most_has_the_site_direction_families() {
        assert!(TABLES.iter().filter(|t| t.gauges == Gauges::SiteDirection).count() <= 1);
    }

    #[test]
    fn names_sql_tables_and_config_keys_are_unique() {
        for (i, a) in TABLES.iter().enumerate() {
            for b in &TABLES[i + 1..] {
                assert_ne!(a.name, b.name);
                assert_ne!(a.sql_table, b.sql_table);
                assert_ne!(a.config_key, b.config_key);
            }
        }
    }

    #[test]
    fn every_table_groups_by_window_and_site_and_reads_its_input() {
        for t in TABLES {
            assert!(t.allowed_keys.contains(&"window_start"), "{}", t.name);
            assert!(t.allowed_keys.contains(&"site"), "{}", t.name);
            assert!(t.embedded_sql.contains(&format!("FROM {}", t.input.name())), "{} reads {}", t.name, t.input.name());
        }
    }
}
