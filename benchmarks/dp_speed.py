"""DP-SGD step time divided by plain step time, measured side by side in one run.

    .venv/bin/python benchmarks/dp_speed.py [--objectives generative,byol] [--modes bookkeeping,hooks]
                                            [--batch 64] [--turns 4] [--steps-per-turn 5]

All arms run the same `fedssl.train.train_local` on the same windows with the default tiny
encoder, each on its own copy of the same freshly built objective; a DP arm (one per per-sample
gradient mode, `privacy.grad_sample_mode`) samples privacy units with probability batch/N
(expected batch = --batch), clips per-sample gradients and adds noise. The arms take turns (a
`train_local` call of --steps-per-turn steps each, like a short round) so that load on this shared
machine hits all alike; a first, unmeasured turn warms every arm up, then the median over --turns
turns is reported.

A Poisson batch varies in size, so every arm's time is per window trained, times --batch: the time
of a step of exactly --batch windows. Both the wall time and the CPU time of this (one-threaded)
process are reported; on a machine shared with other jobs the CPU time is the steadier measure of
the work a step does. Prints JSON; the issue's target is a ratio <= 1.6 for the default mode and
the default DP objective (generative: masked reconstruction).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import numpy as np

from fedssl.config import ObjectiveConfig, PrivacyConfig, Scenario, TrainConfig
from fedssl.data.windows import RecordInfo, WindowSet
from fedssl.objectives import Objective, build_objective
from fedssl.privacy import PrivacyError
from fedssl.train import train_local

TARGET_RATIO = 1.6


def windows(n: int, samples: int, seed: int = 0) -> WindowSet:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 12, samples)).astype(np.float32)
    return WindowSet(x, np.ones((n, 12), bool), np.arange(n), tuple(RecordInfo(f"r{i}", None, ()) for i in range(n)))


def seconds_per_step(objective: Objective, data: WindowSet, batch: int, steps: int, seed: int,
                     privacy: PrivacyConfig | None) -> tuple[float, float]:
    """(wall, CPU) seconds of a step of `objective` in a `steps`-step round, scaled to `batch` windows."""
    cpu = time.process_time()
    result = train_local(objective, data, TrainConfig(batch_size=batch), steps=steps, seed=seed, privacy=privacy)
    cpu = time.process_time() - cpu
    return result.seconds / result.examples * batch, cpu / result.examples * batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objectives", default="generative")
    parser.add_argument("--modes", default=PrivacyConfig.grad_sample_mode, help="comma-separated grad-sample modes")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--turns", type=int, default=4, help="measured turns per arm (after one warm-up turn)")
    parser.add_argument("--steps-per-turn", type=int, default=5)
    args = parser.parse_args()
    data = windows(10 * args.batch, round(Scenario().data.window_seconds * Scenario().data.sample_rate))
    modes = args.modes.split(",")
    results = {}
    for name in args.objectives.split(","):
        arms = {"plain": None, **{mode: PrivacyConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0,
                                                      grad_sample_mode=mode) for mode in modes}}
        scenario = dataclasses.replace(Scenario(), objective=ObjectiveConfig(name=name))
        objectives = {arm: build_objective(scenario) for arm in arms}  # same seed: same weights
        times, refused = {arm: [] for arm in arms}, {}
        for turn in range(args.turns + 1):
            for arm, privacy in arms.items():
                if arm in refused:
                    continue
                try:
                    measured = seconds_per_step(objectives[arm], data, args.batch, args.steps_per_turn, turn, privacy)
                except PrivacyError as err:  # e.g. ghost clipping of a layer that runs on two views
                    refused[arm] = str(err)
                    continue
                if turn:  # turn 0 warms up
                    times[arm].append(measured)
        times = {arm: t for arm, t in times.items() if arm not in refused}
        wall = {arm: statistics.median(t[0] for t in ts) for arm, ts in times.items()}
        cpu = {arm: statistics.median(t[1] for t in ts) for arm, ts in times.items()}
        results[name] = {"plain": {"wall_s_per_step": round(wall["plain"], 4), "cpu_s_per_step": round(cpu["plain"], 4)}}
        results[name] |= {mode: {"refused": why} for mode, why in refused.items()}
        for mode in (m for m in modes if m in times):
            results[name][mode] = {"wall_s_per_step": round(wall[mode], 4), "cpu_s_per_step": round(cpu[mode], 4),
                                   "wall_ratio": round(wall[mode] / wall["plain"], 3),
                                   "cpu_ratio": round(cpu[mode] / cpu["plain"], 3)}
    print(json.dumps({"batch": args.batch, "turns": args.turns, "steps_per_turn": args.steps_per_turn,
                      "target_ratio": TARGET_RATIO,
                      "default_grad_sample_mode": PrivacyConfig.grad_sample_mode, "results": results}, indent=2))


if __name__ == "__main__":
    main()
