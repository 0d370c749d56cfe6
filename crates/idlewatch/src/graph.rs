//! The dependency graph of an [`IdleGroup`](crate::IdleGroup), checked once at construction:
//! every dependency names a workload of the group, no name appears twice, and there is no
//! cycle — a cycle is reported spelled out (`a → b → c → a`). The order it returns has every
//! dependency before its dependents, so watchers can be built (and started) in it.

use std::collections::HashMap;

use crate::config::IdleConfig;

/// Indices of `configs` with dependencies first, or every problem found.
pub(crate) fn dependency_order(configs: &[IdleConfig]) -> Result<Vec<usize>, Vec<String>> {
    let mut problems = Vec::new();
    let mut index = HashMap::new();
    for (i, config) in configs.iter().enumerate() {
        if index.insert(config.workload.name(), i).is_some() {
            problems.push(format!("workload {} is watched twice", config.workload.name()));
        }
    }
    for config in configs {
        for dependency in &config.depends_on {
            if !index.contains_key(dependency.workload.as_str()) {
                problems.push(format!(
                    "{} depends on {}, which is not in the group",
                    config.workload.name(),
                    dependency.workload
                ));
            }
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    // Depth-first search with three colours; the path on the stack spells a cycle out.
    #[derive(Clone, Copy, PartialEq)]
    enum Colour {
        White,
        Grey,
        Black,
    }
    let mut colour = vec![Colour::White; configs.len()];
    let mut order = Vec::with_capacity(configs.len());
    for root in 0..configs.len() {
        if colour[root] != Colour::White {
            continue;
        }
        // (node, next edge to follow)
        let mut stack = vec![(root, 0)];
        colour[root] = Colour::Grey;
        while let Some(&mut (node, ref mut edge)) = stack.last_mut() {
            let edges = &configs[node].depends_on;
            if *edge == edges.len() {
                colour[node] = Colour::Black;
                order.push(node);
                stack.pop();
                continue;
            }
            let next = index[edges[*edge].workload.as_str()];
            *edge += 1;
            match colour[next] {
                Colour::White => {
                    colour[next] = Colour::Grey;
                    stack.push((next, 0));
                }
                Colour::Grey => {
                    let start = stack.iter().position(|&(n, _)| n == next).unwrap_or(0);
                    let mut cycle: Vec<&str> =
                        stack[start..].iter().map(|&(n, _)| configs[n].workload.name()).collect();
                    cycle.push(configs[next].workload.name());
                    problems.push(format!("dependency cycle: {}", cycle.join(" → ")));
                }
                Colour::Black => {}
            }
        }
    }
    if problems.is_empty() { Ok(order) } else { Err(problems) }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{Dependency, DependencyCondition, Workload};

    fn node(name: &str, deps: &[&str]) -> IdleConfig {
        let mut config = IdleConfig::new(Workload::Container(name.into()), Duration::from_secs(1));
        config.depends_on = deps
            .iter()
            .map(|d| Dependency {
                workload: (*d).into(),
                condition: DependencyCondition::Healthy,
                optional: false,
            })
            .collect();
        config
    }

    #[test]
    fn dependencies_come_first() {
        let configs =
            [node("app", &["db", "cache"]), node("cache", &["db"]), node("db", &[]), node("b", &["db"])];
        let order = dependency_order(&configs).unwrap();
        let position = |name: &str| order.iter().position(|&i| configs[i].workload.name() == name).unwrap();
        assert!(position("db") < position("cache"));
        assert!(position("cache") < position("app"));
        assert!(position("db") < position("b"));
        assert_eq!(order.len(), 4);
    }

    #[test]
    fn a_cycle_is_spelled_out() {
        let configs = [node("a", &["b"]), node("b", &["c"]), node("c", &["a"]), node("d", &[])];
        assert_eq!(dependency_order(&configs).unwrap_err(), ["dependency cycle: a → b → c → a"]);
    }

    #[test]
    fn unknown_and_duplicate_names_are_reported_together() {
        let configs = [node("a", &["ghost"]), node("a", &[]), node("b", &["phantom"])];
        let problems = dependency_order(&configs).unwrap_err();
        assert_eq!(
            problems,
            [
                "workload a is watched twice",
                "a depends on ghost, which is not in the group",
                "b depends on phantom, which is not in the group"
            ]
        );
    }
}
