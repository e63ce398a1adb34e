"""Matching one labelling to another, so colours stay put between successive fits.

A provisional result is refitted after every new temperature; the mixture's canonical order
(by temperature dependence of the means) can change when the series grows, and a scientist
watching the map would see colours swap. The new labels are therefore renamed to the old
ones they overlap most (a maximum-weight matching on the contingency table, Hungarian
algorithm), which changes no assignment, only the names.
"""

from __future__ import annotations

import numpy as np


def matching_permutation(labels: np.ndarray, previous: np.ndarray, n_labels: int) -> np.ndarray:
    """The renaming of ``labels`` that agrees best with ``previous``.

    Parameters
    ----------
    labels, previous : integer arrays of one shape; -1 (or any negative value) = unlabelled
    n_labels : labels run over 0..n_labels-1 in both

    Returns
    -------
    order : (n_labels,) int array, a permutation: ``order[new]`` is the name label ``new`` gets.
        Labels that overlap no previous label keep their relative order among the free names.
    """
    from scipy.optimize import linear_sum_assignment

    labels = np.asarray(labels).ravel()
    previous = np.asarray(previous).ravel()
    if labels.shape != previous.shape:
        raise ValueError(f"labels and previous labels differ in size ({labels.size} vs {previous.size})")
    both = (labels >= 0) & (previous >= 0) & (labels < n_labels) & (previous < n_labels)
    overlap = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(overlap, (labels[both], previous[both]), 1)
    new, old = linear_sum_assignment(overlap, maximize=True)
    order = np.empty(n_labels, dtype=np.int64)
    order[new] = old
    return order


def rename(labels: np.ndarray, order: np.ndarray) -> np.ndarray:
    """``labels`` with each label ``i >= 0`` renamed ``order[i]``; negative values kept (int8)."""
    labels = np.asarray(labels)
    out = labels.astype(np.int8, copy=True)
    keep = labels >= 0
    out[keep] = np.asarray(order, dtype=np.int8)[labels[keep]]
    return out
