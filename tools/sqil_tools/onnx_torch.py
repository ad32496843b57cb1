"""An ONNX policy graph rebuilt as PyTorch ops (the GPU peer of `sqil-cuda-bench policy`): MLPs,
the CNN policies (Conv, BatchNormalization, pools, PRelu, ...) and the transformers (Shape
arithmetic, Split, Gather, attention, LayerNormalization, erf). Float constants live on the
device in the chosen dtype; integer tensors (shapes, axes, indices) stay on the CPU, so shape
arithmetic never synchronises and the whole call can be captured in a CUDA graph (index tensors
a device op needs are moved once, on the first call, and reused).

    run = build(onnx.load(path), torch.float16, "cuda")
    (actions,) = run(obs0, obs1)
"""
import numpy as np
import torch
import torch.nn.functional as F
from onnx import numpy_helper

# The element-wise functions of one input (sqil_ir::ops::unary), by ONNX name.
UNARY = {"Relu": torch.relu, "Tanh": torch.tanh, "Sigmoid": torch.sigmoid, "Erf": torch.erf, "Exp": torch.exp,
         "Sqrt": torch.sqrt, "Abs": torch.abs, "Neg": torch.neg, "Softplus": F.softplus, "Log": torch.log,
         "Reciprocal": torch.reciprocal, "HardSwish": F.hardswish}


def _attrs(node):
    out = {}
    for a in node.attribute:
        if a.type == a.INT:
            out[a.name] = a.i
        elif a.type == a.FLOAT:
            out[a.name] = a.f
        elif a.type == a.INTS:
            out[a.name] = list(a.ints)
        elif a.type == a.FLOATS:
            out[a.name] = list(a.floats)
        elif a.type == a.STRING:
            out[a.name] = a.s.decode()
        elif a.type == a.TENSOR:
            out[a.name] = numpy_helper.to_array(a.t)
    return out


