//! A policy's lowered GPU steps, without a GPU: `cargo run --release -p sqil-cuda --example steps --
//! ARTIFACT...` prints, per artifact, each step's kernel, threads and the plan step it comes from
//! (which kernel each layer takes; `sqil-cuda-bench policy --profile` times them on a GPU).
fn main() -> std::process::ExitCode {
    let mut ok = true;
    for a in std::env::args().skip(1) {
        let lowered = sqil_runtime::Policy::load(std::path::Path::new(&a))
            .map_err(|e| e.to_string())
            .and_then(|p| sqil_cuda::lower::lower(&p).map_err(|e| e.to_string()));
        match lowered {
            Ok(l) => {
                println!("{a}: {} steps", l.steps.len());
                for (i, (s, label)) in l.steps.iter().zip(&l.labels).enumerate() {
                    let sqil_cuda::lower::LStep::Kernel { threads, .. } = s;
                    println!("  {i:3} {threads:>8} threads  {label}");
                }
            }
            Err(e) => {
                eprintln!("{a}: {e}");
                ok = false;
            }
        }
    }
    if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
