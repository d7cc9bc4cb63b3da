"""The PyTorch twin moved to ``experiments/torch_twin.py`` (shared with ``experiments.bench``).

Kept so that tests importing ``torch_twin`` from this folder keep working; import
``experiments.torch_twin`` in new code.
"""

from experiments.torch_twin import WIDTHS, NestedUNet, VGGBlock, from_flax, randomize_batchnorm  # noqa: F401
