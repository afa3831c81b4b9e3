//! docs/quickstart.md, run as written: every ```sh / ```bash block, in order, in one bash session
//! (`set -euo pipefail`) in a fresh directory, against a fresh Tansu broker that the doc itself
//! starts on a free port. The only substitution: the install block (marked `<!-- not run: … -->`
//! in the doc) is skipped, and instead the siteflow binary this test suite built
//! (`CARGO_BIN_EXE_siteflow`) and the installed tansu are put first on PATH (kcat, promtool and
//! curl from the system). `BROKER` and `LISTEN`, which the doc defaults to 127.0.0.1:9092 and
//! :9898, are set to free ports, and `LIBRDKAFKA_DIR` to `TEST_LIBRDKAFKA_DIR`.
//!
//! The figures the doc's run prints are checked against ground truth computed here from the
//! doc's own sample records and inventory (its heredocs), with the matching rules the doc
//! states: exporter first, then the longest prefix; bytes times the sampling rate.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use crate::kafka_support::tansu;
use crate::support::{free_addr, repo};

/// A fenced block of the doc.
#[derive(Debug)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    lang: String,
    code: String,
    /// The reason given by a `<!-- not run: reason -->` line right before the fence.
    not_run: Option<String>,
}

fn blocks(doc: &str) -> Vec<Block> {
    let lines: Vec<&str> = doc.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let Some(lang) = lines[i].strip_prefix("```") else {
            i += 1;
            continue;
        };
        let lang = lang.split_whitespace().next().unwrap_or("").to_string();
        let previous = lines[..i].iter().rev().find(|l| !l.trim().is_empty()).map(|l| l.trim());
        let not_run = previous.and_then(|l| l.strip_prefix("<!-- not run:")).map(|r| r.trim_end_matches("-->").trim().to_string());
        let start = i;
        i += 1;
        let mut code = Vec::new();
        while i < lines.len() && lines[i] != "```" {
            code.push(lines[i]);
            i += 1;
        }
        assert!(i < lines.len(), "docs/quickstart.md:{}: block never closed", start + 1);
        out.push(Block { line: start + 1, lang, code: code.join("\n"), not_run });
        i += 1;
    }
    out
}

fn is_shell(lang: &str) -> bool {
    matches!(lang, "sh" | "bash")
}

/// The text of the heredoc `cat > NAME <<…` in the doc's shell blocks.
fn heredoc(blocks: &[Block], name: &str) -> String {
    let opening = format!("cat > {name} <<");
    for b in blocks.iter().filter(|b| is_shell(&b.lang)) {
        let mut lines = b.code.lines();
        while let Some(l) = lines.next() {
            if l.starts_with(&opening) {
                return lines.take_while(|l| *l != "EOF").collect::<Vec<_>>().join("\n");
            }
        }
    }
    panic!("docs/quickstart.md has no heredoc writing {name}");
}

/// One site of the doc's inventory, as far as matching goes.
struct Site {
    id: String,
    prefixes: Vec<IpNet>,
    exporter: Option<IpAddr>,
    uplink: Option<u64>,
}

