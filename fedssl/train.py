"""The single local training loop: centralized, local-only and federated training all call it."""

from __future__ import annotations

import ctypes
import logging
import math
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from typing import Protocol

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
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def reuse_freed_memory() -> None:
    """Have malloc keep the memory a training step frees for the next step, instead of handing it
    back to the kernel and faulting fresh zeroed pages in again.

    Every step allocates and frees the same activations. glibc serves blocks above its mmap
    threshold (128 kB until it has freed a larger mapped block) with new pages, and trims freed
    memory at the top of the heap: a site's tiny conv_transformer + CPC step (batch 32, 10-s
    windows) took ~7,700 page faults, ~18 % of its CPU time. Blocks up to 32 MB (the most glibc's
    own adjustment raises the threshold to) now come from the heap, which is trimmed only above
    1 GB free. The arithmetic is untouched. A no-op where malloc is not glibc's."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError, TypeError):  # no mallopt (macOS, Windows)
        return
    mallopt(M_MMAP_THRESHOLD, 32 << 20)
    mallopt(M_TRIM_THRESHOLD, 1 << 30)


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


class TrainingStep(Protocol):
    """How one optimizer step gets its gradient: `PlainStep` or DP-SGD's `fedssl.privacy.PrivateStep`.
    `train_local` picks one (`training_step`) before its loop, so the loop reads the same for both
    and a new kind of step needs no branch inside it."""

    def batches(self, steps: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        """Sorted window indices of `steps` batches, drawn from `rng`."""

    def gradients(self, x: torch.Tensor, lead_mask: torch.Tensor, group: torch.Tensor) -> dict[str, float] | None:
        """Put this batch's gradient into the parameters' `.grad` (zeroed by the caller) and return
        its batch-mean loss terms; None when the batch counts for no loss (an empty DP batch)."""

    def close(self) -> None:
        """Undo what the step did to the objective (hooks), also when training failed."""

    def record_round(self, round: int | None) -> None:
        """After the round's last step: account for what the round spent (a DP step's ledger)."""


class PlainStep:
    """The ordinary step: the objective's batch-mean loss, plus mu times FedProx's proximal term,
    backward, then the gradient norm clipped to `cfg.grad_clip` (when > 0); shuffled-epoch batches."""

    def __init__(self, objective: Objective, windows: int, cfg: TrainConfig,
                 proximal: tuple[float, dict[str, torch.Tensor]] | None) -> None:
        self.objective, self.windows, self.cfg, self.proximal = objective, windows, cfg, proximal

    def batches(self, steps: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        return batches(self.windows, self.cfg.batch_size, steps, rng)

    def gradients(self, x: torch.Tensor, lead_mask: torch.Tensor, group: torch.Tensor) -> dict[str, float]:
        terms = self.objective(x, lead_mask, group)
        loss = terms["loss"]
        if self.proximal:
            mu, reference = self.proximal
            terms["proximal"] = proximal_term(self.objective, reference)
            loss = loss + mu * terms["proximal"]
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.objective.parameters(), self.cfg.grad_clip)
        return {k: v.item() for k, v in terms.items()}

    def close(self) -> None:
        """Nothing to undo: the plain step leaves the objective as it found it."""

    def record_round(self, round: int | None) -> None:
        """Nothing to account: plain steps spend no privacy budget."""


def training_step(objective: Objective, data: WindowSet, cfg: TrainConfig, *, steps: int,
                  proximal: tuple[float, dict[str, torch.Tensor]] | None, privacy: PrivacyConfig | None,
                  ledger: PrivacyLedger | None, planned_steps: int | None) -> TrainingStep:
    """The step `train_local` runs: DP-SGD when `privacy.enabled` (`begin_private_round`, which
    declines a round that would pass the ledger's target epsilon), the plain step otherwise."""
    if privacy is not None and privacy.enabled:
        return begin_private_round(objective, data, privacy, cfg.batch_size, steps=steps,
                                   planned_steps=planned_steps, proximal=proximal, ledger=ledger)
    return PlainStep(objective, len(data), cfg, proximal)


def train_local(objective: Objective, data: WindowSet, cfg: TrainConfig, *, steps: int, seed: int,
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
    reuse_freed_memory()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    schedule_steps = planned_steps or steps
    # fused: AdamW's update in one pass per parameter; the default per-tensor loop took ~2 % of a
    # tiny conv_transformer + CPC step. Same update, to float32 rounding.
    optimizer = torch.optim.AdamW(objective.parameters(), lr=learning_rate_at(first_step, schedule_steps, cfg),
                                  weight_decay=cfg.weight_decay, fused=True)
    with closing(training_step(objective, data, cfg, steps=steps, proximal=proximal, privacy=privacy,
                               ledger=ledger, planned_steps=planned_steps)) as step:
        windows, lead_mask = torch.from_numpy(data.windows), torch.from_numpy(data.lead_mask)
        groups = torch.from_numpy(privacy_units(data, "patient"))  # CMSC: same patient, positive pair
        objective.train()
        totals: dict[str, float] = {}
        examples = counted = 0
        start = time.perf_counter()
        fetched = TimedBatches(step.batches(steps, rng), windows, lead_mask, groups)
        for step_number, (index, x, mask, group) in enumerate(fetched, start=1):
            for param_group in optimizer.param_groups:
                param_group["lr"] = learning_rate_at(first_step + step_number - 1, schedule_steps, cfg)
            optimizer.zero_grad(set_to_none=True)
            values = step.gradients(x, mask, group)
            optimizer.step()
            objective.after_step()
            if values is None:  # an empty Poisson batch: a noise-only DP step
                continue
            if not np.isfinite(values["loss"]):
                raise FloatingPointError(f"loss became {values['loss']} at step {step_number}")
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + v
            examples += len(index)
            counted += 1
    step.record_round(round)
    done = max(counted, 1)
    return TrainResult(examples, steps, {k: v / done for k, v in totals.items()}, time.perf_counter() - start,
                       fetched.seconds)
