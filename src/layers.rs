//! The floors of the crate, checked: every `crate::` path in `src/` is read, and a room
//! may import only rooms on its own floor or below, with no cycle between top-level
//! modules. The order is the one docs/ARCHITECTURE.md ("Floors") writes down; a new
//! top-level module must be given a floor here.
//!
//! Reads the source as tokens (comments and string literals skipped), so
//! `use crate::a::{b, c}`, `crate::x::f()`, grouped `use crate::{x, y::{z, w}}` over any
//! number of lines and a `super::` that climbs to the crate root all count. `detect` and
//! `ids` must import nothing of the crate. The binary (`main.rs`, `cli/`) sits above every
//! floor and uses the library as `charter::`, so it is not read.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Lowest floor first. `lib` is the crate root (`run`, `serve`).
const FLOORS: &[&[&str]] = &[
    &["config", "constitution", "detect", "embed"],
    &["evaluate"],
    &["audit", "engine", "ids"],
    &["store", "quality", "auth"],
    &["gateway"],
    &["state"],
    &["http"],
    &["lib"],
];

/// Rooms that import no other room of the crate (docs/ARCHITECTURE.md, "Modules":
/// `detect` imports nothing of the crate, `ids` no other module).
const LEAVES: &[&str] = &["detect", "ids"];

/// Modules compiled only into the test build that may look anywhere.
const UNCHECKED: &[&str] = &["layers", "sizes"];

fn floor(module: &str) -> Option<usize> {
    FLOORS.iter().position(|f| f.contains(&module))
}

/// Every `.rs` file below `dir`.
pub(crate) fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
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

/// The module path of a file below src/ (`gateway/stream.rs` -> `["gateway", "stream"]`,
/// `gateway/mod.rs` -> `["gateway"]`, `lib.rs` -> `[]`).
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap_or(file);
    let mut path: Vec<String> = rel
        .with_extension("")
        .components()
        .filter_map(|c| c.as_os_str().to_str().map(str::to_string))
        .collect();
    if path.last().is_some_and(|l| l == "mod" || l == "lib") {
        path.pop();
    }
    path
}

