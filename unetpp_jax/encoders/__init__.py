"""Encoders: the feature pyramid a decoder reads, one file per family and one entry in
:data:`ENCODERS`.

An encoder is a function called inside the model's compact ``__call__``::

    features = encoder(module, x, widths=..., numerics=..., train=...)

It creates its layers as submodules of ``module`` (so their parameter names are the ones the
PyTorch checkpoints use) and returns the pyramid, finest first: ``features[i]`` has stride
``2**i`` and ``widths[i]`` channels. Every conv goes through ``layers.conv_bn`` (BatchNorm
folded for inference, ``numerics`` with a role), so precisions and calibration apply unchanged.

Adding an encoder: a file in this package with such a function, and a line in ``ENCODERS``.
"""

from __future__ import annotations

import functools

from unetpp_jax.encoders import resnet, vgg

ENCODERS = {
    "vgg": vgg.vgg_encoder,  # UNET-ZOO / pytorch-nested-unet: a column of VGG blocks, 2x2 max-pool
    # torchvision ResNets (segmentation_models_pytorch's resnet* encoders); features[0] is the
    # input itself, as in smp
    "resnet18": functools.partial(resnet.resnet_encoder, arch="resnet18"),
    "resnet34": functools.partial(resnet.resnet_encoder, arch="resnet34"),
    "resnet50": functools.partial(resnet.resnet_encoder, arch="resnet50"),
    "resnet101": functools.partial(resnet.resnet_encoder, arch="resnet101"),
    "resnet152": functools.partial(resnet.resnet_encoder, arch="resnet152"),
}


def get_encoder(name: str):
    """The encoder function registered as ``name``."""
    try:
        return ENCODERS[name]
    except KeyError:
        raise ValueError(f"unknown encoder {name!r}; registered: {sorted(ENCODERS)}") from None
