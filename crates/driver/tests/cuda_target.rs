//! `sqil build --target cuda` without a GPU: the standalone `.cu` for an MLP policy holds each
//! kernel once, one launch per lowered step, the weights and the self-test data; the CNN and
//! transformer policies lower to generic kernel steps; ops the GPU path lacks are refused with
//! the step named. (nvcc builds and runs these files
//! on the GPU machine: docs/cuda.md.)

use sqil_runtime::Policy;

mod common;

/// `name` at W4A8, groups of 64, the raw input quantized (every layer int4).
fn quantized(name: &str) -> Policy {
    common::testdata_rtn(name, "wbits=4,abits=8,group=64,raw_input=quant").0
}

/// `name` quantized W4A8 with the default raw input (the first layer in float, as `sqil quantize`
/// and `tools/gpu_policies.sh` make it).
fn quantized_float_first(name: &str) -> Policy {
    common::testdata_rtn(name, "wbits=4,abits=8,group=32").0
}

/// The kernel of each lowered step, in order.
fn kernel_names(l: &sqil_cuda::lower::Lowered) -> Vec<&str> {
    l.steps
        .iter()
        .map(|s| {
            let sqil_cuda::lower::LStep::Kernel { name, .. } = s;
            name.as_str()
        })
        .collect()
}

#[test]
fn standalone_cu_for_an_mlp_policy() {
    let p = quantized("bc_hopper");
    let l = sqil_cuda::lower::lower(&p).unwrap();
    let states = vec![vec![0.5f32; 15]];
    let want = vec![p.act(&states[0], 1).unwrap()];
    let src = sqil_codegen::cuda::emit_cu(&p, &states, &want, 0.02).unwrap();
    assert_eq!(src.matches("SQIL_KERNEL void sqil_q4_int(").count(), 1, "each kernel once");
    assert_eq!(src.matches("<<<").count(), l.steps.len(), "one launch per step");
    // The observation's normalisation (Sub, Div on the f32 input) as one generated kernel, then
    // per int4 layer one integer kernel (the input quantized as it is read, bias and ReLU in it).
    assert_eq!(l.steps.len(), 4);
    assert_eq!(l.sources.len(), 1, "one generated kernel (the normalisation)");
    assert_eq!(src.matches("sqil_levels<<<").count(), 0);
    assert_eq!(src.matches("sqil_q4_int<<<").count(), 3);
    assert!(src.contains("cudaStreamBeginCapture") && src.contains("cudaGraphLaunch"));
    assert!(src.contains("#define STATES 1") && src.contains("static const float ST_OUT[3]"));
}

