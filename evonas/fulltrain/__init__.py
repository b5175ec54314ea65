"""Full training: the search's best layers and the zoo baselines, trained to the end.

Where it sits: after a search (evonas/search/), `evonas train RUN` or `evonas search
--full-train-top N` runs one stage here. The flow, file by file:

    config.py       FullTrainConfig: what to train and how, validated up front
    stage.py        run_full_training: plan, budget, Ray (runtime/cluster.py, as the
                    search), Tune, records, outputs, MLflow
    tuning.py       the Tune plug-ins: per-group TPE studies and ASHA rungs, callbacks
    trainable.py    one trial: the Tune function trainable and its training loop
    leaderboard.py  mean and spread over seeds, Kendall tau of proxy vs full training
    tracking.py     full-training runs and tables in the search's MLflow experiment

Importing this package loads neither torch nor Ray; run_full_training does.
"""

from __future__ import annotations

from evonas.fulltrain.config import FullTrainConfig, for_search


def run_full_training(run_path, config: FullTrainConfig, ledger=None, **kw) -> dict:
    """See stage.run_full_training."""
    from evonas.fulltrain.stage import run_full_training as run

    return run(run_path, config, ledger, **kw)


__all__ = ["FullTrainConfig", "for_search", "run_full_training"]
