"""unetpp-jax: UNet++ in JAX/Flax, UNET-ZOO-compatible, with fp16/int8 emulation and DSB2018 eval."""

__version__ = "0.1.0"