/// The convolutional and transformer policies lower too: int4 convolutions and layers over tokens
/// as the integer kernel behind the levels kernel, data movement as copy tables, attention,
/// LayerNorm, pooling; the standalone `.cu` launches each generic step with its arrays.
#[test]
fn cnn_and_transformer_policies_lower_and_emit() {
    for name in ["cnn", "bc_pickplace_pixels", "transformer", "transformer_dynamo", "bc_pickplace_transformer"] {
        let p = quantized(name);
        let l = sqil_cuda::lower::lower(&p).unwrap_or_else(|e| panic!("{name}: {e}"));
        let kernels = kernel_names(&l);
        assert_eq!(l.in_lens.len(), p.input_sizes().len(), "{name}");
        let states = vec![vec![0.25f32; l.in_len]];
        let src = sqil_codegen::cuda::emit_cu(&p, &states, &[vec![0.0; l.out_len]], 0.02).unwrap();
        assert_eq!(src.matches("<<<").count(), l.steps.len(), "{name}: one launch per step");
        let want: &[&str] = match name {
            "cnn" | "bc_pickplace_pixels" => &["sqil_conv2d_f32", "sqil_q4_conv_int"],
            _ => &["sqil_q4_int", "sqil_copy_pairs", "sqil_bmm", "sqil_softmax_rows", "sqil_layernorm_rows"],
        };
        assert!(kernels.iter().any(|k| k.starts_with("sqil_ew_")), "{name}: no fused element-wise kernel");
        // A convolution's levels for the int4 layer after it come from its epilogue, not a
        // `sqil_levels` step after it.
        for w in kernels.windows(2) {
            let after_conv = matches!(w[0], "sqil_conv2d_f32" | "sqil_q4_conv_int" | "sqil_q4_conv_finish");
            assert!(!(after_conv && w[1] == "sqil_levels"), "{name}: {kernels:?}");
        }
        if matches!(name, "cnn" | "bc_pickplace_pixels") {
            let epilogues = l
                .steps
                .iter()
                .filter(|st| {
                    let sqil_cuda::lower::LStep::Kernel { name, args, .. } = st;
                    name.contains("conv") && matches!(args[args.len() - 5], sqil_cuda::lower::KArg::Buf(_))
                })
                .count();
            assert!(epilogues >= 1, "{name}: no convolution writes levels");
        }
        for k in want {
            assert!(kernels.contains(k), "{name}: no {k} step in {kernels:?}");
            assert!(src.contains(&format!("{k}<<<")), "{name}: {k} not launched");
        }
        // The kernels generated for the policy (fused element-wise chains) compile with NVRTC.
        if sqil_cuda::nvrtc_present() {
            for (k, src) in &l.sources {
                let full = sqil_cuda::generated_source(k, src);
                let ptx =
                    sqil_cuda::compile(k, &full, "compute_90").unwrap_or_else(|e| panic!("{name}: {k}: {e}\n{src}"));
                assert!(ptx.contains(&format!(".visible .entry {k}(")), "{name}: {k}");
            }
        } else {
            assert!(
                std::env::var("SQIL_REQUIRE_NVRTC").as_deref() != Ok("1"),
                "NVRTC missing and SQIL_REQUIRE_NVRTC=1"
            );
            eprintln!("skipping the NVRTC compile of {name}'s generated kernels: libnvrtc not found");
        }
        eprintln!("{name}: {} steps ({} generic kernels, {} generated)", l.steps.len(), kernels.len(), l.sources.len());
    }
}

#[test]
fn unsupported_steps_are_named() {
    use sqil_ir::{DType, Dim, Graph, Op, ValueType};
    let mut g = Graph::new("logsoftmax");
    let x = g.add_input("x", ValueType::new(DType::F32, vec![Dim::Sym("N".into()), Dim::Known(6)]));
    let y = g.add_inferred("/head/LogSoftmax", Op::LogSoftmax { axis: -1, coerce_2d: false }, &[Some(x)], "y").unwrap();
    g.outputs.push(y);
    let e = sqil_cuda::lower::lower(&Policy::from_graph(&g).unwrap()).err().expect("LogSoftmax is not lowered");
    // A typed error: the step the GPU lowering does not support, by name.
    assert!(matches!(&e, sqil_cuda::Error::Unsupported(m) if m.contains("step `/head/LogSoftmax")), "{e}");
}

/// A QDQ model as exported (per-tensor QuantizeLinear / DequantizeLinear around float layers):
/// the pairs become statements of generated kernels, which compile with NVRTC.
#[test]
fn qdq_models_lower_with_their_quantizers_fused() {
    let g = sqil_driver::load_model(&common::testdata_policies().join("hopper_w4a8_qdq.onnx")).unwrap();
    let l = sqil_cuda::lower::lower(&Policy::from_graph(&g).unwrap()).unwrap();
    assert!(l.sources.iter().any(|(_, src)| src.contains("rintf(")), "no quantizer in the generated kernels");
    if sqil_cuda::nvrtc_present() {
        for (k, src) in &l.sources {
            sqil_cuda::compile(k, &sqil_cuda::generated_source(k, src), "compute_90")
                .unwrap_or_else(|e| panic!("{k}: {e}"));
        }
    }
}

