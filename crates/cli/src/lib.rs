//! The `sqil` command line as a library: the clap definition of every command and `run`, so
//! that other front ends (the Python package) run exactly the commands, defaults, checks and
//! messages of the CLI: `run_args(["compile", "model.onnx", "--demos", "d.npz", "-o", "out"])`.

use clap::{Args, Parser, Subcommand};
use sqil_driver::quantize::{quantize_cmd, render, QuantizeArgs};
use sqil_driver::{inspect, load_model as load, npy};
use sqil_ir::interp::Interpreter;
use sqil_ir::{print_graph, PrintOptions};
use sqil_passes::quant::{QuantConfig, Recipe};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(name = "sqil", version, about = "Compile imitation-learning policies into faithful low-bit executables")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
/// The quantization flags `quantize`, `compile` and `allocate` share: a config file (or the
/// defaults: W4A8, groups of 64, raw observations in float), then every flag given overrides it.
#[derive(Args, Debug)]
pub struct QuantFlags {
    /// A quantization config (.toml or .json, e.g. from `sqil allocate`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Weight bits: 2, 3, 4 or 8 [default: 4].
    #[arg(long)]
    wbits: Option<u8>,
    /// Activation bits: 4, 8, or `float` [default: 8].
    #[arg(long)]
    abits: Option<String>,
    /// Weight scale groups along the reduction axis: a size (32, 64, 128), `channel` or `tensor`
    /// [default: 64].
    #[arg(long)]
    group: Option<String>,
    /// Activation calibration: minmax, percentile or mse [default: minmax].
    #[arg(long)]
    act_calib: Option<String>,
    /// Extra config settings, `key=value` separated by commas (see QuantConfig).
    #[arg(long)]
    set: Option<String>,
}

