//! Whole policies on the GPU (`sqil_cuda::policy::GpuPolicy`): every testdata policy, quantized
//! W4A8 and W4A16, run per state by each path the policy has (one launch per step; the captured
//! graph with its copies; the persistent program, one kernel for the whole step list, launched
//! once and fed through host memory) gives the same
//! bits on every path, within `GPU_TOL` of the CPU runtime (bit for bit where the plan has no
//! reduction in another order). Skipped with a reason without a GPU; `SQIL_REQUIRE_GPU=1` makes
//! a missing GPU a failure, for the device check.

use sqil_cuda::lower::base_kernel;
use sqil_cuda::policy::{program_share_limit, set_program_share_limit, GpuPolicy, Mode, GPU_TOL};
use sqil_runtime::Policy;

mod common;
use common::{input_row, rtn, testdata_rtn as quantized, x_feeds};

/// The tests of this file one at a time: policies of one process share the device through the
/// arbiter, and a test that checks a path must not have it taken by another test's launch.
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    ONE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The largest |GPU - CPU| over all actions relative to the largest |CPU action|, each state's
/// actions of the same length.
fn rel_from_cpu(got: &[Vec<f32>], want: &[Vec<f32>], what: &str) -> f32 {
    let (mut worst, mut scale) = (0f32, 1e-6f32);
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.len(), w.len(), "{what}");
        for (a, b) in g.iter().zip(w) {
            scale = scale.max(b.abs());
            worst = worst.max((a - b).abs());
        }
    }
    worst / scale
}

/// `states` through one launch per step, then the captured graph and (where the policy has one)
/// the persistent program, each the launches' bits; returns the launches' actions.
fn on_every_path(gpu: &sqil_cuda::Gpu, gp: &mut GpuPolicy, states: &[Vec<f32>], what: &str) -> Vec<Vec<f32>> {
    let run = |gp: &mut GpuPolicy| -> Vec<Vec<f32>> { states.iter().map(|x| gp.act(gpu, x).unwrap()).collect() };
    let steps = run(gp);
    gp.capture(gpu).unwrap();
    gp.set_mode(Mode::Graph).unwrap();
    assert_eq!(bits(&run(gp)), bits(&steps), "{what}: graph");
    if gp.has_persistent() {
        gp.set_mode(Mode::Persistent).unwrap();
        assert_eq!(bits(&run(gp)), bits(&steps), "{what}: program");
        assert_eq!(gp.mode(), Mode::Persistent, "{what}: the program kept the device");
    }
    steps
}

/// Actions as bits, every NaN one value (the CPU and GPU runtimes need not share NaN payloads).
fn bits(actions: &[Vec<f32>]) -> Vec<Vec<u32>> {
    actions
        .iter()
        .map(|a| a.iter().map(|v| if v.is_nan() { f32::NAN.to_bits() } else { v.to_bits() }).collect())
        .collect()
}