/// Expected (site, direction) → bytes and the number of unmatched records, from the doc's
/// first round of flow records and its sites.csv.
fn ground_truth(blocks: &[Block]) -> (BTreeMap<(String, String), u64>, u64) {
    let csv = heredoc(blocks, "sites.csv");
    let mut rows = csv.lines();
    let header: Vec<&str> = rows.next().unwrap().split(',').collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap_or_else(|| panic!("sites.csv has no {name}"));
    let sites: Vec<Site> = rows
        .map(|r| {
            let f: Vec<&str> = r.split(',').collect();
            Site {
                id: f[col("site_id")].to_string(),
                prefixes: f[col("prefix")].split([' ', ';']).filter(|s| !s.is_empty()).map(|p| p.parse().unwrap()).collect(),
                exporter: Some(f[col("exporter")]).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()),
                uplink: Some(f[col("uplink_ifindex")]).filter(|s| !s.is_empty()).map(|s| s.parse().unwrap()),
            }
        })
        .collect();
    let in_site = |s: &Site, a: IpAddr| s.prefixes.iter().any(|p| p.contains(&a));
    let longest = |a: IpAddr| {
        sites
            .iter()
            .filter_map(|s| s.prefixes.iter().filter(|p| p.contains(&a)).map(|p| p.prefix_len()).max().map(|l| (l, s)))
            .max_by_key(|(l, _)| *l)
            .map(|(_, s)| s)
    };
    let flows = heredoc(blocks, "flows-1.json");
    let mut expected = BTreeMap::new();
    let mut unmatched = 0;
    for line in flows.lines() {
        // The doc stamps its records with shell arithmetic; any number does here.
        let json = line.replace("$((T1-5))", "1").replace("${T1}", "2");
        let r: serde_json::Value = serde_json::from_str(&json).unwrap_or_else(|e| panic!("{line}: {e}"));
        let addr = |k: &str| r[k].as_str().unwrap().parse::<IpAddr>().unwrap();
        let (src, dst, exporter) = (addr("src_addr"), addr("dst_addr"), addr("sampler_address"));
        let bytes = r["bytes"].as_u64().unwrap() * r["sampling_rate"].as_u64().unwrap().max(1);
        let placed = match sites.iter().find(|s| s.exporter == Some(exporter)) {
            Some(s) if in_site(s, dst) => Some((s, "in")),
            Some(s) if in_site(s, src) => Some((s, "out")),
            Some(s) if s.uplink == r["out_if"].as_u64() => Some((s, "out")),
            Some(s) => Some((s, "in")),
            None => longest(dst).map(|s| (s, "in")).or_else(|| longest(src).map(|s| (s, "out"))),
        };
        match placed {
            Some((s, d)) => *expected.entry((s.id.clone(), d.to_string())).or_default() += bytes,
            None => unmatched += 1,
        }
    }
    (expected, unmatched)
}

/// `name{labels} value` lines of a metrics text: (labels, value) of the series named `name`.
fn series<'a>(text: &'a str, name: &str) -> Vec<(&'a str, f64)> {
    text.lines()
        .filter_map(|l| l.strip_prefix(name)?.strip_prefix('{'))
        .map(|l| {
            let (labels, value) = l.rsplit_once("} ").unwrap();
            (labels, value.parse().unwrap())
        })
        .collect()
}

fn label<'a>(labels: &'a str, name: &str) -> &'a str {
    let key = format!("{name}=\"");
    let start = labels.find(&key).unwrap_or_else(|| panic!("no {name} in {labels}")) + key.len();
    &labels[start..start + labels[start..].find('"').unwrap()]
}

