"""Search commands: `evonas search` and `evonas top`.

`evonas show RUN:ID` and `evonas export RUN:ID` are the layer commands (cli/layers.py)
reading a candidate of a run folder; `RUN:best` names its best survivor.
"""

from __future__ import annotations

import argparse
import os
import sys

from evonas.cli.arguments import names, whole_numbers
from evonas.errors import EvonasError


def _size_help(name: str) -> str:
    # Read off the config (a light import), so the help cannot drift from the defaults.
    from evonas.search.config import TASK_DEFAULTS, size_default

    tasks = ", ".join(f"{size_default(name, dataset, family)} "
                      f"{'on' if family == 'conv' else f'for {family} on'} {dataset}"
                      for family, dataset in TASK_DEFAULTS)
    return f"default {size_default(name)}; {tasks}".replace("%", "%%")


def _default(name: str) -> str:
    """'default X' for a SearchConfig (or StageConfig) field: the one place defaults live."""
    import dataclasses

    from evonas.search.config import SearchConfig, StageConfig

    fields = {f.name: f.default for cls in (SearchConfig, StageConfig)
              for f in dataclasses.fields(cls)}
    value = fields[name]
    return f"default {','.join(value) if isinstance(value, tuple) else value}"


# Flags of a new search and the SearchConfig (or StageConfig) field each sets. They
# default to None, "not given": the config fills in its own default, and --resume refuses
# any of them (a resumed search keeps the settings it started with).
FIELDS = {"space": "space", "dataset": "dataset", "data_dir": "data_dir", "seed": "seed",
          "controller": "controller", "seed_zoo": "seed_zoo", "population": "population_size",
          "tournament": "tournament_size", "random_fraction": "random_fraction",
          "archs": "archs", "workers": "workers",
          "cpus_per_eval": "cpus_per_eval", "gpus_per_eval": "gpus_per_eval",
          "eval_time_limit": "eval_time_limit_s", "ray_address": "ray_address",
          "tracking_uri": "tracking_uri", "report_every": "report_every_s",
          "full_train_top": "full_train_top", "search_share": "search_share",
          "promote_fraction": "promote_fraction", "rung_min_population": "rung_min_population",
          "top_rung_seeds": "top_rung_seeds", "placement": "placement"}
STAGE_FIELDS = {"stability_threshold": "stability_threshold"}
# Flags whose default depends on the task (config.TASK_DEFAULTS: dataset and proxy family).
SIZES = {"proxy_steps": "proxy_steps", "proxy_batch": "proxy_batch_size",
         "proxy_width": "proxy_width", "proxy_lr": "proxy_lr", "quality_steps": "quality_steps",
         "quality_threshold": "quality_threshold", "stability_steps": "stability_steps"}
