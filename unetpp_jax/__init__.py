"""unetpp-jax: UNet++ in JAX/Flax, UNET-ZOO-compatible, with fp16/int8 emulation and DSB2018 eval.

``unetpp_jax.predict(images, ...)`` segments numpy images with the bundled model (see
:mod:`unetpp_jax.predict`); it is imported on first use, so ``import unetpp_jax`` stays light.
"""

__version__ = "0.1.0"


def __getattr__(name):
    if name == "predict":
        import importlib

        # The module itself, made callable: unetpp_jax.predict(images) is
        # unetpp_jax.predict.predict(images), before and after any `import unetpp_jax.predict`.
        return importlib.import_module("unetpp_jax.predict")
    raise AttributeError(f"module 'unetpp_jax' has no attribute {name!r}")
