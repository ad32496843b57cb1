//! Golden filetests: each `testdata/filetests/*.sqil` starts with `; passes: a, b` and holds
//! an input graph; the pipeline's output must equal `<name>.expected.sqil` byte for byte.
//! `BLESS=1 cargo test -p sqil-passes --test filetests` rewrites the expected files.

use sqil_ir::{parse_graph, print_graph, verify, PrintOptions};
use sqil_passes::{PassCtx, PassManager};
use std::path::PathBuf;

#[test]
fn filetests() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../testdata/filetests");
    let bless = std::env::var("BLESS").is_ok();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sqil") && !p.to_string_lossy().ends_with(".expected.sqil"))
        .collect();
    files.sort();
    assert!(files.len() >= 5, "filetests missing in {}", dir.display());
    let mut failures = vec![];
    for f in &files {
        let src = std::fs::read_to_string(f).unwrap();
        let header = src
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("; passes:"))
            .unwrap_or_else(|| panic!("{}: first line must be `; passes: ...`", f.display()));
        let names: Vec<&str> = header.split(',').map(str::trim).collect();
        let mut g = parse_graph(&src).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        verify(&g).unwrap_or_else(|e| panic!("{}: input does not verify: {e}", f.display()));
        let mut pm = PassManager::from_names(&names).unwrap();
        pm.run(&mut g, &mut PassCtx::default()).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let got = format!("; passes:{header}\n{}", print_graph(&g, &PrintOptions::default()).unwrap());
        let expected = f.with_extension("expected.sqil");
        if bless {
            std::fs::write(&expected, &got).unwrap();
            continue;
        }
        match std::fs::read_to_string(&expected) {
            Ok(want) if want == got => {}
            Ok(want) => failures.push(format!("{}:\n--- expected\n{want}\n+++ got\n{got}", f.display())),
            Err(_) => failures.push(format!("{}: no {} (run with BLESS=1)", f.display(), expected.display())),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
