//! The pass trait and the pass manager: runs passes in order, verifies the graph after each
//! one, adds "after pass X" context to errors, times every pass and can dump IR around it.

use sqil_ir::{print_graph, verify, Graph, IrError, PrintOptions, Result};
use std::time::{Duration, Instant};

/// Mutable state shared by the passes of one pipeline run.
#[derive(Debug, Default)]
pub struct PassCtx {
    /// Human-readable notes passes leave (what they folded, removed, ...).
    pub notes: Vec<String>,
}

/// A graph transformation. `run` returns whether it changed the graph.
pub trait Pass {
    /// Kebab-case name, unique across the registry.
    fn name(&self) -> &'static str;
    fn run(&self, g: &mut Graph, cx: &mut PassCtx) -> Result<bool>;
}

/// Timing and effect of one pass run.
#[derive(Clone, Debug)]
pub struct PassStat {
    pub name: &'static str,
    pub changed: bool,
    pub elapsed: Duration,
}

pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
    /// Print the IR before and after each pass to stderr.
    pub dump_ir: bool,
    /// Run the verifier after each pass (on by default).
    pub verify_each: bool,
    pub stats: Vec<PassStat>,
}

impl PassManager {
    pub fn new(passes: Vec<Box<dyn Pass>>) -> PassManager {
        PassManager { passes, dump_ir: false, verify_each: true, stats: vec![] }
    }

    /// Builds a pipeline from pass names; errors on an unknown name and lists the known ones.
    pub fn from_names(names: &[&str]) -> Result<PassManager> {
        let passes = names
            .iter()
            .map(|n| {
                crate::pass_by_name(n.trim())?.ok_or_else(|| {
                    let known: Vec<&str> = crate::registry().iter().map(|p| p.name()).collect();
                    IrError::Invalid(format!("unknown pass `{n}` (known: {})", known.join(", ")))
                })
            })
            .collect::<Result<_>>()?;
        Ok(PassManager::new(passes))
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    /// Runs every pass once, in order. Returns whether any pass changed the graph.
    pub fn run(&mut self, g: &mut Graph, cx: &mut PassCtx) -> Result<bool> {
        let mut any = false;
        for p in &self.passes {
            if self.dump_ir {
                eprintln!(
                    "; IR before pass {}\n{}",
                    p.name(),
                    print_graph(g, &PrintOptions { elide_over: Some(16), splat: false })?
                );
            }
            let t = Instant::now();
            let changed = p.run(g, cx).map_err(|e| e.context(format!("in pass {}", p.name())))?;
            let elapsed = t.elapsed();
            if self.verify_each {
                verify(g).map_err(|e| e.context(format!("after pass {}", p.name())))?;
            }
            if self.dump_ir {
                eprintln!(
                    "; IR after pass {} (changed: {changed})\n{}",
                    p.name(),
                    print_graph(g, &PrintOptions { elide_over: Some(16), splat: false })?
                );
            }
            self.stats.push(PassStat { name: p.name(), changed, elapsed });
            any |= changed;
        }
        Ok(any)
    }
}