/// The code of `text` as tokens: identifiers, `::` and single punctuation characters;
/// comments (line, doc and nested block), string, raw-string and char literals dropped,
/// so neither a commented-out import nor `"crate::x"` in a string counts.
fn tokens(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    let at = |i: usize| chars.get(i).copied().unwrap_or('\0');
    while i < chars.len() {
        let c = chars[i];
        if c == '/' && at(i + 1) == '/' {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && at(i + 1) == '*' {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && at(i + 1) == '*' {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && at(i + 1) == '/' {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
        } else if c == '\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a): skip the literal.
            if at(i + 1) == '\\' {
                i += 3;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
            } else if at(i + 2) == '\'' {
                i += 3;
            } else {
                i += 1;
            }
        } else if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            // Raw strings (r"..", r#".."#, br#".."#): skip to the matching close.
            if (word == "r" || word == "br") && matches!(at(i), '"' | '#') {
                let hashes = chars[i..].iter().take_while(|&&h| h == '#').count();
                if at(i + hashes) == '"' {
                    let close: Vec<char> = std::iter::once('"')
                        .chain(std::iter::repeat_n('#', hashes))
                        .collect();
                    i += hashes + 1;
                    while i < chars.len() && !chars[i..].starts_with(&close) {
                        i += 1;
                    }
                    i += close.len();
                    continue;
                }
            }
            if word == "b" && matches!(at(i), '"' | '\'') {
                continue; // the literal itself is skipped next round
            }
            out.push(word);
        } else if c == ':' && at(i + 1) == ':' {
            out.push("::".to_string());
            i += 2;
        } else {
            if !c.is_whitespace() {
                out.push(c.to_string());
            }
            i += 1;
        }
    }
    out
}

/// The first segment of every path in the use tree that starts at `tokens[i]` (a name,
/// or a `{ ... }` group of trees, nested as deep as they go).
fn tree_heads(tokens: &[String], i: usize, out: &mut Vec<String>) {
    match tokens.get(i).map(String::as_str) {
        Some("{") => {
            let mut depth = 0;
            let mut j = i;
            let mut item_start = true;
            while let Some(t) = tokens.get(j) {
                match t.as_str() {
                    "{" => {
                        depth += 1;
                        if depth == 1 {
                            item_start = true;
                            j += 1;
                            continue;
                        }
                    }
                    "}" => {
                        depth -= 1;
                        if depth == 0 {
                            return;
                        }
                    }
                    "," if depth == 1 => {
                        item_start = true;
                        j += 1;
                        continue;
                    }
                    _ => {}
                }
                if item_start && depth == 1 {
                    tree_heads(tokens, j, out);
                }
                item_start = false;
                j += 1;
            }
        }
        Some(name) if name == "*" || name.chars().all(|c| c.is_alphanumeric() || c == '_') => {
            out.push(name.to_string())
        }
        _ => {}
    }
}

/// The top-level modules that a file names through `crate::` or through `super::` that
/// climbs to the crate root; `lib` for items of the root itself. `path` is the file's
/// module path ([`module_path`]); inline `mod x { .. }` blocks are followed, so a test
/// module's `super::` resolves to the file's own module.
fn imports(text: &str, path: &[String], modules: &BTreeSet<String>) -> BTreeSet<String> {
    let tokens = tokens(text);
    let mut heads = Vec::new();
    // The module path at the current point, and the brace depth each inline module opened at.
    let mut here: Vec<String> = path.to_vec();
    let mut inline: Vec<usize> = Vec::new();
    let mut depth = 0usize;
    let mut i = 0;
    while i < tokens.len() {
        let t = tokens[i].as_str();
        let previous = i.checked_sub(1).map(|p| tokens[p].as_str());
        match t {
            "{" => depth += 1,
            "}" => {
                depth = depth.saturating_sub(1);
                if inline.last() == Some(&depth) {
                    inline.pop();
                    here.pop();
                }
            }
            "mod" if tokens.get(i + 2).map(String::as_str) == Some("{") => {
                here.push(tokens[i + 1].clone());
                inline.push(depth);
            }
            // `$crate::` (a macro's own crate) and `a::crate` are not paths from the root.
            "crate"
                if previous != Some("$")
                    && previous != Some("::")
                    && tokens.get(i + 1).map(String::as_str) == Some("::") =>
            {
                tree_heads(&tokens, i + 2, &mut heads);
            }
            "super" if previous != Some("::") => {
                let mut up = 0;
                let mut j = i;
                while tokens.get(j).map(String::as_str) == Some("super")
                    && tokens.get(j + 1).map(String::as_str) == Some("::")
                {
                    up += 1;
                    j += 2;
                }
                if up > 0 && up >= here.len() {
                    tree_heads(&tokens, j, &mut heads);
                }
                i = j.max(i + 1);
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    heads
        .into_iter()
        .map(|name| {
            if modules.contains(&name) {
                name
            } else {
                "lib".to_string()
            }
        })
        .collect()
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
        for target in imports(&text, &module_path(&src, file), &modules) {
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
        if LEAVES.contains(&from.as_str()) && !targets.is_empty() {
            let names: Vec<&str> = targets.iter().map(String::as_str).collect();
            out.push(format!(
                "{from} imports {}: it must import nothing of the crate",
                names.join(", ")
            ));
        }
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
    // The reader sees the edges every reader of the code sees.
    for (from, to) in [
        ("http", "gateway"),
        ("http", "state"),
        ("gateway", "engine"),
    ] {
        assert!(graph[from].contains(to), "{from} -> {to} not read");
    }
    let bad = violations(&graph);
    assert!(
        bad.is_empty(),
        "imports against the floors:\n{}",
        bad.join("\n")
    );
    assert_eq!(cycle(&graph), None);
}

fn names(list: &[&str]) -> BTreeSet<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn read(text: &str, path: &[&str]) -> Vec<String> {
    let modules = names(&["engine", "http", "evaluate", "state", "store", "ids"]);
    let path: Vec<String> = path.iter().map(|s| s.to_string()).collect();
    imports(text, &path, &modules).into_iter().collect()
}

#[test]
fn reads_every_form_of_path() {
    let text = "use crate::engine::{Engine, Kind};\n\
                use crate::{http, evaluate::Verdict};\n\
                // use crate::state::AppState;\n\
                fn f() { crate::Thing::new(); let _ = $crate::x; }\n";
    assert_eq!(
        read(text, &["audit"]),
        ["engine", "evaluate", "http", "lib"]
    );
    // A group across lines (as rustfmt writes a long one), nested groups.
    let text =
        "use crate::{\n    engine::{Engine, Kind},\n    store::{db, query::Page},\n    ids,\n};\n";
    assert_eq!(read(text, &["audit"]), ["engine", "ids", "store"]);
    assert_eq!(
        read("pub(crate) fn f() {}", &["audit"]),
        Vec::<String>::new()
    );
}

#[test]
fn skips_comments_and_literals() {
    let text = r##"/* use crate::http; /* nested */ crate::state */
        const URL: &str = "http://x"; use crate::engine::E;
        const S: &str = r#"crate::store "quoted" "#; let c = '"'; let q = '\''; fn g<'a>(_: &'a str) {}
        let b = b"crate::ids"; use crate::evaluate::V;"##;
    assert_eq!(read(text, &["audit"]), ["engine", "evaluate"]);
}

#[test]
fn super_counts_only_when_it_climbs_to_the_root() {
    // src/audit.rs: `super::` is the crate root.
    assert_eq!(read("use super::engine::E;", &["audit"]), ["engine"]);
    // src/gateway/stream.rs: `super::` is gateway, `super::super::` the root.
    assert!(read("use super::sse::Event;", &["gateway", "stream"]).is_empty());
    assert_eq!(
        read("use super::super::http::X;", &["gateway", "stream"]),
        ["http"]
    );
    // A test module inside src/audit.rs: `super::` is audit.
    let text = "mod tests { use super::*; use super::super::store::S; }\nuse super::ids::I;";
    assert_eq!(read(text, &["audit"]), ["ids", "store"]);
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
        violations(&edges(&[("detect", "config")])),
        ["detect imports config: it must import nothing of the crate"]
    );
    assert_eq!(
        cycle(&edges(&[("audit", "engine"), ("engine", "audit")])).as_deref(),
        Some("audit -> engine -> audit")
    );
    assert_eq!(cycle(&edges(&[("http", "engine")])), None);
}
