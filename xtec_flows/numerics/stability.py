"""Agreement between clusterings of the same samples: ARI, class matching, per-class stability.

Pure functions of label vectors; used to check that the classes found by class
discovery reproduce when the mixture is refitted from other seeds.
"""

from __future__ import annotations

import numpy as np


def contingency(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Contingency table of two labelings (negative labels are a category of their own).

    Returns (table of shape (n_a, n_b), the distinct labels of a, the distinct labels of b).
    """
    a = np.asarray(a)
    b = np.asarray(b)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"labelings must be 1-D of one length; got shapes {a.shape} and {b.shape}")
    ua, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    table = np.bincount(ia * ub.size + ib, minlength=ua.size * ub.size).reshape(ua.size, ub.size)
    return table, ua, ub


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Adjusted Rand index of two labelings of the same samples (Hubert & Arabie 1985); 1 = identical."""
    table, _, _ = contingency(a, b)
    n = table.sum()
    comb = lambda x: x * (x - 1) / 2.0  # noqa: E731
    sum_ij = comb(table.astype(float)).sum()
    sum_a = comb(table.sum(axis=1).astype(float)).sum()
    sum_b = comb(table.sum(axis=0).astype(float)).sum()
    expected = sum_a * sum_b / comb(float(n)) if n > 1 else 0.0
    maximum = 0.5 * (sum_a + sum_b)
    if maximum == expected:
        return 1.0
    return float((sum_ij - expected) / (maximum - expected))


def match_labels(reference: np.ndarray, other: np.ndarray) -> dict:
    """One-to-one matching of ``other``'s labels to ``reference``'s maximising the shared samples (Hungarian).

    Returns {reference label: other label} for every matched reference label (labels >= 0 only).
    """
    from scipy.optimize import linear_sum_assignment

    keep = (np.asarray(reference) >= 0) & (np.asarray(other) >= 0)
    table, ua, ub = contingency(np.asarray(reference)[keep], np.asarray(other)[keep])
    if table.size == 0:
        return {}
    rows, cols = linear_sum_assignment(-table)
    return {int(ua[r]): int(ub[c]) for r, c in zip(rows, cols) if table[r, c] > 0}


def jaccard_by_label(reference: np.ndarray, other: np.ndarray, mapping: dict, labels) -> np.ndarray:
    """For every label L of ``labels``: |ref == L  and  other == mapping[L]| / |ref == L  or  other == mapping[L]|.

    A label without a match scores 0. Returns ndarray of shape (len(labels),).
    """
    reference = np.asarray(reference)
    other = np.asarray(other)
    out = np.zeros(len(labels))
    for i, lab in enumerate(labels):
        if lab not in mapping:
            continue
        a = reference == lab
        b = other == mapping[lab]
        union = np.count_nonzero(a | b)
        out[i] = np.count_nonzero(a & b) / union if union else 0.0
    return out
