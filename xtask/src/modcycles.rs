//! `cargo xtask modcycles [crate-dir]`: import cycles among a crate's top-level modules.
//!
//! Every top-level module declared in `src/lib.rs` is a node (`lib.rs` itself, the facade, is
//! not). Module A depends on module B when a file of A (A's own file and the files of its
//! submodules) names B through the crate root:
//!
//! * a path starting `crate::B` — in a `use` (groups included: `use crate::{B, C::x}` names B
//!   and C), a type, an expression, a pattern, an attribute's path or a macro's tokens
//!   (`$crate::B` in a `macro_rules!` included); doc comments, intra-doc links included, do
//!   not count;
//! * a path starting with `super::` that climbs to the crate root and goes on to `B`, counted
//!   from where it is written (in `src/a.rs`, `super::B` is `crate::B`; in `src/a/x.rs` it is
//!   `crate::a::B`, inside A);
//! * `crate::Name` where `lib.rs` re-exports `Name` from module B (`pub use b::Name`): the
//!   facade does not hide the dependency.
//!
//! Code under `#[cfg(test)]` does not count — a `#[cfg(test)] mod tests` block or file, a
//! test-only helper or `use`: tests may reach into any module without the library depending on
//! it, and the cycles this lint looks for are the library's. Nor does code under `#[cfg(doc)]`
//! (a `use` that only brings a name into scope for doc links). Everything else counts,
//! whatever other `cfg` it carries. `#[path]` attributes are not followed.
//!
//! The graph's strongly connected components (Tarjan's algorithm) of more than one module are
//! the cycles; each is printed with its modules and the edges that close it, and the task
//! fails. Without any, it prints `no import cycles among N modules`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// Dependencies between top-level modules: module → (module it names → first file naming it).
pub(crate) type Graph = BTreeMap<String, BTreeMap<String, PathBuf>>;

/// Checks the crate at `crate_dir`: `Ok` with the report when there is no cycle, `Err` with
/// the cycles otherwise.
pub(crate) fn run(crate_dir: &Path) -> Result<String, String> {
    let graph = crate_graph(crate_dir)?;
    let cycles = cycles(&graph);
    if cycles.is_empty() {
        return Ok(format!("no import cycles among {} modules", graph.len()));
    }
    let mut report =
        format!("{} import cycle(s) among the modules of {}:\n", cycles.len(), crate_dir.display());
    for cycle in &cycles {
        report.push_str(&format!("- cycle of {} modules: {}\n", cycle.len(), cycle.join(", ")));
        for from in cycle {
            for (to, file) in &graph[from] {
                if cycle.contains(to) {
                    let file = file.strip_prefix(crate_dir).unwrap_or(file);
                    report.push_str(&format!("    {from} -> {to} (in {})\n", file.display()));
                }
            }
        }
    }
    Err(report)
}

/// The module graph of the crate at `crate_dir`.
pub(crate) fn crate_graph(crate_dir: &Path) -> Result<Graph, String> {
    let src = crate_dir.join("src");
    let lib = src.join("lib.rs");
    let root = parse(&lib)?;
    let modules = top_level_modules(&root);
    let names: BTreeSet<String> = modules.iter().map(|m| m.name.clone()).collect();
    let reexports = reexports(&root, &names);
    let mut graph = Graph::new();
    for module in &modules {
        let mut edges = BTreeMap::new();
        let mut record = |file: &Path, found: BTreeSet<String>| {
            for to in found {
                if to != module.name {
                    edges.entry(to).or_insert_with(|| file.to_path_buf());
                }
            }
        };
        match &module.inline {
            Some(items) => {
                record(&lib, mentions(items, std::slice::from_ref(&module.name), &names, &reexports))
            }
            None => {
                for (file, path) in module_files(&src, &module.name)? {
                    let items = parse(&file)?.items;
                    record(&file, mentions(&items, &path, &names, &reexports));
                }
            }
        }
        graph.insert(module.name.clone(), edges);
    }
    Ok(graph)
}

fn parse(file: &Path) -> Result<syn::File, String> {
    let text = fs::read_to_string(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    syn::parse_file(&text).map_err(|e| format!("cannot parse {}: {e}", file.display()))
}

/// A module declared at the crate root.
struct TopModule<'a> {
    name: String,
    /// The items of a module written inline in `lib.rs` (`mod a { … }`).
    inline: Option<&'a [syn::Item]>,
}

