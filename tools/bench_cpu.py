"""CPU inference benchmark, one run, same machine, one core for every engine (the process pins
itself to the last CPU; children inherit it): latency at batches 1, 4, 16 and 64 of every testdata
policy (hopper BC MLP and the pixel CNN bc_pickplace_pixels first, then the pybullet MLPs, the
random-weight MLP, transformer and NHWC CNN, the lander and pick-place BC policies, each quantized
with its committed sample inputs as calibration: `--models testdata` runs those), a 4x1024 MLP and the zoo
(`tools/sqil_tools/zoo.py`: ResNet-18, MobileNetV2, MobileNetV3, EfficientNet-B0, an ACT decoder, a diffusion
1-D U-Net step, a PRelu/MaxPool CNN), for

- sqil-runtime int4: W4A8 and W4A16 artifacts (`sqil quantize --artifact`, GPTQ, groups of 64),
  timed by `sqil bench` (Rust, no Python in the loop);
- onnxruntime 1 thread: f32, int8 dynamic quantization (`quantize_dynamic`), int4 weights
  (`MatMulNBitsQuantizer`, block 64), timed from Python around `InferenceSession.run`
  (the Python call adds about 2-5 us per run, noted in the output);
- tract f32 (its optimized plan), timed in Rust by `crates/conformance/examples/tract_bench.rs`
  (`cargo build --release -p sqil-conformance --example tract_bench`; skipped if not built).

    tools/.venv-dev/bin/python tools/bench_cpu.py [--iters 2000] [--models mobilenet] [--batches 1,64]
                                                   # a run of everything writes docs/bench-cpu.json

Every sqil artifact is also profiled (`sqil bench --profile`, batch 1): the share of its time on
the reference (f64) path and the ops still there, printed with the ratios.

Ratios are of medians (p50): this 2-core VM's speed drifts, so the engines run in interleaved
rounds (`--rounds`) and each reports the median of its rounds' medians.
"""

import argparse
import json
import os
import pathlib
import platform
import subprocess
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper, numpy_helper

from sqil_tools import zoo

ROOT = pathlib.Path(__file__).resolve().parent.parent
SQIL = os.environ.get("SQIL_BIN", str(ROOT / "target" / "release" / "sqil"))
TRACT = pathlib.Path(os.environ.get("TRACT_BIN", str(ROOT / "target" / "release" / "examples" / "tract_bench")))


def gemm_to_matmul(src, dst):
    """Gemm(x, W^T, b) -> MatMul + Add, the form MatMulNBits quantizes."""
    m = onnx.load(src)
    inits = {i.name: i for i in m.graph.initializer}
    nodes = []
    for n in m.graph.node:
        if n.op_type == "Gemm" and n.input[1] in inits:
            w = numpy_helper.to_array(inits[n.input[1]])
            if any(a.name == "transB" and a.i == 1 for a in n.attribute):
                w = w.T
            inits[n.input[1]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w), n.input[1]))
            nodes.append(helper.make_node("MatMul", [n.input[0], n.input[1]], [n.output[0] + "_mm"]))
            nodes.append(helper.make_node("Add", [n.output[0] + "_mm", n.input[2]], [n.output[0]]))
        else:
            nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    onnx.save(m, dst)


def feeds_for(shapes, batch):
    """Random inputs for declared shapes (the first dimension is the batch)."""
    rng = np.random.default_rng(1)
    return [rng.standard_normal([batch] + [d if isinstance(d, int) else 1 for d in sh[1:]]).astype(np.float32)
            for sh in shapes]


def conv_macs(path):
    """Multiply-accumulates per sample of each Conv node (name -> MACs), from inferred shapes."""
    m = onnx.shape_inference.infer_shapes(onnx.load(path))
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(m.graph.value_info) + list(m.graph.output) + list(m.graph.input)}
    inits = {i.name: list(i.dims) for i in m.graph.initializer}
    out = {}
    for n in m.graph.node:
        if n.op_type == "Conv" and n.input[1] in inits and n.output[0] in dims:
            w = inits[n.input[1]]
            out[n.name] = int(np.prod(dims[n.output[0]][1:])) * int(np.prod(w[1:]))
    return out


