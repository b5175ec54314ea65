"""`evonas train RUN`: full training of a search's best layers (evonas/fulltrain/).

Trains the top survivors of the search in RUN and the zoo baselines on full-size
architectures, at several batch sizes and seeds, with the same Optuna tuning budget for
every layer, on a local Ray or a cluster; prints the leaderboard and how well the proxy
ranked the layers. Re-running the same command after a crash or a kill resumes the stage.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from evonas.cli.arguments import names, whole_numbers
from evonas.fulltrain.config import FullTrainConfig

# Flags whose value, when given, is the FullTrainConfig field of the same name; a flag
# not given leaves the field's default, written once, in the dataclass.
_FIELDS = ("top", "baselines", "archs", "batch_sizes", "trials_per_layer", "epochs", "steps",
           "reports", "width", "groups", "placement", "lr_range", "wd_range", "optimizers",
           "device", "bf16", "channels_last", "cpus_per_trial", "gpus_per_trial", "workers",
           "max_retries", "budget", "ray_address", "storage", "tracking_uri")


def _default(name: str) -> str:
    """A FullTrainConfig default as a flag would spell it (128,8 for a tuple), and its
    default after a search of sequence layers where that differs."""
    from evonas.fulltrain.config import SEQUENCE_DEFAULTS

    value = {f.name: f.default for f in dataclasses.fields(FullTrainConfig)}[name]
    text = _spelt(value)
    other = [f"{_spelt(d[name])} for {family}" for family, d in SEQUENCE_DEFAULTS.items()
             if name in d]
    return text + (f"; after a sequence search {', '.join(other)}" if other else "")


def _spelt(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _range_help(name: str) -> str:
    from evonas.fulltrain.config import OPTIMIZERS

    return "default: the optimizer's, " + "; ".join(
        f"{_spelt(r[name])} for {opt}" for opt, r in OPTIMIZERS.items())


def _range(text: str) -> tuple[float, float]:
    try:
        low, high = (float(t) for t in names(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not two numbers LOW,HIGH, "
                                         f"e.g. 0.01,1") from None
    return low, high


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="fully train a search's best layers and the baselines (Ray Tune)",
        description="Train the top survivors of a search and the zoo baselines on full-size "
        "architectures with Ray Tune: one trial per layer, architecture, batch size, seed "
        "and hyperparameters, Optuna (TPE) tuning learning rate and weight decay with the "
        "same number of trials for every layer, ASHA stopping hopeless trials. Re-run the "
        "same command to resume after a crash.")
    p.add_argument("run_dir", metavar="RUN", help="the search's run folder")
    what = p.add_argument_group("what to train")
    what.add_argument("--top", type=int, help=f"best survivors of the search ({_default('top')})")
    what.add_argument("--baselines", type=names,
                      help=f"zoo layers or genome files (NAME.json, e.g. a calibration "
                      f"panel's random or found layers), comma-separated, '' for none "
                      f"({_default('baselines')})")
    what.add_argument("--archs", type=names,
                      help=f"architectures, comma-separated ({_default('archs')})")
    what.add_argument("--batch-sizes", type=whole_numbers("128,8"),
                      help=f"batch sizes, comma-separated ({_default('batch_sizes')})")
    what.add_argument("--seeds", help=f"a count (2: seeds 0,1) or a list (0,3,7) "
                      f"(seeds {_default('seeds')})")
    what.add_argument("--trials-per-layer", type=int,
                      help=f"Optuna trials per layer, architecture, batch size and seed "
                      f"({_default('trials_per_layer')})")
    length = what.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, help=f"training length ({_default('epochs')})")
    length.add_argument("--steps", type=int, help="training length in SGD steps instead")
    what.add_argument("--reports", type=int,
                      help=f"validation reports per trial with --steps ({_default('reports')})")
    what.add_argument("--width", type=int,
                      help=f"channels of the first stage ({_default('width')})")
    what.add_argument("--groups", type=int, help="groups of grouped statistics (the space's)")
    what.add_argument("--placement", help="where a transformer's norms sit: pre, post or mixln "
                      "(default: the search's)")
    what.add_argument("--lr-range", type=_range, help=f"learning-rate range at batch 128, "
                      f"log scale ({_range_help('lr_range')})")
    what.add_argument("--wd-range", type=_range,
                      help=f"weight-decay range, log scale ({_range_help('wd_range')})")
    what.add_argument("--optimizers", type=names,
                      help=f"sgd (momentum 0.9) and/or adamw, comma-separated: each tuned "
                      f"alike and reported apart ({_default('optimizers')})")
    what.add_argument("--dataset", help="cifar10, synthetic, shakespeare or synthetic_text "
                      "(default: the search's)")
    what.add_argument("--data-dir", help="CIFAR-10 or tiny Shakespeare folder (default: the "
                      "search's, $EVONAS_DATA_DIR)")
    how = p.add_argument_group("where and how")
    how.add_argument("--device", help=f"auto, cpu, cuda or cuda:N ({_default('device')})")
    how.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast")
    how.add_argument("--channels-last", action="store_true", default=None,
                     help="channels_last memory format")
    how.add_argument("--cpus-per-trial", type=float,
                     help=f"CPUs per trial ({_default('cpus_per_trial')})")
    how.add_argument("--gpus-per-trial", type=float, help=f"GPU share per trial, 0.25 packs "
                     f"four per GPU ({_default('gpus_per_trial')})")
    how.add_argument("--workers", type=int, help="trials at once (default: what fits)")
    how.add_argument("--max-retries", type=int, help=f"retries of a trial that raised or lost "
                     f"its worker ({_default('max_retries')})")
    how.add_argument("--budget", help="one budget for search plus full training: 2cpu-h, "
                     "10gpu-h (with --gpus-per-trial) or 3h (default: none)")
    how.add_argument("--ray-address", help="Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    how.add_argument("--storage", help="where Tune keeps trials: a shared path or a bucket "
                     "URI on a cluster (default: RUN/fulltrain/tune)")
    how.add_argument("--tracking-uri", help="MLflow store (default: the search's)")
    p.set_defaults(run=run_train, command="train")


def config_from_args(args, run) -> FullTrainConfig:
    """The FullTrainConfig the flags ask for, over the defaults for the search's layers
    (config.search_defaults, then the dataclass's); the search's dataset and data folder
    where none is given."""
    from evonas.fulltrain.config import over, parse_seeds, search_defaults

    given = {name: getattr(args, name) for name in _FIELDS if getattr(args, name) is not None}
    if args.seeds is not None:
        given["seeds"] = parse_seeds(args.seeds)
    if args.steps is not None:
        given["epochs"] = None  # the length is given in steps
    data_dir = args.data_dir or run.config.data_dir or os.environ.get("EVONAS_DATA_DIR")
    return FullTrainConfig(**over(search_defaults(run.config), given),
                           dataset=args.dataset or run.config.dataset,
                           data_dir=os.path.abspath(data_dir) if data_dir else None)


def run_train(args) -> int:
    from evonas.fulltrain.leaderboard import format_table
    from evonas.fulltrain.stage import STATUSES, run_full_training
    from evonas.search.results import load_run

    run = load_run(args.run_dir)
    config = config_from_args(args, run)
    try:
        summary = run_full_training(args.run_dir, config)
    except KeyboardInterrupt:
        print("stopped; re-run the same command to resume", file=sys.stderr)
        return 130
    print(format_table(summary["leaderboard"], summary["kendall_tau"]))
    trials = summary["trials"]
    print(f"trials: {trials['started']} of {trials['planned']} planned; "
          + ", ".join(f"{k} {trials[k]}" for k in STATUSES))
    budget = summary["budget"]
    if trials["stopped_by_budget"]:
        print(f"{trials['stopped_by_budget']} trials stopped before their end: the budget was "
              f"spent while they ran", file=sys.stderr)
    if trials["started"] < trials["planned"] and budget["gated"] and budget["remaining"] <= 0:
        print(f"{trials['planned'] - trials['started']} trials never started: the budget is "
              f"spent (--budget sets a larger one; re-run to go on)", file=sys.stderr)
    elif trials["interrupted"] or trials["started"] < trials["planned"]:
        print("the stage stopped before its end; re-run the same command to resume it",
              file=sys.stderr)
    print(summary["budget"]["text"])
    print(f"files: {os.path.join(args.run_dir, 'fulltrain')} (leaderboard.json, trials.json, "
          f"summary.json); Tune experiment: {summary['experiment']}")
    return 0
