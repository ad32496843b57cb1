"""The benchmark zoo: policies and encoders of the kinds robot-learning teams deploy, written as ONNX
graphs from their public definitions with random weights (speed does not need trained ones), in
the form their PyTorch exports take (BatchNormalization after each Conv, SiLU as Sigmoid * x, Mish
as x * tanh(softplus(x)), GroupNorm as a LayerNormalization over groups, attention as MatMul /
Softmax). Every builder writes one model to `path` and returns its input shapes, batch first
(symbolic "N").

- `mlp_4x1024`: obs [N, 64] -> 4 x (Gemm 1024 + ReLU) -> Gemm 16.
- The MLP policies of common sizes (`dense_mlp`, Gemm + activation per layer, as PyTorch exports
  `nn.Linear`): `td3_mlp` 17 -> 400 -> 300 -> 6 (ReLU, ReLU, Tanh; TD3 / DDPG's actor),
  `sac_mlp` 17 -> 256 -> 256 -> 12 (SAC's mean and log-std), `wide_mlp` 24 -> 512 -> 512 -> 8,
  `short_obs_mlp` 7 -> 300 (SiLU as x * Sigmoid(x)) -> 129 (Elu 0.7) -> 1 (Tanh), and
  `humanoid_td3_mlp` 376 -> 400 -> 300 -> 17: the shapes on which the GPU programs fell off their
  cluster of 16 blocks before the twelfth session (docs/cuda.md).
- `prelu_cnn`: an NHWC camera CNN with PRelu and 3x3/2 MaxPool (the kind the fast path missed).
- `resnet18`: torchvision's ResNet-18 at 96x96 (Diffusion Policy's and ACT's encoder).
- `mobilenet_v2`: MobileNetV2 (width 0.5) at 84x84: inverted residuals, depthwise 3x3, ReLU6.
- `mobilenet_v3`: MobileNetV3-Small's blocks at 84x84: HardSwish, HardSigmoid-gated
  squeeze-and-excitation, depthwise 3x3 / 5x5.
- `efficientnet_b0`: EfficientNet-B0's MBConv stages (width 0.5, depth 0.5) at 84x84: depthwise
  3x3 / 5x5, SiLU, squeeze-and-excitation.
- `act_decoder`: ACT's transformer decoder (DETR style, post-norm): 50 learned action queries,
  self-attention, cross-attention over 49 image tokens, ReLU FFN, d=256, 8 heads, 2 layers, a
  14-dim action per query.
- `diffusion_unet1d`: one denoising step of Diffusion Policy's 1-D conv U-Net: action chunk
  [N, 7, 16] and a 64-dim condition (observation + step embedding), conditional residual blocks
  (Conv1d 5 + GroupNorm 8 + Mish, FiLM from the condition), down/up sampling by strided Conv1d /
  ConvTranspose1d, skip connections.
"""

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class G:
    """A small ONNX graph builder: fresh names, initializers, nodes."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.n = [], [], 0

    def name(self, p):
        self.n += 1
        return f"{p}{self.n}"

    def const(self, a, p="k"):
        nm = self.name(p)
        self.inits.append(numpy_helper.from_array(np.asarray(a), nm))
        return nm

    def op(self, ty, ins, outs=1, **attrs):
        names = [self.name(ty.lower()) for _ in range(outs)]
        self.nodes.append(helper.make_node(ty, ins, names, **attrs))
        return names[0] if outs == 1 else names

    def weight(self, shape, fan_in):
        return self.const((self.rng.standard_normal(shape) * np.sqrt(2 / fan_in)).astype(np.float32), "w")

    def bias(self, n):
        return self.const((0.01 * self.rng.standard_normal(n)).astype(np.float32), "b")

    def conv(self, x, cin, cout, k, stride=1, group=1, bias=False, bn=True, dims=2):
        ks = [k] * dims
        ins = [x, self.weight([cout, cin // group, *ks], cin // group * k**dims)] + ([self.bias(cout)] if bias else [])
        y = self.op("Conv", ins, kernel_shape=ks, strides=[stride] * dims, pads=[k // 2] * (2 * dims), group=group)
        return self.bn(y, cout) if bn else y

    def bn(self, x, c):
        vals = [1 + 0.1 * self.rng.standard_normal(c), 0.1 * self.rng.standard_normal(c),
                0.1 * self.rng.standard_normal(c), 1 + 0.1 * self.rng.random(c)]
        return self.op("BatchNormalization", [x, *(self.const(v.astype(np.float32), "bn") for v in vals)])

    def linear(self, x, din, dout):
        w = self.const((self.rng.standard_normal((din, dout)) / np.sqrt(din)).astype(np.float32), "w")
        return self.op("Add", [self.op("MatMul", [x, w]), self.bias(dout)])

    def relu6(self, x):
        return self.op("Clip", [x, self.const(np.float32(0), "lo"), self.const(np.float32(6), "hi")])

    def silu(self, x):
        return self.op("Mul", [x, self.op("Sigmoid", [x])])

    def mish(self, x):
        return self.op("Mul", [x, self.op("Tanh", [self.op("Softplus", [x])])])

    def shape(self, dims):
        return self.const(np.array(dims, np.int64), "shape")

    def head(self, x, c, outputs, path, name, size):
        """Global average pool, a linear action head, and the model saved with an image input."""
        feat = self.op("Flatten", [self.op("GlobalAveragePool", [x])])
        self.nodes.append(helper.make_node("Gemm", [feat, self.weight([outputs, c], c), self.bias(outputs)], ["action"],
                                           transB=1))
        return self.save(path, name, [("image", ["N", 3, size, size])], [("action", ["N", outputs])])

    def save(self, path, name, inputs, outputs, opset=17):
        g = helper.make_graph(self.nodes, name, [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        onnx.checker.check_model(m)
        onnx.save(m, path)
        return [s for _, s in inputs]


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
    return [["N", 64]]


def dense_mlp(path, dims, acts, name="mlp"):
    """obs [N, dims[0]] -> Gemm dims[i + 1] + acts[i] per layer (acts: "relu", "tanh", "silu" as x *
    Sigmoid(x), ("elu", alpha), or None)."""
    rng = np.random.default_rng(len(dims) * 1000 + dims[0])
    nodes, inits, prev = [], [], "obs"
    for i, (k, n) in enumerate(zip(dims[:-1], dims[1:])):
        w = (rng.standard_normal((n, k)) / np.sqrt(k)).astype(np.float32)
        b = (rng.standard_normal(n) * 0.1).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"w{i}"), numpy_helper.from_array(b, f"b{i}")]
        nodes.append(helper.make_node("Gemm", [prev, f"w{i}", f"b{i}"], [f"h{i}"], transB=1))
        prev = f"h{i}"
        act = acts[i]
        if act == "silu":
            nodes.append(helper.make_node("Sigmoid", [prev], [f"s{i}"]))
            nodes.append(helper.make_node("Mul", [prev, f"s{i}"], [f"a{i}"]))
        elif isinstance(act, tuple) and act[0] == "elu":
            nodes.append(helper.make_node("Elu", [prev], [f"a{i}"], alpha=act[1]))
        elif act is not None:
            nodes.append(helper.make_node({"relu": "Relu", "tanh": "Tanh"}[act], [prev], [f"a{i}"]))
        if act is not None:
            prev = f"a{i}"
    g = helper.make_graph(nodes, name, [helper.make_tensor_value_info("obs", TensorProto.FLOAT, ["N", dims[0]])],
                          [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["N", dims[-1]])], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path)
    return [["N", dims[0]]]


def td3_mlp(path):
    return dense_mlp(path, [17, 400, 300, 6], ["relu", "relu", "tanh"], "td3_mlp")


def sac_mlp(path):
    return dense_mlp(path, [17, 256, 256, 12], ["relu", "relu", None], "sac_mlp")


def wide_mlp(path):
    return dense_mlp(path, [24, 512, 512, 8], ["relu", "relu", "tanh"], "wide_mlp")


def short_obs_mlp(path):
    return dense_mlp(path, [7, 300, 129, 1], ["silu", ("elu", 0.7), "tanh"], "short_obs_mlp")


def humanoid_td3_mlp(path):
    return dense_mlp(path, [376, 400, 300, 17], ["relu", "relu", "tanh"], "humanoid_td3_mlp")


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
    return [["N", 96, 96, 3]]


def resnet18(path, size=96, outputs=10):
    """ResNet-18 (torchvision's layout: 7x7/2 stem, BatchNorm, 3x3/2 MaxPool, four stages of two
    BasicBlocks with 1x1/2 projection shortcuts, global average pool) on a [N, 3, 96, 96] image,
    with a linear action head."""
    g = G()
    x = g.op("Relu", [g.conv("image", 3, 64, 7, 2)])
    x, cin = g.op("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]), 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        for b in range(2):
            s = stride if b == 0 else 1
            h = g.conv(g.op("Relu", [g.conv(x, cin, cout, 3, s)]), cout, cout, 3)
            short = g.conv(x, cin, cout, 1, s) if (s != 1 or cin != cout) else x
            x, cin = g.op("Relu", [g.op("Add", [h, short])]), cout
    feat = g.op("Flatten", [g.op("GlobalAveragePool", [x])])
    w = g.const((g.rng.standard_normal((outputs, 512)) / np.sqrt(512)).astype(np.float32), "fc_w")
    g.nodes.append(helper.make_node("Gemm", [feat, w, g.const(np.zeros(outputs, np.float32), "fc_b")], ["action"], transB=1))
    return g.save(path, "resnet18", [("image", ["N", 3, size, size])], [("action", ["N", outputs])])


def mobilenet_v2(path, size=84, outputs=7):
    """MobileNetV2 at width 0.5 (torchvision's block table, channels halved and rounded to 8)."""
    g = G(1)
    x, cin = g.relu6(g.conv("image", 3, 16, 3, 2)), 16
    for t, c, n, s in [(1, 8, 1, 1), (6, 16, 2, 2), (6, 16, 3, 2), (6, 32, 4, 2), (6, 48, 3, 1), (6, 80, 3, 2), (6, 160, 1, 1)]:
        for i in range(n):
            hid = cin * t
            h = g.relu6(g.conv(x, cin, hid, 1)) if t != 1 else x
            h = g.relu6(g.conv(h, hid, hid, 3, s if i == 0 else 1, group=hid))
            h = g.conv(h, hid, c, 1)
            x = g.op("Add", [x, h]) if (i > 0 or s == 1) and cin == c else h
            cin = c
    return g.head(g.relu6(g.conv(x, cin, 640, 1)), 640, outputs, path, "mobilenet_v2", size)


def efficientnet_b0(path, size=84, outputs=7):
    """EfficientNet-B0's MBConv stages at width 0.5 and about half the depth: expansion 1x1 + SiLU,
    depthwise k x k + SiLU, squeeze-and-excitation (global pool, 1x1 reduce + SiLU, 1x1 expand +
    Sigmoid, scale), 1x1 projection, residual where shapes allow."""
    g = G(2)
    x, cin = g.silu(g.conv("image", 3, 16, 3, 2)), 16
    for e, k, s, c, n in [(1, 3, 1, 8, 1), (6, 3, 2, 16, 1), (6, 5, 2, 24, 1), (6, 3, 2, 40, 2), (6, 5, 1, 56, 2),
                          (6, 5, 2, 96, 2), (6, 3, 1, 160, 1)]:
        for i in range(n):
            hid = cin * e
            h = g.silu(g.conv(x, cin, hid, 1)) if e != 1 else x
            h = g.silu(g.conv(h, hid, hid, k, s if i == 0 else 1, group=hid))
            sq = max(1, cin // 4)
            se = g.silu(g.conv(g.op("GlobalAveragePool", [h]), hid, sq, 1, bias=True, bn=False))
            h = g.op("Mul", [h, g.op("Sigmoid", [g.conv(se, sq, hid, 1, bias=True, bn=False)])])
            h = g.conv(h, hid, c, 1)
            x = g.op("Add", [x, h]) if (i > 0 or s == 1) and cin == c else h
            cin = c
    return g.head(g.silu(g.conv(x, cin, 640, 1)), 640, outputs, path, "efficientnet_b0", size)


def mobilenet_v3(path, size=84, outputs=7):
    """MobileNetV3-Small's block table (channels as torchvision's at width 1.0, 84x84): depthwise
    3x3 / 5x5, ReLU or HardSwish, squeeze-and-excitation gated by HardSigmoid (as PyTorch exports
    `hardsigmoid`), BatchNorm after each Conv."""
    g = G(5)

    def act(x, hs):
        return g.op("HardSwish", [x]) if hs else g.op("Relu", [x])

    x, cin = act(g.conv("image", 3, 16, 3, 2), True), 16
    for k, exp, c, se, hs, s in [(3, 16, 16, True, False, 2), (3, 72, 24, False, False, 2), (3, 88, 24, False, False, 1),
                                 (5, 96, 40, True, True, 2), (5, 240, 40, True, True, 1), (5, 120, 48, True, True, 1),
                                 (5, 288, 96, True, True, 2), (5, 576, 96, True, True, 1)]:
        h = act(g.conv(x, cin, exp, 1), hs) if exp != cin else x
        h = act(g.conv(h, exp, exp, k, s, group=exp), hs)
        if se:
            sq = max(8, exp // 4)
            z = g.op("Relu", [g.conv(g.op("GlobalAveragePool", [h]), exp, sq, 1, bias=True, bn=False)])
            gate = g.op("HardSigmoid", [g.conv(z, sq, exp, 1, bias=True, bn=False)], alpha=1.0 / 6.0, beta=0.5)
            h = g.op("Mul", [h, gate])
        h = g.conv(h, exp, c, 1)
        x = g.op("Add", [x, h]) if s == 1 and cin == c else h
        cin = c
    return g.head(act(g.conv(x, cin, 576, 1), True), 576, outputs, path, "mobilenet_v3", size)


def _attention(g, q_in, kv_in, d, heads, tq, tk):
    """Multi-head attention of [N, tq, d] queries over [N, tk, d] keys/values, output projected."""
    dk = d // heads

    def split(x, t):  # [N, t, d] -> [N, heads, t, dk]
        return g.op("Transpose", [g.op("Reshape", [x, g.shape([0, t, heads, dk])])], perm=[0, 2, 1, 3])

    q, k, v = split(g.linear(q_in, d, d), tq), split(g.linear(kv_in, d, d), tk), split(g.linear(kv_in, d, d), tk)
    s = g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])]), g.const(np.float32(dk**-0.5), "scale")])
    o = g.op("MatMul", [g.op("Softmax", [s], axis=-1), v])
    o = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), g.shape([0, tq, d])])
    return g.linear(o, d, d)