/// Every testdata policy has a persistent program (the whole step list as one kernel,
/// `sqil_cuda::fused`): one call per step, in step order, with the step's block count and a grid
/// barrier after it; it compiles with NVRTC, and the kernels it calls are device functions there
/// (no entry point but the program's). (On a GPU, `gpu_policy.rs` checks the program's bits.)
#[test]
fn persistent_programs_for_the_testdata_policies() {
    let cache = std::env::temp_dir().join(format!("sqil-fused-ptx-{}", std::process::id()));
    std::env::set_var("SQIL_CACHE", &cache);
    for name in [
        "bc_hopper",
        "hopper_mlp",
        "bc_pickplace",
        "transformer",
        "bc_pickplace_transformer",
        "cnn",
        "bc_pickplace_pixels",
    ] {
        let p = quantized(name);
        let l = sqil_cuda::lower::lower(&p).unwrap();
        let f = sqil_cuda::fused::fuse(&l).unwrap_or_else(|why| panic!("{name}: {why}"));
        let program = &f.src[f.src.rfind("// Generated by sqil: the policy").expect("the program's kernel")..];
        // A grid barrier starts each action and follows each step but where `placement` says a
        // block's own barrier suffices: a step on every block, or two steps of one block each.
        let placed = sqil_cuda::fused::placement(&l);
        let local = placed.iter().filter(|p| p.local_sync).count();
        assert_eq!(
            program.matches("sqil_grid_sync(bar, passed, cluster);").count(),
            1 + l.steps.len() - local,
            "{name}"
        );
        let mut at = 0;
        let mut most = 0;
        for (i, st) in l.steps.iter().enumerate() {
            let sqil_cuda::lower::LStep::Kernel { name: k, threads, .. } = st;
            let blocks = threads.div_ceil(256).max(1);
            most = most.max(blocks);
            let call = if placed[i].everywhere {
                // Every block computes the whole step; the run of such steps ends before a step
                // spread over blocks.
                let known = k.starts_with("sqil_ew_") || k == "sqil_layernorm_rows";
                let short_float = sqil_cuda::lower::base_kernel(k) == "sqil_linear_f32w";
                assert!((blocks == 1 && known) || (short_float && blocks <= 4), "{name}: step {i}");
                assert!(placed[i].local_sync, "{name}: step {i}");
                let sqil_cuda::lower::LStep::Kernel { threads: next, .. } = &l.steps[i + 1];
                assert!(placed[i + 1].everywhere || next.div_ceil(256) > 1, "{name}: step {i}");
                if blocks == 1 {
                    format!("(on every block)\n        {k}(0u, threadIdx.x, ")
                } else {
                    format!("(every block runs all {blocks})\n        for (unsigned b = 0; b < {blocks}u; b++) {{\n            {k}(b, threadIdx.x, ")
                }
            } else {
                format!("b < {blocks}u; b += gridDim.x) {{\n            {k}(b, threadIdx.x, ")
            };
            at += program[at..].find(&call).unwrap_or_else(|| panic!("{name}: no call `{call}` after byte {at}"));
        }
        eprintln!(
            "{name}: {} steps, {} on every block, {} grid barriers",
            l.steps.len(),
            placed.iter().filter(|p| p.everywhere).count(),
            1 + l.steps.len() - local
        );
        assert_eq!(f.max_blocks, most, "{name}");
        if sqil_cuda::nvrtc_present() {
            let ptx = sqil_cuda::compile(&f.name, &f.src, "compute_90").unwrap_or_else(|e| panic!("{name}: {e}"));
            let entries: Vec<&str> = ptx.lines().filter(|l| l.contains(".entry ")).collect();
            assert_eq!(entries.len(), 1, "{name}: {entries:?}");
            assert!(entries[0].contains(&f.name), "{name}: {entries:?}");
        }
    }
    std::fs::remove_dir_all(&cache).ok();
}