impl QuantFlags {
    /// The config: the file or the defaults, then the flags given.
    fn config(&self) -> sqil_driver::Result<QuantConfig> {
        let mut cfg = match &self.config {
            Some(p) => QuantConfig::load(p)?,
            None => QuantConfig::default(),
        };
        let mut settings = vec![];
        settings.extend(self.wbits.map(|b| format!("wbits={b}")));
        settings.extend(self.abits.as_ref().map(|b| format!("abits={b}")));
        settings.extend(self.group.as_ref().map(|g| format!("group={g}")));
        settings.extend(self.act_calib.as_ref().map(|c| format!("calib={c}")));
        settings.extend(self.set.clone());
        cfg.apply_settings(&settings.join(","))?;
        Ok(cfg)
    }
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum Cmd {
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
        /// Print the IR before and after every pass (with --optimize or --passes).
        #[arg(long)]
        dump_ir: bool,
        /// Run these passes (comma-separated names, e.g. `const-fold,dce,fuse` or
        /// `insert-fake-quant(wbits=4 abits=8),lower-quant`) after --optimize; prints their notes.
        #[arg(long)]
        passes: Option<String>,
    },
    /// Run a model on a batch: ONNX or IR text with the reference interpreter, a compiled CPU
    /// artifact (`policy.bin` from `sqil compile`) with the runtime's int4 kernels.
    Run {
        model: PathBuf,
        /// Threads for large layers (artifacts).
        #[arg(long, default_value_t = 1, value_parser = positive)]
        threads: usize,
        /// Input arrays (.npy), in the model's input order, or as NAME=PATH.
        #[arg(long = "input", required = true)]
        inputs: Vec<String>,
        /// Where to write the outputs (.npy), in the model's output order.
        #[arg(long = "output", required = true)]
        outputs: Vec<PathBuf>,
    },
    /// The whole pipeline, chosen on held-out demonstration episodes: every PTQ recipe, SIS, QRD
    /// fine-tuning (LSQ) from the best one with best-so-far checkpoints, the best candidate
    /// shipped (never worse than the best PTQ on the held-out states), lowering, fusion.
    /// Writes OUT/model.sqil (simulation), OUT/model.onnx (QDQ), OUT/model.fused.sqil,
    /// OUT/policy.bin (the CPU artifact: plan + packed int4 weights, run by `sqil run`) and
    /// OUT/report.json; checkpoints to OUT/checkpoint.json (--resume continues).
    Compile(CompileCmd),
    /// Per-layer bit widths under a budget (saliency-guided by default): measures each layer's
    /// sensitivity, solves the knapsack exactly, writes a quantization config (.toml or .json)
    /// for `sqil quantize --config` / `sqil compile --config`, a JSON report and an SVG plot.
    Allocate {
        model: PathBuf,
        #[arg(long)]
        demos: PathBuf,
        /// Average weight bits (`3.5bits`), model size (`2MB`, `512KiB`, `90000B`) or estimated
        /// batch-1 latency (`50us`, `1.2ms`).
        #[arg(long)]
        budget: String,
        #[command(flatten)]
        alloc: AllocFlags,
        /// The base config (granularity, activations, calibration, kept layers; the allocation
        /// chooses each layer's weight bits).
        #[command(flatten)]
        quant: QuantFlags,
        /// PTQ recipe used to quantize each layer while measuring: rtn, mse, awq, gptq.
        #[arg(long, default_value = "mse")]
        recipe: String,
        /// The config to write (.toml or .json).
        #[arg(short, long)]
        output: PathBuf,
        #[arg(long)]
        report: Option<PathBuf>,
        /// Budget against predicted error, SVG.
        #[arg(long)]
        plot: Option<PathBuf>,
    },
    /// Post-training quantization with a named recipe, calibrated on demonstrations; writes
    /// QDQ ONNX (opset 21) and prints a per-layer report.
    Quantize {
        model: PathBuf,
        /// rtn (min-max round to nearest), mse (MSE-clipped), awq (activation-aware scaling), gptq.
        #[arg(long, default_value = "rtn")]
        recipe: String,
        #[command(flatten)]
        quant: QuantFlags,
        /// Demonstrations (.npz, sqil-demos/1) whose states calibrate the quantizers, or .npy
        /// batches, one per graph input (repeat the flag).
        #[arg(long, required = true)]
        calib: Vec<PathBuf>,
        /// Number of demonstration states used (spread evenly over the file).
        #[arg(long, default_value_t = 2048, value_parser = size_count)]
        calib_states: usize,
        /// Output: QDQ ONNX.
        #[arg(short, long)]
        output: PathBuf,
        /// Also write the FakeQuant IR (the exact simulation) as text.
        #[arg(long)]
        ir: Option<PathBuf>,
        /// Also write the report as JSON.
        #[arg(long)]
        report: Option<PathBuf>,
        /// Also write the CPU artifact (plan + packed int4 weights; `sqil run`, `sqil bench`).
        #[arg(long)]
        artifact: Option<PathBuf>,
    },
    /// Build a quantized simulation graph (IR text or QDQ-free FakeQuant model, e.g. OUT/model.sqil)
    /// for a target: `cpu` writes the CPU artifact (plan + packed int4 weights); `exe` a standalone
    /// executable (the sqil-policy runner with the artifact inside); `cuda` one standalone .cu file
    /// (kernels, weights, host code with a CUDA graph; nvcc builds it); `c` writes C99
    /// source for firmware into the output directory (`PREFIX.c`, `PREFIX.h`, `c_report.json`,
    /// and with `--selftest` a `selftest.c` checking the code against the runtime).
    Build {
        model: PathBuf,
        #[arg(long, value_enum, default_value_t = Target::Cpu)]
        target: Target,
        #[arg(short, long)]
        output: PathBuf,
        /// C target: the API's name (`PREFIX_act`, `PREFIX.h`).
        #[arg(long, default_value = "policy")]
        prefix: String,
        /// C and CUDA targets: .npy states (one file per policy input) for the self-test.
        #[arg(long)]
        selftest: Vec<PathBuf>,
        /// C target: how many of those states the self-test runs.
        #[arg(long, default_value_t = 8, value_parser = size_count)]
        selftest_states: usize,
        /// exe target: the runner to copy (default: `sqil-policy` next to `sqil` where it is
        /// installed, else `sqil` itself, which runs an appended policy the same way).
        #[arg(long)]
        runner: Option<PathBuf>,
    },
    /// Time a model or CPU artifact on random inputs: batch latency and throughput, one line of
    /// JSON per batch size (artifacts on the runtime's kernels, models on the interpreter).
    Bench {
        #[arg(required_unless_present = "peaks")]
        model: Option<PathBuf>,
        #[arg(long, default_value = "1,64", value_delimiter = ',', value_parser = size_count)]
        batch: Vec<usize>,
        /// Timed runs per batch size (after 10% warm-up runs).
        #[arg(long, default_value_t = 200, value_parser = positive)]
        iters: usize,
        #[arg(long, default_value_t = 1, value_parser = positive)]
        threads: usize,
        /// Also print each step's share of the time (artifacts only), one JSON line per step.
        #[arg(long)]
        profile: bool,
        /// First print this core's measured int8 (`vpdpbusd` / `vpmaddubsw`) and f32 (FMA)
        /// multiply-accumulate ceilings and its read bandwidth at 8 MiB and 512 MiB, one JSON line:
        /// what kernel rates (and batch-1 layers streaming their weights) are held against in the
        /// same run.
        #[arg(long)]
        peaks: bool,
    },
}

