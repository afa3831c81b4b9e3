//! The repository stands alone: every document or repo path that a file cites is in the
//! repository, and docs/readiness.md says what the shipped policy and the E-model do.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use siteflow::readiness::policy::{Metric, Policy};

use crate::support::repo;

/// Files whose citations are checked.
const EXTENSIONS: [&str; 8] = ["md", "rs", "yaml", "yml", "toml", "sh", "sql", "py"];
/// Top-level folders: a word starting with one of them is a repo path.
const TOP_DIRS: [&str; 10] = ["docs/", "src/", "tests/", "deploy/", "pipelines/", "scripts/", "schemas/", "benches/", "fuzz/", ".ci/"];

fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path.is_dir() {
            if name != "target" && name != ".git" {
                walk(&path, out);
            }
        } else {
            out.push(path);
        }
    }
}

/// Whether `cited` exists relative to `dir` or to one of its ancestors up to the repo root (a
/// rules file under deploy/prometheus cites the unit tests beside its own folder by `tests/…`).
fn exists_upwards(root: &Path, dir: &Path, cited: &str) -> bool {
    let mut d = Some(dir);
    while let Some(here) = d {
        if here.join(cited).exists() {
            return true;
        }
        if here == root {
            return false;
        }
        d = here.parent();
    }
    false
}

/// The citations in `text` (of the file at `file`) that name nothing in the repository:
/// markdown links, `*.md` names, `../` paths and words starting with a top-level folder.
/// URLs, absolute paths and `$VAR/…`-like templates are not citations of the repo.
fn broken_citations(root: &Path, file: &Path, text: &str, basenames: &BTreeSet<String>) -> Vec<String> {
    let dir = file.parent().unwrap();
    let mut broken = Vec::new();
    let is_path_char = |c: char| c.is_ascii_alphanumeric() || "_./-".contains(c);
    // Markdown links: a `](` followed by a path (a template or code is none).
    for piece in text.split("](").skip(1) {
        let Some(target) = piece.split([')', ' ', '\n']).next() else { continue };
        if !target.chars().all(|c| is_path_char(c) || c == '#' || c == ':') {
            continue;
        }
        let is_url =
            target.split_once(':').is_some_and(|(scheme, _)| !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphabetic()));
        let target = target.split('#').next().unwrap();
        if is_url || target.is_empty() {
            continue;
        }
        if !dir.join(target).exists() {
            broken.push(format!("link ]({target})"));
        }
    }
    // Words made of path characters.
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut i = 0;
    while i < chars.len() {
        if !is_path_char(chars[i].1) {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && is_path_char(chars[i].1) {
            i += 1;
        }
        let before = if start == 0 { ' ' } else { chars[start - 1].1 };
        let end = if i < chars.len() { chars[i].0 } else { text.len() };
        let word = text[chars[start].0..end].trim_end_matches(['.', ',', ':']);
        let word = word.strip_prefix("./").unwrap_or(word);
        // After `:` a URL, after `$`, `{`, `}` or `<` a template, after `/` an absolute path.
        if ":${}<*~@".contains(before) || word.starts_with('/') || word == ".md" {
            continue;
        }
        let found = if word.ends_with(".md") {
            if word.starts_with("../") {
                dir.join(word).exists()
            } else {
                // A bare name (`metrics.md` in a listing of docs/) is any file of that name.
                (!word.contains('/') && basenames.contains(word)) || exists_upwards(root, dir, word)
            }
        } else if word.starts_with("../") {
            dir.join(word).exists()
        } else if TOP_DIRS.iter().any(|t| word.starts_with(t)) {
            exists_upwards(root, dir, word)
        } else {
            true
        };
        if !found {
            broken.push(word.to_string());
        }
    }
    broken
}

#[test]
fn no_file_cites_a_document_or_path_that_is_not_in_the_repo() {
    let root = repo();
    let mut files = Vec::new();
    walk(&root, &mut files);
    let basenames: BTreeSet<String> = files.iter().map(|f| f.file_name().unwrap().to_string_lossy().into_owned()).collect();

    // The checker itself finds what it must (names built here, so this file cites none).
    let (missing_doc, guide, nowhere, up) = (
        format!("{}.md", "DESIGN"),
        format!("{}-guide.md", "no-such"),
        format!("docs/{}.md", "nowhere"),
        format!("../{}/x.sh", "nothing-here"),
    );
    let anchored = "metrics.md#traffic";
    let sample = format!(
        "See {missing_doc} and [the guide]({guide}), `{nowhere}`, {up}; fine: docs/metrics.md, \
         [metrics]({anchored}), https://example.org/{missing_doc}, /etc/{missing_doc}, ${{DIR}}/{missing_doc}."
    );
    let found = broken_citations(&root, &root.join("docs/metrics.md"), &sample, &basenames);
    assert_eq!(found, vec![format!("link ]({guide})"), missing_doc, guide.clone(), nowhere, up], "the checker's own sample");

    let mut broken = Vec::new();
    let mut checked = 0;
    for file in &files {
        if !file.extension().is_some_and(|e| EXTENSIONS.contains(&e.to_string_lossy().as_ref())) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(file) else { continue };
        checked += 1;
        for citation in broken_citations(&root, file, &text, &basenames) {
            broken.push(format!("{}: {citation}", file.strip_prefix(&root).unwrap().display()));
        }
    }
    assert!(checked > 100, "only {checked} files checked: is the walk right?");
    assert!(broken.is_empty(), "citations of files that are not in the repository:\n{}", broken.join("\n"));
}