/// The ops of a diffusion U-Net step and of pooled transformer heads (Conv1d float and int4,
/// ConvTranspose1d, MaxPool1d, ReduceMean) and a policy of two outputs lower without a GPU: 1-D
/// windows as one-row 2-D ones, the transposed convolution and the reduction as their kernels,
/// the outputs copied one after another into one action vector; the standalone file and the
/// persistent program compile with NVRTC. (`gpu_policy.rs` checks their bits on a GPU.)
#[test]
fn one_dimensional_ops_and_several_outputs_lower() {
    let mut r = sqil_ir::testing::Rng::new(11);
    let (c, len) = (4, 16);
    let g = common::conv1d(&mut r, c, len);
    let p = common::rtn(&g, "wbits=4,abits=8,group=32", &common::x_feeds(&mut r, vec![64, c, len]));
    let l = sqil_cuda::lower::lower(&p).unwrap();
    assert_eq!(l.out_lens, vec![6, 3]);
    assert_eq!(l.out_len, 9);
    let kernels = kernel_names(&l);
    for k in ["sqil_conv2d_f32", "sqil_q4_conv_int", "sqil_conv_transpose_f32", "sqil_pool2d", "sqil_reduce_f64"] {
        assert!(kernels.contains(&k), "no {k} step in {kernels:?}");
    }
    // The two outputs gathered into the output buffer: the last step copies into it, from both
    // outputs' buffers in one launch.
    let sqil_cuda::lower::LStep::Kernel { name, args, .. } = l.steps.last().unwrap();
    assert_eq!(name, "sqil_copy_pairs2");
    assert!(matches!(args[2], sqil_cuda::lower::KArg::Buf(b) if b == l.output));
    let state = vec![0.25f32; l.in_len];
    let want = p.run(&[sqil_ir::Tensor::from_f32(vec![1, c, len], state.clone()).unwrap()]).unwrap();
    let want: Vec<f32> = want.iter().flat_map(|t| t.data.to_f32_vec()).collect();
    let src = sqil_codegen::cuda::emit_cu(&p, &[state], &[want], 0.02).unwrap();
    assert_eq!(src.matches("<<<").count(), l.steps.len());
    assert!(src.contains("#define OUT_LEN 9"));
    compile_generated_and_program(&l, "1d");
}

/// `l`'s generated kernels and its persistent program compiled with NVRTC (skipped with a reason
/// without libnvrtc, a failure with `SQIL_REQUIRE_NVRTC=1`).
fn compile_generated_and_program(l: &sqil_cuda::lower::Lowered, tag: &str) {
    let cache = std::env::temp_dir().join(format!("sqil-fused-ptx-{tag}-{}", std::process::id()));
    std::env::set_var("SQIL_CACHE", &cache);
    let f = sqil_cuda::fused::fuse(l).unwrap();
    if sqil_cuda::nvrtc_present() {
        for (k, src) in &l.sources {
            let full = format!("{}{src}", sqil_cuda::FP16_CUH);
            sqil_cuda::compile(k, &full, "compute_90").unwrap_or_else(|e| panic!("{tag}: {k}: {e}"));
        }
        sqil_cuda::compile(&f.name, &f.src, "compute_90").unwrap();
    } else {
        assert!(std::env::var("SQIL_REQUIRE_NVRTC").as_deref() != Ok("1"), "NVRTC missing and SQIL_REQUIRE_NVRTC=1");
        eprintln!("skipping the NVRTC compiles of {tag}: libnvrtc not found");
    }
    let _ = std::fs::remove_dir_all(cache);
}

