"""GFLOP/s of single 3x3 convolutions of UNet++ shapes, written several ways, on this backend.

    python -m experiments.conv_layouts [--batch 16] [--repeats 7] [--no-torch]

Why it exists: the convolutions are where the UNet++ forward spends its time, and on XLA:CPU
their speed depends on which library XLA hands them to (YNNPACK by default in jaxlib 0.10, or
Eigen with ``inference.compiler_options()``) and on how they are written. Each column computes
the same convolution (checked against a ``precision='highest'`` XLA conv); the last is PyTorch's
(oneDNN) for scale. Winograd's column counts a direct conv's FLOPs (an effective rate). The
benchmark's ``convs`` section (``python -m experiments.bench --only convs``) times every conv
shape of the model beside ONNX Runtime; this probe is the older, batch-16 one.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from experiments.benchmark import time_jitted
from unetpp_jax import fastconv
from unetpp_jax.inference import compiler_options

XLA_COMPILER_OPTIONS = compiler_options()  # the package's inference options (YNNPACK off where known)


def _lax(dn):
    """A lax convolution in layout ``dn``; its inputs are transposed once, outside the timing."""
    lhs, rhs, _ = dn

    def prepare(x, w):
        return (jnp.transpose(x, ["NHWC".index(a) for a in lhs]),
                jnp.transpose(w, ["HWIO".index(a) for a in rhs]))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=dn)

    def to_nhwc(y):
        return jnp.transpose(y, [lhs.index(a) for a in "NHWC"])

    return prepare, conv, to_nhwc


def _nhwc(fn):
    return (lambda x, w: (x, w)), fn, (lambda y: y)


def im2col(x, w):
    n, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, dy:dy + h, dx:dx + wd] for dy in range(3) for dx in range(3)], -1)
    return jnp.einsum("nhwk,ko->nhwo", cols, w.reshape(9 * c, -1))


def shifted_matmuls(x, w):
    n, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return sum(jnp.einsum("nhwc,co->nhwo", xp[:, dy:dy + h, dx:dx + wd], w[dy, dx])
               for dy in range(3) for dx in range(3))


# name -> (prepare, conv, to_nhwc, compiler options). The package compiles its inference
# programs with inference.compiler_options() (YNNPACK off: XLA's Eigen convolution); the second
# column is the same convolution with XLA's default options (YNNPACK).
VARIANTS = {
    "NHWC (package)": (*_lax(("NHWC", "HWIO", "NHWC")), XLA_COMPILER_OPTIONS),
    "NHWC (XLA default)": (*_lax(("NHWC", "HWIO", "NHWC")), None),
    "NCHW/OIHW": (*_lax(("NCHW", "OIHW", "NCHW")), XLA_COMPILER_OPTIONS),
    "HWNC/HWIO": (*_lax(("HWNC", "HWIO", "HWNC")), XLA_COMPILER_OPTIONS),
    "im2col + matmul": (*_nhwc(im2col), XLA_COMPILER_OPTIONS),
    "9 shifted matmuls": (*_nhwc(shifted_matmuls), XLA_COMPILER_OPTIONS),
    "Winograd F(4x4,3x3)": (lambda x, w: (x, fastconv.transform_kernel(w, 4)),
                            lambda x, u: fastconv.winograd_conv3x3(x, u, m=4), lambda y: y,
                            XLA_COMPILER_OPTIONS),
}
# (H = W, Cin, Cout): full-resolution nodes X(0,1) and X(0,3), a block's second conv, deeper levels.
SHAPES = [(96, 64, 32), (96, 160, 32), (96, 32, 32), (48, 64, 64), (24, 128, 128), (6, 512, 512)]


def torch_conv_timing(x: np.ndarray, w: np.ndarray, repeats: int):
    """The same conv in PyTorch eager (oneDNN), channels_last, one thread per core, or None
    without PyTorch. Checked against ``ref`` by the caller."""
    try:
        import torch
    except ImportError:
        return None, None
    from experiments.benchmark import available_cores

    torch.set_num_threads(available_cores())
    xt = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2).contiguous(
        memory_format=torch.channels_last)
    wt = torch.from_numpy(np.array(w)).permute(3, 2, 0, 1).contiguous(
        memory_format=torch.channels_last)

    def conv():
        with torch.inference_mode():
            return torch.nn.functional.conv2d(xt, wt, padding=1)

    t = time_jitted(conv, repeats=repeats, sync=None)
    return t, conv().permute(0, 2, 3, 1).numpy()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--no-torch", action="store_true", help="leave out the PyTorch column")
    args = ap.parse_args(argv)
    print(f"GFLOP/s of one 3x3 conv, batch {args.batch}, {jax.devices()[0].device_kind}, "
          f"JAX {jax.__version__}, median of {args.repeats}")
    names = list(VARIANTS) + ([] if args.no_torch else ["PyTorch (oneDNN)"])
    print(f"{'H, Cin -> Cout':16s}" + "".join(f"{k:>20s}" for k in names))
    for h, c, o in SHAPES:
        x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, h, h, c))
        w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, c, o)) / np.sqrt(9 * c)
        flops = 2 * args.batch * h * h * 9 * c * o
        ref = jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                           dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                           precision="highest")
        row = f"{h:3d}, {c:3d} -> {o:3d}  "
        for prepare, fn, to_nhwc, options in VARIANTS.values():
            f = jax.jit(fn, compiler_options=options)
            xs, ws = jax.block_until_ready(prepare(x, w))
            np.testing.assert_allclose(to_nhwc(f(xs, ws)), ref, atol=1e-3, rtol=1e-3)
            t = time_jitted(f, xs, ws, repeats=args.repeats)
            row += f"{flops / t.median_s / 1e9:20.0f}"
        if not args.no_torch:
            t, y = torch_conv_timing(x, w, args.repeats)
            if t is None:
                row += f"{'(no torch)':>20s}"
            else:
                np.testing.assert_allclose(y, ref, atol=1e-3, rtol=1e-3)
                row += f"{flops / t.median_s / 1e9:20.0f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
