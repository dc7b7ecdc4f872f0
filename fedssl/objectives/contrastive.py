"""Contrastive SSL: two augmented views of one ECG should agree, other ECGs should not.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations" (SimCLR),
ICML 2020: embeddings of two views pass a projection head and the NT-Xent loss treats the other
view of the same record as the positive and all other views in the batch as negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedssl.data.augment import Augment
from fedssl.objectives.base import Objective


class ProjectionHead(nn.Module):
    """Two-layer MLP in front of a loss (SimCLR's and BYOL's projector, BYOL's predictor).

    LayerNorm stands in for the papers' BatchNorm so that each record's output depends on that
    record alone (per-sample gradients for DP, no coupling through batch statistics).
    """

    def __init__(self, width: int, out_dim: int, hidden: int | None = None) -> None:
        super().__init__()
        hidden = hidden or width
        self.net = nn.Sequential(nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class NTXentLoss(nn.Module):
    """Normalised temperature-scaled cross entropy over 2B views (SimCLR)."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        z = F.normalize(torch.cat([z1, z2]), dim=1)
        logits = z @ z.T / self.temperature
        logits.fill_diagonal_(float("-inf"))  # a view is not its own positive
        b = len(z1)
        positives = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
        return F.cross_entropy(logits, positives)


class SimCLR(Objective):
    def __init__(self, encoder: nn.Module, augment: Augment, projection: ProjectionHead, loss: NTXentLoss) -> None:
        super().__init__(encoder)
        self.augment, self.projection, self.ntxent = augment, projection, loss

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor,
                groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        z1, z2 = (self.projection(self.encoder(*self.augment(x, lead_mask))) for _ in range(2))
        loss = self.ntxent(z1, z2)
        return {"loss": loss, "contrastive": loss}