/// Long windows on a small plane (112 channels on 3 x 3: the first layer's 1 152 terms on 9
/// positions, 3 output tiles) split their groups across blocks: the convolution's launch covers
/// splits x tiles blocks and writes group products that `sqil_q4_conv_finish` adds in order. A
/// wide plane with short windows (the testdata CNN) does not split.
#[test]
fn split_convolutions_lower() {
    let mut r = sqil_ir::testing::Rng::new(11);
    let (c, s) = (112, 3);
    let g = common::cnn(&mut r, c, s);
    let settings = "wbits=4,abits=8,group=32";
    let l = sqil_cuda::lower::lower(&common::rtn(&g, settings, &common::x_feeds(&mut r, vec![64, c, s, s]))).unwrap();
    let convs: Vec<(usize, i32)> = l
        .steps
        .iter()
        .filter_map(|sqil_cuda::lower::LStep::Kernel { name, args, threads }| {
            let gsplit = match args.get(17) {
                Some(sqil_cuda::lower::KArg::I32(v)) => *v,
                _ => -1,
            };
            (name == "sqil_q4_conv_int").then_some((*threads, gsplit))
        })
        .collect();
    // conv1: 9 positions x 40 channels = 3 tiles; 112 channels per tap padded to 128, 1 152 terms
    // = 36 groups: 4 splits of 9. The 1 x 1 layer (40 terms) does not split. conv2: 4 positions x
    // 32 channels = 2 tiles; 36 channels per tap padded to 64, 576 terms = 18 groups: 2 splits of 9.
    assert_eq!(convs, vec![(4 * 3 * 256, 9), (3 * 256, 0), (2 * 2 * 256, 9)], "{:?}", l.labels);
    assert_eq!(kernel_names(&l).iter().filter(|k| **k == "sqil_q4_conv_finish").count(), 2);
    assert_eq!(l.labels.iter().filter(|d| d.starts_with("sqil_q4_conv_finish:")).count(), 2);
    compile_generated_and_program(&l, "split");
    let cnn = sqil_cuda::lower::lower(&quantized("cnn")).unwrap();
    assert!(!cnn.labels.iter().any(|d| d.starts_with("sqil_q4_conv_finish")), "{:?}", cnn.labels);
    // On one position the 1 x 1 layer is the linear map on the channel vector.
    let g = common::cnn(&mut r, 64, 1);
    let l = sqil_cuda::lower::lower(&common::rtn(&g, settings, &common::x_feeds(&mut r, vec![64, 64, 1, 1]))).unwrap();
    assert!(l.labels.iter().any(|d| d.starts_with("sqil_q4_int: relu1b:")), "{:?}", l.labels);
    assert_eq!(l.labels.iter().filter(|d| d.starts_with("sqil_q4_conv_finish:")).count(), 2, "{:?}", l.labels);
}

/// Int4 layers over 8 rows or more (a transformer's tokens) lower to `sqil_q4_int_tile`, fewer to
/// a warp per output; the program compiles. The GPU test `int_layers_over_many_tokens_match_the_cpu`
/// checks the bits.
#[test]
fn int_layers_over_tokens_lower_to_tiles() {
    for (t, tiles) in [(19, 3), (4, 0)] {
        let mut r = sqil_ir::testing::Rng::new(5);
        let g = common::tokens(&mut r, t);
        let p = common::rtn(&g, "wbits=4,abits=8,group=32", &common::x_feeds(&mut r, vec![16, t, 12]));
        let l = sqil_cuda::lower::lower(&p).unwrap();
        let names = kernel_names(&l);
        assert_eq!(names.iter().filter(|k| **k == "sqil_q4_int_tile").count(), tiles, "{t} tokens: {names:?}");
        if tiles > 0 {
            compile_generated_and_program(&l, "tokens");
        }
    }
}

