//! `sqil`: the command line of the sqil compiler.

use clap::{Parser, Subcommand};
use sqil::{inspect, npy};
use sqil_ir::interp::Interpreter;
use sqil_ir::{print_graph, Graph, PrintOptions};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "sqil", version, about = "Compile imitation-learning policies into faithful low-bit executables")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Summarise a model: per-layer op, shapes, parameters, FLOPs and size at f32 and int4.
    Inspect {
        /// An ONNX model, or IR text (`.sqil`).
        model: PathBuf,
        /// Print the IR text instead of the table.
        #[arg(long)]
        ir: bool,
        /// With --ir: elide constants with more elements than this (the text then no longer parses).
        #[arg(long)]
        elide: Option<usize>,
        /// Run the clean-up passes (shape inference, constant folding, dead code) first.
        #[arg(long)]
        optimize: bool,
        /// Print the IR before and after every pass (with --optimize).
        #[arg(long)]
        dump_ir: bool,
    },
    /// Run a model on a batch with the reference interpreter.
    Run {
        model: PathBuf,
        /// Input arrays (.npy), in the model's input order, or as NAME=PATH.
        #[arg(long = "input", required = true)]
        inputs: Vec<String>,
        /// Where to write the outputs (.npy), in the model's output order.
        #[arg(long = "output", required = true)]
        outputs: Vec<PathBuf>,
    },
}

/// Loads an ONNX model or IR text, by extension.
fn load(path: &Path) -> Result<Graph, String> {
    let g = if path.extension().is_some_and(|e| e == "sqil") {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        sqil_ir::parse_graph(&text).map_err(|e| format!("{}: {e}", path.display()))?
    } else {
        sqil_onnx::load_model(path).map_err(|e| e.to_string())?
    };
    sqil_ir::verify(&g).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(g)
}

fn run(cmd: Cmd) -> Result<(), String> {
    match cmd {
        Cmd::Inspect { model, ir, elide, optimize, dump_ir } => {
            let mut g = load(&model)?;
            if optimize {
                let mut pm = sqil_passes::cleanup_pipeline();
                pm.dump_ir = dump_ir;
                pm.run(&mut g, &mut sqil_passes::PassCtx::default()).map_err(|e| e.to_string())?;
            }
            if ir {
                print!("{}", print_graph(&g, &PrintOptions { elide_over: elide }).map_err(|e| e.to_string())?);
            } else {
                print!("{}", inspect::render(&inspect::summarise(&g)?, &model.display().to_string()));
            }
            Ok(())
        }
        Cmd::Run { model, inputs, outputs } => {
            let g = load(&model)?;
            let names: Vec<String> = g.inputs.iter().map(|&i| g.node(i).outputs[0].name.clone()).collect();
            if inputs.len() != names.len() {
                return Err(format!(
                    "{} takes {} input(s) ({}), {} given",
                    model.display(),
                    names.len(),
                    names.join(", "),
                    inputs.len()
                ));
            }
            let mut feeds = HashMap::new();
            for (k, spec) in inputs.iter().enumerate() {
                let (name, path) = match spec.split_once('=') {
                    Some((n, p)) => (n.to_string(), p),
                    None => (names[k].clone(), spec.as_str()),
                };
                feeds.insert(name, npy::read(Path::new(path))?);
            }
            let outs = Interpreter::new(&g).and_then(|i| i.run(&feeds)).map_err(|e| e.to_string())?;
            if outputs.len() != outs.len() {
                return Err(format!(
                    "{} has {} output(s), {} --output path(s) given",
                    model.display(),
                    outs.len(),
                    outputs.len()
                ));
            }
            for (t, p) in outs.iter().zip(&outputs) {
                npy::write(p, t)?;
            }
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.cmd) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
