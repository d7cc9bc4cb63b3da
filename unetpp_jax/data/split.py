"""The UNET-ZOO / pytorch-nested-unet train/validation split of DSB2018 stage1_train.

Both repositories call ``train_test_split(img_ids, test_size=0.2, random_state=41)`` on the
image ids. With ids sorted ascending (the glob order it relies on) this is
``perm = RandomState(41).permutation(n)``: validation = the first ``ceil(0.2 n)`` entries of
``perm`` (134 of 670), training = the rest, both in ``perm`` order (pytorch-nested-unet's train.py). The
training order matters: UNET-ZOO trains unshuffled, in exactly this order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

__all__ = ["FIRST_VAL_ID_PREFIX", "NUM_IDS", "NUM_TRAIN", "NUM_VAL", "SPLIT_SEED", "VAL_FRACTION", "split_ids"]

SPLIT_SEED = 41
VAL_FRACTION = 0.2
#: Number of images in stage1_train and the resulting split sizes.
NUM_IDS, NUM_TRAIN, NUM_VAL = 670, 536, 134
#: The first validation id of the reference split (a cheap check that the rule was applied).
FIRST_VAL_ID_PREFIX = "337b6eed0726"


def split_ids(ids: Iterable[str]) -> tuple[list[str], list[str]]:
    """Split image ids into ``(train_ids, val_ids)`` by the UNET-ZOO rule.

    Args:
      ids: image ids in any order (they are sorted first); duplicates are an error.

    Returns:
      ``(train_ids, val_ids)`` in permutation order, of sizes ``n - ceil(0.2 n)`` and
      ``ceil(0.2 n)`` -- 536 and 134 for the 670 stage1_train ids.
    """
    ids = sorted(ids)
    if len(set(ids)) != len(ids):
        raise ValueError("split_ids: duplicate image ids")
    n = len(ids)
    n_val = math.ceil(VAL_FRACTION * n)  # scikit-learn's rule for a float test_size
    perm = np.random.RandomState(SPLIT_SEED).permutation(n)
    val = [ids[i] for i in perm[:n_val]]
    train = [ids[i] for i in perm[n_val:]]
    return train, val