/// A float first layer reads the observation itself (no copy step before it), and its bias Add (a
/// MatMul's, as Keras exports) and Relu are its epilogue: the pybullet MLPs (MatMul, Add, Relu)
/// and the Gemm ones (Gemm, Relu) lower to the float layer, behind their observation chain where
/// they have one (humanoid's), and one integer kernel per int4 layer (no generated step between
/// them); each layer but the last writes the next one's input levels beside its values (its
/// levels epilogue), which the next reads (scale 0: levels, no quantizer per term).
/// `gpu_policy.rs` checks the bits on a GPU.
#[test]
fn a_float_layers_input_bias_and_relu_need_no_steps_of_their_own() {
    use sqil_cuda::lower::KArg;
    for name in ["hopper_mlp", "halfcheetah_mlp", "walker2d_mlp", "humanoid_mlp", "bc_hopper"] {
        let p = quantized_float_first(name);
        let l = sqil_cuda::lower::lower(&p).unwrap();
        let names = kernel_names(&l);
        let first = names.iter().position(|&k| k == "sqil_linear_f32w").unwrap_or_else(|| panic!("{name}: {names:?}"));
        assert!(first <= 1 && names[..first].iter().all(|k| k.starts_with("sqil_ew_")), "{name}: {names:?}");
        assert_eq!(&names[first + 1..], ["sqil_q4_int", "sqil_q4_int"], "{name}: {names:?}");
        let sqil_cuda::lower::LStep::Kernel { args, .. } = &l.steps[first];
        assert!(matches!(args[11], KArg::I32(1)), "{name}: the Relu flag");
        assert!(matches!(args[2], KArg::Arr(_)), "{name}: the bias");
        if first == 0 {
            assert!(matches!(args[0], KArg::In(0)), "{name}: reads the observation");
        }
        // Where a layer writes its levels: its last five arguments (buffer, quantizer); each int
        // layer reads (at 3) what the layer before wrote there, with scale 0 (at 12).
        let mut levels = match args[args.len() - 5] {
            KArg::Buf(b) => b,
            _ => panic!("{name}: the float layer writes no levels"),
        };
        for (j, st) in l.steps[first + 1..].iter().enumerate() {
            let sqil_cuda::lower::LStep::Kernel { args, .. } = st;
            assert!(matches!(args[3], KArg::Buf(b) if b == levels), "{name}: int layer {j} reads the levels");
            assert!(matches!(args[12], KArg::F32(s) if s == 0.0), "{name}: int layer {j} quantizes again");
            match (j, &args[args.len() - 5]) {
                (0, KArg::Buf(b)) => levels = *b,
                (1, KArg::Null) => {}
                (_, a) => panic!("{name}: int layer {j} levels out {a:?}"),
            }
        }
        eprintln!("{name}: {names:?}");
    }
}

/// A short float first layer at a thread per output (a TD3-sized actor's 17 -> 400: two blocks of
/// 17-term chains) runs on every block of the persistent program, each block computing both
/// blocks' outputs, so the next layer reads what its own block wrote: no grid barrier between
/// them. A layer of more terms per thread over its blocks (a 24 -> 512: 2 x 24) or more blocks
/// keeps its barrier. The programs compile with NVRTC.
/// (On a GPU, `gpu_policy`'s thread-per-output test checks such a program's bits.)
#[test]
fn a_short_first_layer_runs_on_every_block() {
    use sqil_ir::ops::UnaryOp;
    let relu = Some(UnaryOp::Relu);
    for (dims, everywhere) in [
        (vec![(17, 400, relu), (400, 300, relu), (300, 6, Some(UnaryOp::Tanh))], true),
        (vec![(7, 300, Some(UnaryOp::Sigmoid)), (300, 129, Some(UnaryOp::Tanh)), (129, 1, None)], true),
        // Two blocks of 24 terms (measured slower on every block), five blocks of outputs, or 376
        // terms: the barrier stays.
        (vec![(24, 512, relu), (512, 512, relu), (512, 8, Some(UnaryOp::Tanh))], false),
        (vec![(7, 1030, relu), (1030, 64, relu), (64, 3, None)], false),
        (vec![(376, 400, relu), (400, 300, relu), (300, 17, None)], false),
    ] {
        let mut r = sqil_ir::testing::Rng::new(3);
        let k = dims[0].0;
        let g = common::dense_stack(&mut r, "short", vec![common::batch(), sqil_ir::Dim::Known(k)], &dims);
        let p = common::rtn(&g, "wbits=4,abits=8,group=32", &common::x_feeds(&mut r, vec![16, k]));
        let l = sqil_cuda::lower::lower(&p).unwrap();
        let placed = sqil_cuda::fused::placement(&l);
        let f = sqil_cuda::fused::fuse(&l).unwrap();
        let sqil_cuda::lower::LStep::Kernel { name, threads, .. } = &l.steps[0];
        let blocks = threads.div_ceil(256);
        assert_eq!(sqil_cuda::lower::base_kernel(name), "sqil_linear_f32w", "{dims:?}");
        assert_eq!(placed[0].everywhere, everywhere, "{dims:?}: {blocks} blocks");
        assert_eq!(placed[0].local_sync, everywhere, "{dims:?}");
        let runs_all = format!("(every block runs all {blocks})\n        for (unsigned b = 0; b < {blocks}u; b++) {{");
        assert_eq!(f.src.contains(&runs_all), everywhere && blocks > 1, "{dims:?}");
        let local = placed.iter().filter(|p| p.local_sync).count();
        assert_eq!(f.src.matches("sqil_grid_sync(bar, passed, cluster);").count(), 1 + l.steps.len() - local);
        if sqil_cuda::nvrtc_present() {
            sqil_cuda::compile(&f.name, &f.src, "compute_90").unwrap_or_else(|e| panic!("{dims:?}: {e}"));
        }
    }
}

