//! What the printing commands show a person: `sql` headers on an empty result, `sql --help`'s
//! tables, `--data` whatever SITEFLOW_SQL_URL says, and a closed stdout ending any of them quietly.

use std::path::Path;
use std::process::{Output, Stdio};

use crate::support::{repo, run_siteflow, siteflow};

/// A Parquet history made by replaying the golden flow and probe files (no server needed).
fn replayed_history(dir: &Path) {
    for format in ["goflow2_json", "siteflow_probe_json"] {
        let input = format!("tests/golden/{format}.jsonl");
        let history = dir.to_str().unwrap();
        let out = run_siteflow(&["replay", "--history-dir", history, "--format", format, &input], &[]);
        assert!(out.status.success(), "replay {format}: {}", String::from_utf8_lossy(&out.stderr));
    }
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn an_empty_result_shows_its_columns_and_data_wins_over_the_server_url() {
    let dir = tempfile::tempdir().unwrap();
    replayed_history(dir.path());
    let data = dir.path().to_str().unwrap();
    let empty = "SELECT site, direction, bytes FROM site_windows WHERE bytes < 0";
    // A dead server in the environment, as a shell profile might export it: --data is asked.
    let env = [("SITEFLOW_SQL_URL", "http://127.0.0.1:9"), ("SITEFLOW_SQL_TOKEN", "secret")];
    let out = run_siteflow(&["sql", "--data", data, empty], &env);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "--data with SITEFLOW_SQL_URL set: {stderr}");
    let header = stdout.lines().find(|l| l.contains("site")).unwrap_or_else(|| panic!("no header line:\n{stdout}"));
    for column in ["site", "direction", "bytes"] {
        assert!(header.contains(column), "header {header:?} lacks {column}");
    }
    assert!(stdout.trim_end().ends_with("(0 rows)"), "{stdout}");
    let out = run_siteflow(&["sql", "--data", data, "--format", "csv", empty], &env);
    assert_eq!(text(&out).0.trim_end(), "site,direction,bytes");

    // Given on the command line, both at once are a usage error that names them.
    let out = run_siteflow(&["sql", "--data", data, "--url", "http://127.0.0.1:9", empty], &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--data") && stderr.contains("--url"), "{stderr}");
    // Without --data the variable is still the server to ask.
    let out = run_siteflow(&["sql", "SELECT 1"], &env);
    let (_, stderr) = text(&out);
    assert!(!out.status.success() && stderr.contains("127.0.0.1:9"), "asks SITEFLOW_SQL_URL: {stderr}");
}

#[test]
fn sql_help_lists_every_table_with_columns_that_exist() {
    // Every table the SQL guide documents is in the help.
    let guide = std::fs::read_to_string(repo().join("docs/sql.md")).unwrap();
    let tables: Vec<String> = guide
        .lines()
        .skip_while(|l| !l.starts_with("| table |"))
        .skip(2)
        .take_while(|l| l.starts_with("| `"))
        .map(|l| l.split('`').nth(1).unwrap().to_string())
        .collect();
    assert!(tables.len() >= 7, "{tables:?}");
    let out = run_siteflow(&["sql", "--help"], &[]);
    let (help, _) = text(&out);
    let listed = |table: &str| help.lines().find(|l| l.starts_with(&format!("  {table} "))).map(str::to_string);
    for table in &tables {
        assert!(listed(table).is_some(), "sql --help does not list {table}:\n{help}");
    }

    // The columns it gives are the tables' own: select them from a history.
    let dir = tempfile::tempdir().unwrap();
    replayed_history(dir.path());
    let mut checked = Vec::new();
    for table in &tables {
        if !(table == "sites" || dir.path().join(table).is_dir()) {
            continue;
        }
        // A table's columns run over continuation lines (indented, no table name).
        let mut lines = help.lines().skip_while(|l| !l.starts_with(&format!("  {table} ")));
        let mut columns = lines.next().unwrap().trim_start().strip_prefix(table.as_str()).unwrap().to_string();
        for more in lines.take_while(|l| l.starts_with("                   ")) {
            columns.push_str(more);
        }
        let columns: Vec<&str> = columns
            .split(',')
            .map(str::trim)
            .filter(|c| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_'))
            .collect();
        let query = format!("SELECT {} FROM {table} LIMIT 0", columns.join(", "));
        let out = run_siteflow(&["sql", "--data", dir.path().to_str().unwrap(), &query], &[]);
        assert!(out.status.success(), "{query}: {}", text(&out).1);
        checked.push(table.clone());
    }
    assert!(checked.len() >= 5, "only {checked:?} were checked against a history");
}

#[cfg(unix)]
#[test]
fn a_closed_stdout_ends_every_printing_command_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    replayed_history(dir.path());
    let data = dir.path().to_str().unwrap();
    let commands: [&[&str]; 5] = [
        &["version"],
        &["check", "--config", "deploy/siteflow.example.yaml"],
        &["sql", "--help"],
        &["sql", "--data", data, "SELECT * FROM site_windows"],
        &["replay", "--format", "goflow2_json", "tests/golden/goflow2_json.jsonl"],
    ];
    for args in commands {
        // The reader is gone before the command writes its first byte (`… | head -0`).
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = siteflow().args(args).current_dir(repo()).stdout(Stdio::from(writer)).stderr(Stdio::piped()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let quiet = out.status.success() || out.status.signal() == Some(libc::SIGPIPE);
        assert!(quiet && !stderr.contains("panicked") && !stderr.contains("Broken pipe"), "siteflow {args:?}: {:?}\n{stderr}", out.status);
    }
}
