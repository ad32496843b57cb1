//! The fusion pass's time against graph size: chains of 500 to 8000 nodes of three shapes (ReLUs
//! only, Add/Tanh pairs, Gemm/ReLU layers, which fuse), each timed whole (e-graph, rules,
//! extraction, rewrite) and printed with its ratio to the 500-node chain of the same shape: a
//! linear pass doubles its time when the chain doubles.
//!
//!     cargo bench -p sqil-passes --bench fuse_scaling [-- --max 8000]

use sqil_ir::{parse_graph, verify};
use sqil_passes::fuse::Fuse;
use std::time::Instant;

fn chain(n: usize, shape: &str) -> String {
    let mut s = String::from("graph \"g\" (%x: f32[N,8]) -> (%y) {\n");
    if shape == "gemm-relu" {
        s += "  %w = Const[value=f32[8,8]{splat 0.125}] : f32[8,8]\n  %b = Const[value=f32[8]{splat 0.5}] : f32[8]\n";
    }
    let mut prev = "%x".to_string();
    for i in 0..n {
        let out = if i + 1 == n { "%y".to_string() } else { format!("%v{i}") };
        let op = match (shape, i % 2) {
            ("relu", _) => format!("Relu({prev})"),
            ("add-tanh", 0) => format!("Add({prev}, %x)"),
            ("add-tanh", _) => format!("Tanh({prev})"),
            (_, 0) => format!("Gemm[alpha=1.0, beta=1.0, transA=0, transB=1]({prev}, %w, %b)"),
            _ => format!("Relu({prev})"),
        };
        s += &format!("  {out} = {op} : f32[N,8]\n");
        prev = out;
    }
    s + "}\n"
}

fn main() {
    let a: Vec<String> = std::env::args().collect();
    let max: usize =
        a.iter().position(|x| x == "--max").and_then(|i| a.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(8000);
    println!("fuse pass time by chain length (one thread), ratio to the 500-node chain");
    for shape in ["relu", "add-tanh", "gemm-relu"] {
        let mut base = None;
        let mut n = 500;
        while n <= max {
            let mut g = parse_graph(&chain(n, shape)).expect("chain parses");
            verify(&g).expect("chain verifies");
            let t = Instant::now();
            let r = Fuse::default().fuse(&mut g).expect("fuse runs");
            let s = t.elapsed().as_secs_f64();
            let b = *base.get_or_insert(s);
            println!(
                "{shape:<10} {n:>5} nodes: {:>9.1} ms  x{:<6.1} (length x{:<3}) {} fused kernels, stop: {}",
                s * 1e3,
                s / b,
                n / 500,
                r.kernels.len(),
                r.stop_reason
            );
            n *= 2;
        }
    }
}
