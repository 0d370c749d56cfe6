//! Replays every committed fuzz corpus (`fuzz/corpus/<target>/`) through its target's property,
//! on the stable toolchain and without a fuzzer: each input a fuzzing run kept is an ordinary
//! test case here.

use std::path::PathBuf;

#[test]
fn every_corpus_input_keeps_its_targets_properties() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    let mut replayed = 0;
    let mut failed = Vec::new();
    for (name, property) in fuzz_props::TARGETS {
        let dir = root.join(name);
        let mut inputs: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|entry| entry.expect("a directory entry").path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{name}: an empty corpus");
        for input in inputs {
            let data = std::fs::read(&input).unwrap_or_else(|e| panic!("{}: {e}", input.display()));
            let outcome = std::panic::catch_unwind(|| property(&data));
            if outcome.is_err() {
                failed.push(format!("{name}: {}", input.display()));
            }
            replayed += 1;
        }
    }
    eprintln!("replayed {replayed} inputs of {} targets", fuzz_props::TARGETS.len());
    assert!(failed.is_empty(), "inputs failing their target's property:\n{}", failed.join("\n"));
}
