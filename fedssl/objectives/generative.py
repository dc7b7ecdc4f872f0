"""Generative SSL: masked ECG modelling.

He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022, as adapted to
multi-lead ECG by Na et al., "Guiding Masked Representation Learning to Capture
Spatio-Temporal Relationship of Electrocardiogram" (ST-MEM), ICLR 2024: hide most patches of
every record, encode only the visible ones, and let a light decoder reconstruct the hidden
patches from their lead and position; the loss is on hidden patches with per-patch normalised
targets, so the model learns waveform shape rather than amplitude.
"""

from __future__ import annotations

import torch
from torch import nn

from fedssl.models import Block, ECGTransformer, init_weights
from fedssl.objectives.base import Objective


def random_masking(valid: torch.Tensor, ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Choose, per record, a random (1 - ratio) of its recorded tokens to show the encoder.

    Returns `keep` (B, K) token indices to encode, `visible` (B, K) which of them the record
    really shows (records with fewer recorded leads show fewer tokens), and `hidden` (B, N):
    recorded tokens to reconstruct. Tokens of missing leads are neither shown nor reconstructed.
    """
    shown = (valid.sum(1) * (1 - ratio)).round().long().clamp_min(1)
    noise = torch.rand(valid.shape, device=valid.device) + (~valid) * 2.0  # recorded tokens first
    keep = noise.argsort(dim=1)[:, : int(shown.max())]
    visible = torch.arange(keep.shape[1], device=valid.device)[None] < shown[:, None]
    hidden = valid & ~torch.zeros_like(valid).scatter(1, keep, visible)
    return keep, visible, hidden


def patch_targets(patches: torch.Tensor) -> torch.Tensor:
    """Per-patch normalised reconstruction targets (MAE's norm_pix_loss)."""
    mean = patches.mean(-1, keepdim=True)
    var = patches.var(-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + 1e-6).sqrt()


class MaskedReconstruction(nn.Module):
    """Light transformer decoder and its loss; a head that stays at the site."""

    def __init__(self, encoder: ECGTransformer, mask_ratio: float, width: int, depth: int, heads: int = 4) -> None:
        super().__init__()
        self.mask_ratio = mask_ratio
        self.embed = nn.Linear(encoder.width, width)
        self.mask_token = nn.Embedding(1, width)
        self.lead_embed = nn.Embedding(encoder.leads, width)
        self.pos_embed = nn.Embedding(encoder.patches_per_lead, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.predict = nn.Linear(width, encoder.patch_size)
        self.apply(init_weights)

    def forward(self, encoder: ECGTransformer, x: torch.Tensor, lead_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-record reconstruction loss (B,) and the pooled embedding of the visible tokens (B, D)."""
        valid = encoder.token_valid(lead_mask)
        keep, visible, hidden = random_masking(valid, self.mask_ratio)
        latent = encoder.encode(x, lead_mask, keep=keep, visible=visible)
        b, n = valid.shape
        # the mask token is looked up per token (not broadcast) so that Opacus sees a batched input
        mask = self.mask_token(torch.zeros(b, n, dtype=torch.long, device=x.device))
        shown = torch.where(visible[..., None], self.embed(latent), mask[:, : keep.shape[1]])
        tokens = mask.scatter(1, keep[..., None].expand_as(shown), shown)  # nothing hidden leaks in
        tokens = tokens + self.lead_embed(encoder.lead_ids.expand(b, -1)) + self.pos_embed(encoder.pos_ids.expand(b, -1))
        for block in self.blocks:
            tokens = block(tokens, valid)
        error = (self.predict(self.norm(tokens)) - patch_targets(encoder.patchify(x))).pow(2).mean(-1)
        weights = hidden.to(error.dtype)
        loss = (error * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        return loss, encoder.pool(latent, visible)


class MaskedModeling(Objective):
    """Pure generative objective: reconstruct hidden patches of the un-augmented window."""

    def __init__(self, encoder: ECGTransformer, reconstruction: MaskedReconstruction) -> None:
        super().__init__(encoder)
        self.reconstruction = reconstruction

    def forward(self, x: torch.Tensor, lead_mask: torch.Tensor,
                groups: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        loss, _ = self.reconstruction(self.encoder, x, lead_mask)
        return {"loss": loss.mean(), "generative": loss.mean()}
