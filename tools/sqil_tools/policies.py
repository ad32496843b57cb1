"""Loads a policy for closed-loop use: the task's expert, an ONNX file run by onnxruntime (graph
optimisations off, one thread), or an ONNX / IR file run by sqil's Python binding (`sqil:PATH`)."""

import numpy as np


class HistoryPolicy:
    """Closed-loop driver of a history -> action-chunk policy ([B, H, obs] -> [B, C, act]):
    keeps the episode's last H observations (the first one repeated until there are H) and
    executes the first action of each predicted chunk (receding horizon)."""

    def __init__(self, run, hist):
        self.run, self.hist, self.buf = run, hist, []

    def reset(self):
        self.buf = []

    def __call__(self, obs, env):
        if not self.buf:
            self.buf = [obs] * self.hist
        self.buf = self.buf[1:] + [obs]
        return self.run(np.stack(self.buf)[None].astype(np.float32))[0][0]


def _pixels(run):
    """Driver of an (image, proprio) -> action policy on the pixel task's dict observations."""
    return lambda obs, env: run(obs["image"][None].astype(np.float32) / 255.0, obs["proprio"][None])[0]


class RuntimePolicy:
    """A compiled CPU artifact (`policy.bin`) run by libsqil_runtime through its C ABI (ctypes).
    The library is target/release/libsqil_runtime.so unless SQIL_RUNTIME_LIB names another."""

    def __init__(self, path):
        import ctypes
        import os
        import pathlib

        lib = os.environ.get("SQIL_RUNTIME_LIB") or str(pathlib.Path(__file__).resolve().parents[2] / "target/release/libsqil_runtime.so")
        self.lib = ctypes.CDLL(lib)
        self.lib.sqil_policy_load.restype = ctypes.c_void_p
        self.lib.sqil_policy_obs_size.argtypes = [ctypes.c_void_p]
        self.lib.sqil_policy_obs_size.restype = ctypes.c_size_t
        self.lib.sqil_policy_act.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t]
        self.lib.sqil_policy_act.restype = ctypes.c_int
        self.lib.sqil_last_error.restype = ctypes.c_char_p
        self.p = self.lib.sqil_policy_load(str(path).encode())
        if not self.p:
            raise SystemExit(f"{path}: {self.lib.sqil_last_error().decode()}")
        self.d = self.lib.sqil_policy_obs_size(self.p)
        self.out = np.zeros(4096, dtype=np.float32)

    def __call__(self, obs, env):
        x = np.ascontiguousarray(obs, dtype=np.float32).reshape(-1)
        n = self.lib.sqil_policy_act(self.p, x.ctypes.data, 1, self.out.ctypes.data, self.out.size)
        if n < 0:
            raise RuntimeError(self.lib.sqil_last_error().decode())
        return self.out[:n].copy()


def load(spec: str, task):
    if spec == "expert":
        return task.make_expert()
    if spec.startswith("sqilrt:"):
        return RuntimePolicy(spec[7:])
    if spec.startswith("sqil:"):
        try:
            import sqil  # the binding built from crates/python
        except ImportError as e:
            raise SystemExit(f"policy `{spec}`: the sqil Python binding is not importable ({e})")
        p = sqil.Policy(spec[5:])
        if p.input_names == ["image", "proprio"]:
            return _pixels(lambda i, q: p.run(i, q)[0])
        rank = len(p.input_shape(0))
        if rank == 3:
            return HistoryPolicy(lambda x: p.act(x), p.input_shape(0)[1])
        return lambda obs, env: p.act(obs[None])[0]
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = 1
    s = ort.InferenceSession(spec, so, providers=["CPUExecutionProvider"])
    inp = s.get_inputs()[0]
    if [i.name for i in s.get_inputs()] == ["image", "proprio"]:
        return _pixels(lambda i, q: s.run(None, {"image": i, "proprio": q})[0])
    if len(inp.shape) == 3:
        return HistoryPolicy(lambda x: s.run(None, {inp.name: x})[0], inp.shape[1])
    return lambda obs, env: s.run(None, {inp.name: obs[None].astype(np.float32)})[0][0]