/// `sqil compile`'s flags (see [`Cmd::Compile`]).
#[derive(clap::Args)]
pub struct CompileCmd {
    model: PathBuf,
    /// Demonstrations: training states, actions (optional), and SIS. An .npz of arrays
    /// (docs/demos-format.md); built with `--features hdf5`, a robomimic or Minari dataset;
    /// with `--features parquet`, a LeRobot dataset folder.
    #[arg(long)]
    demos: PathBuf,
    /// sqil (QRD with SIS top-p weighting), qat (BC only), distill (alpha = 1), sis-weighted.
    #[arg(long, default_value = "sqil")]
    recipe: String,
    /// PTQ recipe that initialises fine-tuning: `all` (rtn, mse, awq and gptq, each scored on
    /// the held-out episodes, the best kept) or one of them.
    #[arg(long, default_value = "all")]
    init: String,
    #[command(flatten)]
    quant: QuantFlags,
    /// Fraction of the demonstration episodes held out to choose the candidate (at least one).
    #[arg(long, default_value_t = 0.1)]
    val_frac: f64,
    /// At most this many held-out states (spread evenly over the held-out episodes).
    #[arg(long, default_value_t = 5000, value_parser = size_count)]
    val_states: usize,
    /// Score the fine-tuned weights on the held-out states every N steps (0: 20 times a run).
    #[arg(long, default_value_t = 0)]
    val_every: usize,
    /// Stop fine-tuning after this many scorings without improvement (0: never).
    #[arg(long, default_value_t = 8)]
    patience: usize,
    /// The action space's box `LOW,HIGH` (the environment clips actions to it), `none`, or
    /// `auto`: the demonstrations' metadata (action_low / action_high) if it has them.
    #[arg(long, default_value = "auto", allow_hyphen_values = true)]
    action_box: String,
    /// Budget of the final check (the CPU artifact against the simulation on the held-out
    /// states), relative to the largest |action|.
    #[arg(long, default_value_t = sqil_runtime::PLAN_TOL, allow_hyphen_values = true)]
    plan_tol: f32,
    /// What ships: `best` (the best candidate on the held-out episodes), `finetuned` (the best
    /// fine-tuned checkpoint, for recipe studies) or `ptq` (the best PTQ recipe, no fine-tuning).
    #[arg(long, default_value = "best")]
    ship: String,
    /// HDF5 (robomimic, Minari Dict spaces) or LeRobot demonstrations: the observation keys
    /// (columns) to concatenate, in order (default: every 1-D or 2-D key, sorted by name;
    /// LeRobot: observation.state). A camera key ([T, H, W, C] frames; LeRobot: an image
    /// feature) in the list is the image input (one camera; default: the first by name).
    #[arg(long, value_delimiter = ',')]
    obs_keys: Vec<String>,
    /// Where the fine-tuning steps run: `cpu` (the interpreter, batches split over --threads)
    /// or `cuda` (the training graph on the first GPU, fp32, one CUDA graph per step).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
    /// With --device cuda: fine-tune data-parallel over GPUs 0..N of this machine (each GPU its
    /// shard of every batch, gradients summed with NCCL, the same optimizer state on every GPU;
    /// NCCL_NVLS_ENABLE=0 unless set). Checkpoints resume on any GPU count.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    gpus: u32,
    /// Where SIS scores are kept between compiles of the same policy, states and SIS settings
    /// (default: $SQIL_CACHE_DIR, else $XDG_CACHE_HOME/sqil, else ~/.cache/sqil).
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    /// Compute SIS even if the cache has it, and keep nothing.
    #[arg(long, conflicts_with = "cache_dir")]
    no_cache: bool,
    /// QRD: weight of the distillation term on critical states.
    #[arg(long, default_value_t = 2.0)]
    beta: f64,
    /// QRD: fraction of states (by SIS) that are critical.
    #[arg(long, default_value_t = 0.2)]
    top: f64,
    #[command(flatten)]
    sis: SisFlags,
    /// Training states (spread evenly over the demonstrations).
    #[arg(long, default_value_t = 20000, value_parser = size_count)]
    states: usize,
    /// Fine-tuning steps (the default, like --lr, --step-lr, --beta and --top, was chosen on
    /// held-out demonstrations by tools/tune_defaults.py: docs/training.md).
    #[arg(long, default_value_t = 4000, value_parser = positive)]
    steps: usize,
    #[arg(long, default_value_t = 256, value_parser = size_count)]
    batch: usize,
    #[arg(long, default_value_t = 3e-4)]
    lr: f64,
    /// Learning rate of the LSQ step sizes relative to --lr.
    #[arg(long, default_value_t = 0.1)]
    step_lr: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, default_value_t = 2, value_parser = positive)]
    threads: usize,
    #[arg(short, long)]
    output: PathBuf,
    #[arg(long)]
    resume: bool,
    /// Keep the activation quantizers' calibrated steps fixed (learn weights, weight steps, biases).
    #[arg(long)]
    freeze_act_steps: bool,
    /// Allocate per-layer bits under this budget (as `sqil allocate --budget`) before fine-tuning.
    #[arg(long)]
    budget: Option<String>,
    #[command(flatten)]
    alloc: AllocFlags,
}

