"""Search commands: `evonas search` and `evonas top`.

`evonas show RUN:ID` and `evonas export RUN:ID` are the layer commands (cli/layers.py)
reading a candidate of a run folder; `RUN:best` names its best survivor.
"""

from __future__ import annotations

import argparse
import os
import sys

from evonas.errors import EvonasError


def _archs(text: str) -> tuple[str, ...]:
    return tuple(a.strip() for a in text.split(",") if a.strip())


def _size_help(name: str) -> str:
    # Read off the config (a light import), so the help cannot drift from the defaults.
    from evonas.search.config import size_default

    return f"default {size_default(name)}; {size_default(name, 'synthetic')} on synthetic"


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("search", help="evolve layers (resumable run folder, MLflow record)",
                       description="Evolve normalization-activation layers. A new search needs "
                       "--budget and --out; --resume RUN continues one.")
    p.add_argument("--space", default="norm_act", help="search space name or JSON file")
    p.add_argument("--budget", help="200gpu-h, 2cpu-h, 45m, 1.5h or 500evals")
    p.add_argument("--dataset", default="cifar10", help="cifar10 or synthetic")
    p.add_argument("--data-dir", default=os.environ.get("EVONAS_DATA_DIR"),
                   help="CIFAR-10 folder (default: $EVONAS_DATA_DIR)")
    p.add_argument("--out", help="run folder to create")
    p.add_argument("--resume", metavar="RUN", help="continue the search in this run folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--controller", default="evolution", help="evolution or random (ablation)")
    p.add_argument("--seed-zoo", action="store_true", help="start from the zoo layers of the space")
    p.add_argument("--population", type=int, default=50, help="aging-evolution population")
    p.add_argument("--tournament", type=int, default=10, help="tournament sample size")
    p.add_argument("--random-fraction", type=float, default=0.5, metavar="R",
                   help="share of evolution's proposals that are random immigrants "
                   "(0: every proposal mutates a tournament winner, as in the paper)")
    p.add_argument("--archs", type=_archs, default=("resnet", "mobilenetv2", "efficientnet"),
                   help="proxy architectures, comma-separated (one objective each)")
    # Sizes default per dataset (config.proxy_sizes): smaller on the synthetic set.
    p.add_argument("--proxy-steps", type=int, help=_size_help("proxy_steps"))
    p.add_argument("--proxy-batch", type=int, help=_size_help("proxy_batch_size"))
    p.add_argument("--proxy-width", type=int, help=_size_help("proxy_width"))
    p.add_argument("--proxy-lr", type=float, default=0.1)
    p.add_argument("--quality-steps", type=int, help=_size_help("quality_steps"))
    p.add_argument("--quality-threshold", type=float, default=0.2)
    p.add_argument("--stability-steps", type=int, help=_size_help("stability_steps"))
    p.add_argument("--stability-threshold", type=float, default=1e8)
    p.add_argument("--workers", type=int, default=1,
                   help="evaluations at once (0: in this process, without Ray)")
    p.add_argument("--cpus-per-eval", type=float, default=1.0)
    p.add_argument("--gpus-per-eval", type=float, default=0.0,
                   help="GPU share per evaluation (0.25 packs four per GPU)")
    p.add_argument("--eval-time-limit", type=float, default=1800.0, metavar="SECONDS")
    p.add_argument("--ray-address", default=os.environ.get("RAY_ADDRESS"),
                   help="Ray cluster to use (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--tracking-uri", help="MLflow server (default: SQLite in the run folder)")
    p.add_argument("--full-train-top", type=int, default=0, metavar="N",
                   help="then train the N best layers and the baselines fully; the search "
                   "gets --search-share (80%%) of --budget")
    p.add_argument("--search-share", type=float, default=0.8, metavar="F",
                   help="with --full-train-top, the share of --budget the search may spend; "
                   "full training gets the rest")
    p.add_argument("--full-train-config", metavar="FILE",
                   help="JSON object of `evonas train` settings for --full-train-top, "
                   'e.g. {"archs": ["resnet20"], "epochs": 10, "seeds": [0, 1]}')
    p.add_argument("--report-every", type=float, default=300.0, metavar="SECONDS",
                   help="rewrite RUN/report.html this often while searching")
    p.set_defaults(run=run_search, command="search")

    p = sub.add_parser("top", help="leaderboard of a search's run folder")
    p.add_argument("run_dir", metavar="RUN", help="run folder")
    p.add_argument("-n", type=int, default=10, help="how many layers")
    p.set_defaults(run=run_top, command="top")


def _config(args):
    from evonas.search.config import SearchConfig, StageConfig, proxy_sizes

    if args.budget is None or args.out is None:
        raise EvonasError("a new search needs --budget and --out (or --resume RUN)")
    sizes, stage_sizes = proxy_sizes(args.dataset, {
        "proxy_steps": args.proxy_steps, "proxy_batch_size": args.proxy_batch,
        "proxy_width": args.proxy_width, "quality_steps": args.quality_steps,
        "stability_steps": args.stability_steps})
    stages = StageConfig(quality_threshold=args.quality_threshold,
                         stability_threshold=args.stability_threshold, **stage_sizes)
    return SearchConfig(
        space=args.space, budget=args.budget, dataset=args.dataset,
        data_dir=os.path.abspath(args.data_dir) if args.data_dir else None, seed=args.seed,
        controller=args.controller, seed_zoo=args.seed_zoo, population_size=args.population,
        tournament_size=args.tournament, random_fraction=args.random_fraction,
        archs=args.archs, proxy_lr=args.proxy_lr, **sizes,
        workers=args.workers, cpus_per_eval=args.cpus_per_eval, gpus_per_eval=args.gpus_per_eval,
        eval_time_limit_s=args.eval_time_limit, ray_address=args.ray_address,
        tracking_uri=args.tracking_uri, report_every_s=args.report_every,
        full_train_top=args.full_train_top, search_share=args.search_share,
        full_train=_full_train(args), stages=stages)


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
        given = [f for f in ("out", "space", "full_train_config")
                 if getattr(args, f) not in (None, "norm_act")]
        if given:
            raise EvonasError(f"--resume continues with the run's own settings; drop --{given[0].replace('_', '-')}")
        search = Search.resume(args.resume, budget=args.budget)
    else:
        config = _config(args)
        if config.full_train_top:  # its settings fail now, not after the search
            from evonas.fulltrain import for_search

            for_search(config, args.budget)
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
    from evonas.search.driver import mean_fitness
    from evonas.search.results import load_run

    run = load_run(args.run_dir)
    archs = list(run.config.archs)
    statuses, stages = run.counts()
    print(f"{args.run_dir}: {sum(statuses.values())} evaluated; " +
          ", ".join(f"{k} {v}" for k, v in sorted(statuses.items())) +
          ("; rejected at " + ", ".join(f"{k} {v}" for k, v in stages.items()) if stages else ""))
    print(f"{'rank':>4}  {'id':<8} {'mean':>6}  " + "  ".join(f"{a[:12]:>12}" for a in archs)
          + "  formula")
    for rank, (cand, ev) in enumerate(run.leaderboard(args.n), 1):
        formula = symbolic.formula(Genome.from_dict(cand.genome)).replace("\n", "; ")
        print(f"{rank:>4}  {cand.candidate_id:<8} {mean_fitness(ev):>6.4f}  "
              + "  ".join(f"{ev.fitness[a]:>12.4f}" for a in archs) + f"  {formula}")
    return 0
