"""Layer commands: `evonas zoo`, `ops`, `spaces`, `show`, `export` and `demo`.

SPEC names a layer: a zoo name (`evonorm_s0`), a genome JSON file (`found.json`), or a
candidate of a search's run folder (`runs/s1:c000042`, `runs/s1:best`).
"""

from __future__ import annotations

import argparse
import keyword
from pathlib import Path

from evonas.errors import EvonasError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("zoo", help="list the known layers with their formulas")
    p.set_defaults(run=run_zoo, command="zoo")

    p = sub.add_parser("ops", help="list the primitive ops and graph inputs")
    p.set_defaults(run=run_ops, command="ops")

    p = sub.add_parser("spaces", help="list the built-in search spaces, their layout "
                                      "(nchw, ntc) and which are causal")
    p.set_defaults(run=run_spaces, command="spaces")

    p = sub.add_parser("show", help="print a layer's formula (readable, LaTeX or genome JSON)")
    p.add_argument("spec", metavar="SPEC", help="zoo name, genome JSON file or RUN:ID")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--latex", action="store_true", help="print the formula as LaTeX")
    form.add_argument("--json", action="store_true", help="print the genome as JSON")
    p.set_defaults(run=run_show, command="show")

    p = sub.add_parser("export", help="write a layer as one standalone torch module file")
    p.add_argument("spec", metavar="SPEC", help="zoo name, genome JSON file or RUN:ID")
    p.add_argument("--out", required=True, metavar="FILE.py", help="file to write")
    p.add_argument("--class-name", metavar="NAME", help="class name (default from the layer name)")
    p.set_defaults(run=run_export, command="export")

    p = sub.add_parser("demo", help="tour of the layer tools: zoo, export, random graphs, mutation")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="where exported layers go")
    p.add_argument("--seed", type=int, default=0, help="seed of the random genomes shown")
    p.set_defaults(run=run_demo, command="demo")


def resolve_genome(spec: str):
    """The genome SPEC names: a zoo layer, a genome file or RUN:ID."""
    from evonas.layers import zoo
    from evonas.layers.genome import Genome
    from evonas.search.results import load_run, split_run_spec

    if spec in zoo.names():
        return zoo.get(spec)
    run_spec = split_run_spec(spec)
    if run_spec is not None:
        return load_run(run_spec[0]).genome(run_spec[1])
    path = Path(spec)
    if path.is_file():
        return Genome.load(path)
    raise EvonasError(f"{spec!r} is neither a zoo layer, a genome file nor RUN:ID; "
                      f"`evonas zoo` lists the layers ({', '.join(zoo.names()[:3])}, ...)")


def check_output_file(out: str, suffix: str = ".py") -> Path:
    path = Path(out)
    if path.suffix != suffix:
        raise EvonasError(f"--out {out}: the file name must end in {suffix}")
    if path.is_dir():
        raise EvonasError(f"--out {out} is a directory; give a file name like {out}/layer{suffix}")
    if not path.parent.is_dir():
        raise EvonasError(f"--out {out}: folder {path.parent} does not exist; create it first")
    return path


def check_class_name(name: str) -> str:
    if not name.isidentifier() or keyword.iskeyword(name):
        raise EvonasError(f"--class-name {name!r} is not a Python identifier; use e.g. MyNormAct")
    return name


def run_zoo(args) -> int:
    from evonas.layers import symbolic, zoo
    from evonas.layers.space import builtin_spaces, load_space

    spaces = [load_space(s) for s in builtin_spaces()]
    print(f"{'layer':<12} {'layout':<6} {'nodes':>5}  {'spaces':<30} formula "
          "(out = gamma * y + beta)")
    for name in zoo.names():
        g = zoo.get(name)
        member = ",".join(s.name for s in spaces if s.contains(g)) or "-"
        print(f"{name:<12} {g.layout:<6} {len(g):>5}  {member:<30} y = {symbolic.formula(g)}")
    return 0


def run_ops(args) -> int:
    from evonas.layers.ops import describe

    print(describe())
    return 0


