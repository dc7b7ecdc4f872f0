"""Hybrid SSL: masked reconstruction regularised by a contrastive term (CREMA).

Song et al., "Foundation Models for Electrocardiograms", arXiv 2407.07110 (v3 names the method
CREMA, contrastive regularised masked autoencoding): each record yields two augmented views; each
view is masked and reconstructed as in masked ECG modelling, and the pooled embeddings of the two
masked views are pulled together with NT-Xent. The loss is
`generative_weight * reconstruction + contrastive_weight * ntxent`.
"""

from __future__ import annotations

import torch
from torch import nn

from fedssl.data.augment import Augment
from fedssl.objectives.base import Objective
from fedssl.objectives.contrastive import NTXentLoss, ProjectionHead
from fedssl.objectives.generative import MaskedReconstruction


class CREMA(Objective):
    def __init__(self, encoder: nn.Module, augment: Augment, reconstruction: MaskedReconstruction,
                 projection: ProjectionHead, loss: NTXentLoss, generative_weight: float,
                 contrastive_weight: float) -> None:
        super().__init__(encoder)
        self.augment, self.reconstruction, self.projection, self.ntxent = augment, reconstruction, projection, loss
        self.generative_weight, self.contrastive_weight = generative_weight, contrastive_weight

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor,
                groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        (rec1, emb1), (rec2, emb2) = (
            self.reconstruction(self.encoder, *self.augment(x, lead_mask)) for _ in range(2)
        )
        generative = (rec1.mean() + rec2.mean()) / 2
        contrastive = self.ntxent(self.projection(emb1), self.projection(emb2))
        loss = self.generative_weight * generative + self.contrastive_weight * contrastive
        return {"loss": loss, "generative": generative, "contrastive": contrastive}