#[test]
fn every_path_computes_the_same_bits() {
    let _one = one_at_a_time();
    let Some(gpu) = common::gpu_or_skip("the GPU policy paths") else { return };
    for name in [
        "bc_hopper",
        "bc_lander",
        "bc_pickplace",
        "hopper_mlp",
        "humanoid_mlp",
        "mlp",
        "transformer",
        "bc_pickplace_transformer",
        "cnn",
        "bc_pickplace_pixels",
    ] {
        for settings in ["wbits=4,abits=8,group=32", "wbits=4,abits=float,group=32"] {
            let (p, inputs) = quantized(name, settings);
            let mut g = GpuPolicy::new(&gpu, &p).unwrap_or_else(|e| panic!("{name} {settings}: {e}"));
            let sizes = p.input_sizes();
            let rows = inputs.iter().zip(&sizes).map(|(t, d)| t.len() / d).min().unwrap().min(8);
            let (mut states, mut cpu) = (vec![], vec![]);
            for r in 0..rows {
                let per = input_row(&inputs, &sizes, r);
                let feeds: Vec<sqil_ir::Tensor> = per
                    .iter()
                    .zip(&inputs)
                    .map(|(v, t)| {
                        let mut shape = t.shape.clone();
                        shape[0] = 1;
                        sqil_ir::Tensor::from_f32(shape, v.clone()).unwrap()
                    })
                    .collect();
                cpu.push(p.run(&feeds).unwrap().remove(0).data.to_f32_vec());
                states.push(per.concat());
            }
            let run = |g: &mut GpuPolicy| -> Vec<Vec<f32>> {
                states.iter().map(|s| g.act(&gpu, s).unwrap_or_else(|e| panic!("{name}: {e}"))).collect()
            };
            let steps = run(&mut g);
            g.capture(&gpu).unwrap();
            let chosen = g.mode();
            g.set_mode(Mode::Graph).unwrap();
            assert_eq!(run(&mut g), steps, "{name} {settings}: graph replay differs from launches");
            assert!(g.has_persistent(), "{name} {settings}: {:?}", g.persist_why_not);
            g.set_mode(Mode::Persistent).unwrap();
            assert_eq!(run(&mut g), steps, "{name} {settings}: the persistent program differs from launches");
            assert_eq!(g.mode(), Mode::Persistent, "{name} {settings}: the program kept the device");
            // Over the other barrier (one cluster / the grid barrier) where the device has both.
            let (_, cluster) = g.persistent_grid().unwrap();
            if g.set_persistent_cluster(!cluster).is_ok() {
                assert_eq!(run(&mut g), steps, "{name} {settings}: the program with cluster={}", !cluster);
                g.set_persistent_cluster(cluster).unwrap();
            }
            // Over fewer blocks (each runs more of a step's blocks in turn), down to one, over the
            // grid barrier and as a cluster.
            let chosen_blocks = g.persistent_grid().unwrap().0;
            for c in [false, true] {
                if g.set_persistent_cluster(c).is_err() {
                    continue;
                }
                for cap in [1, 3] {
                    g.set_persistent_blocks(Some(cap)).unwrap();
                    assert_eq!(
                        run(&mut g),
                        steps,
                        "{name} {settings}: the program on at most {cap} blocks, cluster={c}"
                    );
                }
            }
            g.set_persistent_cluster(cluster).unwrap();
            g.set_persistent_blocks(Some(chosen_blocks)).unwrap();
            // A bad observation is refused and leaves the program serving; stopping (another
            // path) and starting again gives the same bits.
            assert!(g.act(&gpu, &[0.0; 1]).is_err());
            assert_eq!(run(&mut g)[0], steps[0]);
            g.set_mode(Mode::Steps).unwrap();
            assert_eq!(run(&mut g), steps, "{name} {settings}: launches after the persistent program");
            g.set_mode(Mode::Persistent).unwrap();
            assert_eq!(run(&mut g), steps, "{name} {settings}: the restarted persistent program");
            g.set_mode(chosen).unwrap();
            let rel = rel_from_cpu(&steps, &cpu, name);
            assert!(rel <= GPU_TOL, "{name} {settings}: {rel} from the CPU");
            eprintln!(
                "{name} {settings}: {rows} states, chosen {chosen:?} {:?}, {rel:.1e} from the CPU",
                g.persistent_grid()
            );
        }
    }
}

