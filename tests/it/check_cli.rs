//! `siteflow check` accepts the shipped configuration and rejects broken ones with a message
//! that names the file and the problem.

use crate::support::{repo, run_siteflow, write};

fn check(config: &std::path::Path, env: &[(&str, &str)]) -> (bool, String, String) {
    let out = run_siteflow(&["check", "--config", config.to_str().unwrap()], env);
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

fn assert_rejected(config: &std::path::Path, env: &[(&str, &str)], needles: &[&str]) {
    let (ok, _, err) = check(config, env);
    assert!(!ok, "expected a failure for {}", config.display());
    for n in needles {
        assert!(err.contains(n), "stderr should mention {n:?}:\n{err}");
    }
}

#[test]
fn the_shipped_configuration_passes() {
    let (ok, out, err) = check(&repo().join("deploy/siteflow.example.yaml"), &[]);
    assert!(ok, "{err}");
    assert!(out.contains("inventory: 242 sites"), "{out}");
}

/// Asking for more top talkers than the SQL's heavy_hitters keeps is allowed but warned about,
/// naming both figures and the SQL file; within the capacity there is no warning.
#[test]
fn more_top_talkers_than_the_sql_keeps_is_warned_about() {
    let dir = tempfile::tempdir().unwrap();
    let sql = std::fs::read_to_string(repo().join("pipelines/hagiang/top_talkers.sql")).unwrap();
    assert!(sql.contains("heavy_hitters(100,"), "the shipped SQL keeps 100");
    write(dir.path(), "talkers.sql", &sql.replace("heavy_hitters(100,", "heavy_hitters(20,"));
    let f = write(dir.path(), "c.yaml", "pipeline:\n  top_talkers_sql: talkers.sql\nsql:\n  top_talkers: 25\n");
    let (ok, out, err) = check(&f, &[]);
    assert!(ok, "{err}");
    let warning = out.lines().find(|l| l.contains("warning:")).unwrap_or_else(|| panic!("no warning:\n{out}"));
    for needle in ["sql.top_talkers is 25", "talkers.sql", "at most 20 conversations", "at least 25"] {
        assert!(warning.contains(needle), "{needle:?} missing from {warning}");
    }
    let f = write(dir.path(), "c.yaml", "pipeline:\n  top_talkers_sql: talkers.sql\nsql:\n  top_talkers: 20\n");
    let (ok, out, err) = check(&f, &[]);
    assert!(ok && !out.contains("warning:"), "{out}{err}");
}

#[test]
fn broken_yaml_names_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "broken.yaml", "window:\n  size_secs: 10\n   lateness: [oops\n");
    assert_rejected(&f, &[], &["broken.yaml", "invalid YAML", "line 3"]);
}

#[test]
fn unknown_key_names_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "typo.yaml", "window:\n  size_sec: 10\n");
    assert_rejected(&f, &[], &["typo.yaml", "size_sec"]);
}

#[test]
fn bad_prefix_in_the_inventory_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let csv = std::fs::read_to_string(repo().join("pipelines/hagiang/sites.csv")).unwrap();
    let csv = csv.replace("10.2.21.0/24", "10.2.21.0/33");
    let line = csv.lines().position(|l| l.contains("10.2.21.0/33")).unwrap() + 1;
    write(dir.path(), "sites.csv", &csv);
    let f = write(dir.path(), "c.yaml", "inventory:\n  sites_csv: sites.csv\n");
    assert_rejected(&f, &[], &["sites.csv", &format!("line {line}"), "field prefix", "10.2.21.0/33"]);
}

