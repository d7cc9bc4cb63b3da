"""int8 calibration: per-site activation scales from fp32 runs, with the KL-divergence
thresholds of TVM/MXNet (``kl``) and TensorRT (``kl-trt``), max and percentile.

The fp32 model with ``numerics.Record`` sows every conv input (and every node output, for the
``requantize_concat_inputs`` option) and one jitted function per pass reduces them to per-site
statistics, so each batch is one compiled call: pass 1 gives max |x| per site, pass 2 (histogram
methods) a histogram per site over that range. The threshold per site then comes from
:func:`kl_threshold` (``kl``), :func:`kl_threshold_trt` (``kl-trt``),
:func:`percentile_threshold` or the max; the scale is ``T/128`` (TVM, ``kl``) or ``T/127``.

Calibrated scales are data, not static attributes: a tree in the ``'quant'`` collection that
mirrors ``params`` (``{'conv0_1': {'conv1_in': s, 'conv2_in': s, 'conv2_out': s}, ...,
'final4_in': s}``), read by ``numerics.Int8``, so new scales never recompile the model::

    calib = quant.calibrate(model, variables, images[:50], method="kl")
    m8 = with_numerics(model, "int8")
    probs = predict_fn(m8)(calib.attach(variables), images)

Which activations are rounded where, and how that relates to TVM and to QDQ runtimes, is in
``docs/quantization.md``.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from unetpp_jax.files import write_text_atomic
from unetpp_jax.inference import compiler_options, fold_batchnorm_variables
from unetpp_jax.numerics import (
    INT8_MAX,
    QUANT_COLLECTION,
    RECORD_COLLECTION,
    Record,
)

Array = jax.Array

METHODS = ("kl", "kl-trt", "max", "percentile")

KL_TVM_BINS = 8001  # TVM / MXNet: signed histogram over [-max|x|, max|x|]
KL_TVM_QUANTIZED_BINS = 255
KL_TVM_EPS = 1e-4  # smoothing of zero entries
KL_TRT_BINS = 2048  # TensorRT / pytorch-quantization: |x| histogram over [0, max|x|]
KL_TRT_LEVELS = 128  # 2 ** (8 - 1): signed int8
KL_TRT_START_BIN = 128


# ------------------------------------------------------------------- threshold methods


TIE_RTOL = 1e-11  # divergences this close count as equal minima (float64 error is ~3e-12)


def _argmin(divergence: np.ndarray, last: bool) -> int:
    """Index of the first (TVM) or last (pytorch-quantization) minimum, where values within
    ``TIE_RTOL`` of the minimum tie: mathematically equal candidates, summed in another order,
    must not be told apart by rounding."""
    tied = np.nonzero(divergence <= divergence.min() * (1 + TIE_RTOL) + 1e-15)[0]
    return int(tied[-1] if last else tied[0])


# Extended precision (80-bit on x86) for the sums of x log x that the divergences subtract:
# it keeps their rounding (~1e-11 relative in float64) far below the gaps between candidates.
_EXT = np.longdouble


def _xlogx(v: np.ndarray) -> np.ndarray:
    return np.where(v > 0, v * np.log(np.where(v > 0, v, 1)), 0)


def kl_threshold(hist, edges, num_quantized_bins: int = KL_TVM_QUANTIZED_BINS,
                 eps: float = KL_TVM_EPS) -> float:
    """TVM relay's KL-divergence threshold of a signed histogram (see
    :func:`tvm_kl_divergences`): the right edge ``edges[c + i + 1]`` of the candidate with the
    smallest divergence, the first one among equal minima (``std::min_element``; equal to
    ``TIE_RTOL``).

    TVM then uses the scale ``T / 128`` and clips to [-127, 127] (``_set_params``:
    ``valid_range = 2 ** 7``), see :func:`scale_from_threshold`.
    """
    stop, divergence = tvm_kl_divergences(hist, num_quantized_bins, eps)
    if stop.size == 0:
        return 0.0
    return float(np.asarray(edges)[stop[_argmin(divergence, last=False)]])


def tvm_kl_divergences(hist, num_quantized_bins: int = KL_TVM_QUANTIZED_BINS,
                       eps: float = KL_TVM_EPS) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate of TVM's ``MinimizeKL`` (``src/relay/quantize/calibrate.cc``, adapted
    there from MXNet's C++ calibrator): ``(edge index of its threshold, KL divergence)``.

    ``hist``: integer counts in an odd number of bins (TVM: 8001) over ``[-m, m]``. Restated
    (the code below is the same sum, vectorised over candidates): with ``c = n // 2`` the zero
    bin, for every ``i`` from ``num_quantized_bins // 2`` (127) to ``c`` the candidate keeps
    bins ``[c - i, c + i]`` (``L = 2i + 1`` of them) and its threshold is ``edges[c + i + 1]``:

    * ``p``: the kept bins, with every bin up to and including ``c - i`` summed into ``p[0]``
      and every bin right of ``c + i`` added to ``p[L - 1]``;
    * ``sliced``: the kept bins with ``sliced[0] = 0`` (TVM's loop sends bin ``c - i`` to
      ``p[0]`` only; MXNet's Python version keeps it -- this copies TVM);
    * ``sliced`` is merged into ``num_quantized_bins`` groups of ``L // num_quantized_bins``
      bins, the last group taking the remainder; ``q[k]`` = the group's sum / its number of
      non-zero ``sliced`` entries, for every ``k`` with ``p[k] != 0`` (0 elsewhere, and 0 in a
      group with no non-zero ``sliced`` entry);
    * both are smoothed: zero entries get ``eps``, non-zero ones lose ``eps * zeros /
      nonzeros``; an all-zero ``q`` gives divergence +inf;
    * divergence = KL(p / sum p || q / sum q).

    TVM computes in float32; this computes in float64 (extended precision for the sums that
    cancel; ~3e-12 relative), so an argmin can only differ on near-ties. The smoothing shift of the interior non-zero bins enters through a Taylor
    series of ``(h - e) log(h - e)`` around ``h`` (remainder below 1e-15 of each term); the
    few candidates with a larger shift (windows almost all empty) are summed directly.
    """
    h = np.asarray(hist, np.float64)
    n = h.size
    if n % 2 == 0:
        raise ValueError(f"the TVM KL method needs an odd number of bins (TVM: 8001), got {n}")
    total = h.sum()
    nq = num_quantized_bins
    c = n // 2
    i = np.arange(nq // 2, c + 1)
    if total <= 0 or i.size == 0:
        return np.zeros(0, np.int64), np.zeros(0)
    a, b, L = c - i, c + i + 1, 2 * i + 1
    ch = np.concatenate([[0.0], np.cumsum(h)])
    cn = np.concatenate([[0], np.cumsum(h != 0)])

    p0 = ch[a + 1]  # bins 0..a
    p_last = total - ch[b - 1]  # bin b-1 and the right outliers
    s_last = h[b - 1]

    # Groups of the slice: slice index k is histogram bin a + k, and slice[0] counts as 0.
    m = L // nq
    bounds = np.arange(nq + 1)[None, :] * m[:, None]
    bounds[:, -1] = L
    lo = np.maximum(bounds[:, :-1], 1) + a[:, None]
    hi = np.maximum(bounds[:, 1:], 1) + a[:, None]
    group_sum = ch[hi] - ch[lo]  # of `sliced`
    norm = (cn[hi] - cn[lo]).astype(np.float64)  # non-zero `sliced` entries
    # The same per group for p, which differs from `sliced` in its first and last entry only.
    p_sum = group_sum.copy()
    p_sum[:, 0] += p0
    p_sum[:, -1] += p_last - s_last
    p_nz = norm.copy()
    p_nz[:, 0] += p0 != 0
    p_nz[:, -1] += (p_last != 0).astype(np.float64) - (s_last != 0)

    has_q = norm > 0
    q_val = np.where(has_q, group_sum / np.where(has_q, norm, 1.0), 0.0)
    q_nz = np.where(has_q, p_nz, 0.0)  # q is non-zero exactly where p is, in such groups
    nz_p, nz_q = p_nz.sum(1), q_nz.sum(1)
    e_p = eps * (L - nz_p) / nz_p
    e_q = eps * (L - nz_q) / np.maximum(nz_q, 1)
    q_sum = (q_val * q_nz).sum(1)  # smoothing keeps the sums

    # sum_k p'_k log q'_k over the non-zero p (the zero ones give eps log eps - eps log eps):
    # q' = q - e_q where q != 0, else eps.
    weight = p_sum - e_p[:, None] * p_nz  # sum of p' per group
    log_q = np.log(np.where(has_q, q_val - e_q[:, None], eps))
    cross = (weight * log_q).astype(_EXT).sum(1)

    # sum_k p'_k log p'_k: the two end entries directly, the interior bins a+1..b-2 through
    # cumulative sums of the Taylor terms of (h - e) log(h - e) =
    # h log h - e (log h + 1) + sum_{k>=2} e^k / (k (k-1) h^(k-1)).
    ends = (np.where(p0 != 0, _xlogx(p0 - e_p), 0.0)
            + np.where(p_last != 0, _xlogx(p_last - e_p), 0.0))
    nz = h > 0
    safe = np.where(nz, h, 1.0).astype(_EXT)
    n_terms = 7
    terms = [_xlogx(h.astype(_EXT)), np.where(nz, np.log(safe) + 1, 0)]
    terms += [np.where(nz, safe ** (1 - k), 0.0) for k in range(2, n_terms)]
    # Bins c-i+1..c+i-1, summed outward from the zero bin (prefix sums, no cancellation).
    right = [np.concatenate([[0], np.cumsum(t[c:])]) for t in terms]
    left = [np.concatenate([[0], np.cumsum(t[c - 1::-1])]) for t in terms]
    inner = [r[i] + l_[i - 1] for r, l_ in zip(right, left)]
    interior = inner[0] - e_p * inner[1]
    for k in range(2, n_terms):
        interior = interior + e_p ** k / (k * (k - 1)) * inner[k]
    for t in np.nonzero(e_p / h[nz].min() > 1e-2)[0]:  # series too slow there: sum directly
        w = h[a[t] + 1:b[t] - 1]
        interior[t] = _xlogx(w[w > 0].astype(_EXT) - e_p[t]).sum()

    with np.errstate(divide="ignore", invalid="ignore"):
        divergence = (ends + interior - cross) / total + np.log(q_sum / total)
    return b, np.where(nz_q > 0, divergence.astype(np.float64), np.inf)


def kl_threshold_trt(hist, edges, num_levels: int = KL_TRT_LEVELS,
                     start_bin: int = KL_TRT_START_BIN) -> float:
    """TensorRT's entropy threshold of a |x| histogram over [0, max], as NVIDIA
    pytorch-quantization restates it (see :func:`trt_kl_divergences`): ``edges[i]``, the right
    edge of the last kept bin, for the candidate with the smallest divergence -- the *last*
    (largest ``i``) among equal minima (to ``TIE_RTOL``), as there. The scale is ``T / 127``.
    """
    i, divergence = trt_kl_divergences(hist, num_levels, start_bin)
    if i.size == 0:
        return 0.0
    return float(np.asarray(edges)[i[_argmin(divergence, last=True)]])


def trt_kl_divergences(hist, num_levels: int = KL_TRT_LEVELS,
                       start_bin: int = KL_TRT_START_BIN) -> tuple[np.ndarray, np.ndarray]:
    """Every candidate of pytorch-quantization's ``_compute_amax_entropy``
    (``calib/histogram.py``): ``(number of kept bins i, KL divergence)``.

    Restated: the first bin's count is replaced by the second's (``bins[0] = bins[1]``, which
    drops the spike of exact zeros that ReLU outputs put there); for every ``i`` from
    ``start_bin`` (128) to the number of bins (2048):

    * ``P`` = the first ``i`` bins, with the count of every bin >= ``i`` added to bin ``i - 1``;
    * bin ``t < i`` belongs to level ``floor(t * num_levels / i)`` (``np.digitize`` on
      ``linspace(0, i, num_levels + 1)``; 128 levels = signed int8); ``Q[t]`` = the mean count
      of the non-empty bins of its level where bin ``t`` is non-empty, 0 where it is empty;
    * divergence = KL(P / sum P || Q / sum Q) (scipy's ``entropy``): +inf where ``Q`` is 0 and
      ``P`` is not; an all-zero ``Q`` (NaN there) also counts as +inf here. No smoothing.
    """
    bins = np.asarray(hist, np.float64).copy()
    n = bins.size
    if n < start_bin:
        raise ValueError(f"need at least start_bin={start_bin} bins, got {n}")
    bins[0] = bins[1]
    total = bins.sum()
    i = np.arange(start_bin, n + 1)
    if total <= 0:
        return np.zeros(0, np.int64), np.zeros(0)
    cb = np.concatenate([[0.0], np.cumsum(bins)])
    cn = np.concatenate([[0], np.cumsum(bins != 0)])
    cx = np.concatenate([[0], np.cumsum(_xlogx(bins.astype(_EXT)))])

    k = np.arange(num_levels + 1)
    first = -((-k[None, :] * i[:, None]) // num_levels)  # first bin of level k: ceil(k i / L)
    level_sum = cb[first[:, 1:]] - cb[first[:, :-1]]
    level_nz = cn[first[:, 1:]] - cn[first[:, :-1]]
    last = bins[i - 1]  # bin i-1 is always in the last level
    below = level_sum.copy()
    below[:, -1] -= last  # level sums over the bins t < i-1
    mean = np.where(level_nz > 0, level_sum / np.maximum(level_nz, 1), 1.0)
    q_sum = cb[i]
    p_last = last + (total - cb[i])
    with np.errstate(divide="ignore", invalid="ignore"):
        log_q = np.log(mean) - np.log(q_sum)[:, None]  # log Q per level
        # sum_{t < i-1} bins_t (log(bins_t / total) - log Q_t), then bin i-1 with the outliers
        cross = np.where(below > 0, below * log_q, 0).astype(_EXT).sum(1)
        body = cx[i - 1] - np.log(_EXT(total)) * cb[i - 1] - cross
        tail = np.where(last > 0, p_last * (np.log(p_last / total) - log_q[:, -1]), np.inf)
        divergence = (body + np.where(p_last > 0, tail, 0.0)) / total
    return i, np.where(q_sum > 0, divergence.astype(np.float64), np.inf)


def percentile_threshold(hist, edges, percentile: float = 99.99) -> float:
    """pytorch-quantization's ``_compute_amax_percentile`` on a |x| histogram: the edge
    ``edges[j]`` at the first bin ``j`` where the cumulative fraction reaches ``percentile``%."""
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    hist = np.asarray(hist, np.float64)
    if hist.sum() <= 0:
        return 0.0
    cdf = np.cumsum(hist / hist.sum())
    return float(np.asarray(edges)[np.searchsorted(cdf, percentile / 100)])


def scale_from_threshold(method: str, threshold: float, amax: float) -> float:
    """The int8 scale of a site: TVM's ``T / 128`` for ``kl``, ``T / 127`` otherwise.

    A site that never saw a non-zero value gets scale 1 (every value is 0 on any grid).
    """
    if threshold <= 0:
        threshold = amax
    if threshold <= 0:
        return 1.0
    return threshold / (128.0 if method == "kl" else float(INT8_MAX))


def histogram_edges(kind: str, amax: float) -> np.ndarray:
    """Bin edges of the calibration histograms: 8001 bins over [-amax, amax] (``'signed'``,
    TVM's ``np.histogram(range=(-m, m))``) or 2048 over [0, amax] (``'abs'``)."""
    if kind == "signed":
        return np.linspace(-amax, amax, KL_TVM_BINS + 1)
    return np.linspace(0.0, amax, KL_TRT_BINS + 1)


def _histogram(x: Array, kind: str, amax: Array, valid: Array) -> Array:
    """Counts of ``x`` in the bins of :func:`histogram_edges` (values beyond ``amax`` in the
    outer bins; rows of the batch with ``valid`` False not counted). Bin ``j`` is
    ``[e_j, e_{j+1})`` as in ``np.histogram``, up to float32 rounding at the edges."""
    amax = jnp.where(amax > 0, amax, 1.0)
    if kind == "signed":
        n = KL_TVM_BINS
        pos = (x + amax) * (n / (2 * amax))
    else:
        n = KL_TRT_BINS
        pos = jnp.abs(x) * (n / amax)
    idx = jnp.clip(jnp.floor(pos), 0, n - 1).astype(jnp.int32)
    idx = jnp.where(valid.reshape((-1,) + (1,) * (x.ndim - 1)), idx, n)  # padding -> dropped bin
    return jnp.bincount(idx.ravel(), length=n + 1)[:n]


def _unwrap_sown(tree):
    """``sow`` stores a tuple per site; keep its single value."""
    return jax.tree_util.tree_map(lambda t: t[0], tree, is_leaf=lambda t: isinstance(t, tuple))


def _batch_statistics_impl(recording_model, stat: str, variables, images, n_valid, ranges):
    """One batch through the recording model, reduced per site: max |x| (``stat='max'``) or
    a histogram (``'signed'`` / ``'abs'``) over ``[-range, range]`` / ``[0, range]``."""
    _, state = recording_model.apply(variables, images, mutable=[RECORD_COLLECTION])
    acts = _unwrap_sown(state[RECORD_COLLECTION])
    valid = jnp.arange(images.shape[0]) < n_valid
    if stat == "max":
        mask = lambda x: valid.reshape((-1,) + (1,) * (x.ndim - 1))
        return jax.tree_util.tree_map(lambda x: jnp.max(jnp.where(mask(x), jnp.abs(x), 0.0)),
                                      acts)
    return jax.tree_util.tree_map(lambda x, r: _histogram(x, stat, r, valid), acts, ranges)


@functools.lru_cache(maxsize=None)
def _batch_statistics_program():
    opts = compiler_options()
    return jax.jit(_batch_statistics_impl, static_argnames=("recording_model", "stat"),
                   **({"compiler_options": opts} if opts else {}))


# ------------------------------------------------------------------------- calibration


CALIBRATION_FORMAT = "unetpp-jax-calibration"
CALIBRATION_FORMAT_VERSION = 1
CALIBRATION_JSON = "calibration.json"
SCALES_DIR = "scales"  # an orbax PyTree checkpoint of the scales, the 'quant' tree as used


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Calibrated int8 activation scales and how they were obtained.

    ``scales``, ``thresholds`` and ``amax`` are trees mirroring ``params`` with one entry per
    site (``'conv0_1': {'conv1_in', 'conv2_in', 'conv2_out'}``, ``'final4_in'``, ...): the
    scale ``s`` of the int8 grid, the clipping threshold ``T`` it came from, and the largest
    |x| seen. ``scales`` holds float32 arrays; the others Python floats.

    Provenance: ``options`` (the method's settings: batch size, percentile), ``images_sha256``
    (of the float32 calibration images as given), ``weights_sha256`` (of the variables it was
    computed from, :func:`weights_fingerprint`; empty when unknown), ``created`` (UTC), and,
    once saved or loaded, ``path`` and ``reused`` (True when :func:`load_or_calibrate` found it
    rather than computing it).
    """

    method: str
    scales: Mapping[str, Any]
    thresholds: Mapping[str, Any]
    amax: Mapping[str, Any]
    num_images: int
    seconds: float
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    images_sha256: str = ""
    weights_sha256: str = ""
    created: str = ""
    path: str | None = None
    reused: bool = False

    def attach(self, variables: Mapping[str, Any]) -> dict:
        """``variables`` with the scales in the ``'quant'`` collection, for the int8 model
        (anything already there, e.g. precomputed int8 weights, is kept)."""
        from unetpp_jax.numerics import merge_trees

        quant = merge_trees(dict(variables.get(QUANT_COLLECTION, {})), dict(self.scales))
        return {**variables, QUANT_COLLECTION: quant}

    def sites(self) -> list[str]:
        """Every site, ``'conv0_1/conv1_in'``, in tree order."""
        return list(_flatten(self.thresholds))

    def conv_paths(self) -> list[str]:
        """The conv of every input site (``'conv0_1/conv1'``, ``'final4'``): the convs int8
        quantizes, as ``numerics.conv_path`` names them."""
        return [s[:-len("_in")] for s in self.sites() if s.endswith("_in")]

    def summary(self) -> dict:
        """JSON-ready description (method, images, seconds, provenance, per-site scale,
        threshold and max)."""
        flat_t = _flatten(self.thresholds)
        flat_m = _flatten(self.amax)
        flat_s = _flatten(self.scales)
        return {"method": self.method, "num_images": self.num_images,
                "seconds": round(self.seconds, 3), "options": dict(self.options),
                "images_sha256": self.images_sha256, "weights_sha256": self.weights_sha256,
                "created": self.created,
                "sites": {k: {"scale": float(flat_s[k]), "threshold": flat_t[k],
                              "amax": flat_m[k]} for k in flat_t}}

    def provenance(self) -> dict:
        """What an evaluation records about the calibration it used."""
        return {"method": self.method, "num_images": self.num_images,
                "seconds": round(self.seconds, 3), "options": dict(self.options),
                "path": self.path, "reused": self.reused, "created": self.created,
                "images_sha256": self.images_sha256}

    def save(self, directory) -> Path:
        """Write the calibration atomically to ``directory``: the scales as an orbax PyTree
        checkpoint (``scales/``) and ``calibration.json`` (format marker, provenance and every
        site's scale, threshold and max, exactly: Python floats round-trip through JSON). An
        existing calibration there is replaced. Returns the absolute path."""
        import orbax.checkpoint as ocp

        directory = Path(directory).expanduser().absolute()
        directory.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": CALIBRATION_FORMAT, "format_version": CALIBRATION_FORMAT_VERSION,
               **self.summary(), "seconds": self.seconds,
               "thresholds": self.thresholds, "amax": self.amax}
        text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-{os.getpid()}-",
                                    dir=directory.parent))
        try:
            os.chmod(tmp, 0o755)
            host = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), dict(self.scales))
            ocp.PyTreeCheckpointer().save(tmp / SCALES_DIR, host)
            write_text_atomic(tmp / CALIBRATION_JSON, text)
            old = None
            if directory.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-{os.getpid()}-",
                                            dir=directory.parent))
                os.replace(directory, old)
            os.replace(tmp, directory)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def load(cls, directory) -> "Calibration":
        """The calibration :meth:`save` wrote to ``directory`` (``path`` set, ``reused`` True)."""
        import orbax.checkpoint as ocp

        directory = Path(directory).expanduser().absolute()
        file = directory / CALIBRATION_JSON
        try:
            doc = json.loads(file.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{directory}: no saved calibration ({CALIBRATION_JSON})") \
                from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: invalid JSON ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"{file}: not a {CALIBRATION_FORMAT} file")
        if doc.get("format_version", 0) > CALIBRATION_FORMAT_VERSION:
            raise ValueError(f"{file}: written by a newer version")
        restored = ocp.PyTreeCheckpointer().restore(directory / SCALES_DIR)
        scales = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), restored)
        return cls(method=doc["method"], scales=scales, thresholds=doc["thresholds"],
                   amax=doc["amax"], num_images=int(doc["num_images"]),
                   seconds=float(doc["seconds"]), options=doc.get("options", {}),
                   images_sha256=doc.get("images_sha256", ""),
                   weights_sha256=doc.get("weights_sha256", ""),
                   created=doc.get("created", ""), path=str(directory), reused=True)


def _flatten(tree) -> dict[str, Any]:
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {"/".join(str(k.key) for k in path): leaf for path, leaf in leaves}


def _padded_batches(images: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
    """Equal-size batches of at most ``batch_size`` (the last one zero-padded) with their
    number of real images: every batch has one shape, so each pass compiles once, and the
    sizes are balanced (50 images at 16 -> 4 x 13) so little padding is computed."""
    n_batches = -(-len(images) // batch_size)
    size = -(-len(images) // n_batches)
    for start in range(0, len(images), size):
        batch = images[start:start + size]
        n = len(batch)
        if n < size:
            batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), batch.dtype)])
        yield batch, n


def site_statistics(model, variables: Mapping[str, Any], images, histogram: str | None = None,
                    *, batch_size: int = 16,
                    progress: Callable[[str, int, int], None] | None = None):
    """Max |x| per calibration site over ``images`` and, with ``histogram='signed'`` or
    ``'abs'``, a histogram per site over that range (:func:`histogram_edges`).

    One jitted call per batch and pass (all batches have one shape, so each pass compiles
    once). Returns ``(amax, hists)``: trees mirroring ``params`` of Python floats and of int64
    numpy counts (``None`` without ``histogram``).
    """
    images = np.asarray(images, np.float32)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected a non-empty NHWC batch of images, got shape {images.shape}")
    recorder = model.clone(numerics=Record())
    variables = {k: v for k, v in variables.items() if k != QUANT_COLLECTION}
    # Fold once, not inside each of the (up to two) passes over every batch.
    variables = fold_batchnorm_variables(variables)
    batches = list(_padded_batches(images, batch_size))

    def run(pass_name, stat, ranges, combine):
        acc = None
        for done, (batch, n) in enumerate(batches, 1):
            out = _batch_statistics_program()(recorder, stat, variables, jnp.asarray(batch),
                                    jnp.int32(n), ranges)
            acc = out if acc is None else jax.tree_util.tree_map(combine, acc, out)
            if progress is not None:
                progress(pass_name, done, len(batches))
        return acc

    amax_dev = run("max", "max", None, jnp.maximum)
    amax = jax.tree_util.tree_map(float, jax.device_get(amax_dev))
    if histogram is None:
        return amax, None
    # int32 counts per batch, summed in int64 on the host (numpy on both sides: numpy + jax
    # array would give a jax array, in int32).
    hists = run("histogram", histogram, amax_dev,
                lambda acc, h: np.asarray(acc, np.int64) + np.asarray(h, np.int64))
    return amax, jax.tree_util.tree_map(lambda h: np.asarray(h, np.int64), hists)


def calibrate(model, variables: Mapping[str, Any], images, method: str = "kl", *,
              batch_size: int = 16, percentile: float = 99.99,
              progress: Callable[[str, int, int], None] | None = None) -> Calibration:
    """Per-site int8 activation scales of ``model`` from fp32 runs over ``images``.

    Args:
      model: a ``UNetPlusPlus`` (its ``numerics`` is replaced by :class:`Record`).
      variables: ``{'params', 'batch_stats'}`` (any ``'quant'`` entry is ignored).
      images: NHWC float array, preprocessed exactly as for evaluation (the vendor used 50
        validation images).
      method: ``'kl'`` (TVM/MXNet, the default: the vendor's compiler is TVM-derived),
        ``'kl-trt'`` (TensorRT / pytorch-quantization), ``'max'`` or ``'percentile'``.
      batch_size: images per jitted call; the last batch is padded, so there is one compile
        per pass.
      percentile: for ``method='percentile'`` (pytorch-quantization's default 99.99).
      progress: optional ``callback(pass_name, batches_done, batches_total)``.

    Pass 1 finds max |x| per site; for the histogram methods pass 2 bins every site over that
    range (8001 signed bins for ``kl``, as TVM bins all calibration activations at once;
    2048 |x| bins for ``kl-trt`` and ``percentile``), see :func:`site_statistics`.
    """
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {METHODS}")
    t0 = time.perf_counter()
    kind = {"kl": "signed", "kl-trt": "abs", "percentile": "abs"}.get(method)
    amax, hists = site_statistics(model, variables, images, kind, batch_size=batch_size,
                                  progress=progress)
    if method == "max":
        thresholds = amax
    else:
        def threshold(h, m):
            edges = histogram_edges(kind, m)
            if method == "kl":
                return kl_threshold(h, edges)
            if method == "kl-trt":
                return kl_threshold_trt(h, edges)
            return percentile_threshold(h, edges, percentile)

        # numpy releases the GIL in its array loops: the sites run two at a time.
        leaves, treedef = jax.tree_util.tree_flatten(hists)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            found = list(pool.map(threshold, leaves, treedef.flatten_up_to(amax)))
        thresholds = jax.tree_util.tree_unflatten(treedef, found)
    scales = jax.tree_util.tree_map(
        lambda t, m: jnp.float32(scale_from_threshold(method, t, m)), thresholds, amax)
    options = {"batch_size": batch_size}
    if method == "percentile":
        options["percentile"] = percentile
    return Calibration(method=method, scales=scales, thresholds=thresholds, amax=amax,
                       num_images=len(np.asarray(images)), seconds=time.perf_counter() - t0,
                       options=options, images_sha256=images_fingerprint(images),
                       weights_sha256=weights_fingerprint(variables),
                       created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


# ------------------------------------------------------------------ saved calibrations


def images_fingerprint(images) -> str:
    """sha256 of the calibration images as float32 NHWC (shape included)."""
    a = np.ascontiguousarray(np.asarray(images, np.float32))
    h = hashlib.sha256(repr(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def weights_fingerprint(variables: Mapping[str, Any]) -> str:
    """sha256 of ``params`` and ``batch_stats`` (paths, dtypes, shapes and bytes): what the
    scales were computed from. A replaced checkpoint gets a new fingerprint, so its stale
    calibrations are never reused."""
    h = hashlib.sha256()
    tree = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{jax.tree_util.keystr(path)}:{a.dtype}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def user_cache_dir() -> Path:
    """``$UNETPP_JAX_CACHE``, else ``$XDG_CACHE_HOME/unetpp-jax``, else ``~/.cache/unetpp-jax``."""
    if os.environ.get("UNETPP_JAX_CACHE"):
        return Path(os.environ["UNETPP_JAX_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "unetpp-jax"


def calibration_key(method: str, num_images: int, images_sha256: str,
                    percentile: float | None = None) -> str:
    """The directory name of a calibration: ``<method>-<n>-<images sha256[:12]>`` (with the
    percentile for ``percentile``), so different image sets never share one."""
    m = f"percentile{percentile:g}" if method == "percentile" else method
    return f"{m}-{num_images}-{images_sha256[:12]}"


def _writable_dir(path: Path) -> bool:
    p = path
    while not p.exists():
        p = p.parent
    return p.is_dir() and os.access(p, os.W_OK)


def calibration_root(checkpoint_path, weights_sha256: str) -> Path:
    """Where the calibrations of a checkpoint live: ``<checkpoint>/calibration/`` when the
    checkpoint is a writable directory outside the installed package; else (the bundled
    weights, a read-only checkpoint, no path) ``<user cache>/calibration/<weights
    sha256[:16]>/`` (:func:`user_cache_dir`)."""
    from unetpp_jax.pretrained import bundled_checkpoint_path

    if checkpoint_path is not None:
        ck = Path(checkpoint_path).expanduser().absolute()
        package = bundled_checkpoint_path().parent.parent.parent.absolute()
        if ck.is_dir() and package not in ck.parents and _writable_dir(ck / "calibration"):
            return ck / "calibration"
    return user_cache_dir() / "calibration" / weights_sha256[:16]


def load_or_calibrate(checkpoint_path, model, variables: Mapping[str, Any], images,
                      method: str = "kl", *, batch_size: int = 16, percentile: float = 99.99,
                      progress: Callable[[str, int, int], None] | None = None,
                      recalibrate: bool = False, log: Callable[[str], None] | None = None
                      ) -> Calibration:
    """The calibration of ``checkpoint_path``'s ``variables`` on ``images`` with ``method``:
    loaded when saved before (same weights, same images, same method and percentile), else
    computed with :func:`calibrate` and saved (:meth:`Calibration.save`) under
    :func:`calibration_root` / :func:`calibration_key`. ``checkpoint_path`` None: the bundled
    weights (saved in the user cache). ``recalibrate``: compute and replace even if saved.
    The result's ``path`` and ``reused`` say which happened; a calibration that cannot be
    saved (no writable place) is returned unsaved, ``path`` None, with a note through ``log``.
    """
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; expected one of {METHODS}")
    images = np.asarray(images, np.float32)
    images_sha = images_fingerprint(images)
    weights_sha = weights_fingerprint(variables)
    root = calibration_root(checkpoint_path, weights_sha)
    directory = root / calibration_key(method, len(images), images_sha,
                                       percentile if method == "percentile" else None)
    if not recalibrate and (directory / CALIBRATION_JSON).is_file():
        try:
            found = Calibration.load(directory)
        except (OSError, ValueError, KeyError) as e:
            found = None
            if log:
                log(f"ignoring the unreadable calibration at {directory}: {e}")
        if found is not None and found.images_sha256 == images_sha and (
                found.weights_sha256 == weights_sha):
            return found
        if found is not None and log:
            log(f"the calibration at {directory} was made from other weights or images: "
                "calibrating again")
    calib = calibrate(model, variables, images, method, batch_size=batch_size,
                      percentile=percentile, progress=progress)
    try:
        path = calib.save(directory)
    except OSError as e:
        if log:
            log(f"could not save the calibration to {directory}: {e}")
        return calib
    return dataclasses.replace(calib, path=str(path), reused=False)
