"""Contrastive SSL across time and patients: contrastive multi-segment coding (CMSC).

Kiyasseh et al., "CLOCS: Contrastive Learning of Cardiac Signals Across Space, Time, and
Patients", ICML 2021: two adjacent, non-overlapping segments of one recording (here the two halves
of a window) are positives, with no augmentation: the heart does not change between them. With
patient ids, the segments of every window of the same patient in the batch are positives too
(CLOCS's patient-level positives); all other cross-segment pairs are negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedssl.objectives.base import Objective
from fedssl.objectives.contrastive import ProjectionHead


def positive_pairs(groups: torch.Tensor) -> torch.Tensor:
    """(B,) group ids -> (B, B) bool: first half i and second half j share a patient (or record)."""
    return groups[:, None] == groups[None, :]


class MultiPositiveInfoNCE(nn.Module):
    """CLOCS's symmetric InfoNCE: cosine similarities of every first segment with every second
    segment; each positive pair is scored against its row (first -> second) and its column
    (second -> first), averaged over all positive pairs."""

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, z1: torch.Tensor, z2: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
        logits = F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T / self.temperature
        rows = -logits.log_softmax(dim=1)[positives].mean()
        columns = -logits.log_softmax(dim=0)[positives].mean()
        return (rows + columns) / 2


class CMSC(Objective):
    couples_batch = True  # the other windows of the batch are negatives: not per-sample (no DP-SGD)

    def __init__(self, encoder: nn.Module, projection: ProjectionHead, loss: MultiPositiveInfoNCE) -> None:
        super().__init__(encoder)
        self.projection, self.infonce = projection, loss

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor,
                groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        half = x.shape[-1] // 2
        z1, z2 = (self.projection(self.encoder(segment, lead_mask)) for segment in (x[..., :half], x[..., half : 2 * half]))
        if groups is None:  # every window its own recording
            groups = torch.arange(len(x), device=x.device)
        loss = self.infonce(z1, z2, positive_pairs(groups))
        return {"loss": loss, "contrastive": loss}