# Flags whose default comes from the environment when not given.
ENVIRONMENT = {"data_dir": "EVONAS_DATA_DIR", "ray_address": "RAY_ADDRESS"}


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="evolve layers (resumable run folder, MLflow record)",
                       description="Evolve normalization-activation layers. A new search needs "
                       "--budget and --out; --resume RUN continues one (with --budget only).")
    p.add_argument("--space", help=f"search space name or JSON file ({_default('space')})")
    p.add_argument("--budget", help="200gpu-h, 2cpu-h, 45m, 1.5h or 500evals")
    p.add_argument("--dataset", help=f"cifar10 or synthetic (images), shakespeare or "
                   f"synthetic_text (text, for the LM proxy); {_default('dataset')}")
    p.add_argument("--data-dir", help="CIFAR-10 or tiny Shakespeare folder "
                   "(default: $EVONAS_DATA_DIR)")
    p.add_argument("--out", help="run folder to create")
    p.add_argument("--resume", metavar="RUN", help="continue the search in this run folder")
    p.add_argument("--seed", type=int, help=_default("seed"))
    p.add_argument("--controller", help=f"evolution or random (ablation); {_default('controller')}")
    p.add_argument("--seed-zoo", action="store_true", default=None,
                   help="start from the zoo layers of the space")
    p.add_argument("--population", type=int,
                   help=f"aging-evolution population ({_default('population_size')})")
    p.add_argument("--tournament", type=int,
                   help=f"tournament sample size ({_default('tournament_size')})")
    p.add_argument("--random-fraction", type=float, metavar="R",
                   help="share of evolution's proposals that are random immigrants "
                   f"(0: every proposal mutates a tournament winner, as in the paper); "
                   f"{_default('random_fraction')}")
    p.add_argument("--archs", type=names,
                   help="proxy architectures, comma-separated (one objective each); default: "
                   "the space's, the three proxy CNNs for an nchw space, lm for a causal "
                   "sequence space, vit for a bidirectional one")
    p.add_argument("--placement", help="where a transformer proxy's norms sit: pre "
                   "(x + F(Norm(x)), GPT-2), post (Norm(x + F(x))) or mixln (post-norm in the "
                   "first quarter of the blocks, pre after: needs 4 or more); full training "
                   f"takes the same; {_default('placement')}")
    # Sizes default per task (config.proxy_sizes): smaller on the synthetic sets.
    p.add_argument("--proxy-steps", type=int, help=_size_help("proxy_steps"))
    p.add_argument("--proxy-batch", type=int, help=_size_help("proxy_batch_size"))
    p.add_argument("--proxy-width", type=int, help=_size_help("proxy_width"))
    p.add_argument("--proxy-lr", type=float, help=_size_help("proxy_lr"))
    p.add_argument("--proxy-config", metavar="FILE", help="proxy settings chosen by `evonas "
                   "calibrate` (its proxy_config.json) in place of the task's defaults; "
                   "a proxy flag given wins over it; its architectures unless --archs names "
                   "the same")
    p.add_argument("--rungs", type=whole_numbers("300,1200,4800"), metavar="STEPS",
                   help="fidelity ladder: training lengths, e.g. 300,1200,4800; the first is "
                   "the proxy's (it sets --proxy-steps), the others train promoted candidates "
                   "again (default: none)")
    p.add_argument("--promote-fraction", type=float, metavar="F",
                   help=f"share of a rung's scores that climb to the next; "
                   f"{_default('promote_fraction')}")
    p.add_argument("--rung-min-population", type=int, metavar="N",
                   help=f"scores a rung holds before it promotes any; "
                   f"{_default('rung_min_population')}")
    p.add_argument("--top-rung-seeds", type=int, metavar="N",
                   help=f"seeds the top rung trains, its score their mean; "
                   f"{_default('top_rung_seeds')}")
    p.add_argument("--quality-steps", type=int, help=_size_help("quality_steps"))
    p.add_argument("--quality-threshold", type=float,
                   help="reject below this validation accuracy, or above this many bits per "
                   "character for an LM; " + _size_help("quality_threshold"))
    p.add_argument("--stability-steps", type=int, help=_size_help("stability_steps"))
    p.add_argument("--stability-threshold", type=float, help=_default("stability_threshold"))
    p.add_argument("--workers", type=int,
                   help=f"evaluations at once (0: in this process, without Ray); "
                   f"{_default('workers')}")
    p.add_argument("--cpus-per-eval", type=float, help=_default("cpus_per_eval"))
    p.add_argument("--gpus-per-eval", type=float,
                   help=f"GPU share per evaluation (0.25 packs four per GPU); "
                   f"{_default('gpus_per_eval')}")
    p.add_argument("--eval-time-limit", type=float, metavar="SECONDS",
                   help=_default("eval_time_limit_s"))
    p.add_argument("--ray-address",
                   help="Ray cluster to use (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--tracking-uri", help="MLflow server (default: SQLite in the run folder)")
    p.add_argument("--full-train-top", type=int, metavar="N",
                   help="then train the N best layers and the baselines fully; the search "
                   "gets --search-share (80%%) of --budget")
    p.add_argument("--search-share", type=float, metavar="F",
                   help="with --full-train-top, the share of --budget the search may spend; "
                   f"full training gets the rest ({_default('search_share')})")
    p.add_argument("--full-train-config", metavar="FILE",
                   help="JSON object of `evonas train` settings for --full-train-top, "
                   'e.g. {"archs": ["resnet20"], "epochs": 10, "seeds": [0, 1]}')
    p.add_argument("--report-every", type=float, metavar="SECONDS",
                   help=f"rewrite RUN/report.html this often while searching "
                   f"({_default('report_every_s')})")
    p.set_defaults(run=run_search, command="search")

    p = sub.add_parser("top", help="leaderboard of a search's run folder")
    p.add_argument("run_dir", metavar="RUN", help="run folder")
    p.add_argument("-n", type=int, default=10, help="how many layers")
    p.set_defaults(run=run_top, command="top")


def _given(args, names) -> dict:
    return {names[flag]: getattr(args, flag) for flag in names if getattr(args, flag) is not None}


