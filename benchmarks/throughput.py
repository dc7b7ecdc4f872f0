"""Overhead of fedssl's training loop: its samples/s over a bare PyTorch loop's, side by side.

    .venv/bin/python benchmarks/throughput.py [--objective hybrid] [--steps 10] [--repeats 3]

Both loops train the same freshly built objective (same weights) on the same batch indices
(`fedssl.train.batches` with the same seed) with the same AdamW settings, gradient clipping and
`after_step`; the bare loop leaves out everything else `train_local` does (loss bookkeeping,
finiteness checks, patient groups). Repetitions alternate between the two, so that load from
other processes on the machine hits both alike. Prints JSON; the target ratio is >= 0.90.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", default="hybrid")
    parser.add_argument("--steps", type=int, default=10, help="steps per timed repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--windows", type=int, default=256)
    args = parser.parse_args()
    scenario = dataclasses.replace(Scenario(), objective=ObjectiveConfig(name=args.objective))
    cfg = scenario.train
    data = synthetic_windows(args.windows, round(scenario.data.window_seconds * scenario.data.sample_rate))
    torch.set_num_threads(cfg.threads)
    seconds = {"train_local": 0.0, "bare": 0.0}
    build_objective(scenario)(*(torch.from_numpy(a[:2]) for a in (data.windows, data.lead_mask)))  # warm-up
    for repeat in range(args.repeats):
        order = ("train_local", "bare") if repeat % 2 == 0 else ("bare", "train_local")
        for name in order:
            objective = build_objective(scenario)
            if name == "bare":
                seconds[name] += bare_loop(objective, data, cfg, args.steps, seed=repeat)
            else:
                seconds[name] += train_local(objective, data, cfg, steps=args.steps, seed=repeat).seconds
    samples = args.repeats * args.steps * min(cfg.batch_size, len(data))
    rates = {k: samples / v for k, v in seconds.items()}
    print(json.dumps({
        "objective": args.objective, "encoder": scenario.model.encoder, "batch_size": cfg.batch_size,
        "window_samples": data.window_samples, "steps": args.steps, "repeats": args.repeats,
        "threads": cfg.threads,
        "samples_per_second": {k: round(v, 2) for k, v in rates.items()},
        "ratio": round(rates["train_local"] / rates["bare"], 4),
        "meets_target": rates["train_local"] / rates["bare"] >= 0.90,
    }, indent=2))


if __name__ == "__main__":
    main()