fn top_level_modules(root: &syn::File) -> Vec<TopModule<'_>> {
    root.items
        .iter()
        .filter_map(|item| match item {
            syn::Item::Mod(m) if !is_test_or_doc_only(&m.attrs) => Some(TopModule {
                name: m.ident.to_string(),
                inline: m.content.as_ref().map(|(_, items)| items.as_slice()),
            }),
            _ => None,
        })
        .collect()
}

/// True for `#[cfg(test)]` and `#[cfg(doc)]` exactly: code that the library as built does not
/// contain.
fn is_test_or_doc_only(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && matches!(&a.meta, syn::Meta::List(list) if matches!(list.tokens.to_string().as_str(), "test" | "doc"))
    })
}

/// Names `lib.rs` brings in from its modules (`use a::{X, Y as Z}`): name → module.
fn reexports(root: &syn::File, modules: &BTreeSet<String>) -> BTreeMap<String, String> {
    fn walk(
        tree: &syn::UseTree,
        module: Option<&str>,
        modules: &BTreeSet<String>,
        out: &mut BTreeMap<String, String>,
    ) {
        match tree {
            syn::UseTree::Path(p) => {
                let name = p.ident.to_string();
                match module {
                    None if name == "crate" || name == "self" => walk(&p.tree, None, modules, out),
                    None if modules.contains(&name) => walk(&p.tree, Some(&name), modules, out),
                    None => {}
                    Some(m) => walk(&p.tree, Some(m), modules, out),
                }
            }
            syn::UseTree::Group(g) => g.items.iter().for_each(|t| walk(t, module, modules, out)),
            syn::UseTree::Name(n) => {
                if let Some(m) = module {
                    out.insert(n.ident.to_string(), m.to_owned());
                }
            }
            syn::UseTree::Rename(r) => {
                if let Some(m) = module {
                    out.insert(r.rename.to_string(), m.to_owned());
                }
            }
            syn::UseTree::Glob(_) => {}
        }
    }
    let mut out = BTreeMap::new();
    for item in &root.items {
        if let syn::Item::Use(u) = item
            && !is_test_or_doc_only(&u.attrs)
        {
            walk(&u.tree, None, modules, &mut out);
        }
    }
    out
}

/// The files of top-level module `name` under `src`, each with its module path
/// (`["a"]`, `["a", "x"]`…), following `mod x;` declarations (not `#[cfg(test)]` ones).
fn module_files(src: &Path, name: &str) -> Result<Vec<(PathBuf, Vec<String>)>, String> {
    let mut out = Vec::new();
    let mut pending = vec![(
        vec![name.to_owned()],
        locate(&src.join(name)).ok_or_else(|| {
            format!("module {name}: neither {0}.rs nor {0}/mod.rs under {1}", name, src.display())
        })?,
    )];
    while let Some((path, file)) = pending.pop() {
        let items = parse(&file)?.items;
        // Submodules of `a.rs` and of `a/mod.rs` both live in `a/`.
        let dir = if file.file_name().is_some_and(|f| f == "mod.rs") {
            file.parent().map(Path::to_path_buf)
        } else {
            Some(file.with_extension(""))
        };
        let mut declared = Vec::new();
        collect_mod_decls(&items, &mut Vec::new(), &mut declared);
        for inner in declared {
            let Some(dir) = &dir else { continue };
            let mut candidate = dir.clone();
            candidate.extend(&inner);
            if let Some(found) = locate(&candidate) {
                let mut sub = path.clone();
                sub.extend(inner);
                pending.push((sub, found));
            }
        }
        out.push((file, path));
    }
    out.sort();
    Ok(out)
}

/// `mod x;` declarations in `items`, inline modules' included (`mod a { mod b; }` is `a/b`).
fn collect_mod_decls(items: &[syn::Item], prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    for item in items {
        if let syn::Item::Mod(m) = item
            && !is_test_or_doc_only(&m.attrs)
        {
            prefix.push(m.ident.to_string());
            match &m.content {
                None => out.push(prefix.clone()),
                Some((_, inner)) => collect_mod_decls(inner, prefix, out),
            }
            prefix.pop();
        }
    }
}

/// `path.rs`, or `path/mod.rs`.
fn locate(path: &Path) -> Option<PathBuf> {
    let file = path.with_extension("rs");
    if file.is_file() {
        return Some(file);
    }
    let dir = path.join("mod.rs");
    dir.is_file().then_some(dir)
}

/// The top-level modules the items of the file at module path `path` name through the crate
/// root (see the module documentation).
pub(crate) fn mentions(
    items: &[syn::Item],
    path: &[String],
    modules: &BTreeSet<String>,
    reexports: &BTreeMap<String, String>,
) -> BTreeSet<String> {
    let mut finder = Finder { path: path.to_vec(), modules, reexports, found: BTreeSet::new() };
    for item in items {
        finder.visit_item(item);
    }
    finder.found
}