/// Int4 convolutions over channels that are not whole groups (the generated CNN: a 1 x 1 layer on
/// 40 channels, its last group short, and a 3 x 3 layer on 36, its taps' runs padded to whole
/// groups): the GPU's steps, graph and program give the CPU runtime's bits.
#[test]
fn convolutions_over_partial_groups_match_the_cpu() {
    let _one = one_at_a_time();
    let Some(gpu) = common::gpu_or_skip("the partial-group convolutions") else { return };
    let mut r = sqil_ir::testing::Rng::new(7);
    let (c, s) = (6, 9);
    let g = common::cnn(&mut r, c, s);
    let per = c * s * s;
    let shaped = |n: usize, v: Vec<f32>| sqil_ir::Tensor::from_f32(vec![n, c, s, s], v).unwrap();
    let feeds = x_feeds(&mut r, vec![128, c, s, s]);
    for settings in ["wbits=4,abits=8,group=32", "wbits=4,abits=8,group=64"] {
        let p = rtn(&g, settings, &feeds);
        let padded = p
            .plan
            .steps
            .iter()
            .filter(|s| matches!(s, sqil_lower::Step::Q4Linear { conv: Some(im), .. } if im.run > im.channels))
            .count();
        assert_eq!(padded, 1, "{settings}: {:?}", p.plan.describe());
        let states: Vec<Vec<f32>> = (0..6).map(|_| (0..per).map(|_| r.unit() * 1.5).collect()).collect();
        let cpu: Vec<Vec<f32>> =
            states.iter().map(|x| p.run(&[shaped(1, x.clone())]).unwrap().remove(0).data.to_f32_vec()).collect();
        let mut gp = GpuPolicy::new(&gpu, &p).unwrap_or_else(|e| panic!("{settings}: {e}"));
        assert_eq!(on_every_path(&gpu, &mut gp, &states, settings), cpu, "{settings}: launches");
        eprintln!("{settings}: {} states bit for bit on every path", states.len());
    }
}

/// Convolutions over long windows on small planes (a ResNet's late stages): too few output tiles
/// for the GPU, so `sqil_q4_conv_int` splits the groups across blocks and `sqil_q4_conv_finish`
/// adds the group products in order. 112 channels on a 3 x 3 plane: both 3 x 3 layers split
/// (`cuda_target::split_convolutions_lower`), their runs padded to whole groups. 64 channels on
/// one position: the 3 x 3 layers split too, and the 1 x 1 layer between them runs as the linear
/// map on the channel vector (`sqil_q4_int`). Bit for bit with the CPU on every path, NaN in a
/// window (one input value) included.
#[test]
fn split_and_one_position_convolutions_match_the_cpu() {
    let _one = one_at_a_time();
    let Some(gpu) = common::gpu_or_skip("the split convolutions") else { return };
    let mut r = sqil_ir::testing::Rng::new(11);
    for (c, s) in [(112, 3), (64, 1)] {
        let g = common::cnn(&mut r, c, s);
        let per = c * s * s;
        let shaped = |n: usize, v: Vec<f32>| sqil_ir::Tensor::from_f32(vec![n, c, s, s], v).unwrap();
        let feeds = x_feeds(&mut r, vec![64, c, s, s]);
        for settings in ["wbits=4,abits=8,group=32", "wbits=4,abits=8,group=64"] {
            let what = format!("{c} x {s} x {s}, {settings}");
            let p = rtn(&g, settings, &feeds);
            let mut states: Vec<Vec<f32>> = (0..5).map(|_| (0..per).map(|_| r.unit() * 1.5).collect()).collect();
            states[4][per / 2 + 1] = f32::NAN;
            let cpu: Vec<Vec<f32>> =
                states.iter().map(|x| p.run(&[shaped(1, x.clone())]).unwrap().remove(0).data.to_f32_vec()).collect();
            assert!(cpu[4].iter().any(|v| v.is_nan()), "{what}: the NaN state");
            let labels = sqil_cuda::lower::lower(&p).unwrap().labels;
            let finishes = labels.iter().filter(|d| d.starts_with("sqil_q4_conv_finish:")).count();
            assert_eq!(finishes, 2, "{what}: {labels:?}");
            let linear = labels.iter().any(|d| d.starts_with("sqil_q4_int: relu1b:"));
            assert_eq!(linear, s == 1, "{what}: {labels:?}");
            let mut gp = GpuPolicy::new(&gpu, &p).unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(bits(&on_every_path(&gpu, &mut gp, &states, &what)), bits(&cpu), "{what}");
            eprintln!("{what}: {} states bit for bit on every path", states.len());
        }
    }
}

