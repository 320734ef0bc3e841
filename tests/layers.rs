//! The house's rules, read from the code: every `crate::` path a module
//! names (outside comments and its `#[cfg(test)]` part) must point to its
//! own layer or one below, never to a sibling stage, and the modules must
//! not import each other in a circle. ARCHITECTURE.md states these rules;
//! this test keeps them true.
//!
//! A layer is the first folder under `src/`, in this order from the bottom:
//! `domain` (pure), `apple` (the edge), `store`, `runtime`, `stages`,
//! `daemon` (the wiring), `cli`. `sim`, the simulator, stands apart and may
//! name only the Apple edge, the domain and the HTTP plumbing. `lib.rs` and
//! the binary (`main.rs`) are above everything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

const LAYERS: &[&str] = &[
    "domain", "apple", "store", "runtime", "stages", "daemon", "cli",
];

/// Imports that point up a layer on purpose, each with its reason in
/// ARCHITECTURE.md. At most two.
const ALLOWED_UP: &[(&str, &str)] = &[];

/// What the simulator may name besides itself.
const SIM_MAY_USE: &[&str] = &["apple", "domain", "runtime::http"];

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The module path of a source file: `src/domain/lifecycle/mod.rs` ->
/// `domain::lifecycle`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod" || p == "lib") {
        parts.pop();
    }
    parts.join("::")
}

/// The code of a file without comments, string literals and its test part:
/// a doc link or an example in a string is not an import.
fn code_of(text: &str) -> String {
    let mut out = String::new();
    for line in text.lines() {
        let trimmed = line.trim_start();
        if trimmed.starts_with("#[cfg(test)]") {
            break;
        }
        if trimmed.starts_with("//") {
            continue;
        }
        let line = match line.find("//") {
            Some(i) if !line[..i].contains('"') => &line[..i],
            _ => line,
        };
        let mut in_str = false;
        let mut prev = ' ';
        for ch in line.chars() {
            if ch == '"' && prev != '\\' {
                in_str = !in_str;
            } else if !in_str {
                out.push(ch);
            }
            prev = ch;
        }
        out.push('\n');
    }
    out
}

/// Every path from the crate's root named in `code` (`crate::a::b`, or
/// `super::b` seen from module `here`), as its segments.
fn crate_paths(code: &str, here: &[String]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find(['c', 's']) {
        let before = rest[..i].chars().last();
        let tail = &rest[i..];
        let (mut segments, skip) = if let Some(t) = tail.strip_prefix("crate::") {
            (Vec::new(), tail.len() - t.len())
        } else if tail.starts_with("super::") {
            let mut t = tail;
            let mut up = 0;
            while let Some(next) = t.strip_prefix("super::") {
                t = next;
                up += 1;
            }
            let anchor = here.len().saturating_sub(up);
            (here[..anchor].to_vec(), tail.len() - t.len())
        } else {
            rest = &rest[i + 1..];
            continue;
        };
        rest = &rest[i + skip..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
            continue;
        }
        let mut tail = rest;
        loop {
            let end = tail
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(tail.len());
            if end == 0 {
                break;
            }
            segments.push(tail[..end].to_string());
            tail = &tail[end..];
            match tail.strip_prefix("::") {
                Some(t) => tail = t,
                None => break,
            }
        }
        if !segments.is_empty() {
            out.push(segments);
        }
    }
    out
}

struct House {
    /// Module path -> the module paths it names (resolved to modules).
    imports: BTreeMap<String, BTreeSet<String>>,
}

fn read_house() -> House {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    let mut imports = BTreeMap::new();
    for file in &files {
        let module = module_of(&src, file);
        if module == "main" || module.is_empty() {
            continue;
        }
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let here: Vec<String> = module.split("::").map(str::to_string).collect();
        let mut named = BTreeSet::new();
        for path in crate_paths(&code, &here) {
            // The longest prefix that is a module of its own file.
            let target = (1..=path.len())
                .rev()
                .map(|n| path[..n].join("::"))
                .find(|p| modules.contains(p));
            if let Some(target) = target
                && target != module
            {
                named.insert(target);
            }
        }
        imports.insert(module, named);
    }
    House { imports }
}

fn layer_of(module: &str) -> Option<usize> {
    let top = module.split("::").next()?;
    LAYERS.iter().position(|l| *l == top)
}

/// `stages::submit::users` -> `submit`.
fn stage_of(module: &str) -> Option<&str> {
    let mut parts = module.split("::");
    (parts.next() == Some("stages"))
        .then(|| parts.next())
        .flatten()
}