/// A count that must be at least 1 (threads, steps, iterations).
fn positive(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("must be at least 1".into()),
        Ok(v) => Ok(v),
        Err(_) => Err(format!("`{s}` is not a whole number")),
    }
}

/// Largest batch or state count a flag may ask for: beyond it the arrays the count sizes would
/// not fit a machine's memory for any real policy (the runs check the bytes too).
const MAX_COUNT: usize = 1 << 24;

/// A batch size or number of states: 1 to [`MAX_COUNT`].
fn size_count(s: &str) -> Result<usize, String> {
    let v = positive(s)?;
    if v > MAX_COUNT {
        return Err(format!("{v} is more than the {MAX_COUNT} this flag allows"));
    }
    Ok(v)
}

/// What `sqil build` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// The CPU artifact (plan + packed int4 weights), run by `sqil run` / `sqil bench` / the C ABI.
    Cpu,
    /// A standalone executable: the sqil-policy runner with the artifact inside.
    Exe,
    /// C99 source for firmware.
    C,
    /// One standalone .cu file (kernels, weights, host code with a CUDA graph).
    Cuda,
}

/// How SIS perturbs states (`sqil compile`).
#[derive(clap::Args)]
pub struct SisFlags {
    /// SIS: side of the square image patches.
    #[arg(long, default_value_t = 12, value_parser = positive)]
    patch: usize,
    /// SIS for images: `occlude` (per-channel dataset mean) or `blur`.
    #[arg(long, default_value = "occlude")]
    sis_image: String,
    /// SIS blur: Gaussian sigma in pixels.
    #[arg(long, default_value_t = 2.0)]
    sis_blur_sigma: f32,
    /// SIS for vectors: `mean` (dataset mean) or `noise` (x + scale * std * z, seeded).
    #[arg(long, default_value = "mean")]
    sis_vector: String,
    #[arg(long, default_value_t = 0.5)]
    sis_noise_scale: f32,
    /// SIS: vector dimensions perturbed together, e.g. `0-2,3-5` (one position per group).
    #[arg(long, default_value = "")]
    sis_groups: String,
}

impl SisFlags {
    fn config(&self) -> sqil_driver::Result<sqil_train::sis::SisConfig> {
        use sqil_train::sis::{parse_groups, ImagePerturb, SisConfig, VectorPerturb};
        let image = match self.sis_image.as_str() {
            "occlude" => ImagePerturb::Occlude,
            "blur" if self.sis_blur_sigma > 0.0 => ImagePerturb::Blur { sigma: self.sis_blur_sigma },
            "blur" => return Err("--sis-blur-sigma must be > 0".into()),
            o => return Err(format!("--sis-image `{o}`: expected occlude or blur").into()),
        };
        let vector = match self.sis_vector.as_str() {
            "mean" => VectorPerturb::Mean,
            "noise" => VectorPerturb::Noise { scale: self.sis_noise_scale, seed: 0 },
            o => return Err(format!("--sis-vector `{o}`: expected mean or noise").into()),
        };
        let groups = parse_groups(&self.sis_groups)?;
        Ok(SisConfig { patch: self.patch, image, vector, groups })
    }
}