/// A 1-D policy with two outputs (`common::conv1d`: Conv1d float and int4, ConvTranspose1d,
/// MaxPool1d, ReduceMean, a Gemm head): the ops of a diffusion U-Net step and of a transformer's
/// pooled head, which had no GPU lowering. Every path gives the same bits, the outputs
/// concatenated in order, within `GPU_TOL` of the CPU runtime.
#[test]
fn one_dimensional_ops_and_several_outputs_match_the_cpu() {
    let _one = one_at_a_time();
    let Some(gpu) = common::gpu_or_skip("the 1-D, two-output policy") else { return };
    let mut r = sqil_ir::testing::Rng::new(11);
    let (c, len) = (4, 16);
    let g = common::conv1d(&mut r, c, len);
    let per = c * len;
    let shaped = |n: usize, v: Vec<f32>| sqil_ir::Tensor::from_f32(vec![n, c, len], v).unwrap();
    let feeds = x_feeds(&mut r, vec![64, c, len]);
    for settings in ["wbits=4,abits=8,group=32", "wbits=4,abits=float,group=32"] {
        let p = rtn(&g, settings, &feeds);
        let states: Vec<Vec<f32>> = (0..6).map(|_| (0..per).map(|_| r.unit() * 1.5).collect()).collect();
        let cpu: Vec<Vec<f32>> = states
            .iter()
            .map(|x| p.run(&[shaped(1, x.clone())]).unwrap().iter().flat_map(|t| t.data.to_f32_vec()).collect())
            .collect();
        assert!(cpu.iter().all(|a| a.len() == 6 + 3));
        let mut gp = GpuPolicy::new(&gpu, &p).unwrap_or_else(|e| panic!("{settings}: {e}"));
        let steps = on_every_path(&gpu, &mut gp, &states, settings);
        let rel = rel_from_cpu(&steps, &cpu, settings);
        assert!(rel <= GPU_TOL, "{settings}: {rel} from the CPU");
        eprintln!("{settings}: {} states, {rel:.1e} from the CPU, the same bits on every path", states.len());
    }
}

/// Two outputs per warp (`sqil_linear_f32w` and `sqil_q4_int` over 129 to 256 outputs, so a small
/// policy's program fits one cluster of 16 blocks): a one-row MLP 37 -> 256 (Sigmoid, the float first
/// layer: pairs; its bias Add folded into it, the Sigmoid its epilogue) -> 201 (Tanh: pairs, the Tanh
/// its epilogue, the last warp's second output past the row) -> 3 (one output per warp), a NaN in
/// one state: the CPU's bits on every path at W4A8, within GPU_TOL at W4A16.
#[test]
fn paired_outputs_match_the_cpu() {
    use sqil_ir::ops::UnaryOp;
    // The first two layers on 128 and 101 warps at W4A8 (the weight-only layers keep a warp per
    // output).
    dense_stack_matches_the_cpu(
        "paired",
        17,
        &[(37, 256, Some(UnaryOp::Sigmoid)), (256, 201, Some(UnaryOp::Tanh)), (201, 3, None)],
        &[("sqil_linear_f32w", 128 * 32), ("sqil_q4_int", 101 * 32)],
    );
}

/// A short observation into a wide float first layer (`fit_cluster`: 7 -> 300 at a thread per
/// output, its Sigmoid the epilogue) -> 129 (Tanh; on 10 groups of 32, so its pairs are summed one
/// after the other, the step that completes the cluster) -> 1: the first layer on 300 threads and
/// the second on 65 warps at W4A8, so every step fits a cluster of 16 blocks; the CPU's bits on
/// every path at W4A8, within GPU_TOL at W4A16, a NaN in one state.
#[test]
fn a_thread_per_output_matches_the_cpu() {
    use sqil_ir::ops::UnaryOp;
    dense_stack_matches_the_cpu(
        "threads",
        23,
        &[(7, 300, Some(UnaryOp::Sigmoid)), (300, 129, Some(UnaryOp::Tanh)), (129, 1, None)],
        &[("sqil_linear_f32w", 300), ("sqil_q4_int", 65 * 32)],
    );
}

