"""Joint-embedding predictive architecture: predict the latent of masked time spans (per-sample).

Assran et al., "Self-Supervised Learning from Images with a Joint-Embedding Predictive
Architecture" (I-JEPA), CVPR 2023: a context encoder sees part of the input, a narrow predictor
given the places of the hidden parts must output what a target encoder (an exponential moving
average of the context encoder, no gradient) gives for them when it sees the whole input; the
loss is the squared distance to the layer-normalised target embeddings. Prediction in embedding
space rather than signal space spends no capacity on noise a 12-lead ECG is full of (mains,
wander, muscle), which masked reconstruction must model.

Here the hidden parts are the masked token spans of masked modelling (`random_masking` with the
encoder's `mask_span`), the predictor is the same light decoder masked modelling uses
(`TokenDecoder`, predicting `encoder.width` values per token) and the EMA is BYOL's
(`ema_update`). There are no negatives: every term is a function of one window (DP-safe); the
predictor and the target encoder stay at the site.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from fedssl.objectives.base import Objective
from fedssl.objectives.byol import ema_update
from fedssl.objectives.generative import TokenDecoder, random_masking


class JEPA(Objective):
    def __init__(self, encoder: nn.Module, predictor: TokenDecoder, mask_ratio: float, momentum: float) -> None:
        super().__init__(encoder)
        self.predictor, self.mask_ratio, self.momentum = predictor, mask_ratio, momentum
        self.target_encoder = copy.deepcopy(encoder).requires_grad_(False)

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor,
                groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        return {k: v.mean() for k, v in self.per_sample_terms(x, lead_mask).items()}

    def per_sample_terms(self, x: torch.Tensor, lead_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Mean squared error over each window's hidden tokens, (B,)."""
        valid = self.encoder.token_valid(lead_mask)
        keep, visible, hidden = random_masking(valid, self.mask_ratio, self.encoder.mask_span)
        context = self.encoder.encode(x, lead_mask, keep=keep, visible=visible)
        prediction = self.predictor(self.encoder, context, keep, visible, valid)
        with torch.no_grad():  # no gradient, and no activations recorded by Opacus
            target = self.target_encoder.encode(x, lead_mask)
            target = F.layer_norm(target, target.shape[-1:])
        error = (prediction - target).pow(2).mean(-1)
        weights = hidden.to(error.dtype)
        loss = (error * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return {"loss": loss, "jepa": loss}

    def after_step(self) -> None:
        ema_update(self, self.momentum, pairs=(("encoder", "target_encoder"),))
