"""The single local training loop: centralized, local-only and federated training all call it."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from fedssl.config import ConfigError, PrivacyConfig, TrainConfig
from fedssl.data.windows import WindowSet
from fedssl.federated import proximal_term
from fedssl.objectives.base import Objective
from fedssl.privacy import PrivacyLedger, begin_private_round, privacy_units

log = logging.getLogger("fedssl.train")


@dataclass(frozen=True)
class TrainResult:
    examples: int  # windows seen (with repetition): the budget that baselines must match
    steps: int
    losses: dict[str, float]  # mean of each loss term over the steps
    seconds: float
    data_seconds: float = 0.0  # of `seconds`, spent waiting for batches (sampling and gathering windows)


LR_SCHEDULES = ("cosine", "constant")


def learning_rate_at(step: int, planned_steps: int, cfg: TrainConfig) -> float:
    """The learning rate of global step `step` (0-based) of `planned_steps`: a linear warm-up over
    `warmup_fraction` of them, then a cosine decay towards zero (Loshchilov & Hutter, "SGDR",
    ICLR 2017; with warm-up as in Goyal et al. 2017 and MAE). The value depends on the step's
    position in the whole training only, so a federated round continues where the previous round
    left off and a resumed run finds the same rate again."""
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise ConfigError(f"train.lr_schedule: unknown schedule {cfg.lr_schedule!r}; known: {list(LR_SCHEDULES)}")
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    warmup = round(cfg.warmup_fraction * planned_steps)
    if step < warmup:
        return cfg.learning_rate * (step + 1) / warmup
    progress = min((step - warmup) / max(planned_steps - warmup, 1), 1.0)
    return cfg.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


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


class TimedBatches:
    """Iterates (index, windows, lead mask, groups) batches of `sampler`'s indices and adds up the
    seconds spent producing them: the time the training step waits for data."""

    def __init__(self, sampler, *tensors: torch.Tensor) -> None:
        self.sampler, self.tensors, self.seconds = sampler, tensors, 0.0

    def __iter__(self):
        sampler = iter(self.sampler)
        while True:
            start = time.perf_counter()
            index = next(sampler, None)
            if index is None:
                return
            index = torch.from_numpy(index)
            batch = (index, *(t[index] for t in self.tensors))
            self.seconds += time.perf_counter() - start
            yield batch


def train_local(objective: Objective, data: WindowSet, cfg: TrainConfig, *, steps: int, seed: int,
                on_step: Callable[[int, dict[str, float]], None] | None = None,
                proximal: tuple[float, dict[str, torch.Tensor]] | None = None,
                privacy: PrivacyConfig | None = None, ledger: PrivacyLedger | None = None,
                planned_steps: int | None = None, first_step: int = 0, round: int | None = None) -> TrainResult:
    """Run `steps` optimizer steps of `objective` on `data`; the same seed gives the same result.

    With `privacy.enabled` the steps are DP-SGD (fedssl.privacy, docs/privacy.md): Poisson-sampled
    privacy units, clipped per-unit gradients plus noise; `ledger` declines a round that would pass
    the target epsilon (`PrivacyBudgetExceeded`) and records the round's spend after it.

    `proximal = (mu, w_global)` adds FedProx's mu/2 * ||w - w_global||^2 over the parameters
    named in `w_global` (objective names, e.g. `encoder.` ones) and logs it as "proximal".

    The learning rate follows `learning_rate_at` over `planned_steps` (the whole training's steps:
    rounds x local_steps in a federation; `steps` when None), these steps being global steps
    `first_step` .. `first_step + steps - 1` of it.
    """
    if len(data) == 0:
        raise ValueError("no training windows")
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    schedule_steps = planned_steps or steps
    optimizer = torch.optim.AdamW(objective.parameters(), lr=learning_rate_at(first_step, schedule_steps, cfg),
                                  weight_decay=cfg.weight_decay)
    dp = None
    if privacy is not None and privacy.enabled:
        dp = begin_private_round(objective, optimizer, data, privacy, cfg.batch_size, steps=steps,
                                 planned_steps=planned_steps, ledger=ledger)
    windows, lead_mask = torch.from_numpy(data.windows), torch.from_numpy(data.lead_mask)
    groups = torch.from_numpy(privacy_units(data, "patient"))  # CMSC: same patient, positive pair
    objective.train()
    totals: dict[str, float] = {}
    examples = counted = 0
    start = time.perf_counter()
    sampler = dp.batches(steps, rng) if dp else batches(len(data), cfg.batch_size, steps, rng)
    fetched = TimedBatches(sampler, windows, lead_mask, groups)
    try:
        for step, (index, x, mask, group) in enumerate(fetched, start=1):
            for param_group in optimizer.param_groups:
                param_group["lr"] = learning_rate_at(first_step + step - 1, schedule_steps, cfg)
            optimizer.zero_grad(set_to_none=True)
            if dp:  # the DP-SGD gradient (clipped per unit, noised) lands in .grad; no extra clipping
                values = dp.backward(x, mask)
                if proximal:  # a function of the weights only: added after the noise (post-processing)
                    prox = proximal_term(objective, proximal[1])
                    (proximal[0] * prox).backward()
                    values = None if values is None else {**values, "proximal": prox.item()}
            else:
                terms = objective(x, mask, group)
                loss = terms["loss"]
                if proximal:
                    terms["proximal"] = proximal_term(objective, proximal[1])
                    loss = loss + proximal[0] * terms["proximal"]
                loss.backward()
                if cfg.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(objective.parameters(), cfg.grad_clip)
                values = {k: v.item() for k, v in terms.items()}
            optimizer.step()
            objective.after_step()
            if values is None:  # an empty Poisson batch: a noise-only DP step
                continue
            if not np.isfinite(values["loss"]):
                raise FloatingPointError(f"loss became {values['loss']} at step {step}")
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v
            examples += len(index)
            counted += 1
            if on_step:
                on_step(step, values)
    finally:
        if dp:
            dp.close()
    if dp and ledger is not None:
        ledger.record(steps, dp.sample_rate, dp.noise_multiplier, round=round)
    done = max(counted, 1)
    return TrainResult(examples, steps, {k: v / done for k, v in totals.items()}, time.perf_counter() - start,
                       fetched.seconds)