#[test]
fn invalid_pipeline_sql_names_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    write(
        dir.path(),
        "bad.sql",
        "SELECT window_start, site, direction, sum(bytez) AS bytes FROM flows GROUP BY window_start, site, direction",
    );
    let f = write(dir.path(), "c.yaml", "pipeline:\n  flows_sql: bad.sql\n");
    assert_rejected(&f, &[], &["bad.sql", "bytez"]);

    write(dir.path(), "nowindow.sql", "SELECT site, direction, sum(bytes) AS bytes FROM flows GROUP BY site, direction");
    let f = write(dir.path(), "c2.yaml", "pipeline:\n  flows_sql: nowindow.sql\n");
    assert_rejected(&f, &[], &["nowindow.sql", "GROUP BY window_start"]);

    write(dir.path(), "ddl.sql", "CREATE TABLE x AS SELECT 1");
    let f = write(dir.path(), "c3.yaml", "pipeline:\n  flows_sql: ddl.sql\n");
    assert_rejected(&f, &[], &["ddl.sql"]);
}

#[test]
fn environment_overrides_every_field() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "c.yaml", "window:\n  size_secs: 10\n");
    let (ok, out, err) = check(&f, &[("SITEFLOW_HTTP__LISTEN", "127.0.0.1:9900"), ("SITEFLOW_WINDOW__SIZE_SECS", "60")]);
    assert!(ok, "{err}");
    assert!(out.contains("http: 127.0.0.1:9900") && out.contains("windows: 60 s"), "{out}");
    assert_rejected(&f, &[("SITEFLOW_WINDOW__SIZE_SECS", "0")], &["window.size_secs", "at least 1"]);
    assert_rejected(&f, &[("SITEFLOW_WINDOW__SIZE_SECZ", "5")], &["size_secz"]);
    // The `siteflow sql` client's variables are not configuration keys.
    let (ok, _, err) = check(&f, &[("SITEFLOW_SQL_URL", "http://127.0.0.1:9898"), ("SITEFLOW_SQL_TOKEN", "t")]);
    assert!(ok, "{err}");
}

#[test]
fn missing_file_is_named() {
    assert_rejected(std::path::Path::new("/nonexistent/siteflow.yaml"), &[], &["/nonexistent/siteflow.yaml", "no such file"]);
}

#[test]
fn kafka_configurations_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let no_topics = write(dir.path(), "no-topics.yaml", "source: { kind: kafka }\ncheckpoint: { dir: ckpt }\n");
    assert_rejected(&no_topics, &[], &["no-topics.yaml", "kafka.topics"]);
    let topics = "source: { kind: kafka }\nkafka:\n  topics: [ { name: flows, format: goflow2_protobuf } ]\n";
    let no_dir = write(dir.path(), "no-dir.yaml", topics);
    assert_rejected(&no_dir, &[], &["no-dir.yaml", "checkpoint.dir"]);
    let bad_format = write(dir.path(), "bad-format.yaml", &topics.replace("goflow2_protobuf", "netflow9"));
    assert_rejected(&bad_format, &[], &["netflow9", "goflow2_json"]);
    let commit = write(
        dir.path(),
        "commit.yaml",
        &format!("{topics}  properties: {{ enable.auto.commit: \"true\" }}\ncheckpoint: {{ dir: ckpt }}\n"),
    );
    assert_rejected(&commit, &[], &["kafka.properties", "enable.auto.commit"]);
    let good = write(dir.path(), "good.yaml", &format!("{topics}checkpoint: {{ dir: ckpt }}\n"));
    let (ok, out, err) = check(&good, &[]);
    assert!(ok, "{err}");
    assert!(out.contains("flows (goflow2_protobuf)") && out.contains("checkpoints:"), "{out}");
}