struct Finder<'a> {
    /// The module path of the code being visited (grows inside inline modules).
    path: Vec<String>,
    modules: &'a BTreeSet<String>,
    reexports: &'a BTreeMap<String, String>,
    found: BTreeSet<String>,
}

impl Finder<'_> {
    /// Records the top-level module a path (its segments' names) reaches through the crate
    /// root, if any.
    fn resolve(&mut self, segments: &[String]) {
        let Some(first) = segments.first() else { return };
        let rest: &[String] = if first == "crate" {
            &segments[1..]
        } else if first == "super" {
            let climbs = segments.iter().take_while(|s| *s == "super").count();
            // From module path `path`, `super` climbs one level: to the root after all of them.
            if climbs != self.path.len() {
                return;
            }
            &segments[climbs..]
        } else {
            return;
        };
        let Some(name) = rest.first() else { return };
        if self.modules.contains(name) {
            self.found.insert(name.clone());
        } else if let Some(module) = self.reexports.get(name) {
            self.found.insert(module.clone());
        }
    }

    /// Walks a `use` tree, resolving every leaf path.
    fn use_tree(&mut self, tree: &syn::UseTree, prefix: &mut Vec<String>) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(&p.tree, prefix);
                prefix.pop();
            }
            syn::UseTree::Group(g) => g.items.iter().for_each(|t| self.use_tree(t, prefix)),
            syn::UseTree::Name(n) => {
                prefix.push(n.ident.to_string());
                self.resolve(prefix);
                prefix.pop();
            }
            syn::UseTree::Rename(r) => {
                prefix.push(r.ident.to_string());
                self.resolve(prefix);
                prefix.pop();
            }
            syn::UseTree::Glob(_) => self.resolve(prefix),
        }
    }

    /// `crate :: a` and `super :: … :: a` sequences in a macro's tokens.
    fn tokens(&mut self, tokens: proc_macro2::TokenStream) {
        let mut run: Vec<String> = Vec::new();
        let mut colons = 0;
        for token in tokens {
            match token {
                proc_macro2::TokenTree::Ident(ident) => {
                    let ident = ident.to_string();
                    if run.is_empty() {
                        if ident == "crate" || ident == "super" {
                            run.push(ident);
                        }
                    } else if colons == 2 {
                        run.push(ident);
                        colons = 0;
                    } else {
                        self.finish_run(&mut run);
                        if ident == "crate" || ident == "super" {
                            run.push(ident);
                        }
                    }
                }
                proc_macro2::TokenTree::Punct(p) if p.as_char() == ':' && !run.is_empty() => colons += 1,
                proc_macro2::TokenTree::Group(group) => {
                    self.finish_run(&mut run);
                    colons = 0;
                    self.tokens(group.stream());
                }
                _ => {
                    self.finish_run(&mut run);
                    colons = 0;
                }
            }
        }
        self.finish_run(&mut run);
    }

    fn finish_run(&mut self, run: &mut Vec<String>) {
        if run.len() > 1 {
            self.resolve(run);
        }
        run.clear();
    }
}

impl<'ast> Visit<'ast> for Finder<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        let attrs = match item {
            syn::Item::Const(i) => &i.attrs,
            syn::Item::Enum(i) => &i.attrs,
            syn::Item::ExternCrate(i) => &i.attrs,
            syn::Item::Fn(i) => &i.attrs,
            syn::Item::ForeignMod(i) => &i.attrs,
            syn::Item::Impl(i) => &i.attrs,
            syn::Item::Macro(i) => &i.attrs,
            syn::Item::Mod(i) => &i.attrs,
            syn::Item::Static(i) => &i.attrs,
            syn::Item::Struct(i) => &i.attrs,
            syn::Item::Trait(i) => &i.attrs,
            syn::Item::TraitAlias(i) => &i.attrs,
            syn::Item::Type(i) => &i.attrs,
            syn::Item::Union(i) => &i.attrs,
            syn::Item::Use(i) => &i.attrs,
            _ => return syn::visit::visit_item(self, item),
        };
        if is_test_or_doc_only(attrs) {
            return;
        }
        syn::visit::visit_item(self, item);
    }

    fn visit_impl_item(&mut self, item: &'ast syn::ImplItem) {
        let attrs = match item {
            syn::ImplItem::Const(i) => &i.attrs,
            syn::ImplItem::Fn(i) => &i.attrs,
            syn::ImplItem::Type(i) => &i.attrs,
            syn::ImplItem::Macro(i) => &i.attrs,
            _ => return syn::visit::visit_impl_item(self, item),
        };
        if !is_test_or_doc_only(attrs) {
            syn::visit::visit_impl_item(self, item);
        }
    }

    fn visit_item_mod(&mut self, item: &'ast syn::ItemMod) {
        // An inline module: `super` inside it climbs from one level deeper.
        self.path.push(item.ident.to_string());
        syn::visit::visit_item_mod(self, item);
        self.path.pop();
    }

    fn visit_item_use(&mut self, item: &'ast syn::ItemUse) {
        self.use_tree(&item.tree, &mut Vec::new());
    }

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segments: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        self.resolve(&segments);
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.tokens(mac.tokens.clone());
        syn::visit::visit_macro(self, mac);
    }
}

