"""Training-step time of a network with each zoo layer, in every form side by side.

Forms: hand-written formula (benchmarks/handwritten.py), torch's fused module for the
classic layers (native), evonas's exported code, evonas's interpreter, and the exported
code under torch.compile. Each round times every form for the same amount of work, in an
order rotated between rounds; ratios are taken within a round and the median over rounds
is reported (with the smallest and largest), so machine noise hits all forms alike.

Two networks:
- `--model resnet` (default): a CIFAR ResNet with a conv (nchw) layer in every BN-ReLU
  position, training steps on the same CIFAR-10 batches.
- `--model lm`: the LM proxy (evonas/proxy/transformer.py at LM_PROXY's width 64, batch 32,
  context 64) with a sequence (ntc) layer in every LayerNorm position, trained and
  evaluated by the search's own LMTrainer: training steps (forward, backward, gradient
  clipping, AdamW) and the validation forward; then the layer alone, forward and backward
  and eval forward, on an (N, T, C) tensor of the LM's shape. Before timing, every form is
  checked to compute the exported layer's output on a random input with random parameters.

    python ../shared/data/prepare_cifar10.py /tmp/cifar10
    python benchmarks/layer_speed.py --data-dir /tmp/cifar10 --out benchmarks/results/layer_speed.json
    OMP_NUM_THREADS=1 python benchmarks/layer_speed.py --model lm --data-dir ../shared/data \\
        --threads 1 --out benchmarks/results/layer_speed_lm.json

`--device cuda` times the same on a GPU (benchmarks/gpu_check.sh); `--dataset synthetic`
(resnet) or `synthetic_text` (lm) needs no data folder (the step time does not depend on
the pictures or characters, only the LM's head on the vocabulary size).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import inspect
import json
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from handwritten import NATIVE, SEQUENCE, SEQUENCE_NATIVE, HandLayer  # noqa: E402

from evonas.layers import zoo  # noqa: E402
from evonas.layers.export import export_file  # noqa: E402
from evonas.layers.interpreter import GenomeLayer  # noqa: E402
from evonas.proxy.data import load_dataset  # noqa: E402
from evonas.proxy.models import resnet  # noqa: E402
from evonas.proxy.train_transformer import LM_PROXY, LMTrainer  # noqa: E402
from evonas.proxy.transformer import transformer_lm  # noqa: E402

# (ratio key, numerator form, denominator form), reported where a layer has both forms
RATIOS = (("exported_vs_formula", "exported", "formula"),
          ("interpreted_vs_exported", "interpreted", "exported"),
          ("exported_vs_native", "exported", "native"),
          ("compiled_vs_eager", "exported+compile", "exported"))

DEFAULTS = {  # per --model: what the option means when it is not given
    "resnet": {"dataset": "cifar10", "width": 16, "batch": 128},
    "lm": {"dataset": "shakespeare", "width": LM_PROXY.width, "batch": LM_PROXY.batch_size},
}


# --- timing, shared by both networks ----------------------------------------------------


def sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: wait for them, so the clock measures the work.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(work: Callable[[], None], units: int, device: torch.device) -> float:
    """Seconds per unit of one call of work(), which does `units` units."""
    sync(device)
    start = time.perf_counter()
    work()
    sync(device)
    return (time.perf_counter() - start) / units


def interleaved(timers: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each form's time in each round; the forms run one after another in every round, in
    an order rotated between rounds, so no form always follows the same one."""
    order = list(timers)
    times = {form: [] for form in order}
    for r in range(rounds):
        k = r % len(order)
        for form in order[k:] + order[:k]:
            times[form].append(timers[form]())
    return times


def summary(times: dict[str, list[float]], unit: str = "ms") -> dict:
    """Median time per form (per step, or per call of a layer alone), and each ratio's
    median over rounds with its [min, max]."""
    scale = {"ms": 1e3, "us": 1e6}[unit]
    out = {f"{unit}_per_step": {form: scale * statistics.median(t) for form, t in times.items()}}
    spread = {}
    for key, a, b in RATIOS:
        if a in times and b in times:
            per_round = [x / y for x, y in zip(times[a], times[b])]
            out[key] = statistics.median(per_round)
            spread[key] = [min(per_round), max(per_round)]
    out["ratio_range"] = spread
    return out


