//! `sqil-fuzz`: mutation fuzzing of sqil's readers (see the library docs).
//!
//!     sqil-fuzz all|TARGET [--seconds 60] [--seed 1] [--corpus testdata/fuzz] [--out target/fuzz]
//!     sqil-fuzz replay TARGET FILE
//!
//! Each target runs in a child process for its share of the time; a child that dies (an abort, a
//! hang stopped by the watchdog) has its last input saved under `<out>/crashes/` and is restarted
//! with the next seed. Panics are caught in the child and saved the same way. Prints one line per
//! target (executions, inputs per second, failures) and exits non-zero if anything failed.

use sqil_fuzz::{cap_memory, corpus, mutate, run_target, Rng, TARGETS};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

fn arg(a: &[String], name: &str) -> Option<String> {
    a.iter().position(|x| x == name).and_then(|i| a.get(i + 1)).cloned()
}

/// Seconds an input may run before the watchdog calls it a hang.
const HANG_SECS: u64 = 10;

fn child(target: &str, seconds: f64, seed: u64, corpus_dir: &Path, out: &Path) -> ! {
    cap_memory(6 << 30);
    let seeds = corpus(&corpus_dir.join(target));
    if seeds.is_empty() {
        eprintln!("no seeds in {}", corpus_dir.join(target).display());
        std::process::exit(2);
    }
    let current = out.join(format!("{target}.current"));
    let scratch = out.join(format!("{target}.scratch"));
    static STARTED: AtomicU64 = AtomicU64::new(0);
    let t0 = Instant::now();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(500));
        let s = STARTED.load(Ordering::Relaxed);
        if s != 0 && t0.elapsed().as_millis() as u64 - s > HANG_SECS * 1000 {
            eprintln!("hang: an input ran over {HANG_SECS} s");
            std::process::abort();
        }
    });
    std::panic::set_hook(Box::new(|_| {})); // panics are reported below, with their input
    let text = matches!(target, "ir");
    let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let (mut execs, mut panics) = (0u64, 0u64);
    while t0.elapsed().as_secs_f64() < seconds {
        let a = &seeds[r.below(seeds.len())].1;
        let b = &seeds[r.below(seeds.len())].1;
        let input = if execs % 8 == 0 { a.clone() } else { mutate(&mut r, a, b, text) };
        std::fs::write(&current, &input).ok();
        STARTED.store((t0.elapsed().as_millis() as u64).max(1), Ordering::Relaxed);
        let ok = std::panic::catch_unwind(|| run_target(target, &input, &scratch)).is_ok();
        STARTED.store(0, Ordering::Relaxed);
        execs += 1;
        if !ok {
            panics += 1;
            let p = out.join("crashes").join(format!("{target}-panic-{seed}-{execs}.bin"));
            std::fs::write(&p, &input).ok();
            eprintln!("panic on {}", p.display());
        }
    }
    println!("{execs} {panics}");
    std::process::exit(0)
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let corpus_dir = PathBuf::from(arg(&a, "--corpus").unwrap_or_else(|| "testdata/fuzz".into()));
    let out = PathBuf::from(arg(&a, "--out").unwrap_or_else(|| "target/fuzz".into()));
    let seconds: f64 = arg(&a, "--seconds").and_then(|s| s.parse().ok()).unwrap_or(60.0);
    let seed: u64 = arg(&a, "--seed").and_then(|s| s.parse().ok()).unwrap_or(1);
    std::fs::create_dir_all(out.join("crashes")).expect("output folder");
    if a.get(1).map(String::as_str) == Some("replay") {
        // `sqil-fuzz replay TARGET FILE`: one input, panics not caught (their message shows).
        let bytes = std::fs::read(&a[3]).expect("read the input");
        run_target(&a[2], &bytes, &out.join("replay.scratch"));
        println!("{}: no panic", a[3]);
        return;
    }
    if a.get(1).map(String::as_str) == Some("regen") {
        // `sqil-fuzz regen TARGET SEED N FILE`: input number N of a child run with SEED (runs are
        // deterministic), for a failure reported by a machine whose files did not come back.
        let (t, seed, n): (&str, u64, u64) = (&a[2], a[3].parse().expect("seed"), a[4].parse().expect("index"));
        let seeds = corpus(&corpus_dir.join(t));
        let mut r = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
        for i in 0..=n {
            let x = &seeds[r.below(seeds.len())].1;
            let y = &seeds[r.below(seeds.len())].1;
            let input = if i % 8 == 0 { x.clone() } else { mutate(&mut r, x, y, t == "ir") };
            if i == n {
                std::fs::write(&a[5], input).expect("write");
            }
        }
        return;
    }
    if a.get(1).map(String::as_str) == Some("--child") {
        child(&a[2], seconds, seed, &corpus_dir, &out);
    }
    let which: Vec<&str> = match a.get(1).map(String::as_str) {
        Some("all") | None => TARGETS.to_vec(),
        Some(t) if TARGETS.contains(&t) => vec![t],
        Some(t) => {
            eprintln!("unknown target `{t}` (targets: all, {})", TARGETS.join(", "));
            std::process::exit(2);
        }
    };
    let exe = std::env::current_exe().expect("own path");
    let mut failed = 0;
    for t in which {
        let t0 = Instant::now();
        let (mut execs, mut fails, mut s) = (0u64, 0u64, seed);
        while t0.elapsed().as_secs_f64() < seconds {
            let left = seconds - t0.elapsed().as_secs_f64();
            let o = std::process::Command::new(&exe)
                .args(["--child", t, "--seconds", &format!("{left}"), "--seed", &s.to_string()])
                .args(["--corpus", &corpus_dir.display().to_string(), "--out", &out.display().to_string()])
                .output()
                .expect("run the child");
            let stdout = String::from_utf8_lossy(&o.stdout);
            if let Some((e, p)) = stdout.trim().rsplit('\n').next().and_then(|l| l.split_once(' ')) {
                execs += e.parse::<u64>().unwrap_or(0);
                fails += p.parse::<u64>().unwrap_or(0);
            }
            eprint!("{}", String::from_utf8_lossy(&o.stderr));
            if !o.status.success() {
                if o.status.code() == Some(2) {
                    failed += 1;
                    break;
                }
                fails += 1;
                let p = out.join("crashes").join(format!("{t}-abort-{s}.bin"));
                std::fs::copy(out.join(format!("{t}.current")), &p).ok();
                eprintln!("{t}: the child died ({}); its last input is {}", o.status, p.display());
            }
            s += 1;
        }
        let secs = t0.elapsed().as_secs_f64();
        println!("{t:<9} {execs:>9} inputs in {secs:>6.1} s ({:>7.0}/s), {fails} failures", execs as f64 / secs);
        if fails > 0 {
            failed += 1;
        }
    }
    std::process::exit(if failed > 0 { 1 } else { 0 });
}
