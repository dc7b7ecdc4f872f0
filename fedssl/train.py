"""The single local training loop: centralized, local-only and federated training all call it."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fedssl.config import TrainConfig
from fedssl.data.windows import WindowSet
from fedssl.objectives.base import Objective

log = logging.getLogger("fedssl.train")


@dataclass(frozen=True)
class TrainResult:
    examples: int  # windows seen (with repetition): the budget that baselines must match
    steps: int
    losses: dict[str, float]  # mean of each loss term over the steps
    seconds: float


def batches(n: int, batch_size: int, steps: int, rng: np.random.Generator):
    """Index arrays of `steps` batches: shuffled epochs, restarted when exhausted."""
    batch_size = min(batch_size, n)
    order = rng.permutation(n)
    position = 0
    for _ in range(steps):
        if position + batch_size > n:
            order, position = rng.permutation(n), 0
        yield np.sort(order[position : position + batch_size])  # sorted: contiguous reads
        position += batch_size


def train_local(objective: Objective, data: WindowSet, cfg: TrainConfig, *, steps: int, seed: int,
                on_step: Callable[[int, dict[str, float]], None] | None = None) -> TrainResult:
    """Run `steps` optimizer steps of `objective` on `data`; the same seed gives the same result."""
    if len(data) == 0:
        raise ValueError("no training windows")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(objective.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    windows, lead_mask = torch.from_numpy(data.windows), torch.from_numpy(data.lead_mask)
    objective.train()
    totals: dict[str, float] = {}
    examples = 0
    start = time.perf_counter()
    for step, index in enumerate(batches(len(data), cfg.batch_size, steps, rng), start=1):
        index = torch.from_numpy(index)
        terms = objective(windows[index], lead_mask[index])
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.grad_clip)
        optimizer.step()
        values = {k: v.item() for k, v in terms.items()}
        if not np.isfinite(values["loss"]):
            raise FloatingPointError(f"loss became {values['loss']} at step {step}")
        for k, v in values.items():
            totals[k] = totals.get(k, 0.0) + v
        examples += len(index)
        if on_step:
            on_step(step, values)
    done = max(steps, 1)
    return TrainResult(examples, steps, {k: v / done for k, v in totals.items()}, time.perf_counter() - start)