/// Options of bit allocation shared by `allocate` and `compile --budget`.
#[derive(clap::Args)]
pub struct AllocFlags {
    /// sqil (SIS-weighted action error), uniform (unweighted action error), hawq (Hessian trace).
    #[arg(long = "alloc-method", default_value = "sqil")]
    method: String,
    /// Candidate weight widths.
    #[arg(long, default_value = "2,3,4,8", value_delimiter = ',')]
    wbits_choices: Vec<u8>,
    /// Candidate activation widths (4, 8, 16 = float); default: the config's activation width.
    #[arg(long, value_delimiter = ',')]
    abits_choices: Vec<u8>,
    /// States used to measure sensitivity (spread evenly over the demonstrations).
    #[arg(long, default_value_t = 1024, value_parser = size_count)]
    alloc_states: usize,
    /// Rounds of greedy refinement with re-measurement after the exact solve.
    #[arg(long, default_value_t = 0)]
    refine: usize,
    /// Hutchinson probes for --alloc-method hawq.
    #[arg(long, default_value_t = 32, value_parser = positive)]
    probes: usize,
    /// Cost model for latency budgets (JSON: bytes_per_s, int_macs_per_s, float_macs_per_s, overhead_s).
    #[arg(long)]
    cost_model: Option<PathBuf>,
}

impl AllocFlags {
    fn args(
        &self,
        demos: &std::path::Path,
        base: &QuantConfig,
        recipe: Recipe,
        budget: &str,
    ) -> sqil_driver::Result<sqil_driver::allocate::AllocateArgs> {
        let cost_model = match &self.cost_model {
            Some(p) => serde_json::from_str(&std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?)
                .map_err(|e| format!("{}: {e}", p.display()))?,
            None => Default::default(),
        };
        Ok(sqil_driver::allocate::AllocateArgs {
            demos: demos.to_path_buf(),
            base: base.clone(),
            recipe,
            budget: sqil_passes::quant::sensitivity::Budget::parse(budget)?,
            method: sqil_driver::allocate::Method::parse(&self.method)?,
            wbits: self.wbits_choices.clone(),
            abits: self.abits_choices.iter().map(|&b| if b >= 16 { 0 } else { b }).collect(),
            states: self.alloc_states,
            top: 0.2,
            beta: 2.0,
            sis: Default::default(),
            refine: self.refine,
            probes: self.probes,
            cost_model,
        })
    }
}

