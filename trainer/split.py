"""Group-aware stratified splits: near-duplicate groups never straddle train/test or any CV fold.

The held-out split is a stratified *group shuffle* split: groups are visited in a seeded random order
and a group joins the test side while that brings its class closer to ``round(test_fraction x n_class)``
images (at least one), never emptying the class's training side. So the test share per class is the
requested fraction up to one group's size (exact when there are no near duplicates), unlike
k-fold-based splits whose share is 1/round(1/fraction). CV folds use sklearn's StratifiedGroupKFold.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold

from trainer.errors import DataError


def holdout_split(labels: np.ndarray, groups: np.ndarray, test_fraction: float, seed: int
                  ) -> Tuple[np.ndarray, np.ndarray]:
    """(train_idx, test_idx): stratified by class, whole groups on one side."""
    labels = np.asarray(labels)
    groups = np.asarray(groups)
    classes, class_counts = np.unique(labels, return_counts=True)
    n_class = dict(zip(classes.tolist(), class_counts.tolist()))
    target = {c: max(1, int(round(test_fraction * n))) for c, n in n_class.items()}
    members: Dict[int, List[int]] = {}
    for i, g in enumerate(groups.tolist()):
        members.setdefault(int(g), []).append(i)
    order = sorted(members)
    rng = np.random.default_rng(seed)
    in_test = {c: 0 for c in n_class}
    test: List[int] = []
    for gi in rng.permutation(len(order)):
        idx = members[order[int(gi)]]
        per_class: Dict[int, int] = {}
        for i in idx:
            per_class[int(labels[i])] = per_class.get(int(labels[i]), 0) + 1
        closer = all(abs(in_test[c] + k - target[c]) < abs(in_test[c] - target[c]) for c, k in per_class.items())
        keeps_train = all(n_class[c] - in_test[c] - k >= 1 for c, k in per_class.items())
        if closer and keeps_train:
            test.extend(idx)
            for c, k in per_class.items():
                in_test[c] += k
    test_idx = np.array(sorted(test), np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), test_idx).astype(np.int64)
    return train_idx, test_idx


def check_split(labels: np.ndarray, groups: np.ndarray, train_idx: np.ndarray, test_idx: np.ndarray,
                class_names: Sequence[str], folds: int) -> None:
    """Every class needs >= 1 held-out test image and, for k-fold CV, >= k distinct groups in training."""
    for c, name in enumerate(class_names):
        n_test = int((labels[test_idx] == c).sum())
        train_groups = len(set(groups[train_idx][labels[train_idx] == c].tolist()))
        if n_test == 0:
            raise DataError(f"class {name!r} has no image in the held-out test split (it has "
                            f"{train_groups} distinct image(s)): add images of {name!r} or raise --test-fraction")
        if folds >= 2 and train_groups < folds:
            raise DataError(f"class {name!r} keeps only {train_groups} distinct image(s) for training after "
                            f"{n_test} went to the test split; {folds}-fold cross-validation needs at least "
                            f"{folds}: add images of {name!r} or lower --folds")


def kfold(labels: np.ndarray, groups: np.ndarray, k: int, seed: int) -> List[Tuple[np.ndarray, np.ndarray]]:
    sgkf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    try:
        return [(np.sort(a), np.sort(b)) for a, b in sgkf.split(np.zeros(len(labels)), labels, groups)]
    except ValueError as exc:
        raise DataError(f"cannot make {k} cross-validation folds: {exc}; add images or lower --folds") from exc