def run_spaces(args) -> int:
    from evonas.layers.space import builtin_spaces, load_space

    for name in builtin_spaces():
        s = load_space(name)
        kind = "causal" if s.causal else "bidirectional" if s.layout == "ntc" else "-"
        print(f"{s.name:<17} {s.layout:<4} {kind:<13} {len(s.ops):>2} ops, <= {s.max_nodes} "
              f"nodes, {s.groups} groups: {s.description}")
    return 0


def run_show(args) -> int:
    from evonas.layers import symbolic
    from evonas.search.results import split_run_spec

    genome = resolve_genome(args.spec)
    if args.json:
        print(genome.to_json())
    elif args.latex:
        print(symbolic.latex(genome))
    else:
        print(symbolic.equation(genome))
        print(f"out = gamma * y + beta   ({len(genome)} nodes, hash {genome.structural_hash})")
        run_spec = split_run_spec(args.spec)
        if run_spec is not None:
            _show_candidate(*run_spec)
    return 0


def _show_candidate(path: str, cid: str) -> None:
    """A candidate's verdict, scores and lineage (ancestors with the mutation that made each)."""
    from evonas.search.results import load_run

    run = load_run(path)
    cand, ev = run.candidate(cid)
    print(f"candidate {cand.candidate_id}: {ev.status}", end="")
    if ev.reject_stage:
        print(f" at {ev.reject_stage}: {ev.reject_reason}", end="")
    if ev.duplicate_of:
        print(f" (equivalent to {ev.duplicate_of})", end="")
    print()
    if ev.fitness:
        from evonas.proxy.models import TEXT_ARCHS

        # An LM's fitness is -bits per character (train_transformer.lm_fitness).
        print("proxy fitness: " + ", ".join(
            f"{a} {v:.4f} ({-v:.4f} bits per character)" if a in TEXT_ARCHS
            else f"{a} {v:.4f} (accuracy)" for a, v in ev.fitness.items()))
    for line in _rung_lines(run, cand.candidate_id):
        print(line)
    cost = ", ".join(f"{stage} {sec:.1f}s" for stage, sec in ev.stage_seconds.items())
    print(f"cost: {cost}")
    lineage = []
    while cand is not None:
        lineage.append(f"{cand.candidate_id} ({cand.mutation})")
        cand = run.state.candidates.get(cand.parent_id) if cand.parent_id else None
    print("lineage: " + " <- ".join(lineage))


def _rung_lines(run, cid: str) -> list[str]:
    """The candidate's scores on the fidelity ladder beyond the proxy, one line a rung:
    the mean over the seeds trained and, for several, their spread."""
    results = run.state.rungs.get(cid, {})
    lines = []
    for steps in sorted({s for c, s in run.state.promoted if c == cid} | set(results)):
        r = results.get(steps)
        if r is None:
            lines.append(f"rung {steps} steps: promoted, not trained yet")
        elif not r.fitness:
            lines.append(f"rung {steps} steps: failed ({r.reason}), {r.seconds:.1f}s")
        else:
            spread = r.spread()
            lines.append(f"rung {steps} steps: " + ", ".join(
                f"{a} {v:.4f}" + (f" (mean of {len(r.scores[a])} seeds, std "
                                  f"{spread[a]['std']:.4f}, {spread[a]['min']:.4f}-"
                                  f"{spread[a]['max']:.4f})" if len(r.scores.get(a, [])) > 1
                                  else "")
                for a, v in r.fitness.items()) + f", {r.seconds:.1f}s")
    return lines


def run_export(args) -> int:
    from evonas.layers.export import default_class_name, export_file

    path = check_output_file(args.out)
    genome = resolve_genome(args.spec)
    class_name = check_class_name(args.class_name or default_class_name(genome))
    export_file(genome, path, class_name=class_name)
    print(f"wrote {path} (class {class_name})")
    return 0


def run_demo(args) -> int:
    from evonas.cli.demo import run

    return run(Path(args.out), seed=args.seed)
