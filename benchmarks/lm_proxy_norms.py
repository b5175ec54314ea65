"""The LM proxy on tiny Shakespeare with LayerNorm, RMSNorm and DyT: speed and bpc reached.

Trains the proxy LM (LM_PROXY: width 64, 2 pre-norm blocks, context 64, batch 32, AdamW)
once per layer, with the same seed (same initial weights elsewhere, same windows), and
reports the seconds per 100 training steps on the threads given and the validation bits
per character on the whole validation split after --steps steps. The figures size the
proxy's budget and justify its quality threshold. DyT is written here by hand
(Zhu et al., CVPR 2025: gamma * tanh(alpha * x) + beta, alpha a learnt scalar from 0.5).
--embed-std S trains the LM with embeddings drawn at std S and an untied head, to see
how much a layer that does not normalise depends on the scale of its input.

    OMP_NUM_THREADS=1 python benchmarks/lm_proxy_norms.py --data-dir DIR --threads 1 \
        --out benchmarks/results/lm_proxy_norms.json
    (with --embed-std 1.0: benchmarks/results/lm_proxy_norms_embed1.json)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch
from torch import nn

from evonas.proxy import models
from evonas.proxy.data import load_dataset
from evonas.proxy.train_transformer import LM_PROXY, LMTrainer
from evonas.proxy.transformer import transformer_lm


class DyT(nn.Module):
    def __init__(self, num_features: int, alpha: float = 0.5) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(alpha))
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * torch.tanh(self.alpha * x) + self.bias


LAYERS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm, "dyt": DyT}


def measure(name: str, data, config, seed: int) -> dict:
    trainer = LMTrainer(LAYERS[name], config, data, seed=seed)
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.train_until(config.steps)
    train_s, cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    bpc = trainer.evaluate()
    # CPU time too: on a shared machine wall time counts the waits for a core, and CPU time
    # of one thread is the closer estimate of the wall time on an idle one.
    return {"layer": name, "bpc": bpc, "s_per_100_steps": 100 * train_s / config.steps,
            "cpu_s_per_100_steps": 100 * cpu_s / config.steps,
            "eval_s": time.perf_counter() - start - train_s, "loss_curve": trainer.curve}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--embed-std", type=float,
                        help="embedding init std, with an untied head (default: 0.02, tied)")
    parser.add_argument("--out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.embed_std is not None:  # this process only: the LM with another input scale
        models.ARCHS["lm"] = (transformer_lm, {"embed_std": args.embed_std, "tie": False})
    data = load_dataset("shakespeare", args.data_dir)
    config = dataclasses.replace(LM_PROXY, steps=args.steps, eval_size=None)
    rows = [measure(name, data, config, args.seed) for name in LAYERS]
    for row in rows:
        print(f"{row['layer']:10s} bpc {row['bpc']:.3f}  {row['s_per_100_steps']:.2f} s/100 steps"
              f" ({row['cpu_s_per_100_steps']:.2f} CPU s)  eval {row['eval_s']:.1f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": config.to_dict(), "threads": args.threads,
                       "embed_std": args.embed_std, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