#[test]
fn no_module_imports_a_layer_above_it() {
    let house = read_house();
    let mut up = Vec::new();
    for (from, named) in &house.imports {
        let Some(from_layer) = layer_of(from) else {
            continue;
        };
        for to in named {
            if let Some(to_layer) = layer_of(to)
                && to_layer > from_layer
                && !ALLOWED_UP.contains(&(from.as_str(), to.as_str()))
            {
                up.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(
        up.is_empty(),
        "modules that import a layer above their own (layers from the bottom: {}):\n  {}",
        LAYERS.join(", "),
        up.join("\n  ")
    );
    assert!(
        ALLOWED_UP.len() <= 2,
        "at most two imports may point up a layer"
    );
}

#[test]
fn no_stage_imports_another() {
    let house = read_house();
    let mut crossing = Vec::new();
    for (from, named) in &house.imports {
        let Some(stage) = stage_of(from) else {
            continue;
        };
        for to in named {
            if let Some(other) = stage_of(to)
                && other != stage
            {
                crossing.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(
        crossing.is_empty(),
        "stages that import another stage (what they share belongs below them):\n  {}",
        crossing.join("\n  ")
    );
}

#[test]
fn the_simulator_names_only_the_apple_edge() {
    let house = read_house();
    let mut outside = Vec::new();
    for (from, named) in &house.imports {
        if !from.starts_with("sim") {
            continue;
        }
        for to in named {
            let allowed = to.starts_with("sim")
                || SIM_MAY_USE
                    .iter()
                    .any(|p| to == p || to.starts_with(&format!("{p}::")));
            if !allowed {
                outside.push(format!("{from} -> {to}"));
            }
        }
    }
    assert!(
        outside.is_empty(),
        "the simulator names the pipeline (it may use {}):\n  {}",
        SIM_MAY_USE.join(", "),
        outside.join("\n  ")
    );
    // Nothing of vppd's own depends on the simulator but the commands that run it.
    let mut users = Vec::new();
    for (from, named) in &house.imports {
        if from.starts_with("sim") || from.starts_with("cli") {
            continue;
        }
        if named.iter().any(|to| to.starts_with("sim")) {
            users.push(from.clone());
        }
    }
    assert!(
        users.is_empty(),
        "modules that use the simulator: {users:?}"
    );
}

#[test]
fn no_import_cycles() {
    let house = read_house();
    // Tarjan's strongly connected components over the module graph.
    struct Walk<'a> {
        graph: &'a BTreeMap<String, BTreeSet<String>>,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        next: usize,
        cycles: Vec<Vec<&'a str>>,
    }
    impl<'a> Walk<'a> {
        fn visit(&mut self, v: &'a str) {
            self.index.insert(v, self.next);
            self.low.insert(v, self.next);
            self.next += 1;
            self.stack.push(v);
            self.on_stack.insert(v);
            let graph = self.graph;
            for w in graph.get(v).into_iter().flatten() {
                let w = w.as_str();
                if !graph.contains_key(w) {
                    continue;
                }
                if !self.index.contains_key(w) {
                    self.visit(w);
                    let low = self.low[v].min(self.low[w]);
                    self.low.insert(v, low);
                } else if self.on_stack.contains(w) {
                    let low = self.low[v].min(self.index[w]);
                    self.low.insert(v, low);
                }
            }
            if self.low[v] == self.index[v] {
                let mut component = Vec::new();
                while let Some(w) = self.stack.pop() {
                    self.on_stack.remove(w);
                    component.push(w);
                    if w == v {
                        break;
                    }
                }
                if component.len() > 1 {
                    component.sort();
                    self.cycles.push(component);
                }
            }
        }
    }
    // A module and its own submodules form one room: `a` naming `a::b`
    // and `a::b` naming `a` (its parent's items) is no cycle between rooms.
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, named) in &house.imports {
        let edges = named
            .iter()
            .filter(|to| {
                !to.starts_with(&format!("{from}::")) && !from.starts_with(&format!("{to}::"))
            })
            .cloned()
            .collect();
        graph.insert(from.clone(), edges);
    }
    let mut walk = Walk {
        graph: &graph,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        next: 0,
        cycles: Vec::new(),
    };
    for v in graph.keys() {
        if !walk.index.contains_key(v.as_str()) {
            walk.visit(v);
        }
    }
    let cycles: Vec<_> = walk
        .cycles
        .into_iter()
        .filter(|c| !c.iter().all(|m| m.starts_with("sim")))
        .collect();
    assert!(
        cycles.is_empty(),
        "modules that import each other in a circle (outside the simulator):\n  {}",
        cycles
            .iter()
            .map(|c| c.join(" <-> "))
            .collect::<Vec<_>>()
            .join("\n  ")
    );
}

/// The checks above read the code; this one checks that they can fail, on
/// a path they must catch.
#[test]
fn the_reader_finds_crate_paths_outside_comments() {
    let code = code_of(
        "use crate::stages::submit::Submitter;\n// crate::cli::demo\nlet s = \"crate::sim\";\nfn f() { crate::store::open(x) }\n#[cfg(test)]\nuse crate::cli::x;\n",
    );
    let here = ["stages".to_string(), "track".to_string()];
    let paths: Vec<String> = crate_paths(&code, &here)
        .iter()
        .map(|p| p.join("::"))
        .collect();
    assert_eq!(paths, ["stages::submit::Submitter", "store::open"]);
    let relative = crate_paths("use super::users::Step;\nlet x = a::super_b;\n", &here);
    assert_eq!(relative, [["stages", "users", "Step"]]);
    assert_eq!(stage_of("stages::submit::users"), Some("submit"));
    assert_eq!(layer_of("runtime::context"), Some(3));
}
