"""Differentially private local training (DP-SGD) for per-sample self-supervised objectives.

`fedssl.train.train_local` has one training loop; with DP it runs `PrivateStep`, the DP-SGD
kind of its `TrainingStep`, which `begin_private_round(objective, data, privacy, batch_size, ...)`
makes for a round (or declines, before anything is spent, when the round would pass the site's
budget). Its gradient comes from `PrivateTraining` (`make_private`): Poisson sampling over
privacy units (records or patients; one window per sampled unit), per-unit gradients (by default
book-keeping with Opacus' per-layer formulas, `LayerCalls`; or Opacus' `GradSampleModule` hooks,
functorch, or ghost clipping), clipping to `max_grad_norm`, Gaussian noise of std
`noise_multiplier * max_grad_norm` on the sum; the loop's ordinary optimizer then steps. After the
round, `PrivateStep.record_round` adds what it spent to the `PrivacyLedger` in the site's state
folder, which composes all rounds with Opacus' RDP (or PRV) accountant. See docs/privacy.md for
what this does guarantee.

Objectives whose loss couples the samples of a batch (in-batch negatives) are refused: their
per-sample gradient is not a function of one sample, so clipping it does not bound one unit's
influence on the update.
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedssl.config import ConfigError, PrivacyConfig
from fedssl.data.windows import WindowSet
from fedssl.federated import proximal_term
from fedssl.objectives.base import Objective
from fedssl.storage import atomic_write

LEDGER_FILE = "privacy_ledger.json"
DP_SAFE = ("masked reconstruction (objective.name: generative, or hybrid with contrastive_weight: 0), "
           "BYOL (objective.name: byol), the per-sample hybrid (objective.name: hybrid_byol), CPC with "
           "negatives from the same window (objective.name: cpc) or JEPA (objective.name: jepa)")


class PrivacyError(ValueError):
    """DP training that cannot be done as asked (an objective that couples samples, a bad setting)."""


class PrivacyBudgetExceeded(PrivacyError):
    """A round whose planned steps would take the site past its target epsilon."""


# ----------------------------------------------------------------------------------------------
# Which objectives are DP-safe, and their per-sample losses


def check_dp_safe(objective: Objective) -> None:
    """Raise `PrivacyError` unless every loss term of `objective` is a function of one sample."""
    from fedssl.objectives.contrastive import SimCLR
    from fedssl.objectives.hybrid import CREMA

    why = None
    if isinstance(objective, SimCLR):
        why = "SimCLR's NT-Xent loss uses the other records of the batch as negatives"
    elif isinstance(objective, CREMA) and objective.contrastive_weight != 0:
        why = "CREMA's contrastive (NT-Xent) term uses the other records of the batch as negatives"
    elif getattr(objective, "couples_batch", False):  # e.g. CMSC: the batch's other patients are negatives
        why = (f"{type(objective).__name__} declares `couples_batch`: its loss uses the other samples of the "
               "batch (e.g. as negatives)")
    elif not _has_per_sample_losses(objective):
        why = f"{type(objective).__name__} does not provide per-sample losses (a `per_sample_terms` method)"
    if why:
        raise PrivacyError(
            f"objective {type(objective).__name__} cannot be trained with sample-level DP: {why}, so one "
            f"record's gradient depends on every other record in its batch and clipping it does not bound "
            f"that record's influence on the update (the DP-SGD sensitivity argument fails). "
            f"Use a per-sample objective instead: {DP_SAFE}."
        )


def _has_per_sample_losses(objective: Objective) -> bool:
    from fedssl.objectives.generative import MaskedModeling

    return hasattr(objective, "per_sample_terms") or isinstance(objective, MaskedModeling)


def per_sample_terms(objective: Objective, x: torch.Tensor, lead_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Loss terms per sample, each (B,); "loss" is the one DP-SGD differentiates.

    Objectives provide `per_sample_terms(x, lead_mask)`; the pure generative objective (whose
    `forward` only returns the batch mean) is read through its reconstruction head.
    """
    from fedssl.objectives.generative import MaskedModeling

    if hasattr(objective, "per_sample_terms"):
        return objective.per_sample_terms(x, lead_mask)
    if isinstance(objective, MaskedModeling):
        loss, _ = objective.reconstruction(objective.encoder, x, lead_mask)
        return {"loss": loss, "generative": loss}
    check_dp_safe(objective)
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------
# Privacy units and accounting helpers


