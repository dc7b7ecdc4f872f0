"""Overhead of fedssl's training loop: its samples/s over a bare PyTorch loop's, side by side.

    .venv/bin/python benchmarks/throughput.py [--objective hybrid] [--steps 10] [--repeats 3]

Both loops train the same freshly built objective (same weights) on the same batch indices
(`fedssl.train.batches` with the same seed) with the same AdamW settings, gradient clipping and
`after_step`; the bare loop leaves out everything else `train_local` does (loss bookkeeping,
finiteness checks, patient groups). Repetitions alternate between the two, so that load from
other processes on the machine hits both alike. Prints JSON; the target ratio is >= 0.90.

It also reports the model FLOP/s that `train_local` achieves against the machine's fp32 matmul
rate at the same thread count, measured in each repetition too (target >= 0.35). FLOPs per step
are counted once with torch's FlopCounterMode (forward + backward of the objective, matmuls and
attention; elementwise ops count zero, as usual); attention is counted over all tokens of a
batch, masked ones included, since that is the work the kernel does. The time spent waiting for
batches and in the augmentations is reported as a fraction of `train_local`'s time.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import (
    FlopCounterMode,
    sdpa_backward_flop_count,
    sdpa_flop_count,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedssl.config import ObjectiveConfig, Scenario
from fedssl.data.windows import RecordInfo, WindowSet
from fedssl.objectives import build_objective
from fedssl.train import batches, train_local


def synthetic_windows(n: int, samples: int, seed: int = 0) -> WindowSet:
    rng = np.random.default_rng(seed)
    t = np.arange(samples) / 100.0
    freq, phase = rng.uniform(0.5, 8.0, (n, 12, 2, 1)), rng.uniform(0, 2 * np.pi, (n, 12, 2, 1))
    windows = (np.sin(2 * np.pi * freq * t + phase).sum(2) + 0.1 * rng.standard_normal((n, 12, samples)))
    records = tuple(RecordInfo(f"r{i}", None, ()) for i in range(n))
    return WindowSet(windows.astype(np.float32), np.ones((n, 12), bool), np.arange(n), records)


def bare_loop(objective, data: WindowSet, cfg, steps: int, seed: int) -> float:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    windows, mask = torch.from_numpy(data.windows), torch.from_numpy(data.lead_mask)
    objective.train()
    start = time.perf_counter()
    for index in batches(len(data), cfg.batch_size, steps, rng):
        index = torch.from_numpy(index)
        optimizer.zero_grad(set_to_none=True)
        objective(windows[index], mask[index])["loss"].backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.grad_clip)
        optimizer.step()
        objective.after_step()
    return time.perf_counter() - start


def step_flops(scenario: Scenario, data: WindowSet, batch_size: int) -> int:
    """Forward + backward FLOPs of one training step of a fresh objective on a full batch."""
    objective = build_objective(scenario)
    index = torch.arange(min(batch_size, len(data)))
    attention = {  # torch 2.13's counter knows the GPU attention kernels only; these are the CPU ones
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, **kwargs: sdpa_flop_count(q, k, v),
        torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *args, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
    }
    with FlopCounterMode(display=False, custom_mapping=attention) as counter:
        objective(torch.from_numpy(data.windows)[index], torch.from_numpy(data.lead_mask)[index])["loss"].backward()
    return counter.get_total_flops()


def matmul_seconds(size: int, count: int) -> float:
    """Seconds for `count` fp32 (size x size) @ (size x size) products: 2 size^3 FLOPs each."""
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator) for _ in range(2))
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(count):
        a @ b
    return time.perf_counter() - start


class Timed:
    """A callable that adds up the seconds spent in `function` (here: the augmentations)."""

    def __init__(self, function) -> None:
        self.function, self.seconds = function, 0.0

    def __call__(self, *args):
        start = time.perf_counter()
        result = self.function(*args)
        self.seconds += time.perf_counter() - start
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", default="hybrid")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--windows", type=int, default=256)
    parser.add_argument("--matmul-size", type=int, default=1024)
    parser.add_argument("--matmuls", type=int, default=20, help="matmuls per repetition")
    args = parser.parse_args()
    scenario = dataclasses.replace(Scenario(), objective=ObjectiveConfig(name=args.objective))
    cfg = scenario.train
    data = synthetic_windows(args.windows, round(scenario.data.window_seconds * scenario.data.sample_rate))
    torch.set_num_threads(cfg.threads)
    flops = step_flops(scenario, data, cfg.batch_size)  # also the warm-up step
    seconds = {"train_local": 0.0, "bare": 0.0, "matmul": 0.0}
    waiting = augmenting = 0.0
    for repeat in range(args.repeats):
        order = ("train_local", "bare", "matmul") if repeat % 2 == 0 else ("matmul", "bare", "train_local")
        for name in order:
            if name == "matmul":
                seconds[name] += matmul_seconds(args.matmul_size, args.matmuls)
                continue
            objective = build_objective(scenario)
            if name == "bare":
                seconds[name] += bare_loop(objective, data, cfg, args.steps, seed=repeat)
            else:
                augment = objective.augment = Timed(objective.augment) if hasattr(objective, "augment") else None
                result = train_local(objective, data, cfg, steps=args.steps, seed=repeat)
                seconds[name] += result.seconds
                waiting += result.data_seconds
                augmenting += augment.seconds if augment else 0.0
    steps = args.repeats * args.steps
    samples = steps * min(cfg.batch_size, len(data))
    rates = {k: samples / seconds[k] for k in ("train_local", "bare")}
    model_rate = flops * steps / seconds["train_local"]
    matmul_rate = 2 * args.matmul_size ** 3 * args.matmuls * args.repeats / seconds["matmul"]
    print(json.dumps({
        "objective": args.objective, "encoder": f"{scenario.model.encoder} {scenario.model.size}",
        "batch_size": cfg.batch_size, "window_samples": data.window_samples, "steps": args.steps,
        "repeats": args.repeats, "threads": cfg.threads,
        "samples_per_second": {k: round(v, 2) for k, v in rates.items()},
        "ratio": round(rates["train_local"] / rates["bare"], 4),
        "meets_target": rates["train_local"] / rates["bare"] >= 0.90,
        "gflop_per_step": round(flops / 1e9, 3),
        "model_gflop_per_second": round(model_rate / 1e9, 2),
        "matmul_gflop_per_second": round(matmul_rate / 1e9, 2),
        "fraction_of_matmul": round(model_rate / matmul_rate, 4),
        "meets_flops_target": model_rate / matmul_rate >= 0.35,
        "data_wait_fraction": round(waiting / seconds["train_local"], 5),
        "augment_fraction": round(augmenting / seconds["train_local"], 4),
    }, indent=2))


if __name__ == "__main__":
    main()
