"""From trial records to the stage's answer: the leaderboard and the proxy's rank correlation.

Where it sits: stage.py turns Tune's results into one record per trial (a plain dict,
see stage.trial_record), then calls `leaderboard` and `proxy_correlation` here and
writes `write_files`' output to <run>/fulltrain/. Pure functions of plain data, no
torch, no Ray, so they are tested against hand-computed values.

The leaderboard's score of a (layer, architecture, batch size, optimizer) is the test
accuracy (for a language model: of the next character; its bits per character beside it),
averaged over seeds, of each seed's best completed trial, "best" by validation accuracy:
hyperparameters are chosen on the validation split and judged on the test split, so the
tuning cannot flatter the score. Trials ASHA stopped early, diverged or failed are not
eligible. A seed none of whose trials completed contributes nothing (n says how many
did), except one whose trials diverged and none failed or was cut short: that is the
layer's own outcome, a network it cannot train, and it scores accuracy 0 (what a
diverged proxy training scores), so a layer that diverges on one seed of two is not
ranked by its lucky seed alone. Its bits per character are not averaged in (infinite);
the row's `diverged` says how many seeds were.
"""

from __future__ import annotations

import csv
import io
import math
from collections import defaultdict
from typing import Iterable, Sequence

from evonas.calibrate.agreement import kendall_tau_b, whole_panel_scores

COMPLETED = "completed"
ROW_FIELDS = ("layer", "arch", "batch_size", "optimizer", "mean", "std", "n", "bpc")


def best_per_seed(records: Iterable[dict]) -> dict[tuple, dict]:
    """(layer, arch, batch_size, optimizer, seed) -> the completed trial with the best
    validation accuracy."""
    best: dict[tuple, dict] = {}
    for r in records:
        if r["status"] != COMPLETED or r.get("test_accuracy") is None:
            continue
        key = (r["layer"], r["arch"], r["batch_size"], r.get("optimizer", "sgd"), r["seed"])
        held = best.get(key)
        if held is None or _better(r, held):
            best[key] = r
    return best


def diverged_seeds(records: Iterable[dict]) -> set[tuple]:
    """(layer, arch, batch_size, optimizer, seed) whose trials all ended diverged or
    stopped by ASHA, one at least diverged: the layer trained and blew up at every
    learning rate that got far enough. A failed, interrupted or budget-stopped trial says
    nothing of the layer, so a seed with one is left unscored instead."""
    ends: dict[tuple, set[str]] = defaultdict(set)
    for r in records:
        key = (r["layer"], r["arch"], r["batch_size"], r.get("optimizer", "sgd"), r["seed"])
        by_asha = r["status"] == "stopped" and r.get("stopped_by") != "budget"
        ends[key].add("asha" if by_asha else r["status"])
    return {key for key, got in ends.items() if "diverged" in got and got <= {"diverged", "asha"}}


def _better(a: dict, b: dict) -> bool:
    """Higher validation accuracy; on a tie the smaller trial id, so the pick is stable."""
    return (a["val_accuracy"], b["trial_id"]) > (b["val_accuracy"], a["trial_id"])


def mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std 0.0 for one value."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def leaderboard(records: Sequence[dict], layers: Sequence[str], archs: Sequence[str],
                batch_sizes: Sequence[int], optimizers: Sequence[str] = ("sgd",)) -> list[dict]:
    """One row per (layer, arch, batch size, optimizer) of the plan, best mean first
    within each (arch, batch size, optimizer); rows without a completed trial keep
    mean/std None."""
    best = best_per_seed(records)
    blown = diverged_seeds(records)
    counts: dict[tuple, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    for r in records:
        counts[(r["layer"], r["arch"], r["batch_size"], r.get("optimizer", "sgd"))][r["status"]] += 1
    rows = []
    for arch in archs:
        for bs in batch_sizes:
            for opt in optimizers:
                block = [_row((layer, arch, bs, opt), best, blown,
                              counts[(layer, arch, bs, opt)]) for layer in layers]
                block.sort(key=lambda row: (row["mean"] is None, -(row["mean"] or 0.0),
                                            row["layer"]))
                rows.extend(block)
    return rows


def _row(setting: tuple, best: dict, blown: set, counts: dict[str, int]) -> dict:
    layer, arch, bs, opt = setting
    picks = sorted((k[4], r) for k, r in best.items() if k[:4] == setting)
    seeds = [{"seed": seed, "test_accuracy": r["test_accuracy"],
              "val_accuracy": r["val_accuracy"], "lr": r["lr"],
              "weight_decay": r["weight_decay"], "trial_id": r["trial_id"]}
             for seed, r in picks]
    diverged = sorted(k[4] for k in blown if k[:4] == setting)
    seeds += [{"seed": seed, "test_accuracy": 0.0, "diverged": True} for seed in diverged]
    seeds.sort(key=lambda s: s["seed"])
    mean, std = mean_std([s["test_accuracy"] for s in seeds])
    bpcs = [r["test_bpc"] for _, r in picks if r.get("test_bpc") is not None]
    return {"layer": layer, "arch": arch, "batch_size": bs, "optimizer": opt, "mean": mean,
            "std": std, "n": len(seeds), "diverged": len(diverged),
            "bpc": mean_std(bpcs)[0] if bpcs else None, "seeds": seeds,
            "trials": dict(sorted(counts.items()))}


# --- does the proxy predict? -----------------------------------------------------------


def overall_means(rows: Sequence[dict]) -> dict[str, float]:
    """Each layer's score over the whole plan: the mean of its row means over every
    (arch, batch size, optimizer) the rows hold, for the layers with a mean in all of
    them (a layer missing a setting would be ranked on easier or harder settings)."""
    return _overall(_by_layer(rows, lambda layer: True), sorted({_setting(r) for r in rows}))


def _by_layer(rows: Sequence[dict], keep) -> dict[str, dict[tuple, float]]:
    by_layer: dict[str, dict[tuple, float]] = defaultdict(dict)
    for r in rows:
        if r["mean"] is not None and keep(r["layer"]):
            by_layer[r["layer"]][_setting(r)] = r["mean"]
    return by_layer


def _overall(by_layer: dict[str, dict[tuple, float]], settings: list[tuple]) -> dict[str, float]:
    return {layer: sum(got.values()) / len(settings)
            for layer, got in sorted(by_layer.items()) if len(got) == len(settings)}


def proxy_correlation(rows: Sequence[dict], proxy_fitness: dict[str, float | None],
                      unscored: Iterable[str] = ()) -> dict:
    """Kendall tau between the proxy fitness and full-training accuracy, over every layer
    trained.

    overall: each layer's accuracy is the mean of its row means over every (arch, batch
    size, optimizer) of the plan, for the layers with a mean in all of them (a layer missing a
    setting would be ranked on easier or harder settings than the others);
    by_setting: one tau per (arch, batch size, optimizer). A layer the proxy rejected (fitness None)
    ranks below every layer it kept, all rejected ones tied (calibrate/agreement.py):
    leaving them out would flatter a proxy that throws good layers away. Layers in
    `unscored` (a baseline whose proxy run failed: nothing is known of it) are left out.
    """
    unscored = set(unscored)
    by_layer = _by_layer(rows, lambda layer: layer in proxy_fitness and layer not in unscored)
    settings = sorted({_setting(r) for r in rows})
    overall = _overall(by_layer, settings)
    return {
        "overall": _tau_entry(overall, proxy_fitness),
        "by_setting": [{"arch": arch, "batch_size": bs, "optimizer": opt,
                        **_tau_entry({layer: got[(arch, bs, opt)]
                                      for layer, got in by_layer.items()
                                      if (arch, bs, opt) in got}, proxy_fitness)}
                       for arch, bs, opt in settings],
    }


def _setting(row: dict) -> tuple:
    """(arch, batch size, optimizer): what a row's layer was trained in."""
    return row["arch"], row["batch_size"], row.get("optimizer", "sgd")


def _tau_entry(accuracy: dict[str, float], proxy: dict[str, float | None]) -> dict:
    layers = sorted(accuracy)
    scores = whole_panel_scores({layer: proxy[layer] for layer in layers})
    tau = (kendall_tau_b([scores[layer] for layer in layers], [accuracy[layer] for layer in layers])
           if len(layers) >= 2 else None)
    return {"tau": tau, "n": len(layers), "layers": layers,
            "rejected": sorted(layer for layer in layers if proxy[layer] is None)}


# --- files -----------------------------------------------------------------------------


def table_rows(rows: Sequence[dict]) -> list[dict]:
    """The leaderboard as flat rows {layer, arch, batch_size, optimizer, mean, std, n, bpc}
    (bpc: a language model's mean test bits per character, else None)."""
    return [{k: row.get(k) for k in ROW_FIELDS} for row in rows]


def to_csv(rows: Sequence[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=ROW_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in table_rows(rows):
        writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return out.getvalue()


def format_table(rows: Sequence[dict], correlation: dict | None = None) -> str:
    """The leaderboard as the CLI prints it, with the rank correlation under it."""
    lines = [f"{'arch':<18} {'batch':>5} {'optimizer':<9}  {'layer':<14} {'test acc':>17}"]
    for r in rows:
        blown = f", {r['diverged']} diverged" if r.get("diverged") else ""
        score = ("no completed trial" if r["mean"] is None
                 else f"{r['mean']:.4f} ± {r['std']:.4f} ({r['n']}{blown})")
        if r.get("bpc") is not None:
            score += f"  {r['bpc']:.3f} bits per character"
        lines.append(f"{r['arch']:<18} {r['batch_size']:>5} {r.get('optimizer', 'sgd'):<9}  "
                     f"{r['layer']:<14} {score:>17}")
    if correlation is not None:
        overall = correlation["overall"]
        tau = "undefined" if overall["tau"] is None else f"{overall['tau']:+.3f}"
        rejected = len(overall.get("rejected", ()))
        lines.append(f"Kendall tau, proxy fitness vs full-training accuracy: {tau} over "
                     f"{overall['n']} layers ({rejected} rejected by the proxy, ranked last)")
    return "\n".join(lines)


__all__ = ["leaderboard", "overall_means", "best_per_seed", "diverged_seeds", "mean_std",
           "kendall_tau_b", "proxy_correlation", "table_rows", "to_csv", "format_table",
           "ROW_FIELDS"]