def privacy_units(data: WindowSet, unit: str) -> np.ndarray:
    """The privacy unit (0..U-1) of every window: its record, or its record's patient.

    A record without a patient id is its own patient (it cannot be linked to other records).
    """
    if unit == "record":
        keys = [f"record:{i}" for i in range(len(data.records))]
    elif unit == "patient":
        keys = [r.patient_id if r.patient_id else f"record:{i}" for i, r in enumerate(data.records)]
    else:
        raise ConfigError(f"privacy.unit: expected 'record' or 'patient', got {unit!r}")
    _, per_record = np.unique(np.array(keys, dtype=object), return_inverse=True)
    _, per_window = np.unique(per_record[data.record], return_inverse=True)  # only units with windows
    return per_window.astype(np.int64)


def unit_count(unit_of_window: np.ndarray) -> int:
    """How many privacy units have windows, given `privacy_units` (which numbers them 0..U-1)."""
    return int(unit_of_window.max()) + 1 if len(unit_of_window) else 0


def default_delta(units: int) -> float:
    """delta well below 1/units: min(1e-5, 1 / (10 units))."""
    return min(1e-5, 1.0 / (10 * max(units, 1)))


def sample_rate_for(batch_size: int, units: int) -> float:
    return min(1.0, batch_size / units)