def summary_line(label: str, s: dict) -> str:
    unit = next(k for k in s if k.endswith("_per_step"))
    ms = "  ".join(f"{k} {v:.{1 if unit.startswith('ms') else 0}f}" for k, v in s[unit].items())
    ratios = "  ".join(f"{key.replace('_vs_', '/')} {s[key]:.3f}"
                       f" [{s['ratio_range'][key][0]:.3f}, {s['ratio_range'][key][1]:.3f}]"
                       for key, _, _ in RATIOS if key in s)
    return f"{label:<24} {unit.split('_')[0]}: {ms}  | {ratios}"


def exported_class(genome, folder: Path):
    path = folder / f"{genome.name}.py"
    export_file(genome, path, class_name="Layer")
    spec = importlib.util.spec_from_file_location(f"exported_{genome.name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # torch.compile re-imports the module by name
    spec.loader.exec_module(module)
    return module.Layer


# --- ResNet, conv layers ----------------------------------------------------------------


def make_step(model, lr=0.05):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss

    return step


def run_steps(step, batches) -> None:
    for x, y in batches:
        step(x, y)


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
        run_steps(step, batches[:2])
    timers = {form: partial(timed, partial(run_steps, step, batches), len(batches), args.device)
              for form, step in steps.items()}
    result = {"layer": name, **summary(interleaved(timers, args.rounds))}
    print(summary_line(name, result), flush=True)
    return result


def bench_resnet(args) -> list[dict]:
    data = load_dataset(args.dataset, args.data_dir, download=False)
    batches = [(data.train_x[i * args.batch:(i + 1) * args.batch].to(args.device),
                data.train_y[i * args.batch:(i + 1) * args.batch].to(args.device))
               for i in range(args.steps)]
    with tempfile.TemporaryDirectory() as tmp:
        return [bench_layer(name, batches, Path(tmp), args)
                for name in args.layers or zoo.names("nchw")]


# --- LM proxy, sequence layers -----------------------------------------------------------


def sequence_forms(name: str, folder: Path) -> dict[str, Callable]:
    """norm_layer(C) of each form of a sequence layer."""
    forms = {"exported": exported_class(zoo.get(name), folder), "interpreted": zoo.factory(name)}
    if name in SEQUENCE:
        forms["formula"] = SEQUENCE[name]
    if name in SEQUENCE_NATIVE:
        forms["native"] = SEQUENCE_NATIVE[name]
    return forms


def check_same(forms: dict[str, Callable], shape: tuple[int, ...], device) -> dict[str, float]:
    """Largest |difference| of each form's output from the exported layer's, all with the
    same random parameters, on a random input; exits when one is not the same function."""
    gen = torch.Generator().manual_seed(0)
    ref = forms["exported"](shape[-1]).to(device)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5 + p.detach().cpu())
    state = ref.state_dict()
    x = torch.randn(shape, generator=gen).to(device)
    with torch.no_grad():
        expected = ref(x)
        diffs = {}
        for form, factory in forms.items():
            m = factory(shape[-1]).to(device)
            missing = set(state) - set(m.state_dict())
            m.load_state_dict({k: v for k, v in state.items() if k not in missing})
            out = m(x)
            if missing == {"bias"}:  # nn.RMSNorm: the bias torch's module lacks
                out = out + state["bias"]
            elif missing:
                raise SystemExit(f"{form} form lacks parameters {sorted(missing)}")
            diffs[form] = float((out - expected).abs().max())
            if not torch.allclose(out, expected, rtol=1e-4, atol=1e-5):
                raise SystemExit(f"{form} form differs from the exported layer by {diffs[form]:.3g}")
    return diffs


def lm_timers(forms: dict[str, Callable], data, args) -> tuple[dict, dict]:
    """Training-step and validation timers of one LMTrainer per form, warmed up."""
    warm = 2
    config = dataclasses.replace(LM_PROXY, width=args.width, batch_size=args.batch,
                                 steps=warm + args.rounds * args.steps)
    trainers = {form: LMTrainer(factory, config, data, seed=0, device=args.device)
                for form, factory in forms.items()}

    def train(trainer):
        trainer.train_until(trainer.steps_done + args.steps)
        if trainer.reason is not None:  # a stopped run would time nothing
            raise SystemExit(f"training stopped: {trainer.reason}")

    def evaluate(trainer):
        for _ in range(args.eval_steps):
            trainer.evaluate()

    for trainer in trainers.values():  # warm-up outside the timed rounds
        trainer.train_until(warm)
        trainer.evaluate()
    return ({form: partial(timed, partial(train, t), args.steps, args.device)
             for form, t in trainers.items()},
            {form: partial(timed, partial(evaluate, t), args.eval_steps, args.device)
             for form, t in trainers.items()})


