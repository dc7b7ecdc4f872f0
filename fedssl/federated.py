"""Federated math that needs no Flower: what travels, its clipping for central DP, the FedProx
term and FedEMA blending.

State dicts here use the objective's own names (`encoder.blocks.0...`, `reconstruction...`):
with `share: encoder` only the `encoder.` entries travel, with `share: all` every entry does.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fedssl.objectives.base import Objective

SHARE_MODES = ("encoder", "all")
LOCAL_UPDATES = ("replace", "fedema")
TRANSFER_DTYPES = {"float32": torch.float32, "float16": torch.float16}
ENCODER_PREFIX = "encoder."

State = dict[str, torch.Tensor]


def shared_state(objective: Objective, share: str) -> State:
    """The part of the objective's state that travels between the sites and the server."""
    state = objective.state_dict()
    if share == "all":
        return state
    return {k: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}


def cast_floating(state: State, dtype: str) -> State:
    """`state` with its floating-point entries in `dtype` (a TRANSFER_DTYPES name) and the rest
    as they are: the shared weights on the wire with `federation.transfer_dtype`."""
    target = TRANSFER_DTYPES[dtype]
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


def encoder_state(shared: State) -> State:
    """The encoder alone (as `objective.encoder.state_dict()`) out of a shared state."""
    return {k.removeprefix(ENCODER_PREFIX): v for k, v in shared.items() if k.startswith(ENCODER_PREFIX)}


def proximal_term(module: nn.Module, reference: State) -> torch.Tensor:
    """FedProx's ||w - w_global||^2 / 2 over the parameters of `module` named in `reference`.

    Its gradient is `w - w_global`; the caller multiplies by mu (Li et al., MLSys 2020).
    """
    terms = [(p - reference[name]).pow(2).sum() for name, p in module.named_parameters() if name in reference]
    return 0.5 * torch.stack(terms).sum()


def divergence(a: State, b: State) -> float:
    """Euclidean distance between two states over their floating-point entries."""
    squared = sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a if a[k].is_floating_point())
    return math.sqrt(squared)


def clip_update(state: State, reference: State, max_norm: float) -> State:
    """`state` with its update `state - reference` scaled to an L2 norm of at most `max_norm` over
    all floating-point entries together: central DP's clipping (McMahan et al., ICLR 2018), by the
    server of every reply and, with `federation.central_dp: client`, by the site before it packs
    its reply, so that the site's audit log hashes the update it really sends."""
    norm = divergence(state, reference)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    return {k: reference[k] + (v - reference[k]) * scale if v.is_floating_point() else v for k, v in state.items()}


def fedema_scale(previous: State, received: State, tau: float) -> float | None:
    """FedEMA's auto-scaled lambda: tau / ||w_global - w_local||, so that mu = tau the first time.

    None while the two states are equal (there is nothing to scale against yet).
    """
    distance = divergence(received, previous)
    return tau / distance if distance > 0 else None


def fedema_blend(previous: State, received: State, scale: float) -> tuple[State, float]:
    """FedEMA (Zhuang et al., ICLR 2022): w <- mu * w_local + (1 - mu) * w_global.

    mu = min(scale * ||w_global - w_local||, 1): a site whose model has drifted far from the
    global one keeps more of its own. Non-float entries are taken from `received`.
    Returns the blended state and mu.
    """
    mu = min(scale * divergence(received, previous), 1.0)
    blended = {k: mu * previous[k] + (1 - mu) * v if v.is_floating_point() else v for k, v in received.items()}
    return blended, mu


def fedema_start(previous: State | None, received: State, scale: float | None,
                 tau: float) -> tuple[State, float | None, float]:
    """A FedEMA site's state at round start, its lambda (set on first use) and mu.

    Without a previous local state (the site's first round) the site starts from the global one.
    """
    if previous is None:
        return received, scale, 0.0
    if scale is None:
        scale = fedema_scale(previous, received, tau)
    if scale is None:
        return received, None, 0.0
    blended, mu = fedema_blend(previous, received, scale)
    return blended, scale, mu
