"""`evonas calibrate`: which proxy setting ranks layers as full training does (evonas/calibrate/).

Two steps, one command:
    evonas calibrate --panel DIR --panel-from RUN   the layers `evonas train RUN` trained
                                                    fully become the panel (DIR/panel.json)
    evonas calibrate --panel DIR --out CAL          score today's proxy defaults and
                                                    --trials other settings on the panel;
                                                    print the tau-vs-cost table, write
                                                    CAL/proxy_config.json
and `evonas search --proxy-config CAL/proxy_config.json` searches with the chosen setting.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from evonas.cli.arguments import names, whole_numbers


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from evonas.calibrate.sweep import SweepSpace

    space = SweepSpace()
    p = sub.add_parser(
        "calibrate", help="score proxy settings against layers trained fully (tau vs cost)",
        description="Rank the layers of a reference panel (trained fully by `evonas train`) "
        "with proxy settings, measure Kendall's tau and Spearman's rho over the whole panel "
        "(rejected layers rank last), the good layers the gates reject, and the cost per "
        "candidate; choose the cheapest setting that loses no good layer and is within one "
        "discordant pair of the best tau. Re-run the same command to resume.")
    p.add_argument("--panel", required=True, metavar="DIR", help="the panel folder (panel.json)")
    p.add_argument("--panel-from", metavar="RUN", type=names, help="build the panel from the "
                   "layers `evonas train RUN` trained fully (RUN1,RUN2,...: several runs "
                   "trained alike, each a part of the panel), then stop unless --out is given")
    p.add_argument("--out", metavar="DIR", help="calibration folder: study, evaluations, "
                   "calibration.json, proxy_config.json")
    p.add_argument("--trials", type=int, default=20,
                   help="proxy settings to try besides today's defaults (20)")
    p.add_argument("--space", help="the search space the panel's layers belong to, for "
                   "its group count (a search's default)")
    p.add_argument("--archs", type=names, help="proxy architectures, comma-separated "
                   "(a search's default)")
    p.add_argument("--data-dir", help="where the panel's dataset lies")
    p.add_argument("--steps", type=whole_numbers("100,300"), default=space.steps,
                   help=f"proxy step counts to try ({','.join(map(str, space.steps))})")
    p.add_argument("--batches", type=whole_numbers("64,128"), default=space.batches,
                   help=f"proxy batch sizes to try ({','.join(map(str, space.batches))})")
    p.add_argument("--widths", type=whole_numbers("8,16"), default=space.widths,
                   help=f"proxy widths to try ({','.join(map(str, space.widths))})")
    p.add_argument("--workers", type=int, default=0, help="parallel evaluations on Ray "
                   "(0: in this process)")
    p.add_argument("--ray-address", help="a Ray cluster to run them on")
    p.add_argument("--seed", type=int, default=0, help="the study's and the proxies' seed (0)")
    p.add_argument("--min-tau", type=float, help="choose the cheapest setting whose Kendall's "
                   "tau reaches this (a screening proxy for a ladder's first rung); default: "
                   "the cheapest within one discordant pair of the best tau")
    p.set_defaults(run=_run, command="calibrate")


def _run(args: argparse.Namespace) -> int:
    import dataclasses

    from evonas.calibrate.panel import format_panel, load_panel, panel_from_runs, write_panel
    from evonas.calibrate.sweep import CalibrationError, SweepSpace, calibrate, format_results
    from evonas.errors import EvonasError
    from evonas.proxy.data import ensure_dataset
    from evonas.runtime import checks
    from evonas.layers.space import load_space
    from evonas.search.config import SearchConfig, StageConfig, default_archs, proxy_sizes
    from evonas.search.driver import make_backend

    checks.whole("--trials", args.trials, minimum=0)
    if args.min_tau is not None and not -1.0 <= args.min_tau <= 1.0:
        raise EvonasError(f"--min-tau {args.min_tau:g} is no Kendall's tau: give one between "
                          f"-1 and 1, e.g. 0.6")
    if args.panel_from:
        panel = panel_from_runs(args.panel_from)
        path = write_panel(panel, args.panel)
        print(format_panel(panel))
        print(f"panel of {len(panel.outcome)} layers written to {path}")
        if not args.out:
            return 0
    elif not args.out:
        raise EvonasError("--out DIR is needed to calibrate (or --panel-from RUN to build "
                          "the panel only)")
    panel = load_panel(args.panel)
    ensure_dataset(panel.dataset, args.data_dir)
    space = args.space or SearchConfig.space
    archs = args.archs or default_archs(load_space(space))
    sizes, stage = proxy_sizes(panel.dataset, {}, archs)
    base = SearchConfig(space=space, archs=archs, dataset=panel.dataset, data_dir=args.data_dir,
                        seed=args.seed, workers=args.workers, ray_address=args.ray_address,
                        stages=StageConfig(**stage), **sizes)
    base.validate_parts()
    choices = dataclasses.replace(SweepSpace(), steps=args.steps, batches=args.batches,
                                  widths=args.widths)
    try:
        with make_backend(base) as backend:
            result = calibrate(panel, base, Path(args.out), trials=args.trials, space=choices,
                               backend=backend, seed=args.seed, min_tau=args.min_tau,
                               progress=lambda line: print(line, file=sys.stderr, flush=True))
    except CalibrationError as err:
        print(f"evonas calibrate: {err}", file=sys.stderr)
        return 1
    print(format_results(result))
    if result["chosen"] is None:
        reach = "" if args.min_tau is None else f" at tau >= {args.min_tau:g}"
        print(f"no setting kept every good panel layer and ranked the panel{reach}; widen "
              f"the settings (--steps, --widths) or raise --trials", file=sys.stderr)
        return 1
    print(f"chosen setting written to {Path(args.out) / 'proxy_config.json'}; search with "
          f"`evonas search --proxy-config {Path(args.out) / 'proxy_config.json'}`")
    return 0
