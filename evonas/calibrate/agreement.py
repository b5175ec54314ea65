"""How far a proxy's ranking of the panel agrees with full training's.

Pure functions of plain data (no torch), tested against hand-computed values.

The whole panel is ranked, rejected layers included: a gate that throws a layer away
ranks it below every layer it kept (all rejected layers tie among themselves). Leaving
the rejected ones out, as a correlation over survivors does, flatters a proxy whose gates
reject good layers: on the CIFAR-10 benchmark's six layers, the tau at batch 8 fell to
0.60 once the two layers the proxy had rejected were put back.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence



def kendall_tau_b(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Kendall's tau-b of two equally long sequences; None when undefined (fewer than
    two pairs, or one side all ties). O(n^2): panels and leaderboards hold tens of
    layers, not more."""
    if len(x) != len(y):
        raise ValueError(f"kendall_tau_b needs sequences of one length, got {len(x)} and {len(y)}")
    concordant = discordant = ties_x = ties_y = 0
    n = len(x)
    for i in range(n):
        for j in range(i + 1, n):
            dx, dy = _sign(x[i] - x[j]), _sign(y[i] - y[j])
            if dx == 0:
                ties_x += 1
            if dy == 0:
                ties_y += 1
            if dx * dy > 0:
                concordant += 1
            elif dx * dy < 0:
                discordant += 1
    pairs = n * (n - 1) // 2
    denominator = math.sqrt((pairs - ties_x) * (pairs - ties_y))
    if denominator == 0:
        return None
    return (concordant - discordant) / denominator


def _sign(v: float) -> int:
    return (v > 0) - (v < 0)


def whole_panel_scores(proxy: Mapping[str, float | None]) -> dict[str, float]:
    """The proxy score of every layer, a rejected one (None) set one below the lowest kept
    score, so it ranks under every kept layer and ties with the other rejected ones."""
    kept = [v for v in proxy.values() if v is not None]
    floor = (min(kept) if kept else 0.0) - 1.0
    return {name: floor if v is None else float(v) for name, v in proxy.items()}


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank (as Spearman's rho needs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: list[float], y: list[float]) -> float | None:
    """Spearman's rho with mean ranks for ties; None where one side is constant."""
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx = sum((a - mx) ** 2 for a in rx)
    syy = sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:
        return None
    return sxy / math.sqrt(sxx * syy)


def good_layers(outcome: Mapping[str, float]) -> list[str]:
    """The panel's top half by full-training score (the upper half when odd: of 5, the 3
    best; a gate must never lose one of them)."""
    ordered = sorted(outcome, key=lambda name: (-outcome[name], name))
    return ordered[: (len(ordered) + 1) // 2]


def agreement(outcome: Mapping[str, float], proxy: Mapping[str, float | None]) -> dict:
    """The agreement of a proxy (name -> score, None: rejected) with full training (name
    -> score, higher is better) over the layers both hold."""
    names = sorted(set(outcome) & set(proxy))
    if len(names) < 2:
        raise ValueError(f"agreement needs two or more layers scored by both, got {len(names)}")
    scores = whole_panel_scores({n: proxy[n] for n in names})
    full = {n: outcome[n] for n in names}
    x, y = [scores[n] for n in names], [full[n] for n in names]
    rejected = sorted(n for n in names if proxy[n] is None)
    good = good_layers(full)
    lost = [n for n in good if proxy[n] is None]
    return {"kendall_tau": kendall_tau_b(x, y), "spearman": spearman(x, y), "n": len(names),
            "rejected": rejected, "false_rejections": lost,
            "false_rejection_rate": len(lost) / len(good)}


__all__ = ["agreement", "kendall_tau_b", "good_layers", "ranks", "spearman", "whole_panel_scores"]
