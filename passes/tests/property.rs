//! Property: the clean-up passes leave the interpreter's outputs unchanged (within 1e-5) on
//! random graphs, and remove every dead node and every all-constant computation.

use proptest::prelude::*;
use sqil_ir::interp::run;
use sqil_ir::testing::random_graph;
use sqil_ir::{verify, Op};
use sqil_passes::{cleanup_pipeline, PassCtx};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn cleanup_preserves_outputs(seed in any::<u64>()) {
        let (g, feeds) = random_graph(seed);
        let mut h = g.clone();
        cleanup_pipeline().run(&mut h, &mut PassCtx::default()).unwrap();
        verify(&h).unwrap();
        let (a, b) = (run(&g, &feeds).unwrap(), run(&h, &feeds).unwrap());
        for (x, y) in a.iter().zip(&b) {
            prop_assert_eq!(&x.shape, &y.shape);
            for (p, q) in x.data.to_f64_vec().iter().zip(y.data.to_f64_vec()) {
                prop_assert!((p.is_nan() && q.is_nan()) || (p - q).abs() <= 1e-5 * p.abs().max(1.0), "{} vs {}", p, q);
            }
        }
        // Nothing left that reads only constants, and nothing dead.
        for n in h.g.node_indices() {
            let ins = h.inputs_of(n);
            if !matches!(h.node(n).op, Op::Input | Op::Const(_)) {
                prop_assert!(ins.iter().flatten().any(|v| h.const_value(*v).is_none()), "unfolded constant computation");
            }
        }
        prop_assert!(h.g.node_indices().all(|n| matches!(h.node(n).op, Op::Input) || h.g.neighbors_directed(n, petgraph::Direction::Outgoing).next().is_some() || h.outputs.iter().any(|o| o.node == n)));
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]
    /// Canonicalisation (BatchNorm folding, MatMul -> Gemm, reshape clean-up) and then fusion
    /// keep the outputs within 1e-5; fusion alone is bit-exact (fused kernels compose the ops'
    /// own semantics); every run verifies.
    #[test]
    fn canonicalize_and_fuse_preserve_outputs(seed in any::<u64>()) {
        let (g, feeds) = random_graph(seed);
        let mut h = g.clone();
        sqil_passes::PassManager::from_names(&sqil_passes::CANONICALIZE).unwrap().run(&mut h, &mut PassCtx::default()).unwrap();
        let canon = h.clone();
        sqil_passes::PassManager::from_names(&["fuse"]).unwrap().run(&mut h, &mut PassCtx::default()).unwrap();
        verify(&h).unwrap();
        let (a, b, c) = (run(&g, &feeds).unwrap(), run(&canon, &feeds).unwrap(), run(&h, &feeds).unwrap());
        prop_assert!(sqil_ir::testing::bitwise_equal(&b, &c), "fusion changed bits");
        for (x, y) in a.iter().zip(&c) {
            prop_assert_eq!(&x.shape, &y.shape);
            for (p, q) in x.data.to_f64_vec().iter().zip(y.data.to_f64_vec()) {
                prop_assert!((p.is_nan() && q.is_nan()) || (p - q).abs() <= 1e-5 * p.abs().max(1.0), "{} vs {}", p, q);
            }
        }
        // Output names survive.
        let names = |g: &sqil_ir::Graph| g.outputs.iter().map(|o| g.value(*o).name.clone()).collect::<Vec<_>>();
        prop_assert_eq!(names(&g), names(&h));
    }
}
