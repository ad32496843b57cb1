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

Ratios are of medians (p50): this 2-core VM's steal time makes means jump between runs.
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
    ap.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "bench-cpu.json",
                    help="where the JSON rows go (another machine's run: not the committed file)")
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
        models = {"bc_hopper": (ROOT / "testdata/policies/bc_hopper.onnx", [ROOT / "testdata/demos/hopper.npz"]),
                  "mlp4x1024": (tmp / "mlp4x1024.onnx", [tmp / "calib.npy"]),
                  "cnn (pickplace pixels)": (pol / "bc_pickplace_pixels.onnx",
                                             [pol / "bc_pickplace_pixels.input0.npy", pol / "bc_pickplace_pixels.input1.npy"])}
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
                if name.startswith("cnn"):
                    iters = max(iters // 10, 20)
                for label, (kind, p) in engines.items():
                    if kind == "sqil":
                        mean, p50, mn = sqil_time(p, batch, iters)
                    elif kind == "tract":
                        mean, p50, mn = tract_time(p, batch, iters)
                    else:
                        mean, p50, mn = ort_time(p, shapes, batch, iters)
                    rows.append({"model": name, "engine": label, "batch": batch, "mean_us": mean, "p50_us": p50,
                                 "min_us": mn, "samples_per_s": batch / p50 * 1e6})
                    print(f"{name:22} batch {batch:3}  {label:22} mean {mean:10.1f} us  p50 {p50:10.1f} us  min {mn:10.1f} us  "
                          f"{batch / p50 * 1e6:10.0f} samples/s", flush=True)
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), platform.processor())
    out = {"cpu": cpu, "threads": 1, "onnxruntime": ort.__version__, "rows": rows}
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"CPU: {cpu}; ratios of p50 latencies")
    for m in models:
        for b in (1, 64):
            r = {x["engine"]: x["p50_us"] for x in rows if x["model"] == m and x["batch"] == b}
            fp = min(v for k, v in r.items() if k in ("ort f32", "tract f32"))
            me = r["sqil W4A8"]
            print(f"{m} batch {b}: sqil W4A8 vs fastest f32 peer {fp / me:.2f}x, vs ort int8 {r['ort int8 dynamic'] / me:.2f}x, "
                  f"vs ort int4 {r['ort int4 MatMulNBits'] / me:.2f}x")


if __name__ == "__main__":
    main()