/// Runs one parsed command.
pub fn run(cmd: Cmd) -> sqil_driver::Result<()> {
    match cmd {
        Cmd::Inspect { model, ir, elide, optimize, dump_ir, passes } => {
            let mut g = load(&model)?;
            if optimize {
                let mut pm = sqil_passes::cleanup_pipeline();
                pm.dump_ir = dump_ir;
                pm.run(&mut g, &mut sqil_passes::PassCtx::default())?;
            }
            if let Some(list) = passes {
                let names = split_passes(&list);
                let names: Vec<&str> = names.iter().map(String::as_str).collect();
                let mut pm = sqil_passes::PassManager::from_names(&names)?;
                pm.dump_ir = dump_ir;
                let mut cx = sqil_passes::PassCtx::default();
                pm.run(&mut g, &mut cx)?;
                for n in &cx.notes {
                    eprintln!("note: {n}");
                }
            }
            if ir {
                print!("{}", print_graph(&g, &PrintOptions { elide_over: elide, splat: false })?);
            } else {
                print!("{}", inspect::render(&inspect::summarise(&g)?, &model.display().to_string()));
            }
            Ok(())
        }
        Cmd::Quantize { model, recipe, quant, calib, calib_states, output, ir, report, artifact } => {
            let cfg = quant.config()?;
            let args = QuantizeArgs {
                recipe: Recipe::parse(&recipe)?,
                config: cfg,
                calib,
                calib_states,
                out: output.clone(),
                ir_out: ir,
                report_out: report,
                artifact_out: artifact,
            };
            let r = quantize_cmd(&model, &args)?;
            print!("{}", render(&r));
            println!("wrote {}", output.display());
            Ok(())
        }
        Cmd::Compile(c) => compile_cmd(c),
        Cmd::Allocate { model, demos, budget, alloc, quant, recipe, output, report, plot } => {
            sqil_driver::allocate::config_format(&output)?; // before the work, not after it
            let cfg = quant.config()?;
            let aa = alloc.args(&demos, &cfg, Recipe::parse(&recipe)?, &budget)?;
            let (c, rep) = sqil_driver::allocate::run_allocate(&model, &aa)?;
            print!("{}", sqil_driver::allocate::render(&rep));
            sqil_driver::allocate::save_config(&c, &output)?;
            if let Some(p) = &report {
                let json = serde_json::to_string_pretty(&rep)?;
                sqil_driver::quantize::write_atomic(p, json.as_bytes())?;
            }
            if let Some(p) = &plot {
                sqil_driver::quantize::write_atomic(p, sqil_driver::allocate::plot_svg(&rep).as_bytes())?;
            }
            println!("wrote {}", output.display());
            Ok(())
        }
        Cmd::Build { model, target, output, prefix, selftest, selftest_states, runner } => match target {
            Target::Cuda => {
                let n = sqil_driver::build::build_cuda(&model, &output, &selftest, selftest_states)?;
                println!(
                    "wrote {} ({n} bytes; build with: nvcc -O2 -fmad=false -o policy {})",
                    output.display(),
                    output.display()
                );
                Ok(())
            }
            Target::Exe => {
                let (r, a, from) = sqil_driver::build::build_exe(&model, &output, runner.as_deref())?;
                println!("runner {r} B ({}) + policy {a} B", from.display());
                println!("wrote {} (run it with --info, --input OBS.npy, or states on stdin)", output.display());
                Ok(())
            }
            Target::C => {
                let a = sqil_driver::build::BuildC { prefix, selftest, states: selftest_states };
                let r = sqil_driver::build::build_c(&model, &output, &a)?;
                for d in &r.steps {
                    println!("  {d}");
                }
                println!(
                    "packed weights {} B, other constants {} B, arena {} B, int8 buffer {} B; {}{}",
                    r.packed_weight_bytes,
                    r.const_bytes,
                    r.arena_bytes,
                    r.qbuf_bytes,
                    if r.bit_exact { "bit-exact with the runtime" } else { "within C_TOL of the runtime" },
                    if r.needs_libm { "; needs math.h (link -lm)" } else { "" }
                );
                println!("wrote {}", output.display());
                Ok(())
            }
            Target::Cpu => {
                let plan = sqil_driver::quantize::write_artifact(&load(&model)?, &model, &output)?.plan;
                for d in plan.describe() {
                    println!("  {d}");
                }
                println!("fused kernels (the fusion pass's choice):");
                for k in plan.kernels() {
                    println!("  {k}");
                }
                println!("wrote {}", output.display());
                Ok(())
            }
        },
        Cmd::Bench { model, batch, iters, threads, profile, peaks } => {
            sqil_runtime::keep_freed_memory();
            if peaks {
                let g = |v: Option<f64>| v.map_or("null".to_string(), |v| format!("{v:.1}"));
                let (i8, f32) = (sqil_kernels_cpu::peak::int8_gmacs(), sqil_kernels_cpu::peak::f32_gmacs());
                // Reads beyond the core's own caches: 8 MiB (the shared last-level cache on the
                // machines measured), 512 MiB (memory).
                let (l3, dram) =
                    (sqil_kernels_cpu::peak::read_gbs(8 << 20), sqil_kernels_cpu::peak::read_gbs(512 << 20));
                println!(
                    "{{\"peaks\": {{\"int8_gmacs\": {}, \"int8_instruction\": \"{}\", \"f32_gmacs\": {}, \"read_gbs_8mib\": {}, \"read_gbs_512mib\": {}, \"threads\": 1}}}}",
                    g(i8),
                    sqil_kernels_cpu::peak::int8_instruction(),
                    g(f32),
                    g(l3),
                    g(dram)
                );
            }
            match model {
                Some(model) => sqil_driver::bench::bench(&model, &batch, iters, threads, profile),
                None => Ok(()),
            }
        }
        Cmd::Run { model, inputs, outputs, threads } => {
            sqil_runtime::keep_freed_memory();
            // A compiled CPU artifact runs on the runtime; a model (ONNX or IR) on the interpreter.
            let (g, policy) = if sqil_runtime::artifact::is_artifact(&model) {
                let mut p = sqil_runtime::Policy::load(&model)?;
                p.threads = threads;
                (None, Some(p))
            } else {
                (Some(load(&model)?), None)
            };
            let names: Vec<String> = match (&g, &policy) {
                (Some(g), _) => g.inputs.iter().map(|&i| g.node(i).outputs[0].name.clone()).collect(),
                (_, Some(p)) => p.plan.inputs.iter().map(|(n, _)| n.clone()).collect(),
                _ => unreachable!("a model or an artifact"),
            };
            if inputs.len() != names.len() {
                return Err(format!(
                    "{} takes {} input(s) ({}), {} given",
                    model.display(),
                    names.len(),
                    names.join(", "),
                    inputs.len()
                )
                .into());
            }
            let mut feeds = HashMap::new();
            for (k, spec) in inputs.iter().enumerate() {
                let (name, path) = match spec.split_once('=') {
                    Some((n, p)) => (n.to_string(), p),
                    None => (names.get(k).cloned().unwrap_or_default(), spec.as_str()),
                };
                if !names.contains(&name) {
                    return Err(format!(
                        "--input {spec}: the model has no input named `{name}` (its inputs: {})",
                        names.join(", ")
                    )
                    .into());
                }
                feeds.insert(name, npy::read(Path::new(path))?);
            }
            let outs = match (&g, &policy) {
                (Some(g), _) => Interpreter::new(g).and_then(|i| i.run(&feeds))?,
                (_, Some(p)) => {
                    let ordered = names
                        .iter()
                        .map(|n| feeds.remove(n).ok_or_else(|| format!("no input named `{n}`")))
                        .collect::<Result<Vec<_>, _>>()?;
                    p.run(&ordered)?
                }
                _ => unreachable!("a model or an artifact"),
            };
            if outputs.len() != outs.len() {
                return Err(format!(
                    "{} has {} output(s), {} --output path(s) given",
                    model.display(),
                    outs.len(),
                    outputs.len()
                )
                .into());
            }
            for (t, p) in outs.iter().zip(&outputs) {
                npy::write(p, t)?;
            }
            Ok(())
        }
    }
}

