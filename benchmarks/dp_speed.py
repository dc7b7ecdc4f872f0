"""DP-SGD step time divided by plain step time, measured side by side in one run.

    .venv/bin/python benchmarks/dp_speed.py [--objectives generative,byol] [--batch 64] [--reps 3] [--steps 4]

Both arms run the same `fedssl.train.train_local` on the same windows with the default tiny
encoder; the DP arm samples privacy units with probability batch/N (expected batch = --batch),
clips per-sample gradients and adds noise. Repetitions alternate between the arms so that load on
this shared machine hits both alike. Prints JSON; the issue's target is a ratio <= 1.6.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

import numpy as np

from fedssl.config import ObjectiveConfig, PrivacyConfig, Scenario, TrainConfig
from fedssl.data.windows import RecordInfo, WindowSet
from fedssl.objectives import build_objective
from fedssl.train import train_local


def windows(n: int, samples: int, seed: int = 0) -> WindowSet:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 12, samples)).astype(np.float32)
    return WindowSet(x, np.ones((n, 12), bool), np.arange(n), tuple(RecordInfo(f"r{i}", None, ()) for i in range(n)))


def seconds_per_step(objective_name: str, data: WindowSet, batch: int, steps: int, privacy: PrivacyConfig | None) -> float:
    scenario = dataclasses.replace(Scenario(), objective=ObjectiveConfig(name=objective_name))
    result = train_local(build_objective(scenario), data, TrainConfig(batch_size=batch), steps=steps, seed=0,
                         privacy=privacy)
    return result.seconds / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--objectives", default="generative")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    scenario = Scenario()
    data = windows(10 * args.batch, round(scenario.data.window_seconds * scenario.data.sample_rate))
    privacy = PrivacyConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0)
    results = {}
    for name in args.objectives.split(","):
        plain, private = [], []
        for _ in range(args.reps):
            plain.append(seconds_per_step(name, data, args.batch, args.steps, None))
            private.append(seconds_per_step(name, data, args.batch, args.steps, privacy))
        results[name] = {"plain_s_per_step": round(statistics.median(plain), 4),
                         "dp_s_per_step": round(statistics.median(private), 4),
                         "ratio": round(statistics.median(private) / statistics.median(plain), 3),
                         "target": 1.6}
    print(json.dumps({"batch": args.batch, "grad_sample_mode": privacy.grad_sample_mode, "results": results}, indent=2))


if __name__ == "__main__":
    main()
