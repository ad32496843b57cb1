"""Loads a policy for closed-loop use: the task's expert, an ONNX file run by onnxruntime (graph
optimisations off, one thread), or an ONNX / IR file run by sqil's Python binding (`sqil:PATH`)."""

import numpy as np


def load(spec: str, task):
    if spec == "expert":
        return task.make_expert()
    if spec.startswith("sqil:"):
        try:
            import sqil  # the binding built from crates/python
        except ImportError as e:
            raise SystemExit(f"policy `{spec}`: the sqil Python binding is not importable ({e})")
        p = sqil.Policy(spec[5:])
        return lambda obs, env: p.act(obs[None])[0]
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(spec, so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return lambda obs, env: s.run(None, {name: obs[None].astype(np.float32)})[0][0]
