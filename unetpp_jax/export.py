"""Exporting a model for serving outside this package: ONNX (fp32, fp16, int8 QDQ) and
StableHLO (``jax.export``). See ``docs/export.md``.

    from unetpp_jax import export
    from unetpp_jax.pretrained import load_checkpoint

    ck = load_checkpoint()                                   # the bundled model
    proto = export.onnx_model(ck.model, ck.variables, input_spec=ck.input_spec)
    export.save_onnx(proto, "unetpp.onnx")
    probs = export.onnx_predict_fn(export.onnx_session("unetpp.onnx"))(images)  # list of heads

ONNX graphs are built node by node with ``onnx.helper`` from the BatchNorm-folded variables,
by one emitter per architecture (:data:`ONNX_ARCHITECTURES`: ``UNetPlusPlus`` walks its grid,
``model.grid_nodes`` / ``model.skip_columns``; ``SMPUnetPlusPlus`` smp's decoder grid) over one
emitter per encoder (:data:`ONNX_ENCODERS`: vgg, resnet18..152), each a small function per
block mirroring the Flax module. That is what lets the int8
graph carry *this project's* quantization -- the calibrated per-tensor scale of every conv input
(``numerics.Int8``'s sites) and per-output-channel int8 weights -- as QuantizeLinear /
DequantizeLinear pairs, so ONNX Runtime runs the project's int8 model rather than calibrating
its own. StableHLO is ``jax.export`` of the model itself, so it covers every architecture and
every precision (int8 there is the float emulation).

``onnx`` and ``onnxruntime`` (the ``deploy`` extra) are imported inside the functions that need
them: importing this module costs nothing.

Graph conventions (both formats): input ``image``, NHWC float32, normalised as the checkpoint's
``InputSpec`` says; outputs the probabilities of heads 1..L, NHWC float32, named
``head1``..``headL`` (a model without deep supervision: one output ``head``). ONNX graphs have a
dynamic batch, height and width (height and width must be multiples of ``2**depth``);
StableHLO has a dynamic batch and the height and width it was exported at.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from unetpp_jax.files import write_bytes_atomic, write_text_atomic
from unetpp_jax.inference import fold_batchnorm_variables, probabilities
from unetpp_jax.model import grid_nodes, skip_columns
from unetpp_jax.numerics import INT8_MAX, quantize_weights, site_name

FORMATS = ("checkpoint", "onnx", "stablehlo")
ONNX_PRECISIONS = ("fp32", "fp16", "int8")
STABLEHLO_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
INT8_LAYOUTS = ("qlinear", "qdq")  # docs/export.md: which convs ONNX Runtime runs in int8
ONNX_OPSET = 17
INPUT_NAME = "image"
METADATA_PREFIX = "unetpp."


class ExportError(ValueError):
    """A model or a request that cannot be exported (the message says why and what to do)."""


def output_names(model, prune_level: int | None = None) -> list[str]:
    """``head1``..``headL`` (deep supervision, L = prune level) or ``['head']``."""
    if not model.deep_supervision:
        return ["head"]
    level = model.depth if prune_level is None else prune_level
    return [f"head{k}" for k in range(1, level + 1)]


def _check_level(model, prune_level):
    level = model.depth if prune_level is None else int(prune_level)
    if not 1 <= level <= model.depth:
        raise ExportError(f"prune level must be in 1..{model.depth}, got {prune_level}")
    if level != model.depth and not (model.deep_supervision and model.skips == "nested"):
        raise ExportError("pruned export needs the deep-supervision heads of the nested grid; "
                          "this model has only X(0,D)'s head")
    return level


def _numpy_tree(tree):
    return jax.tree_util.tree_map(lambda a: np.asarray(a), jax.device_get(tree))


# --------------------------------------------------------------------------- ONNX graph


class _Graph:
    """An ONNX graph under construction: NCHW tensors, unique names, initializers.

    ``precision`` decides how a conv is written (:meth:`conv`); everything else (ReLU, max-pool,
    upsampling, concatenation) is the same float op at every precision, as in ``numerics``.
    """

    def __init__(self, precision: str, scales: Mapping | None):
        from onnx import TensorProto

        self.precision = precision
        self.scales = scales
        self.nodes: list = []
        self.initializers: list = []
        self.used: set[tuple[str, ...]] = set()  # parameter paths the graph read
        self.nonnegative: set[str] = set()  # tensors known >= 0 (ReLU outputs and what follows)
        self._n = 0
        self.float_type = TensorProto.FLOAT16 if precision == "fp16" else TensorProto.FLOAT
        self.np_float = np.float16 if precision == "fp16" else np.float32
        self.int8_layout = "qlinear"

    # -- plumbing
    def name(self, base: str) -> str:
        self._n += 1
        return f"{base}__{self._n}"

    def const(self, base: str, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name(base)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], base: str, **attrs) -> str:
        from onnx import helper

        out = self.name(base)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attrs))
        return out

    def param(self, params: Mapping, path: tuple[str, ...]) -> Mapping:
        p = params
        for k in path:
            if not isinstance(p, Mapping) or k not in p:
                raise ExportError(f"the variables have no parameters at {'/'.join(path)}")
            p = p[k]
        self.used.add(path)
        return p

    # -- float ops
    def relu(self, x: str) -> str:
        y = self.op("Relu", [x], "relu")
        self.nonnegative.add(y)
        return y

    def _keeps_sign(self, y: str, *inputs: str) -> str:
        """Mark ``y`` >= 0 when every input is (max-pool, resize, pooling, sums, products)."""
        if all(i in self.nonnegative for i in inputs):
            self.nonnegative.add(y)
        return y

    def max_pool(self, x: str, size: int = 2, stride: int = 2, pad: int = 0) -> str:
        """``MaxPool``: 2x2/2 (``layers.max_pool2x2``) or, with ``size=3, pad=1``, the ResNet
        stem's 3x3/2 (``layers.max_pool3x3_stride2``: ONNX never lets a padded position win,
        as PyTorch's -inf padding)."""
        y = self.op("MaxPool", [x], "maxpool", kernel_shape=[size, size],
                    strides=[stride, stride], pads=[pad] * 4)
        return self._keeps_sign(y, x)

    def upsample(self, x: str) -> str:
        """Bilinear x2, ``align_corners=True`` (``layers.upsample2x_align_corners``)."""
        scales = self.const("up_scales", np.array([1, 1, 2, 2], np.float32))
        y = self.op("Resize", [x, "", scales], "up", mode="linear",
                    coordinate_transformation_mode="align_corners")
        return self._keeps_sign(y, x)

    def upsample_nearest(self, x: str) -> str:
        """Nearest x2 (``layers.upsample2x_nearest``): output pixel o reads input o // 2."""
        scales = self.const("up_scales", np.array([1, 1, 2, 2], np.float32))
        y = self.op("Resize", [x, "", scales], "up_nearest", mode="nearest",
                    coordinate_transformation_mode="asymmetric", nearest_mode="floor")
        return self._keeps_sign(y, x)

    def add(self, a: str, b: str) -> str:
        return self._keeps_sign(self.op("Add", [a, b], "add"), a, b)

    def mul(self, a: str, b: str) -> str:
        return self._keeps_sign(self.op("Mul", [a, b], "mul"), a, b)

    def sigmoid(self, x: str) -> str:
        y = self.op("Sigmoid", [x], "sigmoid")
        self.nonnegative.add(y)
        return y

    def mean_hw(self, x: str) -> str:
        """The spatial mean, kept as a 1x1 map (``jnp.mean(x, (1, 2), keepdims=True)``)."""
        return self._keeps_sign(self.op("GlobalAveragePool", [x], "mean_hw"), x)

    def concat(self, parts: Sequence[str]) -> str:
        if len(parts) == 1:
            return parts[0]
        y = self.op("Concat", list(parts), "concat", axis=1)
        if all(p in self.nonnegative for p in parts):
            self.nonnegative.add(y)
        return y

    # -- convolutions
    def conv(self, params: Mapping, path: tuple[str, ...], parts: Sequence[str], *,
             relu: bool, padding: int | None = None, stride: int = 1,
             out_path: tuple[str, ...] | None = None) -> str:
        """``[ReLU](conv(concat(parts)))`` with the (folded) conv at ``path``, at the graph's
        precision. int8: the input is quantized at the site ``<conv>_in`` (one scale for the
        whole concatenation, as ``numerics.Int8``); see :meth:`_int8_conv`."""
        p = self.param(params, path)
        kernel = np.asarray(p["kernel"], np.float32)  # HWIO
        bias = np.asarray(p["bias"], np.float32)
        kh, kw = kernel.shape[:2]
        pad = [kh // 2, kw // 2] * 2 if padding is None else [padding] * 4
        attrs = dict(kernel_shape=[kh, kw], pads=pad, strides=[stride, stride])
        base = "/".join(path)
        if self.precision == "int8":
            return self._int8_conv(path, parts, kernel, bias, attrs, relu, out_path)
        w = self.const(base + "/W", kernel.transpose(3, 2, 0, 1).astype(self.np_float))
        b = self.const(base + "/B", bias.astype(self.np_float))
        y = self.op("Conv", [self.concat(parts), w, b], base, **attrs)
        return self.relu(y) if relu else y

    def _scale(self, path: tuple[str, ...]) -> float:
        """The calibrated scale of the site ``<conv>_in`` of the conv at ``path``."""
        node = self.scales
        site = (*path[:-1], site_name(path[-1], "in"))
        for k in site:
            if not isinstance(node, Mapping) or k not in node:
                raise ExportError(f"the calibration has no scale at {'/'.join(site)} (calibrate "
                                  "a model of this architecture: quant.calibrate)")
            node = node[k]
        return float(np.float32(node))

    def quantize(self, x: str, scale: float, base: str, dequantize: bool = True,
                 clip: bool = True) -> str:
        """QuantizeLinear [-> DequantizeLinear] at ``scale`` on the symmetric grid
        ``[-127, 127]`` (the real value 0 is the zero point).

        int8 with zero point 0; QuantizeLinear saturates at -128, so a Clip at +-127 * scale
        goes first unless ``x`` is known >= 0. In the ``qlinear`` layout a tensor known >= 0 is
        quantized to uint8 with zero point 0 behind a Clip at 127 * scale: the same values
        0..127, and int8 x uint8 products whose pairwise sums fit in int16 (see docs)."""
        s = self.const(base + "/s", np.float32(scale))
        nonneg = x in self.nonnegative
        unsigned = nonneg and self.int8_layout == "qlinear"
        zp = self.const(base + "/zp", np.uint8(0) if unsigned else np.int8(0))
        lim = np.float32(INT8_MAX * np.float32(scale))
        if clip and unsigned:
            x = self.op("Clip", [x, self.const(base + "/lo", np.float32(0)),
                                 self.const(base + "/hi", lim)], base + "/clip")
        elif clip and not nonneg:
            x = self.op("Clip", [x, self.const(base + "/lo", -lim), self.const(base + "/hi", lim)],
                        base + "/clip")
        q = self.op("QuantizeLinear", [x, s, zp], base + "/q")
        if not dequantize:
            return q
        y = self.op("DequantizeLinear", [q, s, zp], base + "/dq")
        if nonneg:
            self.nonnegative.add(y)
        return y

    def _int8_conv(self, path, parts, kernel, bias, attrs, relu, out_path=None) -> str:
        """``numerics.Int8.conv`` as QDQ: DQ(int8 input at the site's scale) conv DQ(int8
        weights per output channel, axis 0) + float32 bias, as the emulation.

        ``qlinear`` layout, for a conv followed by ReLU whose only consumer is the conv at
        ``out_path`` (a block's first conv): the bias as int32 at ``s * s_w`` and the output
        quantized at the consumer's scale (uint8, zero point 0: that is the ReLU), which the
        consumer's Clip re-clips to 127 -- the emulation's values, and a DQ -> Conv -> Q group
        that ONNX Runtime runs as QLinearConv."""
        base = "/".join(path)
        s = self._scale(path)
        wq, ws = (np.asarray(a) for a in quantize_weights(jnp.asarray(kernel)))
        wq = wq.transpose(3, 2, 0, 1).astype(np.int8)
        ws = ws.astype(np.float32)
        x = self.quantize(self.concat(parts), s, base + "/in")
        w_zp = self.const(base + "/Wzp", np.zeros(ws.shape, np.int8))
        w = self.op("DequantizeLinear", [self.const(base + "/Wq", wq),
                                         self.const(base + "/Ws", ws), w_zp],
                    base + "/Wdq", axis=0)
        fuse = (self.int8_layout == "qlinear" and out_path is not None and relu
                and x in self.nonnegative)
        if not fuse:
            b = self.const(base + "/B", bias.astype(np.float32))
            y = self.op("Conv", [x, w, b], base, **attrs)
            return self.relu(y) if relu else y
        bs = (np.float32(s) * ws).astype(np.float32)  # QLinearConv's bias scale
        bq = np.clip(np.round(bias.astype(np.float64) / bs), -2 ** 31, 2 ** 31 - 1)
        b = self.op("DequantizeLinear", [self.const(base + "/Bq", bq.astype(np.int32)),
                                         self.const(base + "/Bs", bs),
                                         self.const(base + "/Bzp", np.zeros(bs.shape, np.int32))],
                    base + "/Bdq", axis=0)
        y = self.op("Conv", [x, w, b], base, **attrs)
        s_out = self.const(base + "/out/s", np.float32(self._scale(out_path)))
        zp = self.const(base + "/out/zp", np.uint8(0))
        q = self.op("QuantizeLinear", [y, s_out, zp], base + "/out/q")
        y = self.op("DequantizeLinear", [q, s_out, zp], base + "/out/dq")
        self.nonnegative.add(y)
        return y


# Encoder emitters: name in encoders.ENCODERS -> function(graph, params, x, widths) returning
# the NCHW tensor names of the encoder's pyramid (features[i] at stride 2**i), mirroring the
# encoder's Flax code.


def _vgg_block(g: _Graph, params, name: str, parts: Sequence[str]) -> str:
    """``encoders.vgg.ConvBlock``: [conv3x3 -> (folded BN) -> ReLU] x 2."""
    h = g.conv(params, (name, "conv1"), parts, relu=True, out_path=(name, "conv2"))
    return g.conv(params, (name, "conv2"), [h], relu=True)


def _vgg_encoder(g: _Graph, params, x: str, widths: Sequence[int]) -> list[str]:
    """``encoders.vgg.vgg_encoder``: X(i,0) = block(maxpool(X(i-1,0)))."""
    features: list[str] = []
    for i in range(len(widths)):
        inp = x if i == 0 else g.max_pool(features[-1])
        features.append(_vgg_block(g, params, f"conv{i}_0", [inp]))
    return features


def _resnet_block(g: _Graph, params, path: tuple[str, ...], x: str, stride: int,
                  bottleneck: bool) -> str:
    """``encoders.resnet.Block``: ``ReLU(convs(x) + identity)``; BasicBlock (conv1 3x3/s ->
    ReLU -> conv2 3x3) or Bottleneck (conv1 1x1 -> ReLU -> conv2 3x3/s -> ReLU -> conv3 1x1),
    identity = ``downsample_conv`` (1x1/s) when the block has one. Each conv followed by ReLU
    feeds only the next conv, so int8 ``qlinear`` fuses it (``out_path``)."""
    convs = (("conv1", 1), ("conv2", stride), ("conv3", 1)) if bottleneck else (
        ("conv1", stride), ("conv2", 1))
    out = x
    for k, (name, s) in enumerate(convs):
        last = k == len(convs) - 1
        out = g.conv(params, (*path, name), [out], relu=not last, stride=s,
                     out_path=None if last else (*path, convs[k + 1][0]))
    identity = x
    if _subtree(params, (*path, "downsample_conv")) is not None:
        identity = g.conv(params, (*path, "downsample_conv"), [x], relu=False, stride=stride)
    return g.relu(g.add(out, identity))


def _resnet_encoder(g: _Graph, params, x: str, widths: Sequence[int], *, arch: str) -> list[str]:
    """``encoders.resnet.ResNetEncoder`` (params under ``encoder``): the input, then the stem
    (conv1 7x7/2 -> ReLU), 3x3/2 max-pool -> layer1, layer2.. (first block stride 2); the
    pyramid up to ``layer{depth-1}`` as smp returns it."""
    from unetpp_jax.encoders.resnet import RESNETS

    spec = RESNETS[arch]
    depth = len(widths) - 1
    h = g.conv(params, ("encoder", "conv1"), [x], relu=True, stride=2)
    features = [x, h]
    for k in range(1, depth):
        if k == 1:
            h = g.max_pool(h, size=3, stride=2, pad=1)
        for b in range(spec.layers[k - 1]):
            h = _resnet_block(g, params, ("encoder", f"layer{k}_{b}"), h,
                              2 if (k > 1 and b == 0) else 1, spec.block == "bottleneck")
        features.append(h)
    return features


ONNX_ENCODERS: dict[str, Callable] = {
    "vgg": _vgg_encoder,
    **{name: functools.partial(_resnet_encoder, arch=name)
       for name in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")},
}


# Architecture emitters: name in pretrained.ARCHITECTURES -> function(graph, model, params, x,
# level) returning the NCHW logits of each head in order, mirroring the model's __call__; and
# where each architecture's first conv (the one reading the image) sits.


def _unetpp_graph(g: _Graph, model, params, x: str, level: int) -> list[str]:
    """``model.UNetPlusPlus``: the X(i,j) grid (``grid_nodes``/``skip_columns``) over the
    encoder, ``ConvBlock`` nodes (whatever the encoder), 1x1 heads ``final{k}`` / ``final``."""
    features = ONNX_ENCODERS[model.encoder](g, params, x, model.widths)
    X: dict[tuple[int, int], str] = {}
    for i, j in grid_nodes(level, model.skips, model.depth):
        if j == 0:
            X[i, j] = features[i]
            continue
        parts = [X[i, k] for k in skip_columns(j, model.skips)]
        parts.append(g.upsample(X[i + 1, j - 1]))
        X[i, j] = _vgg_block(g, params, f"conv{i}_{j}", parts)
    heads = ([(f"final{k}", X[0, k]) for k in range(1, level + 1)] if model.deep_supervision
             else [("final", X[0, model.depth])])
    return [g.conv(params, (name,), [feat], relu=False) for name, feat in heads]


def _scse(g: _Graph, params, path: tuple[str, ...], x: str) -> str:
    """``smp_unetplusplus.SCSE``: ``x * sigmoid(cse_conv2(ReLU(cse_conv1(mean_hw(x))))) +
    x * sigmoid(sse_conv(x))`` on the whole concatenation (the Flax module reads its parts)."""
    cse = g.conv(params, (*path, "cse_conv1"), [g.mean_hw(x)], relu=True)
    cse = g.sigmoid(g.conv(params, (*path, "cse_conv2"), [cse], relu=False))
    sse = g.sigmoid(g.conv(params, (*path, "sse_conv"), [x], relu=False))
    return g.add(g.mul(x, cse), g.mul(x, sse))


def _smp_decoder_block(g: _Graph, model, params, name: str, parts: Sequence[str]) -> str:
    """``smp_unetplusplus.DecoderBlock``: [attention1 when there is a skip] -> conv1 -> ReLU ->
    conv2 -> ReLU -> [attention2] (BatchNorm folded, or convs with bias: the same graph)."""
    path = ("decoder", name)
    scse = model.decoder_attention_type == "scse"
    if scse and len(parts) > 1:
        parts = [_scse(g, params, (*path, "attention1"), g.concat(parts))]
    h = g.conv(params, (*path, "conv1"), parts, relu=True, out_path=(*path, "conv2"))
    h = g.conv(params, (*path, "conv2"), [h], relu=True)
    return _scse(g, params, (*path, "attention2"), h) if scse else h


def _smp_graph(g: _Graph, model, params, x: str, level: int) -> list[str]:
    """``smp_unetplusplus.SMPUnetPlusPlus``: the ResNet pyramid, the decoder grid X(i,j) =
    block(concat[up(X(i+1,j-1)), X(i,j-1), ..., X(i,0)]) with nearest x2 upsampling, the final
    full-resolution block and the 3x3 ``segmentation_head``: one head."""
    from unetpp_jax.encoders.resnet import resnet_widths
    from unetpp_jax.smp_unetplusplus import block_name
    from unetpp_jax.smp_unetplusplus import grid_nodes as smp_grid_nodes

    del level  # one head, no pruning (_check_level)
    depth = model.encoder_depth
    c_in = input_channels(model, params)
    features = ONNX_ENCODERS[model.encoder](g, params, x,
                                            resnet_widths(model.encoder, c_in, depth))
    X: dict[tuple[int, int], str] = {(i, 0): features[i + 1] for i in range(depth)}
    for i, j in smp_grid_nodes(depth):
        parts = [g.upsample_nearest(X[i + 1, j - 1])] + [X[i, k] for k in range(j - 1, -1, -1)]
        X[i, j] = _smp_decoder_block(g, model, params, block_name(i, j, depth), parts)
    y = _smp_decoder_block(g, model, params, block_name(-1, depth, depth),
                           [g.upsample_nearest(X[0, depth - 1])])
    return [g.conv(params, ("segmentation_head",), [y], relu=False)]


ONNX_ARCHITECTURES: dict[str, Callable] = {
    "UNetPlusPlus": _unetpp_graph,
    "SMPUnetPlusPlus": _smp_graph,
}
# The conv that reads the image, per architecture: its kernel gives the input channels.
INPUT_CONVS: dict[str, tuple[str, ...]] = {
    "UNetPlusPlus": ("conv0_0", "conv1"),  # a vgg encoder; a ResNet one: ("encoder", "conv1")
    "SMPUnetPlusPlus": ("encoder", "conv1"),
}


def _architecture_name(model) -> str:
    from unetpp_jax.pretrained import ARCHITECTURES

    cls = type(model).__name__
    return next((k for k, v in ARCHITECTURES.items() if v.endswith(":" + cls)), cls)


def _subtree(tree: Mapping, path: tuple[str, ...]):
    """``tree[path[0]][path[1]]...`` or None."""
    for k in path:
        tree = tree.get(k) if isinstance(tree, Mapping) else None
    return tree


def input_channels(model, params: Mapping) -> int:
    """Channels of the image the model reads (from its first conv's kernel)."""
    for path in (INPUT_CONVS.get(_architecture_name(model), ()), ("encoder", "conv1"),
                 ("conv0_0", "conv1")):
        node = _subtree(params, path)
        if isinstance(node, Mapping) and "kernel" in node:
            return int(np.shape(node["kernel"])[2])
    raise ExportError(f"cannot find the input conv of {type(model).__name__} in its variables")


def _drop_dead_nodes(g: _Graph, outputs: Sequence[str]) -> None:
    """Keep only the nodes and initializers the outputs depend on."""
    needed, kept = set(outputs), []
    for node in reversed(g.nodes):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
    g.nodes = kept[::-1]
    g.initializers = [t for t in g.initializers if t.name in needed]


def _param_paths(tree, prefix=()) -> set[tuple[str, ...]]:
    """Paths of the convs (dicts holding a 'kernel') in a folded params tree."""
    out = set()
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out |= {prefix + (k,)} if "kernel" in v else _param_paths(v, prefix + (k,))
    return out


def onnx_model(model, variables: Mapping, *, input_spec=None, precision: str = "fp32",
               prune_level: int | None = None, scales: Mapping | None = None,
               calibration_info: Mapping | None = None, source: str = "",
               int8_layout: str = "qlinear",
               opset: int = ONNX_OPSET):
    """The ONNX model (``onnx.ModelProto``) of ``model`` with ``variables`` at ``precision``.

    Args:
      model: an architecture with an emitter in :data:`ONNX_ARCHITECTURES` (``UNetPlusPlus``
        whose encoder has one in :data:`ONNX_ENCODERS`; ``SMPUnetPlusPlus``).
      variables: the checkpoint's variables (BatchNorm folded here) or folded ones.
      input_spec: the checkpoint's ``InputSpec``, recorded in the model's metadata and doc.
      precision: ``fp32``; ``fp16`` (float16 weights and activations, float32 image in and
        probabilities out, sigmoid/softmax in float32, as ``numerics.Float16``); ``int8`` (QDQ
        with ``scales``, as ``numerics.Int8`` with its default options).
      prune_level: heads 1..L and only the nodes they need (default: the depth).
      scales: int8 only: the calibrated site scales, a tree mirroring ``params``
        (``quant.calibrate(...).scales``).
      calibration_info: int8: how the scales were obtained (recorded in the metadata).
      int8_layout: ``'qlinear'`` (default: each block's first conv also quantizes its output at
        the next conv's scale -- exact, see docs/export.md -- so ONNX Runtime fuses it into
        QLinearConv; activations known >= 0 are uint8 with zero point 0) or ``'qdq'`` (int8
        zero point 0 at every conv input and nothing else: the plain form TensorRT-style
        runtimes take).
      source: where the weights came from (recorded).
    """
    import onnx
    from onnx import TensorProto, helper

    from unetpp_jax.data.normalization import UNETZOO_INPUT
    from unetpp_jax.pretrained import model_description

    if precision not in ONNX_PRECISIONS:
        raise ExportError(f"ONNX precision must be one of {ONNX_PRECISIONS}, got {precision!r}")
    arch = _architecture_name(model)
    if arch not in ONNX_ARCHITECTURES:
        raise ExportError(f"no ONNX emitter for {type(model).__name__} (have "
                          f"{sorted(ONNX_ARCHITECTURES)}); export it with --format stablehlo")
    if model.encoder not in ONNX_ENCODERS:
        raise ExportError(f"no ONNX emitter for encoder {model.encoder!r} (have "
                          f"{sorted(ONNX_ENCODERS)}); export it with --format stablehlo")
    if int8_layout not in INT8_LAYOUTS:
        raise ExportError(f"int8 layout must be one of {INT8_LAYOUTS}, got {int8_layout!r}")
    if precision == "int8" and scales is None:
        raise ExportError("int8 export needs calibrated scales (quant.calibrate(...).scales)")
    level = _check_level(model, prune_level)
    spec = input_spec or UNETZOO_INPUT
    params = _numpy_tree(fold_batchnorm_variables(dict(variables))["params"])
    scales = None if scales is None else _numpy_tree(scales)
    depth, nc = model.depth, model.num_classes
    g = _Graph(precision, scales)
    g.int8_layout = int8_layout

    x = g.op("Transpose", [INPUT_NAME], "nchw", perm=[0, 3, 1, 2])
    if precision == "fp16":
        x = g.op("Cast", [x], "to_fp16", to=TensorProto.FLOAT16)
    heads = ONNX_ARCHITECTURES[arch](g, model, params, x, level)

    outputs = output_names(model, level)
    for out_name, logits in zip(outputs, heads):
        if precision == "fp16":  # heads' logits in float32, as numerics.Float16
            logits = g.op("Cast", [logits], "to_fp32", to=TensorProto.FLOAT)
        probs = (g.op("Sigmoid", [logits], "sigmoid") if nc == 1
                 else g.op("Softmax", [logits], "softmax", axis=1))
        g.nodes.append(helper.make_node("Transpose", [probs], [out_name], name=out_name,
                                        perm=[0, 2, 3, 1]))

    _drop_dead_nodes(g, outputs)  # a pruned level does not need the deeper encoder nodes
    expected = _param_paths(params)
    if level == depth and g.used != expected:
        raise ExportError(f"the ONNX emitter does not cover the model's parameters: unused "
                          f"{sorted('/'.join(p) for p in expected - g.used)}")

    m = 2 ** depth
    c_in = input_channels(model, params)
    dims = ["batch", f"height_{m}k", f"width_{m}k"]
    inp = helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, [*dims, c_in])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [*dims, nc]) for n in outputs]
    desc = model_description(model, c_in)
    doc = _doc_string(desc, spec, precision, level, outputs, m, calibration_info)
    graph = helper.make_graph(g.nodes, "unetpp", [inp], outs, g.initializers, doc_string=doc)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                              producer_name="unetpp-jax", doc_string=doc)
    from unetpp_jax import __version__

    proto.producer_version = __version__
    meta = {"input_spec": spec.to_json(), "input_layout": "NHWC float32",
            "input_multiple": m, "outputs": outputs,
            "output": "probabilities NHWC float32 (" + ("sigmoid" if nc == 1 else
                                                         "softmax over channels") + ")",
            "model": desc, "precision": precision, "prune_level": level, "source": source}
    if precision == "int8":
        meta["int8_layout"] = int8_layout
    if calibration_info is not None:
        meta["calibration"] = dict(calibration_info)
    helper.set_model_props(proto, {METADATA_PREFIX + k: json.dumps(v) for k, v in meta.items()})
    onnx.checker.check_model(proto, full_check=True)
    return proto


