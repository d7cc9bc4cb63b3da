"""The vendor model-zoo card this project reproduces (DSB2018, 3x96x96): its rows, one home.

MIoU is the card's metric (``metrics.miou_foreground`` x 100, last head). The FLOPs figure is an
old thop operation count x2 / 0.9e9 on a one-head graph, not comparable with XLA's count.
"""

CARD_SHAPE = "3x96x96"
CARD_GFLOPS = 10.897
CARD_PARAMS_M = 9.163

# precision -> (code source as the card writes it, MIoU)
CARD_ROWS = {
    "fp32": ("UNET-ZOO (PyTorch)", 84.164),
    "fp16": ("vendor fp16", 83.179),
    "int8": ("vendor int8, kl_divergence", 83.052),
}