def build(model, dtype, device, wq=None, aq=None):
    """`wq(node, w)` and `aq(node, x)`, when given, wrap the constant weight and the input of
    every Gemm, MatMul and Conv (fake quantizers for the QAT peer of `tools/bench_grad_gpu.py`)."""
    g = model.graph

    def place(arr):
        t = torch.tensor(np.array(arr))
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t

    consts = {i.name: place(numpy_helper.to_array(i)) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = place(_attrs(n)["value"])
    moved = {}

    def on(t, like, key):
        """`t` (an index tensor) on `like`'s device: moved once, then reused."""
        if t.device == like.device:
            return t
        if key not in moved:
            moved[key] = t.to(like.device)
        return moved[key]

    def ints(t):
        return [int(v) for v in (t.tolist() if isinstance(t, torch.Tensor) else t)]

    def run(*inputs):
        env = dict(consts)
        for vi, x in zip(g.input, inputs):
            env[vi.name] = x
        for n in g.node:
            t = n.op_type
            if t == "Constant":
                continue
            i = [env[a] if a else None for a in n.input]
            at = _attrs(n)
            x = i[0] if i else None
            if wq is not None and t in ("Gemm", "MatMul", "Conv") and n.input[1] in consts:
                x = aq(n.name, x)
                i[1] = wq(n.name, i[1], t, at)
            if t == "Gemm":
                a = x.T if at.get("transA", 0) else x
                b = i[1].T if at.get("transB", 0) else i[1]
                y = at.get("alpha", 1.0) * (a @ b)
                if len(i) > 2 and i[2] is not None:
                    y = y + at.get("beta", 1.0) * i[2]
            elif t == "MatMul":
                y = x @ i[1]
            elif t in ("Add", "Sub", "Mul", "Div"):
                y = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "Div": torch.div}[t](x, i[1])
                if t == "Div" and not x.is_floating_point():
                    y = torch.div(x, i[1], rounding_mode="trunc")
            elif t in UNARY:
                y = UNARY[t](x)
            elif t == "LeakyRelu":
                y = F.leaky_relu(x, at.get("alpha", 0.01))
            elif t == "Elu":
                y = F.elu(x, at.get("alpha", 1.0))
            elif t == "PRelu":
                y = torch.where(x < 0, x * i[1], x)
            elif t == "Gelu":
                y = F.gelu(x, approximate=at.get("approximate", "none"))
            elif t == "Clip":
                y = torch.clamp(x, i[1] if len(i) > 1 else None, i[2] if len(i) > 2 else None)
            elif t == "Identity":
                y = x
            elif t == "Flatten":
                ax = at.get("axis", 1)
                y = x.reshape(int(np.prod(x.shape[:ax])), -1)
            elif t == "Reshape":
                shape = [x.shape[d] if v == 0 and not at.get("allowzero", 0) else v for d, v in enumerate(ints(i[1]))]
                y = x.reshape(shape)
            elif t == "Shape":
                s = list(x.shape)[at.get("start", 0):at.get("end", len(x.shape))]
                y = torch.tensor(s, dtype=torch.int64)
            elif t == "Unsqueeze":
                axes = ints(i[1]) if len(i) > 1 else at["axes"]
                y = x
                for a in sorted(a % (x.dim() + len(axes)) for a in axes):
                    y = y.unsqueeze(a)
            elif t == "Squeeze":
                axes = ints(i[1]) if len(i) > 1 and i[1] is not None else at.get("axes")
                y = x.squeeze() if axes is None else x.squeeze(tuple(axes))
            elif t == "Concat":
                y = torch.cat(i, dim=at["axis"])
            elif t == "Transpose":
                y = x.permute(at.get("perm", list(range(x.dim()))[::-1]))
            elif t == "Split":
                ax = at.get("axis", 0)
                sizes = ints(i[1]) if len(i) > 1 and i[1] is not None else at.get("split")
                if sizes is None:
                    k = at.get("num_outputs", len(n.output))
                    sizes = [-(-x.shape[ax] // k)] * k
                    sizes[-1] = x.shape[ax] - sum(sizes[:-1])
                for name, part in zip(n.output, torch.split(x, sizes, dim=ax)):
                    env[name] = part
                continue
            elif t == "Gather":
                ax = at.get("axis", 0) % x.dim()
                idx = i[1]
                if idx.dim() == 0:
                    y = x.select(ax, int(idx) % x.shape[ax])
                else:
                    flat = on(idx.reshape(-1) % x.shape[ax], x, n.name)
                    y = torch.index_select(x, ax, flat).reshape(*x.shape[:ax], *idx.shape, *x.shape[ax + 1:])
            elif t == "Slice":
                starts, ends = ints(i[1]), ints(i[2])
                axes = ints(i[3]) if len(i) > 3 and i[3] is not None else list(range(len(starts)))
                steps = ints(i[4]) if len(i) > 4 and i[4] is not None else [1] * len(starts)
                sl = [slice(None)] * x.dim()
                for s, e, a, st in zip(starts, ends, axes, steps):
                    sl[a] = slice(s, e, st)
                y = x[tuple(sl)]
            elif t == "Softmax":
                y = torch.softmax(x, dim=at.get("axis", -1))
            elif t == "LayerNormalization":
                ax = at.get("axis", -1) % x.dim()
                y = F.layer_norm(x, x.shape[ax:], i[1], i[2] if len(i) > 2 else None, at.get("epsilon", 1e-5))
            elif t == "BatchNormalization":
                y = F.batch_norm(x, i[3], i[4], i[1], i[2], training=False, eps=at.get("epsilon", 1e-5))
            elif t == "Conv":
                k = len(i[1].shape) - 2
                pads = at.get("pads", [0] * 2 * k)
                if pads[:k] != pads[k:]:
                    x = F.pad(x, [p for d in reversed(range(k)) for p in (pads[d], pads[d + k])])
                    pads = [0] * 2 * k
                conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[k]
                y = conv(x, i[1], i[2] if len(i) > 2 else None, at.get("strides", 1), pads[:k],
                         at.get("dilations", 1), at.get("group", 1))
            elif t in ("MaxPool", "AveragePool"):
                ks = at["kernel_shape"]
                pads = at.get("pads", [0] * 2 * len(ks))
                st = at.get("strides", [1] * len(ks))
                if t == "MaxPool":
                    y = F.max_pool2d(x, ks, st, pads[:len(ks)], at.get("dilations", 1), bool(at.get("ceil_mode", 0)))
                else:
                    y = F.avg_pool2d(x, ks, st, pads[:len(ks)], bool(at.get("ceil_mode", 0)),
                                     bool(at.get("count_include_pad", 0)))
            elif t == "HardSigmoid":
                y = torch.clamp(at.get("alpha", 0.2) * x + at.get("beta", 0.5), 0.0, 1.0)
            elif t in ("ReduceMean", "ReduceSum", "ReduceMax"):
                axes = ints(i[1]) if len(i) > 1 and i[1] is not None else at.get("axes")
                keep = bool(at.get("keepdims", 1))
                if not axes:
                    axes = None if not at.get("noop_with_empty_axes", 0) else []
                if axes == []:
                    y = x
                elif t == "ReduceMax":
                    y = torch.amax(x, dim=tuple(axes) if axes else tuple(range(x.dim())), keepdim=keep)
                else:
                    f = torch.mean if t == "ReduceMean" else torch.sum
                    y = f(x, dim=tuple(axes) if axes else tuple(range(x.dim())), keepdim=keep)
            elif t == "ConvTranspose":
                k = len(i[1].shape) - 2
                pads = at.get("pads", [0] * 2 * k)
                if pads[:k] != pads[k:] or at.get("output_shape") or at.get("auto_pad", "NOTSET") != "NOTSET":
                    raise SystemExit(f"onnx_torch: ConvTranspose {n.name}: asymmetric pads / output_shape")
                conv = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[k]
                y = conv(x, i[1], i[2] if len(i) > 2 else None, at.get("strides", 1), pads[:k],
                         at.get("output_padding", 0), at.get("group", 1), at.get("dilations", 1))
            elif t == "GlobalAveragePool":
                y = x.mean(dim=tuple(range(2, x.dim())), keepdim=True)
            else:
                raise SystemExit(f"onnx_torch: op {t} (node {n.name}) not supported")
            env[n.output[0]] = y
        return [env[o.name] for o in g.output]

    return run
