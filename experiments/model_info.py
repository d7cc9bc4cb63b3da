"""Parameter count, FLOPs and fp32 inference throughput of UNet++ next to the model-zoo card.

    python -m experiments.model_info [--batch 16] [--size 96] [--repeats 5]
"""

from __future__ import annotations

import argparse

import jax

from experiments.benchmark import forward_timing
from unetpp_jax.card import CARD_GFLOPS, CARD_PARAMS_M
from unetpp_jax.counting import conv_macs, count_params, xla_flops
from unetpp_jax.model import UNetPlusPlus, init_variables


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=16, help="batch for the throughput run (default 16)")
    ap.add_argument("--size", type=int, default=96, help="input height = width (default 96)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls after warm-up (median)")
    ap.add_argument("--no-speed", action="store_true", help="skip the throughput measurement")
    args = ap.parse_args(argv)

    model = UNetPlusPlus()
    v = init_variables(model)
    params = count_params(v["params"])
    params_1 = count_params(init_variables(UNetPlusPlus(deep_supervision=False))["params"])
    flops = xla_flops(model, v, (1, args.size, args.size, 3))
    macs = conv_macs(height=args.size, width=args.size)
    print(f"UNet++ (UNET-ZOO NestedUNet), input 3x{args.size}x{args.size}, JAX {jax.__version__} "
          f"on {jax.devices()[0].device_kind}")
    print(f"{'':28s}{'ours':>12s}{'card':>12s}")
    print(f"{'Params (M), 4 heads':28s}{params / 1e6:12.3f}{CARD_PARAMS_M:12.3f}   ({params:,}; one head: {params_1:,})")
    print(f"{'FLOPs (G), XLA cost':28s}{flops / 1e9:12.3f}{CARD_GFLOPS:12.3f}")
    print(f"{'2 x conv MACs (G)':28s}{2 * macs / 1e9:12.3f}")
    print("FLOPs conventions: XLA counts a multiply-add as 2, adds the elementwise ops and skips "
          "the zero-padding taps (BN folded);\n  '2 x conv MACs' counts every 3x3 tap of the convs "
          "only; the card's 10.897 is an old thop op count x 2 / 0.9e9 on a one-head graph.")
    if not args.no_speed:
        t = forward_timing(model, v, batch=args.batch, size=args.size, repeats=args.repeats)
        print(f"fp32 inference, batch {args.batch}: {t.per_item(args.batch):.1f} images/s "
              f"(median of {t.repeats}, {t.median_s * 1e3:.0f} ms/batch; compile {t.compile_s:.1f} s)")


if __name__ == "__main__":
    main()
