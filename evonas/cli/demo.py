"""`evonas demo`: a short tour of the layer tools, runnable on any machine in seconds.

Exports every zoo layer as standalone code, checks each export against the interpreter,
then draws a random layer of the norm_act space and a few mutations of it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from evonas.layers import mutation, symbolic, zoo
from evonas.layers.export import default_class_name, export_file
from evonas.layers.interpreter import GenomeLayer
from evonas.layers.space import load_space


def _load_class(path: Path, class_name: str):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return getattr(module, class_name)


def _export_and_check(genome, out: Path, x: torch.Tensor) -> float:
    """Export the genome, run both forms on x, return the largest output difference."""
    class_name = default_class_name(genome)
    path = out / f"{genome.name}.py"
    export_file(genome, path, class_name=class_name)
    if genome.layout == "ntc":  # the same numbers as (N, H*W tokens, C features)
        x = x.flatten(2).transpose(1, 2)
    c = x.size(-1) if genome.layout == "ntc" else x.size(1)
    interpreted = GenomeLayer(genome, c, groups=8)
    exported = _load_class(path, class_name)(c, groups=8)
    exported.load_state_dict(interpreted.state_dict())
    return (exported(x) - interpreted(x)).abs().max().item()


def run(out: Path, seed: int = 0) -> int:
    out.mkdir(parents=True, exist_ok=True)
    x = torch.randn(8, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    print(f"Known layers, exported to {out}/ and checked against the interpreter:")
    for name in zoo.names():
        genome = zoo.get(name)
        diff = _export_and_check(genome, out, x)
        print(f"  {name:<11} max |exported - interpreted| = {diff:.1e}   y = {symbolic.formula(genome)}")

    space = load_space("norm_act")
    rng = np.random.default_rng(seed)
    genome = mutation.random_genome(space, rng)
    print(f"\nA random layer of space {space.name} (seed {seed}), {len(genome)} nodes:")
    print("  " + symbolic.equation(genome).replace("\n", "\n  "))
    for _ in range(3):
        genome, how = mutation.mutate(genome, space, rng)
        print(f"  after {how:<12} y = {symbolic.formula(genome)}")
    print("\nNext: `evonas show evonorm_s0 --latex`, `evonas export evonorm_b0 --out b0.py`.")
    return 0