def _doc_string(desc, spec, precision, level, outputs, m, calibration_info) -> str:
    order = spec.channel_order if spec.channels == 3 else f"{spec.channels} channels"
    if desc.get("name") == "SMPUnetPlusPlus":
        model_line = (f"segmentation_models_pytorch UnetPlusPlus ({desc.get('encoder')} encoder, "
                      f"depth {desc.get('encoder_depth')}, decoder channels "
                      f"{desc.get('decoder_channels')}, attention "
                      f"{desc.get('decoder_attention_type')}), {precision}, one head.")
    else:
        model_line = (f"UNet++ ({desc.get('encoder')} encoder, widths {desc.get('widths')}, "
                      f"skips {desc.get('skips')}), {precision}, prune level {level}.")
    lines = [
        model_line,
        f"Input '{INPUT_NAME}': NHWC float32, {order} pixels normalised as "
        f"(pixel/255 - mean)/std with mean {list(spec.mean)}, std {list(spec.std)}; "
        f"height and width multiples of {m}; any batch.",
        f"Outputs {', '.join(outputs)}: probabilities, NHWC float32.",
    ]
    if calibration_info:
        lines.append("int8: QDQ with this project's calibration "
                     + json.dumps(dict(calibration_info)) + "; activations on [-127, 127].")
    return "\n".join(lines)