def _layer_norm(g, x, d):
    return g.op("LayerNormalization", [x, g.const(np.ones(d, np.float32), "ln_s"), g.const(np.zeros(d, np.float32), "ln_b")],
                axis=-1, epsilon=1e-5)


def act_decoder(path, d=256, heads=8, ff=1024, layers=2, queries=50, tokens=49, action=14):
    """ACT's decoder: learned queries (broadcast over the batch by adding to a zero slice of the
    memory), post-norm self-attention, cross-attention and ReLU FFN, then the action head."""
    g = G(3)
    q0 = g.const((0.02 * g.rng.standard_normal((1, queries, d))).astype(np.float32), "queries")
    # [N, 1, d] zeros from the memory (keeps the batch symbolic), broadcast against the queries.
    zero = g.op("Mul", [g.op("ReduceMean", ["memory"], axes=[1], keepdims=1),
                        g.const(np.float32(0), "z")])
    x = g.op("Add", [zero, q0])
    for _ in range(layers):
        x = _layer_norm(g, g.op("Add", [x, _attention(g, x, x, d, heads, queries, queries)]), d)
        x = _layer_norm(g, g.op("Add", [x, _attention(g, x, "memory", d, heads, queries, tokens)]), d)
        x = _layer_norm(g, g.op("Add", [x, g.linear(g.op("Relu", [g.linear(x, d, ff)]), ff, d)]), d)
    out = g.linear(x, d, action)
    g.nodes.append(helper.make_node("Identity", [out], ["actions"]))
    return g.save(path, "act_decoder", [("memory", ["N", tokens, d])], [("actions", ["N", queries, action])])


