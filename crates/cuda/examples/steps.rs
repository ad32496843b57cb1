//! A policy's lowered GPU steps, without a GPU: `cargo run --release -p sqil-cuda --example steps --
//! ARTIFACT...` prints, per artifact, each step's kernel, threads and the plan step it comes from
//! (which kernel each layer takes; `sqil-cuda-bench policy --profile` times them on a GPU).
//! `--sources` prints the generated element-wise kernels too; `--program` prints instead the whole
//! CUDA source of the policy's persistent program (to compile it offline and read its PTX or SASS:
//! `tools/sass.sh`). Output closed early (`| head`): it stops quietly.
use std::io::Write;

fn main() -> std::process::ExitCode {
    let mut ok = true;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let sources = args.iter().any(|a| a == "--sources");
    let program = args.iter().any(|a| a == "--program");
    let mut out = std::io::stdout().lock();
    for a in args.iter().filter(|a| !matches!(a.as_str(), "--sources" | "--program")) {
        let lowered = sqil_runtime::Policy::load(std::path::Path::new(a))
            .map_err(|e| e.to_string())
            .and_then(|p| sqil_cuda::lower::lower(&p).map_err(|e| e.to_string()));
        match lowered {
            Ok(l) if program => match sqil_cuda::fused::fuse(&l) {
                Ok(f) => {
                    if writeln!(out, "// {a}: kernel {}\n{}", f.name, f.src).is_err() {
                        return std::process::ExitCode::SUCCESS;
                    }
                }
                Err(why) => {
                    eprintln!("{a}: no persistent program: {why}");
                    ok = false;
                }
            },
            Ok(l) => {
                let mut text = format!("{a}: {} steps\n", l.steps.len());
                for (i, (s, label)) in l.steps.iter().zip(&l.labels).enumerate() {
                    let sqil_cuda::lower::LStep::Kernel { threads, .. } = s;
                    text.push_str(&format!("  {i:3} {threads:>8} threads  {label}\n"));
                }
                if sources {
                    for (name, src) in &l.sources {
                        text.push_str(&format!("{name}:{src}\n"));
                    }
                }
                if out.write_all(text.as_bytes()).is_err() {
                    // The reader went away: nothing more to say.
                    return std::process::ExitCode::SUCCESS;
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