def compute_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str = "rdp") -> float:
    """Epsilon of composing (noise_multiplier, sample_rate, steps) entries at `delta`."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0]
    if not history:
        return 0.0
    if accountant == "rdp":
        from opacus.accountants import RDPAccountant
        from opacus.accountants.analysis.rdp import get_privacy_spent

        # what RDPAccountant.get_epsilon computes; RDP is linear in the steps, so the per-step
        # RDP of each (sigma, q) is computed once (it dominates the cost at fractional orders)
        rdp = sum(n * np.array(_rdp_per_step(s, q)) for s, q, n in history)
        epsilon, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
        return float(epsilon)
    if accountant == "prv":
        from opacus.accountants import PRVAccountant

        acc = PRVAccountant()
    else:
        raise ConfigError(f"privacy.accountant: expected 'rdp' or 'prv', got {accountant!r}")
    acc.history = history
    return float(acc.get_epsilon(delta=delta))


@functools.lru_cache(maxsize=1024)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=RDPAccountant.DEFAULT_ALPHAS)
    return tuple(float(r) for r in rdp)


def calibrate_noise(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str = "rdp",
                    spent: list[tuple[float, float, int]] = ()) -> float:
    """Smallest noise multiplier whose `steps` (after the `spent` history) stay within `target_epsilon`."""
    spent = list(spent)
    if compute_epsilon(spent, delta, accountant) >= target_epsilon:
        raise PrivacyBudgetExceeded(f"the ledger already spent its target epsilon {target_epsilon}")
    low, high = 0.0, 1.0
    while compute_epsilon(spent + [(high, sample_rate, steps)], delta, accountant) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e6:
            raise PrivacyError("no noise multiplier reaches the target epsilon")
    while high - low > 0.01 * high:  # 1 %: the returned noise errs on the safe (larger) side
        mid = (low + high) / 2
        if mid > 0 and compute_epsilon(spent + [(mid, sample_rate, steps)], delta, accountant) <= target_epsilon:
            high = mid
        else:
            low = mid
    return high


# ----------------------------------------------------------------------------------------------
# The per-site ledger


class PrivacyLedger:
    """Every DP round of one site: (steps, sample_rate, noise_multiplier), composed into epsilon.

    Saved as JSON in the site's state folder after each `record` (atomically), and reloaded by
    `PrivacyLedger.load`, so the budget survives restarts. `delta`, the unit and the accountant
    are fixed when the ledger is created: composing entries at different deltas is meaningless.
    """

    def __init__(self, path: Path, *, delta: float, unit: str, accountant: str, target_epsilon: float,
                 entries: list[dict] | None = None) -> None:
        self.path = Path(path)
        self.delta, self.unit, self.accountant, self.target_epsilon = delta, unit, accountant, target_epsilon
        self.entries: list[dict] = list(entries or [])

    @classmethod
    def load(cls, folder: Path, privacy: PrivacyConfig | None = None, units: int | None = None) -> PrivacyLedger:
        """The ledger in `folder`; a new, empty one (from `privacy` and `units`) when there is none."""
        path = Path(folder) / LEDGER_FILE
        if path.exists():
            values = json.loads(path.read_text())
            ledger = cls(path, delta=values["delta"], unit=values["unit"], accountant=values["accountant"],
                         target_epsilon=values["target_epsilon"], entries=values["entries"])
            if privacy is not None and (privacy.unit, privacy.accountant) != (ledger.unit, ledger.accountant):
                raise PrivacyError(
                    f"{path}: the ledger accounts unit={ledger.unit!r} with accountant={ledger.accountant!r}, "
                    f"but the privacy config asks for unit={privacy.unit!r}, accountant={privacy.accountant!r}"
                )
            return ledger
        if privacy is None or units is None:
            raise FileNotFoundError(f"no privacy ledger at {path}")
        delta = privacy.delta if privacy.delta is not None else default_delta(units)
        return cls(path, delta=delta, unit=privacy.unit, accountant=privacy.accountant,
                   target_epsilon=privacy.target_epsilon)

    def history(self) -> list[tuple[float, float, int]]:
        return [(e["noise_multiplier"], e["sample_rate"], e["steps"]) for e in self.entries]

    def epsilon(self) -> float:
        """Epsilon spent so far (at this ledger's delta), all rounds composed."""
        return compute_epsilon(self.history(), self.delta, self.accountant)

    def epsilon_after(self, steps: int, sample_rate: float, noise_multiplier: float) -> float:
        return compute_epsilon(self.history() + [(noise_multiplier, sample_rate, steps)], self.delta, self.accountant)

    def would_exceed(self, steps: int, sample_rate: float, noise_multiplier: float,
                     budget: float | None = None) -> bool:
        """Would a round of `steps` more steps take the site past `budget` (default: its target)?"""
        budget = self.target_epsilon if budget is None else budget
        return self.epsilon_after(steps, sample_rate, noise_multiplier) > budget

    def record(self, steps: int, sample_rate: float, noise_multiplier: float, round: int | None = None) -> None:
        """Add one round's spend and save the ledger (atomically)."""
        self.entries.append({"round": round, "steps": int(steps), "sample_rate": float(sample_rate),
                             "noise_multiplier": float(noise_multiplier), "time": time.time()})
        self.save()

    def save(self) -> None:
        values = {"delta": self.delta, "unit": self.unit, "accountant": self.accountant,
                  "target_epsilon": self.target_epsilon, "entries": self.entries,
                  "epsilon": self.epsilon()}
        atomic_write(self.path, lambda f: f.write(json.dumps(values, indent=1).encode()))


# ----------------------------------------------------------------------------------------------
# DP-SGD: sampling, per-unit gradients, clipping, noise


def _contiguous_inputs(module: nn.Module, args: tuple) -> tuple:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


def _backward(loss: torch.Tensor, **kwargs) -> None:
    with warnings.catch_warnings():  # Opacus' full backward hooks on layers fed by data, not parameters
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        loss.backward(**kwargs)


class LayerCalls:
    """Book-keeping per-sample gradients (Bu et al., "Differentially Private Optimization on Large
    Model at Small Cost", ICML 2023): record every call of a trainable layer (its inputs and its
    output), take the gradient of the loss with respect to those outputs in one backward pass, and
    form each sample's parameter gradient from its inputs and output gradient with Opacus' per-layer
    formulas. The ordinary parameter gradients, which DP-SGD would throw away, are never computed,
    and no per-sample buffer is zero-filled and copied as Opacus' hooks do. A Linear layer over a
    sequence writes its per-sample gradients with one batched matmul into a buffer kept across steps:
    a fresh (B, out, in) tensor every step costs about as much in page faults as the product itself."""

    def __init__(self, objective: nn.Module) -> None:
        from opacus.grad_sample import GradSampleModule

        self.samplers = GradSampleModule.GRAD_SAMPLERS  # filled by importing opacus.grad_sample
        self.names = {}
        for name, module in objective.named_modules():
            if any(p.requires_grad for p in module.parameters(recurse=False)):
                if type(module) not in self.samplers:
                    raise PrivacyError(f"privacy.grad_sample_mode bookkeeping has no per-sample gradient formula "
                                       f"for {name} ({type(module).__name__}); use hooks or functorch")
                self.names[module] = name
        self.calls: list[tuple[nn.Module, list[torch.Tensor], torch.Tensor]] = []
        self._handles = [m.register_forward_hook(self._record) for m in self.names]
        self._buffers: dict[tuple[nn.Module, int], torch.Tensor] = {}  # (layer, its n-th call in a step)

    def _record(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if torch.is_grad_enabled() and output.requires_grad:  # target branches under no_grad are not recorded
            self.calls.append((module, [a.detach() for a in inputs if isinstance(a, torch.Tensor)], output))

    def per_sample_gradients(self, loss: torch.Tensor, params: list[nn.Parameter], batch: int) -> list[torch.Tensor]:
        """(B, *p.shape) per parameter of `loss` (a sum of per-sample losses) over the recorded calls."""
        calls, self.calls = self.calls, []
        if not calls:
            return [torch.zeros((batch, *p.shape), dtype=p.dtype) for p in params]
        backprops = torch.autograd.grad(loss, [out for _, _, out in calls], allow_unused=True)
        unused = sorted({self.names[m] for (m, _, _), g in zip(calls, backprops) if g is None})
        if unused:
            raise PrivacyError(f"forward passes through {unused[:3]} did not reach the loss; run target views "
                               f"(detached branches) under torch.no_grad() so that they are not recorded")
        per_sample: dict[nn.Parameter, torch.Tensor] = {}
        seen: dict[nn.Module, int] = {}
        for (module, inputs, _), backprop in zip(calls, backprops):
            seen[module] = seen.get(module, -1) + 1
            if isinstance(module, nn.Linear) and backprop.dim() == 3 and module.weight.requires_grad:
                grads = self._linear(module, inputs[0], backprop, seen[module])
            else:
                grads = self.samplers[type(module)](module, inputs, backprop)
            for p, g in grads.items():
                per_sample[p] = per_sample[p] + g if p in per_sample else g  # a layer run on two views
        return [per_sample[p] if p in per_sample else torch.zeros((batch, *p.shape), dtype=p.dtype)
                for p in params]

    def _linear(self, module: nn.Linear, inputs: torch.Tensor, backprop: torch.Tensor,
                call: int) -> dict[nn.Parameter, torch.Tensor]:
        """Opacus' Linear formula, sum over tokens t of backprop_t x input_t^T, as one bmm."""
        b = len(backprop)
        buffer = self._buffers.get((module, call))
        if buffer is None or len(buffer) < b or buffer.dtype != backprop.dtype:
            buffer = self._buffers[(module, call)] = torch.empty((b, *module.weight.shape), dtype=backprop.dtype)
        grads = {module.weight: torch.bmm(backprop.mT, inputs.to(backprop.dtype), out=buffer[:b])}
        if module.bias is not None and module.bias.requires_grad:
            grads[module.bias] = backprop.sum(1)
        return grads

    def close(self) -> None:
        self.calls, self._buffers = [], {}
        for handle in self._handles:
            handle.remove()


class PrivateTraining:
    """DP-SGD wiring of one objective on one site's windows; made by `make_private`."""

    def __init__(self, objective: Objective, data: WindowSet,
                 privacy: PrivacyConfig, batch_size: int, noise_multiplier: float, delta: float) -> None:
        check_dp_safe(objective)
        self.objective, self.privacy = objective, privacy
        self.mode = privacy.grad_sample_mode
        self.max_grad_norm = privacy.max_grad_norm
        self.noise_multiplier, self.delta = noise_multiplier, delta
        self.unit = privacy_units(data, privacy.unit)
        self.units = unit_count(self.unit)
        if self.units == 0:
            raise ValueError("no training windows")
        self.sample_rate = sample_rate_for(batch_size, self.units)
        self.expected_batch = self.sample_rate * self.units
        order = np.argsort(self.unit, kind="stable")
        counts = np.bincount(self.unit, minlength=self.units)
        self._order, self._counts = order, counts
        self._starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.params = [p for p in objective.parameters() if p.requires_grad]
        self.gsm = self._wrap(objective)
        self.steps_taken = 0  # noised gradients released: what the ledger accounts

    def _wrap(self, objective: Objective) -> nn.Module | LayerCalls:
        if self.mode == "bookkeeping":
            self._contiguous = []
            return LayerCalls(objective)
        # Opacus' ghost norm of an Embedding views its ids as (-1, 1), which fails on the expanded
        # (stride-0) id tensors the models use for batched lookups: hand it contiguous ids
        self._contiguous = [m.register_forward_pre_hook(_contiguous_inputs)
                            for m in objective.modules() if isinstance(m, nn.Embedding)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if self.mode == "ghost":
                from opacus.grad_sample import GradSampleModuleFastGradientClipping

                return GradSampleModuleFastGradientClipping(
                    objective, batch_first=True, loss_reduction="sum", max_grad_norm=self.max_grad_norm,
                    strict=False, use_ghost_clipping=True)
            from opacus.grad_sample import GradSampleModule

            return GradSampleModule(objective, batch_first=True, loss_reduction="sum", strict=False,
                                    force_functorch=self.mode == "functorch")

    def close(self) -> None:
        """Remove Opacus' hooks: the objective is an ordinary module again."""
        self._reset()
        if isinstance(self.gsm, LayerCalls):
            self.gsm.close()
        else:
            self.gsm.remove_hooks()
        for handle in self._contiguous:
            handle.remove()

    # sampling ---------------------------------------------------------------------------------

    def batches(self, steps: int, rng: np.random.Generator):
        """Window indices of `steps` Poisson-sampled batches: each unit with probability
        `sample_rate`, one uniformly chosen window per sampled unit (sorted; may be empty)."""
        for _ in range(steps):
            chosen = np.flatnonzero(rng.random(self.units) < self.sample_rate)
            offset = np.floor(rng.random(len(chosen)) * self._counts[chosen]).astype(np.int64)
            yield np.sort(self._order[self._starts[chosen] + offset])

    # per-sample gradients ---------------------------------------------------------------------

    def _reset(self) -> None:
        if isinstance(self.gsm, LayerCalls):
            self.gsm.calls = []
            return
        for p in self.params:
            p.grad_sample = None
            for name in ("_current_grad_sample", "_norm_sample"):
                if hasattr(p, name):
                    delattr(p, name)
            if hasattr(p, "_forward_counter"):
                p._forward_counter = 0
        for m in self.objective.modules():
            if hasattr(m, "activations"):
                m.activations = []

    def _check_complete(self) -> None:
        """Every forward pass through a trainable layer must have reached the loss; otherwise
        Opacus pairs activations with the wrong backward pass and the gradients are wrong."""
        stale = [name for name, m in self.objective.named_modules() if getattr(m, "activations", None)]
        if stale:
            self._reset()
            raise PrivacyError(
                f"forward passes through {stale[:3]} did not reach the loss; run target views "
                f"(detached branches) under torch.no_grad() so that Opacus does not record them"
            )

    def per_sample_gradients(self, x: torch.Tensor, lead_mask: torch.Tensor
                             ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """Per-sample loss terms (B,) and per-sample gradients [(B, *p.shape) per parameter]
        (hooks and functorch modes; ghost clipping never materialises them)."""
        if self.mode == "ghost":
            raise PrivacyError("ghost clipping computes per-sample norms only, not per-sample gradients")
        self._reset()
        terms = per_sample_terms(self.objective, x, lead_mask)
        b = len(x)
        if isinstance(self.gsm, LayerCalls):
            return {k: v.detach() for k, v in terms.items()}, self.gsm.per_sample_gradients(
                terms["loss"].sum(), self.params, b)
        for p in self.params:
            p.grad = None
        _backward(terms["loss"].sum())
        self._check_complete()
        grads = [p.grad_sample if p.grad_sample is not None else torch.zeros((b, *p.shape)) for p in self.params]
        return {k: v.detach() for k, v in terms.items()}, grads

    def clipped_sum(self, x: torch.Tensor, lead_mask: torch.Tensor
                    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Per-sample terms, the sum of clipped per-sample gradients (one per parameter), and the
        per-sample gradient norms before clipping."""
        c = self.max_grad_norm
        if self.mode != "ghost":
            terms, grads = self.per_sample_gradients(x, lead_mask)
            flat = [g.reshape(len(x), -1) for g in grads]
            norms = torch.stack([torch.linalg.vector_norm(g, dim=1) for g in flat]).norm(dim=0)
            coef = (c / (norms + 1e-6)).clamp(max=1.0).to(flat[0].dtype)
            summed = [(coef @ g).view_as(p) for g, p in zip(flat, self.params)]
            self._reset()
            return terms, summed, norms
        self._reset()
        try:
            terms = per_sample_terms(self.objective, x, lead_mask)
            for p in self.params:
                p.grad = None
            loss = terms["loss"]
            _backward(loss.sum(), retain_graph=True)  # first pass: per-sample norms only
        except NotImplementedError as err:
            self._reset()
            raise PrivacyError(
                f"ghost clipping cannot train {type(self.objective).__name__}: {err} (a layer runs more than "
                f"once per sample, e.g. on two augmented views); use privacy.grad_sample_mode: hooks"
            ) from None
        self._check_complete()
        norms = torch.stack([getattr(p, "_norm_sample", torch.zeros(len(x))) for p in self.params]).norm(2, dim=0)
        coef = (c / (norms + 1e-6)).clamp(max=1.0)
        for p in self.params:
            p.grad = None
        self.gsm.disable_hooks()
        try:
            _backward((loss * coef.detach()).sum())  # second pass: the clipped sum
        finally:
            self.gsm.enable_hooks()
        summed = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in self.params]
        self._reset()
        return {k: v.detach() for k, v in terms.items()}, summed, norms

    def backward(self, x: torch.Tensor, lead_mask: torch.Tensor) -> dict[str, float] | None:
        """Set every parameter's `.grad` to the DP-SGD gradient of this batch:
        (sum of clipped per-sample gradients + N(0, (sigma C)^2)) / expected batch size.
        Returns the batch-mean loss terms (None for an empty batch)."""
        if len(x):
            terms, summed, _ = self.clipped_sum(x, lead_mask)
            values = {k: v.mean().item() for k, v in terms.items()}
        else:
            summed, values = [torch.zeros_like(p) for p in self.params], None
        std = self.noise_multiplier * self.max_grad_norm
        for p, s in zip(self.params, summed):
            p.grad = (s + std * torch.randn_like(s)) / self.expected_batch
        self.steps_taken += 1
        return values


def resolve_noise(privacy: PrivacyConfig, *, units: int, batch_size: int, planned_steps: int | None,
                  ledger: PrivacyLedger | None = None) -> tuple[float, float]:
    """(noise_multiplier, delta): the configured noise, or the noise calibrated so that
    `planned_steps` (all rounds of the site) at this sample rate spend `target_epsilon`."""
    if ledger is not None:
        delta = ledger.delta  # fixed when the ledger was created
    else:
        delta = privacy.delta if privacy.delta is not None else default_delta(units)
    if privacy.noise_multiplier is not None:
        return privacy.noise_multiplier, delta
    if not planned_steps:
        raise PrivacyError("privacy.noise_multiplier is not set: give the planned steps to calibrate it "
                           "from privacy.target_epsilon")
    q = sample_rate_for(batch_size, units)
    return _calibrated(privacy.target_epsilon, delta, q, int(planned_steps), privacy.accountant), delta


@functools.lru_cache(maxsize=64)
def _calibrated(target_epsilon: float, delta: float, sample_rate: float, steps: int, accountant: str) -> float:
    """The same plan gives the same noise every round: calibrate it once per process."""
    return calibrate_noise(target_epsilon, delta, sample_rate, steps, accountant)


def make_private(objective: Objective, data: WindowSet, privacy: PrivacyConfig,
                 batch_size: int, *, planned_steps: int | None = None,
                 ledger: PrivacyLedger | None = None) -> PrivateTraining:
    """Wrap objective + data for DP-SGD (see `PrivateTraining`).

    Refuses objectives that couple the samples of a batch. The noise multiplier is
    `privacy.noise_multiplier`, or calibrated from `privacy.target_epsilon` and `planned_steps`.
    """
    check_dp_safe(objective)
    units = unit_count(privacy_units(data, privacy.unit))
    sigma, delta = resolve_noise(privacy, units=units, batch_size=batch_size, planned_steps=planned_steps,
                                 ledger=ledger)
    return PrivateTraining(objective, data, privacy, batch_size, sigma, delta)


class PrivateStep:
    """The DP-SGD step of `fedssl.train.train_local` (a `fedssl.train.TrainingStep`): Poisson
    batches over privacy units and `PrivateTraining`'s noised gradient of clipped per-unit
    gradients, with no further clipping. FedProx's proximal gradient, a function of the weights
    only, is added after the noise (post-processing, no privacy cost). `record_round` adds the
    round's spend to the ledger. The batch's groups are not used: objectives that pair samples
    across a batch (CMSC) are refused for DP."""

    def __init__(self, training: PrivateTraining, proximal: tuple[float, dict[str, torch.Tensor]] | None,
                 ledger: PrivacyLedger | None) -> None:
        self.training, self.proximal, self.ledger = training, proximal, ledger

    def batches(self, steps: int, rng: np.random.Generator):
        return self.training.batches(steps, rng)

    def gradients(self, x: torch.Tensor, lead_mask: torch.Tensor, group: torch.Tensor) -> dict[str, float] | None:
        values = self.training.backward(x, lead_mask)
        if self.proximal:
            mu, reference = self.proximal
            prox = proximal_term(self.training.objective, reference)
            (mu * prox).backward()
            values = None if values is None else {**values, "proximal": prox.item()}
        return values

    def close(self) -> None:
        self.training.close()

    def record_round(self, round: int | None) -> None:
        if self.ledger is not None:
            self.ledger.record(self.training.steps_taken, self.training.sample_rate, self.training.noise_multiplier,
                               round=round)


def begin_private_round(objective: Objective, data: WindowSet,
                        privacy: PrivacyConfig, batch_size: int, *, steps: int, planned_steps: int | None = None,
                        proximal: tuple[float, dict[str, torch.Tensor]] | None = None,
                        ledger: PrivacyLedger | None = None) -> PrivateStep:
    """The DP-SGD step of a round of `steps` steps (`make_private`, see `PrivateStep`); declines
    (`PrivacyBudgetExceeded`, nothing spent) a round that would take the ledger past its target epsilon."""
    dp = make_private(objective, data, privacy, batch_size, planned_steps=planned_steps or steps,
                      ledger=ledger)
    if ledger is not None and ledger.would_exceed(steps, dp.sample_rate, dp.noise_multiplier):
        dp.close()
        after = ledger.epsilon_after(steps, dp.sample_rate, dp.noise_multiplier)
        raise PrivacyBudgetExceeded(f"{steps} more steps would spend epsilon {after:.3f} > target "
                                    f"{ledger.target_epsilon} (spent so far {ledger.epsilon():.3f})")
    return PrivateStep(dp, proximal, ledger)