#[test]
fn every_shell_block_of_the_quickstart_runs() {
    let doc = std::fs::read_to_string(repo().join("docs/quickstart.md")).unwrap();
    let blocks = blocks(&doc);
    for b in &blocks {
        assert!(
            !matches!(b.lang.as_str(), "shell" | "console" | "zsh" | "shell-session"),
            "docs/quickstart.md:{}: write shell blocks as ```sh (the test runs those)",
            b.line
        );
        assert!(b.not_run.is_none() || is_shell(&b.lang), "docs/quickstart.md:{}: a not-run marker before a non-shell block", b.line);
    }
    // The dashboard pictures it shows are in the repository, and small.
    let pictures: Vec<&str> = doc.split("](img/").skip(1).map(|r| &r[..r.find(')').unwrap()]).collect();
    assert_eq!(pictures.len(), 4, "one picture per dashboard of deploy/grafana/dashboards");
    for name in pictures {
        let size = std::fs::metadata(repo().join("docs/img").join(name)).unwrap_or_else(|e| panic!("docs/img/{name}: {e}")).len();
        assert!(size < 200_000, "docs/img/{name} is {size} bytes");
    }
    let shell: Vec<&Block> = blocks.iter().filter(|b| is_shell(&b.lang)).collect();
    let skipped: Vec<&&Block> = shell.iter().filter(|b| b.not_run.is_some()).collect();
    assert!(shell.len() >= 10, "docs/quickstart.md has {} shell blocks", shell.len());
    assert_eq!(skipped.len(), 1, "only the install block is not run: {skipped:?}");
    assert!(skipped[0].code.contains("cargo install --path . --locked"), "the skipped block is the install block");

    let dir = tempfile::tempdir().unwrap();
    let (broker, listen) = (free_addr(), free_addr());
    let bin = Path::new(env!("CARGO_BIN_EXE_siteflow")).parent().unwrap().to_path_buf();
    let tansu = tansu();
    let tansu_dir = tansu.parent().filter(|p| !p.as_os_str().is_empty()).map(Path::to_path_buf);
    let mut path = vec![bin];
    path.extend(tansu_dir);
    path.extend(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()));

    let mut script = String::from("set -euo pipefail\n");
    for b in &shell {
        match &b.not_run {
            Some(reason) => script.push_str(&format!("echo '@@ block at line {} not run: {}'\n", b.line, reason.replace('\'', ""))),
            None => script.push_str(&format!("echo '@@ block at line {}'\n{}\n", b.line, b.code)),
        }
    }
    script.push_str("echo '@@ all blocks ran'\n");
    std::fs::write(dir.path().join("quickstart.sh"), &script).unwrap();

    let mut child = Command::new("bash")
        .arg("quickstart.sh")
        .current_dir(dir.path())
        .env("PATH", std::env::join_paths(path).unwrap())
        .env("BROKER", broker.to_string())
        .env("LISTEN", listen.to_string())
        // The doc's kcat with Tansu needs a current librdkafka: where scripts/test.sh put it.
        .env(
            "LIBRDKAFKA_DIR",
            std::env::var_os("TEST_LIBRDKAFKA_DIR")
                .unwrap_or_else(|| Path::new(&std::env::var_os("HOME").unwrap()).join(".cache/siteflow/librdkafka").into_os_string()),
        )
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.path().join("out.txt")).unwrap())
        .stderr(std::fs::File::create(dir.path().join("err.txt")).unwrap())
        .process_group(0)
        .spawn()
        .unwrap();
    // Generous: the doc's own waits are bounded (60 s for the broker, 120 s for the window).
    let deadline = Instant::now() + Duration::from_secs(400);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // Whatever the doc left running (the broker and siteflow, on failure): its process group.
    // (procps kill: `kill -KILL -PGID` killed nothing here; the group goes after `--`.)
    let _ = Command::new("kill").args(["-s", "KILL", "--", &format!("-{}", child.id())]).status();
    let _ = child.wait();
    let read = |f: &str| std::fs::read_to_string(dir.path().join(f)).unwrap_or_default();
    let (out, err) = (read("out.txt"), read("err.txt"));
    let context = format!(
        "stdout:\n{out}\nstderr:\n{err}\nsiteflow.log:\n{}\ntansu.log (end):\n{}",
        read("siteflow.log"),
        read("tansu.log").lines().rev().take(20).collect::<Vec<_>>().join("\n")
    );
    let status = status.unwrap_or_else(|| panic!("the quickstart did not finish within 400 s\n{context}"));
    assert!(status.success(), "the quickstart failed ({status}); the last @@ line names the block\n{context}");
    assert!(out.contains("@@ all blocks ran"), "{context}");

    // Every output the doc shows is what its commands printed, with the doc's default
    // addresses for the test's ports.
    let printed = out.replace(&broker.to_string(), "127.0.0.1:9092").replace(&listen.to_string(), "127.0.0.1:9898");
    let printed: Vec<&str> = printed.lines().map(str::trim_end).collect();
    let shown: Vec<&Block> = blocks.iter().filter(|b| b.lang == "text").collect();
    assert!(shown.len() >= 3, "the doc shows the output of check --connect, /metrics and SQL");
    for b in shown {
        for line in b.code.lines() {
            assert!(printed.contains(&line.trim_end()), "docs/quickstart.md:{}: shown but not printed: {line}\n{out}", b.line);
        }
    }

    // check --connect saw both topics with the doc's records, and the flows on the sites.
    let check = read("check.txt");
    let (expected, unmatched) = ground_truth(&blocks);
    let records = heredoc(&blocks, "flows-1.json").lines().count();
    assert!(check.contains("reachable"), "check --connect reached the broker:\n{check}");
    let flows_line = check.lines().find(|l| l.contains("topic flows.goflow2 (goflow2_json)")).unwrap_or_else(|| panic!("{check}"));
    assert!(flows_line.contains(&format!("{records} message(s)")), "{flows_line}");
    assert!(flows_line.contains(&format!("{} of {records} match a site", records - unmatched as usize)), "{flows_line}");
    assert!(check.contains("topic probes (siteflow_probe_json): 1 partition, 1 message(s)"), "{check}");
    assert!(!check.contains("problem"), "{check}");

    // The per-site figures equal the bytes of the doc's first round of records.
    assert_eq!(expected.len(), 3, "the doc's samples reach north in/out and south out: {expected:?}");
    assert_eq!(unmatched, 1, "one sample belongs to no site");
    let figures = read("figures.txt");
    let got: BTreeMap<(String, String), u64> = series(&figures, "siteflow_site_bytes_total")
        .into_iter()
        .filter(|(_, v)| *v != 0.0)
        .map(|(l, v)| ((label(l, "site").to_string(), label(l, "direction").to_string()), v as u64))
        .collect();
    assert_eq!(got, expected, "siteflow_site_bytes_total against the doc's records\n{figures}");
    let rates: BTreeMap<(String, String), f64> = series(&figures, "siteflow_site_throughput_bytes_per_second")
        .into_iter()
        .map(|(l, v)| ((label(l, "site").to_string(), label(l, "direction").to_string()), v))
        .collect();
    for (k, bytes) in &expected {
        assert_eq!(rates.get(k), Some(&(*bytes as f64 / 10.0)), "{k:?}: one 10 s window\n{figures}");
    }
    let unmatched_line = format!("siteflow_records_unmatched_total{{table=\"flows\"}} {unmatched}");
    assert!(out.lines().any(|l| l == unmatched_line), "{unmatched_line}\n{context}");
    assert!(
        out.lines().any(|l| l.starts_with("siteflow_site_probe_rtt_seconds{") && l.contains("site=\"north\"") && l.ends_with(" 0.0352")),
        "{out}"
    );
    // The figures the doc's prose quotes are these.
    for (k, bytes) in &expected {
        let quote = format!("`{}` {bytes}", k.1);
        let quoted = doc.match_indices(&quote).any(|(i, _)| !doc[i + quote.len()..].starts_with(|c: char| c.is_ascii_digit()));
        assert!(quoted, "the doc quotes {k:?} = {bytes} (as {quote})");
    }
    assert!(figures.contains("siteflow_site_bytes_total{site=\"hq\""), "a site without traffic has its series at 0\n{figures}");
    // The SQL answer and the replay of the same records give the same totals: table rows
    // `| site | direction | … | bytes | …`, in two tables of the output.
    for ((site, direction), bytes) in &expected {
        let rows = out
            .lines()
            .filter(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                cells.len() > 4 && cells[1] == site && cells[2] == direction && cells.contains(&bytes.to_string().as_str())
            })
            .count();
        assert!(rows >= 2, "{site} {direction} {bytes} in the SQL answer and the replay's totals\n{out}");
    }
    // Prometheus accepted the scrape config.
    assert!(out.contains("SUCCESS"), "promtool check config\n{out}");
    assert!(out.contains("pipeline stopped") || read("siteflow.log").contains("pipeline stopped"), "{context}");
}