/// A humanoid-sized actor: 376 observations -> 400 (Sigmoid, its epilogue) -> 300 (Tanh) -> 17.
/// Its first layer has too many terms for a thread per output and 400 warps at a warp per output,
/// so `fit_cluster` leaves the program on the cooperative grid, a warp per output throughout (a
/// block per 32 outputs through shared memory fit a cluster of 13 but measured slower on the H100,
/// 20.8 against 18.7 us, and was not kept); the CPU's bits on every path at W4A8, within GPU_TOL at
/// W4A16, a NaN in one state.
#[test]
fn a_humanoid_sized_actor_matches_the_cpu() {
    use sqil_ir::ops::UnaryOp;
    dense_stack_matches_the_cpu(
        "humanoid",
        31,
        &[(376, 400, Some(UnaryOp::Sigmoid)), (400, 300, Some(UnaryOp::Tanh)), (300, 17, None)],
        &[("sqil_linear_f32w", 400 * 32), ("sqil_q4_int", 300 * 32)],
    );
}

/// Four outputs per warp (`sqil_q4_int_four`, where two still leave a step over 16 blocks): 24 ->
/// 1030 (Tanh; a thread per output) -> 512 (Sigmoid; 33 groups: the group-per-lane sums one channel
/// after the other) -> 512 (Tanh; 16 groups: the lanes-per-group form over four channels at once)
/// -> 3: the CPU's bits on every path at W4A8.
#[test]
fn four_outputs_per_warp_match_the_cpu() {
    use sqil_ir::ops::UnaryOp;
    dense_stack_matches_the_cpu(
        "fours",
        29,
        &[
            (24, 1030, Some(UnaryOp::Tanh)),
            (1030, 512, Some(UnaryOp::Sigmoid)),
            (512, 512, Some(UnaryOp::Tanh)),
            (512, 3, None),
        ],
        &[("sqil_linear_f32w", 1030), ("sqil_q4_int", 128 * 32)],
    );
}