/// Splits a pass list on commas outside parentheses.
fn split_passes(list: &str) -> Vec<String> {
    let (mut out, mut cur, mut depth) = (vec![], String::new(), 0);
    for c in list.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                out.push(std::mem::take(&mut cur));
                continue;
            }
            _ => {}
        }
        cur.push(c);
    }
    out.push(cur);
    out.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

/// The compile command's inputs as the library's [`sqil_driver::compile::CompileArgs`] (before a
/// `--budget` allocation, which needs the model and demonstrations), and the budget.
fn compile_args(
    c: CompileCmd,
) -> sqil_driver::Result<(PathBuf, sqil_driver::compile::CompileArgs, Option<String>, AllocFlags)> {
    let CompileCmd {
        model,
        demos,
        recipe,
        init,
        quant,
        val_frac,
        val_states,
        val_every,
        patience,
        action_box,
        plan_tol,
        ship,
        device,
        gpus,
        cache_dir,
        no_cache,
        obs_keys,
        beta,
        top,
        sis,
        states,
        steps,
        batch,
        lr,
        step_lr,
        seed,
        threads,
        output,
        resume,
        freeze_act_steps,
        budget,
        alloc,
    } = c;
    let cfg = quant.config()?;
    if !(0.0..=1.0).contains(&top) || beta < 0.0 {
        return Err(format!("--top must be in [0, 1] and --beta >= 0 (got {top}, {beta})").into());
    }
    let init_recipe = if init == "all" { None } else { Some(Recipe::parse(&init)?) };
    if steps == 0 || batch == 0 || threads == 0 {
        return Err(format!("--steps, --batch and --threads must be > 0 (got {steps}, {batch}, {threads})").into());
    }
    let args = sqil_driver::compile::CompileArgs {
        demos,
        config: cfg,
        init: init_recipe,
        val_frac,
        val_states,
        val_every,
        patience,
        action_box: match action_box.as_str() {
            "auto" => sqil_driver::compile::BoxSource::Metadata,
            "none" => sqil_driver::compile::BoxSource::None,
            s => sqil_driver::compile::BoxSource::Given(s.to_string()),
        },
        split_seed: seed,
        plan_tol,
        ship: match ship.as_str() {
            "best" => sqil_driver::compile::Ship::Best,
            "finetuned" => sqil_driver::compile::Ship::Finetuned,
            "ptq" => sqil_driver::compile::Ship::Ptq,
            s => return Err(format!("--ship `{s}`: expected best, finetuned or ptq").into()),
        },
        obs_keys,
        device: if device == "cuda" {
            sqil_driver::gpu_train::Device::Cuda
        } else {
            sqil_driver::gpu_train::Device::Cpu
        },
        gpus: {
            // NVLink multicast off unless the user chose otherwise (it is not available on every
            // multi-GPU host, and NCCL would fail there): set before any thread starts.
            if gpus > 1 && std::env::var_os("NCCL_NVLS_ENABLE").is_none() {
                std::env::set_var("NCCL_NVLS_ENABLE", "0");
            }
            gpus as usize
        },
        recipe: sqil_driver::compile::FtRecipe::parse(&recipe)?,
        beta,
        top,
        sis: sis.config()?,
        max_states: states,
        train: sqil_train::trainer::TrainConfig {
            steps,
            batch,
            lr,
            step_lr_scale: step_lr,
            seed,
            threads,
            warmup: (steps / 20).max(1),
            ..Default::default()
        },
        out: output.clone(),
        resume,
        act_steps: !freeze_act_steps,
        cache: if no_cache { None } else { cache_dir.or_else(sqil_driver::cache::default_dir) },
    };
    Ok((model, args, budget, alloc))
}

