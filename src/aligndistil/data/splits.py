"""Holding out part of a dataset as an eval set, deterministically.

``data.eval_split_ratio`` takes its eval set from the training data itself (what
``datasets.Dataset.train_test_split(test_size=ratio, seed=seed)`` does for TRL users): the
held-out examples depend only on the number of usable examples, the ratio and the seed, so
a resumed run, and every process of a multi-process run, hold out the same ones.
"""

from __future__ import annotations

import math
import random

from aligndistil.data.records import DataError


def holdout_split(n: int, ratio: float, seed: int, where: str = "the data") -> tuple[list[int], list[int]]:
    """Split ``range(n)`` into ``(train, held_out)`` indices.

    ``ceil(ratio * n)`` indices are held out (at least one, as ``train_test_split`` rounds a
    fractional test size up), chosen by ``random.Random(seed)`` (its ``sample`` is stable
    across Python versions for an integer seed); both lists keep the original order.

    Args:
        n: number of usable examples.
        ratio: the held-out fraction, in ``(0, 1)``.
        seed: ``train.seed``.
        where: the data's name, for the error.

    Raises:
        ValueError: ``ratio`` outside ``(0, 1)``.
        DataError: the split would leave no training example.
    """
    if not 0 < ratio < 1:
        raise ValueError(f"the held-out ratio must be in (0, 1), got {ratio!r}")
    n_eval = math.ceil(ratio * n)
    if n - n_eval < 1:
        raise DataError(f"{where}: holding out {n_eval} of {n} usable examples (data.eval_split_ratio={ratio}) "
                        "leaves none to train on; lower the ratio or give data.eval_file")
    held = set(random.Random(seed).sample(range(n), n_eval))
    return [i for i in range(n) if i not in held], sorted(held)
