"""UNet++ (Zhou et al., TMI 2019, arXiv 1912.05074) in Flax Linen, as UNET-ZOO's ``NestedUNet``.

The nodes form the paper's grid X(i, j): i is the depth (0 = full resolution), j the column::

    X(0,0)  X(0,1)  X(0,2)  X(0,3)  X(0,4)      heads final1..final4 read X(0,1)..X(0,4)
    X(1,0)  X(1,1)  X(1,2)  X(1,3)
    X(2,0)  X(2,1)  X(2,2)
    X(3,0)  X(3,1)
    X(4,0)

    X(i,0) = block(maxpool(X(i-1,0)))                                  (the encoder)
    X(i,j) = block(concat[X(i,0), ..., X(i,j-1), up(X(i+1,j-1))])     (nested dense skips)

Every node is a double ``[conv3x3 -> BatchNorm -> ReLU]`` block named ``conv{i}_{j}`` and every
head a 1x1 conv named ``final{k}`` (``final`` without deep supervision), so the parameter tree
mirrors UNET-ZOO's ``state_dict`` keys. The model returns *logits*; UNET-ZOO puts the sigmoid
inside the model, here :func:`probabilities` applies it, so training losses can use logits.
A node's concatenated input is handed to its first conv as the list of its parts
(``layers.conv2d`` convolves each with its slice of the kernel and sums), which equals the conv
of the concatenation without writing it.

Pruned inference (paper §III-C): at level L only the nodes with i + j <= L are computed and
head L is the output, so each level is its own, smaller, compiled program.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unetpp_jax.layers import (
    BN_EPSILON,
    BN_MOMENTUM,
    XLA_COMPILER_OPTIONS,
    Conv,
    ConvInput,
    Float32,
    conv2d,
    fold_batchnorm,
    input_parts,
    max_pool2x2,
    upsample2x_align_corners,
)

Array = jax.Array

WIDTHS = (32, 64, 128, 256, 512)  # UNET-ZOO nb_filter, levels 0..4
DEPTH = 4  # deepest level; also the number of deep-supervision heads


class ConvBlock(nn.Module):
    """Node X(i,j): ``[conv3x3 (bias) -> BatchNorm -> ReLU] x 2`` (UNET-ZOO ``VGGBlock``).

    Parameter names: ``conv1``/``bn1`` and ``conv2``/``bn2`` stand for PyTorch's
    ``conv.0``/``conv.1`` and ``conv.3``/``conv.4``. In training mode BatchNorm uses batch
    statistics and updates ``batch_stats``; in inference mode it is folded into the conv
    (:func:`fold_batchnorm`) and the conv runs through ``numerics`` (fp32, fp16, int8, ...).
    """

    features: int
    numerics: Any = Float32()

    @nn.compact
    def __call__(self, x: ConvInput, train: bool = False) -> Array:
        for k in (1, 2):
            in_features = sum(p.shape[-1] for p in input_parts(x))
            kernel, bias = Conv(self.features, 3, name=f"conv{k}").weights(in_features)
            bn = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM,
                              epsilon=BN_EPSILON, name=f"bn{k}")
            # fold_batchnorm_variables' trees have no BatchNorm entries in 'params' at all.
            prefolded = (not self.is_initializing()
                         and f"bn{k}" not in self.variables.get("params", {}))
            if train:
                if prefolded:
                    raise ValueError(
                        f"{self.name}: these variables have BatchNorm folded into the convs "
                        "(fold_batchnorm_variables) and can only run inference; train from the "
                        "unfolded variables (the checkpoint as saved)")
                x = nn.relu(bn(conv2d(x, kernel, bias)))
                continue
            if self.is_initializing():  # create the BatchNorm variables
                bn(jnp.zeros((1, 1, 1, self.features), jnp.float32))
            if not prefolded:  # fold here, on every call (see fold_batchnorm_variables)
                kernel, bias = fold_batchnorm(kernel, bias, bn.variables["params"],
                                              bn.variables["batch_stats"])
            x = nn.relu(self.numerics.conv(self, f"conv{k}", x, kernel, bias))
        return x


def grid_nodes(prune_level: int = DEPTH) -> list[tuple[int, int]]:
    """The nodes (i, j) with i + j <= prune_level, in an order where every input comes first.

    Column by column: X(i, j) needs X(i, 0..j-1) (same row, earlier columns) and X(i+1, j-1).
    """
    return [(i, j) for j in range(prune_level + 1) for i in range(prune_level + 1 - j)]


class UNetPlusPlus(nn.Module):
    """UNet++ with UNET-ZOO's widths, NHWC input (BGR, normalised to [-1, 1]), logits out.

    Attributes:
      num_classes: output channels of each head (1 for DSB2018 nuclei).
      widths: channels of levels 0..4.
      deep_supervision: four heads ``final1..final4`` on X(0,1..4) (UNET-ZOO forces this on
        for UNet++); otherwise one head ``final`` on X(0,4).
      numerics: how inference convolutions are computed (``layers.Float32`` or one of
        ``quant.py``'s); a static choice, so each compiles to its own program.

    ``__call__(x, train=False, prune_level=4)`` returns, with deep supervision, a tuple of the
    logits of heads 1..prune_level; without, the logits of the single head. Input height and
    width must be divisible by 16 (four 2x2 poolings, as in UNET-ZOO).
    """

    num_classes: int = 1
    widths: Sequence[int] = WIDTHS
    deep_supervision: bool = True
    numerics: Any = Float32()

    @nn.compact
    def __call__(self, x: Array, train: bool = False, prune_level: int = DEPTH):
        if x.ndim != 4:
            raise ValueError(f"expected NHWC input, got shape {x.shape}")
        if x.shape[1] % 16 or x.shape[2] % 16:
            raise ValueError(f"height and width must be multiples of 16, got {x.shape[1:3]}")
        if not 1 <= prune_level <= DEPTH:
            raise ValueError(f"prune_level must be in 1..{DEPTH}, got {prune_level}")
        if not self.deep_supervision and prune_level != DEPTH:
            raise ValueError("pruned inference needs the deep-supervision heads; build the model "
                             "with deep_supervision=True (a single-head model has only X(0,4)'s head)")
        if self.is_initializing():
            prune_level = DEPTH  # always create every variable

        X: dict[tuple[int, int], Array] = {}
        for i, j in grid_nodes(prune_level):
            if j == 0:
                inp = x if i == 0 else max_pool2x2(X[i - 1, 0])
            else:  # the concatenation, as its parts (layers.conv2d reads them in place)
                inp = [X[i, k] for k in range(j)] + [upsample2x_align_corners(X[i + 1, j - 1])]
            X[i, j] = ConvBlock(self.widths[i], numerics=self.numerics, name=f"conv{i}_{j}")(
                inp, train)

        if self.deep_supervision:
            heads = [(f"final{k}", X[0, k]) for k in range(1, prune_level + 1)]
        else:
            heads = [("final", X[0, DEPTH])]
        outs = []
        for name, feat in heads:
            kernel, bias = Conv(self.num_classes, 1, name=name).weights(feat.shape[-1])
            if train:
                out = conv2d(feat, kernel, bias)
            else:
                out = self.numerics.conv(self, name, feat, kernel, bias)
            outs.append(out.astype(jnp.float32))
        return tuple(outs) if self.deep_supervision else outs[0]


def fold_batchnorm_variables(variables: dict) -> dict:
    """Inference variables with every BatchNorm folded into its conv, once.

    Returns ``{'params': ...}`` (plus any collection other than ``batch_stats``, e.g.
    ``'quant'``) in which each node's ``conv1``/``conv2`` holds the folded kernel and bias
    (:func:`layers.fold_batchnorm`) and the ``bn1``/``bn2`` entries are gone. The model notices
    the missing BatchNorm parameters and uses the kernels as they are, so the two trees give the
    same outputs (up to float32 rounding of where the fold happens) in inference mode.

    Why: with unfolded variables every jitted forward folds the 30 kernels again (~36 MB
    read and written per call); folding once made inference x1.05-1.26 faster at batch 1 and
    x1.04 at batch 16 on the CPU of the README's Performance section. Folding folded variables
    returns them unchanged. Folded variables cannot train (``train=True`` raises); keep the unfolded
    ones for that and for saving checkpoints.
    """
    has_bn = any("bn1" in p for p in variables["params"].values())
    if not has_bn:  # already folded
        return variables
    if "batch_stats" not in variables:
        raise ValueError("fold_batchnorm_variables: the params hold BatchNorm layers but there "
                         "is no 'batch_stats' collection (pass the checkpoint's whole variables)")
    return _fold_batchnorm_variables(variables)


@jax.jit
def _fold_batchnorm_variables(variables: dict) -> dict:
    params, stats = variables["params"], variables["batch_stats"]
    folded = {}
    for name, p in params.items():
        if name not in stats:  # a 1x1 head: no BatchNorm
            folded[name] = p
            continue
        folded[name] = {}
        for k in (1, 2):
            conv, bn = p[f"conv{k}"], f"bn{k}"
            kernel, bias = fold_batchnorm(conv["kernel"], conv["bias"], p[bn], stats[name][bn])
            folded[name][f"conv{k}"] = {"kernel": kernel, "bias": bias}
    rest = {c: v for c, v in variables.items() if c not in ("params", "batch_stats")}
    return {"params": folded, **rest}


def probabilities(logits):
    """Sigmoid of the logits (of one head or a tuple of heads): UNET-ZOO's in-model sigmoid."""
    return jax.tree_util.tree_map(jax.nn.sigmoid, logits)


def init_variables(model: UNetPlusPlus, rng: Array | int = 0, shape=(1, 16, 16, 3)) -> dict:
    """``{'params', 'batch_stats'}`` for ``model`` (BatchNorm: scale 1, bias 0, mean 0, var 1).

    Parameter shapes do not depend on the image size, so the smallest valid input (16x16) is
    used by default. An integer seed becomes an ``rbg`` key: XLA's CPU compiler takes tens of
    seconds on the ~70 threefry draws of this init, and seconds with the RngBitGenerator.
    """
    if isinstance(rng, int):
        rng = jax.random.key(rng, impl="rbg")
    init = jax.jit(model.init, static_argnames=("train",))
    return dict(init(rng, jnp.zeros(shape, jnp.float32)))


def map_in_micro_batches(fn, images: Array, micro_batch: int | None):
    """``fn(images)`` computed ``micro_batch`` images at a time, one after another
    (``lax.map``), the results concatenated along the batch axis; ``None`` or a batch no larger
    than ``micro_batch``: one call. A trailing partial micro-batch is zero-padded, the padding
    dropped. The same result for any ``fn`` that treats images independently (inference UNet++
    does: BatchNorm uses running statistics), up to float rounding of how a conv is blocked
    for a smaller batch (measured identical on XLA:CPU)."""
    n = images.shape[0]
    if micro_batch is None or n <= micro_batch:
        return fn(images)
    pad = -n % micro_batch
    if pad:
        images = jnp.concatenate([images, jnp.zeros((pad,) + images.shape[1:], images.dtype)])
    out = jax.lax.map(fn, images.reshape((-1, micro_batch) + images.shape[1:]))
    return jax.tree_util.tree_map(lambda y: y.reshape((-1,) + y.shape[2:])[:n], out)


@functools.partial(jax.jit, static_argnums=(0, 1, 2), compiler_options=XLA_COMPILER_OPTIONS)
def _predict(model: UNetPlusPlus, prune_level: int, micro_batch: int | None, variables, images):
    def forward(x):
        return probabilities(model.apply(variables, x, train=False, prune_level=prune_level))

    return map_in_micro_batches(forward, images, micro_batch)


def default_micro_batch() -> int | None:
    """Images per step of :func:`predict_fn`: 1 on CPU, the whole batch elsewhere.

    On CPU one image at a time keeps a node's activations (at most 96x96x192 floats, 7 MB)
    in cache; a 16-image batch streams ~110 MB per full-resolution node through memory. On the
    2-core machine of the README's Performance section that made batch-16 inference x1.06-1.13
    faster. Accelerators want the whole batch at once.
    """
    return 1 if jax.default_backend() == "cpu" else None


def predict_fn(model: UNetPlusPlus, prune_level: int = DEPTH, *,
               micro_batch: int | None | str = "auto"):
    """A jitted ``f(variables, images) -> probabilities`` in inference mode at one prune level.

    With deep supervision it returns a tuple of heads 1..prune_level; pick ``[-1]`` for the
    head UNET-ZOO scores (head 4 at full depth). Modules are hashable, so the compiled program
    is cached per (model, prune level, micro-batch, input shape): calling ``predict_fn`` again
    (every validation epoch, say) does not recompile.

    ``variables`` may be the checkpoint's (BatchNorm folded inside every call) or
    :func:`fold_batchnorm_variables`' (folded once; faster, most of all at small batches).
    ``micro_batch``: images computed per step inside the program (:func:`map_in_micro_batches`);
    ``"auto"`` is :func:`default_micro_batch`, ``None`` the whole batch in one step.
    """
    if isinstance(micro_batch, str) and micro_batch == "auto":
        micro_batch = default_micro_batch()
    if micro_batch is not None:
        if (isinstance(micro_batch, bool) or not isinstance(micro_batch, numbers.Integral)
                or micro_batch < 1):
            raise ValueError(
                f"micro_batch must be a positive int, None or 'auto', got {micro_batch!r}")
        micro_batch = int(micro_batch)  # numpy integers too; a plain int keys the jit cache
    return functools.partial(_predict, model, prune_level, micro_batch)


def count_params(params) -> int:
    """Number of trainable parameters (BatchNorm running statistics are not parameters)."""
    return int(sum(np.prod(p.shape) for p in jax.tree_util.tree_leaves(params)))


def xla_flops(model: UNetPlusPlus, variables, shape=(1, 96, 96, 3), prune_level: int = DEPTH) -> float:
    """FLOPs of one inference forward as counted by XLA's cost analysis (multiply-add = 2)."""
    f = jax.jit(lambda v, x: model.apply(v, x, train=False, prune_level=prune_level))
    compiled = f.lower(variables, jax.ShapeDtypeStruct(shape, jnp.float32)).compile()
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax returns one dict per device
        cost = cost[0]
    return float(cost["flops"])


def conv_macs(widths: Sequence[int] = WIDTHS, height: int = 96, width: int = 96,
              in_channels: int = 3, num_classes: int = 1, deep_supervision: bool = True,
              prune_level: int = DEPTH) -> int:
    """Multiply-accumulates of the convolutions alone, counted by hand from the grid.

    Independent of XLA; ignores BatchNorm, ReLU, pooling and upsampling (small next to convs).
    """
    total = 0
    for i, j in grid_nodes(prune_level):
        hw = (height >> i) * (width >> i)
        if j == 0:
            cin = in_channels if i == 0 else widths[i - 1]
        else:
            cin = j * widths[i] + widths[i + 1]
        cout = widths[i]
        total += hw * 9 * (cin * cout + cout * cout)
    heads = prune_level if deep_supervision else 1
    total += heads * height * width * widths[0] * num_classes
    return total


def model_metadata(model: UNetPlusPlus) -> dict:
    """The ``'model'`` entry a checkpoint records, from which :func:`load_pretrained` rebuilds it."""
    return {"name": "UNetPlusPlus", "deep_supervision": model.deep_supervision,
            "widths": list(model.widths), "num_classes": model.num_classes, "in_channels": 3}


def load_pretrained(path, numerics: Any = None) -> tuple[UNetPlusPlus, dict]:
    """``(model, variables)`` from a checkpoint directory written by ``unetpp_jax.checkpoint``.

    The model is rebuilt from the checkpoint's metadata (``deep_supervision``, ``widths``,
    ``num_classes``), e.g. one converted from UNET-ZOO by ``weights_port/convert.py``;
    ``numerics`` optionally swaps the inference arithmetic (default ``Float32()``). The variables
    are checked against the model's own tree (``jax.eval_shape``, no compute), so a checkpoint
    that does not fit raises ``ValueError`` here rather than failing inside ``apply``.
    """
    from unetpp_jax.checkpoint import check_tree, load_variables

    variables, metadata = load_variables(path)
    config = metadata.get("model")
    if not isinstance(config, dict):
        raise ValueError(f"{path}: checkpoint metadata has no 'model' entry")
    model = UNetPlusPlus(num_classes=int(config.get("num_classes", 1)),
                         widths=tuple(config.get("widths", WIDTHS)),
                         deep_supervision=bool(config.get("deep_supervision", True)),
                         numerics=Float32() if numerics is None else numerics)
    in_channels = int(config.get("in_channels", 3))
    abstract = jax.eval_shape(model.init, jax.ShapeDtypeStruct((2,), jnp.uint32),
                              jax.ShapeDtypeStruct((1, 16, 16, in_channels), jnp.float32))
    check_tree(variables, abstract, f"{path}: variables do not fit UNetPlusPlus(deep_supervision="
                                    f"{model.deep_supervision}, widths={model.widths})")
    return model, variables