/// The strongly connected components of more than one module, each sorted, in order of their
/// first module.
pub(crate) fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    let mut cycles: Vec<Vec<String>> =
        strongly_connected(graph).into_iter().filter(|c| c.len() > 1).collect();
    for c in &mut cycles {
        c.sort();
    }
    cycles.sort();
    cycles
}

/// Tarjan's strongly connected components, iteratively (no recursion depth to worry about).
fn strongly_connected(graph: &Graph) -> Vec<Vec<String>> {
    let nodes: Vec<&String> = graph.keys().collect();
    let index_of: BTreeMap<&String, usize> = nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
    let succ: Vec<Vec<usize>> =
        nodes.iter().map(|n| graph[*n].keys().filter_map(|to| index_of.get(to).copied()).collect()).collect();
    let n = nodes.len();
    let (mut index, mut low, mut on_stack) = (vec![usize::MAX; n], vec![0; n], vec![false; n]);
    let (mut next, mut stack, mut out) = (0, Vec::new(), Vec::new());
    for start in 0..n {
        if index[start] != usize::MAX {
            continue;
        }
        // (node, next successor to look at)
        let mut work = vec![(start, 0)];
        while let Some(&mut (v, ref mut i)) = work.last_mut() {
            if *i == 0 && index[v] == usize::MAX {
                index[v] = next;
                low[v] = next;
                next += 1;
                stack.push(v);
                on_stack[v] = true;
            }
            if let Some(&w) = succ[v].get(*i) {
                *i += 1;
                if index[w] == usize::MAX {
                    work.push((w, 0));
                } else if on_stack[w] {
                    low[v] = low[v].min(index[w]);
                }
                continue;
            }
            work.pop();
            if let Some(&(parent, _)) = work.last() {
                low[parent] = low[parent].min(low[v]);
            }
            if low[v] == index[v] {
                let mut component = Vec::new();
                while let Some(w) = stack.pop() {
                    on_stack[w] = false;
                    component.push(nodes[w].clone());
                    if w == v {
                        break;
                    }
                }
                out.push(component);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &str)], nodes: &[&str]) -> Graph {
        let mut g: Graph = nodes.iter().map(|n| ((*n).to_owned(), BTreeMap::new())).collect();
        for (from, to) in edges {
            g.entry((*from).to_owned()).or_default().insert((*to).to_owned(), PathBuf::from("x.rs"));
            g.entry((*to).to_owned()).or_default();
        }
        g
    }

    fn found(source: &str, path: &[&str]) -> Vec<String> {
        let modules: BTreeSet<String> = ["a", "b", "c", "d", "e", "f", "g", "h"].map(String::from).into();
        let reexports = BTreeMap::from([("Thing".to_owned(), "h".to_owned())]);
        let file = syn::parse_file(source).expect("valid Rust");
        let path: Vec<String> = path.iter().map(|s| (*s).to_owned()).collect();
        mentions(&file.items, &path, &modules, &reexports).into_iter().collect()
    }

    #[test]
    fn a_chain_without_a_way_back_has_no_cycle() {
        assert!(cycles(&graph(&[("a", "b"), ("b", "c"), ("a", "c")], &[])).is_empty());
    }

    #[test]
    fn each_strongly_connected_component_of_two_or_more_is_one_cycle() {
        let g = graph(
            &[("a", "b"), ("b", "c"), ("c", "a"), ("d", "a"), ("e", "f"), ("f", "e"), ("g", "g")],
            &["h"],
        );
        assert_eq!(cycles(&g), [vec!["a", "b", "c"], vec!["e", "f"]]);
    }

    #[test]
    fn two_cycles_joined_by_an_edge_one_way_stay_two() {
        let g = graph(&[("a", "b"), ("b", "a"), ("b", "c"), ("c", "d"), ("d", "c")], &[]);
        assert_eq!(cycles(&g), [vec!["a", "b"], vec!["c", "d"]]);
    }

    #[test]
    fn use_groups_name_each_module_they_reach() {
        assert_eq!(found("use crate::{b, c::X, d::{self, Y}};", &["a"]), ["b", "c", "d"]);
    }

    #[test]
    fn super_counts_only_when_it_climbs_to_the_crate_root() {
        assert_eq!(found("use super::b;", &["a"]), ["b"]);
        assert!(found("use super::b;", &["a", "x"]).is_empty(), "a::b is inside a");
        assert_eq!(found("use super::super::b;", &["a", "x"]), ["b"]);
        assert_eq!(found("mod inner { use super::super::c; }", &["a"]), ["c"]);
    }

    #[test]
    fn paths_in_code_types_and_macros_count() {
        assert_eq!(found("fn f() { crate::b::g(); }", &["a"]), ["b"]);
        assert_eq!(found("struct S { x: crate::c::T }", &["a"]), ["c"]);
        assert_eq!(found("fn f() { tracing::debug!(\"{}\", crate::d::X); }", &["a"]), ["d"]);
        assert_eq!(found("macro_rules! m { () => { $crate::e::f() }; }", &["a"]), ["e"]);
    }

    #[test]
    fn a_name_the_facade_re_exports_counts_for_its_module() {
        assert_eq!(found("use crate::Thing;", &["a"]), ["h"]);
        assert!(found("use crate::Unknown;", &["a"]).is_empty());
    }

    #[test]
    fn test_and_doc_only_code_does_not_count() {
        let source = "
            #[cfg(test)]
            mod tests { use crate::b; }
            #[cfg(test)]
            use crate::c;
            #[cfg(doc)]
            use crate::d;
            struct S;
            impl S {
                #[cfg(test)]
                fn helper() { crate::e::f(); }
            }
            #[cfg(feature = \"x\")]
            use crate::g;
        ";
        assert_eq!(found(source, &["a"]), ["g"]);
    }

    #[test]
    fn other_crates_and_local_paths_do_not_count() {
        assert!(found("use std::sync::Arc; use self::b::X; fn f() { b::g(); }", &["a"]).is_empty());
    }

    /// Writes `files` (path under `src/`, text) into a fresh crate directory.
    fn write_crate(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("a temporary directory");
        for (path, text) in files {
            let path = dir.path().join("src").join(path);
            fs::create_dir_all(path.parent().expect("under src")).expect("src directories");
            fs::write(path, text).expect("a source file");
        }
        dir
    }

    #[test]
    fn a_crate_with_a_cycle_through_a_submodule_file_fails_naming_it() {
        let dir = write_crate(&[
            ("lib.rs", "mod a;\nmod b;\nmod c;\n#[cfg(test)]\nmod tests;\npub use c::Thing;\n"),
            ("a.rs", "mod inner;\n"),
            ("a/inner.rs", "use crate::b::B;\n"),
            ("b/mod.rs", "pub struct B;\nfn f(thing: crate::Thing) -> crate::Thing { thing }\n"),
            ("c.rs", "pub struct Thing;\nuse super::a;\n"),
            ("tests.rs", "use crate::a; use crate::b; use crate::c;\n"),
        ]);
        let graph = crate_graph(dir.path()).expect("the crate parses");
        assert_eq!(graph.keys().collect::<Vec<_>>(), ["a", "b", "c"], "tests is not a node");
        assert_eq!(graph["a"]["b"], dir.path().join("src/a/inner.rs"));
        let report = run(dir.path()).expect_err("a -> b -> c -> a is a cycle");
        assert!(report.contains("cycle of 3 modules: a, b, c"), "{report}");
        assert!(report.contains("a -> b (in src/a/inner.rs)"), "{report}");
    }

    #[test]
    fn a_crate_without_a_cycle_passes_with_the_module_count() {
        let dir = write_crate(&[
            ("lib.rs", "mod a;\nmod b;\nmod c { pub fn f() {} }\n"),
            ("a.rs", "use crate::b::f;\n#[cfg(test)]\nmod tests { use crate::a; }\n"),
            ("b.rs", "pub fn f() { crate::c::f() }\n#[cfg(test)]\nmod tests { use crate::a; }\n"),
        ]);
        assert_eq!(run(dir.path()), Ok("no import cycles among 3 modules".to_owned()));
    }
}
