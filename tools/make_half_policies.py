"""Writes the half-precision exports of the bundled bc_hopper policy that the float16 tests use,
as the two common fp16 workflows produce them:

- testdata/policies/bc_hopper_f16.onnx: everything float16 (weights, normalisation constants,
  inputs, outputs), as `model.half()` then `torch.onnx.export` writes it;
- testdata/policies/bc_hopper_f16io32.onnx: float16 weights behind float32 inputs and outputs
  (a Cast to float16 after each input, to float32 before each output), as onnxconverter-common's
  `convert_float_to_float16(keep_io_types=True)` writes it;
- testdata/policies/bc_hopper_f16r.onnx: the reference the tests compare against, the float32
  model with every constant rounded to float16 (what sqil computes a half model as);

with onnxruntime's outputs of the float16 model on bc_hopper's 8 test states rounded to float16
(bc_hopper_f16.input0.npy, bc_hopper_f16.ort0.npy).

    tools/.venv-dev/bin/python tools/make_half_policies.py
"""

import copy
import pathlib

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUT = ROOT / "testdata" / "policies"


def with_constants(m, dtype):
    """The model with every float initializer converted to `dtype` (numpy)."""
    m = copy.deepcopy(m)
    for i, t in enumerate(m.graph.initializer):
        a = numpy_helper.to_array(t)
        if a.dtype.kind == "f":
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(a.astype(dtype), t.name))
    del m.graph.value_info[:]
    return m


def main():
    src = onnx.load(OUT / "bc_hopper.onnx")
    # The reference: float32, constants rounded through float16.
    ref = with_constants(with_constants(src, np.float16), np.float32)
    # Everything float16.
    half = with_constants(src, np.float16)
    for v in list(half.graph.input) + list(half.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    # Float16 inside, float32 at the boundary.
    io32 = with_constants(src, np.float16)
    (inp,), (outp,) = io32.graph.input, io32.graph.output
    for n in io32.graph.node:
        n.input[:] = [f"{x}_fp16" if x == inp.name else x for x in n.input]
        n.output[:] = [f"{x}_fp16" if x == outp.name else x for x in n.output]
    io32.graph.node.insert(
        0, helper.make_node("Cast", [inp.name], [f"{inp.name}_fp16"], name="graph_input_cast0", to=TensorProto.FLOAT16)
    )
    io32.graph.node.append(
        helper.make_node("Cast", [f"{outp.name}_fp16"], [outp.name], name="graph_output_cast0", to=TensorProto.FLOAT)
    )
    for name, m in [("bc_hopper_f16r", ref), ("bc_hopper_f16", half), ("bc_hopper_f16io32", io32)]:
        onnx.checker.check_model(m, full_check=True)
        onnx.save(m, OUT / f"{name}.onnx")
    x = np.load(OUT / "bc_hopper.input0.npy").astype(np.float16)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(str(OUT / "bc_hopper_f16.onnx"), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {inp.name: x})[0]
    assert y.dtype == np.float16
    np.save(OUT / "bc_hopper_f16.input0.npy", x)
    np.save(OUT / "bc_hopper_f16.ort0.npy", y)
    print("wrote", [p.name for p in sorted(OUT.glob("bc_hopper_f16*"))])


if __name__ == "__main__":
    main()
