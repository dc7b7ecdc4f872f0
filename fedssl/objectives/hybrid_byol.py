"""Per-sample hybrid SSL: masked reconstruction regularised by BYOL-style agreement (DP-safe).

Inspired by CREMA (Song et al., "Foundation Models for Electrocardiograms", arXiv 2407.07110:
masked reconstruction of two augmented views whose pooled embeddings are pulled together with
NT-Xent), with NT-Xent replaced by BYOL's agreement (Grill et al., NeurIPS 2020): the online
encoder, projector and predictor of one masked view must match the projection that a slow-moving
(EMA) target encoder and projector give of the *other* masked view. There are no in-batch
negatives, so every loss term is a function of one window only, which is what DP-SGD's per-sample
clipping needs (`fedssl.privacy.check_dp_safe` accepts it through `per_sample_terms`).

The loss is `generative_weight * reconstruction + contrastive_weight * agreement`, both per window
and averaged over the two views / symmetrised. Target views run under `torch.no_grad()` (no
gradient, and no activations for Opacus to record); the target networks stay at the site.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fedssl.data.augment import Augment
from fedssl.objectives.base import Objective
from fedssl.objectives.byol import BYOLLoss, ema_update
from fedssl.objectives.contrastive import ProjectionHead
from fedssl.objectives.generative import MaskedReconstruction, random_masking


class MaskedBYOL(Objective):
    """CREMA with BYOL's agreement instead of NT-Xent: per-sample, DP-safe."""

    def __init__(self, encoder: nn.Module, augment: Augment, reconstruction: MaskedReconstruction,
                 projection: ProjectionHead, prediction: ProjectionHead, momentum: float,
                 generative_weight: float, agreement_weight: float) -> None:
        super().__init__(encoder)
        self.augment, self.reconstruction = augment, reconstruction
        self.projection, self.prediction = projection, prediction
        self.loss = BYOLLoss()
        self.momentum = momentum
        self.generative_weight, self.agreement_weight = generative_weight, agreement_weight
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)
        self.target_projection = copy.deepcopy(projection).requires_grad_(False)

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor,
                groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {k: v.mean() for k, v in self.per_sample_terms(x, lead_mask).items()}

    @torch.no_grad()
    def _target(self, x: torch.Tensor, lead_mask: torch.Tensor) -> torch.Tensor:
        """Target projection of a freshly masked view (B, projection_dim)."""
        valid = self.target_encoder.token_valid(lead_mask)
        keep, visible, _ = random_masking(valid, self.reconstruction.mask_ratio, self.target_encoder.mask_span)
        latent = self.target_encoder.encode(x, lead_mask, keep=keep, visible=visible)
        return self.target_projection(self.target_encoder.pool(latent, visible))

    def per_sample_terms(self, x: torch.Tensor, lead_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss terms per window, each (B,), for DP-SGD's per-sample clipping."""
        views = [self.augment(x, lead_mask) for _ in range(2)]
        (rec1, emb1), (rec2, emb2) = (self.reconstruction(self.encoder, *view) for view in views)
        online = [self.prediction(self.projection(emb)) for emb in (emb1, emb2)]
        target = [self._target(*view) for view in views]
        generative = (rec1 + rec2) / 2
        agreement = self.loss(online[0], target[1]) + self.loss(online[1], target[0])  # symmetrised
        loss = self.generative_weight * generative + self.agreement_weight * agreement
        return {"loss": loss, "generative": generative, "agreement": agreement}

    def after_step(self) -> None:
        ema_update(self, self.momentum)