/// Rows of the markdown table whose header starts with `| {first_header} |`, as cells.
fn table(doc: &str, first_header: &str) -> Vec<Vec<String>> {
    let header = format!("| {first_header} |");
    let mut lines = doc.lines().skip_while(|l| !l.starts_with(&header));
    assert!(lines.next().is_some(), "docs/readiness.md has no table headed {header:?}");
    lines
        .skip(1)
        .take_while(|l| l.starts_with('|'))
        .map(|l| l.trim_matches('|').split('|').map(|c| c.trim().trim_matches('`').to_string()).collect())
        .collect()
}

fn number(cell: &str) -> f64 {
    cell.replace('−', "-").parse().unwrap_or_else(|e| panic!("{cell:?} is not a number: {e}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

#[test]
fn the_readiness_doc_shows_the_shipped_policy() {
    let doc = std::fs::read_to_string(repo().join("docs/readiness.md")).unwrap();
    let policy = Policy::embedded();

    let rows = table(&doc, "row");
    let metrics: Vec<Metric> = Metric::ALL.into_iter().filter(|m| policy.thresholds.get(*m).is_some()).collect();
    assert_eq!(rows.iter().map(|r| r[0].clone()).collect::<Vec<_>>(), metrics.iter().map(|m| m.row_name()).collect::<Vec<_>>());
    for (row, metric) in rows.iter().zip(&metrics) {
        let t = policy.thresholds.get(*metric).unwrap();
        let (clear_degraded, clear_not_ready) = t.clear_levels(*metric, policy.hysteresis_ratio);
        assert_eq!(row[1], metric.as_str(), "{row:?}");
        assert_eq!(row[3], if metric.higher_is_worse() { "higher" } else { "lower" }, "{row:?}");
        let shown: Vec<f64> = row[4..8].iter().map(|c| number(c)).collect();
        let shipped = [t.degraded, t.not_ready, clear_degraded, clear_not_ready];
        assert!(shown.iter().zip(shipped).all(|(a, b)| close(*a, b)), "{}: doc {shown:?}, policy {shipped:?}", row[0]);
    }

    let settings = table(&doc, "setting");
    let expected = [
        ("period_secs", policy.period_secs.to_string()),
        ("hold_secs", policy.hold_secs.to_string()),
        ("hysteresis_ratio", policy.hysteresis_ratio.to_string()),
        ("freshness_windows", policy.freshness_windows.to_string()),
        ("meeting_lead_secs", policy.meeting_lead_secs.to_string()),
        ("default_profile", policy.default_profile.clone()),
    ];
    let shown: Vec<(String, String)> = settings.iter().map(|r| (r[0].clone(), r[1].clone())).collect();
    assert_eq!(shown, expected.iter().map(|(k, v)| (k.to_string(), v.clone())).collect::<Vec<_>>());

    let mut profiles: Vec<(String, f64)> = table(&doc, "profile").iter().map(|r| (r[0].clone(), number(&r[1]))).collect();
    profiles.sort_by(|a, b| a.0.cmp(&b.0));
    let shipped: Vec<(String, f64)> = policy.profiles.iter().map(|(k, v)| (k.clone(), *v)).collect();
    assert_eq!(profiles, shipped);
}

#[test]
fn the_readiness_doc_worked_examples_are_what_the_emodel_gives() {
    let doc = std::fs::read_to_string(repo().join("docs/readiness.md")).unwrap();
    let examples = table(&doc, "RTT, ms");
    assert!(examples.len() >= 4, "{examples:?}");
    for row in examples {
        let (rtt, jitter, loss, mos) = (number(&row[0]), number(&row[1]), number(&row[2]), number(&row[4]));
        let computed = siteflow::readiness::emodel::mos(rtt, jitter, loss);
        assert!((computed - mos).abs() < 0.0005 + 1e-9, "{row:?}: the E-model gives {computed:.4}");
    }
    // The formula block says what the code does: the shipped constants appear in it.
    for constant in ["93.2", "effective / 40", "(effective − 120) / 10", "2.5 × loss", "0.035 R", "0.000007 R (R − 60) (100 − R)"] {
        assert!(doc.contains(constant), "the formula lacks {constant:?}");
    }
}
