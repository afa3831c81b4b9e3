//! ARCHITECTURE.md's layer diagram is the rule: a module of `src/` refers (by `crate::` path, in
//! code or docs) only to modules on lower layers. This test reads the diagram and every source
//! file, so the diagram cannot drift from the code.

use std::collections::HashMap;
use std::path::Path;

/// The layers of the fenced `layers` block, top first: each line's modules (before its `│`).
fn layers(architecture: &str) -> Vec<Vec<String>> {
    let start = architecture.find("```layers\n").expect("ARCHITECTURE.md has a ```layers block") + "```layers\n".len();
    let end = start + architecture[start..].find("```").expect("the layers block ends");
    architecture[start..end]
        .lines()
        .map(|line| line.split('│').next().unwrap_or("").split_whitespace().map(String::from).collect())
        .filter(|l: &Vec<String>| !l.is_empty())
        .collect()
}

/// The top-level modules a source text names with `crate::module` or `crate::{module, …}`.
fn referenced_modules(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        let names: Vec<&str> = match rest.strip_prefix('{') {
            Some(group) => group[..group.find('}').unwrap_or(group.len())].split(',').collect(),
            None => vec![rest],
        };
        for name in names {
            let ident: String = name.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if !ident.is_empty() && ident.chars().next().is_some_and(|c| c.is_ascii_lowercase()) {
                out.push(ident);
            }
        }
    }
    out
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_refers_to_a_module_above_it_in_architecture_md() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let architecture = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let layers = layers(&architecture);
    // Top first in the file: a larger number is a lower layer.
    let layer_of: HashMap<String, usize> =
        layers.iter().enumerate().flat_map(|(i, modules)| modules.iter().map(move |m| (m.clone(), i))).collect();

    let lib = std::fs::read_to_string(root.join("src/lib.rs")).unwrap();
    let declared: Vec<&str> = lib
        .lines()
        .filter_map(|l| l.strip_prefix("pub mod ").or_else(|| l.strip_prefix("mod ")))
        .map(|l| l.trim_end_matches(';'))
        .collect();
    assert!(declared.len() > 10, "src/lib.rs declares its modules: {declared:?}");
    for module in &declared {
        assert!(layer_of.contains_key(*module), "module `{module}` of src/lib.rs is missing from ARCHITECTURE.md's layers");
    }

    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    let mut violations = Vec::new();
    let mut checked = 0;
    for file in files {
        let relative = file.strip_prefix(root.join("src")).unwrap();
        let top = relative.components().next().unwrap().as_os_str().to_string_lossy().trim_end_matches(".rs").to_string();
        if top == "main" || top == "lib" {
            continue;
        }
        let own = *layer_of.get(&top).unwrap_or_else(|| panic!("{} is in no layer of ARCHITECTURE.md", relative.display()));
        let text = std::fs::read_to_string(&file).unwrap();
        for used in referenced_modules(&text) {
            checked += 1;
            let Some(&layer) = layer_of.get(&used) else {
                violations.push(format!("{}: refers to `crate::{used}`, which is in no layer", relative.display()));
                continue;
            };
            if used != top && layer <= own {
                violations.push(format!("{} (layer of `{top}`) refers to `crate::{used}`, which is not below it", relative.display()));
            }
        }
    }
    assert!(checked > 100, "the scan found the crate's references ({checked})");
    violations.sort();
    violations.dedup();
    assert!(violations.is_empty(), "modules refer upwards or sideways:\n{}", violations.join("\n"));
}

#[test]
fn the_reference_scan_sees_single_and_grouped_paths() {
    let text = "use crate::types::Format;\nuse crate::{decode, window::WindowSpec};\n/// [`crate::pipeline::Pipeline`]\nuse crate::Foo;";
    assert_eq!(referenced_modules(text), ["types", "decode", "window", "pipeline"]);
}
