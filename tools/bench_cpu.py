"""CPU inference benchmark, one run, same machine, one core for every engine (the process pins
itself to the last CPU; children inherit it): batch-1 latency and batch-64 throughput of the
hopper BC policy, a 4x1024 MLP and the pixel CNN policy (bc_pickplace_pixels), for

- sqil-runtime int4: W4A8 and W4A16 artifacts (`sqil quantize --artifact`, GPTQ, groups of 64),
  timed by `sqil bench` (Rust, no Python in the loop);
- onnxruntime 1 thread: f32, int8 dynamic quantization (`quantize_dynamic`), int4 weights
  (`MatMulNBitsQuantizer`, block 64), timed from Python around `InferenceSession.run`
  (the Python call adds about 2-5 us per run, noted in the output);
- tract f32 (its optimized plan), timed in Rust by `crates/conformance/examples/tract_bench.rs`
  (`cargo build --release -p sqil-conformance --example tract_bench`; skipped if not built).

    tools/.venv-dev/bin/python tools/bench_cpu.py [--iters 2000]      # writes docs/bench-cpu.json

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
from onnx import TensorProto, helper, numpy_helper

ROOT = pathlib.Path(__file__).resolve().parent.parent
SQIL = os.environ.get("SQIL_BIN", str(ROOT / "target" / "release" / "sqil"))
TRACT = pathlib.Path(os.environ.get("TRACT_BIN", str(ROOT / "target" / "release" / "examples" / "tract_bench")))


def mlp_4x1024(path):
    """obs [N, 64] -> 4 x (Gemm 1024 + ReLU) -> Gemm 16: a 3.2M-parameter MLP policy."""
    rng = np.random.default_rng(0)
    nodes, inits, prev, dim = [], [], "obs", 64
    for i, out in enumerate([1024, 1024, 1024, 1024, 16]):
        w = (rng.standard_normal((out, dim)) / np.sqrt(dim)).astype(np.float32)
        b = (rng.standard_normal(out) * 0.01).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"h{i}"], transB=1))
        prev, dim = f"h{i}", out
        if i < 4:
            nodes.append(helper.make_node("Relu", [prev], [f"a{i}"]))
            prev = f"a{i}"
    g = helper.make_graph(nodes, "mlp4x1024", [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["N", 64])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", 16])], inits)
    # IR version 9 whatever onnx makes by default (1.23 writes 14, which sqil refuses by name).
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)


def prelu_cnn(path):
    """A camera CNN of the kind the fast path missed (issue 24): NHWC image [N, 96, 96, 3] ->
    3 x (Conv 3x3 + PRelu + MaxPool 3x3/2) with 16, 32, 64 channels -> GlobalAveragePool ->
    Gemm 64 + PRelu -> three heads (2, 1, 4), random weights."""
    rng = np.random.default_rng(0)
    nodes, inits = [helper.make_node("Transpose", ["image"], ["x0"], perm=[0, 3, 1, 2])], []
    prev, c = "x0", 3
    for i, co in enumerate([16, 32, 64]):
        w = (rng.standard_normal((co, c, 3, 3)) / np.sqrt(9 * c)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"cw{i}"), numpy_helper.from_array((rng.standard_normal(co) * 0.01).astype(np.float32), f"cb{i}"),
                  numpy_helper.from_array(np.full((co, 1, 1), 0.25, np.float32), f"slope{i}")]
        nodes += [helper.make_node("Conv", [prev, f"cw{i}", f"cb{i}"], [f"c{i}"], pads=[1, 1, 1, 1]),
                  helper.make_node("PRelu", [f"c{i}", f"slope{i}"], [f"p{i}"]),
                  helper.make_node("MaxPool", [f"p{i}"], [f"m{i}"], kernel_shape=[3, 3], strides=[2, 2])]
        prev, c = f"m{i}", co
    nodes += [helper.make_node("GlobalAveragePool", [prev], ["g"]), helper.make_node("Flatten", ["g"], ["f"])]
    w = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    inits += [numpy_helper.from_array(w, "fw"), numpy_helper.from_array(np.zeros(64, np.float32), "fb"),
              numpy_helper.from_array(np.full((64,), 0.25, np.float32), "fslope")]
    nodes += [helper.make_node("Gemm", ["f", "fw", "fb"], ["h"], transB=1), helper.make_node("PRelu", ["h", "fslope"], ["hp"])]
    outs = []
    for j, k in enumerate([2, 1, 4]):
        inits += [numpy_helper.from_array((rng.standard_normal((k, 64)) / 8).astype(np.float32), f"hw{j}"),
                  numpy_helper.from_array(np.zeros(k, np.float32), f"hb{j}")]
        nodes.append(helper.make_node("Gemm", ["hp", f"hw{j}", f"hb{j}"], [f"out{j}"], transB=1))
        outs.append(helper.make_tensor_value_info(f"out{j}", TensorProto.FLOAT, ["N", k]))
    g = helper.make_graph(nodes, "prelu_cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 96, 96, 3])],
                          outs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, path)


def resnet18(path, size=96, outputs=10):
    """ResNet-18 (torchvision's layout: 7x7/2 stem, BatchNorm, 3x3/2 MaxPool, four stages of two
    BasicBlocks with 1x1/2 projection shortcuts, global average pool) on a [N, 3, 96, 96] image,
    the visual encoder of Diffusion Policy and ACT, with a linear action head; random weights,
    BatchNorm statistics random too (speed does not need trained weights)."""
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    n = [0]

    def name(p):
        n[0] += 1
        return f"{p}{n[0]}"

    def conv_bn(x, cin, cout, k, stride, relu):
        w, y = name("w"), name("c")
        inits.append(numpy_helper.from_array((rng.standard_normal((cout, cin, k, k)) * np.sqrt(2 / (cin * k * k))).astype(np.float32), w))
        nodes.append(helper.make_node("Conv", [x, w], [y], kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4))
        bn = [name(p) for p in ("s", "b", "m", "v")]
        vals = [1 + 0.1 * rng.standard_normal(cout), 0.1 * rng.standard_normal(cout), 0.1 * rng.standard_normal(cout),
                1 + 0.1 * rng.random(cout)]
        inits.extend(numpy_helper.from_array(v.astype(np.float32), nm) for v, nm in zip(vals, bn))
        z = name("bn")
        nodes.append(helper.make_node("BatchNormalization", [y, *bn], [z]))
        if relu:
            r = name("r")
            nodes.append(helper.make_node("Relu", [z], [r]))
            return r
        return z

    x = conv_bn("image", 3, 64, 7, 2, True)
    nodes.append(helper.make_node("MaxPool", [x], ["pool"], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]))
    x, cin = "pool", 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for b in range(2):
            s = stride if b == 0 else 1
            h = conv_bn(x, cin, cout, 3, s, True)
            h = conv_bn(h, cout, cout, 3, 1, False)
            short = conv_bn(x, cin, cout, 1, s, False) if (s != 1 or cin != cout) else x
            a, r = name("add"), name("r")
            nodes += [helper.make_node("Add", [h, short], [a]), helper.make_node("Relu", [a], [r])]
            x, cin = r, cout
    nodes += [helper.make_node("GlobalAveragePool", [x], ["gap"]), helper.make_node("Flatten", ["gap"], ["feat"])]
    inits += [numpy_helper.from_array((rng.standard_normal((outputs, 512)) / np.sqrt(512)).astype(np.float32), "fc_w"),
              numpy_helper.from_array(np.zeros(outputs, np.float32), "fc_b")]
    nodes.append(helper.make_node("Gemm", ["feat", "fc_w", "fc_b"], ["action"], transB=1))
    g = helper.make_graph(nodes, "resnet18", [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, size, size])],
                          [helper.make_tensor_value_info("action", TensorProto.FLOAT, ["N", outputs])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    onnx.save(m, path)


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


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every engine per batch size")
    ap.add_argument("--models", default="", help="only the models whose name contains this (e.g. cnn)")
    ap.add_argument("--out", type=pathlib.Path, default=None,
                    help="where the JSON rows go (default docs/bench-cpu.json for a run of every model; "
                         "another machine's run: not the committed file)")
    a = ap.parse_args()
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
    rows = []
    pol = ROOT / "testdata/policies"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        mlp_4x1024(tmp / "mlp4x1024.onnx")
        np.save(tmp / "calib.npy", np.random.default_rng(2).standard_normal((256, 64)).astype(np.float32))
        prelu_cnn(tmp / "prelu_cnn.onnx")
        np.save(tmp / "image.npy", np.random.default_rng(3).random((32, 96, 96, 3)).astype(np.float32))
        resnet18(tmp / "resnet18.onnx")
        np.save(tmp / "image96.npy", np.random.default_rng(4).random((16, 3, 96, 96)).astype(np.float32))
        models = {"resnet18_cnn (96x96, zoo)": (tmp / "resnet18.onnx", [tmp / "image96.npy"]),
                  "prelu_cnn (NHWC, PRelu, MaxPool)": (tmp / "prelu_cnn.onnx", [tmp / "image.npy"]),
                  "bc_hopper": (ROOT / "testdata/policies/bc_hopper.onnx", [ROOT / "testdata/demos/hopper.npz"]),
                  "mlp4x1024": (tmp / "mlp4x1024.onnx", [tmp / "calib.npy"]),
                  "cnn (pickplace pixels)": (pol / "bc_pickplace_pixels.onnx",
                                             [pol / "bc_pickplace_pixels.input0.npy", pol / "bc_pickplace_pixels.input1.npy"])}
        models = {k: v for k, v in models.items() if a.models in k}
        pk = peaks()
        print(f"this core's ceilings: int8 ({pk['int8_instruction']}) {pk['int8_gmacs']} GMAC/s, "
              f"f32 (FMA) {pk['f32_gmacs']} GMAC/s", flush=True)
        for name, (path, calib) in models.items():
            shapes = [[d.dim_value if d.dim_value else d.dim_param for d in i.type.tensor_type.shape.dim]
                      for i in onnx.load(path).graph.input]
            engines = {}
            for label, abits in [("sqil W4A8", "8"), ("sqil W4A16", "float")]:
                art = tmp / f"{name}_{abits}.bin".replace(" ", "_")
                cal = [x for c in calib for x in ("--calib", str(c))]
                r = subprocess.run([SQIL, "quantize", str(path), "--recipe", "gptq", "--wbits", "4", "--abits", abits,
                                    "--group", "64", *cal, "-o", str(tmp / "q.onnx"), "--artifact", str(art)],
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    raise SystemExit(f"sqil quantize {path.name} failed:\n{r.stderr}")
                engines[label] = ("sqil", art)
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
            for batch in (1, 64):
                iters = a.iters if batch == 1 else max(a.iters // 10, 50)
                if "cnn" in name:
                    iters = max(iters // 10, 20)
                # Rounds interleave the engines, so a stretch of a slower host (this VM's speed
                # drifts by up to 1.4x within minutes) falls on every engine alike: per engine the
                # median of its rounds' medians and the minimum of their minima.
                got = {label: [] for label in engines}
                for _ in range(a.rounds):
                    for label, (kind, p) in engines.items():
                        n = max(iters // a.rounds, 10)
                        if kind == "sqil":
                            got[label].append(sqil_time(p, batch, n))
                        elif kind == "tract":
                            got[label].append(tract_time(p, batch, n))
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
    out = {"cpu": cpu, "threads": 1, "onnxruntime": ort.__version__, "peaks": pk, "rows": rows}
    print(f"CPU: {cpu}; ratios of p50 latencies")
    if any(m.startswith("cnn") for m in models) and pk["int8_gmacs"]:
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
        for b in (1, 64):
            r = {x["engine"]: x["p50_us"] for x in rows if x["model"] == m and x["batch"] == b}
            fp = min(v for k, v in r.items() if k in ("ort f32", "tract f32"))
            me = r["sqil W4A8"]
            print(f"{m} batch {b}: sqil W4A8 vs fastest f32 peer {fp / me:.2f}x, vs ort int8 {r['ort int8 dynamic'] / me:.2f}x, "
                  f"vs ort int4 {r['ort int4 MatMulNBits'] / me:.2f}x")


if __name__ == "__main__":
    main()
