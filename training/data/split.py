"""The training / validation split of a dataset's cases, the same for every task.

Why: each trainer picks its validation cases at random from one seed; with one
function the segmentation, nodule-branch, small-nodule and detection runs on a
dataset split it the same way for the same seed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["split_cases"]


def split_cases(n: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, validation) of ``n`` cases, each sorted; at least one of each (``n`` >= 2).

    ``round(val_fraction * n)`` cases (at least 1, at most ``n - 1``) are drawn for
    validation by a permutation from ``np.random.default_rng(seed)``.
    """
    if n < 2:
        raise ValueError(f"need at least 2 labelled cases (training + validation), got {n}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    order = np.random.default_rng(seed).permutation(n).tolist()
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    return sorted(order[n_val:]), sorted(order[:n_val])