/// Two outputs per warp only where they let the persistent program fit one cluster of 16 blocks:
/// the MLPs whose 256-output layers would take 32 blocks pair them (every step then at most 16
/// blocks), the pick-place transformer, whose other steps take 96 blocks all the same, keeps a
/// warp per output everywhere.
#[test]
fn outputs_pair_only_where_the_program_then_fits_a_cluster() {
    use sqil_cuda::lower::{KArg, LStep};
    let pairs = |l: &sqil_cuda::lower::Lowered| -> usize {
        l.steps
            .iter()
            .filter(|LStep::Kernel { name, args, .. }| {
                matches!(sqil_cuda::lower::base_kernel(name), "sqil_linear_f32w" | "sqil_q4_int")
                    && matches!(args[args.len() - 6], KArg::I32(2))
            })
            .count()
    };
    for name in ["bc_hopper", "bc_lander", "humanoid_mlp"] {
        let l = sqil_cuda::lower::lower(&quantized_float_first(name)).unwrap();
        let most = l.steps.iter().map(|LStep::Kernel { threads, .. }| threads.div_ceil(256)).max().unwrap();
        assert!(pairs(&l) >= 1 && most <= 16, "{name}: {} paired steps, {most} blocks", pairs(&l));
    }
    let l = sqil_cuda::lower::lower(&quantized_float_first("bc_pickplace_transformer")).unwrap();
    assert_eq!(pairs(&l), 0, "the pick-place transformer");
}