/// A one-row MLP of `dims` (each layer's activation its epilogue) as a W4A8 and a weight-only
/// policy: at W4A8 every activation an epilogue and, per `(kernel, threads)` of `routing`, a step of
/// that kernel on that many threads (checked without a GPU too); then on the GPU six states, one
/// with a NaN: the CPU's bits on every path at W4A8, within GPU_TOL at W4A16.
fn dense_stack_matches_the_cpu(
    name: &str,
    seed: u64,
    dims: &[(usize, usize, Option<sqil_ir::ops::UnaryOp>)],
    routing: &[(&str, usize)],
) {
    let _one = one_at_a_time();
    let mut r = sqil_ir::testing::Rng::new(seed);
    let inputs = dims[0].0;
    let g = common::dense_stack(&mut r, name, vec![common::batch(), sqil_ir::Dim::Known(inputs)], dims);
    let feeds = x_feeds(&mut r, vec![64, inputs]);
    let mut policies = vec![];
    for settings in ["wbits=4,abits=8,group=32", "wbits=4,abits=float,group=32"] {
        let p = rtn(&g, settings, &feeds);
        let l = sqil_cuda::lower::lower(&p).unwrap();
        let shape: Vec<(String, usize)> = l
            .steps
            .iter()
            .map(|sqil_cuda::lower::LStep::Kernel { name, threads, .. }| (name.clone(), *threads))
            .collect();
        if settings.contains("abits=8") {
            let chains = dims.iter().filter(|d| d.2.is_some()).count();
            assert!(shape.iter().filter(|(k, _)| k.contains("__e")).count() == chains, "{settings}: {shape:?}");
            for &(kernel, threads) in routing {
                assert!(
                    shape.iter().any(|(k, t)| base_kernel(k) == kernel && *t == threads),
                    "{settings}: {kernel} on {threads} threads: {shape:?}"
                );
            }
        }
        policies.push((settings, p));
    }
    let Some(gpu) = common::gpu_or_skip(name) else { return };
    for (settings, p) in policies {
        let mut states: Vec<Vec<f32>> = (0..6).map(|_| (0..inputs).map(|_| r.unit() * 2.0).collect()).collect();
        states[4][inputs / 2] = f32::NAN;
        let cpu: Vec<Vec<f32>> = states
            .iter()
            .map(|x| {
                let t = sqil_ir::Tensor::from_f32(vec![1, inputs], x.clone()).unwrap();
                p.run(&[t]).unwrap().remove(0).data.to_f32_vec()
            })
            .collect();
        let mut gp = GpuPolicy::new(&gpu, &p).unwrap_or_else(|e| panic!("{settings}: {e}"));
        let got = on_every_path(&gpu, &mut gp, &states, settings);
        if settings.contains("abits=8") {
            assert_eq!(bits(&got), bits(&cpu), "{settings}");
        } else {
            // Float activations: within GPU_TOL of the CPU; the NaN state NaN throughout.
            assert!(got[4].iter().all(|v| v.is_nan()) && cpu[4].iter().all(|v| v.is_nan()), "{settings}");
            let rel = rel_from_cpu(&[&got[..4], &got[5..]].concat(), &[&cpu[..4], &cpu[5..]].concat(), settings);
            assert!(rel <= GPU_TOL, "{settings}: {rel} from the CPU");
        }
        eprintln!("{settings}: {} states match the CPU on every path, grid {:?}", states.len(), gp.persistent_grid());
    }
}

/// Int4 layers over many rows (`sqil_q4_int_tile`: 19 tokens of a token-wise MLP, see
/// `common::tokens`): short last groups, outputs not a multiple of the tile's, the wide layer on
/// its levels, signed (Tanh) and unsigned (ReLU) inputs, groups of 32 and 64, a NaN in one token
/// (only that token's actions NaN): the CPU's bits on every path.
#[test]
fn int_layers_over_many_tokens_match_the_cpu() {
    let _one = one_at_a_time();
    let Some(gpu) = common::gpu_or_skip("the int4 layers over tokens") else { return };
    let mut r = sqil_ir::testing::Rng::new(5);
    let t = 19;
    let g = common::tokens(&mut r, t);
    let shaped = |v: Vec<f32>| sqil_ir::Tensor::from_f32(vec![1, t, 12], v).unwrap();
    let feeds = x_feeds(&mut r, vec![16, t, 12]);
    for settings in ["wbits=4,abits=8,group=32", "wbits=4,abits=8,group=64"] {
        let p = rtn(&g, settings, &feeds);
        let labels = sqil_cuda::lower::lower(&p).unwrap().labels;
        let tiles = labels.iter().filter(|d| d.starts_with("sqil_q4_int_tile:")).count();
        assert_eq!(tiles, 3, "{settings}: {labels:?}");
        let mut states: Vec<Vec<f32>> = (0..5).map(|_| (0..t * 12).map(|_| r.unit() * 2.0).collect()).collect();
        states[3][5 * 12 + 7] = f32::NAN;
        let cpu: Vec<Vec<f32>> =
            states.iter().map(|x| p.run(&[shaped(x.clone())]).unwrap().remove(0).data.to_f32_vec()).collect();
        let nan_rows: Vec<usize> =
            (0..t).filter(|&i| cpu[3][i * 64..(i + 1) * 64].iter().all(|v| v.is_nan())).collect();
        assert_eq!(nan_rows, vec![5], "{settings}: the NaN token");
        let mut gp = GpuPolicy::new(&gpu, &p).unwrap_or_else(|e| panic!("{settings}: {e}"));
        assert_eq!(bits(&on_every_path(&gpu, &mut gp, &states, settings)), bits(&cpu), "{settings}");
        eprintln!("{settings}: {} states of {t} tokens bit for bit on every path", states.len());
    }
}

