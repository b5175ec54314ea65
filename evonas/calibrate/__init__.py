"""Proxy calibration: which cheap proxy ranks layers as full training does, at what cost.

A search spends most of its budget on proxies, and a proxy is only worth what its ranking
agrees with full training. `evonas calibrate` measures that agreement on a panel of layers
whose full-training outcome is known, and picks the proxy settings a search should use.

    panel.py      the reference panel: genomes and their full-training scores, built from
                  an `evonas train` run (its summary and leaderboard) and stored as data
    agreement.py  a proxy's ranking against the panel's: Kendall's tau and Spearman over
                  the whole panel (rejected layers tie below every kept one), and the
                  good layers (the panel's top half) the gates threw away
    sweep.py      one proxy setting scored on the panel (the search's own evaluation,
                  through the search's backends), and the Optuna study over settings
                  (tau up, cost down) with its Pareto front and the chosen setting, written
                  as the file `evonas search --proxy-config FILE` reads
"""