/// An element-wise chain that reads only a warp-per-output layer's output becomes that layer's
/// epilogue (`sqil_linear_f32w__e...`, `sqil_q4_int__e...`: no step of its own), levels and all;
/// a chain over an output something else reads too stays a step. The Elu / GELU MLP of testdata
/// lowers to its four layers' steps. (On a GPU, `gpu_policy` checks these programs' bits.)
#[test]
fn chains_run_as_the_epilogue_of_the_layer_they_read() {
    use sqil_cuda::lower::{base_kernel, KArg, LStep};
    let l = sqil_cuda::lower::lower(&quantized_float_first("mlp")).unwrap();
    let names = kernel_names(&l);
    let bases: Vec<&str> = names.iter().map(|k| base_kernel(k)).collect();
    assert_eq!(bases, ["sqil_layernorm_rows", "sqil_linear_f32w", "sqil_q4_int", "sqil_q4_int"], "{names:?}");
    // The Elu after the float layer, the GELU chain after the [256 x 256] layer (its input read
    // four times, all by the chain), the output Clip after the last.
    assert!(names[1..].iter().all(|k| k.contains("__e")), "{names:?}");
    // The first two write the next layer's levels beside the chain's values.
    for st in &l.steps[1..3] {
        let LStep::Kernel { args, .. } = st;
        assert!(matches!(args[args.len() - 5], KArg::Buf(_)), "{names:?}");
    }
    // Its epilogues compile (after policy_ops.cu, whose templates they instantiate).
    if sqil_cuda::nvrtc_present() {
        for (k, src) in &l.sources {
            let ptx = sqil_cuda::compile(k, &sqil_cuda::generated_source(k, src), "compute_90")
                .unwrap_or_else(|e| panic!("{k}: {e}"));
            assert!(ptx.contains(&format!(".visible .entry {k}(")), "{k}");
        }
    }
    // The same chain after a float and an int layer (Tanh after both): one epilogue struct for
    // two layer kernels, and the program and the graph path's module compile.
    let mut r = sqil_ir::testing::Rng::new(9);
    let tanh = Some(sqil_ir::ops::UnaryOp::Tanh);
    let dims = [(12, 64, tanh), (64, 32, tanh), (32, 3, None)];
    let g = common::dense_stack(&mut r, "tanh2", vec![common::batch(), sqil_ir::Dim::Known(12)], &dims);
    let l =
        sqil_cuda::lower::lower(&common::rtn(&g, "wbits=4,abits=8,group=32", &common::x_feeds(&mut r, vec![16, 12])))
            .unwrap();
    let names = kernel_names(&l);
    let bases: Vec<&str> = names.iter().map(|k| base_kernel(k)).collect();
    assert_eq!(bases, ["sqil_linear_f32w", "sqil_q4_int", "sqil_q4_int"], "{names:?}");
    assert!(names.iter().filter(|k| k.contains("__e")).count() == 2, "{names:?}");
    let epis: std::collections::HashSet<&str> =
        names.iter().filter_map(|k| k.split_once("__e").map(|(_, h)| h)).collect();
    assert_eq!(epis.len(), 1, "one chain, one epilogue: {names:?}");
    if sqil_cuda::nvrtc_present() {
        let f = sqil_cuda::fused::fuse(&l).unwrap();
        sqil_cuda::compile(&f.name, &f.src, "compute_90").unwrap_or_else(|e| panic!("program: {e}"));
        let all: String = l.sources.iter().map(|(_, s)| s.as_str()).collect();
        let (k, _) = l.sources.iter().find(|(k, _)| k.contains("__e")).unwrap();
        sqil_cuda::compile(k, &sqil_cuda::generated_source(k, &all), "compute_90").unwrap_or_else(|e| panic!("{e}"));
    }
    // 8 -> 16 (Tanh) -> 3, where the second output is the Tanh's input too: the Tanh stays a step.
    use sqil_ir::ops::{BinaryOp, UnaryOp};
    use sqil_ir::Op;
    let mut r = sqil_ir::testing::Rng::new(5);
    let mut g = sqil_ir::Graph::new("shared");
    let x =
        g.add_input("x", sqil_ir::ValueType::new(sqil_ir::DType::F32, vec![common::batch(), sqil_ir::Dim::Known(8)]));
    let mut layer = |g: &mut sqil_ir::Graph, h, k: usize, n: usize, i: usize| {
        let w = g.add_const(format!("w{i}"), r.tensor(vec![k, n], 0.3));
        let b = g.add_const(format!("b{i}"), r.tensor(vec![n], 0.2));
        let m = g.add_inferred(format!("mm{i}"), Op::MatMul, &[Some(h), Some(w)], format!("m{i}")).unwrap();
        g.add_inferred(format!("add{i}"), Op::Binary(BinaryOp::Add), &[Some(m), Some(b)], format!("h{i}")).unwrap()
    };
    let h0 = layer(&mut g, x, 8, 16, 0);
    let a0 = g.add_inferred("act0", Op::Unary(UnaryOp::Tanh), &[Some(h0)], "a0").unwrap();
    let h1 = layer(&mut g, a0, 16, 3, 1);
    g.outputs.extend([h1, h0]);
    let feeds = common::x_feeds(&mut r, vec![16, 8]);
    let l = sqil_cuda::lower::lower(&common::rtn(&g, "wbits=4,abits=8,group=8", &feeds)).unwrap();
    let names = kernel_names(&l);
    assert!(names.iter().all(|k| !k.contains("__e")), "{names:?}");
    assert!(names.iter().any(|k| k.starts_with("sqil_ew_")), "{names:?}");
}