def diffusion_unet1d(path, adim=7, horizon=16, cond=64, dims=(64, 128, 256), groups=8):
    """One denoising step of Diffusion Policy's ConditionalUnet1D (down_dims scaled to 64-128-256)."""
    g = G(4)

    def group_norm(x, c, length):
        h = g.op("Reshape", [x, g.shape([0, groups, (c // groups) * length])])
        h = _layer_norm(g, h, (c // groups) * length)
        h = g.op("Reshape", [h, g.shape([0, c, length])])
        gam = g.const((1 + 0.1 * g.rng.standard_normal((c, 1))).astype(np.float32), "gn_s")
        return g.op("Add", [g.op("Mul", [h, gam]), g.const((0.1 * g.rng.standard_normal((c, 1))).astype(np.float32), "gn_b")])

    def block(x, cin, cout, length):  # Conv1dBlock: Conv1d 5 + GroupNorm + Mish
        return g.mish(group_norm(g.conv(x, cin, cout, 5, bias=True, bn=False, dims=1), cout, length))

    def res_block(x, cin, cout, length):  # ConditionalResidualBlock1D with FiLM scale and bias
        h = block(x, cin, cout, length)
        film = g.op("Reshape", [g.linear(g.mish("cond"), cond, 2 * cout), g.shape([0, 2 * cout, 1])])
        scale, shift = g.op("Split", [film, g.const(np.array([cout, cout], np.int64), "sp")], outs=2, axis=1)
        h = block(g.op("Add", [g.op("Mul", [h, scale]), shift]), cout, cout, length)
        short = g.conv(x, cin, cout, 1, bias=True, bn=False, dims=1) if cin != cout else x
        return g.op("Add", [h, short])

    x, cin, length, skips = "sample", adim, horizon, []
    for i, c in enumerate(dims):
        x = res_block(res_block(x, cin, c, length), c, c, length)
        skips.append((x, c, length))
        if i < len(dims) - 1:
            x = g.conv(x, c, c, 3, stride=2, bias=True, bn=False, dims=1)
            length //= 2
        cin = c
    x = res_block(res_block(x, cin, cin, length), cin, cin, length)
    for i, c in reversed(list(enumerate(dims[:-1]))):
        sx, sc, sl = skips.pop()
        x = res_block(res_block(g.op("Concat", [x, sx], axis=1), cin + sc, c, length), c, c, length)
        w = g.weight([c, c, 4], c * 4)
        x = g.op("ConvTranspose", [x, w, g.bias(c)], kernel_shape=[4], strides=[2], pads=[1, 1])
        length *= 2
        cin = c
    x = block(x, cin, cin, length)
    out = g.conv(x, cin, adim, 1, bias=True, bn=False, dims=1)
    g.nodes.append(helper.make_node("Identity", [out], ["noise"]))
    return g.save(path, "diffusion_unet1d", [("sample", ["N", adim, horizon]), ("cond", ["N", cond])],
                  [("noise", ["N", adim, horizon])])


ZOO = {"mobilenet_v2": mobilenet_v2, "mobilenet_v3": mobilenet_v3, "efficientnet_b0": efficientnet_b0, "act_decoder": act_decoder,
       "diffusion_unet1d": diffusion_unet1d, "td3_mlp": td3_mlp, "sac_mlp": sac_mlp, "wide_mlp": wide_mlp,
       "short_obs_mlp": short_obs_mlp, "humanoid_td3_mlp": humanoid_td3_mlp}