/// librdkafka properties have dots in their names: the environment sets them with `_` for `.`,
/// and secrets come from files (`_FILE`), as mounted by Kubernetes or compose. `check` names
/// the properties set and never prints their values.
#[test]
fn kafka_properties_and_secrets_come_from_the_environment_and_files() {
    let dir = tempfile::tempdir().unwrap();
    let topics = "source: { kind: kafka }\nkafka:\n  topics: [ { name: flows, format: goflow2_json } ]\ncheckpoint: { dir: ckpt }\n";
    let config = write(dir.path(), "kafka.yaml", topics);
    let secret = write(dir.path(), "password", "hunter2-0123\n");
    let env = [
        ("SITEFLOW_KAFKA__PROPERTIES__SECURITY_PROTOCOL", "SASL_PLAINTEXT"),
        ("SITEFLOW_KAFKA__PROPERTIES__SASL_PASSWORD_FILE", secret.to_str().unwrap()),
    ];
    let (ok, out, err) = check(&config, &env);
    assert!(ok, "{err}");
    assert!(out.contains("kafka properties: sasl.password, security.protocol"), "{out}");
    assert!(!out.contains("hunter2") && !err.contains("hunter2"), "a secret was printed:\n{out}\n{err}");
    // A secret file that cannot be read is named; so is a variable set twice.
    assert_rejected(
        &config,
        &[("SITEFLOW_KAFKA__PROPERTIES__SASL_PASSWORD_FILE", "/nonexistent/pw")],
        &["SITEFLOW_KAFKA__PROPERTIES__SASL_PASSWORD_FILE: /nonexistent/pw: cannot read the secret"],
    );
    assert_rejected(
        &config,
        &[("SITEFLOW_API__TOKEN", "x"), ("SITEFLOW_API__TOKEN_FILE", secret.to_str().unwrap())],
        &["SITEFLOW_API__TOKEN and SITEFLOW_API__TOKEN_FILE are both set"],
    );
}

#[test]
fn version_names_the_build_and_the_metric_carries_it() {
    let out = crate::support::run_siteflow(&["version", "--json"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let head =
        std::process::Command::new("git").args(["rev-parse", "--short=12", "HEAD"]).current_dir(crate::support::repo()).output().unwrap();
    let head = String::from_utf8_lossy(&head.stdout).trim().to_string();
    assert_eq!(v["commit"], head.as_str(), "the commit the binary was built from");
    assert!(v["rustc"].as_str().unwrap().starts_with("rustc "), "{v}");
    let text = crate::support::run_siteflow(&["version"], &[]);
    assert!(String::from_utf8_lossy(&text.stdout).starts_with(&format!("siteflow {} (commit {head}", env!("CARGO_PKG_VERSION"))));
    // The same facts as a metric.
    let metrics = siteflow::metrics::PipelineMetrics::new(&siteflow::pipeline::Pipeline::FORMATS, &siteflow::table::TABLES);
    let family = metrics.registry.gather().into_iter().find(|f| f.name() == "siteflow_build_info").expect("siteflow_build_info");
    let labels: std::collections::BTreeMap<String, String> =
        family.get_metric()[0].get_label().iter().map(|l| (l.name().to_string(), l.value().to_string())).collect();
    assert_eq!(labels["commit"], head);
    assert_eq!(family.get_metric()[0].get_gauge().get_value(), 1.0);
}

/// A policy whose clear level no healthy site can reach is refused, naming the row: the MOS row
/// without explicit clear levels (4.0 × 1.1 = 4.4, above a healthy commune's MOS), and a loss
/// ratio clear level beyond 1.
#[test]
fn a_policy_with_an_unreachable_clear_level_is_refused_naming_the_row() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "mos.yaml", "thresholds:\n  mos_p5: {degraded: 4.0, not_ready: 3.6}\n");
    let f = write(dir.path(), "c.yaml", "readiness:\n  policy: mos.yaml\n");
    assert_rejected(&f, &[], &["mos.yaml", "thresholds.mos_p5: clear_degraded 4.4", "unreachable by a healthy site"]);
    write(dir.path(), "loss.yaml", "levels:\n  commune:\n    loss_max_ratio: {degraded: 0.01, not_ready: 0.05, clear_not_ready: 1.5}\n");
    let f = write(dir.path(), "c2.yaml", "readiness:\n  policy: loss.yaml\n");
    assert_rejected(&f, &[], &["loss.yaml", "levels.commune.loss_max_ratio: clear_not_ready 1.5", "outside the range"]);
    // The shipped policy, written out, passes.
    std::fs::copy(repo().join("pipelines/hagiang/policy.yaml"), dir.path().join("ok.yaml")).unwrap();
    let f = write(dir.path(), "c3.yaml", "readiness:\n  policy: ok.yaml\n");
    let (ok, _, err) = check(&f, &[]);
    assert!(ok, "{err}");
}
