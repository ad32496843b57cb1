//! The `sqil` command line (see the library half, `sqil_cli`, for the commands).

use clap::Parser;
use sqil_cli::{run, Cli};
use std::process::ExitCode;

fn main() -> ExitCode {
    sqil_runtime::default_sigpipe();
    // A copy of sqil with a policy appended (`sqil build --target exe` from an installation
    // without sqil-policy) is that policy's runner, not the compiler.
    match sqil_driver::runner::embedded() {
        Ok(Some(bytes)) => {
            sqil_runtime::keep_freed_memory();
            return match sqil_driver::runner::run(std::env::args().skip(1), Some(bytes)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            };
        }
        Ok(None) => {}
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
