"""Group-aware stratified splits: near-duplicate groups never straddle train/test or any CV fold."""

from __future__ import annotations

from typing import List, Tuple

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold


def holdout_split(labels: np.ndarray, groups: np.ndarray, test_fraction: float, seed: int
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx): stratified by class, whole groups on one side."""
    n_splits = max(2, int(round(1.0 / test_fraction)))
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    train_idx, test_idx = next(sgkf.split(np.zeros(len(labels)), labels, groups))
    return np.sort(train_idx), np.sort(test_idx)


def kfold(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    return [(np.sort(a), np.sort(b)) for a, b in sgkf.split(np.zeros(len(labels)), labels, groups)]