/// Several policies in one process on one GPU (an ensemble, a fleet of robots served together):
/// each policy is uploaded, captured and put on its persistent program while the earlier ones'
/// programs run, then all act in turn. Nothing waits behind another policy's program (a launch
/// that would stops it, and that policy takes its graph), and every policy keeps the bits it
/// computes alone, whichever path it is left on: at the default share limit, and at 0, where
/// every other policy's launch stops a program. A hang fails the test (a watchdog ends the process).
#[test]
fn several_policies_share_one_gpu() {
    let _one = one_at_a_time();
    let Some(gpu) = common::gpu_or_skip("several policies on one GPU") else { return };
    let done = common::watchdog("several_policies_share_one_gpu", 120);
    let names = ["hopper_mlp", "cnn", "bc_pickplace_transformer"];
    let policies: Vec<(Policy, Vec<Vec<f32>>)> = names
        .iter()
        .map(|name| {
            let (p, inputs) = quantized(name, "wbits=4,abits=8,group=32");
            let sizes = p.input_sizes();
            let states = (0..4).map(|r| input_row(&inputs, &sizes, r).concat()).collect();
            (p, states)
        })
        .collect();
    let alone: Vec<Vec<Vec<u32>>> = policies
        .iter()
        .map(|(p, states)| {
            let mut g = GpuPolicy::new(&gpu, p).unwrap();
            bits(&states.iter().map(|x| g.act(&gpu, x).unwrap()).collect::<Vec<_>>())
        })
        .collect();
    let default = program_share_limit();
    for limit in [default, 0.0] {
        set_program_share_limit(limit);
        let mut gs: Vec<GpuPolicy> = vec![];
        for (name, (p, _)) in names.iter().zip(&policies) {
            let mut g = GpuPolicy::new(&gpu, p).unwrap_or_else(|e| panic!("limit {limit}: {name}: {e}"));
            g.capture(&gpu).unwrap_or_else(|e| panic!("limit {limit}: {name}: {e}"));
            if g.has_persistent() {
                g.set_mode(Mode::Persistent).unwrap();
            }
            gs.push(g);
        }
        for round in 0..3 {
            for (i, g) in gs.iter_mut().enumerate() {
                let got: Vec<Vec<f32>> = policies[i]
                    .1
                    .iter()
                    .map(|x| g.act(&gpu, x).unwrap_or_else(|e| panic!("limit {limit}: {}: {e}", names[i])))
                    .collect();
                assert_eq!(bits(&got), alone[i], "limit {limit}: {} in round {round}", names[i]);
            }
        }
        let paths: Vec<Mode> = gs.iter().map(|g| g.mode()).collect();
        eprintln!(
            "share limit {limit}: paths after three rounds {paths:?}, grids {:?}",
            gs.iter().map(|g| g.persistent_grid()).collect::<Vec<_>>()
        );
        if limit == 0.0 {
            assert!(paths.iter().all(|&m| m != Mode::Persistent), "limit 0 leaves no program running: {paths:?}");
        }
        // Taking the program back (at limit 0: the only program running).
        eprintln!("share limit {limit}: {} takes its program back", names[0]);
        if gs[0].has_persistent() {
            gs[0].set_mode(Mode::Persistent).unwrap();
            assert_eq!(bits(&policies[0].1.iter().map(|x| gs[0].act(&gpu, x).unwrap()).collect::<Vec<_>>()), alone[0]);
            assert_eq!(gs[0].mode(), Mode::Persistent);
        }
        // Dropped in turn while the others' programs run (freeing synchronizes the device).
        drop(gs);
        eprintln!("share limit {limit}: the policies dropped");
    }
    set_program_share_limit(default);
    done.send(()).ok();
}
