"""Bootstrap SSL without negatives: an online network predicts a slow-moving target network.

Grill et al., "Bootstrap Your Own Latent: A New Approach to Self-Supervised Learning" (BYOL),
NeurIPS 2020: the online encoder and projector, followed by a predictor, must match the target
projection of the other augmented view; the target encoder and projector are an exponential moving
average (EMA) of the online ones and receive no gradient. Without negatives the loss of a record
depends on that record alone, which per-sample DP clipping needs; the target network is site state.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fedssl.data.augment import Augment
from fedssl.objectives.base import Objective
from fedssl.objectives.contrastive import ProjectionHead


class BYOLLoss(nn.Module):
    """BYOL's per-record loss 2 - 2 cos(prediction, target), (B, D) x 2 -> (B,)."""

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 2 - 2 * F.cosine_similarity(prediction, target.detach(), dim=-1)


class BYOL(Objective):
    def __init__(self, encoder: nn.Module, augment: Augment, projection: ProjectionHead,
                 prediction: ProjectionHead, momentum: float) -> None:
        super().__init__(encoder)
        self.augment, self.projection, self.prediction = augment, projection, prediction
        self.loss = BYOLLoss()
        self.momentum = momentum
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.target_projection = copy.deepcopy(projection).requires_grad_(False)

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor,
                groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {k: v.mean() for k, v in self.per_sample_terms(x, lead_mask).items()}

    def per_sample_terms(self, x: torch.Tensor, lead_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms per record, each (B,), for DP-SGD's per-sample clipping."""
        views = [self.augment(x, lead_mask) for _ in range(2)]
        online = [self.prediction(self.projection(self.encoder(*view))) for view in views]
        with torch.no_grad():  # no gradient, and no activations recorded by Opacus
            target = [self.target_projection(self.target_encoder(*view)) for view in views]
        loss = self.loss(online[0], target[1]) + self.loss(online[1], target[0])  # symmetrised
        return {"loss": loss, "byol": loss}

    def after_step(self) -> None:
        ema_update(self, self.momentum)


ONLINE_AND_TARGET = (("encoder", "target_encoder"), ("projection", "target_projection"))


@torch.no_grad()
def ema_update(objective: nn.Module, momentum: float,
               pairs: tuple[tuple[str, str], ...] = ONLINE_AND_TARGET) -> None:
    """BYOL's target update, target <- momentum * target + (1 - momentum) * online, for each
    (online, target) pair of the objective's modules named in `pairs` (BYOL's encoder and
    projector; JEPA has only the encoder)."""
    for online_name, target_name in pairs:
        online, target = getattr(objective, online_name), getattr(objective, target_name)
        for o, t in zip(online.parameters(), target.parameters(), strict=True):
            t.lerp_(o, 1 - momentum)
