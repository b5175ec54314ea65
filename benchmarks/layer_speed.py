"""Training-step time of a CIFAR ResNet with each zoo layer, in every form side by side.

Forms: hand-written formula (benchmarks/handwritten.py), torch's fused module for the
classic layers (native), evonas's exported code, evonas's interpreter, and the exported
code under torch.compile. Each round times every form for the same number of steps on
the same CIFAR-10 batches, in an order rotated between rounds; ratios are taken within a
round and the median over rounds is reported, so machine noise hits all forms alike.

    python ../shared/data/prepare_cifar10.py /tmp/cifar10
    python benchmarks/layer_speed.py --data-dir /tmp/cifar10 --out benchmarks/results/layer_speed.json

`--device cuda` times the same on a GPU (benchmarks/gpu_check.sh); `--dataset synthetic`
needs no CIFAR-10 folder (the step time does not depend on the pictures).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from handwritten import NATIVE, HandLayer  # noqa: E402

from evonas.layers import zoo  # noqa: E402
from evonas.layers.export import export_file  # noqa: E402
from evonas.layers.interpreter import GenomeLayer  # noqa: E402
from evonas.proxy.data import load_dataset  # noqa: E402
from evonas.proxy.models import resnet  # noqa: E402


def exported_class(genome, folder: Path):
    path = folder / f"{genome.name}.py"
    export_file(genome, path, class_name="Layer")
    spec = importlib.util.spec_from_file_location(f"exported_{genome.name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile re-imports the module by name
    spec.loader.exec_module(module)
    return module.Layer


def make_step(model, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def time_steps(step, batches) -> float:
    sync(batches)
    start = time.perf_counter()
    for x, y in batches:
        step(x, y)
    sync(batches)
    return (time.perf_counter() - start) / len(batches)


def sync(batches) -> None:
    # CUDA kernels run asynchronously: wait for them, so the clock measures the work.
    if batches[0][0].is_cuda:
        torch.cuda.synchronize()


def forms_for(name: str, folder: Path, args) -> dict:
    genome = zoo.get(name)
    width, depth, groups = args.width, args.depth, args.groups
    factories = {
        "formula": partial(HandLayer, name, groups=groups),
        "exported": partial(exported_class(genome, folder), groups=groups),
        "interpreted": partial(GenomeLayer, genome, groups=groups),
    }
    if name in NATIVE:
        factories["native"] = partial(HandLayer, name, groups=groups, native=True)
    steps = {}
    for form, factory in factories.items():
        torch.manual_seed(0)  # same initial conv weights for every form
        steps[form] = make_step(resnet(factory, width=width, depth=depth).to(args.device))
    if args.compile:
        # Every layer recompiles the same ResNet.forward: without a reset, dynamo's
        # recompile limit (8) silently falls back to eager from the ninth layer on.
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = resnet(factories["exported"], width=width, depth=depth).to(args.device)
        steps["exported+compile"] = make_step(torch.compile(model))
    return steps


def bench_layer(name: str, batches, folder: Path, args) -> dict:
    steps = forms_for(name, folder, args)
    for step in steps.values():  # warm-up (and compilation) outside the timed rounds
        for x, y in batches[:2]:
            step(x, y)
    order = list(steps)
    rounds = {form: [] for form in order}
    for r in range(args.rounds):
        rotated = order[r % len(order):] + order[:r % len(order)]
        for form in rotated:
            rounds[form].append(time_steps(steps[form], batches))
    ms = {form: 1000 * statistics.median(t) for form, t in rounds.items()}

    def ratio(a, b):
        return statistics.median(x / y for x, y in zip(rounds[a], rounds[b]))

    result = {"layer": name, "ms_per_step": ms,
              "exported_vs_formula": ratio("exported", "formula"),
              "interpreted_vs_exported": ratio("interpreted", "exported")}
    if "native" in rounds:
        result["exported_vs_native"] = ratio("exported", "native")
    if "exported+compile" in rounds:
        result["compiled_vs_eager"] = ratio("exported+compile", "exported")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="CIFAR-10 folder (with --dataset cifar10)")
    p.add_argument("--dataset", default="cifar10", choices=("cifar10", "synthetic"))
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--layers", nargs="*", default=None, help="zoo names (default: all)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5, help="timed steps per form per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--depth", type=int, default=8)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true", help="also time exported code under torch.compile")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_dataset(args.dataset, args.data_dir, download=False)
    batches = [(data.train_x[i * args.batch:(i + 1) * args.batch].to(args.device),
                data.train_y[i * args.batch:(i + 1) * args.batch].to(args.device))
               for i in range(args.steps)]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.layers or zoo.names():
            r = bench_layer(name, batches, Path(tmp), args)
            results.append(r)
            ms = "  ".join(f"{k} {v:.1f}" for k, v in r["ms_per_step"].items())
            print(f"{name:<11} ms/step: {ms}  | exported/formula {r['exported_vs_formula']:.3f}"
                  f"  interpreted/exported {r['interpreted_vs_exported']:.3f}"
                  + (f"  exported/native {r['exported_vs_native']:.3f}" if "exported_vs_native" in r else "")
                  + (f"  compiled/eager {r['compiled_vs_eager']:.3f}" if "compiled_vs_eager" in r else ""),
                  flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in vars(args).items() if k != "out"}
        meta["torch"] = torch.__version__
        if batches[0][0].is_cuda:
            meta["gpu"] = torch.cuda.get_device_name(batches[0][0].device)
        args.out.write_text(json.dumps({"config": meta, "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
