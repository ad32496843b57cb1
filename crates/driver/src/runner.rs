//! The policy runner: what the `sqil-policy` executable runs, and what `sqil` itself runs when an
//! artifact is appended to it (`sqil build --target exe` copies `sqil-policy` where it is installed
//! beside `sqil`, else `sqil` itself, as `deno compile` does).
//!
//! ```text
//! policy_bin [--threads N] [--info] [--input OBS.npy ...] [--output ACTIONS.npy]
//! sqil-policy ARTIFACT [same options]
//! ```
//! With `--input` (one .npy per policy input) the batch runs at once and the first output is
//! written to `--output` (or printed, one state per line). Without, states are read from stdin,
//! one per line (numbers separated by spaces or commas), and each state's actions are written
//! as one line and flushed at once, so a controller can keep the process open as a pipe.

use sqil_runtime::Policy;
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use crate::build::EXE_MAGIC;

/// The artifact appended to this executable, if any (read from its last 16 bytes: a cheap check
/// every `sqil` start makes).
pub fn embedded() -> Result<Option<Vec<u8>>, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate this executable: {e}"))?;
    let mut f = std::fs::File::open(&exe).map_err(|e| format!("{}: {e}", exe.display()))?;
    let size = f.metadata().map_err(|e| e.to_string())?.len();
    if size < 16 {
        return Ok(None);
    }
    let mut trailer = [0u8; 16];
    f.seek(SeekFrom::End(-16)).and_then(|_| f.read_exact(&mut trailer)).map_err(|e| e.to_string())?;
    if &trailer[8..] != EXE_MAGIC {
        return Ok(None);
    }
    let len = u64::from_le_bytes(trailer[..8].try_into().expect("8 bytes"));
    if len > size - 16 {
        return Err(format!("{}: corrupt embedded policy (length {len})", exe.display()));
    }
    let mut bytes = vec![0u8; len as usize];
    f.seek(SeekFrom::End(-16 - len as i64)).and_then(|_| f.read_exact(&mut bytes)).map_err(|e| e.to_string())?;
    Ok(Some(bytes))
}

struct Args {
    artifact: Option<PathBuf>,
    threads: usize,
    info: bool,
    inputs: Vec<PathBuf>,
    output: Option<PathBuf>,
}

const USAGE: &str = "usage: [ARTIFACT] [--threads N] [--info] [--input OBS.npy ...] [--output ACTIONS.npy]\n\
without --input, states are read from stdin, one per line, and actions written one line each";

fn parse_args(args: impl IntoIterator<Item = String>) -> Result<Args, String> {
    let mut a = Args { artifact: None, threads: 1, info: false, inputs: vec![], output: None };
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value\n{USAGE}"));
        match arg.as_str() {
            "--threads" => {
                a.threads = value("--threads")?.parse().map_err(|_| "--threads: not a number".to_string())?
            }
            "--info" => a.info = true,
            "--input" => a.inputs.push(value("--input")?.into()),
            "--output" => a.output = Some(value("--output")?.into()),
            "-h" | "--help" => return Err(USAGE.to_string()),
            s if s.starts_with('-') => return Err(format!("unknown option `{s}`\n{USAGE}")),
            s if a.artifact.is_none() => a.artifact = Some(s.into()),
            s => return Err(format!("unexpected argument `{s}`\n{USAGE}")),
        }
    }
    Ok(a)
}

fn fmt_row(v: &[f32]) -> String {
    v.iter().map(|x| format!("{x:?}")).collect::<Vec<_>>().join(" ")
}

/// The runner's main: `args` without the program name; `embedded` the artifact this executable
/// carries (see [`embedded`]), if any.
pub fn run(args: impl IntoIterator<Item = String>, embedded: Option<Vec<u8>>) -> Result<(), String> {
    let a = parse_args(args)?;
    let mut policy = match (embedded, &a.artifact) {
        (Some(bytes), None) => Policy::from_bytes(&bytes, "the embedded policy").map_err(|e| e.to_string())?,
        (_, Some(p)) => Policy::load(p).map_err(|e| e.to_string())?,
        (None, None) => return Err(format!("no policy: this executable carries none; give an artifact\n{USAGE}")),
    };
    policy.threads = a.threads.max(1);
    if a.info {
        println!("inputs: {:?} (per-state sizes {:?})", policy.plan.inputs, policy.input_sizes());
        println!("outputs: {:?}", policy.plan.output_names);
        for d in policy.plan.describe() {
            println!("  {d}");
        }
        return Ok(());
    }
    if !a.inputs.is_empty() {
        let feeds: Vec<_> = a.inputs.iter().map(|p| crate::npy::read(p)).collect::<Result<_, _>>()?;
        let out = policy.run(&feeds).map_err(|e| e.to_string())?;
        let first = out.into_iter().next().ok_or("the policy has no outputs")?;
        match &a.output {
            Some(p) => crate::npy::write(p, &first)?,
            None => {
                let v = first.data.to_f32_vec();
                let per = v.len() / first.shape.first().copied().unwrap_or(1).max(1);
                let mut so = std::io::stdout().lock();
                for row in v.chunks(per.max(1)) {
                    writeln!(so, "{}", fmt_row(row)).map_err(|e| e.to_string())?;
                }
            }
        }
        return Ok(());
    }
    let sizes = policy.input_sizes();
    if sizes.len() != 1 {
        return Err(format!("the policy takes {} inputs: give them with --input", sizes.len()));
    }
    let stdin = std::io::stdin().lock();
    let mut so = std::io::stdout().lock();
    for (ln, line) in stdin.lines().enumerate() {
        let line = line.map_err(|e| format!("stdin: {e}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let obs: Vec<f32> = line
            .split(|c: char| c.is_whitespace() || c == ',')
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<f32>().map_err(|_| format!("stdin line {}: `{s}` is not a number", ln + 1)))
            .collect::<Result<_, _>>()?;
        if obs.len() != sizes[0] {
            return Err(format!("stdin line {}: {} numbers, the policy takes {}", ln + 1, obs.len(), sizes[0]));
        }
        let act = policy.act(&obs, 1).map_err(|e| e.to_string())?;
        writeln!(so, "{}", fmt_row(&act)).and_then(|_| so.flush()).map_err(|e| e.to_string())?;
    }
    Ok(())
}