/// `sqil compile`: the pipeline, then its one-screen summary.
fn compile_cmd(c: CompileCmd) -> sqil_driver::Result<()> {
    let (model, mut args, budget, alloc) = compile_args(c)?;
    let output = args.out.clone();
    if let Some(b) = &budget {
        let mut aa = alloc.args(&args.demos, &args.config, args.init.unwrap_or(Recipe::Gptq), b)?;
        aa.top = args.top;
        aa.beta = args.beta;
        aa.sis = args.sis.clone();
        let (c, rep) = sqil_driver::allocate::run_allocate(&model, &aa)?;
        eprint!("{}", sqil_driver::allocate::render(&rep));
        std::fs::create_dir_all(&output).map_err(|e| format!("{}: {e}", output.display()))?;
        sqil_driver::allocate::save_config(&c, &output.join("allocation.toml"))?;
        let json = serde_json::to_string_pretty(&rep)?;
        sqil_driver::quantize::write_atomic(&output.join("allocation.json"), json.as_bytes())?;
        args.config = c;
    }
    sqil_driver::compile::compile(&model, &args)?;
    println!("{}", sqil_driver::compile::summary(&model, &output)?);
    Ok(())
}

/// Parses a `sqil compile` command line (without the program name) into the library's
/// arguments, as the command runs them (flags' defaults included; a `--budget` allocation not
/// applied): what a build script or test compares with [`sqil_driver::compile::CompileArgs::new`].
pub fn parse_compile<I, S>(args: I) -> sqil_driver::Result<(PathBuf, sqil_driver::compile::CompileArgs)>
where
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    let argv = std::iter::once(std::ffi::OsString::from("sqil")).chain(args.into_iter().map(Into::into));
    let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string().lines().next().unwrap_or_default().to_string())?;
    match cli.cmd {
        Cmd::Compile(c) => compile_args(c).map(|(m, a, _, _)| (m, a)),
        _ => Err("not a compile command".into()),
    }
}

/// Parses `args` (without the program name) as the `sqil` command line and runs the command;
/// a usage error is clap's one-line message (`--help` output is an error too: the text to show).
pub fn run_args<I, S>(args: I) -> sqil_driver::Result<()>
where
    I: IntoIterator<Item = S>,
    S: Into<std::ffi::OsString> + Clone,
{
    let argv = std::iter::once(std::ffi::OsString::from("sqil")).chain(args.into_iter().map(Into::into));
    let cli = Cli::try_parse_from(argv).map_err(|e| {
        // clap's first line, without its "error: " (the caller adds its own) and the help hint.
        let text = e.to_string();
        text.lines().next().unwrap_or_default().trim_start_matches("error: ").to_string()
    })?;
    run(cli.cmd)
}