def save_onnx(proto, path) -> Path:
    """Write an ONNX model atomically (temporary file in the same folder, then rename)."""
    return write_bytes_atomic(path, proto.SerializeToString())


def onnx_metadata(path_or_session) -> dict:
    """The ``unetpp.*`` metadata of an ONNX file or session, JSON-decoded, prefix dropped."""
    props = (path_or_session.get_modelmeta().custom_metadata_map
             if hasattr(path_or_session, "get_modelmeta") else None)
    if props is None:
        import onnx

        props = {p.key: p.value for p in onnx.load(str(path_or_session)).metadata_props}
    return {k[len(METADATA_PREFIX):]: json.loads(v) for k, v in props.items()
            if k.startswith(METADATA_PREFIX)}


def onnx_session(path, *, threads: int | None = None, optimization: str = "all",
                 providers: Sequence[str] = ("CPUExecutionProvider",)):
    """An ONNX Runtime ``InferenceSession`` for ``path`` (a file, or the model's bytes).

    ``threads``: intra-op threads (default: ONNX Runtime's, one per physical core);
    ``optimization``: ``'all'`` (default), ``'extended'``, ``'basic'`` or ``'disable'``."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    levels = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
              "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
              "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}
    so.graph_optimization_level = levels[optimization]
    if threads is not None:
        so.intra_op_num_threads = int(threads)
        so.inter_op_num_threads = 1
    model = path if isinstance(path, (bytes, bytearray)) else str(path)
    return ort.InferenceSession(model, so, providers=list(providers))


def onnx_predict_fn(session) -> Callable[[np.ndarray], list[np.ndarray]]:
    """``f(images) -> [probabilities of each head]`` (numpy, NHWC) running ``session``;
    synchronous, so it can be timed as it is (``timing.time_jitted(..., sync=None)``)."""
    names = [o.name for o in session.get_outputs()]
    in_name = session.get_inputs()[0].name

    def run(images):
        return session.run(names, {in_name: np.asarray(images, np.float32)})

    return run


# ------------------------------------------------------------------------------ StableHLO


@dataclasses.dataclass
class StableHLOExport:
    """What :func:`stablehlo_export` returns: the ``jax.export.Exported`` and its sidecar."""

    exported: Any
    sidecar: dict

    def serialize(self) -> bytes:
        return bytes(self.exported.serialize())


def stablehlo_export(model, variables: Mapping, *, input_spec=None, height: int, width: int,
                     prune_level: int | None = None, precision: str = "fp32",
                     scales: Mapping | None = None, platforms: Sequence[str] | None = None,
                     calibration_info: Mapping | None = None, in_channels: int | None = None,
                     source: str = "") -> StableHLOExport:
    """``jax.export`` of ``images -> probabilities`` (heads 1..L as a tuple, or one array without
    deep supervision) with the folded variables embedded as constants.

    The batch is symbolic (any size at call time); height and width are fixed (the
    align-corners taps are computed at trace time from the shape). ``precision`` is any JAX
    numerics (``int8`` needs ``scales`` and is then the float emulation). Load with
    ``jax.export.deserialize(bytes).call(images)``."""
    from unetpp_jax.data.normalization import UNETZOO_INPUT
    from unetpp_jax.numerics import get_numerics
    from unetpp_jax.pretrained import model_description

    if precision not in STABLEHLO_PRECISIONS:
        raise ExportError(f"StableHLO precision must be one of {STABLEHLO_PRECISIONS}, got "
                          f"{precision!r}")
    level = _check_level(model, prune_level)
    m = 2 ** model.depth
    if height % m or width % m or height < m or width < m:
        raise ExportError(f"height and width must be positive multiples of {m} (2**depth), "
                          f"got {height}x{width}")
    spec = input_spec or UNETZOO_INPUT
    numerics = get_numerics(precision)
    if numerics.needs_calibration and scales is None:
        raise ExportError(f"{precision} export needs calibrated scales")
    folded = fold_batchnorm_variables(dict(variables))
    folded = {k: v for k, v in folded.items() if k != "quant"}
    if numerics.needs_calibration:
        folded["quant"] = scales
    folded = jax.device_put(folded)
    run_model = model.clone(numerics=numerics)
    if in_channels is None:
        try:
            in_channels = input_channels(model, folded["params"])
        except ExportError:
            in_channels = 3
    c_in = int(in_channels)

    def serve(images):
        logits = run_model.apply(folded, images, train=False, prune_level=level)
        return probabilities(logits, model.num_classes)

    (batch,) = jax.export.symbolic_shape("batch")
    arg = jax.ShapeDtypeStruct((batch, height, width, c_in), jnp.float32)
    kwargs = {} if platforms is None else {"platforms": tuple(platforms)}
    exported = jax.export.export(jax.jit(serve), **kwargs)(arg)
    outputs = output_names(model, level)
    sidecar = {"format": "stablehlo", "serialized_by": f"jax {jax.__version__}",
               "calling_convention_version": exported.calling_convention_version,
               "platforms": list(exported.platforms),
               "input": {"name": INPUT_NAME, "shape": ["batch", height, width, c_in],
                         "dtype": "float32", "layout": "NHWC", "spec": spec.to_json()},
               "outputs": outputs,
               "output": "probabilities NHWC float32, a tuple in this order" if
               model.deep_supervision else "probabilities NHWC float32",
               "model": model_description(model, c_in), "precision": precision,
               "prune_level": level, "source": source}
    if calibration_info is not None:
        sidecar["calibration"] = dict(calibration_info)
    return StableHLOExport(exported, sidecar)


def sidecar_path(path) -> Path:
    """Where the JSON sidecar of a StableHLO file goes: ``FILE.json``."""
    p = Path(path)
    return p.with_name(p.name + ".json")


def save_stablehlo(export: StableHLOExport, path) -> Path:
    """Write the serialized bytes to ``path`` and the sidecar to ``path.json``, each atomically
    (sidecar first: a present ``path`` always has its sidecar)."""
    write_text_atomic(sidecar_path(path), json.dumps(export.sidecar, indent=2) + "\n")
    return write_bytes_atomic(path, export.serialize())


def load_stablehlo(path) -> tuple[Any, dict]:
    """``(exported, sidecar)`` of a StableHLO export: call ``exported.call(images)``."""
    exported = jax.export.deserialize(bytearray(Path(path).read_bytes()))
    side = sidecar_path(path)
    sidecar = json.loads(side.read_text()) if side.is_file() else {}
    return exported, sidecar


# --------------------------------------------------------------------------------- helpers


def calibration_info(calib) -> dict:
    """What an int8 export records about its calibration (``quant.Calibration``)."""
    info = {"method": calib.method, "num_images": int(calib.num_images),
            "activation_grid": "symmetric per tensor, zero point 0, [-127, 127]",
            "weights": "symmetric per output channel, max|w|/127, [-127, 127]"}
    for field in ("images_sha256", "weights_sha256"):  # where the Calibration records them
        if getattr(calib, field, None):
            info[field] = str(getattr(calib, field))
    return info