def layer_timers(forms: dict[str, Callable], shape: tuple[int, ...], args) -> tuple[dict, dict]:
    """The layer alone on a (N, T, C) tensor: forward and backward (gradients of the input
    and the parameters, as inside the network), and the forward in eval mode."""
    x = torch.randn(shape, device=args.device, requires_grad=True)
    grad = torch.randn(shape, device=args.device)
    modules = {form: factory(shape[-1]).to(args.device) for form, factory in forms.items()}

    def train(m):
        inputs = [x, *m.parameters()]
        for _ in range(args.layer_iters):
            torch.autograd.grad(m(x), inputs, grad)

    def evaluate(m):
        with torch.no_grad():
            for _ in range(args.layer_iters):
                m(x)

    def mode(m, training, work):
        m.train(training)
        return timed(partial(work, m), args.layer_iters, args.device)

    for m in modules.values():  # warm-up outside the timed rounds
        m.train()
        train(m)
    return ({form: partial(mode, m, True, train) for form, m in modules.items()},
            {form: partial(mode, m, False, evaluate) for form, m in modules.items()})


def bench_lm_layer(name: str, data, folder: Path, args) -> dict:
    forms = sequence_forms(name, folder)
    context = inspect.signature(transformer_lm).parameters["context"].default  # "lm" keeps it
    shape = (args.batch, context, args.width)
    result = {"layer": name, "max_abs_diff": check_same(forms, shape, args.device)}
    train, evaluate = lm_timers(forms, data, args)
    result["train_step"] = summary(interleaved(train, args.rounds))
    result["eval_forward"] = summary(interleaved(evaluate, args.rounds))
    train, evaluate = layer_timers(forms, shape, args)
    result["layer_train"] = summary(interleaved(train, args.rounds), unit="us")
    result["layer_eval"] = summary(interleaved(evaluate, args.rounds), unit="us")
    for part in ("train_step", "eval_forward", "layer_train", "layer_eval"):
        print(summary_line(f"{name} {part}", result[part]), flush=True)
    return result


def bench_lm(args) -> list[dict]:
    data = load_dataset(args.dataset, args.data_dir, download=False)
    with tempfile.TemporaryDirectory() as tmp:
        return [bench_lm_layer(name, data, Path(tmp), args)
                for name in args.layers or list(SEQUENCE)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet", choices=tuple(DEFAULTS),
                   help="resnet: conv layers in a CIFAR ResNet; lm: sequence layers in the LM proxy")
    p.add_argument("--data-dir", help="CIFAR-10 folder, or the folder of tiny Shakespeare")
    p.add_argument("--dataset", choices=("cifar10", "synthetic", "shakespeare", "synthetic_text"),
                   help="default: cifar10 (resnet), shakespeare (lm)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--layers", nargs="*", default=None,
                   help="zoo names (default: every conv layer; for lm, layernorm rmsnorm dyt)")
    p.add_argument("--batch", type=int, help="default: 128 (resnet), 32 (lm)")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per form per round")
    p.add_argument("--eval-steps", type=int, default=2,
                   help="lm: validation passes (LM_PROXY's 256 windows) per form per round")
    p.add_argument("--layer-iters", type=int, default=200,
                   help="lm: calls of the layer alone per form per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--width", type=int, help="default: 16 (resnet), 64 (lm)")
    p.add_argument("--depth", type=int, default=8, help="resnet depth")
    p.add_argument("--groups", type=int, default=8, help="resnet: the conv layers' groups")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--compile", action="store_true",
                   help="resnet: also time exported code under torch.compile")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    for key, value in DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.model == "lm" and args.compile:
        p.error("--compile applies to --model resnet only")
    args.device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    results = bench_lm(args) if args.model == "lm" else bench_resnet(args)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in vars(args).items() if k != "out"}
        meta["torch"] = torch.__version__
        if args.device.type == "cuda":
            meta["gpu"] = torch.cuda.get_device_name(args.device)
        args.out.write_text(json.dumps({"config": meta, "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