def peaks():
    """This core's int8 and f32 multiply-accumulate ceilings (GMAC/s), measured by `sqil bench --peaks`."""
    r = subprocess.run([SQIL, "bench", "--peaks"], capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])["peaks"]


def ort_time(path, shapes, batch, iters, opt=True):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    if not opt:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = dict(zip([i.name for i in s.get_inputs()], feeds_for(shapes, batch)))
    for _ in range(max(iters // 10, 1)):
        s.run(None, feed)
    t = []
    for _ in range(iters):
        t0 = time.perf_counter()
        s.run(None, feed)
        t.append(time.perf_counter() - t0)
    return float(np.mean(t) * 1e6), float(np.median(t) * 1e6), float(np.min(t) * 1e6)


def tract_time(path, batch, iters):
    r = subprocess.run([str(TRACT), str(path), "--batch", str(batch), "--iters", str(iters)],
                       capture_output=True, text=True, check=True)
    j = json.loads(r.stdout.strip().splitlines()[-1])
    return j["mean_us"], j["p50_us"], j["min_us"]


def sqil_time(artifact, batch, iters):
    r = subprocess.run([SQIL, "bench", str(artifact), "--batch", str(batch), "--iters", str(iters)],
                       capture_output=True, text=True, check=True)
    j = json.loads(r.stdout.strip().splitlines()[-1])
    return j["mean_us"], j["p50_us"], j["min_us"]


def sqil_profile(artifact):
    """`sqil bench --profile` at batch 1: the share of time per path and the ops still on the
    reference (f64) path."""
    r = subprocess.run([SQIL, "bench", str(artifact), "--batch", "1", "--iters", "20", "--profile"],
                       capture_output=True, text=True, check=True)
    return next(json.loads(l) for l in r.stdout.splitlines() if "reference_share" in l)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every engine per batch size")
    ap.add_argument("--models", default="", help="only the models whose name contains this (e.g. cnn)")
    ap.add_argument("--batches", default="1,4,16,64", help="batch sizes, comma-separated")
    ap.add_argument("--out", type=pathlib.Path, default=None,
                    help="where the JSON rows go (default docs/bench-cpu.json for a run of every model; "
                         "another machine's run: not the committed file)")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    rows, profiles = [], {}
    pol = ROOT / "testdata/policies"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        rng = np.random.default_rng(2)

        def calib(name, *shapes):
            """Random calibration arrays of these per-sample shapes (16 samples each)."""
            out = []
            for i, sh in enumerate(shapes):
                out.append(tmp / f"{name}.calib{i}.npy")
                np.save(out[-1], rng.standard_normal((16, *sh)).astype(np.float32))
            return out

        # name -> (model, calibration inputs, recipe): GPTQ where it runs in seconds; round to
        # nearest for the zoo's larger encoders (GPTQ of ResNet-18 took over 17 minutes here;
        # the kernels, so the speed, are the same whatever the recipe).
        models = {
            "bc_hopper": (pol / "bc_hopper.onnx", [ROOT / "testdata/demos/hopper.npz"], "gptq"),
            "mlp4x1024": (tmp / "mlp4x1024.onnx", calib("mlp", [64]), "gptq"),
            # The rest of testdata's policies, each calibrated on its committed sample inputs.
            **{f"{stem} (testdata)": (pol / f"{stem}.onnx", sorted(pol.glob(f"{stem}.input*.npy")), "gptq")
               for stem in ["hopper_mlp", "halfcheetah_mlp", "walker2d_mlp", "humanoid_mlp", "mlp", "transformer",
                            "bc_lander", "bc_pickplace", "bc_pickplace_transformer"]},
            "nhwc cnn (testdata)": (pol / "cnn.onnx", sorted(pol.glob("cnn.input*.npy")), "gptq"),
            "cnn (pickplace pixels)": (pol / "bc_pickplace_pixels.onnx",
                                       [pol / "bc_pickplace_pixels.input0.npy", pol / "bc_pickplace_pixels.input1.npy"], "gptq"),
            "prelu_cnn (NHWC, PRelu, MaxPool)": (tmp / "prelu_cnn.onnx", [], "rtn"),
            "resnet18_cnn (96x96, zoo)": (tmp / "resnet18.onnx", [], "rtn"),
            "mobilenet_v2 (84x84, zoo)": (tmp / "mobilenet_v2.onnx", [], "rtn"),
            "mobilenet_v3 (84x84, zoo)": (tmp / "mobilenet_v3.onnx", [], "rtn"),
            "efficientnet_b0 (84x84, zoo)": (tmp / "efficientnet_b0.onnx", [], "rtn"),
            "act_decoder (zoo)": (tmp / "act_decoder.onnx", [], "rtn"),
            "diffusion_unet1d (zoo)": (tmp / "diffusion_unet1d.onnx", [], "rtn"),
        }
        models = {k: v for k, v in models.items() if a.models in k}
        builders = {"mlp4x1024": zoo.mlp_4x1024, "prelu_cnn": zoo.prelu_cnn, "resnet18_cnn": zoo.resnet18,
                    "mobilenet_v2": zoo.mobilenet_v2, "mobilenet_v3": zoo.mobilenet_v3, "efficientnet_b0": zoo.efficientnet_b0,
                    "act_decoder": zoo.act_decoder, "diffusion_unet1d": zoo.diffusion_unet1d}
        for name, (path, cal, recipe) in list(models.items()):
            stem = name.split()[0]
            if stem in builders:
                shapes = builders[stem](path)
                if not cal:
                    cal = calib(stem, *[s[1:] for s in shapes])
                models[name] = (path, cal, recipe)
        pk = peaks()
        print(f"this core's ceilings: int8 ({pk['int8_instruction']}) {pk['int8_gmacs']} GMAC/s, "
              f"f32 (FMA) {pk['f32_gmacs']} GMAC/s", flush=True)
        for name, (path, cal, recipe) in models.items():
            shapes = [[d.dim_value if d.dim_value else d.dim_param for d in i.type.tensor_type.shape.dim]
                      for i in onnx.load(path).graph.input]
            engines = {}
            for label, abits in [("sqil W4A8", "8"), ("sqil W4A16", "float")]:
                art = tmp / f"{name}_{abits}.bin".replace(" ", "_")
                cal_args = [x for c in cal for x in ("--calib", str(c))]
                r = subprocess.run([SQIL, "quantize", str(path), "--recipe", recipe, "--wbits", "4", "--abits", abits,
                                    "--group", "64", *cal_args, "-o", str(tmp / "q.onnx"), "--artifact", str(art)],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    raise SystemExit(f"sqil quantize {path.name} failed:\n{r.stderr}")
                engines[label] = ("sqil", art)
                profiles[(name, label)] = sqil_profile(art)
            if TRACT.exists():
                engines["tract f32"] = ("tract", path)
            engines["ort f32"] = ("ort", path)
            stem = name.split()[0]
            quantize_dynamic(str(path), str(tmp / f"{stem}_int8.onnx"), weight_type=QuantType.QInt8)
            engines["ort int8 dynamic"] = ("ort", tmp / f"{stem}_int8.onnx")
            gemm_to_matmul(path, tmp / f"{stem}_mm.onnx")
            q = MatMulNBitsQuantizer(onnx.load(tmp / f"{stem}_mm.onnx"), block_size=64, is_symmetric=True)
            q.process()
            q.model.save_model_to_file(str(tmp / f"{stem}_int4.onnx"))
            engines["ort int4 MatMulNBits"] = ("ort", tmp / f"{stem}_int4.onnx")
            heavy = "cnn" in name or "zoo" in name
            for batch in batches:
                iters = max(a.iters // (20 * batch), 3) if heavy else max(a.iters // batch, 20)
                # Rounds interleave the engines, so a stretch of a slower host (this VM's speed
                # drifts by up to 1.4x within minutes) falls on every engine alike: per engine the
                # median of its rounds' medians and the minimum of their minima.
                got = {label: [] for label in engines}
                for _ in range(a.rounds):
                    for label, (kind, p) in list(engines.items()):
                        n = max(iters // a.rounds, 3 if heavy else 10)
                        if kind == "sqil":
                            got[label].append(sqil_time(p, batch, n))
                        elif kind == "tract":
                            try:
                                got[label].append(tract_time(p, batch, n))
                            except subprocess.CalledProcessError as e:
                                # A peer that cannot run the model is reported and left out of it.
                                why = next((l for l in e.stderr.splitlines() if l.strip()), "failed")
                                print(f"{name}: tract cannot run it: {why[:200]}", flush=True)
                                del engines[label], got[label]
                        else:
                            got[label].append(ort_time(p, shapes, batch, n))
                for label, r in got.items():
                    mean = float(np.mean([x[0] for x in r]))
                    p50 = float(np.median([x[1] for x in r]))
                    mn = float(min(x[2] for x in r))
                    rows.append({"model": name, "engine": label, "batch": batch, "mean_us": mean, "p50_us": p50,
                                 "min_us": mn, "samples_per_s": batch / p50 * 1e6, "rounds": a.rounds})
                    print(f"{name:22} batch {batch:3}  {label:22} mean {mean:10.1f} us  p50 {p50:10.1f} us  min {mn:10.1f} us  "
                          f"{batch / p50 * 1e6:10.0f} samples/s", flush=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    out = {"cpu": cpu, "threads": 1, "onnxruntime": ort.__version__, "peaks": pk, "rows": rows,
           "profiles": [{"model": m, "engine": e, **p} for (m, e), p in profiles.items()]}
    print(f"CPU: {cpu}; ratios of p50 latencies")
    # (The floor is per action at batch 1: without that batch in the run there is nothing to set
    # it against.)
    if any(m.startswith("cnn") for m in models) and pk["int8_gmacs"] and 1 in batches:
        # The CNN's floor at this core's measured ceilings: its int4 convolutions at the int8
        # ceiling and the float first convolution at the f32 ceiling, everything else free.
        macs = conv_macs(pol / "bc_pickplace_pixels.onnx")
        first = next(iter(macs))
        floor_us = (sum(v for k, v in macs.items() if k != first) / pk["int8_gmacs"] + macs[first] / pk["f32_gmacs"]) / 1e3
        m = next(m for m in models if m.startswith("cnn"))
        r = {x["engine"]: x for x in rows if x["model"] == m and x["batch"] == 1}
        fp = min(r[k]["p50_us"] for k in r if k in ("ort f32", "tract f32"))
        fp_min = min(r[k]["min_us"] for k in r if k in ("ort f32", "tract f32"))
        out["cnn_floor"] = {"conv_macs": macs, "floor_us": floor_us, "best_ratio_p50": fp / floor_us,
                            "best_ratio_min": fp_min / floor_us}
        print(f"CNN floor at these ceilings ({sum(macs.values()) / 1e6:.1f} M conv MACs; int4 convolutions at the int8 "
              f"ceiling, the float first one at the f32 ceiling, nothing else): {floor_us:.0f} us, i.e. at most "
              f"{fp / floor_us:.2f}x the fastest f32 peer by medians ({fp_min / floor_us:.2f}x by minima)")
    dest = a.out or (None if a.models else ROOT / "docs" / "bench-cpu.json")
    if dest:
        dest.write_text(json.dumps(out, indent=1) + "\n")
    for m in models:
        for b in batches:
            r = {x["engine"]: x["p50_us"] for x in rows if x["model"] == m and x["batch"] == b}
            fp = min(v for k, v in r.items() if k in ("ort f32", "tract f32"))
            me = r["sqil W4A8"]
            print(f"{m} batch {b}: sqil W4A8 vs fastest f32 peer {fp / me:.2f}x, vs ort int8 {r['ort int8 dynamic'] / me:.2f}x, "
                  f"vs ort int4 {r['ort int4 MatMulNBits'] / me:.2f}x")
        p = profiles[(m, "sqil W4A8")]
        print(f"{m}: W4A8 time on the reference (f64) path {100 * p['reference_share']:.1f}% "
              f"({', '.join(p['reference_ops']) or 'none'}), f32 kernels {100 * p['f32_kernel_share']:.1f}%, "
              f"int4 kernels {100 * p['int4_kernel_share']:.1f}%")

if __name__ == "__main__":
    main()
