//! The floors of the crate, checked: every `crate::` path in `src/` is read, and a room
//! may import only rooms on its own floor or below, with no cycle between top-level
//! modules. The order is the one docs/ARCHITECTURE.md ("Floors") writes down; a new
//! top-level module must be given a floor here.
//!
//! Reads the source as text (comments skipped), so `use crate::a::{b, c}`, `crate::x::f()`
//! and grouped `use crate::{x, y::z}` all count. The binary (`main.rs`, `cli/`) sits above
//! every floor and uses the library as `charter::`, so it is not read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lowest floor first. `lib` is the crate root (`run`, `serve`).
const FLOORS: &[&[&str]] = &[
    &["config", "constitution", "detect", "embed"],
    &["evaluate"],
    &["audit", "engine", "ids"],
    &["store", "quality"],
    &["gateway"],
    &["state"],
    &["http"],
    &["lib"],
];

/// Modules compiled only into the test build that may look anywhere.
const UNCHECKED: &[&str] = &["layers"];

fn floor(module: &str) -> Option<usize> {
    FLOORS.iter().position(|f| f.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`lib` for src/lib.rs), `None` for the binary.
fn owner(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.trim_end_matches(".rs");
    (name != "main" && name != "cli" && name != "bin").then(|| name.to_string())
}

/// The top-level modules that `text` names after `crate::`; `lib` for items of the root.
fn imports(text: &str, modules: &BTreeSet<String>) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in text.lines() {
        let code = match line.find("//") {
            Some(i) => &line[..i],
            None => line,
        };
        let mut rest = code;
        while let Some(i) = rest.find("crate::") {
            let before = rest[..i].chars().next_back();
            rest = &rest[i + "crate::".len()..];
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == '$') {
                continue;
            }
            let names: Vec<&str> = match rest.strip_prefix('{') {
                // `crate::{a, b::c}` on one line: the first segment of each entry.
                Some(group) => group
                    .split('}')
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|e| e.trim().split("::").next().unwrap_or_default())
                    .collect(),
                None => vec![rest
                    .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                    .next()
                    .unwrap_or_default()],
            };
            for name in names.into_iter().filter(|n| !n.is_empty()) {
                if modules.contains(name) {
                    out.insert(name.to_string());
                } else {
                    out.insert("lib".to_string());
                }
            }
        }
    }
    out
}

/// Edges `from -> to` between top-level modules of the library.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let owned: Vec<(String, PathBuf)> = files
        .into_iter()
        .filter_map(|f| owner(&src, &f).map(|m| (m, f)))
        .collect();
    let modules: BTreeSet<String> = owned.iter().map(|(m, _)| m.clone()).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (module, file) in &owned {
        let text = std::fs::read_to_string(file).expect("a source file is readable");
        let targets = graph.entry(module.clone()).or_default();
        for target in imports(&text, &modules) {
            if &target != module {
                targets.insert(target);
            }
        }
    }
    graph
}

/// Upward imports (`from` on a lower floor than `to`) and modules without a floor.
fn violations(graph: &BTreeMap<String, BTreeSet<String>>) -> Vec<String> {
    let mut out = Vec::new();
    for (from, targets) in graph {
        if UNCHECKED.contains(&from.as_str()) {
            continue;
        }
        let Some(low) = floor(from) else {
            out.push(format!("{from} has no floor in layers::FLOORS"));
            continue;
        };
        for to in targets {
            match floor(to) {
                Some(high) if high > low => out.push(format!(
                    "{from} (floor {low}) imports {to} (floor {high}): upward"
                )),
                Some(_) => {}
                None => out.push(format!("{to} has no floor in layers::FLOORS")),
            }
        }
    }
    out
}

/// One cycle between top-level modules, if any (as `a -> b -> a`).
fn cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<String> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<String> {
        if let Some(at) = path.iter().position(|p| p == node) {
            let mut names = path[at..].to_vec();
            names.push(node.to_string());
            return Some(names.join(" -> "));
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(found) = visit(next, graph, path, done) {
                return Some(found);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

fn edges(pairs: &[(&str, &str)]) -> BTreeMap<String, BTreeSet<String>> {
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, to) in pairs {
        graph
            .entry(from.to_string())
            .or_default()
            .insert(to.to_string());
    }
    graph
}

#[test]
fn no_upward_import_and_no_cycle() {
    let graph = graph();
    assert!(graph.contains_key("http") && graph.contains_key("lib"));
    let bad = violations(&graph);
    assert!(
        bad.is_empty(),
        "imports against the floors:\n{}",
        bad.join("\n")
    );
    assert_eq!(cycle(&graph), None);
}

#[test]
fn reads_every_form_of_path() {
    let modules: BTreeSet<String> = ["engine", "http", "evaluate", "state"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let text = "use crate::engine::{Engine, Kind};\n\
                use crate::{http, evaluate::Verdict};\n\
                // use crate::state::AppState;\n\
                fn f() { crate::Thing::new(); let _ = $crate::x; }\n";
    let found: Vec<String> = imports(text, &modules).into_iter().collect();
    assert_eq!(found, ["engine", "evaluate", "http", "lib"]);
}

#[test]
fn an_upward_import_or_a_cycle_fails() {
    assert_eq!(
        violations(&edges(&[("engine", "http")])),
        ["engine (floor 2) imports http (floor 6): upward"]
    );
    assert_eq!(
        violations(&edges(&[("engine", "nowhere")])),
        ["nowhere has no floor in layers::FLOORS"]
    );
    assert!(violations(&edges(&[("http", "engine"), ("audit", "engine")])).is_empty());
    assert_eq!(
        cycle(&edges(&[("audit", "engine"), ("engine", "audit")])).as_deref(),
        Some("audit -> engine -> audit")
    );
    assert_eq!(cycle(&edges(&[("http", "engine")])), None);
}
