//! `sqil-policy`: runs a compiled CPU policy (`sqil_driver::runner`), given an artifact path or
//! with one appended (`sqil build --target exe`).

fn main() {
    sqil_runtime::default_sigpipe();
    sqil_runtime::keep_freed_memory();
    let res = sqil_driver::runner::embedded().and_then(|e| sqil_driver::runner::run(std::env::args().skip(1), e));
    if let Err(e) = res {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
}
