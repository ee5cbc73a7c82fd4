//! The CI smoke pass of the fuzz targets, on stable and without libFuzzer: every target in
//! `fuzz/src/lib.rs` (the very functions `cargo xtask fuzz` runs under libFuzzer) over its
//! checked-in corpus `fuzz/corpus/<target>/`, plus a fixed set of deterministic mutations of
//! each seed (truncations, byte substitutions, duplicated spans), so hostile neighbours of
//! the valid seeds are replayed on every CI run. A panic or a broken promise fails the test
//! and names the target, the seed and the mutation.
//!
//! `cargo test -p tollgate-tests --test fuzz_corpus`

#[path = "../../fuzz/src/lib.rs"]
#[allow(
    dead_code,
    reason = "the replay uses the targets' checks, not every helper of the fuzz crate"
)]
mod targets;

use std::path::{Path, PathBuf};

/// Mutations per seed and kind (keeps the whole pass to seconds on a shared 2-core box).
const PER_KIND: usize = 48;

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target)
}

/// `n` positions spread over `0..len` (all of them when there are fewer).
fn spread(len: usize, n: usize) -> Vec<usize> {
    if len <= n {
        return (0..len).collect();
    }
    (0..n).map(|i| i * len / n).collect()
}

/// The seed itself, then its deterministic neighbours.
fn mutations(seed: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = vec![("seed".to_string(), seed.to_vec())];
    for at in spread(seed.len(), PER_KIND) {
        out.push((format!("truncated at {at}"), seed[..at].to_vec()));
    }
    // Bytes that change a parser's path: quotes, braces, separators, digits, non-ASCII, NUL.
    const SUBST: &[u8] = b"\"{}[]:,=&/% 0-9\xc3\xff\0";
    for (i, at) in spread(seed.len(), PER_KIND).into_iter().enumerate() {
        let mut m = seed.to_vec();
        m[at] = SUBST[i % SUBST.len()];
        out.push((format!("byte {at} := {:#04x}", m[at]), m));
    }
    for at in spread(seed.len(), PER_KIND / 4) {
        let end = (at + 16).min(seed.len());
        let mut m = seed[..end].to_vec();
        m.extend_from_slice(&seed[at..]);
        out.push((format!("bytes {at}..{end} doubled"), m));
    }
    out
}

#[test]
fn every_target_survives_its_corpus_and_its_mutations() {
    let mut total = 0usize;
    for (name, target) in targets::TARGETS {
        let dir = corpus_dir(name);
        let mut seeds: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus {} missing: {e}", dir.display()))
            .map(|e| e.expect("corpus entry").path())
            .collect();
        seeds.sort();
        assert!(
            seeds.len() >= 3,
            "{name}: expected a handful of seeds in {}",
            dir.display()
        );
        for path in &seeds {
            let seed = std::fs::read(path).expect("read seed");
            for (what, input) in mutations(&seed) {
                let run = std::panic::catch_unwind(|| target(&input));
                if let Err(panic) = run {
                    let msg = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    panic!(
                        "fuzz target {name} failed on {} ({what}): {msg}\ninput: {:?}",
                        path.display(),
                        String::from_utf8_lossy(&input)
                    );
                }
                total += 1;
            }
        }
        println!("{name}: {} seeds", seeds.len());
    }
    println!("{total} inputs replayed");
}
