//! The broker's modules form layers: no module reaches up to the server (which builds the
//! state and sits on top), and `crate::` references between modules have no cycle. Checked on
//! the sources, so a new import that closes a circle fails here rather than in review.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module name -> the top-level modules its non-test code names as `crate::<module>`.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut stack = vec![src.clone()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).expect("read src") {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let rel = path.strip_prefix(&src).expect("under src").to_string_lossy().to_string();
            let module = rel.split('/').next().unwrap_or("").trim_end_matches(".rs").to_string();
            if !rel.ends_with(".rs") || rel.ends_with("tests.rs") || module == "lib" || module == "main" {
                continue;
            }
            let text = std::fs::read_to_string(&path).expect("read source");
            let code = text.split("#[cfg(test)]").next().unwrap_or("");
            let named = graph.entry(module.clone()).or_default();
            for (i, _) in code.match_indices("crate::") {
                let rest = &code[i + "crate::".len()..];
                let words: Vec<&str> = if let Some(group) = rest.strip_prefix('{') {
                    // `use crate::{a::X, b::Y}`: every path in the braces.
                    let group = group.split('}').next().unwrap_or("");
                    group.split(',').filter_map(|p| p.trim().split("::").next()).collect()
                } else {
                    rest.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).take(1).collect()
                };
                for w in words {
                    if !w.is_empty() && w != module && w.chars().all(|c| c.is_ascii_lowercase() || c == '_') {
                        named.insert(w.to_string());
                    }
                }
            }
        }
    }
    graph
}

#[test]
fn only_lib_names_the_server() {
    let graph = imports();
    assert!(graph.contains_key("server") && graph.contains_key("state"), "{graph:?}");
    let up: Vec<_> = graph.iter().filter(|(_, uses)| uses.contains("server")).map(|(m, _)| m).collect();
    assert!(up.is_empty(), "modules importing crate::server: {up:?}");
}

#[test]
fn module_imports_have_no_cycle() {
    let graph = imports();
    // Depth-first search; a module met again while still on the path closes a cycle.
    fn visit<'a>(
        m: &'a str,
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<&'a str>,
        done: &mut BTreeSet<&'a str>,
    ) {
        if done.contains(m) {
            return;
        }
        if let Some(at) = path.iter().position(|p| *p == m) {
            panic!("import cycle: {} -> {m}", path[at..].join(" -> "));
        }
        path.push(m);
        for next in graph.get(m).into_iter().flatten() {
            visit(next, graph, path, done);
        }
        path.pop();
        done.insert(m);
    }
    let mut done = BTreeSet::new();
    for m in graph.keys() {
        visit(m, &graph, &mut Vec::new(), &mut done);
    }
}

/// Every `MAX_*` bound of the protocol, transport and broker lives in
/// `quiver_protocol::limits`, where each has its reason (design.md §2).
///
/// Not bounds, so they stay by the code they describe: the producer snapshot's largest size,
/// derived from `MAX_PRODUCERS_PER_PARTITION` and the snapshot's own byte layout; the width
/// of a producer id's counter field; the subscription's smallest read-ahead (a tuning floor);
/// the smallest encoding of a record (a fact of the batch format); the epoch record's largest
/// size, derived from `MAX_EPOCH_ENTRIES` and its byte layout.
const NOT_BOUNDS: [&str; 5] = [
    "MAX_SNAPSHOT_BYTES",
    "MAX_COUNTER",
    "MIN_READ_AHEAD_BYTES",
    "MIN_RECORD_BYTES",
    "MAX_EPOCHS_FILE_BYTES",
];

#[test]
fn bounds_live_in_the_limits_module() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut scattered = Vec::new();
    for root in ["src", "../protocol/src", "../transport/src"] {
        let mut stack = vec![manifest.join(root)];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(&dir).expect("read src") {
                let path = entry.expect("dir entry").path();
                if path.is_dir() {
                    stack.push(path);
                    continue;
                }
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if !name.ends_with(".rs") || name.ends_with("tests.rs") || name == "limits.rs" {
                    continue;
                }
                let text = std::fs::read_to_string(&path).expect("read source");
                let code = text.split("#[cfg(test)]").next().unwrap_or("");
                for line in code.lines() {
                    let l = line.trim_start().trim_start_matches("pub ").trim_start_matches("pub(crate) ");
                    let exempt = NOT_BOUNDS.iter().any(|n| l.starts_with(&format!("const {n}:")));
                    if (l.starts_with("const MAX_") || l.starts_with("const MIN_")) && !exempt {
                        scattered.push(format!("{}: {}", path.display(), line.trim()));
                    }
                }
            }
        }
    }
    assert!(scattered.is_empty(), "bounds outside quiver_protocol::limits:\n{}", scattered.join("\n"));
}
