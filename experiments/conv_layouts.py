"""GFLOP/s of single 3x3 convolutions of UNet++ shapes, written several ways, on this backend.

    python -m experiments.conv_layouts [--batch 16] [--repeats 7]

Why it exists: on XLA:CPU the full-resolution convolutions (96x96, 32 output channels) run at
about half the speed of the deeper ones, which is what keeps the JAX forward below PyTorch's
oneDNN on CPU. Each alternative formulation below computes the same convolution (checked).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from unetpp_jax.benchmark import time_jitted


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


VARIANTS = {
    "XLA NHWC/HWIO": _lax(("NHWC", "HWIO", "NHWC")),
    "XLA NCHW/OIHW": _lax(("NCHW", "OIHW", "NCHW")),
    "XLA HWNC/HWIO": _lax(("HWNC", "HWIO", "HWNC")),
    "im2col + matmul": _nhwc(im2col),
    "9 shifted matmuls": _nhwc(shifted_matmuls),
}
# (H = W, Cin, Cout): full-resolution nodes X(0,1) and X(0,3), a block's second conv, deeper levels.
SHAPES = [(96, 64, 32), (96, 160, 32), (96, 32, 32), (48, 64, 64), (24, 128, 128), (6, 512, 512)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    print(f"GFLOP/s of one 3x3 conv, batch {args.batch}, {jax.devices()[0].device_kind}, "
          f"JAX {jax.__version__}, median of {args.repeats}")
    print(f"{'H, Cin -> Cout':16s}" + "".join(f"{k:>20s}" for k in VARIANTS))
    for h, c, o in SHAPES:
        x = jax.random.normal(jax.random.PRNGKey(0), (args.batch, h, h, c))
        w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, c, o)) / np.sqrt(9 * c)
        flops = 2 * args.batch * h * h * 9 * c * o
        ref = jax.jit(VARIANTS["XLA NHWC/HWIO"][1])(x, w)
        row = f"{h:3d}, {c:3d} -> {o:3d}  "
        for prepare, fn, to_nhwc in VARIANTS.values():
            f = jax.jit(fn)
            xs, ws = jax.block_until_ready(prepare(x, w))
            np.testing.assert_allclose(to_nhwc(f(xs, ws)), ref, atol=1e-3, rtol=1e-3)
            t = time_jitted(f, xs, ws, repeats=args.repeats)
            row += f"{flops / t.median_s / 1e9:20.0f}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
