//! Every input in `testdata/fuzz/regressions/<target>/` (inputs that once panicked, aborted or
//! hung, and the hostile cases of issue 20) and every seed runs through its target without a
//! panic; and a short fuzzing run per target (CI's smoke run, a few seconds each) finds nothing.

use sqil_fuzz::{corpus, mutate, run_target, Rng, TARGETS};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/fuzz")
}

#[test]
fn seeds_and_regressions_never_panic() {
    let scratch = std::env::temp_dir().join(format!("sqil-fuzz-reg-{}", std::process::id()));
    let mut n = 0;
    for t in TARGETS {
        for dir in [root().join(t), root().join("regressions").join(t)] {
            for (p, bytes) in corpus(&dir) {
                let r = std::panic::catch_unwind(|| run_target(t, &bytes, &scratch));
                assert!(r.is_ok(), "{t}: {} panicked", p.display());
                n += 1;
            }
        }
    }
    assert!(n >= 30, "only {n} seed and regression inputs");
}

#[test]
fn a_short_mutation_run_per_target_finds_nothing() {
    // In-process (a panic fails the test; the process-level run with abort and hang detection is
    // `sqil-fuzz`, run by tools/test.sh for a few seconds per target).
    let scratch = std::env::temp_dir().join(format!("sqil-fuzz-smoke-{}", std::process::id()));
    for t in TARGETS {
        let seeds = corpus(&root().join(t));
        assert!(!seeds.is_empty(), "{t}: no seeds");
        let mut r = Rng(0x5eed ^ t.len() as u64);
        for i in 0..400 {
            let a = &seeds[r.below(seeds.len())].1;
            let b = &seeds[r.below(seeds.len())].1;
            let input = mutate(&mut r, a, b, *t == "ir");
            let res = std::panic::catch_unwind(|| run_target(t, &input, &scratch));
            assert!(
                res.is_ok(),
                "{t}: mutated input {i} panicked: {:?}",
                String::from_utf8_lossy(&input[..input.len().min(200)])
            );
        }
    }
}