def _config(args):
    from evonas.layers.space import load_space
    from evonas.search.config import (SearchConfig, StageConfig, default_archs, proxy_sizes,
                                      read_proxy_config)

    if args.budget is None or args.out is None:
        raise EvonasError("a new search needs --budget and --out (or --resume RUN)")
    fields = _given(args, FIELDS)
    for flag, variable in ENVIRONMENT.items():
        if FIELDS[flag] not in fields and os.environ.get(variable):
            fields[FIELDS[flag]] = os.environ[variable]
    if fields.get("data_dir"):
        fields["data_dir"] = os.path.abspath(fields["data_dir"])
    dataset = fields.get("dataset", SearchConfig.dataset)
    calibrated = None
    if args.proxy_config is not None:
        calibrated, fields["archs"] = read_proxy_config(args.proxy_config, dataset,
                                                        fields.get("archs"))
        fields["proxy_config"] = os.path.abspath(args.proxy_config)
    archs = fields.get("archs") or default_archs(load_space(fields.get("space",
                                                                       SearchConfig.space)))
    sizes, stage_sizes = proxy_sizes(dataset, {SIZES[f]: getattr(args, f) for f in SIZES},
                                     archs, calibrated)
    if args.rungs is not None:
        # The first rung is the proxy: it sets the proxy's steps (SearchConfig checks both).
        fields["rungs"] = args.rungs
        if args.proxy_steps is None and args.rungs:
            sizes["proxy_steps"] = args.rungs[0]
    stages = StageConfig(**_given(args, STAGE_FIELDS), **stage_sizes)
    return SearchConfig(budget=args.budget, **fields, **sizes, full_train=_full_train(args),
                        stages=stages)


def _full_train(args) -> dict | None:
    if args.full_train_config is None:
        return None
    if not args.full_train_top:
        raise EvonasError("--full-train-config configures --full-train-top N; give both")
    from evonas.fulltrain.config import load_overrides

    return load_overrides(args.full_train_config)


def run_search(args) -> int:
    from evonas.search.driver import Search

    if args.resume:
        given = [f for f in ("out", *FIELDS, *STAGE_FIELDS, *SIZES, "full_train_config",
                             "proxy_config", "rungs")
                 if getattr(args, f) is not None]
        if given:
            raise EvonasError(f"--resume continues with the run's own settings; drop "
                              f"--{given[0].replace('_', '-')} (only --budget may change)")
        search = Search.resume(args.resume, budget=args.budget)
    else:
        config = _config(args)
        if config.full_train_top:  # its settings fail now, not after the search
            from evonas.fulltrain import for_search
            from evonas.fulltrain.stage import check_task_fits

            config.validate_parts()  # the search's own task first, then full training's
            check_task_fits(config.space, for_search(config, args.budget))
        search = Search.create(args.out, config)
    try:
        state = search.run()
    except KeyboardInterrupt:
        print(f"stopped; continue with: evonas search --resume {search.folder.path}",
              file=sys.stderr)
        return 130
    print(search.ledger.format_summary())
    best = state.best()
    if best is not None:
        print(f"best: {search.folder.path}:{best.candidate_id}  "
              f"(evonas show {search.folder.path}:best)")
    if search.config.full_train_top:
        from evonas.fulltrain import for_search, run_full_training
        from evonas.fulltrain.leaderboard import format_table

        summary = run_full_training(str(search.folder.path),
                                    for_search(search.config, args.budget or search.config.budget))
        print(format_table(summary["leaderboard"], summary["kendall_tau"]))
        print(summary["budget"]["text"])
    return 0


def run_top(args) -> int:
    from evonas.layers import symbolic
    from evonas.layers.genome import Genome
    from evonas.search.results import load_run
    run = load_run(args.run_dir)
    archs = list(run.config.archs)
    counts = run.counts()
    stages = {k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("rejected:")}
    parts = [", ".join(f"{k} {v}" for k, v in sorted(counts.items())
                       if k not in {f"rejected:{s}" for s in stages})]
    if stages:
        parts.append("rejected at " + ", ".join(f"{k} {v}" for k, v in stages.items()))
    print(f"{args.run_dir}: {sum(counts.values())} evaluated; "
          + "; ".join(p for p in parts if p))
    # On a ladder the scores are those at the highest rung reached (its steps shown),
    # which is what the leaderboard ranks by.
    ladder = run.config.ladder
    print(f"{'rank':>4}  {'id':<8} " + (f"{'steps':>6} " if ladder else "") + f"{'mean':>6}  "
          + "  ".join(f"{a[:12]:>12}" for a in archs) + "  formula")
    for rank, (cand, ev) in enumerate(run.leaderboard(args.n), 1):
        formula = symbolic.formula(Genome.from_dict(cand.genome)).replace("\n", "; ")
        steps, fitness = run.state.score(ev)
        shown = f"{steps or run.config.rungs[0]:>6} " if ladder else ""
        print(f"{rank:>4}  {cand.candidate_id:<8} {shown}"
              f"{sum(fitness.values()) / len(fitness):>6.4f}  "
              + "  ".join(f"{fitness[a]:>12.4f}" for a in archs) + f"  {formula}")
    return 0
