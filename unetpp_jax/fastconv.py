"""Winograd convolutions for the 3x3, stride-1, 'same' convs of inference on CPU.

XLA:CPU runs a convolution as one library call (Eigen's spatial convolution with the package's
compiler options); on UNet++'s full-resolution, low-channel convs it reaches well under the
machine's matmul speed (``docs/performance.md``). Winograd's minimal filtering F(m x m, 3 x 3)
(Lavin & Gray, *Fast Algorithms for Convolutional Neural Networks*, CVPR 2016) computes each
m x m output tile from an (m+2) x (m+2) input tile with (m+2)^2 multiplies per channel pair
instead of 9 m^2: 2.25x fewer at m = 2, 4x fewer at m = 4. Written in JAX::

    V = B^T d B      every input tile, elementwise sums (one XLA fusion)
    M[k] = V[k] U[k] (m+2)^2 independent matmuls over (tiles x Cin) x (Cin x Cout)
    Y = A^T M A      every output tile, elementwise sums, bias added

with ``U = G g G^T`` the transformed kernel (:func:`transform_kernel`, computed once per
checkpoint by ``numerics.prepare_variables``, or inside the program when absent). The parts of
a channel concatenation (``layers.ConvInput``) are transformed one by one and concatenated in
the Winograd domain: the convolution of the concatenation without writing it.

``conv2d(..., impl=...)`` is the seam ``numerics.Float32`` calls: ``'xla'`` is the plain
``layers.conv2d`` (the reference every other path is tested against), ``'winograd4'`` /
``'winograd2'`` F(4x4,3x3) / F(2x2,3x3) wherever the conv is a 3x3 stride-1 'same' float32
conv (others fall back to ``'xla'``), and ``'auto'`` Winograd only on the CPU backend and only
for the shapes where it measured faster (:func:`choose`); on GPU/TPU ``'auto'`` is plain XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from unetpp_jax.layers import ConvInput, conv2d as xla_conv2d, input_parts

Array = jax.Array

IMPLS = ("auto", "xla", "winograd4", "winograd2")
TILE = {"winograd4": 4, "winograd2": 2}  # output tile side m of F(m x m, 3 x 3)

# B^T, G, A^T of F(2x2,3x3) (Lavin & Gray: points 0, 1, -1 and infinity) and F(4x4,3x3) by
# Toom-Cook at the points 0, 1, -1, -2, 1/2 and infinity instead of Lavin & Gray's 0, +-1, +-2:
# the set Barabasz et al. (*Error analysis and improving the accuracy of Winograd convolution
# for deep neural networks*, ACM TOMS 2020) find most accurate for F(4,3); measured here on
# 96x96 convs of 3-96 channels, its float32 max error is 2.6-3.2x smaller than Lavin & Gray's
# (docs/performance.md). The fractions sit in G (applied to the kernel once, in float64); B^T
# has small integers and A^T powers of two, exact in float32.
_F2 = dict(
    BT=[[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
    G=[[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
    AT=[[1, 1, 1, 0], [0, 1, -1, -1]],
)
_F4 = dict(
    BT=[[2, -3, -4, 3, 2, 0], [0, -2, 1, 5, 2, 0], [0, -2, 5, -1, -2, 0], [0, 1, -2, -1, 2, 0],
        [0, 2, 1, -2, -1, 0], [0, 2, -3, -4, 3, 2]],
    G=[[1 / 2, 0, 0], [1 / 6, 1 / 6, 1 / 6], [1 / 6, -1 / 6, 1 / 6],
       [1 / 30, -1 / 15, 2 / 15], [16 / 15, 8 / 15, 4 / 15], [0, 0, 1 / 2]],
    AT=[[1, 1, 1, 1, 1, 0], [0, 1, -1, -2, 1 / 2, 0], [0, 1, 1, 4, 1 / 4, 0],
        [0, 1, -1, -8, 1 / 8, 1]],
)
TRANSFORMS = {2: _F2, 4: _F4}


def _combine(terms, coeffs):
    """``sum_a coeffs[a] * terms[a]`` as elementwise ops (zero coefficients skipped)."""
    out = None
    for c, t in zip(coeffs, terms):
        if c == 0:
            continue
        t = t if c == 1 else (-t if c == -1 else t * np.float32(c))
        out = t if out is None else out + t
    return out


def transform_kernel(kernel, m: int = 4) -> Array:
    """``U = G g G^T`` of a 3x3 HWIO kernel, as ``((m+2)^2, Cin, Cout)`` float32.

    A concrete kernel is transformed in float64 on the host and rounded once; a traced one
    (inside a jitted program) in float32 at ``precision='highest'``."""
    if tuple(kernel.shape[:2]) != (3, 3):
        raise ValueError(f"Winograd F(m,3) needs a 3x3 kernel, got {kernel.shape}")
    g = np.asarray(TRANSFORMS[m]["G"], np.float64)
    t = m + 2
    if isinstance(kernel, jax.core.Tracer):
        g32 = g.astype(np.float32)
        u = jnp.einsum("ia,jb,abco->ijco", g32, g32, kernel.astype(jnp.float32),
                       precision="highest")
    else:
        u = jnp.asarray(np.einsum("ia,jb,abco->ijco", g, g, np.asarray(kernel, np.float64))
                        .astype(np.float32))
    return u.reshape(t * t, *kernel.shape[2:])


def _input_tiles(x: Array, m: int, th: int, tw: int) -> Array:
    """``B^T d B`` of the ``th x tw`` overlapping (m+2)-tiles of NHWC ``x`` zero-padded by 1
    ('same'): ``((m+2)^2, N * th * tw, C)``. Along W, then along H, each pass one stack of
    (m+2) elementwise sums of strided slices (so XLA emits one fusion per pass)."""
    n, h, w, c = x.shape
    t = m + 2
    bt = TRANSFORMS[m]["BT"]
    xp = jnp.pad(x, ((0, 0), (1, m * th + 1 - h), (1, m * tw + 1 - w), (0, 0)))
    cols = [xp[:, :, b:b + m * tw:m] for b in range(t)]  # cols[b][:, :, k] = xp[:, :, m k + b]
    vw = jnp.stack([_combine(cols, bt[j]) for j in range(t)])  # (t, n, H + 2, tw, c)
    rows = [vw[:, :, a:a + m * th:m] for a in range(t)]
    v = jnp.stack([_combine(rows, bt[i]) for i in range(t)])  # (t_i, t_j, n, th, tw, c)
    return v.reshape(t * t, n * th * tw, c)


def _output_tiles(mm: Array, m: int, n: int, th: int, tw: int, h: int, w: int) -> Array:
    """``A^T M A`` of every tile of ``mm`` ((m+2)^2, N * th * tw, O), assembled into NHWC and
    cropped to ``h x w``."""
    t = m + 2
    at = TRANSFORMS[m]["AT"]
    mm = mm.reshape(t, t, n, th, tw, mm.shape[-1])
    yh = jnp.stack([_combine([mm[a] for a in range(t)], at[i])
                    for i in range(m)], axis=2)  # (t_b, n, m_i, th, tw, o)
    yh = jnp.swapaxes(yh, 2, 3)  # (t_b, n, th, m_i, tw, o)
    y = jnp.stack([_combine([yh[b] for b in range(t)], at[j])
                   for j in range(m)], axis=-2)  # (n, th, m_i, tw, m_j, o)
    return y.reshape(n, th * m, tw * m, y.shape[-1])[:, :h, :w]


def winograd_conv3x3(x: ConvInput, u: Array, bias: Array | None = None, *, m: int = 4) -> Array:
    """The 3x3 stride-1 'same' convolution (plus ``bias``) of ``x`` -- an NHWC array or the
    parts of a channel concatenation -- by F(m x m, 3 x 3), with the transformed kernel ``u``
    (:func:`transform_kernel` at the same ``m``). float32 in and out."""
    parts = input_parts(x)
    t = m + 2
    if u.shape[0] != t * t or u.shape[1] != sum(p.shape[-1] for p in parts):
        raise ValueError(f"transformed kernel {u.shape} does not fit F({m}x{m},3x3) of input "
                         f"channels {[p.shape[-1] for p in parts]}")
    n, h, w, _ = parts[0].shape
    th, tw = -(-h // m), -(-w // m)
    v = [_input_tiles(p, m, th, tw) for p in parts]
    v = v[0] if len(v) == 1 else jnp.concatenate(v, axis=-1)
    mm = jax.lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))),
                             preferred_element_type=jnp.float32)
    y = _output_tiles(mm, m, n, th, tw, h, w)
    return y if bias is None else y + bias.astype(y.dtype)


# ------------------------------------------------------------------------- the seam


def winograd_applies(x: ConvInput, kernel_shape, *, stride: int = 1, padding=None) -> bool:
    """Whether the conv is one Winograd F(m,3) computes here: 3x3, stride 1, 'same' padding,
    float32 input."""
    parts = input_parts(x)
    return (tuple(kernel_shape[:2]) == (3, 3) and stride == 1 and padding in (None, 1)
            and all(p.dtype == jnp.float32 for p in parts))


def choose(impl: str, x: ConvInput, kernel_shape, *, stride: int = 1, padding=None,
           backend: str | None = None) -> str:
    """The implementation that runs a conv: ``'xla'``, ``'winograd4'`` or ``'winograd2'``.

    ``'auto'``: on the CPU backend, F(4x4,3x3) for 3x3 stride-1 float32 convs whose output has
    at least :data:`AUTO_MIN_PIXELS` pixels per image (where it measured faster, see
    ``docs/performance.md``); plain XLA otherwise and on every other backend (GPU/TPU
    convolution libraries are the right path there)."""
    if impl not in IMPLS:
        raise ValueError(f"conv_impl must be one of {IMPLS}, got {impl!r}")
    if impl == "xla" or not winograd_applies(x, kernel_shape, stride=stride, padding=padding):
        return "xla"
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    n, h, w, _ = input_parts(x)[0].shape
    if backend == "cpu" and h * w >= AUTO_MIN_PIXELS:
        return "winograd4"
    return "xla"


AUTO_MIN_PIXELS = 12 * 12  # 'auto': smallest output (H*W per image) given to Winograd on CPU


def conv2d(x: ConvInput, kernel: Array, bias: Array | None = None, *, impl: str = "auto",
           stride: int = 1, padding: int | None = None, transformed: Array | None = None) -> Array:
    """``layers.conv2d`` (float32 inference) by the implementation :func:`choose` picks for
    ``impl``. ``transformed``: the kernel's precomputed ``transform_kernel(kernel, m)`` for the
    Winograd paths (computed here when None or of another tile size)."""
    which = choose(impl, x, kernel.shape, stride=stride, padding=padding)
    if which == "xla":
        return xla_conv2d(x, kernel, bias, stride=stride, padding=padding)
    m = TILE[which]
    u = transformed
    if u is None or u.shape[0] != (m + 2) ** 2:
        u = transform_kernel(kernel, m)
    return winograd_conv3x3(x, u, bias, m=m)
